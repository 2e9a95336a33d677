"""FP8 linear layers through torchao.float8: a model converter (after construction, on the meta
device, before parallelization; loom.models.converters runs it after the kernels).

`train.fp8` (on top of train.dtype="bfloat16"):
    none        the linears compute in train.dtype.
    tensorwise  torchao's Float8Linear, one dynamic scale per tensor, e4m3 operands.
    rowwise     one dynamic scale per row (axiswise), e4m3, scales rounded to powers of 2.

Which linears: the blocks' projections whose in and out features are multiples of 16 (what FP8
GEMMs need; torchao's own auto filter keeps smaller or odd ones in bf16), minus the first and
last `train.fp8_bf16_blocks` blocks (NeMo's option of keeping them in bf16). The output layer is
loom's fused loss, not an nn.Linear: it stays in bf16, as NeMo and torchtitan keep it.

Scales are global, so a layout computes what one process computes:
- a weight's amax is taken over the whole parameter: under FSDP (tensorwise) the shards are
  cast to float8 before the all-gather with one scale per parameter, reduced over all of its
  shards (`refresh_weight_scales`, after every optimizer step and after loading); the float8
  bytes travel as uint8 (FSDP2 gathers a unit holding float8 and other parameters as bytes,
  which gloo moves; gloo refuses float8 itself). Under TP the weight is a DTensor and its amax
  a DTensor reduction. Rowwise weights are gathered in bf16, and every layout then casts the
  whole weight.
- an activation's or gradient's amax under tensor parallelism is a DTensor reduction too.
  Under context parallelism each rank holds part of the sequence: a tensorwise linear's input
  and output gradient are cast with the amax reduced over the cp ranks, and the tp ranks
  under cp x tp (`share_scales_over`). Rowwise scales are per token for the input GEMMs; the weight
  gradient's GEMM scales along the tokens, over this rank's share under cp.
torchao is optional (`pip install 'loom-train[fp8]'`); its absence is a one-line error before
anything starts.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

FP8_RECIPES = ("none", "tensorwise", "rowwise")
FP8_INSTALL = "pip install 'loom-train[fp8]' (torchao)"
# The dimension FP8 GEMMs need a multiple of (torchao's auto filter).
FP8_DIM_MULTIPLE = 16


def torchao_float8():
    """torchao.float8, imported without torchao's import-time log lines (its CUDA extensions
    that a CPU build cannot load, torch's note on an Enum it registers), which say nothing about
    the FP8 training loom runs."""
    import logging

    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao.float8
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return torchao.float8


def torchao_missing() -> str | None:
    """None where torchao.float8 imports, else why not (one line)."""
    try:
        torchao_float8()
    except Exception as e:  # noqa: BLE001 - an ImportError, or torchao failing on this torch
        words = str(e).strip()
        return f"{type(e).__name__}: {words.splitlines()[0] if words else ''}"
    return None


def fp8_linear_names(model: nn.Module, skip_blocks: int = 0) -> list[str]:
    """The names of the nn.Linear modules that become Float8Linear: inside the blocks (not the
    first and last `skip_blocks` of them), with both dimensions multiples of 16."""
    n_layers = len(model.layers)
    kept = {str(i) for i in range(n_layers) if skip_blocks <= i < n_layers - skip_blocks}
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if (isinstance(module, nn.Linear) and len(parts) > 2 and parts[0] == "layers" and parts[1] in kept
                and module.in_features % FP8_DIM_MULTIPLE == 0 and module.out_features % FP8_DIM_MULTIPLE == 0):
            names.append(name)
    return names


def apply_fp8(model: nn.Module, recipe: str, emulate: bool, float8_gather: bool, skip_blocks: int = 0) -> list[str]:
    """Swap the model's eligible linears for torchao's Float8Linear in place (parameters and
    their names unchanged); returns the names of the swapped modules.

    emulate: torchao's emulation (operands rounded to float8 and scaled, the product in high
    precision) instead of torch._scaled_mm, which on CPU runs a reference loop (measured: 271 s
    for one step of the tiny default in one process). float8_gather: the weights will be
    FSDP-sharded and gathered as float8 (tensorwise only)."""
    if recipe == "none":
        return []
    float8 = torchao_float8()
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    config = dataclasses.replace(config, emulate=emulate,
                                 enable_fsdp_float8_all_gather=float8_gather and recipe == "tensorwise")
    names = set(fp8_linear_names(model, skip_blocks))
    float8.convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn in names)
    for name, module in model.named_modules():
        if name in names:
            module.register_forward_pre_hook(_input_in_autocast_dtype)
    return sorted(names)


def _input_in_autocast_dtype(module: nn.Module, args: tuple) -> tuple:
    """torchao's Float8Linear casts its input to the autocast dtype of CUDA only: on other
    devices under autocast the input (an fp32 norm output) would stay fp32 and so would the
    linear's output. Cast it as F.linear would under the input device's autocast."""
    x = args[0]
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return (x.to(torch.get_autocast_dtype(device)), *args[1:])
    return args


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
    import torch.distributed as dist
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
