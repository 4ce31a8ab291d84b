"""`fastdl generate` on a gpt-chars checkpoint trained for two steps."""

import pytest
import torch

from fastdl.cli import main
from fastdl.inference.checkpoint import load_char_gpt
from fastdl.train import run_recipe

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1, "block_size": 48, "batch_size": 4,
        "sample_chars": 4, "steps": 2, "warmup_steps": 0, "eval_every": 2, "eval_batches": 1, "progress": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("gpt-chars")
    run_recipe("gpt-chars", TINY, out_dir=out)
    yield out / "checkpoint.pt"
    torch.set_num_threads(threads)


def test_generate_streams_the_greedy_continuation(checkpoint, capsys):
    assert main(["generate", "--model", str(checkpoint), "--prompt", "def f", "--max-new-tokens", "12",
                 "--temperature", "0", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    model, tokenizer = load_char_gpt(checkpoint)
    idx = tokenizer.encode("def f").unsqueeze(0)
    expected = tokenizer.decode(model.generate(idx, 12, temperature=0)[0].tolist())
    assert text == expected + "\n"


def test_generate_seeded_sampling_is_reproducible(checkpoint, capsys):
    args = ["generate", "--model", str(checkpoint), "--prompt", "import ", "--max-new-tokens", "10",
            "--temperature", "1.0", "--top-k", "10", "--top-p", "0.9", "--seed", "3", "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("import ") and len(first) == len("import ") + 11


def test_generate_errors(checkpoint, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "none.pt"), "--prompt", "a"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(checkpoint), "--prompt", "\u00e9\u00e9", "--device", "cpu"]) == 2
    assert "not in the vocabulary" in capsys.readouterr().err
    assert main(["generate", "--model", str(checkpoint), "--prompt", "a", "--top-p", "2", "--device", "cpu"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", "--model", str(checkpoint), "--prompt", "a" * 48, "--device", "cpu"]) == 2
    assert "too long" in capsys.readouterr().err
