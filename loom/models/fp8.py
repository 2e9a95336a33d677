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
  shards (loom.parallel.fp8.refresh_weight_scales, after every optimizer step and after
  loading); the float8
  bytes travel as uint8 (FSDP2 gathers a unit holding float8 and other parameters as bytes,
  which gloo moves; gloo refuses float8 itself). Under TP the weight is a DTensor and its amax
  a DTensor reduction. Rowwise weights are gathered in bf16, and every layout then casts the
  whole weight.
- an activation's or gradient's amax under tensor parallelism is a DTensor reduction too.
  Under context parallelism each rank holds part of the sequence: a tensorwise linear's input
  and output gradient are cast with the amax reduced over the cp ranks, and the tp ranks
  under cp x tp (loom.parallel.fp8.share_scales_over). Rowwise scales are per token for the input GEMMs; the weight
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
