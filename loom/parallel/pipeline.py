"""Pipeline parallelism: cut the layers into stages and run a torch.distributed.pipelining schedule.

Stage s of S (S = pp x virtual stages) keeps a contiguous run of layers; the first also keeps the
embedding, the last the final norm and the output layer. A stage module is the full model with the
other parts removed, so its parameter names (and checkpoints) are those of the whole model.
With virtual stages, pp rank r holds stages r, r + pp, r + 2 pp, ... (the looped layout the
interleaved and zero-bubble schedules expect).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "zero-bubble": "ScheduleInterleavedZeroBubble",
}
MULTI_STAGE = ("interleaved-1f1b", "zero-bubble")


def stage_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Balanced split; when layers do not divide evenly the earlier stages take one more, since
    the last stage also carries the output layer (the largest single matmul)."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def stage_module(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """A copy of `model` (on the meta device: the copy holds no weights) keeping only stage
    `stage`'s parts."""
    if any(not p.is_meta for p in model.parameters()):
        raise ValueError("stage_module splits a model built on the meta device (a materialized model "
                         "would be copied whole)")
    keep = {str(i) for i in stage_layers(len(model.layers), n_stages)[stage]}
    module = copy.deepcopy(model)
    for name in list(module.layers.keys()):
        if name not in keep:
            del module.layers[name]
    if stage != 0:
        module.tok_embeddings = None
    if stage != n_stages - 1:
        module.norm = None
        module.output = None
    return module


def local_stage_ids(pp_rank: int, pp: int, virtual: int) -> list[int]:
    return [pp_rank + v * pp for v in range(virtual)]


def build_schedule(stage_modules: list[nn.Module], stage_ids: list[int], n_stages: int,
                   pp_group, device: torch.device, schedule: str, n_microbatches: int, loss_fn):
    from torch.distributed import pipelining

    stages = [
        pipelining.PipelineStage(m, i, n_stages, device, group=pp_group)
        for m, i in zip(stage_modules, stage_ids)
    ]
    cls = getattr(pipelining, SCHEDULES[schedule])
    if schedule in MULTI_STAGE:
        return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
    (stage,) = stages
    return cls(stage, n_microbatches=n_microbatches, loss_fn=loss_fn)
