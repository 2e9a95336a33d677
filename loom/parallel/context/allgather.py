"""All-gather attention (`cp_comm="allgather"`, as in Llama 3's training): gather every rank's
K and V once, then attend the local queries to the keys the causal mask allows.

One collective per layer instead of cp - 1 ring steps; the gathered KV ([B, Hkv, S, D], small
under grouped-query attention) is not kept for backward: the backward gathers it again and
reduce-scatters the KV gradients to their owners.

Shapes: q [B, Hq, L, D], k and v [B, Hkv, L, D] with L = S / cp.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from loom.kernels.attention import TORCH_ATTENTION, AttentionKernel
from loom.models.attention import (
    Span,
    new_accumulators,
    plan_tiles,
    tiled_attention_accumulate,
    tiled_attention_backward_accumulate,
)
from loom.parallel.context.group import CPGroup


def _gather_kv(k: torch.Tensor, v: torch.Tensor, cp: CPGroup) -> torch.Tensor:
    """-> [2, B, Hkv, S, D] with the sequence in rank order (rank 0's tokens, rank 1's, ...)."""
    kv = torch.stack((k, v))
    # Collectives want the ranks stacked along the first dimension: [cp * 2, B, H, L, D].
    gathered = torch.empty((cp.size * 2, *kv.shape[1:]), dtype=kv.dtype, device=kv.device)
    dist.all_gather_into_tensor(gathered, kv, group=cp.group)
    return gathered.view(cp.size, *kv.shape).permute(1, 2, 3, 0, 4, 5).flatten(3, 4)  # [2, B, H, cp, L, D] -> [.., S, D]


class _AllGatherAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp: CPGroup, spans: list[list[Span]], doc_starts, scale: float, causal: bool, kernel):
        kv = _gather_kv(k, v, cp)
        # The gathered sequence is in rank order: its spans are every rank's spans in turn.
        tiles = plan_tiles(spans[cp.rank], [s for rank in spans for s in rank], doc_starts, causal)
        out, lse = new_accumulators(q)
        tiled_attention_accumulate(out, lse, q, kv[0], kv[1], tiles, scale, kernel)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cp, ctx.tiles, ctx.scale, ctx.kernel = cp, tiles, scale, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        cp = ctx.cp
        kv = _gather_kv(k, v, cp)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        tiled_attention_backward_accumulate(dq, dkv[0], dkv[1], dout.contiguous(), q, kv[0], kv[1],
                                            out, lse, ctx.tiles, ctx.scale, ctx.kernel)
        # [2, B, H, S, D] -> [cp, 2, B, H, L, D]: block j goes to rank j, summed over ranks.
        b, h, s, d = dkv.shape[1:]
        blocks = dkv.view(2, b, h, cp.size, s // cp.size, d).permute(3, 0, 1, 2, 4, 5).contiguous()
        mine = torch.empty(blocks.shape[1:], dtype=blocks.dtype, device=blocks.device)
        dist.reduce_scatter_tensor(mine, blocks.flatten(0, 1), group=cp.group)
        return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype), None, None, None, None, None, None


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: CPGroup,
                        spans: list[list[Span]], doc_starts: list[list[int]] | None, causal: bool = True,
                        kernel: AttentionKernel = TORCH_ATTENTION) -> torch.Tensor:
    """Attention (causal or bidirectional) of this rank's queries to the whole sequence's keys
    -> [B, Hq, L, D]."""
    return _AllGatherAttentionFn.apply(q, k, v, cp, spans, doc_starts, q.shape[-1] ** -0.5, causal, kernel)
