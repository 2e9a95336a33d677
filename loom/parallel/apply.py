"""Apply a layout to a model built on the meta device, in loom's fixed order: pipeline split,
then context parallelism, tensor parallelism, the MoE layers' layout (expert parallelism),
recomputation, and FSDP on each stage; then allocate this rank's shards and initialize them.

Nothing here allocates a whole parameter: the split and the sharding happen on meta, and
`materialize` allocates and initializes only the local shards (loom.parallel.init), with the
values one process would have.
"""
from __future__ import annotations

import torch
from torch import nn

from loom.metrics.memory import LiveTensorBytes
from loom.parallel.context import apply_context_parallel
from loom.parallel.expert import apply_expert_parallel
from loom.parallel.fsdp import apply_fsdp
from loom.parallel.init import init_local_shards, local_shard_bytes
from loom.parallel.layout import Layout
from loom.parallel.pipeline import local_stage_ids, stage_module
from loom.parallel.recompute import apply_recompute
from loom.parallel.tensor import apply_tensor_parallel


def parallelize(model: nn.Module, layout: Layout, parallel, recompute: str, param_dtype: torch.dtype,
                fp8: str = "none") -> tuple[list[nn.Module], list[int]]:
    """Returns (modules, stage ids): the pipeline stages this rank holds, or ([model], [0]).

    `model` should be on the meta device; `parallel` is the config's [parallel] section; fp8:
    train.fp8 (its scales under context parallelism).
    """
    dims, mesh = layout.dims, layout.mesh
    if layout.pp_enabled:
        n_stages = dims.pp * parallel.pp_virtual_stages
        stage_ids = local_stage_ids(layout.local_rank("pp"), dims.pp, parallel.pp_virtual_stages)
        modules = [stage_module(model, i, n_stages) for i in stage_ids]
    else:
        modules, stage_ids = [model], [0]
    for module in modules:
        if layout.cp_enabled:
            apply_context_parallel(module, mesh["cp"], parallel.cp_comm, parallel.cp_load_balance)
            if fp8 == "tensorwise":  # FP8 scales over the whole sequence, not this rank's share
                from loom.parallel.fp8 import share_scales_over

                share_scales_over(module, [layout.group(axis) for axis in ("cp", "tp") if getattr(dims, axis) > 1])
        frozen = {name for name, p in module.named_parameters() if not p.requires_grad}  # LoRA's base
        if layout.tp_enabled:
            apply_tensor_parallel(module, mesh["tp"], parallel.sequence_parallel)
        apply_expert_parallel(module, dims, mesh, parallel.sequence_parallel)  # a no-op without ep, cp or tp
        _keep_frozen(module, frozen)
        apply_recompute(list(module.layers.values()), recompute)
        if layout.fsdp_enabled:
            apply_fsdp(module, dims, mesh, param_dtype, parallel.zero)
    return modules, stage_ids


def _keep_frozen(module: nn.Module, frozen: set[str]) -> None:
    """Torch's tensor-parallel styles replace parameters with trainable DTensors (SequenceParallel
    does not carry requires_grad over): freeze again what was frozen before, ahead of FSDP."""
    for name, p in module.named_parameters():
        if name in frozen:
            p.requires_grad_(False)


def materialize(modules: list[nn.Module], device: torch.device, seed: int, spec_of) -> tuple[int, int]:
    """Allocate each module's local shards on `device` and initialize them from `seed`
    (spec_of(name) -> InitSpec, the model's `init_spec`). Returns (peak bytes of tensors alive
    during this, bytes of the local shards): measured, so that tests can hold the peak to the
    shards plus one generated block."""
    with LiveTensorBytes() as mem:
        for module in modules:
            module.to_empty(device=device)
            init_local_shards(module, spec_of, seed)
    return mem.peak, local_shard_bytes(modules)
