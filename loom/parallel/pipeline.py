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

from loom.parallel.init import local_shard

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
    module.first_stage, module.last_stage = stage == 0, stage == n_stages - 1
    if module.last_stage and not module.first_stage and module.output.tied:
        module.output.untie()  # the embedding lives on the first stage: a copy (see tied_copy)
    if not module.first_stage:
        for name in FIRST_STAGE_PARTS:
            setattr(module, name, None)
    if not module.last_stage:
        for name in LAST_STAGE_PARTS:
            setattr(module, name, None)
    return module


FIRST_STAGE_PARTS = ("tok_embeddings", "pos_embeddings", "type_embeddings", "embed_norm")
LAST_STAGE_PARTS = ("norm", "head", "output")


def tied_copy(module: nn.Module) -> nn.Parameter | None:
    """The last stage's own copy of an output weight tied to the embedding, where the pipeline
    puts the two on different stages (else None). Megatron's way: the copy starts equal (same
    initialization key) and its gradient is summed with the embedding's after every backward
    (`sum_tied_grads`), so both take the same optimizer steps."""
    if module.cfg.tie_embeddings and module.last_stage and not module.first_stage:
        return module.output.weight
    return None


def sum_tied_grads(modules: list[nn.Module], n_stages: int, pp_group) -> None:
    """Make the gradient of a tied embedding / output weight the sum of both stages' gradients,
    on both (the first stage lives on pp rank 0, the last on pp rank pp - 1): the last stage
    adds the first's and sends the sum back, so both hold the same bits."""
    import torch.distributed as dist

    if not modules[0].cfg.tie_embeddings or n_stages == 1:
        return
    first = next((m for m in modules if m.first_stage), None)
    last = next((m for m in modules if m.last_stage), None)
    if first is None and last is None:
        return
    pp = dist.get_world_size(pp_group)
    param = first.tok_embeddings.weight if first is not None else last.output.weight
    grad = local_shard(param.grad)
    if first is not None:
        dist.send(grad.contiguous(), group=pp_group, group_dst=pp - 1)
        dist.recv(grad, group=pp_group, group_src=pp - 1)
    else:
        other = torch.empty_like(grad)
        dist.recv(other, group=pp_group, group_src=0)
        grad += other
        dist.send(grad, group=pp_group, group_dst=0)


def local_stage_ids(pp_rank: int, pp: int, virtual: int) -> list[int]:
    return [pp_rank + v * pp for v in range(virtual)]


def build_schedule(stage_modules: list[nn.Module], stage_ids: list[int], n_stages: int,
                   pp_group, device: torch.device, schedule: str, n_microbatches: int, loss_fn,
                   reduce_every_micro_batch: bool = False):
    """The torch.distributed.pipelining schedule over this rank's stages. With
    reduce_every_micro_batch (parallel.zero=3), FSDP stages reduce-scatter their gradients after
    each micro-batch's backward instead of accumulating them unsharded (see ReducingStage)."""
    from torch.distributed import pipelining

    stage_cls = reducing_stage_class() if reduce_every_micro_batch else pipelining.PipelineStage
    stages = [stage_cls(m, i, n_stages, device, group=pp_group) for m, i in zip(stage_modules, stage_ids)]
    cls = getattr(pipelining, SCHEDULES[schedule])
    if schedule in MULTI_STAGE:
        return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
    (stage,) = stages
    return cls(stage, n_microbatches=n_microbatches, loss_fn=loss_fn)


def reducing_stage_class():
    """A PipelineStage whose FSDP module reduce-scatters after every micro-batch's full backward.

    torch's stage turns FSDP's gradient reduction off for all but a stage's last backward, so
    each micro-batch's gradients accumulate unsharded, in fp32, for the whole stage: 4 bytes per
    parameter of the stage on every rank (Megatron's distributed-optimizer pattern, parallel.zero=1).
    Under zero=3 this stage lets FSDP reduce-scatter every micro-batch into the sharded gradients
    instead (parameters still stay gathered between a micro-batch's forward and backward). Split
    backwards (zero-bubble's input and weight halves) keep torch's behaviour."""
    from torch.distributed import pipelining
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.pipelining._backward import stage_backward

    class ReducingStage(pipelining.PipelineStage):
        def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
            if backward_type != "full" or not isinstance(self.submod, FSDPModule):
                return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
            self.submod.set_is_last_backward(False)
            self.submod.set_reshard_after_backward(False)
            self.submod.set_requires_gradient_sync(True)
            grads = stage_backward(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"])
            return grads, None

    return ReducingStage


def _stage_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The schedule's loss function: the last stage already returns its micro-batch's mean loss
    (the fused output layer gets the labels as a keyword input, like the positions)."""
    return output


class PipelineDriver:
    """Runs a step's micro-batches through this rank's stages with the configured schedule.

    The step engine hands it whole micro-batches as the model takes them; it concatenates them
    (the schedule splits them again into its micro-batches), feeds the first stage the tokens and
    every stage the keyword inputs (positions, documents, labels: the last stage's fused output
    layer turns the labels into the loss), and returns the mean loss on every pipeline rank."""

    def __init__(self, parts: list[nn.Module], stage_ids: list[int], n_stages: int, layout, device: torch.device,
                 schedule: str, n_micro: int, reduce_every_micro_batch: bool):
        self.parts, self.stage_ids, self.n_stages = parts, stage_ids, n_stages
        self.layout, self.device = layout, device
        self.schedule = build_schedule(parts, stage_ids, n_stages, layout.group("pp"), device, schedule, n_micro,
                                       _stage_loss, reduce_every_micro_batch=reduce_every_micro_batch)

    @property
    def n_micro(self) -> int:
        """Micro-batches the schedule runs per pass (validation repeats one batch that often)."""
        return self.schedule._n_microbatches

    def run(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor, dict]], train: bool) -> torch.Tensor:
        """One pass over (tokens [B, L], labels [B, L], keyword inputs) micro-batches: forward and
        backward (train) or forward only; the mean loss (a detached fp32 scalar) on every pp rank."""
        inputs = torch.cat([x for x, _, _ in micro_batches])
        labels = torch.cat([y for _, y, _ in micro_batches])
        kwargs = {key: torch.cat([kw[key] for _, _, kw in micro_batches]) for key in micro_batches[0][2]}
        kwargs["labels"] = labels
        first, last = 0 in self.stage_ids, self.n_stages - 1 in self.stage_ids
        losses: list[torch.Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        args = (inputs,) if first else ()
        if last:
            run(*args, target=labels, losses=losses, return_outputs=False, **kwargs)
            loss = torch.stack([_full(x).detach().float() for x in losses]).mean()
        else:
            run(*args, **kwargs)
            loss = torch.zeros((), device=self.device)
        return self.layout.sum_(loss, "pp")  # known on the last stage only

    def sum_tied_grads(self) -> None:
        """A tied embedding / output weight's gradient summed over its two stages (tied_copy)."""
        sum_tied_grads(self.parts, self.n_stages, self.layout.group("pp"))


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a replicated DTensor (the loss under tensor parallelism)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
