"""loom's element-wise CPU kernels (cpu_loss.cpp, cpu_norm.cpp, cpu_swiglu.cpp,
cpu_rope.cpp) as plain functions on torch tensors.

Each has a `..._supports` check; callers keep PyTorch ops where it says no (not CPU fp32, not
contiguous, or the kernels not available on this machine: see loom.kernels.library).
"""
from __future__ import annotations

import ctypes

import torch

from loom.kernels import library
from loom.kernels.library import ptr


def _lib() -> ctypes.CDLL:
    lib = library.load()
    if not hasattr(lib, "_elementwise_typed"):
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.loom_softmax_cross_entropy.argtypes = [p, i64, i64, i64, p, i64, p, ctypes.c_float,
                                                   ctypes.c_int, ctypes.c_int]
        lib.loom_softmax_cross_entropy.restype = None
        lib.loom_rms_norm_forward.argtypes = [p, p, p, p, i64, i64, ctypes.c_float, ctypes.c_int]
        lib.loom_rms_norm_forward.restype = None
        lib.loom_rms_norm_backward.argtypes = [p, p, p, p, p, p, i64, i64, ctypes.c_int]
        lib.loom_rms_norm_backward.restype = None
        lib.loom_swiglu_forward.argtypes = [p, p, p, i64, ctypes.c_int]
        lib.loom_swiglu_forward.restype = None
        lib.loom_swiglu_backward.argtypes = [p, p, p, p, p, i64, ctypes.c_int]
        lib.loom_swiglu_backward.restype = None
        lib.loom_rope.argtypes = [p, p, p, p, i64, i64, i64, i64, ctypes.c_int, ctypes.c_float, ctypes.c_int]
        lib.loom_rope.restype = None
        lib._elementwise_typed = True
    return lib


def softmax_cross_entropy_supports(logits: torch.Tensor) -> bool:
    return (type(logits) is torch.Tensor and logits.device.type == "cpu" and logits.dtype == torch.float32
            and logits.dim() == 2
            and logits.stride(1) == 1 and not torch.compiler.is_compiling() and library.available())


def softmax_cross_entropy_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                           grad_scale: torch.Tensor, want_grad: bool) -> torch.Tensor:
    """logits [c, V] fp32 (unit stride along V), labels [c] -> per-row losses [c] fp32 (0 where
    ignored); with want_grad the logits become grad_scale * (softmax - one_hot), 0 where ignored."""
    labels = labels.to(torch.int64).contiguous()
    losses = torch.empty(logits.shape[0], dtype=torch.float32)
    _lib().loom_softmax_cross_entropy(
        ptr(logits), logits.stride(0), logits.shape[0], logits.shape[1], ptr(labels), ignore_index,
        ptr(losses), float(grad_scale), int(want_grad), torch.get_num_threads(),
    )
    return losses


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain(tensors: tuple[torch.Tensor, ...], dtype: torch.dtype, contiguous: bool) -> bool:
    # A plain tensor or parameter: a DTensor (tensor parallelism; FSDP's sharded parameters)
    # keeps PyTorch's ops.
    return (all(type(t) in _PLAIN_TYPES and t.device.type == "cpu" and t.dtype == dtype
                and (t.is_contiguous() or not contiguous) for t in tensors)
            and not torch.compiler.is_compiling() and library.available())


def _plain_fp32(*tensors: torch.Tensor) -> bool:
    return _plain(tensors, torch.float32, contiguous=True)


def widenable(*tensors: torch.Tensor) -> bool:
    """Plain bf16 CPU tensors (any layout) that an fp32 kernel takes once widened: a bf16 value
    is exact in fp32, so the kernel computes from the same inputs, in fp32, and its result is
    rounded to bf16 once (PyTorch's bf16 elementwise ops round after each op)."""
    return _plain(tensors, torch.bfloat16, contiguous=False)


def widened(t: torch.Tensor) -> torch.Tensor:
    """A contiguous fp32 copy of t, in one pass."""
    return t.to(torch.float32, memory_format=torch.contiguous_format)


def rms_norm_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return _plain_fp32(x, weight) and x.shape[-1] == weight.shape[0]


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D], weight [D] fp32 -> (y [..., D], rstd [..., 1])."""
    d = x.shape[-1]
    rows = x.numel() // d
    y, rstd = torch.empty_like(x), torch.empty((*x.shape[:-1], 1), dtype=torch.float32)
    lib = _lib()
    lib.loom_rms_norm_forward(ptr(x), ptr(weight), ptr(y), ptr(rstd), rows, d, ctypes.c_float(eps),
                              torch.get_num_threads())
    return y, rstd


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx like x, dweight like weight)."""
    d = x.shape[-1]
    grad = grad.contiguous()
    dx, dw = torch.empty_like(x), torch.empty_like(weight)
    _lib().loom_rms_norm_backward(ptr(grad), ptr(x), ptr(weight), ptr(rstd), ptr(dx), ptr(dw),
                                  x.numel() // d, d, torch.get_num_threads())
    return dx, dw


def swiglu_supports(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _plain_fp32(a, b) and a.shape == b.shape


def swiglu_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for fp32 a, b of one shape."""
    y = torch.empty_like(a)
    _lib().loom_swiglu_forward(ptr(a), ptr(b), ptr(y), a.numel(), torch.get_num_threads())
    return y


def swiglu_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad = grad.contiguous()
    da, db = torch.empty_like(a), torch.empty_like(b)
    _lib().loom_swiglu_backward(ptr(grad), ptr(a), ptr(b), ptr(da), ptr(db), a.numel(), torch.get_num_threads())
    return da, db


def rope_supports(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """x [B, L, H, E]; cos, sin [L, E/2] or [B, L, E/2], all fp32 and contiguous."""
    return (_plain_fp32(x, cos, sin) and x.dim() == 4 and x.shape[-1] % 2 == 0
            and cos.shape == sin.shape and cos.shape[-1] == x.shape[-1] // 2
            and tuple(cos.shape[:-1]) in ((x.shape[1],), (x.shape[0], x.shape[1])))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """Rotate the halves of x's heads by the angles (sign -1: by minus the angles)."""
    b, l, h, e = x.shape
    out = torch.empty_like(x)
    _lib().loom_rope(ptr(x), ptr(cos), ptr(sin), ptr(out), b, l, h, e, int(cos.dim() == 3),
                     ctypes.c_float(sign), torch.get_num_threads())
    return out
