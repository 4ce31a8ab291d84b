"""``gpt-chars``: a small GPT (RMSNorm, RoPE, SwiGLU, GQA; fastdl's flash attention and fused AdamW)
trained as a character-level language model on the built-in corpus (stdlib docstrings, assembled at
run time; no download). The defaults train in about two minutes on a 2-core CPU; the run ends with a
sample generated from the trained model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fastdl.data import char_lm_datasets
from fastdl.train import losses
from fastdl.train.config import TrainConfig
from fastdl.train.metrics import Perplexity
from fastdl.train.recipes import RecipeEnv, RecipeParts, register_recipe


@dataclass
class GPTCharsOptions:
    block_size: int = 128          # characters of context
    n_layer: int = 4
    n_embd: int = 128              # model width
    n_head: int = 4                # query heads (head_dim 32)
    n_kv_head: int = 2             # key/value heads: grouped-query attention
    dropout: float = 0.0
    batch_size: int = 32           # sequences per process and micro-batch
    sample_chars: int = 200        # characters generated at the end of the run
    sample_prompt: str = "def "    # where the sample starts; characters missing from the vocabulary are dropped


def gpt_loss(outputs: tuple[Tensor, Tensor | None], targets: Tensor) -> Tensor:
    """GPT.forward returns (logits, loss); the trainer owns the loss, so it takes the logits."""
    return losses.cross_entropy(outputs[0], targets)


@register_recipe(
    "gpt-chars", options=GPTCharsOptions,
    description="small GPT on the built-in text, character level (flash attention + fused AdamW)",
    train=TrainConfig(steps=600, lr=3e-3, weight_decay=0.1, warmup_steps=30, min_lr=3e-4, eval_every=100,
                      eval_batches=8, log_every=10, throughput_unit="tokens"),
)
def gpt_chars(options: GPTCharsOptions, env: RecipeEnv) -> RecipeParts:
    from fastdl.models.gpt import GPT, GPTConfig

    tokenizer, train, val = char_lm_datasets(block_size=options.block_size)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=options.block_size, n_layer=options.n_layer,
                          n_embd=options.n_embd, n_head=options.n_head, n_kv_head=options.n_kv_head,
                          dropout=options.dropout))

    def sample(trained: nn.Module) -> str:
        prompt = [c for c in options.sample_prompt if c in tokenizer.vocab] or [tokenizer.vocab[0]]
        idx = tokenizer.encode("".join(prompt)).unsqueeze(0).to(next(trained.parameters()).device)
        steps = min(options.sample_chars, options.block_size - idx.shape[1])
        trained.eval()
        with torch.no_grad():
            out = trained.generate(idx, steps, temperature=0.8, top_k=20,
                                   generator=torch.Generator(device=idx.device).manual_seed(env.train.seed))
        return tokenizer.decode(out[0].tolist())

    return RecipeParts(
        model=model,
        loss_fn=gpt_loss,
        train_loader=DataLoader(train, batch_size=options.batch_size, shuffle=True),
        eval_loader=DataLoader(val, batch_size=options.batch_size),
        metrics={"perplexity": Perplexity()},
        meta={"vocab": tokenizer.vocab, "num_params": model.num_params()},
        final_metric="eval_perplexity",
        sample=sample,
    )
