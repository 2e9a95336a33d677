"""Matrix products of loom: where a bf16 product runs on a CPU without bf16 arithmetic.

A bf16 matmul with fp32 accumulation (what autocast and FSDP's bf16 parameters ask for) is
defined by its operands rounded to bf16, their products summed in fp32, and the sum rounded to
bf16. x86 CPUs without AVX512-BF16 or AMX have no instruction for that, and PyTorch's bf16 path
there (oneDNN) runs 3-4x slower than its fp32 path: 45-50 vs ~190 GFLOP/s on this project's
2-core AVX-512 machine. The product of two bf16 numbers is exact in fp32 (8 + 8 significant bits
< 24), so widening the bf16 operands to fp32 and running the fp32 kernel computes the same bf16
result, up to the order of the fp32 additions, at the fp32 rate. On such CPUs loom does that;
everywhere else (GPUs, CPUs with bf16 instructions) the native kernels run.

`Linear` is `nn.Linear` with that choice in its forward (same parameters, same names, and still
an `nn.Linear` for tensor-parallel plans); `matmul` is the same choice for a plain product.
Shapes: x [..., in], weight [out, in] -> [..., out].
"""
from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn


def _detect_cpu_lacks_bf16_arithmetic() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# A fact about the machine, read once: a constant that torch.compile traces as one.
_CPU_LACKS_BF16_ARITHMETIC = _detect_cpu_lacks_bf16_arithmetic()


def cpu_lacks_bf16_arithmetic() -> bool:
    """True on x86 CPUs with neither AVX512-BF16 nor AMX, where loom widens bf16 products to
    fp32 (other CPU families keep PyTorch's own bf16 kernels)."""
    return _CPU_LACKS_BF16_ARITHMETIC


def bf16_via_fp32(device: torch.device) -> bool:
    """Whether bf16 products on `device` run as fp32 products of bf16-rounded operands."""
    return device.type == "cpu" and cpu_lacks_bf16_arithmetic()


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(x.dtype, weight.dtype)


def _round_bf16_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for bf16 a, b as the fp32 product of their values, rounded to bf16."""
    return torch.matmul(a.float(), b.float()).to(torch.bfloat16)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in the operands' dtype (no autocast), bf16 widened to fp32 where `bf16_via_fp32`."""
    if a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16 and bf16_via_fp32(a.device):
        return _round_bf16_product(a, b)
    return a @ b


class _Bf16LinearViaFp32(torch.autograd.Function):
    """y = round_bf16(x_bf16 @ w_bf16^T) with both gradients computed the same way, as autocast's
    bf16 linear does them: dx = round_bf16(g @ w_bf16), dw = round_bf16(g^T @ x_bf16). Saves the
    bf16 copies of x and w, as autocast does."""

    @staticmethod
    def forward(ctx, x, weight):
        with torch.autocast(x.device.type, enabled=False):
            x16, w16 = x.to(torch.bfloat16), weight.to(torch.bfloat16)
            out = F.linear(x16.float(), w16.float()).to(torch.bfloat16)
        ctx.save_for_backward(x16, w16)
        ctx.dtypes = (x.dtype, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x16, w16 = ctx.saved_tensors
        grad_x = grad_w = None
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.to(torch.bfloat16).float()
            if ctx.needs_input_grad[0]:
                grad_x = torch.matmul(g, w16.float()).to(torch.bfloat16).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                g2, x2 = g.flatten(0, -2), x16.flatten(0, -2).float()
                grad_w = torch.matmul(g2.t(), x2).to(torch.bfloat16).to(ctx.dtypes[1])
        return grad_x, grad_w


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), bf16 widened to fp32 where `bf16_via_fp32` (the bias is then
    added to the bf16 product, as autocast's bf16 linear rounds it)."""
    if _compute_dtype(x, weight) == torch.bfloat16 and bf16_via_fp32(x.device):
        out = _Bf16LinearViaFp32.apply(x, weight)
        return out if bias is None else out + bias.to(out.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (without bias unless asked) whose product goes through `linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
