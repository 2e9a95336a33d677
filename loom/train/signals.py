"""Stopping a run on SIGTERM or SIGINT: a scheduler's preemption (Slurm, Kubernetes send SIGTERM
and wait a grace period) or Ctrl-C.

The first signal asks for a stop: the rank finishes its current step, every rank agrees on the
step to stop after (a rank that got no signal, or got it later, must not be left waiting in a
collective), a checkpoint is written where checkpoint.dir is set, and the run ends with
StoppedBySignal, which `loom train` reports in one line with exit status EXIT_STOPPED. A second
signal stops the process at once: checkpoints are published by an atomic rename, so those
already published are intact, and a save cut short leaves only a temporary folder that the next
start removes.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_STOPPED = 3  # exit status of a run stopped by a signal (2: a loom error)


class StoppedBySignal(Exception):
    """The run stopped after `step` because of signal `name`; checkpoint: the folder written, or None."""

    def __init__(self, name: str, step: int, checkpoint: str | None):
        self.name, self.step, self.checkpoint = name, step, checkpoint
        written = (f"checkpoint {checkpoint} written; resume with the same command (checkpoint.resume=auto "
                   f"continues from it)") if checkpoint else "no checkpoint written (checkpoint.dir is not set)"
        super().__init__(f"stopped by {name} after step {step}; {written}")


class StopRequests:
    """Installs handlers for STOP_SIGNALS while the run trains (main thread only; elsewhere, a
    no-op). `signum` is the first signal received, 0 while none."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if not self.signum:
            self.signum = signum
            return
        if os.environ.get("RANK", "0") == "0":
            print(f"loom train: stopped at once by a second {signal.Signals(signum).name}; the checkpoints "
                  f"published before it are intact", file=sys.stderr, flush=True)
        os._exit(128 + signum)
