"""Context parallelism: the sequence is sharded over the `cp` mesh axis and attention is the one
place where ranks need each other's tokens.

    sharding.py   which tokens each rank holds (causal load balancing), positions
    ring.py       cp_comm="p2p": KV blocks circulate on a ring, overlapped with compute
    allgather.py  cp_comm="allgather": gather KV once per layer
    ulysses.py    cp_comm="a2a": all-to-all from sequence shards to head shards and back

`apply_context_parallel` swaps each block's `CoreAttention` for `ContextParallelAttention`; the
rest of the model runs unchanged on its [B, S / cp] shard (RoPE gets global positions from the
trainer). Gradients of the parameters are averaged over cp by FSDP, which shards over
(dp_shard, cp).
"""
from __future__ import annotations

import torch
from torch import nn

from loom.kernels.attention import TORCH_ATTENTION, AttentionKernel
from loom.parallel.context.allgather import allgather_attention
from loom.parallel.context.group import CPGroup
from loom.parallel.context.ring import ring_attention
from loom.parallel.context.sharding import all_spans, shard_batch, shard_index, shard_sequence
from loom.parallel.context.ulysses import ulysses_attention

COMMS = {"p2p": ring_attention, "allgather": allgather_attention, "a2a": ulysses_attention}

__all__ = ["ContextParallelAttention", "apply_context_parallel", "shard_batch", "shard_index", "shard_sequence"]


class ContextParallelAttention(nn.Module):
    """Drop-in for `CoreAttention`: q [B, Hq, L, D], k, v [B, Hkv, L, D] (this rank's L = S / cp
    tokens), doc_starts of the whole sequence or None -> out [B, Hq, L, D], attending over the
    whole sequence."""

    def __init__(self, cp: CPGroup, comm: str, load_balance: bool, causal: bool = True,
                 kernel: AttentionKernel = TORCH_ATTENTION):
        super().__init__()
        if comm not in COMMS:
            raise ValueError(f"parallel.cp_comm={comm!r}; allowed: {', '.join(COMMS)}")
        self.cp, self.comm, self.load_balance = cp, comm, load_balance
        self.causal, self.kernel = causal, kernel
        self._attend = COMMS[comm]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                doc_starts: list[list[int]] | None = None) -> torch.Tensor:
        seq_len = q.shape[2] * self.cp.size
        spans = all_spans(self.cp.size, seq_len, self.load_balance)
        return self._attend(q, k, v, self.cp, spans, doc_starts, self.causal, self.kernel)

    def extra_repr(self) -> str:
        return (f"cp={self.cp.size}, comm={self.comm}, load_balance={self.load_balance}, causal={self.causal}, "
                f"kernel={self.kernel.name}")


def apply_context_parallel(model: nn.Module, cp_mesh, comm: str, load_balance: bool) -> None:
    """Swap the attention core of every block of `model` (a whole model or a pipeline stage),
    keeping its masking (causal or not) and its kernel."""
    cp = CPGroup.from_mesh(cp_mesh)
    for block in model.layers.values():
        core = block.attention.core_attention
        block.attention.core_attention = ContextParallelAttention(cp, comm, load_balance, core.causal, core.kernel)
