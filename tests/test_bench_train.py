"""The training-throughput benchmark compares like with like: the plain-torch twin is the same model."""

import torch

from fastdl.bench.suites.train import SDPAAttention, TorchSwiGLU, TrainShape, build_model
from fastdl.nn import RMSNorm, SwiGLU


def test_torch_twin_is_the_same_model_on_torch_attention():
    shape = TrainShape(batch=2, block_size=24, n_layer=2, n_embd=64, n_head=4, n_kv_head=2)
    fastdl_model = build_model(shape, torch.device("cpu"), fused_ops=True)
    twin = build_model(shape, torch.device("cpu"), fused_ops=False)
    assert all(isinstance(block.attn, SDPAAttention) for block in twin.blocks)
    assert not any(isinstance(block.attn, SDPAAttention) for block in fastdl_model.blocks)
    # The twin's RMSNorm, RoPE (inside SDPAAttention) and SwiGLU are torch's composites, not fastdl's kernels.
    norms = [m for m in twin.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * shape.n_layer + 1 and all(type(m) is torch.nn.RMSNorm for m in norms)
    assert all(type(block.mlp) is TorchSwiGLU for block in twin.blocks)
    assert sum(type(m) is RMSNorm for m in fastdl_model.modules()) == 2 * shape.n_layer + 1
    assert all(type(block.mlp) is SwiGLU for block in fastdl_model.blocks)
    for (name, p), (twin_name, q) in zip(fastdl_model.state_dict().items(), twin.state_dict().items()):
        assert name == twin_name and torch.equal(p, q)
    tokens = torch.randint(96, (shape.batch, shape.block_size + 1))
    logits, loss = fastdl_model(tokens[:, :-1], tokens[:, 1:])
    twin_logits, twin_loss = twin(tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(logits, twin_logits, rtol=1e-5, atol=1e-5)
    loss.backward()
    twin_loss.backward()
    for p, q in zip(fastdl_model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
