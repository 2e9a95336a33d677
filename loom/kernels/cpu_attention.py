"""loom's CPU flash attention (cpu_attention.cpp) as torch ops.

`torch.ops.loom.cpu_attention_forward` / `..._backward` are custom ops so that selective
activation recomputation can name the forward as an op to save, and torch.compile treats the
calls as opaque. `supports` says whether the kernel takes given tensors; elsewhere
loom.kernels.attention keeps ATen's CPU flash op.
"""
from __future__ import annotations

import ctypes

import torch

from loom.kernels import cpu_kernels, library
from loom.kernels.attention import AttentionKernel
from loom.kernels.library import ptr as _ptr, strides3 as _strides
from loom.kernels.matmul import cpu_lacks_bf16_arithmetic

HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128, 256)  # LOOM_HEAD_DIMS in the source
_INTS = [ctypes.c_int] * 5


def _lib() -> ctypes.CDLL:
    lib = library.load()
    if not hasattr(lib, "_attention_typed"):
        pointer, strides = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
        lib.loom_attention_forward.argtypes = [ctypes.c_int] + [pointer, strides] * 5 + _INTS + [
            ctypes.c_int, ctypes.c_float, ctypes.c_int]
        lib.loom_attention_backward.argtypes = [ctypes.c_int] + [pointer, strides] * 9 + _INTS + [
            ctypes.c_int, ctypes.c_float, ctypes.c_int]
        lib._attention_typed = True
    return lib


def available() -> bool:
    return library.available()


def status() -> str:
    return library.status()


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these fp32 CPU tensors ([B, H, L, D], unit stride along D)."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32
            and q.shape[-1] in HEAD_DIMS and q.dim() == 4 and available()
            and all(t.stride(-1) == 1 for t in (q, k, v)))


def _like_rows(t: torch.Tensor) -> torch.Tensor:
    """An empty fp32 [B, H, L, D] laid out [B, L, H, D] in memory (the layout ATen's op returns,
    so that [B, L, H * D] is a view of it)."""
    b, h, l, d = t.shape
    return torch.empty((b, l, h, d), dtype=torch.float32, device=t.device).transpose(1, 2)


@torch.library.custom_op("loom::cpu_attention_forward", mutates_args=())
def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, Lq, D], k, v [B, Hkv, Lk, D] fp32 -> (out [B, Hq, Lq, D], lse [B, Hq, Lq])."""
    b, hq, lq, d = q.shape
    out, lse = _like_rows(q), torch.empty((b, hq, lq), dtype=torch.float32)
    if q.numel() == 0 or k.shape[2] == 0:
        return out.zero_(), lse.fill_(-torch.inf)
    rc = _lib().loom_attention_forward(
        d, _ptr(q), _strides(q), _ptr(k), _strides(k), _ptr(v), _strides(v), _ptr(out), _strides(out),
        _ptr(lse), _strides(lse), b, hq, k.shape[1], lq, k.shape[2], int(causal), scale,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"loom's CPU attention kernel has no head_dim={d}; compiled: {HEAD_DIMS}")
    return out, lse


@forward.register_fake
def _(q, k, v, causal, scale):
    b, hq, lq, _ = q.shape
    return _like_rows(q), q.new_empty((b, hq, lq))


@torch.library.custom_op("loom::cpu_attention_backward", mutates_args=())
def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv), fp32, with the shapes of q, k, v, from the final out and lse."""
    b, hq, lq, d = q.shape
    dq, dk, dv = _like_rows(q), _like_rows(k), _like_rows(v)
    if q.numel() == 0 or k.shape[2] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    tensors = [dout, q, k, v, out, lse, dq, dk, dv]
    args = [a for t in tensors for a in (_ptr(t), _strides(t))]
    rc = _lib().loom_attention_backward(d, *args, b, hq, k.shape[1], lq, k.shape[2], int(causal), scale,
                                      torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"loom's CPU attention kernel has no head_dim={d}; compiled: {HEAD_DIMS}")
    return dq, dk, dv


@backward.register_fake
def _(dout, q, k, v, out, lse, causal, scale):
    return _like_rows(q), _like_rows(k), _like_rows(v)


# -- loom's kernel as an AttentionKernel ---------------------------------------------------------
WIDENING = """bf16 tensors (autocast's matmul outputs) go to loom's fp32 kernels widened, their
results rounded back to bf16 once, where that was measured faster than PyTorch's bf16 ops on a
CPU with bf16 arithmetic (Xeon with AMX, 2 threads, L = 1024, 8 heads, forward + backward):
RoPE 0.39 against 0.86 ms; SwiGLU likewise elementwise; attention 10-30% faster at head_dim 16
and 32, but 4-11% slower at 64 and 40% slower at 128, where ATen's bf16 op uses the matrix units:
so attention widens at head_dim <= WIDEN_MAX_HEAD_DIM only (and at any head_dim on CPUs without
bf16 arithmetic, loom.kernels.matmul)."""
WIDEN_MAX_HEAD_DIM = 32


def attention_widens_at(head_dim: int) -> bool:
    """Whether bf16 attention of this head_dim runs loom's fp32 kernel widened on a CPU with
    bf16 arithmetic (see WIDENING)."""
    return head_dim <= WIDEN_MAX_HEAD_DIM and head_dim in HEAD_DIMS


def bf16_widening(installed: list[str], head_dim: int) -> str:
    """What a bf16 run of a model with these kernels installed runs widened to fp32, for the
    summary's kernel line."""
    if cpu_lacks_bf16_arithmetic():
        return "bf16 as fp32 products and kernels of bf16-rounded inputs (this CPU has no bf16 arithmetic)"
    widened = [name for name in installed if name in ("RoPE", "SwiGLU")]
    line = "bf16 matmuls native"
    if "attention" in installed:
        if attention_widens_at(head_dim):
            widened.insert(0, "attention")
        else:
            line += f"; attention by PyTorch's bf16 op (head_dim {head_dim} > {WIDEN_MAX_HEAD_DIM})"
    if widened:
        line += f"; {', '.join(widened)} by loom's fp32 kernels on widened inputs"
    return line


class LoomCpuAttention(AttentionKernel):
    """loom's CPU flash attention (~1.3x ATen's op forward and backward at L = 1024, D = 32) for
    fp32 CPU tensors of the head dims it was compiled for; PyTorch's ops otherwise. bf16 inputs
    with head_dim <= WIDEN_MAX_HEAD_DIM run it widened (see WIDENING)."""

    name = "loom-cpu"

    def widens(self, q: torch.Tensor) -> bool:
        return super().widens(q) or (cpu_kernels.widenable(q) and attention_widens_at(q.shape[-1]))

    def takes_strided_grad(self, q, k, v) -> bool:
        return supports(q, k, v)

    def forward(self, q, k, v, causal: bool, scale: float):
        if supports(q, k, v):
            return torch.ops.loom.cpu_attention_forward(q, k, v, causal, scale)
        return super().forward(q, k, v, causal, scale)

    def backward(self, dout, q, k, v, out, lse, causal: bool, scale: float):
        if supports(q, k, v) and dout.stride(-1) == 1 and out.stride(-1) == 1:
            return torch.ops.loom.cpu_attention_backward(dout, q, k, v, out, lse, causal, scale)
        return super().backward(dout.contiguous(), q, k, v, out, lse, causal, scale)


LOOM_CPU_ATTENTION = LoomCpuAttention()
