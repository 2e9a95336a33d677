"""loom's CPU kernels as drop-in parts of the transformer (installed by loom.models.converters).

Each class is a subclass of the plain part it replaces, holding the same parameters under the
same names; its forward runs loom's AVX-512 kernel where the kernel takes the tensors (plain
fp32 CPU tensors, contiguous; not DTensors, not under torch.compile) and the plain part's PyTorch
ops elsewhere, so a converted model runs anywhere the plain one does.
"""
from __future__ import annotations

import torch
from torch import nn

from loom.kernels import cpu_attention, cpu_kernels
from loom.models.attention import AttentionKernel
from loom.models.loss import IGNORE_INDEX, softmax_cross_entropy_
from loom.models.matmul import cpu_lacks_bf16_arithmetic
from loom.models.transformer import OutputLayer, RMSNorm, Rotary, SwiGLU


WIDENING = """bf16 tensors (autocast's matmul outputs) go to loom's fp32 kernels widened, their
results rounded back to bf16 once, where that was measured faster than PyTorch's bf16 ops on a
CPU with bf16 arithmetic (Xeon with AMX, 2 threads, L = 1024, 8 heads, forward + backward):
RoPE 0.39 against 0.86 ms; SwiGLU likewise elementwise; attention 10-30% faster at head_dim 16
and 32, but 4-11% slower at 64 and 40% slower at 128, where ATen's bf16 op uses the matrix units:
so attention widens at head_dim <= WIDEN_MAX_HEAD_DIM only (and at any head_dim on CPUs without
bf16 arithmetic, loom.models.matmul)."""
WIDEN_MAX_HEAD_DIM = 32


def attention_widens_at(head_dim: int) -> bool:
    """Whether bf16 attention of this head_dim runs loom's fp32 kernel widened on a CPU with
    bf16 arithmetic (see WIDENING)."""
    return head_dim <= WIDEN_MAX_HEAD_DIM and head_dim in cpu_attention.HEAD_DIMS


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
        return cpu_attention.supports(q, k, v)

    def forward(self, q, k, v, causal: bool, scale: float):
        if cpu_attention.supports(q, k, v):
            return torch.ops.loom.cpu_attention_forward(q, k, v, causal, scale)
        return super().forward(q, k, v, causal, scale)

    def backward(self, dout, q, k, v, out, lse, causal: bool, scale: float):
        if cpu_attention.supports(q, k, v) and dout.stride(-1) == 1 and out.stride(-1) == 1:
            return torch.ops.loom.cpu_attention_backward(dout, q, k, v, out, lse, causal, scale)
        return super().backward(dout.contiguous(), q, k, v, out, lse, causal, scale)


LOOM_CPU_ATTENTION = LoomCpuAttention()


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
