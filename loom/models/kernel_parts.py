"""loom's CPU kernels as drop-in parts of the transformer (installed by loom.models.converters).

Each class is a subclass of the plain part it replaces, holding the same parameters under the
same names; its forward runs loom's AVX-512 kernel where the kernel takes the tensors (plain
fp32 CPU tensors, contiguous; not DTensors, not under torch.compile) and the plain part's PyTorch
ops elsewhere, so a converted model runs anywhere the plain one does. bf16 inputs run widened
where loom.kernels.cpu_attention.WIDENING says it pays.
"""
from __future__ import annotations

import torch
from torch import nn

from loom.kernels import cpu_kernels
from loom.models.loss import IGNORE_INDEX, softmax_cross_entropy_
from loom.models.transformer import OutputLayer, RMSNorm, Rotary, SwiGLU


class _RMSNormKernelFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, rstd = cpu_kernels.rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = cpu_kernels.rms_norm_backward(grad, x, weight, rstd)
        return dx, dw, None


class LoomRMSNorm(RMSNorm):
    """RMSNorm in one fused pass each way for fp32 CPU tensors."""

    kernel_name = "RMSNorm"  # in the summary's kernel line

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.rms_norm_supports(x, self.weight):
            return _RMSNormKernelFn.apply(x, self.weight, self.eps)
        return super().forward(x)


class _SwiGLUKernelFn(torch.autograd.Function):
    """silu(a) * b in one pass each way; saves a and b only."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return cpu_kernels.swiglu_forward(a, b)

    @staticmethod
    def backward(ctx, grad):
        return cpu_kernels.swiglu_backward(grad, *ctx.saved_tensors)


class LoomSwiGLU(SwiGLU):
    kernel_name = "SwiGLU"  # in the summary's kernel line

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.swiglu_supports(a, b):
            return _SwiGLUKernelFn.apply(a, b)
        if cpu_kernels.widenable(a, b) and a.shape == b.shape:  # bf16: see WIDENING
            return _SwiGLUKernelFn.apply(cpu_kernels.widened(a), cpu_kernels.widened(b)).to(a.dtype)
        return super().forward(a, b)


class _RotateKernelFn(torch.autograd.Function):
    """The rotation in one pass; its gradient is the rotation by the opposite angle."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return cpu_kernels.rope(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return cpu_kernels.rope(grad.contiguous(), cos, sin, sign=-1.0), None, None


class LoomRotary(Rotary):
    kernel_name = "RoPE"  # in the summary's kernel line

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.rope_supports(x, cos, sin):
            return _RotateKernelFn.apply(x, cos, sin)
        if cpu_kernels.widenable(x):  # bf16: see WIDENING
            wide = cpu_kernels.widened(x)
            if cpu_kernels.rope_supports(wide, cos, sin):
                return _RotateKernelFn.apply(wide, cos, sin).to(x.dtype)
        return super().rotate(x, cos, sin)


def loom_softmax_cross_entropy_(logits: torch.Tensor, labels: torch.Tensor, grad_scale: torch.Tensor,
                                want_grads: bool) -> torch.Tensor:
    """loom.models.loss.softmax_cross_entropy_ in one pass over each row (fp32 CPU logits)."""
    if cpu_kernels.softmax_cross_entropy_supports(logits):
        return cpu_kernels.softmax_cross_entropy_(logits, labels, IGNORE_INDEX, grad_scale, want_grads)
    return softmax_cross_entropy_(logits, labels, grad_scale, want_grads)


class LoomOutputLayer(OutputLayer):
    kernel_name = "loss"  # in the summary's kernel line
    softmax_cross_entropy = staticmethod(loom_softmax_cross_entropy_)


# plain part -> its kernel-backed form (the converter swaps modules of exactly these types)
SWAPS: dict[type, type] = {
    OutputLayer: LoomOutputLayer,
    RMSNorm: LoomRMSNorm,
    SwiGLU: LoomSwiGLU,
    Rotary: LoomRotary,
}


def as_kernel_module(module: nn.Module) -> nn.Module:
    """A module of the kernel-backed class holding `module`'s parameters and settings (no copy:
    on the meta device nothing is allocated)."""
    swapped = SWAPS[type(module)].__new__(SWAPS[type(module)])
    swapped.__dict__.update(module.__dict__)
    return swapped
