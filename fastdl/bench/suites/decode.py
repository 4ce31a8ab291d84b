"""Decode attention over a KV cache: fastdl.flash_attn_with_kvcache on a paged cache against torch's
scaled_dot_product_attention over the same keys stored contiguously.

One decoding step: every sequence of the batch has one new query token that attends to its whole cache.
The kernel is memory-bound (each K/V byte is read once for 2 flops per query head of its group), so the
figure that matters is GB/s of K/V read against the machine's copy bandwidth (the runner measures it) and
time against SDPA, which reads the same bytes from a contiguous (batch, heads, seqlen, dim) layout with
no block table. The paged cache has a shuffled block table (blocks scattered as after many allocations and
frees), block size 16 (vLLM's default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdl.bench.core import Case, Contender, StepFn, Suite
from fastdl.ops.paged_attn import flash_attn_with_kvcache


@dataclass(frozen=True)
class Shape:
    batch: int
    context: int
    nheads_k: int
    group: int
    headdim: int
    dtype: torch.dtype = torch.float32
    block_size: int = 16

    @property
    def nheads(self) -> int:
        return self.nheads_k * self.group

    def io_bytes(self) -> int:
        """K and V of every cached token read once; q read and out written."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        kv = 2 * self.batch * self.context * self.nheads_k * self.headdim
        return (kv + 2 * self.batch * self.nheads * self.headdim) * elem

    def label(self) -> str:
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return (f"b{self.batch}-ctx{self.context}-hk{self.nheads_k}-g{self.group}-d{self.headdim}"
                f"-bs{self.block_size}-{dtype}")


def _tensors(shape: Shape, device: torch.device):
    """q (b, 1, h, d) and the contiguous K/V (b, ctx, hk, d), the same numbers for every contender."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(shape.batch, 1, shape.nheads, shape.headdim, generator=gen)
    k = torch.randn(shape.batch, shape.context, shape.nheads_k, shape.headdim, generator=gen)
    v = torch.randn(shape.batch, shape.context, shape.nheads_k, shape.headdim, generator=gen)
    return [x.to(device=device, dtype=shape.dtype) for x in (q, k, v)]


def _paged(shape: Shape):
    def setup(device: torch.device) -> StepFn:
        q, k, v = _tensors(shape, device)
        blocks_per_seq = -(-shape.context // shape.block_size)
        num_blocks = shape.batch * blocks_per_seq
        gen = torch.Generator(device="cpu").manual_seed(1)
        table = torch.randperm(num_blocks, generator=gen, dtype=torch.int32).view(shape.batch, blocks_per_seq)
        pad = blocks_per_seq * shape.block_size - shape.context
        cache_shape = (num_blocks, shape.block_size, shape.nheads_k, shape.headdim)
        k_cache = torch.empty(cache_shape, dtype=shape.dtype, device=device)
        v_cache = torch.empty(cache_shape, dtype=shape.dtype, device=device)
        order = table.flatten().long().to(device)
        k_cache[order] = F.pad(k, (0, 0, 0, 0, 0, pad)).reshape(cache_shape)
        v_cache[order] = F.pad(v, (0, 0, 0, 0, 0, pad)).reshape(cache_shape)
        table = table.to(device)
        seqlens = torch.full((shape.batch,), shape.context, dtype=torch.int32, device=device)

        def step():
            return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table)
        return step

    return setup


def _sdpa(shape: Shape):
    def setup(device: torch.device) -> StepFn:
        q, k, v = (x.transpose(1, 2).contiguous() for x in _tensors(shape, device))  # (b, h, s, d)
        gqa = shape.group > 1

        def step():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        return step

    return setup


def make_case(shape: Shape) -> Case:
    return Case(
        name=f"decode-{shape.label()}",
        description=f"one decoding step over a paged KV cache, {shape.label()}",
        bytes_per_step=shape.io_bytes(),
        flops_per_step=4 * shape.batch * shape.nheads * shape.context * shape.headdim,
        contenders=(Contender("fastdl paged", _paged(shape), is_fastdl=True),
                    Contender("torch sdpa (contiguous)", _sdpa(shape))),
        params={"batch": shape.batch, "context": shape.context, "nheads_k": shape.nheads_k, "group": shape.group,
                "headdim": shape.headdim, "block_size": shape.block_size, "dtype": str(shape.dtype)},
    )


def make_cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type == "cuda":
        import fastdl

        if not fastdl.build_info()["cuda"]:
            return []
        shapes = [Shape(16, 512 if quick else 4096, 8, g, d, torch.bfloat16) for g in (1, 8) for d in (64, 128)]
        if not quick:
            shapes += [Shape(64, 2048, 8, 4, 128, torch.float16), Shape(1, 65536, 8, 8, 128, torch.bfloat16)]
        return [make_case(s) for s in shapes]
    if quick:
        return [make_case(Shape(4, 256, 8, 1, 64))]
    # The target: batch 16, context 2048, 8 kv-heads x 64 dims, fp32; then GQA (8 query heads per
    # kv-head, Llama-3 70B's ratio), bf16, and one long context at batch 1 (split-K across the threads).
    return [make_case(s) for s in (Shape(16, 2048, 8, 1, 64), Shape(16, 2048, 8, 8, 64),
                                   Shape(16, 2048, 8, 1, 128, torch.bfloat16), Shape(1, 32768, 8, 1, 64))]


SUITE = Suite(name="decode", make_cases=make_cases,
              description="paged-KV decode attention: fastdl.flash_attn_with_kvcache vs torch SDPA")
