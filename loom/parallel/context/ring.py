"""Ring attention (`cp_comm="p2p"`): KV blocks travel around the cp ring while each rank attends
its own queries to the block it holds.

Forward, on rank r of n, step i = 0 .. n-1: rank r holds the KV block of rank (r - i) mod n.
The transfer of the next block is posted before this block's attention runs, so it travels
while the kernel computes. Step 0 is the causal diagonal (one kernel call); under load
balancing every later step is a single full tile: all local queries against the block's early
chunk (when the block's owner is before r), or the local late chunk against the whole block
(when it is after r); nothing masked is computed (see `plan_tiles`). Partial results merge
through their log-sum-exp in fp32.

Backward runs the same ring: K and V travel again, and with them an fp32 accumulator of their
gradients, which collects every rank's contribution and arrives home after n steps; dQ
accumulates locally. With grouped-query attention only the KV heads travel.

Shapes: q [B, Hq, L, D], k and v [B, Hkv, L, D] with L = S / cp local tokens.
"""
from __future__ import annotations

import torch

from loom.kernels.attention import TORCH_ATTENTION, AttentionKernel
from loom.models.attention import (
    Span,
    new_accumulators,
    plan_tiles,
    tiled_attention_accumulate,
    tiled_attention_backward_accumulate,
)
from loom.parallel.context.group import CPGroup, wait

TAG_KV, TAG_GRAD = 1, 2


class _RingAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp: CPGroup, spans: list[list[Span]], doc_starts, scale: float, causal: bool, kernel):
        r, n = cp.rank, cp.size
        out, lse = new_accumulators(q)
        kv = torch.stack((k, v))  # [2, B, Hkv, L, D]: one message per step
        # Step i holds rank (r - i)'s block; the backward visits the blocks in the same order.
        step_tiles = [plan_tiles(spans[r], spans[(r - step) % n], doc_starts, causal) for step in range(n)]
        for step in range(n):
            requests = []
            if step + 1 < n:
                incoming = torch.empty_like(kv)
                requests = cp.exchange(kv, incoming, TAG_KV)
            tiled_attention_accumulate(out, lse, q, kv[0], kv[1], step_tiles[step], scale, kernel)
            if requests:
                wait(requests)
                kv = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cp, ctx.step_tiles, ctx.scale, ctx.kernel = cp, step_tiles, scale, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        cp, scale = ctx.cp, ctx.scale
        n = cp.size
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack((k, v))
        grad_requests, grad_incoming = [], None
        for step in range(n):
            kv_requests = []
            if step + 1 < n:
                kv_incoming = torch.empty_like(kv)
                kv_requests = cp.exchange(kv, kv_incoming, TAG_KV)
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            tiled_attention_backward_accumulate(dq, dkv[0], dkv[1], dout, q, kv[0], kv[1], out, lse,
                                                ctx.step_tiles[step], scale, ctx.kernel)
            if grad_requests:  # the block's gradient so far, from the ranks before this one
                wait(grad_requests)
                dkv += grad_incoming
            grad_incoming = torch.empty_like(dkv)
            grad_requests = cp.exchange(dkv, grad_incoming, TAG_GRAD)
            if kv_requests:
                wait(kv_requests)
                kv = kv_incoming
        wait(grad_requests)  # this rank's own block, with every rank's contribution
        return (dq.to(q.dtype), grad_incoming[0].to(k.dtype), grad_incoming[1].to(v.dtype),
                None, None, None, None, None, None)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: CPGroup,
                   spans: list[list[Span]], doc_starts: list[list[int]] | None, causal: bool = True,
                   kernel: AttentionKernel = TORCH_ATTENTION) -> torch.Tensor:
    """Attention (causal, or bidirectional: every step one all-visible tile) of this rank's
    queries to the keys of the whole sequence.

    spans[j]: the global ranges cp rank j holds; doc_starts: packed documents (global starts per
    sample) or None. Returns out [B, Hq, L, D].
    """
    if cp.size == 1:
        raise ValueError("ring attention needs a cp group of at least 2 ranks")
    return _RingAttentionFn.apply(q, k, v, cp, spans, doc_starts, q.shape[-1] ** -0.5, causal, kernel)
