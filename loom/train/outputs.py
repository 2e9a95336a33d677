"""What a run will write, checked before any worker starts, without writing anything: each
output's folder must exist or be creatable (its nearest existing ancestor a folder this user can
write, probed by a temporary file), and the checkpoint folder's filesystem must have room for one
checkpoint. An unwritable path is then one line at launch, not a traceback per rank after the
model is built."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from loom.metrics.flops import param_counts
from loom.settings import SettingError

# One checkpoint holds fp32 weights and AdamW's two fp32 moments per parameter (bf16 runs keep
# fp32 master weights); the RNG states and the manifest are small beside them.
CHECKPOINT_BYTES_PER_PARAM = 12


def check_output_paths(cfg, model_cfg) -> None:
    """metrics.jsonl, metrics.plot, metrics.tensorboard, checkpoint.dir: writable, with room for
    one checkpoint. Raises SettingError."""
    m, c = cfg.metrics, cfg.checkpoint
    for key, value, is_folder in (("metrics.jsonl", m.jsonl, False), ("metrics.plot", m.plot, False),
                                  ("metrics.tensorboard", m.tensorboard, True), ("checkpoint.dir", c.dir, True)):
        if value:
            _check_writable(key, value, Path(value) if is_folder else Path(value).parent)
            if not is_folder and Path(value).is_dir():
                raise SettingError(f"{key}={value!r} is a folder; allowed: a file's path")
    if c.dir:
        check_checkpoint_room(c.dir, model_cfg, cfg.model.name)


def _existing(folder: Path) -> Path:
    """`folder`, or its nearest ancestor that exists."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_writable(key: str, value: str, folder: Path) -> None:
    allowed = "allowed: a path in a folder this user can create and write"
    existing = _existing(folder)
    if not existing.is_dir():
        raise SettingError(f"{key}={value!r} cannot be written: {existing} is a file; {allowed}")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".loom-write-test-"):
            pass
    except OSError as e:
        raise SettingError(f"{key}={value!r} cannot be written: {e.strerror or e} ({existing}); {allowed}") from None


def checkpoint_bytes(model_cfg) -> int:
    """About the bytes of one checkpoint of `model_cfg`."""
    return CHECKPOINT_BYTES_PER_PARAM * param_counts(model_cfg).total


def check_checkpoint_room(folder: str, model_cfg, name: str) -> None:
    """Refuse a checkpoint folder whose filesystem has less free space than one checkpoint."""
    params = param_counts(model_cfg).total
    needed = checkpoint_bytes(model_cfg)
    free = shutil.disk_usage(_existing(Path(folder))).free
    if free < needed:
        raise SettingError(
            f"checkpoint.dir={folder!r} has {free / 2**30:,.2f} GiB free, but one checkpoint of {name} "
            f"({params:,} parameters: fp32 weights and AdamW states, {CHECKPOINT_BYTES_PER_PARAM} bytes each) "
            f"needs {needed / 2**30:,.2f} GiB; allowed: a folder on a filesystem with room, or no checkpoint.dir")
