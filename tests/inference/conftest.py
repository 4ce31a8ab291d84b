import pytest
import torch

from fastdl.models.gpt import GPT, GPTConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: with two threads each op's fork/join costs more than its math (see tests/models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    """A random GPT whose greedy continuations do not collapse into one repeated token: untied embeddings
    and weights ~1.5x the 1/sqrt(fan_in) scale make the next token depend on the whole context (GPT's
    training init, std 0.02, mostly predicts the last token again)."""
    torch.manual_seed(seed)
    config = dict(vocab_size=61, block_size=96, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, tie_embeddings=False)
    config.update(overrides)
    model = GPT(GPTConfig(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5)
        model.tok_emb.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_gpt()
