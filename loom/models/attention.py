"""Attention as loom's models see it: tiles of what each query may see, and the module that
attends over them.

Everything that computes softmax(QK^T)V goes through the kernel interface of
loom.kernels.attention (`attention_forward` / `attention_backward`), which returns and consumes
the log-sum-exp of each query row, so that context parallelism can merge partial results over KV
blocks exactly, and packed-document masking can plug in at the same place.

Layout everywhere: q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] with Hq % Hkv == 0 (grouped-query
attention); out [B, Hq, Lq, D]; lse [B, Hq, Lq] in fp32.

Masks are never materialized. What a query may see is described by tiles: rectangles of the
attention matrix that are either fully visible or causal on identical positions (where the
kernel's own causal mask is the right one). Causal attention over one sequence is one tile; a
context-parallel ring step, a packed batch of documents, or both, are a few tiles each
(`plan_tiles`). Bidirectional attention (BERT) is all-visible tiles. Partial results over
tiles merge exactly through their log-sum-exp in fp32.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from torch import nn

from loom.kernels.attention import TORCH_ATTENTION, AttentionKernel, attention_backward, attention_forward


# -- tiles: what each query row may see, as kernel calls --------------------------------------

Span = tuple[int, int]  # [start, end) of global sequence positions


@dataclass(frozen=True)
class Tile:
    """Rows q[batch, :, q0:q1] attend to keys k[batch, :, k0:k1] (local offsets).

    causal: the rows and the keys are the same global positions, so the kernel's causal mask is
    exactly the global one; otherwise every key is visible. batch None means every sample.
    """

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool
    batch: int | None = None


def document_starts(documents: torch.Tensor) -> list[list[int]]:
    """documents [B, S] (a document id per token, equal ids contiguous) -> per sample, the
    sorted start positions of its documents (the first is 0)."""
    change = (documents[:, 1:] != documents[:, :-1]).nonzero().tolist()
    starts: list[list[int]] = [[0] for _ in range(documents.shape[0])]
    for b, i in change:
        starts[b].append(i + 1)
    return starts


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """documents [B, S] -> positions [B, S] int64 counted from 0 at each document's start (RoPE
    positions of packed documents)."""
    b, s = documents.shape
    index = torch.arange(s, device=documents.device).expand(b, s)
    is_start = torch.ones_like(documents, dtype=torch.bool)
    is_start[:, 1:] = documents[:, 1:] != documents[:, :-1]
    start_of = torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_of


def _pieces(spans: list[Span], cuts: list[int]) -> list[tuple[int, Span]]:
    """Split spans (in local order) at every cut inside them: [(local offset, global span)]."""
    out, offset = [], 0
    for start, end in spans:
        points = [start] + [c for c in cuts if start < c < end] + [end]
        for a, b in zip(points, points[1:]):
            out.append((offset + a - start, (a, b)))
        offset += end - start
    return out


def _local_starts(starts: list[int], spans: list[Span]) -> list[int]:
    """Document starts (global positions) -> where documents start in the local sequence made of
    `spans` (ordered); a document that runs on across the gap between two spans stays one."""
    out, offset, prev_doc = [], 0, None
    for s, e in spans:
        first_doc = bisect.bisect_right(starts, s) - 1
        if first_doc != prev_doc:
            out.append(offset)
        out.extend(offset + d - s for d in starts[first_doc + 1:] if d < e)
        prev_doc = bisect.bisect_right(starts, e - 1) - 1
        offset += e - s
    return out


def _merge_full_tiles(tiles: list[Tile]) -> list[Tile]:
    """Join fully visible tiles that touch along the rows (same keys) or along the keys (same
    rows): fewer, larger kernel calls."""
    causal = [t for t in tiles if t.causal]
    full = [t for t in tiles if not t.causal]
    while True:
        n = len(full)
        for along_rows in (True, False):
            key = (lambda t: (str(t.batch), t.k0, t.k1, t.q0)) if along_rows else (lambda t: (str(t.batch), t.q0, t.q1, t.k0))
            joined: list[Tile] = []
            for t in sorted(full, key=key):
                last = joined[-1] if joined else None
                if last is not None and last.batch == t.batch:
                    if along_rows and (last.k0, last.k1) == (t.k0, t.k1) and last.q1 == t.q0:
                        joined[-1] = Tile(last.q0, t.q1, t.k0, t.k1, False, t.batch)
                        continue
                    if not along_rows and (last.q0, last.q1) == (t.q0, t.q1) and last.k1 == t.k0:
                        joined[-1] = Tile(t.q0, t.q1, last.k0, t.k1, False, t.batch)
                        continue
                joined.append(t)
            full = joined
        if len(full) == n:
            return causal + full


def plan_tiles(q_spans: list[Span], kv_spans: list[Span],
               doc_starts: list[list[int]] | None = None, causal: bool = True) -> list[Tile]:
    """The tiles of causal attention from queries at q_spans to keys at kv_spans.

    q_spans, kv_spans: the global positions held locally, in local order (one span for a whole
    sequence; two per rank under load-balanced context parallelism; the spans of a KV block
    received from another rank). doc_starts (see `document_starts`): with packed documents a
    query sees only keys of its own document. causal=False (bidirectional): every key of the
    query's document is visible. Returns [] when nothing is visible.
    """
    ordered = all(a[1] <= b[0] for a, b in zip(q_spans, q_spans[1:]))
    if len(q_spans) > 1 and q_spans == kv_spans and ordered:
        # Local order follows global order, so causal attention over the local positions is the
        # global mask: one kernel call (per document) instead of one per pair of spans.
        length = sum(e - s for s, e in q_spans)
        local = None if doc_starts is None else [_local_starts(st, q_spans) for st in doc_starts]
        return plan_tiles([(0, length)], [(0, length)], local, causal)
    cuts = sorted({p for span in q_spans + kv_spans for p in span})
    q_pieces, kv_pieces = _pieces(q_spans, cuts), _pieces(kv_spans, cuts)
    tiles = []
    for qo, (qs, qe) in q_pieces:
        for ko, (ks, ke) in kv_pieces:
            if ke <= qs or not causal:
                tiles.append(Tile(qo, qo + qe - qs, ko, ko + ke - ks, False))
            elif (ks, ke) == (qs, qe):
                tiles.append(Tile(qo, qo + qe - qs, ko, ko + ke - ks, True))
    if doc_starts is None:
        return _merge_full_tiles(tiles)
    # Packed documents: cut every tile along the documents of each sample.
    glob_q = {qo: (qs, qe) for qo, (qs, qe) in q_pieces}
    glob_k = {ko: (ks, ke) for ko, (ks, ke) in kv_pieces}
    out = []
    for b, starts in enumerate(doc_starts):
        bounds = list(zip(starts, starts[1:] + [1 << 62]))
        per_sample = []
        for t in tiles:
            qs, _ = glob_q[t.q0]
            ks, _ = glob_k[t.k0]
            q_end, k_end = qs + t.q1 - t.q0, ks + t.k1 - t.k0
            for ds, de in bounds:
                if ds >= q_end:
                    break
                a, c = max(qs, ds), min(q_end, de)
                e, f = max(ks, ds), min(k_end, de)
                if a < c and e < f:
                    per_sample.append(Tile(t.q0 + a - qs, t.q0 + c - qs, t.k0 + e - ks, t.k0 + f - ks,
                                           t.causal, b))
        out.extend(_merge_full_tiles(per_sample))
    return out


def covers_all(tiles: list[Tile], lq: int, lk: int) -> bool:
    """One tile over the whole of q and k (causal or not): a single kernel call."""
    return len(tiles) == 1 and (tiles[0].q0, tiles[0].q1, tiles[0].k0, tiles[0].k1, tiles[0].batch) == (0, lq, 0, lk, None)


def _rows(t: Tile) -> tuple[slice, slice, slice, slice]:
    batch = slice(None) if t.batch is None else slice(t.batch, t.batch + 1)
    return batch, slice(None), slice(t.q0, t.q1), slice(t.k0, t.k1)


def merge_partial(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor,
                  part_lse: torch.Tensor) -> None:
    """Fold a partial attention result into running (out, lse), in place, in fp32.

    out, part_out [B, H, L, D]; lse, part_lse [B, H, L]. Rows where both are empty (lse -inf)
    stay empty instead of turning into NaN.
    """
    new = torch.logaddexp(lse, part_lse)
    ref = new.clamp(min=torch.finfo(torch.float32).min)
    out.mul_(torch.exp(lse - ref).unsqueeze(-1))
    out.add_(part_out.float() * torch.exp(part_lse - ref).unsqueeze(-1))
    lse.copy_(new)


def new_accumulators(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (out 0, lse -inf) for partial results of q [B, H, L, D]. out is laid out as
    [B, L, H, D] in memory, like the kernels' own output, so that the [B, L, H x D] input of the
    output projection is a view of it, not a second copy kept for backward."""
    b, h, l, d = q.shape
    out = torch.zeros((b, l, h, d), dtype=torch.float32, device=q.device).transpose(1, 2)
    lse = torch.full((b, h, l), -torch.inf, dtype=torch.float32, device=q.device)
    return out, lse


def tiled_attention_accumulate(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor,
                               k: torch.Tensor, v: torch.Tensor, tiles: list[Tile],
                               scale: float, kernel: AttentionKernel = TORCH_ATTENTION) -> None:
    """Attend q to (k, v) over `tiles` and fold each tile's result into the fp32 accumulators
    out [B, Hq, Lq, D] and lse [B, Hq, Lq] (start them at 0 and -inf)."""
    for t in tiles:
        b, h, qr, kr = _rows(t)
        o, l = attention_forward(q[b, h, qr], k[b, h, kr], v[b, h, kr], t.causal, scale, partial=True, kernel=kernel)
        merge_partial(out[b, h, qr], lse[b, h, qr], o, l)


def tiled_attention_backward_accumulate(
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, dout: torch.Tensor, q: torch.Tensor,
    k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, tiles: list[Tile],
    scale: float, kernel: AttentionKernel = TORCH_ATTENTION,
) -> None:
    """Add each tile's gradients into dq, dk, dv (fp32, shapes of q, k, v). out and lse are the
    final (fully merged) results: a tile's backward needs only them and its own inputs."""
    for t in tiles:
        b, h, qr, kr = _rows(t)
        g_q, g_k, g_v = attention_backward(
            dout[b, h, qr].contiguous(), q[b, h, qr], k[b, h, kr], v[b, h, kr],
            out[b, h, qr], lse[b, h, qr], t.causal, scale, partial=True, kernel=kernel,
        )
        dq[b, h, qr] += g_q
        dk[b, h, kr] += g_k
        dv[b, h, kr] += g_v


class _TiledAttentionFn(torch.autograd.Function):
    """Attention over tiles of one device's q, k, v (packed documents, or one plain tile)."""

    @staticmethod
    def forward(ctx, q, k, v, tiles: list[Tile], scale: float, kernel: AttentionKernel):
        if covers_all(tiles, q.shape[2], k.shape[2]):
            out, lse = attention_forward(q, k, v, tiles[0].causal, scale, kernel=kernel)
        else:
            acc, lse = new_accumulators(q)
            tiled_attention_accumulate(acc, lse, q, k, v, tiles, scale, kernel)
            out = acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tiles, ctx.scale, ctx.kernel = tiles, scale, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        kernel = ctx.kernel
        if covers_all(ctx.tiles, q.shape[2], k.shape[2]):
            if not (dout.stride(-1) == 1 and kernel.takes_strided_grad(q, k, v)):
                dout = dout.contiguous()
            dq, dk, dv = attention_backward(dout, q, k, v, out, lse, ctx.tiles[0].causal, ctx.scale, kernel=kernel)
            return dq, dk, dv, None, None, None
        dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
        tiled_attention_backward_accumulate(dq, dk, dv, dout, q, k, v, out, lse, ctx.tiles, ctx.scale, kernel)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: list[Tile],
                    kernel: AttentionKernel = TORCH_ATTENTION) -> torch.Tensor:
    """q [B, Hq, L, D], k, v [B, Hkv, L, D] -> out [B, Hq, L, D] over the given tiles."""
    if not tiles:  # nothing visible (cannot happen for a whole sequence): zeros
        return torch.zeros_like(q)
    return _TiledAttentionFn.apply(q, k, v, tiles, q.shape[-1] ** -0.5, kernel)


class CoreAttention(nn.Module):
    """softmax(QK^T * scale) V over the local sequence, causal or bidirectional; with packed
    documents a token sees only (earlier, if causal) tokens of its own document.

    A module (not a function) so that a parallelizer can swap it for a context-parallel
    implementation with the same call signature: q [B, Hq, L, D], k, v [B, Hkv, L, D],
    doc_starts (`document_starts` of the packed documents) or None -> out [B, Hq, L, D].
    doc_starts always describes the whole sequence (S = L here; S = L x cp under context
    parallelism). `kernel` does the work (PyTorch's ops unless a converter installs loom's).
    """

    def __init__(self, causal: bool = True, kernel: AttentionKernel = TORCH_ATTENTION):
        super().__init__()
        self.causal, self.kernel = causal, kernel

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                doc_starts: list[list[int]] | None = None) -> torch.Tensor:
        length = q.shape[2]
        tiles = plan_tiles([(0, length)], [(0, length)], doc_starts, self.causal)
        return tiled_attention(q, k, v, tiles, self.kernel)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, kernel={self.kernel.name}"
