"""Mixture of experts, as Mixtral has it: a router picks top_k of n_experts SwiGLU experts per
token and the chosen experts' outputs are summed, weighted by the softmax over the chosen k
router logits. Plain single-device PyTorch, like the rest of loom.models.

    router      gate [E, D], no bias; logits in fp32
    experts     w1, w3 [E, F, D], w2 [E, D, F]: every expert's matrices in one tensor, so that
                the experts run as grouped GEMMs (one call per projection over all experts'
                tokens, sorted by expert), and so that expert parallelism shards dim 0
    capacity    capacity_factor None (default): dropless. Else each expert keeps at most
                ceil(capacity_factor x tokens x top_k / E) of its assignments, those with the
                highest router probability (Megatron's drop policy "probs"); the others add 0
    aux loss    Switch-style load balancing (Megatron's normalization: 1 for uniform routing)
                aux = E / (k N^2) sum_e count_e sum_n p[n, e], and the router z-loss
                mean_n logsumexp(logits_n)^2; scaled by their coefficients, they reach the
                gradients through the layer's output (Megatron's auxiliary-loss scaler), so a
                pipeline stage's layers add theirs without the loss travelling between stages

Shapes: N tokens (B x L flattened), D model dim, F expert hidden dim, E experts, k top_k,
T = N x k token-expert assignments.

Two seams let loom.parallel.expert lay this layer out without this file knowing how: the
experts module (swapped for one that sends each token to the rank holding its expert), and
`routing`, the group of ranks whose tokens the statistics cover (by default this rank's
micro-batch; under context or sequence parallelism the ranks holding parts of the same
sequences, so the aux losses and the capacity are those of one process).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.loss import compute_dtype_of


def count_per_expert(expert: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert [E] (int64): bincount with a static output shape (fake tensors and
    compilers can trace it)."""
    return torch.zeros(n_experts, dtype=torch.int64, device=expert.device).index_add_(
        0, expert, torch.ones_like(expert))


class _AddAuxLossGradient(torch.autograd.Function):
    """Identity on y; in backward also d(scale x aux)/d(aux) = scale, so that the auxiliary loss
    joins the gradients wherever y is used (Megatron's MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, y, aux, scale: float):
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return y

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, grouped: bool = True) -> torch.Tensor:
    """x [T, in] sorted by expert, w [E, out, in], counts [E] -> [T, out]: rows of expert e times
    w[e]^T. One grouped GEMM (torch._grouped_mm, on CPU and CUDA); grouped=False loops over the
    experts (the reference, and where the grouped op is missing)."""
    if grouped and hasattr(torch, "_grouped_mm") and x.shape[0] > 0:
        offsets = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    outs, start = [], 0
    for e, c in enumerate(counts.tolist()):
        outs.append(x[start:start + c] @ w[e].t())
        start += c
    return torch.cat(outs) if outs else x.new_zeros((0, w.shape[1]))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (the CPU grouped GEMM's backward
    refuses expanded or strided gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class GroupedExperts(nn.Module):
    """n_experts SwiGLU experts: expert e maps its rows x to w2[e](silu(w1[e] x) * w3[e] x)."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.grouped = True  # False: the loop over experts (reference and benchmark)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [T, D] sorted by expert, counts [E] -> [T, D]."""
        return self.compute(x, counts, *self.weights())

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w3, w2) as the GEMMs use them."""
        return self.w1, self.w3, self.w2

    def compute(self, x: torch.Tensor, counts: torch.Tensor, w1, w3, w2) -> torch.Tensor:
        """x [T, D] sorted by expert, counts [e], weights of those e experts -> [T, D]."""
        dtype = compute_dtype_of(x)
        x = _ContiguousGrad.apply(x.to(dtype))
        w1, w3, w2 = (w.to(dtype) for w in (w1, w3, w2))
        h = F.silu(grouped_matmul(x, w1, counts, self.grouped)) * grouped_matmul(x, w3, counts, self.grouped)
        return grouped_matmul(_ContiguousGrad.apply(h), w2, counts, self.grouped)


class Router(nn.Module):
    def __init__(self, dim: int, n_experts: int):
        super().__init__()
        self.gate = nn.Linear(dim, n_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> logits [N, E] in fp32."""
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight().float())

    def weight(self) -> torch.Tensor:
        """The gate [E, D] as the router uses it."""
        return self.gate.weight


class RoutingGroup:
    """The ranks whose tokens one routing decision covers: here this rank alone. The parallel
    code swaps in a group of the ranks holding parts of the same sequences (context and
    sequence parallelism) whose methods combine over them."""

    size = 1  # ranks sharing the micro-batch's sequences
    # What this rank's share of the aux losses is multiplied by, so that the layout's reduction
    # of gradients over these ranks (a mean over context-parallel ranks) gives their sum.
    loss_scale = 1.0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the ranks (no gradient)."""
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """t [n, ...] of every rank, concatenated in rank order [size x n, ...] (no gradient)."""
        return t

    def own(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a gathered tensor."""
        return t


class MoE(nn.Module):
    """Drop-in for a block's FeedForward: x [B, L, D] -> [B, L, D].

    After each forward, `last_counts` holds the tokens routed to each expert [E] (kept ones,
    detached) and `last_aux` the (unscaled) load-balancing and z losses, for the metrics."""

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int, capacity_factor: float | None = None,
                 aux_loss_coeff: float = 0.01, z_loss_coeff: float = 0.0):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.capacity_factor = capacity_factor
        self.aux_loss_coeff, self.z_loss_coeff = aux_loss_coeff, z_loss_coeff
        self.router = Router(dim, n_experts)
        self.experts = GroupedExperts(n_experts, dim, hidden)
        self.routing = RoutingGroup()
        # What one unit of the auxiliary losses weighs in the gradients: the share of the step's
        # loss one micro-batch has (set by the trainer: 1 / micro-batches, or 1 under pipeline
        # schedules, which scale every gradient themselves).
        self.aux_grad_scale = 1.0
        self.last_counts: torch.Tensor | None = None
        self.last_aux: tuple[float, float] | None = None

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits [N, E] fp32 -> (expert [T], token [T], weight [T] fp32) of the kept
        assignments, T <= N x k: top-k experts per token, weights the softmax over the k; and
        the assignments per expert before any are dropped [E] (what the aux loss counts)."""
        n = logits.shape[0]
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)  # [N, k]
        weights = top_logits.softmax(dim=-1)
        expert, weight = top_experts.reshape(-1), weights.reshape(-1)
        token = torch.arange(n, device=logits.device).repeat_interleave(self.top_k)
        chosen = count_per_expert(expert, self.n_experts)
        if self.capacity_factor is not None:
            prob = logits.softmax(dim=-1)[token, expert].detach()
            g = self.routing  # the ranking covers the whole micro-batch, over sequence shards too
            keep = g.own(self._within_capacity(g.gather(expert), g.gather(prob), n * g.size))
            expert, token, weight = expert[keep], token[keep], weight[keep]
        return expert, token, weight, chosen

    def _within_capacity(self, expert: torch.Tensor, prob: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Which assignments each expert keeps: its `capacity` most probable ones (ties: the
        earlier assignment, in rank order under sequence sharding)."""
        capacity = math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)
        # Rank every assignment within its expert by probability (ties: earlier token first).
        order = torch.argsort(-prob, stable=True)
        order = order[torch.argsort(expert[order], stable=True)]  # by expert, then probability
        counts = count_per_expert(expert, self.n_experts)
        starts = counts.cumsum(0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device) - starts[expert[order]]
        return rank < capacity

    def aux_losses(self, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """coeff x load balancing + coeff x z-loss (fp32 scalar) of logits [N, E] and the
        assignments per expert [E] (before dropping, as Megatron counts them).

        Under sequence sharding each rank returns its share: the sums over its own tokens, with
        the counts and token total of the whole micro-batch, so that the shares add up to one
        process's losses (times routing.loss_scale, which the layout's mean undoes)."""
        g = self.routing
        n = logits.shape[0] * g.size
        probs = logits.softmax(dim=-1)
        balance = (g.sum(counts).float() * probs.sum(0)).sum() * self.n_experts / (self.top_k * n * n)
        z = torch.logsumexp(logits, dim=-1).square().sum() / n
        self.last_aux = (balance.detach(), z.detach())
        return g.loss_scale * (self.aux_loss_coeff * balance + self.z_loss_coeff * z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        flat = x.reshape(-1, d)
        logits = self.router(flat)  # [N, E] fp32
        expert, token, weight, chosen = self.route(logits)
        order = torch.argsort(expert, stable=True)  # assignments grouped by expert
        expert, token, weight = expert[order], token[order], weight[order]
        counts = count_per_expert(expert, self.n_experts)
        out = self.experts(flat[token], counts)  # [T, D]
        y = torch.zeros(flat.shape, dtype=torch.promote_types(out.dtype, torch.float32), device=x.device)
        y.index_add_(0, token, out * weight[:, None])
        self.last_counts = counts.detach()
        if self.training and (self.aux_loss_coeff > 0 or self.z_loss_coeff > 0):
            y = _AddAuxLossGradient.apply(y, self.aux_losses(logits, chosen), self.aux_grad_scale)
        return y.to(x.dtype).view(b, l, d)

    def add_statistics(self, totals: torch.Tensor) -> None:
        """Add this layer's last forward into totals [E + 2] (float64): the tokens routed to each
        expert, its load-balancing loss (this rank's share under sequence sharding), and the
        share of one layer that is (1 / ranks sharing its sequences); see routing_statistics."""
        e = self.n_experts
        if self.last_counts is not None:
            totals[:e] += self.last_counts.double()
        if self.last_aux is not None:
            totals[e] += self.last_aux[0].double()
            totals[e + 1] += 1 / self.routing.size

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
                f"aux_loss_coeff={self.aux_loss_coeff}, z_loss_coeff={self.z_loss_coeff}")


def routing_statistics(layers: list[MoE], n_experts: int, device: torch.device, sum_over_ranks) -> dict:
    """The metrics of the last micro-batch's routing over MoE `layers` (this rank's) and, through
    sum_over_ranks(tensor) (an in-place sum over every rank, the identity in one process), every
    rank's: the share of token-expert assignments each expert got (min, max, mean over experts;
    mean = 1/E) and the load-balancing loss averaged over layers (unscaled)."""
    totals = torch.zeros(n_experts + 2, dtype=torch.float64, device=device)
    for layer in layers:
        layer.add_statistics(totals)
    sum_over_ranks(totals)
    share = totals[:n_experts] / totals[:n_experts].sum().clamp(min=1)
    return {"moe_expert_share": {"min": share.min().item(), "max": share.max().item(), "mean": share.mean().item()},
            "moe_aux_loss": (totals[n_experts] / totals[n_experts + 1].clamp(min=1)).item()}
