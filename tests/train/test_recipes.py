"""Recipes: every registered one learns in a short run; the registry and the settings it resolves."""

from __future__ import annotations

import csv
from dataclasses import dataclass

import pytest

from fastdl.train import CheckpointError, ConfigError, TrainConfig, recipe_names, register_recipe, run_recipe
from fastdl.train.recipes import DEFAULT_RECIPE, get_recipe, unregister_recipe
from fastdl.train.run import resolve_settings

SHORT = {"steps": 40, "warmup_steps": 0, "log_every": 5, "eval_every": 40, "progress": False}
# Smaller models where a recipe's default would make a 40-step run slow on a 2-core CI machine.
SMALL = {"gpt-chars": {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "block_size": 64,
                       "batch_size": 16, "sample_chars": 20},
         "mamba-chars": {"n_layer": 2, "d_model": 64, "block_size": 64, "batch_size": 16, "sample_chars": 20},
         "lstm-chars": {"hidden_size": 64, "num_layers": 1, "seq_len": 32, "batch_size": 16, "sample_chars": 20}}


def train_losses(out_dir) -> list[float]:
    return [float(r["train_loss"]) for r in csv.DictReader(open(out_dir / "log.csv")) if r["train_loss"]]


@pytest.mark.parametrize("name", recipe_names())
def test_loss_falls_on_each_recipe(name, tmp_path):
    result, _, final_metric = run_recipe(name, {**SHORT, **SMALL.get(name, {})}, out_dir=tmp_path)
    curve = train_losses(tmp_path)
    assert curve[-1] < 0.75 * curve[0], curve
    assert final_metric in result.metrics


def test_gpt_chars_ends_with_a_generated_sample(tmp_path):
    overrides = {**SHORT, **SMALL["gpt-chars"], "steps": 5, "sample_prompt": "def "}
    result, _, _ = run_recipe("gpt-chars", overrides, out_dir=tmp_path)
    assert result.sample.startswith("def ") and len(result.sample) == len("def ") + 20


def test_mamba_chars_ends_with_a_sample_decoded_over_the_states(tmp_path):
    overrides = {**SHORT, **SMALL["mamba-chars"], "steps": 5, "sample_prompt": "def "}
    result, _, _ = run_recipe("mamba-chars", overrides, out_dir=tmp_path)
    assert result.sample.startswith("def ") and len(result.sample) == len("def ") + 20


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lstm_chars_ends_with_a_generated_sample(cell, tmp_path):
    overrides = {**SHORT, **SMALL["lstm-chars"], "cell": cell, "steps": 5, "sample_prompt": "def "}
    result, settings, _ = run_recipe("lstm-chars", overrides, out_dir=tmp_path)
    assert result.sample.startswith("def ") and len(result.sample) == len("def ") + 20
    assert settings.options.cell == cell


def test_loss_falls_on_a_char_lm_recipe_registered_from_outside(char_recipe, tmp_path):
    result, settings, final_metric = run_recipe(char_recipe, SHORT, out_dir=tmp_path)
    curve = train_losses(tmp_path)
    assert curve[-1] < 0.75 * curve[0], curve
    assert final_metric == "eval_perplexity" and result.metrics["eval_perplexity"] < 40  # 96 characters: 96 at chance
    assert settings.train.throughput_unit == "tokens"


def test_the_default_recipe_is_registered():
    assert DEFAULT_RECIPE in recipe_names()


def test_settings_are_routed_to_the_trainer_or_the_recipe():
    settings = resolve_settings("mlp-digits", {"lr": "0.01", "hidden_sizes": [32], "steps": 7.0})
    assert settings.train.lr == 0.01 and settings.train.steps == 7
    assert settings.options.hidden_sizes == (32,)
    assert resolve_settings(None, {"recipe": "mlp-digits"}).recipe.name == "mlp-digits"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"hiden_sizes": [32]}, "unknown setting 'hiden_sizes' for recipe 'mlp-digits'; did you mean 'hidden_sizes'"),
    ({"steps": 2.5}, "steps must be an integer, got 2.5"),
    ({"steps": 0}, "steps must be at least 1"),
    ({"lr": "fast"}, "lr must be a number"),
    ({"precision": "fp8"}, "precision must be one of fp32, bf16, fp16"),
    ({"hidden_sizes": "wide"}, "hidden_sizes must be a list"),
    ({"recipe": "lenet-digits"}, "the config names recipe 'lenet-digits', the command line 'mlp-digits'"),
])
def test_bad_settings_are_explained(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        resolve_settings("mlp-digits", overrides)


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'no-such-recipe'; available: .*gpt-chars.*mlp-digits"):
        get_recipe("no-such-recipe")


def test_registration_rejects_clashing_options_and_duplicate_names():
    @dataclass
    class Clashing:
        lr: float = 0.1

    with pytest.raises(TypeError, match=r"option names \['lr'\] are also TrainConfig settings"):
        register_recipe("clash", options=Clashing)

    @dataclass
    class Fine:
        width: int = 4

    register_recipe("dup", options=Fine, train=TrainConfig())(lambda options, env: None)
    try:
        with pytest.raises(ValueError, match="two recipes are named 'dup'"):
            register_recipe("dup", options=Fine)(lambda options, env: None)
    finally:
        unregister_recipe("dup")


def test_an_unwritable_output_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="output directory .* is not writable"):
        run_recipe("mlp-digits", SHORT, out_dir=blocker / "run")


def test_a_checkpoint_of_another_recipe_or_model_fails_before_training(char_recipe, tmp_path):
    run_recipe("mlp-digits", {**SHORT, "steps": 2}, out_dir=tmp_path / "mlp")
    checkpoint = tmp_path / "mlp" / "checkpoint.pt"
    with pytest.raises(CheckpointError, match="written by recipe 'mlp-digits', not 'test-char-bigram'"):
        run_recipe(char_recipe, SHORT, out_dir=tmp_path / "char", resume=checkpoint)
    with pytest.raises(CheckpointError, match="holds a different model; .*other shapes: hidden.0.weight"):
        run_recipe("mlp-digits", {**SHORT, "hidden_sizes": [32, 64]}, out_dir=tmp_path / "wide", resume=checkpoint)
    assert not (tmp_path / "wide" / "log.csv").exists()  # nothing trained, nothing logged
    with pytest.raises(ConfigError, match="already holds a checkpoint; resume it with --resume"):
        run_recipe("mlp-digits", SHORT, out_dir=tmp_path / "mlp")
