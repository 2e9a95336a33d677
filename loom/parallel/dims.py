"""The parallel layout: degrees, their validation, and the one DeviceMesh they describe.

Mesh axes, outer to inner: pp, dp_replicate, dp_shard, cp, tp (tp innermost so that on GPUs it
stays inside a node). Every axis exists, degree 1 included, so code can always name it.
Flattened axes:
    dp          = (dp_replicate, dp_shard)   ranks that read different data
    dp_shard_cp = (dp_shard, cp)             FSDP shards parameters over these
    dp_cp       = (dp_replicate, dp_shard, cp)  ranks whose gradients and losses are averaged
    hsdp        = 2-D (dp_replicate, dp_shard_cp)  FSDP's mesh: replicate outer, shard inner
    cp_tp       = (cp, tp)                   ranks that share the same sequences (MoE routing
                                             statistics under CP and sequence parallelism)
Expert parallelism borrows its ranks from dp_shard_cp (Megatron-Core's "parallel folding"), so
it adds no world size: dp_shard_cp is cut into (expert_fsdp, ep), ep innermost, and
    ep          = experts are split over these ranks; tokens travel between them
    expert_fsdp = the expert shards' FSDP mesh (dp_shard_cp / ep ranks), expert_hsdp with
                  dp_replicate as its outer dimension
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from loom.settings import SettingError

MESH_AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


class LayoutError(SettingError):
    """A layout that cannot run; the message is one line naming the setting and what is allowed."""


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    ep: int = 1  # not a mesh axis of its own: borrowed from dp_shard x cp

    @classmethod
    def resolve(cls, pp: int, dp_replicate: int, dp_shard: int, cp: int, tp: int,
                world_size: int | None, ep: int = 1) -> "ParallelDims":
        """Fill dp_shard=-1 with what the world size leaves (1 when the world size is unknown)
        and check that the degrees multiply to the world size."""
        others = pp * dp_replicate * cp * tp
        fill = dp_shard == -1 and world_size is None  # dp_shard unknown: ep is checked at launch
        if dp_shard == -1:
            if world_size is None:
                dp_shard = 1
            elif world_size % others:
                raise LayoutError(
                    f"world size {world_size} is not divisible by parallel.pp x dp_replicate x cp x tp "
                    f"= {pp} x {dp_replicate} x {cp} x {tp} = {others}"
                )
            else:
                dp_shard = world_size // others
        dims = cls(pp=pp, dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp, ep=ep)
        if world_size is not None and dims.world_size != world_size:
            raise LayoutError(
                f"the layout pp={pp} x dp_replicate={dp_replicate} x dp_shard={dp_shard} x cp={cp} x tp={tp} "
                f"needs {dims.world_size} ranks, but the world size is {world_size}"
            )
        if not fill and (dp_shard * cp) % ep:
            raise LayoutError(
                f"parallel.ep={ep} does not divide parallel.dp_shard x cp = {dp_shard} x {cp} = {dp_shard * cp} "
                f"(experts are split over ranks borrowed from dp_shard x cp); allowed: a divisor of {dp_shard * cp}"
            )
        return dims

    @classmethod
    def from_section(cls, parallel, world_size: int | None) -> "ParallelDims":
        """`resolve` with the degrees of a config's [parallel] section."""
        p = parallel
        return cls.resolve(p.pp, p.dp_replicate, p.dp_shard, p.cp, p.tp, world_size, p.ep)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Ranks that read different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def expert_fsdp(self) -> int:
        """Ranks over which FSDP shards each expert shard (the rest of dp_shard x cp)."""
        return self.dp_shard * self.cp // self.ep

    def degrees(self) -> dict[str, int]:
        """The mesh axes' degrees, and ep."""
        return {**{axis: getattr(self, axis) for axis in MESH_AXES}, "ep": self.ep}

    def build_mesh(self, device_type: str) -> "LayoutMesh":
        """One DeviceMesh with every axis named, plus the flattened axes of the module docstring."""
        from torch.distributed.device_mesh import init_device_mesh

        root = init_device_mesh(
            device_type, tuple(getattr(self, a) for a in MESH_AXES), mesh_dim_names=MESH_AXES
        )
        # No public flatten in torch 2.13: DeviceMesh._flatten is wrapped here and nowhere else,
        # and its results are kept (torch deprecates slicing flattened axes from the root).
        flat = {
            "dp": root["dp_replicate", "dp_shard"]._flatten("dp"),
            "dp_shard_cp": root["dp_shard", "cp"]._flatten("dp_shard_cp"),
            "dp_cp": root["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp"),
        }
        # FSDP's 2-D mesh (replicate, shard) for HSDP, carved from dp_cp in the same rank order.
        flat["hsdp"] = flat["dp_cp"]._unflatten(
            0, (self.dp_replicate, self.dp_shard * self.cp), ("dp_replicate", "dp_shard_cp")
        )
        if self.cp > 1 and self.tp > 1:
            flat["cp_tp"] = root["cp", "tp"]._flatten("cp_tp")
        if self.ep > 1:
            experts = flat["dp_cp"]._unflatten(
                0, (self.dp_replicate, self.expert_fsdp, self.ep), ("dp_replicate", "expert_fsdp", "ep"))
            flat["ep"], flat["expert_fsdp"] = experts["ep"], experts["expert_fsdp"]
            flat["expert_hsdp"] = experts["dp_replicate", "expert_fsdp"]
        return LayoutMesh(root, flat)


class LayoutMesh:
    """The root DeviceMesh and its flattened axes, all reachable by name: mesh["tp"], mesh["dp"]."""

    def __init__(self, root, flattened: dict):
        self.root = root
        self._flat = flattened

    def __getitem__(self, name: str | tuple[str, ...]):
        if isinstance(name, str) and name in self._flat:
            return self._flat[name]
        return self.root[name]

    def groups(self) -> list:
        """Every process group of the mesh and its flattened axes, once each."""
        return list({id(g): g for mesh in (self.root, *self._flat.values()) for g in mesh.get_all_groups()}.values())

    def set_timeout(self, timeout: timedelta) -> None:
        """Every process group of the layout waits at most `timeout` in a collective: the groups
        a mesh makes take torch's default (30 min on gloo), not the world group's. Wraps torch's
        private per-group setter here and nowhere else."""
        from torch.distributed.distributed_c10d import _set_pg_timeout

        for group in self.groups():
            _set_pg_timeout(timeout, group)
