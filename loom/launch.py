"""Start a job of N ranks on this node through torchrun, so laptop users need no torchrun flags.

Multi-node jobs call torchrun themselves (`torchrun --nnodes ... -m loom train ...`): under
torchrun `loom train` is simply one worker.

Signals: `loom train --nproc N` runs torchrun in a session of its own, so that a terminal's
Ctrl-C reaches it once, through this process, which forwards SIGINT and SIGTERM to it and waits:
torchrun passes the signal to every worker, which stops after its step with a checkpoint
(loom.train.signals), and no process outlives `loom train`. A second signal kills torchrun and
its workers at once. torchrun runs under `python -m loom.launch`, which is torchrun's own main
with its exit on a signal made quiet (one line from the workers, not torchrun's traceback).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from loom.train.crash import EXIT_CRASH
from loom.train.hangs import EXIT_TIMEOUT
from loom.train.signals import EXIT_STOPPED, STOP_SIGNALS

EXIT_ERROR = 2  # a loom error: the rank that met it printed it in one line


def launch_local(nproc: int, worker_args: list[str], max_restarts: int = 0, quiet: bool = False) -> int:
    cmd = [
        sys.executable, "-m", "loom.launch",
        "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        "-m", "loom", "train", *worker_args, *(["--quiet"] if quiet else []),
    ]
    # After a restart, workers sharing torchrun's rendezvous store can read the previous attempt's
    # addresses and fail to connect (pytorch/pytorch#135712); a store per attempt avoids that.
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    # torchrun's own default for its workers, set here so that it prints no banner about it.
    env.setdefault("OMP_NUM_THREADS", "1")
    torchrun = subprocess.Popen(cmd, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        if len(received) == 1:
            torchrun.send_signal(signum)
        elif len(received) == 2:  # a second signal: everything, now
            for pid in [*_descendants(torchrun.pid), torchrun.pid]:
                _kill(pid)
            print(f"loom train: stopped at once by a second {signal.Signals(signum).name}; the checkpoints "
                  f"published before it are intact", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        status = torchrun.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if len(received) > 1:
        return 128 + received[1]
    return EXIT_STOPPED if received and status != 0 else status


def _descendants(pid: int) -> list[int]:
    """Processes below `pid` (Linux /proc; elsewhere none are found and torchrun's own shutdown
    ends its workers)."""
    children = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    except OSError:
        return []
    return [d for c in children for d in (c, *_descendants(c))]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class _DropNotices(logging.Filter):
    """torchrun's notices that it got a signal and passes it on, that workers ended with a loom
    error (status 2), a recorded crash (4) or a timeout (5), and about their error files: loom says what
    happened, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(s in message for s in ("closing signal", "death signal", "error file", *(
            f"(exitcode: {status})" for status in (EXIT_ERROR, EXIT_CRASH, EXIT_TIMEOUT))))


def _kill_stopped_workers_at_once() -> None:
    """torchrun ends a job's workers with a signal and waits up to 30 s for them before SIGKILL.
    A stopped worker (SIGSTOP, a debugger's halt) cannot act on the signal until it is continued,
    so waiting for it helps nothing: it is killed at once. In this process only, which is
    torchrun's."""
    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler

    handler = subprocess_handler.SubprocessHandler
    close = handler.close

    def close_or_kill(self, death_sig=None):
        close(self, death_sig)
        if _stopped(self.proc.pid):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    handler.close = close_or_kill


def _stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (Linux /proc; elsewhere, never)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def run_torchrun(argv: list[str]) -> int:
    """torchrun's main on argv, quiet where loom's workers have said what happened: a signal that
    stopped the job is exit status EXIT_STOPPED, a job whose first failing worker ended with
    loom's one-line error EXIT_ERROR, and one whose first failing worker crashed (EXIT_CRASH) or
    waited longer than train.timeout_s for another rank (EXIT_TIMEOUT) that status and that
    worker's line, printed here once. Other failures keep torchrun's report."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api",
                 "torch.distributed.elastic.multiprocessing.errors.error_handler"):
        logging.getLogger(name).addFilter(_DropNotices())
    _kill_stopped_workers_at_once()
    try:
        main(argv)
    except SignalException:
        return EXIT_STOPPED
    except ChildFailedError as e:
        # The first failure is the cause; ranks still running then are ended by torchrun.
        first = e.get_first_failure()[1]
        if first.exitcode == EXIT_ERROR:
            return EXIT_ERROR
        if first.exitcode in (EXIT_CRASH, EXIT_TIMEOUT):  # the line the worker wrote to its error file
            message = first.message.get("message") if isinstance(first.message, dict) else first.message
            print(f"loom train: {message}", file=sys.stderr, flush=True)
            return first.exitcode
        raise
    return 0


if __name__ == "__main__":
    sys.exit(run_torchrun(sys.argv[1:]))
