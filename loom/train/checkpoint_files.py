"""The on-disk format of loom checkpoints: folders, the manifest, checks, and safe reading.

A checkpoint is a folder `<checkpoint.dir>/step-00000010/`:
    .metadata, __<rank>_0.distcp   torch.distributed.checkpoint (DCP): model and AdamW states under
                                   full-model names, so it loads under any layout
    rng/rank-00000.pt              each rank's RNG states (tensors only, read with weights_only)
    loom.json                      step, loss curves, model shape, data settings, layout, and
                                   the size and CRC-32 of every file above; written last

Published folders are complete: they are written under `.tmp-step-...` and renamed into place;
older ones are renamed to `.deleting-...` before they are removed. Reading never unpickles
arbitrary objects: tensors go through `torch.load(weights_only=True)`, DCP's metadata through an
unpickler that admits only DCP's own metadata classes, and a non-tensor entry is refused.
Weights-only checkpoints (contents ["model"], step 0) are what `loom convert --from-hf` writes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from loom.files import file_crc32, file_record
from loom.train.crash import error_chain

MANIFEST = "loom.json"
FORMAT = "loom-checkpoint-1"
_NAME = re.compile(r"^step-(\d{8})$")
TMP_PREFIX, DELETING_PREFIX = ".tmp-", ".deleting-"
SINGLE_PROCESS_WARNING = "torch.distributed is disabled"  # DCP's, when there is no process group
# A checkpoint continues the same run only with the same data stream; these settings define it.
DATA_KEYS = (("data", "path"), ("data", "format"), ("data", "pack_documents"), ("data", "blend"),
             ("train", "seq_len"), ("train", "global_batch"), ("train", "seed"))
# What checkpoints written before a key was added had (data.order: how samples are ordered,
# which is not a setting; before keyed permutations each epoch was a materialized one).
DATA_KEYS_ADDED = {"data.format": "tokens", "data.blend": [], "data.order": "epoch-permutation"}
DATA_ORDER = "keyed-permutation"  # loom.data.permutation


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


def check_same_model(path: str | Path, manifest: dict, model_cfg) -> None:
    saved, want = saved_model_fields(manifest), model_fields(model_cfg)
    for key in want:
        if saved.get(key) != want[key]:
            raise CheckpointError(
                f"checkpoint {path} holds another model: model.{key}={saved.get(key)!r} there, "
                f"{want[key]!r} in this config"
            )


def lora_fields(lora, model_cfg) -> dict | None:
    """What a checkpoint records of a LoRA run's adapters ([lora] section; targets spelled out),
    or None without LoRA."""
    spec = lora.spec(model_cfg)
    if spec is None:
        return None
    return {"rank": spec.rank, "alpha": spec.alpha, "targets": ",".join(spec.targets)}


def check_base(path: str, model_cfg, what: str, checksums: bool = False) -> Path:
    """A checkpoint of this model's whole weights, usable as a run's starting weights (with
    checksums: its files' CRCs read too)."""
    try:
        manifest = read_manifest(path)
        check_files(path, manifest, checksums=checksums)
    except CheckpointError as e:
        raise CheckpointError(f"{what}: {e}") from None
    if "lora" in manifest:
        raise CheckpointError(f"{what}={path!r} holds LoRA adapters only, not a model's weights; allowed: a "
                              f"checkpoint of the whole model (a training run's, or `loom convert --from-hf`'s)")
    check_same_model(path, manifest, model_cfg)
    return Path(path)


def publish_folder(tmp: Path, final: Path, manifest: dict) -> None:
    """Write `manifest` (stamped with the time) into the complete folder `tmp` durably, then
    rename it to `final`. A folder already there (the same step saved again) is first renamed
    aside to `.deleting-...`, for the next prune or run to remove: a published name never shows
    a half-written or half-deleted folder."""
    manifest = {**manifest, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_durably(tmp / MANIFEST, json.dumps(manifest, indent=1))
    fsync_dir(tmp)
    if final.exists():
        final.rename(final.with_name(f"{DELETING_PREFIX}{final.name}"))
    os.rename(tmp, final)
    fsync_dir(final.parent)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP writes its metadata with pickle; admit only the classes that metadata is made of."""

    _ALLOWED = {
        ("torch", "Size"), ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) == ("builtins", "getattr"):
            return _metadata_getattr  # how some Python versions pickle enum members
        allowed = (
            (module, name) in self._ALLOWED
            or (module == "torch.distributed.checkpoint.metadata" and not name.startswith("__"))
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata")
        return super().find_class(module, name)


def _metadata_getattr(owner, name: str):
    """getattr for the unpickler above: only public members of DCP's metadata classes."""
    module = getattr(owner, "__module__", "")
    if not (isinstance(owner, type) and module == "torch.distributed.checkpoint.metadata"
            and not name.startswith("_")):
        raise pickle.UnpicklingError(f"getattr({owner!r}, {name!r}) is not part of checkpoint metadata")
    return getattr(owner, name)


def safe_reader(path: Path):
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


def safe_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            raise CheckpointError(
                f"checkpoint entry {read_item.dest_index.fqn!r} is not a tensor; loom checkpoints hold "
                f"tensors only and never unpickle objects"
            )

    return TensorOnlyPlanner()


def saved_model_fields(manifest: dict) -> dict:
    """The model config a checkpoint's manifest records. Fields added to ModelConfig after it
    was written take their defaults (a checkpoint from before the model families is a Llama,
    which the defaults describe)."""
    from loom.models.transformer import ModelConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
    return {**defaults, **manifest["model"]}


def saved_model_config(manifest: dict):
    """The ModelConfig a checkpoint's manifest records (see saved_model_fields)."""
    from loom.models.transformer import ModelConfig, RopeScaling

    fields = saved_model_fields(manifest)
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    return ModelConfig(**fields)


def model_fields(model_cfg) -> dict:
    """The model's shape as JSON-able values (RoPE scaling as a dict)."""
    out = {}
    for f in dataclasses.fields(model_cfg):
        v = getattr(model_cfg, f.name)
        out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return out


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns that it assumes a single process when there is no process group: we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        yield


def _load_in_one_process(path: Path, state: dict) -> None:
    """DCP-load `state` ({"model": {name: full tensor}}) in place, without a process group."""
    import torch.distributed.checkpoint as dcp

    with quiet_single_process():
        try:
            dcp.load(state, storage_reader=safe_reader(path), planner=safe_planner(), no_dist=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            raise CheckpointError(one_line(e)) from None


def load_model_weights(path: str | Path, model: nn.Module) -> dict:
    """Load only the weights of checkpoint `path` into a single-process model (no optimizer, no
    process group): for export and inspection. Returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    check_files(path, manifest, checksums=True)
    state = {"model": model.state_dict()}
    _load_in_one_process(path, state)
    model.load_state_dict(state["model"])
    return manifest


def save_model_weights(tensors: dict[str, torch.Tensor], model_cfg, path: str | Path, model_name: str,
                       source: str, load=None, extra: dict | None = None) -> Path:
    """Write a weights-only checkpoint (what `loom convert --from-hf` produces) at `path`, through
    the same temporary-folder-then-rename as training checkpoints. `tensors` maps loom parameter
    names to tensors (any float dtype: they load into the run's fp32 master weights).

    With load(name) -> tensor, `tensors` need only describe the tensors (meta tensors of the
    right shape and dtype): each is loaded when it is written and dropped after, one file per
    tensor, so memory stays near the largest tensor whatever the model's size."""
    import torch.distributed.checkpoint as dcp

    final = Path(path)
    if final.exists():
        raise CheckpointError(f"checkpoint {final} already exists; nothing was overwritten")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    # DCP keeps every tensor of a file until the file is written: one file per tensor streams.
    writer = dcp.FileSystemWriter(tmp, single_file_per_rank=load is None, thread_count=1)
    with quiet_single_process():
        dcp.save({"model": tensors}, storage_writer=writer, planner=_loading_planner(load), no_dist=True)
    files = {str(f.relative_to(tmp)): file_record(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    manifest = {"format": FORMAT, "step": 0, "contents": ["model"], "model": model_fields(model_cfg),
                "model_name": model_name, "source": source, "dtype": ",".join(dtypes), "files": files, **(extra or {})}
    publish_folder(tmp, final, manifest)
    return final


def _loading_planner(load):
    """DCP's save planner, which with load(name) reads each model tensor only when DCP writes it."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    if load is None:
        return DefaultSavePlanner()

    class LoadingPlanner(DefaultSavePlanner):
        def lookup_object(self, index):
            return load(index.fqn.removeprefix("model."))

    return LoadingPlanner()


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
    state = {"model": {n: torch.empty(shapes[n], dtype=dtype) for n in names}}
    _load_in_one_process(Path(path), state)
    return state["model"]


def disk_full(error: BaseException) -> bool:
    """Whether `error` comes from a filesystem without space (ENOSPC), also through DCP."""
    return any((isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)
               for e in error_chain(error))


def one_line(error: BaseException, doing: str = "read") -> str:
    """A one-line message for a load failure: our own CheckpointError where DCP wrapped one
    (DCP gathers each rank's failure into a CheckpointException, sometimes only as text)."""
    chain = error_chain(error)
    ours = [e for e in chain if isinstance(e, CheckpointError)]
    if ours:
        return str(ours[0])
    for e in chain:
        m = re.search(r"(checkpoint (?:file|entry) .*?)(?:;|$)", str(e), re.MULTILINE)
        if m:
            return m.group(1)
    first = str(chain[-1]).strip().splitlines()
    return f"checkpoint could not be {doing}: {type(chain[-1]).__name__}: {first[0] if first else ''}"


def write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
