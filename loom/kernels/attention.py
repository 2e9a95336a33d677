"""Attention kernels: softmax(QK^T * scale) V and its backward on one device, returning and taking
the log-sum-exp of each query row (so partial results over KV blocks merge exactly: context
parallelism, packed documents).

Layout everywhere: q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] with Hq % Hkv == 0 (grouped-query
attention); out [B, Hq, Lq, D]; lse [B, Hq, Lq] in fp32.

`TORCH_ATTENTION` runs PyTorch's ops: on CPU the flash op
`_scaled_dot_product_flash_attention_for_cpu`, which handles GQA natively; on CUDA the flash SDPA
op for half types and the memory-efficient op for fp32. A converter may install another kernel
(loom's AVX-512 CPU kernel: loom.kernels.cpu_attention). bf16 inputs go to the fp32 kernel
widened where the kernel says so (`AttentionKernel.widens`): on CPUs without bf16 arithmetic (see
loom.kernels.matmul; there the op's bf16 backward runs ~3x slower than its fp32 one), and with
loom's CPU kernel at small head dims (loom.kernels.cpu_attention.WIDENING). The fp32 op on widened
inputs keeps the probabilities in fp32, so it is also a little more accurate.
"""
from __future__ import annotations

import torch

from loom.kernels.matmul import bf16_via_fp32

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


class AttentionKernel:
    """softmax(QK^T * scale) V and its backward on one device with PyTorch's ops.

    forward(q, k, v, causal, scale) -> (out, lse fp32); backward(dout, q, k, v, out, lse,
    causal, scale) -> (dq, dk, dv); q [B, Hq, Lq, D], k, v [B, Hkv, Lk, D]. Subclasses (loom's
    CPU kernel) override them and fall back here for what they do not take."""

    name = "torch"

    def widens(self, q: torch.Tensor) -> bool:
        """Whether bf16 q, k, v run as fp32 (widened; results rounded back to bf16): where the
        CPU has no bf16 arithmetic (loom.kernels.matmul)."""
        return q.dtype == torch.bfloat16 and bf16_via_fp32(q.device)

    def takes_strided_grad(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether backward takes a dout that is not contiguous (saves a copy)."""
        return False

    def forward(self, q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        if q.device.type == "cuda":
            return _cuda_forward(q, k, v, causal, scale)
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)

    def backward(self, dout, q, k, v, out, lse, causal: bool, scale: float):
        if q.device.type == "cuda":
            return _cuda_backward(dout, q, k, v, out, lse, causal, scale)
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )


TORCH_ATTENTION = AttentionKernel()


def _cuda_forward(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_rep = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
    if q.dtype in (torch.float16, torch.bfloat16):
        out, lse, *_ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return out, lse
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    return out, lse[..., : q.shape[2]]  # the efficient kernel pads L to a multiple of 32


def _cuda_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    n_rep = q.shape[1] // k.shape[1]
    ke, ve = _expand_kv(k, n_rep), _expand_kv(v, n_rep)
    if q.dtype in (torch.float16, torch.bfloat16):
        philox = torch.empty(0, device=q.device, dtype=torch.int64)  # no dropout: unused
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            # A tile's lse is a strided slice; the CUDA kernels index it as contiguous. No
            # cumulative sequence lengths (None, as the dense forward returns them): torch 2.11
            # reads a defined one, even empty, as variable-length input and wants it int32.
            dout, q, ke, ve, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal,
            philox, philox, scale=scale,
        )
    else:
        philox = torch.empty(0, device=q.device, dtype=torch.int64)
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, ke, ve, None, out, lse.contiguous(), philox, philox, 0.0,
            [True, True, True, False], causal, scale=scale,
        )
    return dq, _reduce_kv_grad(dk, n_rep), _reduce_kv_grad(dv, n_rep)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
    partial: bool = False, kernel: AttentionKernel = TORCH_ATTENTION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B, Hq, Lq, D], lse [B, Hq, Lq] fp32). out has q's dtype, except with
    partial=True (a partial result that will be merged in fp32) where a kernel that computed in
    fp32 returns its fp32 result unrounded."""
    if kernel.widens(q):
        out, lse = kernel.forward(q.float(), k.float(), v.float(), causal, scale)
        return (out if partial else out.to(torch.bfloat16)), lse
    return kernel.forward(q, k, v, causal, scale)


def attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, causal: bool, scale: float, partial: bool = False,
    kernel: AttentionKernel = TORCH_ATTENTION,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) with the shapes and dtypes of q, k, v; with partial=True (gradients
    that will be summed in fp32) a kernel that computed in fp32 returns them unrounded."""
    if kernel.widens(q):
        grads = kernel.backward(dout.float(), q.float(), k.float(), v.float(), out.float(), lse, causal, scale)
        return grads if partial else tuple(g.to(torch.bfloat16) for g in grads)
    return kernel.backward(dout, q, k, v, out, lse, causal, scale)
