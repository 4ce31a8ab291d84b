"""Training throughput: one step of the ``gpt-chars`` recipe's model on fastdl's fused ops against the same
model written with plain torch.nn and torch.optim.

fastdl's contender is :class:`fastdl.models.GPT` as the recipe builds it: flash attention
(:func:`fastdl.flash_attn_func`), the fused RMSNorm, rotary-embedding and SwiGLU kernels
(:mod:`fastdl.ops.fused_layers`) and the fused multi-tensor :class:`fastdl.optim.AdamW`. The peer is what a
user would write instead: the same modules and weights, attention through
``torch.nn.functional.scaled_dot_product_attention`` (GQA via ``enable_gqa``; on CPU it dispatches to torch's
own flash kernel), ``torch.nn.RMSNorm``, RoPE and SwiGLU as torch pointwise ops, and
``torch.optim.AdamW(fused=True)``, torch's fastest AdamW on CPU and CUDA. Everything else (embedding, linear
layers, cross-entropy) is the same torch code in both, so the ratio is what the fused ops buy end to end.

One timed call is one optimizer step: forward, loss, backward, ``step()``, ``zero_grad()``, on a fixed batch of
random tokens (the data loader is the same for both and is left out). FLOPs are nanoGPT's ``estimate_mfu``
count (PaLM appendix B): 6 N per token for the non-embedding parameters plus 12 L H D T for attention, so
GFLOP/s over the machine's matmul peak is the model FLOPs utilisation (``benchmarks/bench_train.py`` measures
that peak and prints MFU).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdl.bench.core import Case, Contender, StepFn, Suite
from fastdl.models.gpt import GPT, GPTConfig
from fastdl.nn.attention import Attention, KVCache
from fastdl.nn.layers import RMSNorm, SwiGLU
from fastdl.ops.fused_layers import rotary_emb_ref

CHAR_VOCAB = 96  # about the built-in corpus's character vocabulary; the exact size barely moves the cost


class SDPAAttention(Attention):
    """fastdl.nn.Attention's module and weights with RoPE in torch pointwise ops and the attention itself
    computed by torch's SDPA."""

    def forward(self, x: Tensor, kv_cache: Optional[KVCache] = None) -> Tensor:
        if kv_cache is not None or self.sliding_window is not None:
            raise NotImplementedError("the plain-torch twin is for training throughput only")
        batch, seqlen, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, seqlen, self.n_head + 2 * self.n_kv_head, self.head_dim)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=2)
        if self.rotary is not None:
            cos, sin = self.rotary(torch.arange(seqlen, device=x.device))
            q, k = rotary_emb_ref(q, cos, sin), rotary_emb_ref(k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=self.causal, enable_gqa=self.n_head != self.n_kv_head)
        return self.out_proj(y.transpose(1, 2).reshape(batch, seqlen, self.n_head * self.head_dim))


class TorchSwiGLU(SwiGLU):
    """fastdl.nn.SwiGLU's module and weights with the gate in torch pointwise ops: silu, then mul."""

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def torch_twin(model: GPT) -> GPT:
    """A deep copy of ``model`` (same weights) on plain torch: SDPA attention with composite RoPE,
    ``torch.nn.RMSNorm`` and a composite SwiGLU gate."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, Attention):
            module.__class__ = SDPAAttention
        elif isinstance(module, RMSNorm):
            module.__class__ = torch.nn.RMSNorm  # fastdl's RMSNorm subclasses it: same attributes and weight
        elif isinstance(module, SwiGLU):
            module.__class__ = TorchSwiGLU
    return twin


@dataclass(frozen=True)
class TrainShape:
    batch: int
    block_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int

    @classmethod
    def gpt_chars(cls) -> TrainShape:
        """The gpt-chars recipe's defaults, read from the recipe so the two cannot drift apart."""
        from fastdl.train.recipes.gpt_chars import GPTCharsOptions

        o = GPTCharsOptions()
        return cls(o.batch_size, o.block_size, o.n_layer, o.n_embd, o.n_head, o.n_kv_head)

    def config(self) -> GPTConfig:
        return GPTConfig(vocab_size=CHAR_VOCAB, block_size=self.block_size, n_layer=self.n_layer,
                         n_embd=self.n_embd, n_head=self.n_head, n_kv_head=self.n_kv_head)

    def flops_per_step(self) -> int:
        model = GPT(self.config())
        c = model.config
        per_token = 6 * model.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size
        return per_token * self.batch * self.block_size

    def label(self) -> str:
        return (f"b{self.batch}-t{self.block_size}-l{self.n_layer}-e{self.n_embd}-"
                f"h{self.n_head}-kv{self.n_kv_head}")


def build_model(shape: TrainShape, device: torch.device, fused_ops: bool) -> GPT:
    """The recipe's model with seed-0 weights; ``fused_ops=False`` gives its plain-torch twin."""
    torch.manual_seed(0)
    model = GPT(shape.config())
    if not fused_ops:
        model = torch_twin(model)
    return model.to(device).train()


def make_step(shape: TrainShape, device: torch.device, fused_ops: bool) -> StepFn:
    """One training step of the recipe's model: fastdl's ops and optimizer, or plain torch's."""
    import fastdl.optim

    model = build_model(shape, device, fused_ops)
    # The recipe's optimizer settings (gpt-chars: lr 3e-3, weight decay 0.1).
    optimizer_cls = fastdl.optim.AdamW if fused_ops else torch.optim.AdamW
    extra = {} if fused_ops else {"fused": True}
    optimizer = optimizer_cls(model.parameters(), lr=3e-3, weight_decay=0.1, **extra)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(CHAR_VOCAB, (shape.batch, shape.block_size + 1), generator=generator).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's state exists before timing, as in a running job
    return step


def _contender(shape: TrainShape, fused_ops: bool):
    def setup(device: torch.device) -> StepFn:
        return make_step(shape, device, fused_ops)
    return setup


def make_cases(quick: bool, device: torch.device) -> list[Case]:
    shape = TrainShape.gpt_chars()
    if quick:
        shape = TrainShape(4, 64, 2, shape.n_embd, shape.n_head, shape.n_kv_head)
    params = sum(p.numel() for p in GPT(shape.config()).parameters())
    return [Case(
        name=f"gpt-step-{shape.label()}",
        description=(f"one gpt-chars training step ({params / 1e6:.2f}M params, "
                     f"{shape.batch}x{shape.block_size} tokens)"),
        # The step is compute-bound (GEMMs, attention); the floor counted here is the parameter traffic alone:
        # weights read forward and backward, gradients written, and AdamW reading the weight, the gradient and
        # both moments and writing weight and moments: 10 fp32 accesses per parameter.
        bytes_per_step=10 * 4 * params,
        flops_per_step=shape.flops_per_step(),
        contenders=(Contender("fastdl (flash attn + fused AdamW)", _contender(shape, True), is_fastdl=True),
                    Contender("torch (SDPA + AdamW fused)", _contender(shape, False))),
        params={"batch": shape.batch, "block_size": shape.block_size, "n_layer": shape.n_layer,
                "n_embd": shape.n_embd, "n_head": shape.n_head, "n_kv_head": shape.n_kv_head,
                "tokens_per_step": shape.batch * shape.block_size, "params": params},
    )]


SUITE = Suite(name="train", make_cases=make_cases,
              description="gpt-chars training step: fastdl's fused ops vs the same model in plain torch")
