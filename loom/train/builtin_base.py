"""`checkpoint.init_from = "builtin:tiny-pretrained"`: the embedded default's pretrained model, as
the base the embedded fine-tuning configs (configs/tiny_sft.toml, tiny_lora.toml) start from.

On first use it is written by running the embedded default itself (`loom train` with nothing
set: the tiny Llama on the standard library's sources, 4 CPU ranks, about a minute) with a
checkpoint folder in loom's cache; later runs take its checkpoint. Nothing is downloaded.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from loom.locks import exclusive_lock
from loom.files import cache_dir
from loom.train.checkpoint_files import CheckpointError, newest

BUILTIN_BASE = "builtin:tiny-pretrained"
TORCHRUN_VARIABLES = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT"}


def builtin_base(progress: bool = True) -> Path:
    """The embedded default's final checkpoint, written on first use."""
    from loom.data.stdlib import builtin_dataset

    folder = cache_dir() / "bases" / f"tiny-{builtin_dataset(progress=progress).name}"
    found = newest(folder)
    if found is not None:
        return found
    folder.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder.parent / f"{folder.name}.lock"):
        found = newest(folder)
        if found is not None:
            return found
        if progress:
            print(f"loom: pretraining the builtin base (the embedded default `loom train`, once; cached in {folder})",
                  file=sys.stderr, flush=True)
        # A job of its own, also when asked from inside a torchrun worker: none of torchrun's variables.
        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC")}
        run = subprocess.run([sys.executable, "-m", "loom", "train", "--quiet", f"--checkpoint.dir={folder}",
                              f"--metrics.jsonl={folder / 'metrics.jsonl'}", "--metrics.plot="],
                             capture_output=True, text=True, env=env)
        found = newest(folder)
        if run.returncode != 0 or found is None:
            why = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise CheckpointError(f"checkpoint.init_from={BUILTIN_BASE!r}: pretraining it failed ({why})")
    return found
