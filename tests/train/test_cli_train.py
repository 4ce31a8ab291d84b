"""`fastdl train`: the default recipe end to end, and every bad setting as a message and exit status 2."""

from __future__ import annotations

import json

import pytest
import torch

from fastdl.cli import main

QUICK = ["--no-progress", "--set", "eval_every=10", "--set", "warmup_steps=0"]


def test_list_names_the_default_recipe(capsys):
    assert main(["train", "--list"]) == 0
    assert "mlp-digits" in capsys.readouterr().out.split("(default)")[0]


def test_default_recipe_trains_and_writes_its_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "20", "--out", str(out), *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "mlp-digits: step 20, eval_accuracy" in printed
    assert {p.name for p in out.iterdir()} == {"checkpoint.pt", "log.csv", "curves.png", "config.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["meta"]["recipe"] == "mlp-digits" and config["meta"]["digits_source"] in ("sklearn", "procedural")

    # Resuming a finished run has nothing left to do; it reports the same step.
    assert main(["train", "--steps", "20", "--out", str(out), "--resume", *QUICK]) == 0
    assert "mlp-digits: step 20" in capsys.readouterr().out


def test_config_file_settings_apply(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"recipe": "mlp-digits", "steps": 3, "hidden_sizes": [16], "eval_every": 3}))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "step 3" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["meta"]["options"]["hidden_sizes"] == [16]


def bad_config(tmp_path, text: str, name: str = "bad.json") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(("args", "message"), [
    (["no-such-recipe"], "unknown recipe 'no-such-recipe'; available:"),
    (["--set", "dropuot=0.2"], "unknown setting 'dropuot' for recipe 'mlp-digits'; did you mean 'dropout'?"),
    (["--set", "dropout=2"], "dropout must be in [0, 1)"),
    (["--set", "eval_every=-1"], "eval_every must be at least 1"),
    (["--config", "{tmp}/missing.json"], "config file '{tmp}/missing.json' does not exist"),
    (["--config", "BAD_JSON"], "is not valid JSON"),
    (["--config", "BAD_KEY"], "unknown setting 'batchsize'"),
    (["--config", "BAD_SUFFIX"], "expected .json, .toml or .yaml"),
    (["--out", "{tmp}/file/run"], "output directory '{tmp}/file/run' is not writable"),
    (["--resume", "{tmp}/missing.pt"], "checkpoint '{tmp}/missing.pt' does not exist"),
])
def test_bad_settings_exit_2_with_a_message(args, message, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    replacements = {"BAD_JSON": bad_config(tmp_path, "{steps: 3"),
                    "BAD_KEY": bad_config(tmp_path, '{"batchsize": 3}', "bad-key.json"),
                    "BAD_SUFFIX": bad_config(tmp_path, "steps = 3", "bad.ini")}
    args = [replacements.get(a, a.replace("{tmp}", str(tmp_path))) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert main(["train", *args, "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fastdl train: ")
    assert message.replace("{tmp}", str(tmp_path)) in captured.err
    assert captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--device", "cuda", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err
