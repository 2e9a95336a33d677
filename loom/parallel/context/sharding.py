"""How a sequence is split over the `cp` ranks.

With causal load balancing the sequence of S tokens is cut into 2 x cp chunks and rank r keeps
chunks r and 2cp-1-r: an early chunk (little to attend to) with a late one (a lot), so every
rank does the same causal work. Without it rank r keeps the contiguous chunk r (the last rank
then does 2cp-1 times the attention work of the first).

A rank's local sequence is described by its spans: the global [start, end) ranges it holds, in
local order. Tokens, labels and positions are sharded alike; positions stay global.
"""
from __future__ import annotations

import torch

from loom.models.attention import Span


def chunk_count(cp: int, load_balance: bool) -> int:
    """How many equal chunks the sequence is cut into (the sequence length must divide by it)."""
    return 2 * cp if load_balance and cp > 1 else cp


def rank_spans(rank: int, cp: int, seq_len: int, load_balance: bool) -> list[Span]:
    """The global [start, end) ranges that cp rank `rank` holds, in local order."""
    n = chunk_count(cp, load_balance)
    if seq_len % n:
        raise ValueError(f"sequence length {seq_len} is not divisible into {n} chunks for cp={cp}")
    c = seq_len // n
    chunks = [rank, 2 * cp - 1 - rank] if n == 2 * cp else [rank]
    return [(i * c, (i + 1) * c) for i in chunks]


def all_spans(cp: int, seq_len: int, load_balance: bool) -> list[list[Span]]:
    return [rank_spans(r, cp, seq_len, load_balance) for r in range(cp)]


def shard_index(rank: int, cp: int, seq_len: int, load_balance: bool,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """[S / cp] int64: the global positions of rank `rank`'s tokens, in local order."""
    return torch.cat([torch.arange(s, e, device=device) for s, e in rank_spans(rank, cp, seq_len, load_balance)])


def shard_sequence(x: torch.Tensor, rank: int, cp: int, load_balance: bool) -> torch.Tensor:
    """x [B, S, ...] -> this rank's [B, S / cp, ...]."""
    return x.index_select(1, shard_index(rank, cp, x.shape[1], load_balance, x.device))


def unshard_sequence(parts: list[torch.Tensor], load_balance: bool) -> torch.Tensor:
    """Inverse of `shard_sequence`: every rank's [B, S / cp, ...] (in rank order) -> [B, S, ...]."""
    cp = len(parts)
    seq_len = parts[0].shape[1] * cp
    order = torch.cat([shard_index(r, cp, seq_len, load_balance) for r in range(cp)])
    out = torch.empty((parts[0].shape[0], seq_len, *parts[0].shape[2:]), dtype=parts[0].dtype)
    out[:, order] = torch.cat(parts, dim=1)
    return out


def shard_batch(inputs: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None, rank: int, cp: int,
                load_balance: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This cp rank's share of a batch of whole sequences: inputs, labels [B, S] -> [B, S / cp],
    with their global positions [B, S / cp] (positions [B, S], or None for 0..S-1): RoPE and the
    attention masks see where each local token sits in the whole sequence."""
    b, s = inputs.shape
    idx = shard_index(rank, cp, s, load_balance, inputs.device)
    if positions is None:
        positions = torch.arange(s, device=inputs.device).expand(b, s)
    return inputs[:, idx], labels[:, idx], positions[:, idx]
