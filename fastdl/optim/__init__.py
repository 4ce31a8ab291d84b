"""Drop-in fused optimizers: ``fastdl.optim.AdamW(model.parameters(), lr=1e-3)`` replaces
``torch.optim.AdamW`` without other changes (same arguments, param_groups and state_dict format;
LR schedulers and ``torch.amp.GradScaler`` work). Each step is one fused multi-tensor kernel call per
parameter group, device and dtype. ``master_weights=True`` keeps fp32 masters of bf16/fp16 params."""

from fastdl.optim.lamb import LAMB, LAMBReference, lamb_ref
from fastdl.optim.optimizers import SGD, Adagrad, Adam, Adamax, AdamW, NAdam, RMSprop

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam", "LAMB", "LAMBReference", "lamb_ref"]
