"""Activation recomputation per transformer block.

- `full`: keep only each block's input; re-run the whole block in backward.
- `selective`: keep the outputs of matmuls and attention, recompute the cheap element-wise
  work (norms, RoPE, SiLU and the SwiGLU product). Saves most of a block's activation memory
  for no extra matmul FLOPs. In a MoE block only the attention sublayer is recomputed so: the
  MoE layer's routing and token exchange (collectives whose splits depend on the data) cannot
  be replayed op by op, and keep their activations.

The block's `forward` is replaced on the instance (not wrapped in a new module), so parameter
names and checkpoints are the same with and without recomputation.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from loom.kernels import cpu_attention  # noqa: F401  (registers torch.ops.loom.cpu_attention_*)
from loom.models.moe import MoE

RECOMPUTE_MODES = ("none", "full", "selective")
aten = torch.ops.aten
_SAVE_OPS = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.loom.cpu_attention_forward.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
}


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def apply_recompute(blocks: list[nn.Module], mode: str) -> None:
    if mode == "none":
        return
    for block in blocks:
        inner = block.forward
        if mode == "full":
            block.forward = functools.partial(checkpoint, inner, use_reentrant=False)
        elif mode == "selective" and isinstance(block.feed_forward, MoE):
            block.attention.forward = functools.partial(
                checkpoint, block.attention.forward, use_reentrant=False, context_fn=_selective_context
            )
        elif mode == "selective":
            block.forward = functools.partial(
                checkpoint, inner, use_reentrant=False, context_fn=_selective_context
            )
        else:
            raise ValueError(f"train.recompute={mode!r}; allowed: {', '.join(RECOMPUTE_MODES)}")
