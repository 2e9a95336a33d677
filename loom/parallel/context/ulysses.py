"""Ulysses all-to-all attention (`cp_comm="a2a"`, DeepSpeed-Ulysses): trade the sequence shard
for a head shard, attend over the whole sequence with 1/cp of the heads, and trade back.

    q [B, Hq, L, D] (L = S / cp, all local heads)  --all-to-all-->  [B, Hq / cp, S, D]
    attention over the whole sequence for Hq / cp heads (K and V likewise with Hkv / cp heads)
    out [B, Hq / cp, S, D]  --all-to-all-->  [B, Hq, L, D]

Needs the local query and KV head counts divisible by cp. After the exchange the sequence is in
rank order; under load balancing that is a permutation of the global order, so it is put back in
global order (one gather) and the plain single-device attention runs on it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from loom.kernels.attention import TORCH_ATTENTION, AttentionKernel
from loom.models.attention import Span, plan_tiles, tiled_attention
from loom.parallel.context.group import CPGroup


def _seq_to_heads(x: torch.Tensor, cp: CPGroup) -> torch.Tensor:
    """[B, H, L, D] (sequence shard) -> [B, H / cp, cp * L, D] (head shard, rank-order sequence)."""
    b, h, l, d = x.shape
    send = x.reshape(b, cp.size, h // cp.size, l, d).transpose(0, 1).contiguous()  # [cp, B, H/cp, L, D]
    recv = torch.empty_like(send)  # recv[j]: rank j's tokens, for my heads
    dist.all_to_all_single(recv, send, group=cp.group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // cp.size, cp.size * l, d)


def _heads_to_seq(x: torch.Tensor, cp: CPGroup) -> torch.Tensor:
    """Inverse of `_seq_to_heads`: [B, H / cp, cp * L, D] -> [B, H, L, D]."""
    b, hh, s, d = x.shape
    send = x.reshape(b, hh, cp.size, s // cp.size, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)  # recv[j]: my tokens, for rank j's heads
    dist.all_to_all_single(recv, send, group=cp.group)
    # Laid out [B, L, H, D] in memory (a view as [B, H, L, D]): the output projection's input
    # is then a view of it, not a second copy kept for backward.
    return recv.permute(1, 3, 0, 2, 4).reshape(b, s // cp.size, cp.size * hh, d).transpose(1, 2)


class _AllToAll(torch.autograd.Function):
    """`_seq_to_heads` (to_heads=True) or `_heads_to_seq`; the backward is the other one."""

    @staticmethod
    def forward(ctx, x, cp: CPGroup, to_heads: bool):
        ctx.cp, ctx.to_heads = cp, to_heads
        return _seq_to_heads(x, cp) if to_heads else _heads_to_seq(x, cp)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        return (_heads_to_seq(grad, ctx.cp) if ctx.to_heads else _seq_to_heads(grad, ctx.cp)), None, None


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: CPGroup,
                      spans: list[list[Span]], doc_starts: list[list[int]] | None, causal: bool = True,
                      kernel: AttentionKernel = TORCH_ATTENTION) -> torch.Tensor:
    """Attention (causal or bidirectional) of this rank's queries to the whole sequence's keys
    -> [B, Hq, L, D]."""
    if q.shape[1] % cp.size or k.shape[1] % cp.size:
        raise ValueError(f"a2a context parallelism needs the local query heads ({q.shape[1]}) and KV "
                         f"heads ({k.shape[1]}) divisible by cp={cp.size}")
    q, k, v = (_AllToAll.apply(t, cp, True) for t in (q, k, v))
    seq_len = q.shape[2]
    tiles = plan_tiles([(0, seq_len)], [(0, seq_len)], doc_starts, causal)
    flat = [s for rank in spans for s in rank]
    if flat == sorted(flat):  # contiguous sharding: rank order is global order
        out = tiled_attention(q, k, v, tiles, kernel)
    else:  # load-balanced: the token at index i has global position order[i]
        order = torch.cat([torch.arange(s, e, device=q.device) for s, e in flat])
        to_global = torch.argsort(order)
        q, k, v = (t.index_select(2, to_global) for t in (q, k, v))
        out = tiled_attention(q, k, v, tiles, kernel).index_select(2, order)
    return _AllToAll.apply(out, cp, False)
