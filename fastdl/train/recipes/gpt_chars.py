"""``gpt-chars``: a small GPT (RMSNorm, RoPE, SwiGLU, GQA; fastdl's flash attention and fused AdamW)
trained as a character-level language model on the built-in corpus (stdlib docstrings, assembled at
run time; no download). The defaults train in about two minutes on a 2-core CPU; the run ends with a
sample generated from the trained model."""

from __future__ import annotations

from dataclasses import dataclass

from fastdl.data import char_lm_datasets
from fastdl.train.config import TrainConfig
from fastdl.train.recipes import RecipeEnv, RecipeParts, register_recipe
from fastdl.train.recipes.char_lm import char_lm_parts


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
    return char_lm_parts(model, tokenizer, train, val, batch_size=options.batch_size,
                         sample_prompt=options.sample_prompt, sample_chars=options.sample_chars, env=env,
                         context=options.block_size)
