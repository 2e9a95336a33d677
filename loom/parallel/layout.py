"""The runtime view of a parallel layout: its degrees, its DeviceMesh, this rank's place in it, and
the few collectives a training run needs of it (agree on a value, mean over ranks, max of a
signal, all-finite, gather of small objects).

The trainer, the checkpointer and the dry run ask the Layout, not torch.distributed: this module
is where the process group is joined and left. In one process there is no mesh and every
collective is the identity, so single-process and multi-process runs take the same code path.

Axis names are those of loom.parallel.dims: pp, dp_replicate, dp_shard, cp, tp, and the
flattened dp (ranks that read different data), dp_cp (ranks that hold different tokens).
"""
from __future__ import annotations

import contextlib
from datetime import timedelta

import torch
import torch.distributed as dist

from loom.parallel.dims import LayoutMesh, ParallelDims


class Layout:
    """Degrees (`dims`), the mesh (None in one process), and this rank's place.

    Build one with `Layout.join` (a torchrun worker, or one process), `Layout.single`, or
    `Layout.fake` (one rank of a larger job on torch's fake process group: the dry run)."""

    def __init__(self, dims: ParallelDims, mesh: LayoutMesh | None, device: torch.device, rank: int = 0):
        self.dims, self.mesh, self.device, self.rank = dims, mesh, device, rank

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def single(cls, device: torch.device | str = "cpu", dims: ParallelDims | None = None) -> "Layout":
        """One process: every degree 1, no mesh, collectives are the identity."""
        return cls(dims or ParallelDims(1, 1, 1, 1, 1), None, torch.device(device))

    @classmethod
    def join(cls, parallel, world_size: int, device: torch.device, timeout_s: float) -> "Layout":
        """This process's place in the job: one process (world_size 1), or a torchrun worker that
        joins the default process group (NCCL on CUDA, gloo elsewhere) and builds the mesh of
        `parallel` (the config's [parallel] section). Every collective of the layout waits at
        most timeout_s (loom.train.hangs)."""
        dims = ParallelDims.from_section(parallel, world_size)
        if world_size == 1:
            return cls.single(device, dims)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        mesh = dims.build_mesh(device.type)
        mesh.set_timeout(timeout)
        return cls(dims, mesh, device, dist.get_rank())

    @classmethod
    @contextlib.contextmanager
    def fake(cls, dims: ParallelDims, rank: int):
        """This process as global rank `rank` of the `dims.world_size`-rank job, on torch's fake
        process group (collectives do nothing): the real layout without the ranks."""
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
        try:
            yield cls(dims, dims.build_mesh("cpu"), torch.device("cpu"), rank)
        finally:
            dist.destroy_process_group()

    def close(self, together: bool = True) -> None:
        """Leave the process group (a torchrun worker must, before it exits). together: all ranks
        at once (a barrier first), since rank 0 reports a run's end before this and torchrun ends
        the job's other ranks as soon as one exits with an error; not after an error this rank
        may have met alone."""
        if self.distributed and dist.is_initialized():
            if together:
                dist.barrier()
            dist.destroy_process_group()

    # -- degrees and places ----------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def cp(self) -> int:
        return self.dims.cp

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def pp_enabled(self) -> bool:
        return self.dims.pp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.dims.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.dims.tp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.dims.ep > 1

    @property
    def dp_enabled(self) -> bool:
        """More than one rank reads different data."""
        return self.dims.dp > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Parameters are sharded (and gradients averaged) over dp x cp ranks."""
        return self.dims.dp * self.dims.cp > 1

    def local_rank(self, axis: str) -> int:
        """This rank's index along a mesh axis (0 in one process)."""
        return self.mesh[axis].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_rank(self) -> int:
        return self.local_rank("dp")

    @property
    def cp_rank(self) -> int:
        return self.local_rank("cp")

    def group(self, axis: str):
        """The process group of a mesh axis (None in one process)."""
        return self.mesh[axis].get_group() if self.mesh is not None else None

    def degrees(self) -> dict[str, int]:
        """The mesh axes' degrees, ep, and the world size (the metrics' `layout`)."""
        return {**self.dims.degrees(), "world_size": self.world_size}

    # -- collectives (the identity in one process) -------------------------------------------------
    def agree(self, value):
        """Rank 0's value (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean_over(self, value: torch.Tensor | float, axis: str) -> float:
        """The mean of a per-rank scalar over the ranks of a mesh axis."""
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(value, dtype=torch.float64)
        n = self.mesh[axis].size() if self.mesh is not None else 1
        if n == 1:
            return value.item()
        value = value.detach().to(self.device, copy=True)
        dist.all_reduce(value, group=self.group(axis))  # gloo has no AVG
        return value.item() / n

    def mean_over_data_ranks(self, value: torch.Tensor | float) -> float:
        """The mean of a per-rank scalar over the ranks that hold different tokens (dp x cp)."""
        return self.mean_over(value, "dp_cp")

    def sum_(self, tensor: torch.Tensor, axis: str | None = None) -> torch.Tensor:
        """Sum `tensor` over every rank (or a mesh axis's), in place; returns it."""
        if self.distributed:
            dist.all_reduce(tensor, group=self.group(axis) if axis else None)
        return tensor

    def max(self, value: int) -> int:
        """The largest of an integer signal over every rank."""
        if not self.distributed:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj` (small, picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def new_gloo_group(self, timeout_s: float):
        """A process group of every rank on gloo (collectives that run beside training's own, in
        a background thread: an asynchronous checkpoint save); None in one process."""
        if not self.distributed:
            return None
        return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
