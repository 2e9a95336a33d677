"""The one attention-kernel interface of loom.

Everything that computes softmax(QK^T)V goes through `attention_forward` /
`attention_backward`. They return and consume the log-sum-exp of each query row, so that
context parallelism can merge partial results over KV blocks exactly, and packed-document
masking can plug in at the same place.

Layout everywhere: q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] with Hq % Hkv == 0 (grouped-query
attention); out [B, Hq, Lq, D]; lse [B, Hq, Lq] in fp32.

Kernels: on CPU the flash op `_scaled_dot_product_flash_attention_for_cpu` (handles GQA
natively); on CUDA the flash SDPA op for half types and the memory-efficient op for fp32.
"""
from __future__ import annotations

import torch
from torch import nn

aten = torch.ops.aten


def _expand_kv(k: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * n_rep, L, D]; CUDA kernels want equal head counts."""
    if n_rep == 1:
        return k
    return k.repeat_interleave(n_rep, dim=1)


def _reduce_kv_grad(dk: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Inverse of `_expand_kv` for gradients: [B, Hkv * n_rep, L, D] -> [B, Hkv, L, D]."""
    if n_rep == 1:
        return dk
    b, h, l, d = dk.shape
    return dk.view(b, h // n_rep, n_rep, l, d).sum(dim=2)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B, Hq, Lq, D], lse [B, Hq, Lq] fp32)."""
    if q.device.type == "cuda":
        n_rep = q.shape[1] // k.shape[1]
        k, v = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
        if q.dtype in (torch.float16, torch.bfloat16):
            out, lse, *_ = aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, causal, False, scale=scale
            )
        else:
            out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
                q, k, v, None, True, 0.0, causal, scale=scale
            )
            lse = lse[..., : q.shape[2]]  # the efficient kernel pads L to a multiple of 32
        return out, lse
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) with the shapes of q, k, v."""
    if q.device.type == "cuda":
        n_rep = q.shape[1] // k.shape[1]
        ke, ve = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
        if q.dtype in (torch.float16, torch.bfloat16):
            empty = torch.empty(0, device=q.device, dtype=torch.int64)
            dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
                dout, q, ke, ve, out, lse, empty, empty, q.shape[2], k.shape[2], 0.0, causal,
                empty, empty, scale=scale,
            )
        else:
            philox = torch.empty(0, device=q.device, dtype=torch.int64)
            dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
                dout, q, ke, ve, None, out, lse.contiguous(), philox, philox, 0.0,
                [True, True, True, False], causal, scale=scale,
            )
        return dq, _reduce_kv_grad(dk, n_rep), _reduce_kv_grad(dv, n_rep)
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale
    )


class _FlashAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        out, lse = attention_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout.contiguous(), q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


class CoreAttention(nn.Module):
    """softmax(QK^T * scale) V over the local sequence, causal.

    A module (not a function) so that a parallelizer can swap it for a context-parallel
    implementation with the same call signature: q [B, Hq, L, D], k, v [B, Hkv, L, D] ->
    out [B, Hq, L, D].
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _FlashAttentionFn.apply(q, k, v, True, q.shape[-1] ** -0.5)
