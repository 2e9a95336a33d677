"""FP8 scales that span ranks: what makes an FP8 layout compute what one process computes
(loom.models.fp8 converts the linears; this applies their layout).

- FSDP gathers tensorwise FP8 weights as float8 with a scale from the whole parameter's amax
  (`refresh_weight_scales`, a collective, after every change of the weights).
- Context parallelism splits the sequence: a tensorwise linear's input and its output's gradient
  are cast with the amax reduced over the cp ranks, and over the tp ranks under cp x tp
  (`share_scales_over`), as one process casts the whole tensor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from loom.models.fp8 import torchao_float8


def refresh_weight_scales(modules: list[nn.Module]) -> None:
    """The float8 scale of every FSDP-gathered float8 weight, from the amax of the whole
    parameter (one all-reduce for all of them): after the weights change and before the next
    forward gathers them. A collective: every rank of the modules' meshes calls it."""
    for module in modules:
        torchao_float8().precompute_float8_dynamic_scale_for_fsdp(module)


def share_scales_over(model: nn.Module, groups: list) -> int:
    """Context parallelism: the tensorwise FP8 scales of the linears' inputs and of their
    outputs' gradients from the amax over the whole tensor, as one process computes them: this
    rank's share reduced over `groups` (the cp axis's process group, and the tp axis's under
    tensor parallelism, where a row-parallel linear's input and a column-parallel one's output
    gradient are hidden-dimension shards). Installed on the model's tensorwise, bias-free
    Float8Linear modules, before tensor parallelism's hooks (so they see what arrives: a plain
    shard or a DTensor). Returns the number of linears it applies to."""
    float8 = torchao_float8()
    from torchao.float8.config import ScalingGranularity

    linears = [m for m in model.modules() if isinstance(m, float8.float8_linear.Float8Linear) and m.bias is None
               and m.config.cast_config_input.scaling_granularity is ScalingGranularity.TENSORWISE]
    for linear in linears:
        linear.register_forward_pre_hook(_CastInputOver(groups))
        linear.register_forward_hook(_CastGradientOver(groups))
    return len(linears)


def _cast_over(x: torch.Tensor, groups: list, module: nn.Module, dtype: torch.dtype, role):
    """x (a plain tensor or a DTensor) as float8 with the scale of its amax reduced over
    `groups`: what torchao computes from the whole tensor (the same max, the same conversion)."""
    from torch.distributed.tensor import DTensor, Replicate
    from torchao.float8.float8_training_tensor import hp_tensor_and_scale_to_float8
    from torchao.float8.float8_utils import amax_to_scale

    local = x.to_local() if isinstance(x, DTensor) else x
    amax = torch.max(torch.abs(local)).float()  # exact for bf16 values; max is order-free
    for group in groups:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    scale = amax_to_scale(amax, dtype, module.config.round_scales_to_power_of_2)
    if isinstance(x, DTensor):  # torchao wants the scale on the tensor's mesh, the same everywhere
        scale = DTensor.from_local(scale, x.device_mesh, [Replicate()] * x.device_mesh.ndim, run_check=False)
    return hp_tensor_and_scale_to_float8(x, scale, dtype, module.linear_mm_config, role)


class _CastInputOver:
    """Forward pre-hook: the input cast to float8 with the whole input's scale (torchao's
    Float8Linear uses an input already cast, and keeps it for the weight gradient's GEMM)."""

    def __init__(self, groups: list):
        self.groups = groups

    def __call__(self, module: nn.Module, args: tuple):
        from torchao.float8.distributed_utils import tensor_already_casted_to_fp8
        from torchao.float8.float8_training_tensor import GemmInputRole

        x = args[0]
        if tensor_already_casted_to_fp8(x):
            return None
        return (_cast_over(x, self.groups, module, module.config.cast_config_input.target_dtype,
                           GemmInputRole.INPUT), *args[1:])


class _CastGradientOver:
    """Forward hook: the output passes through _GradientToFloat8, whose backward casts the
    output's gradient with the whole gradient's scale before torchao's backward GEMMs."""

    def __init__(self, groups: list):
        self.groups = groups

    def __call__(self, module: nn.Module, args: tuple, output):
        return _GradientToFloat8.apply(output, module, self.groups)


class _GradientToFloat8(torch.autograd.Function):
    """Identity forward; backward: the gradient [.., out] cast to float8 (e5m2) with its amax
    reduced over the groups."""

    @staticmethod
    def forward(ctx, output, module, groups):
        ctx.module, ctx.groups = module, groups
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        from torchao.float8.float8_training_tensor import GemmInputRole

        dtype = ctx.module.config.cast_config_grad_output.target_dtype
        return _cast_over(grad, ctx.groups, ctx.module, dtype, GemmInputRole.GRAD_OUTPUT), None, None
