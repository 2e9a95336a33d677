"""Data parallelism with FSDP2 (`fully_shard`): parameters, gradients and AdamW states sharded.

Parameters are sharded over the flattened (dp_shard, cp) axis, so context-parallel ranks also
share the optimizer state and average gradients; with dp_replicate > 1 the mesh is 2-D and FSDP
replicates across it (HSDP). Gradients are averaged over all of these ranks, which is what the
loss (a mean over every rank's tokens, all ranks holding equal token counts) asks for.

Units, each gathered and freed on its own: the embedding, every block, and the final norm with
the output layer; the root holds no parameter of its own. Under expert parallelism each block's
experts are a unit of their own, on their own mesh (see _shard_experts). Two sharding modes (parallel.zero):
- 3 (ZeRO-3, the default): parameters are freed after each unit's forward and gathered again
  for its backward (except lookup tables, whose backward reads no weight); gradients are
  reduce-scattered after every micro-batch, so no unsharded gradient outlives a unit's backward.
- 1 (Megatron's distributed optimizer): parameters stay gathered, and gradients unsharded
  (accumulated in fp32), through all micro-batches of a step; one reduce-scatter of the
  gradients after the last one. More memory, one gather and one reduce-scatter per step.
Under pipeline parallelism a stage runs many micro-batches between a forward and its backward:
parameters stay gathered from a stage's first forward to its last backward in both modes (no
re-gather per micro-batch). Gradients follow the mode: zero=1 accumulates them unsharded
(torch.distributed.pipelining's own behaviour), zero=3 reduce-scatters them after every
micro-batch (loom's ReducingStage) except under zero-bubble, whose split backward keeps torch's.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from loom.parallel.dims import LayoutMesh, ParallelDims
from loom.parallel.expert import expert_modules
from loom.parallel.zero import keeps_units_gathered


def holds_tied_ends(model: nn.Module) -> bool:
    """Whether this model (or stage) holds both an embedding and the output layer tied to it:
    one parameter in two places, which stays with the root unit (FSDP gathers a parameter in
    one unit only)."""
    return model.cfg.tie_embeddings and model.first_stage and model.last_stage


def fsdp_units(model: nn.Module) -> list[nn.Module | list[nn.Module]]:
    """The modules FSDP gathers as one, in forward order: the embeddings, blocks, [final norm,
    masked-LM head, output] (whichever this pipeline stage holds); both ends stay with the root
    where they share a tied weight (holds_tied_ends)."""
    from loom.parallel.pipeline import FIRST_STAGE_PARTS, LAST_STAGE_PARTS

    first = [m for m in (getattr(model, n) for n in FIRST_STAGE_PARTS) if m is not None]
    last = [m for m in (getattr(model, n) for n in LAST_STAGE_PARTS) if m is not None]
    tied_here = holds_tied_ends(model)
    units: list = [first] if first and not tied_here else []
    units += list(model.layers.values())
    if last and not tied_here:
        units.append(last)
    return units


def apply_fsdp(model: nn.Module, dims: ParallelDims, mesh: LayoutMesh, param_dtype: torch.dtype,
               zero: int) -> nn.Module:
    """Shard `model` (a whole model or a pipeline stage, on meta or materialized) in place,
    unit by unit, then the root; returns it.

    param_dtype bf16 gathers parameters in bf16 and reduces gradients in fp32, over fp32 master
    shards; fp32 leaves everything in fp32.
    """
    fsdp_mesh = mesh["hsdp"] if dims.dp_replicate > 1 else mesh["dp_shard_cp"]
    # Inputs are not cast: the residual stream stays fp32 between units, as autocast keeps it
    # in one process (matmuls run in bf16 either way, under autocast).
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    units = fsdp_units(model)
    reshard = not keeps_units_gathered(zero, dims.pp)
    if dims.ep > 1:
        _shard_experts(model, dims, mesh, policy, reshard)
    for i, unit in enumerate(units):
        # The last unit's parameters are the first needed in backward: never freed in between.
        fully_shard(unit, mesh=fsdp_mesh, mp_policy=_policy_of(unit, model, policy),
                    reshard_after_forward=reshard and i < len(units) - 1)
        if reshard and _embeddings_only(unit):
            # An embedding's backward reads no weight: its table is not gathered again for it.
            unit[0].set_unshard_in_backward(False)
    # A root that holds a tied embedding (see fsdp_units) gathers it in fp32, like the embedding unit.
    root_policy = _policy_of([model.tok_embeddings], model, policy) if holds_tied_ends(model) else policy
    fully_shard(model, mesh=fsdp_mesh, mp_policy=root_policy, reshard_after_forward=reshard)
    return model


def _embeddings_only(unit) -> bool:
    """Whether an FSDP unit holds lookup tables only (no embedding norm, whose backward reads
    its weight)."""
    return isinstance(unit, list) and all(isinstance(m, nn.Embedding) for m in unit)


def _shard_experts(model: nn.Module, dims: ParallelDims, mesh: LayoutMesh, policy: MixedPrecisionPolicy,
                   reshard: bool) -> None:
    """Expert-parallel experts (each rank's E/ep experts) are units of their own, sharded over the
    rest of dp_shard x cp (expert_fsdp). Their gradient sums the tokens of the whole ep group, so
    FSDP divides it by dp x cp, the ranks every other gradient is averaged over."""
    expert_mesh = mesh["expert_hsdp"] if dims.dp_replicate > 1 else mesh["expert_fsdp"]
    last_block = list(model.layers.values())[-1] if len(model.layers) else None
    for experts in expert_modules(model):
        in_last = last_block is not None and any(m is experts for m in last_block.modules())
        fully_shard(experts, mesh=expert_mesh, mp_policy=policy, reshard_after_forward=reshard and not in_last)
        experts.set_gradient_divide_factor(float(dims.dp * dims.cp))
        # gloo has no pre-multiplied sum: sum, then divide. (Not over one rank, where torch 2.13
        # divides in its copy and again after: twice.)
        if expert_mesh.device_type == "cpu" and dims.expert_fsdp > 1:
            experts.set_force_sum_reduction_for_comms(True)


def _policy_of(unit, model: nn.Module, policy: MixedPrecisionPolicy) -> MixedPrecisionPolicy:
    """The embedding is gathered in fp32: autocast leaves an embedding lookup in fp32, so the
    residual stream starts in fp32 as in one process (a bf16 embedding would put every residual
    addition of the model in bf16)."""
    if isinstance(unit, list) and model.tok_embeddings in unit:
        return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    return policy


def set_micro_batch(model: nn.Module, zero: int, last: bool) -> None:
    """Before each micro-batch's backward outside pipeline schedules: under zero=1 keep
    parameters gathered and gradients unsharded until the step's last micro-batch."""
    if zero == 1:
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)


def reshard_units(modules: list[nn.Module]) -> None:
    """Free every gathered FSDP unit of `modules`. A forward without backward leaves the units
    that stay gathered after forward (the last one; all of them under zero=1 or PP) gathered in
    the compute dtype, so that parameters read afterwards (a save, an export, a test) would be
    bf16 copies, not the fp32 shards, and their memory held until the next step."""
    from torch.distributed.fsdp import FSDPModule

    for part in modules:
        for module in part.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
