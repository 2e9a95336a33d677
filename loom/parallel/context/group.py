"""The context-parallel process group as the attention variants need it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class CPGroup:
    """rank: this process's index on the cp axis; ranks: the global ranks of the axis in order."""

    group: dist.ProcessGroup
    rank: int
    size: int
    ranks: tuple[int, ...]

    @classmethod
    def from_mesh(cls, cp_mesh) -> "CPGroup":
        """cp_mesh: the 1-D `cp` DeviceMesh of this rank."""
        ranks = tuple(int(r) for r in cp_mesh.mesh.flatten().tolist())
        return cls(cp_mesh.get_group(), cp_mesh.get_local_rank(), cp_mesh.size(), ranks)

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, tag: int) -> list:
        """Post: send to the next rank on the ring, receive from the previous one. Returns the
        requests to wait on (nothing has to have arrived when this returns)."""
        nxt = self.ranks[(self.rank + 1) % self.size]
        prev = self.ranks[(self.rank - 1) % self.size]
        return dist.batch_isend_irecv([
            dist.P2POp(dist.isend, send, nxt, self.group, tag),
            dist.P2POp(dist.irecv, recv, prev, self.group, tag),
        ])


def wait(requests: list) -> None:
    for r in requests:
        r.wait()
