"""Checkpoints: the whole training state through torch.distributed.checkpoint (DCP).

A checkpoint is a folder `<checkpoint.dir>/step-00000010/`:
    .metadata, __<rank>_0.distcp   DCP: model and AdamW states under full-model names, so it loads
                                   under any layout (tp, pp, dp, cp, world size; one process too)
    rng/rank-00000.pt              each rank's RNG states (tensors only, read with weights_only)
    loom.json                      step, loss curves, model shape, data settings, layout, and
                                   the size and CRC-32 of every file above; written last

It is written under `.tmp-step-00000010/` and renamed into place only when every rank's files are
complete and checksummed, so a crash mid-save leaves the previous checkpoints as they were; the
oldest ones beyond `checkpoint.keep` are renamed away (`.deleting-...`) before they are removed.
Reading never unpickles arbitrary objects: tensors go through `torch.load(weights_only=True)`,
DCP's metadata through an unpickler that admits only DCP's own metadata classes, and no
non-tensor entry is ever saved (optimizer hyperparameters come from the config on resume).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import time
import warnings
import zlib
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

MANIFEST = "loom.json"
FORMAT = "loom-checkpoint-1"
_NAME = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX, _DELETING_PREFIX = ".tmp-", ".deleting-"
# A checkpoint continues the same run only with the same data stream; these settings define it.
DATA_KEYS = (("data", "path"), ("data", "pack_documents"), ("train", "seq_len"),
             ("train", "global_batch"), ("train", "seed"))


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def published(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in `directory`, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def newest(directory: str | Path) -> Path | None:
    found = published(directory)
    return found[-1][1] if found else None


# -- reading and checking ----------------------------------------------------------------------
def read_manifest(path: str | Path) -> dict:
    """The parsed loom.json of checkpoint folder `path` (CheckpointError if it is not one)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a checkpoint folder (expected a folder with {MANIFEST})")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is missing (an incomplete or foreign folder)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint file {manifest_path} is corrupted: {e}") from None
    for key in ("format", "step", "model", "files", "contents"):
        if not isinstance(manifest, dict) or key not in manifest:
            raise CheckpointError(f"checkpoint file {manifest_path} is corrupted: no {key!r} entry")
    if manifest["format"] != FORMAT:
        raise CheckpointError(f"checkpoint file {manifest_path}: format {manifest['format']!r}, "
                              f"this loom reads {FORMAT!r}")
    return manifest


def check_files(path: str | Path, manifest: dict, checksums: bool, part: tuple[int, int] = (0, 1)) -> None:
    """Every file of the manifest exists with its size (and, with checksums, its CRC-32). With
    part=(i, n) only every n-th file from the i-th is checksummed, so n ranks share the reading."""
    path = Path(path)
    for k, (name, info) in enumerate(sorted(manifest["files"].items())):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {f} is truncated or altered: {size} bytes, "
                                  f"expected {info['bytes']}")
        if checksums and k % part[1] == part[0] and file_crc32(f) != info["crc32"]:
            raise CheckpointError(f"checkpoint file {f} is corrupted: its CRC-32 does not match {MANIFEST}")
    read_metadata(path)  # small; refuses anything but DCP's own metadata classes


def read_metadata(path: Path):
    """DCP's metadata of checkpoint `path`, through the restricted unpickler."""
    meta_path = Path(path) / ".metadata"
    try:
        with open(meta_path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except OSError as e:
        raise CheckpointError(f"checkpoint file {meta_path} cannot be read: {e.strerror}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, ImportError) as e:
        raise CheckpointError(f"checkpoint file {meta_path} is corrupted or unsafe: {e}") from None


def check_compatible(path: str | Path, manifest: dict, cfg, model_cfg) -> None:
    """The checkpoint holds this model's shape and, if it holds training state, this run's data
    stream (changing the layout, the learning rate or the step count is fine)."""
    saved, want = manifest["model"], _model_fields(model_cfg)
    for key in want:
        if saved.get(key) != want[key]:
            raise CheckpointError(
                f"checkpoint {path} holds another model: model.{key}={saved.get(key)!r} there, "
                f"{want[key]!r} in this config"
            )
    if "train" in manifest["contents"]:
        data = manifest.get("data", {})
        for section, key in DATA_KEYS:
            now = getattr(getattr(cfg, section), key)
            then = data.get(f"{section}.{key}")
            if then != now:
                raise CheckpointError(
                    f"checkpoint {path} was saved with {section}.{key}={then!r}, this config has {now!r}: "
                    f"resuming would not continue the same data stream; allowed: {then!r}"
                )
        if manifest["step"] >= cfg.train.steps:
            raise CheckpointError(
                f"checkpoint {path} is at step {manifest['step']}, train.steps={cfg.train.steps}: nothing "
                f"left to train; allowed: train.steps > {manifest['step']}"
            )


def resume_path(c) -> Path | None:
    """The checkpoint a run with checkpoint section `c` starts from, or None."""
    if c.resume == "never":
        return None
    if c.resume == "auto":
        return newest(c.dir) if c.dir else None
    return Path(c.resume)


def check_resume(cfg, model_cfg) -> Path | None:
    """Everything about resuming that can be checked before any worker starts (the checksums are
    read by the workers, shared among them). Returns the checkpoint to resume from."""
    c = cfg.checkpoint
    if c.resume == "never" and c.dir and published(c.dir):
        raise CheckpointError(
            f"checkpoint.dir={c.dir!r} already holds checkpoints ({published(c.dir)[-1][1].name}) and "
            f"checkpoint.resume='never' would overwrite them; allowed: checkpoint.resume='auto', or "
            f"another checkpoint.dir"
        )
    path = resume_path(c)
    if path is None:
        return None
    manifest = read_manifest(path)
    check_files(path, manifest, checksums=False)
    check_compatible(path, manifest, cfg, model_cfg)
    return path


def file_crc32(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


class _MetadataUnpickler(pickle.Unpickler):
    """DCP writes its metadata with pickle; admit only the classes that metadata is made of."""

    _ALLOWED = {
        ("torch", "Size"), ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        allowed = (
            (module, name) in self._ALLOWED
            or (module == "torch.distributed.checkpoint.metadata" and not name.startswith("__"))
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata")
        return super().find_class(module, name)


def _safe_reader(path: Path):
    """A DCP FileSystemReader that reads the metadata with the restricted unpickler above and
    refuses non-tensor entries (DCP would torch.load them with weights_only=False)."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata(Path(self.path))
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _safe_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            raise CheckpointError(
                f"checkpoint entry {read_item.dest_index.fqn!r} is not a tensor; loom checkpoints hold "
                f"tensors only and never unpickle objects"
            )

    return TensorOnlyPlanner()


def _model_fields(model_cfg) -> dict:
    """The model's shape as JSON-able values (RoPE scaling as a dict)."""
    out = {}
    for f in dataclasses.fields(model_cfg):
        v = getattr(model_cfg, f.name)
        out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return out


# -- state dicts -------------------------------------------------------------------------------
def model_state(parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Full-model name -> parameter (a DTensor shard under FSDP/TP) over this rank's model parts
    (pipeline stages keep the names of the whole model)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    out: dict[str, torch.Tensor] = {}
    for part in parts:
        out.update(get_model_state_dict(part))
    return out


def _optim_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def optimizer_state(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict:
    """'state.<param name>.<exp_avg|exp_avg_sq|step>' -> tensor, over all parts. Hyperparameters
    (param_groups) are left out: they are not tensors and come from the config."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    out: dict[str, torch.Tensor] = {}
    for part, opt in zip(parts, optimizers):
        flat = get_optimizer_state_dict(part, opt, options=_optim_options())
        out.update({k: v for k, v in flat.items() if k.startswith("state.")})
    return out


def load_optimizer_state(parts, optimizers, state: dict) -> None:
    """Put loaded 'state.*' tensors into the optimizers, keeping their own param_groups."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    for part, opt in zip(parts, optimizers):
        flat = get_optimizer_state_dict(part, opt, options=_optim_options())
        flat.update({k: state[k] for k in flat if k in state})
        set_optimizer_state_dict(part, opt, flat, options=_optim_options())


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_model_weights(path: str | Path, model: nn.Module) -> dict:
    """Load only the weights of checkpoint `path` into a single-process model (no optimizer, no
    process group): for export and inspection. Returns the manifest."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    manifest = read_manifest(path)
    check_files(path, manifest, checksums=True)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, storage_reader=_safe_reader(path), planner=_safe_planner(), no_dist=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001
            raise CheckpointError(_one_line(e)) from None
    model.load_state_dict(state["model"])
    return manifest


def save_model_weights(tensors: dict[str, torch.Tensor], model_cfg, path: str | Path, model_name: str,
                       source: str) -> Path:
    """Write a weights-only checkpoint (what `loom convert --from-hf` produces) at `path`, through
    the same temporary-folder-then-rename as training checkpoints. `tensors` maps loom parameter
    names to full tensors (any float dtype: they load into the run's fp32 master weights)."""
    import torch.distributed.checkpoint as dcp

    final = Path(path)
    if final.exists():
        raise CheckpointError(f"checkpoint {final} already exists; nothing was overwritten")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{_TMP_PREFIX}{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": tensors}, storage_writer=dcp.FileSystemWriter(tmp), no_dist=True)
    files = {str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "crc32": file_crc32(f)}
             for f in sorted(tmp.rglob("*")) if f.is_file()}
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    manifest = {"format": FORMAT, "step": 0, "contents": ["model"], "model": _model_fields(model_cfg),
                "model_name": model_name, "source": source, "dtype": ",".join(dtypes), "files": files,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_durably(tmp / MANIFEST, json.dumps(manifest, indent=1))
    _fsync_dir(tmp)
    os.rename(tmp, final)
    return final


def checkpoint_tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Global shape of every model tensor in checkpoint `path` (from DCP's metadata)."""
    metadata = read_metadata(Path(path))
    out = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith("model.") and hasattr(md, "size"):
            out[key.removeprefix("model.")] = tuple(md.size)
    return out


def load_model_tensors(path: str | Path, names: list[str], shapes: dict[str, tuple[int, ...]],
                       dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Just the model tensors `names` of checkpoint `path`, as full tensors (DCP reads only their
    bytes, so a large model can be exported a shard at a time)."""
    import torch.distributed.checkpoint as dcp

    state = {"model": {n: torch.empty(shapes[n], dtype=dtype) for n in names}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, storage_reader=_safe_reader(Path(path)), planner=_safe_planner(), no_dist=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001
            raise CheckpointError(_one_line(e)) from None
    return state["model"]


# -- the checkpointer --------------------------------------------------------------------------
@dataclass
class TrainState:
    """What besides tensors a resumed run needs: the last finished step and the curves so far."""

    step: int = 0
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class _PendingSave:
    step: int
    tmp: Path
    final: Path
    manifest: dict
    future: Future | None
    started: float


class Checkpointer:
    """Saves and loads one rank's share of the training state.

    Every rank calls `save`, `poll`, `wait` and `load` at the same points (they hold collectives).
    `group` is a process group for checkpoint collectives (None in a single process); async saves
    run their collectives on a separate gloo group so they never interleave with training's.
    """

    def __init__(self, cfg, model_cfg, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                 device: torch.device, layout: dict, async_save: bool = False):
        self.cfg, self.model_cfg = cfg, model_cfg
        self.parts, self.optimizers = parts, optimizers
        self.device, self.layout = device, layout
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if self.distributed else 0
        self.world = torch.distributed.get_world_size() if self.distributed else 1
        self.directory = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
        self.async_save = async_save
        self.async_group = None
        if async_save and self.distributed:
            self.async_group = torch.distributed.new_group(backend="gloo")
        self.pending: _PendingSave | None = None
        self.timings: list[dict] = []  # {"step", "blocking_s", "total_s"} of every finished save
        if self.directory is not None and self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for p in self.directory.iterdir():  # leftovers of a crash mid-save or mid-delete
                if p.name.startswith((_TMP_PREFIX, _DELETING_PREFIX)):
                    shutil.rmtree(p, ignore_errors=True)
        self._barrier()

    @staticmethod
    @contextlib.contextmanager
    def _quiet():
        """DCP warns that it assumes a single process when there is no process group: we know."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield

    def _barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def _all_gather(self, obj):
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    # -- save ------------------------------------------------------------------------------
    def save(self, state: TrainState) -> None:
        """Write the checkpoint of step `state.step` (in the background when async)."""
        assert self.directory is not None
        self.wait()  # one save in flight at a time
        t0 = time.perf_counter()
        final = self.directory / checkpoint_name(state.step)
        tmp = self.directory / f"{_TMP_PREFIX}{final.name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        self._barrier()
        torch.save(rng_state(self.device), tmp / "rng" / f"rank-{self.rank:05d}.pt")
        tensors = {"model": model_state(self.parts), "optimizer": optimizer_state(self.parts, self.optimizers)}
        manifest = self._manifest(state)
        import torch.distributed.checkpoint as dcp

        writer = dcp.FileSystemWriter(tmp)
        with self._quiet():
            self._write(tensors, writer, state, tmp, final, manifest, t0)

    def _write(self, tensors, writer, state, tmp, final, manifest, t0) -> None:
        import torch.distributed.checkpoint as dcp

        if self.async_save:
            # DCP copies the tensors to (pinned) host memory before returning, then writes in a
            # thread; training goes on modifying the parameters meanwhile.
            future = dcp.async_save(tensors, storage_writer=writer, process_group=self.async_group,
                                    no_dist=not self.distributed)
            self.pending = _PendingSave(state.step, tmp, final, manifest, future, t0)
            self.timings.append({"step": state.step, "blocking_s": time.perf_counter() - t0})
            return
        dcp.save(tensors, storage_writer=writer, no_dist=not self.distributed)
        self.pending = _PendingSave(state.step, tmp, final, manifest, None, t0)
        blocking = time.perf_counter() - t0
        self._publish()
        self.timings.append({"step": state.step, "blocking_s": time.perf_counter() - t0,
                             "write_s": blocking})

    def poll(self) -> None:
        """Publish a finished background save (call between steps on every rank)."""
        if self.pending is None or self.pending.future is None:
            return
        done = torch.tensor([int(self.pending.future.done())], device=self.device)  # NCCL: on the GPU
        if self.distributed:  # every rank must agree, or the publish collectives would not match;
            # on the default group: the background writer owns the async one
            torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
        if done.item():
            self._publish()

    def wait(self) -> None:
        """Finish and publish the save in flight, if any."""
        if self.pending is not None:
            if self.pending.future is not None:
                self.pending.future.result()
            self._publish()

    def _publish(self) -> None:
        """Checksum this rank's files, gather the sums on rank 0, which writes loom.json and renames
        the folder into place, then drops the oldest checkpoints beyond checkpoint.keep."""
        p = self.pending
        self.pending = None
        if p.future is not None:
            p.future.result()  # re-raises a failed background write
        mine = sorted(p.tmp.glob(f"__{self.rank}_*.distcp")) + [p.tmp / "rng" / f"rank-{self.rank:05d}.pt"]
        sums = {str(f.relative_to(p.tmp)): {"bytes": f.stat().st_size, "crc32": file_crc32(f)} for f in mine}
        gathered = self._all_gather(sums)
        if self.rank == 0:
            files = {k: v for part in gathered for k, v in part.items()}
            meta = p.tmp / ".metadata"
            files[".metadata"] = {"bytes": meta.stat().st_size, "crc32": file_crc32(meta)}
            manifest = {**p.manifest, "files": files, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            _write_durably(p.tmp / MANIFEST, json.dumps(manifest, indent=1))
            _fsync_dir(p.tmp)
            if p.final.exists():  # the same step saved again (a resumed run): replace it whole
                p.final.rename(self.directory / f"{_DELETING_PREFIX}{p.final.name}")
            os.rename(p.tmp, p.final)
            _fsync_dir(self.directory)
            self._prune()
        self._barrier()
        if self.timings and self.timings[-1]["step"] == p.step:
            self.timings[-1]["total_s"] = time.perf_counter() - p.started

    def _prune(self) -> None:
        old = published(self.directory)[: -self.cfg.checkpoint.keep]
        for _, path in old:
            gone = self.directory / f"{_DELETING_PREFIX}{path.name}"
            path.rename(gone)  # atomic: never a half-deleted folder under a published name
        for p in self.directory.iterdir():
            if p.name.startswith(_DELETING_PREFIX):
                shutil.rmtree(p, ignore_errors=True)

    def _manifest(self, state: TrainState) -> dict:
        cfg = self.cfg
        return {
            "format": FORMAT,
            "step": state.step,
            "contents": ["model", "optimizer", "train", "rng"],
            "model": _model_fields(self.model_cfg),
            "model_name": cfg.model.name,
            "data": {f"{s}.{k}": getattr(getattr(cfg, s), k) for s, k in DATA_KEYS},
            "layout": self.layout,
            "dtype": cfg.train.dtype,
            "train_curve": list(state.train_curve),  # copies: training goes on during an async save
            "val_curve": list(state.val_curve),
        }

    # -- load ------------------------------------------------------------------------------
    def load(self, path: str | Path) -> TrainState:
        """Load checkpoint `path` into this rank's model parts (and optimizers, RNG), whatever the
        layout that saved it. Returns the training state (step 0 for a weights-only checkpoint)."""
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        manifest = read_manifest(path)
        check_compatible(path, manifest, self.cfg, self.model_cfg)
        self._checked(lambda: check_files(path, manifest, checksums=True, part=(self.rank, self.world)))
        model = model_state(self.parts)
        tensors = {"model": model}
        if "optimizer" in manifest["contents"]:
            tensors["optimizer"] = optimizer_state(self.parts, self.optimizers)
        with self._quiet():
            self._checked(lambda: dcp.load(tensors, storage_reader=_safe_reader(path), planner=_safe_planner(),
                                           no_dist=not self.distributed))
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        for part in self.parts:
            names = set(part.state_dict().keys())
            set_model_state_dict(part, {k: v for k, v in model.items() if k in names})
        if "optimizer" in tensors:
            load_optimizer_state(self.parts, self.optimizers, tensors["optimizer"])
        if "rng" in manifest["contents"]:
            own = path / "rng" / f"rank-{self.rank:05d}.pt"
            same_layout = manifest.get("layout", {}).get("world_size") == self.world
            # Under another world size ranks do not correspond: every rank takes rank 0's state.
            source = own if same_layout and own.exists() else path / "rng" / "rank-00000.pt"
            set_rng_state(torch.load(source, weights_only=True), self.device)
        if "train" not in manifest["contents"]:
            return TrainState()
        return TrainState(manifest["step"], [tuple(x) for x in manifest["train_curve"]],
                          [tuple(x) for x in manifest["val_curve"]])

    def _checked(self, fn) -> None:
        """Run fn on every rank; if it fails on any rank, raise the first rank's error on all of
        them (so no rank is left waiting in a collective)."""
        error = ""
        try:
            fn()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            error = _one_line(e)
        errors = [e for e in self._all_gather(error) if e]
        if errors:
            raise CheckpointError(errors[0])


def _one_line(error: BaseException) -> str:
    """A one-line message for a load failure: our own CheckpointError where DCP wrapped one
    (DCP gathers each rank's failure into a CheckpointException, sometimes only as text)."""
    pending, seen = [error], []
    while pending:
        e = pending.pop()
        if isinstance(e, tuple):  # DCP's (exception, traceback) pairs
            pending += [x for x in e if isinstance(x, BaseException)]
            continue
        if e is None or any(e is x for x in seen):
            continue
        if isinstance(e, CheckpointError):
            return str(e)
        seen.append(e)
        failures = getattr(e, "failures", None)  # CheckpointException: rank -> failure
        if isinstance(failures, dict):
            pending += list(failures.values())
        pending += [e.__cause__, e.__context__]
    for e in seen:
        m = re.search(r"(checkpoint (?:file|entry) .*?)(?:;|$)", str(e), re.MULTILINE)
        if m:
            return m.group(1)
    first = str(seen[-1]).strip().splitlines()
    return f"checkpoint could not be read: {type(seen[-1]).__name__}: {first[0] if first else ''}"


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
