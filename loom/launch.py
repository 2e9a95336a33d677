"""Start a job of N ranks on this node through torchrun, so laptop users need no torchrun flags.

Multi-node jobs call torchrun themselves (`torchrun --nnodes ... -m loom train ...`): under
torchrun `loom train` is simply one worker.
"""
from __future__ import annotations

import os
import subprocess
import sys


def launch_local(nproc: int, worker_args: list[str], max_restarts: int = 0, quiet: bool = False) -> int:
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        "-m", "loom", "train", *worker_args, *(["--quiet"] if quiet else []),
    ]
    # After a restart, workers sharing torchrun's rendezvous store can read the previous attempt's
    # addresses and fail to connect (pytorch/pytorch#135712); a store per attempt avoids that.
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.call(cmd, env=env)
