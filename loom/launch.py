"""Start a job of N ranks on this node through torchrun, so laptop users need no torchrun flags.

Multi-node jobs call torchrun themselves (`torchrun --nnodes ... -m loom train ...`): under
torchrun `loom train` is simply one worker.
"""
from __future__ import annotations

import subprocess
import sys


def launch_local(nproc: int, worker_args: list[str], max_restarts: int = 0, quiet: bool = False) -> int:
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        "-m", "loom", "train", *worker_args, *(["--quiet"] if quiet else []),
    ]
    return subprocess.call(cmd)
