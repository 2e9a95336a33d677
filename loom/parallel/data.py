"""Data parallelism: FSDP2 `fully_shard` per transformer block, then the root.

Parameters are sharded over the flattened (dp_shard, cp) axis, so context-parallel ranks also
share the optimizer state and average gradients; with dp_replicate > 1 the mesh is 2-D and FSDP
replicates across it (HSDP). Gradients are averaged over all of these ranks, which is what the
loss (a mean over every rank's tokens, all ranks holding equal token counts) asks for.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from loom.parallel.dims import LayoutMesh, ParallelDims


def apply_data_parallel(model: nn.Module, dims: ParallelDims, mesh: LayoutMesh,
                        param_dtype: torch.dtype) -> nn.Module:
    """Shard `model` in place (blocks first, then the root); returns it.

    param_dtype bf16 gathers parameters in bf16 and reduces gradients in fp32, over fp32 master
    shards; fp32 leaves everything in fp32.
    """
    fsdp_mesh = mesh["hsdp"] if dims.dp_replicate > 1 else mesh["dp_shard_cp"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed first in backward: keep them gathered.
        fully_shard(block, mesh=fsdp_mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=policy)
    return model
