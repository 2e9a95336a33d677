"""Mixture-of-experts layers under a layout: expert parallelism (EP), and the MoE parts of
tensor, sequence and context parallelism.

Expert parallelism. The `ep` ranks are borrowed from dp_shard x cp (loom.parallel.dims): rank j
of an ep group holds experts [j E/ep, (j+1) E/ep) of every MoE layer (w1, w3, w2 DTensors
Shard(0) on the ep mesh, FSDP-sharded over the other dp_shard x cp / ep ranks). Each rank routes
its own tokens, then per layer:

    assignments [T, D] sorted by expert  --all_to_all (variable splits)-->  rows from every
    source rank [R, D], by (source, local expert)  --reorder-->  by (local expert, source)
    --grouped GEMMs with the local experts-->  [R, D]  --reorder back, all_to_all back-->  [T, D]

and combines them with its router weights as one process does. Dropless: the splits are the
routed counts, exchanged first (an all_to_all of E integers). Backward runs both all_to_alls
reversed. An expert's weight gradient sums over the tokens of every rank of its ep group; FSDP
over the remaining ranks divides by dp x cp (not by its own size), so experts are averaged over
the same ranks as every other parameter.

Tensor parallelism: experts are not tensor-parallel. Each tp rank routes the tokens it holds:
its sequence shard under sequence parallelism (the router's and experts' gradients, each
covering its own tokens, are summed over tp), or the whole replicated sequence without it
(every tp rank computes the same layer: same gradients, nothing to sum). Under EP the tokens of
tp rank t travel only between ranks of tp index t.

Context and sequence parallelism: the aux losses and capacity are statistics of the whole
micro-batch, so the ranks holding parts of the same sequences (cp, times tp under sequence
parallelism) combine their counts (ShardedRoutingGroup); each adds its share of the aux losses.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from loom.models.loss import compute_dtype_of
from loom.models.moe import GroupedExperts, MoE, Router, RoutingGroup
from loom.parallel.collectives import AllToAll, SumGradOverGroup
from loom.parallel.dims import LayoutMesh, ParallelDims


class ShardedRoutingGroup(RoutingGroup):
    """The ranks holding parts of the same sequences (a process group)."""

    def __init__(self, group, loss_scale: float):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.loss_scale = loss_scale

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, group=self.group)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.detach().contiguous(), group=self.group)
        return torch.cat(parts)

    def own(self, t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0] // self.size
        return t[self.rank * n:(self.rank + 1) * n]


class ShardedRouter(Router):
    """A router whose gate gradient, covering this rank's tokens only, is summed over a group."""

    def __init__(self, router: Router, grad_sum_group):
        nn.Module.__init__(self)
        self.gate = router.gate
        self.grad_sum_group = grad_sum_group

    def weight(self) -> torch.Tensor:
        return SumGradOverGroup.apply(self.gate.weight, self.grad_sum_group)


class ShardedExperts(GroupedExperts):
    """Drop-in for GroupedExperts (same parameter names): x [T, D] sorted by expert, counts [E]
    -> [T, D]. With ep_group, the experts this rank holds compute the rows of every rank of the
    group that chose them; with grad_sum_group, the weights' gradients are summed over it."""

    def __init__(self, experts: GroupedExperts, ep_group=None, grad_sum_group=None):
        nn.Module.__init__(self)
        self.w1, self.w3, self.w2 = experts.w1, experts.w3, experts.w2
        self.grouped = experts.grouped
        self.ep_group, self.grad_sum_group = ep_group, grad_sum_group

    def weights(self):
        ws = tuple(w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w3, self.w2))
        if self.grad_sum_group is not None:
            ws = tuple(SumGradOverGroup.apply(w, self.grad_sum_group) for w in ws)
        return ws

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        weights = self.weights()
        if self.ep_group is None:
            return self.compute(x, counts, *weights)
        # Tokens travel in the GEMMs' dtype (half the bytes under bf16).
        rows, local_counts, route = dispatch(x.to(compute_dtype_of(x)), counts, self.ep_group)
        return combine(self.compute(rows, local_counts, *weights), route)

    def extra_repr(self) -> str:
        ep = dist.get_world_size(self.ep_group) if self.ep_group is not None else 1
        return f"ep={ep}, grad_summed={self.grad_sum_group is not None}"


def dispatch(x: torch.Tensor, counts: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """x [T, D] sorted by (global) expert, counts [E] -> (rows for this rank's E/ep experts from
    every rank of the group, sorted by local expert [R, D]; their counts [E/ep]; what combine
    needs to send the results back)."""
    ep = dist.get_world_size(group)
    per_rank = counts.numel() // ep
    if is_fake(counts):  # the dry run's fake tensors hold no routing: trace the balanced one
        return _balanced_dispatch(x, per_rank, ep, group)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)  # block r: rank r's counts for my experts
    received = received.view(ep, per_rank)  # [source, local expert]
    send = counts.view(ep, per_rank).sum(1).tolist()
    recv = received.sum(1).tolist()
    rows = AllToAll.apply(x, send, recv, group)  # [R, D] by (source, local expert)
    # Regroup by (local expert, source) so that each expert's rows are contiguous.
    segment = torch.arange(ep * per_rank, device=x.device).repeat_interleave(received.flatten())
    order = torch.argsort((segment % per_rank) * ep + segment // per_rank, stable=True)
    return rows[order], received.sum(0), (order, send, recv, group)


def _balanced_dispatch(x: torch.Tensor, per_rank: int, ep: int, group):
    """dispatch's result when every expert gets the same share of every rank's rows."""
    send = [x.shape[0] // ep + (r < x.shape[0] % ep) for r in range(ep)]
    local_counts = torch.full((per_rank,), x.shape[0] // (ep * per_rank), dtype=torch.int64, device=x.device)
    rows = AllToAll.apply(x, send, send, group)
    return rows, local_counts, (torch.arange(rows.shape[0], device=x.device), send, send, group)


def combine(y: torch.Tensor, route: tuple) -> torch.Tensor:
    """y [R, D] in dispatch's order -> [T, D]: each row back on its rank, in its place."""
    order, send, recv, group = route
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return AllToAll.apply(y[inverse], recv, send, group)


def apply_expert_parallel(model: nn.Module, dims: ParallelDims, mesh: LayoutMesh, sequence_parallel: bool) -> None:
    """Lay out every MoE layer of `model` (a whole model or a pipeline stage, on meta): split the
    experts over ep, and combine routing statistics and gradients over the ranks sharing the
    sequences. Before FSDP, which then shards the experts over expert_fsdp (fsdp.py)."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    seq_tp = dims.tp > 1 and sequence_parallel
    seq_axis = "cp_tp" if dims.cp > 1 and seq_tp else "cp" if dims.cp > 1 else "tp" if seq_tp else None
    grad_group = mesh["tp"].get_group() if seq_tp else None
    ep_group = mesh["ep"].get_group() if dims.ep > 1 else None
    for moe in moes:
        if seq_axis is not None:
            # CP ranks' gradients are averaged (FSDP's mean over dp_shard x cp), tp's summed.
            moe.routing = ShardedRoutingGroup(mesh[seq_axis].get_group(), loss_scale=float(dims.cp))
        if grad_group is not None:
            moe.router = ShardedRouter(moe.router, grad_group)
        if ep_group is not None:
            for name in ("w1", "w3", "w2"):
                w = getattr(moe.experts, name)
                setattr(moe.experts, name, nn.Parameter(distribute_tensor(w.data, mesh["ep"], [Shard(0)]),
                                                        requires_grad=w.requires_grad))
        if ep_group is not None or grad_group is not None:
            moe.experts = ShardedExperts(moe.experts, ep_group, grad_group)


def expert_modules(model: nn.Module) -> list[ShardedExperts]:
    """The expert-parallel experts of `model`, which FSDP shards on their own mesh."""
    return [m for m in model.modules() if isinstance(m, ShardedExperts) and m.ep_group is not None]
