"""The embedding, and the output layer with its loss, vocabulary-parallel over the `tp` axis
(Megatron's vocab-parallel embedding and cross-entropy; the loss fused with the output
projection and chunked over tokens).

Embedding: rank r holds rows [r V/tp, (r+1) V/tp) of the table and looks up only the tokens in
its range (zeros elsewhere); the partial sums are reduce-scattered to the sequence shards (or
all-reduced without sequence parallelism). Its weight gradient is computed for its own rows
only. (torch's RowwiseParallel embedding computes a replicated [V, D] weight gradient on every
rank: 7.8 GiB per rank for Llama 3.1 405B's table in fp32.)

Output layer and loss:

Rank r of tp holds rows [r V/tp, (r+1) V/tp) of the output weight [V, D] and the whole
sequence of hidden states h [N, D] (gathered from the sequence shards under sequence
parallelism). For each chunk of tokens it computes its logits [c, V/tp] in fp32 and their
local max, sum of exponentials and (where it owns the label) the target logit; one all-gather
of these [3, c] statistics over tp gives every rank the global log-sum-exp and target, hence
the loss and, at once, the gradient of its logits. So no rank ever holds more than one chunk
of logits of its vocabulary shard, never the [N, V/tp] logits, let alone the [N, V] ones.

Gradients: the weight's rows are this rank's alone; the hidden states' gradient is a partial
sum over the vocabulary shards, summed over tp by DTensor in backward (an all-reduce, or a
reduce-scatter back to the sequence shards under sequence parallelism).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from loom.models.loss import (IGNORE_INDEX, check_labels, chunked_linear_loss, compute_dtype_of, loss_divisor,
                              upstream_scaled_grads)
from loom.kernels.matmul import linear
from loom.parallel.collectives import SumGradOverGroup


def _chunk_statistics(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group) -> tuple:
    """logits [c, Vl] fp32 (overwritten by exp(logits - local max)), labels [c] global ids ->
    (global max [c], global sum of exp(logit - global max) [c], target logit [c], local max [c],
    local label index [c], whether this rank owns the label [c])."""
    n_local = logits.shape[1]
    local_label = labels - vocab_start
    owned = (local_label >= 0) & (local_label < n_local)
    index = local_label.clamp(0, n_local - 1)[:, None]
    target = logits.gather(1, index).squeeze(1) * owned
    local_max = logits.amax(dim=-1)
    local_sum = logits.sub_(local_max[:, None]).exp_().sum(dim=-1)
    mine = torch.stack([local_max, local_sum, target])  # [3, c]
    size = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(gathered, mine, group=group)
    stats = torch.stack(gathered)  # [tp, 3, c]
    global_max = stats[:, 0].amax(dim=0)
    global_sum = (stats[:, 1] * (stats[:, 0] - global_max).exp()).sum(dim=0)
    return global_max, global_sum, stats[:, 2].sum(dim=0), local_max, index, owned


def _chunk_loss_(logits: torch.Tensor, labels: torch.Tensor, grad_scale: torch.Tensor, want_grads: bool,
                 vocab_start: int, group) -> torch.Tensor:
    """logits [c, V/tp] fp32 of this rank's vocabulary shard, labels [c] global ids -> the
    chunk's summed loss; with want_grads the logits become d(mean loss)/d(logits)."""
    valid = labels != IGNORE_INDEX
    gmax, gsum, target, lmax, index, owned = _chunk_statistics(logits, labels, vocab_start, group)
    if want_grads:  # logits now hold exp(logit - local max): rescale to softmax, subtract the target
        logits.mul_(((lmax - gmax).exp() / gsum * grad_scale * valid)[:, None])
        logits.scatter_add_(1, index, -(grad_scale * (owned & valid))[:, None])
    return ((gmax + gsum.log() - target) * valid).sum()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean loss over the valid tokens; gradients computed in forward, as in loom.models.loss.
    The hidden states' gradient is a partial sum over the vocabulary shards."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, vocab_start: int, group, compute_dtype, loss_tokens):
        grad_scale = 1.0 / loss_divisor(labels, loss_tokens)
        want_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype

        def loss_of_chunk(logits, start, end):
            return _chunk_loss_(logits, labels[start:end], grad_scale, want_grads, vocab_start, group)

        out = chunked_linear_loss(hidden, weight, bias, compute_dtype, want_grads, loss_of_chunk)
        ctx.grads = out[1:]
        return out[0] * grad_scale

    @staticmethod
    def backward(ctx, grad_loss):
        return (*upstream_scaled_grads(ctx, grad_loss), None, None, None, None, None)


def vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 vocab_start: int, group, bias: torch.Tensor | None = None,
                                 loss_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss (fp32 scalar, the same on every tp rank) of hidden [..., D] against labels
    [...], this rank holding rows vocab_start.. of the output weight (weight [V/tp, D], bias
    [V/tp] or None)."""
    check_labels(labels, weight.shape[0] * dist.get_world_size(group))
    dev = hidden.device.type
    compute_dtype = compute_dtype_of(hidden)
    with torch.autocast(dev, enabled=False):
        return _VocabParallelCrossEntropy.apply(hidden.flatten(0, -2), weight, bias, labels.flatten(),
                                                vocab_start, group, compute_dtype, loss_tokens)


class VocabParallelOutput(nn.Module):
    """Drop-in for `OutputLayer` under tensor parallelism: weight [V, D] a DTensor sharded by
    vocabulary rows over tp. h [B, L, D] (a sequence-sharded DTensor under sequence
    parallelism, else this rank's replicated tensor) -> with labels [B, L] the mean loss (a
    plain fp32 scalar, equal on every tp rank), else logits [B, L, V] as a DTensor sharded
    over the vocabulary."""

    def __init__(self, weight: nn.Parameter | None, bias: nn.Parameter | None, tp_mesh,
                 tied_to: nn.Module | None = None):
        super().__init__()
        if tied_to is None:
            self.weight = weight
        else:  # the embedding's weight, read at every call (see OutputLayer)
            object.__setattr__(self, "tied_to", tied_to)
        self.bias = bias
        self.tp_mesh = tp_mesh

    def projection(self) -> torch.Tensor:
        return self.tied_to.weight if "tied_to" in self.__dict__ else self.weight

    def _whole_sequence(self, h: torch.Tensor) -> torch.Tensor:
        """h as this rank's local [B, L, D] of the whole sequence, whose gradient is a partial
        sum over tp (summed by DTensor in backward)."""
        if not isinstance(h, DTensor):
            h = DTensor.from_local(h, self.tp_mesh, [Replicate()], run_check=False)
        return h.redistribute(self.tp_mesh, [Replicate()]).to_local(grad_placements=[Partial()])

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None,
                loss_tokens: torch.Tensor | None = None) -> torch.Tensor:
        h = self._whole_sequence(h)
        w = self.projection().to_local()  # [V/tp, D]
        b = self.bias.to_local() if self.bias is not None else None  # [V/tp]
        if labels is None:
            return DTensor.from_local(linear(h, w, b), self.tp_mesh, [Shard(-1)], run_check=False)
        vocab_start = self.tp_mesh.get_local_rank() * w.shape[0]
        return vocab_parallel_cross_entropy(h, w, labels, vocab_start, self.tp_mesh.get_group(), b, loss_tokens)


class VocabParallelEmbedding(nn.Module):
    """Drop-in for nn.Embedding under tensor parallelism: weight [V, D] a DTensor sharded by
    vocabulary rows over tp. tokens [B, L] (the same on every tp rank) -> this rank's local
    [B, L/tp, D] sequence shard under sequence parallelism, else [B, L, D]."""

    def __init__(self, weight: nn.Parameter, tp_mesh, sequence_parallel: bool):
        super().__init__()
        self.weight = weight
        self.tp_mesh = tp_mesh
        self.output_placement = Shard(1) if sequence_parallel else Replicate()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        w = self.weight.to_local()  # [V/tp, D]
        local = tokens - self.tp_mesh.get_local_rank() * w.shape[0]
        outside = (local < 0) | (local >= w.shape[0])
        rows = torch.nn.functional.embedding(local.masked_fill(outside, 0), w)
        partial = rows.masked_fill(outside[..., None], 0.0)  # [B, L, D], this rank's share of the sum
        summed = DTensor.from_local(partial, self.tp_mesh, [Partial()], run_check=False)
        return summed.redistribute(self.tp_mesh, [self.output_placement]).to_local()


class ReplicatedSequenceEmbedding(nn.Module):
    """Drop-in for a small nn.Embedding (learned positions, token types) under tensor parallelism:
    the table is replicated over tp; ids [B, L] (the same on every tp rank) -> this rank's local
    [B, L/tp, D] sequence shard under sequence parallelism (matching VocabParallelEmbedding's
    output), else [B, L, D]. Under sequence parallelism each rank's weight gradient covers its own
    tokens and is summed over tp; without, every rank computes the whole (equal) gradient."""

    def __init__(self, weight: nn.Parameter, tp_mesh, sequence_parallel: bool):
        super().__init__()
        self.weight = weight
        self.tp_mesh = tp_mesh
        self.sequence_parallel = sequence_parallel

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight.to_local()
        if self.sequence_parallel:  # this rank's tokens only: the gradient is summed over tp
            n, r = self.tp_mesh.size(), self.tp_mesh.get_local_rank()
            shard = ids.shape[1] // n
            ids = ids[:, r * shard:(r + 1) * shard]
            w = SumGradOverGroup.apply(w, self.tp_mesh.get_group())
        return torch.nn.functional.embedding(ids, w)


def _distribute(param: nn.Parameter | None, tp_mesh, placement) -> nn.Parameter | None:
    from torch.distributed.tensor import distribute_tensor

    if param is None:
        return None
    return nn.Parameter(distribute_tensor(param.data, tp_mesh, [placement]), requires_grad=param.requires_grad)


def apply_vocab_parallel_embedding(model: nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    """Swap model.tok_embeddings (on meta or materialized) for a VocabParallelEmbedding holding
    its table sharded by rows over tp, and learned position / token-type tables for replicated
    ones; the parameters keep their names."""
    model.tok_embeddings = VocabParallelEmbedding(_distribute(model.tok_embeddings.weight, tp_mesh, Shard(0)),
                                                  tp_mesh, sequence_parallel)
    for name in ("pos_embeddings", "type_embeddings"):
        table = getattr(model, name)
        if table is not None:
            setattr(model, name, ReplicatedSequenceEmbedding(_distribute(table.weight, tp_mesh, Replicate()),
                                                             tp_mesh, sequence_parallel))


def apply_vocab_parallel_output(model: nn.Module, tp_mesh) -> None:
    """Swap model.output (an OutputLayer, on meta or materialized) for a VocabParallelOutput
    holding its weight (and bias) sharded by rows over tp; the parameters keep their names.
    A weight tied to the embedding this module holds stays one parameter (the embedding's
    shard; swap the embedding first)."""
    bias = _distribute(model.output.bias, tp_mesh, Shard(0))
    if model.output.tied:
        model.output = VocabParallelOutput(None, bias, tp_mesh, tied_to=model.tok_embeddings)
    else:
        model.output = VocabParallelOutput(_distribute(model.output.weight, tp_mesh, Shard(0)), bias, tp_mesh)
