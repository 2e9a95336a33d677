"""Where a run starts: the checkpoint it resumes, the weights it starts from
(checkpoint.init_from), and the checks of both against the config before any worker starts.
The folder format they read is loom.train.checkpoint_files."""
from __future__ import annotations

import json
from pathlib import Path

from loom.settings import SettingError, need, one_of
from loom.train.checkpoint_files import (DATA_KEYS, DATA_KEYS_ADDED, DATA_ORDER, CheckpointError, check_base, check_files,
                                         check_same_model, lora_fields, newest, published, read_manifest)


def check_compatible(path: str | Path, manifest: dict, cfg, model_cfg) -> None:
    """The checkpoint holds this model's shape and, if it holds training state, this run's data
    stream and adapters (changing the layout, the learning rate or the step count is fine)."""
    check_same_model(path, manifest, model_cfg)
    want = lora_fields(cfg.lora, model_cfg)
    saved = {k: v for k, v in manifest["lora"].items() if k != "base"} if "lora" in manifest else None
    if saved != want:
        raise CheckpointError(f"checkpoint {path} was saved with LoRA adapters {saved}, this config has {want}; "
                              f"allowed: the [lora] settings it was saved with")
    if "train" in manifest["contents"]:
        data = manifest.get("data", {})
        order = data.get("data.order", DATA_KEYS_ADDED["data.order"])
        if order != DATA_ORDER:
            raise CheckpointError(f"checkpoint {path} ordered its samples by {order}, this loom by {DATA_ORDER}: "
                                  f"resuming would not continue the same data stream; allowed: "
                                  f"checkpoint.init_from={str(path)!r} (its weights, a new data stream)")
        for section, key in DATA_KEYS:
            now = json.loads(json.dumps(getattr(getattr(cfg, section), key)))  # a blend's tuples as JSON lists
            then = data.get(f"{section}.{key}", DATA_KEYS_ADDED.get(f"{section}.{key}"))
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


ON_ERROR = ("stop", "continue")  # what a failed save does to the run


def check_checkpoint_section(c) -> None:
    """The [checkpoint] section's own checks (no disk access)."""
    need(c.every >= 0, f"checkpoint.every={c.every} must be 0 or positive")
    need(c.keep >= 1, f"checkpoint.keep={c.keep} must be a positive integer")
    need(c.every == 0 or bool(c.dir), f"checkpoint.every={c.every} needs checkpoint.dir (a folder to write checkpoints to)")
    need(bool(c.resume), "checkpoint.resume='' must be 'auto', 'never' or a checkpoint folder")
    one_of("checkpoint.on_error", c.on_error, ON_ERROR)


def check_checkpoint_files(cfg, model_cfg) -> None:
    """The [checkpoint] section against the disk, as SettingErrors: the folder, and the
    checkpoints a run starts from (see start_points)."""
    c = cfg.checkpoint
    need(not (c.dir and Path(c.dir).exists() and not Path(c.dir).is_dir()),
         f"checkpoint.dir={c.dir!r} is a file; allowed: a folder (created if missing)")
    try:
        start_points(cfg, model_cfg)
    except CheckpointError as e:
        raise SettingError(str(e)) from None


def start_points(cfg, model_cfg) -> tuple[Path | None, Path | None]:
    """(base, resume): the checkpoint whose weights alone a run starts from, and the one whose
    training state it continues, after everything about them that can be checked before any
    worker starts (the checksums are read by the workers, shared among them).

    A LoRA checkpoint holds adapters only, and names its base: resuming it loads that base
    first. A LoRA run given a checkpoint without adapters (checkpoint.resume or init_from) takes
    it as its base. checkpoint.init_from applies only when there is nothing to resume."""
    opened = _opened_resume(cfg.checkpoint)
    if opened is not None:
        resume, manifest = opened
        if lora_fields(cfg.lora, model_cfg) is not None and "lora" not in manifest:  # a whole model: the base
            if cfg.checkpoint.resume == "auto":  # a LoRA run's own checkpoints hold adapters
                raise CheckpointError(
                    f"checkpoint.dir={cfg.checkpoint.dir!r} holds checkpoints of a whole model ({resume.name}), which "
                    f"a LoRA run cannot continue; allowed: another checkpoint.dir for the adapters, with "
                    f"checkpoint.init_from={str(resume)!r} to start from those weights")
            check_same_model(resume, manifest, model_cfg)  # its data stream is not continued
            return resume, None
        check_compatible(resume, manifest, cfg, model_cfg)
        base = manifest.get("lora", {}).get("base")
        return (check_base(base, model_cfg, f"checkpoint {resume} holds LoRA adapters of the base {base}")
                if base else None), resume
    if cfg.checkpoint.init_from:
        path = cfg.checkpoint.init_from
        from loom.train.builtin_base import BUILTIN_BASE, builtin_base

        if path == BUILTIN_BASE:  # built by the first process that asks: `loom train` before its workers
            path = str(builtin_base())
        return check_base(path, model_cfg, "checkpoint.init_from"), None
    return None, None


def _opened_resume(c) -> tuple[Path, dict] | None:
    """The checkpoint checkpoint section `c` resumes and its manifest, its files present with
    their sizes; refuses checkpoint.resume='never' over published checkpoints."""
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
    return path, manifest
