"""What the character language-model recipes (gpt-chars, lstm-chars, mamba-chars) share: the loss on a
model that returns (logits, loss), the loaders, perplexity, and the sample generated at the end of the run.
This module registers no recipe."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fastdl.data import CharTokenizer
from fastdl.train import losses
from fastdl.train.metrics import Perplexity
from fastdl.train.recipes import RecipeEnv, RecipeParts


def logits_loss(outputs: tuple[Tensor, Optional[Tensor]], targets: Tensor) -> Tensor:
    """The LMs' forward returns (logits, loss); the trainer owns the loss, so it takes the logits."""
    return losses.cross_entropy(outputs[0], targets)


def char_lm_parts(model: nn.Module, tokenizer: CharTokenizer, train: Dataset, val: Dataset, *, batch_size: int,
                  sample_prompt: str, sample_chars: int, env: RecipeEnv, context: Optional[int] = None,
                  meta: Optional[dict] = None) -> RecipeParts:
    """RecipeParts of a character LM whose ``generate(idx, max_new_tokens, temperature, top_k, generator=)``
    continues a (1, T) prompt; the sample is drawn with temperature 0.8 and top-k 20 under the run's seed.
    ``context``: the most tokens the model takes (prompt + sample), for models with a fixed block size."""

    def sample(trained: nn.Module) -> str:
        prompt = [c for c in sample_prompt if c in tokenizer.vocab] or [tokenizer.vocab[0]]
        idx = tokenizer.encode("".join(prompt)).unsqueeze(0).to(next(trained.parameters()).device)
        trained.eval()
        with torch.no_grad():
            steps = sample_chars if context is None else min(sample_chars, context - idx.shape[1])
            out = trained.generate(idx, steps, temperature=0.8, top_k=20,
                                   generator=torch.Generator(device=idx.device).manual_seed(env.train.seed))
        return tokenizer.decode(out[0].tolist())

    return RecipeParts(
        model=model,
        loss_fn=logits_loss,
        train_loader=DataLoader(train, batch_size=batch_size, shuffle=True),
        eval_loader=DataLoader(val, batch_size=batch_size),
        metrics={"perplexity": Perplexity()},
        meta={"vocab": tokenizer.vocab, "num_params": model.num_params(), **(meta or {})},
        final_metric="eval_perplexity",
        sample=sample,
    )
