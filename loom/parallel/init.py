"""Initialize the local shards of a parallelized model without any rank holding a whole parameter.

After `parallelize` has laid the meta model out and `to_empty` has allocated this rank's shards,
`init_local_shards` writes into each shard its region of the parameter, drawn block by block
from (seed, parameter name, block) by `loom.models.init`: the values are those of one process
whatever the layout, and a rank never allocates more than its shards plus one block.

A DTensor's shard is a rectangle of the global parameter (FSDP shards dim 0, tensor
parallelism dim 0 or 1, FSDP over tensor parallelism a dim-0 slice of a tensor-parallel slice),
whose shape and offset DTensor computes for us.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from loom.models.init import InitSpec, fill_region


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_shard_bytes(modules) -> int:
    """Bytes of this rank's parameter shards over `modules` (their storage: what is allocated)."""
    return sum(local_shard(p).untyped_storage().nbytes() for m in modules for p in m.parameters())


def local_region(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(local tensor, global shape, offset of the local tensor in the global one)."""
    if not hasattr(param, "device_mesh"):  # a plain tensor holds all of itself
        return param, tuple(param.shape), (0,) * param.ndim
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = param.to_local()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if tuple(shape) != tuple(local.shape):
        raise RuntimeError(f"shard of shape {tuple(local.shape)} is not the {tuple(shape)} its placements "
                           f"{param.placements} imply")
    return local, tuple(param.shape), tuple(offset)


@torch.no_grad()
def init_local_shards(module: nn.Module, spec_of: Callable[[str], InitSpec], seed: int) -> None:
    """Fill every parameter of `module` (plain tensors or DTensor shards, under the names of
    the whole model) with its layout-independent initial values. spec_of(name) -> InitSpec."""
    for name, param in module.named_parameters():
        local, shape, offset = local_region(param)
        fill_region(local, name, shape, offset, spec_of(name), seed)
