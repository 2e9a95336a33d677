"""A rank that stops answering (stopped, hung, its node gone) must end the job, not hang it.

Every collective of a run waits at most `train.timeout_s` (torch's process-group timeout); on
gloo the waiting ranks then raise. loom turns that failure into one line naming the step and
what the run was doing then (Activity), and exit status EXIT_TIMEOUT. On NCCL torch's own
watchdog ends a rank whose collective passes the same timeout, with its own report.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

from loom.train.crash import error_chain

EXIT_TIMEOUT = 5  # a collective waited longer than train.timeout_s

# How the backends word a collective that passed the process-group timeout: gloo's recv/send
# ("Timed out waiting 8000ms for recv operation to complete"), gloo's later operations on the
# pairs it then closed, and NCCL's watchdog where it raises instead of aborting.
_TIMEOUT_WORDS = ("Timed out waiting", "Application timeout caused pair closure",
                  "Watchdog caught collective operation timeout")


@dataclass
class Activity:
    """What this rank is doing, for the line a timeout gives: step 0 is the start-up (process
    group, model, checkpoint load), later steps are the step being trained."""

    step: int = 0
    phase: str = "start-up"

    def now(self, phase: str, step: int | None = None) -> None:
        self.phase = phase
        if step is not None:
            self.step = step

    def where(self) -> str:
        return f"before the first step ({self.phase})" if self.step == 0 else f"in step {self.step} ({self.phase})"


def collective_timeout(error: BaseException) -> str | None:
    """The backend's words if `error` (or an error it was raised from) is a collective that
    passed the process-group timeout, else None."""
    for e in error_chain(error):
        text = str(e)
        if any(word in text for word in _TIMEOUT_WORDS):
            # gloo prefixes the C++ source location: "[.../unbound_buffer.cc:78] Timed out ..."
            return text.strip().splitlines()[0].split("] ", 1)[-1]
    return None


# torch.distributed's packages that issue collectives for loom, named as a user knows them.
_CALLERS = {"fsdp": "FSDP", "tensor": "DTensor", "pipelining": "the pipeline schedule",
            "checkpoint": "the checkpoint (DCP)", "_functional_collectives": "DTensor"}


def waiting_operation(error: BaseException) -> str:
    """Which collective waited and who called it, from `error`'s traceback: the innermost
    torch.distributed collective ("all_gather_single"; "an asynchronous collective" where one
    was waited for) and the innermost torch.distributed package or loom function around it."""
    frames = traceback.extract_tb(error.__traceback__)
    public = [f.name for f in frames if f.filename.endswith("distributed_c10d.py") and not f.name.startswith("_")]
    operation = public[-1] if public else "an asynchronous collective"
    for frame in reversed(frames):
        path = frame.filename.replace(os.sep, "/")
        if "/torch/distributed/" in path:
            package = path.split("/torch/distributed/", 1)[1].split("/", 1)[0].removesuffix(".py")
            if package in _CALLERS:
                return f"{operation} in {_CALLERS[package]}"
        elif "/loom/" in path:
            module = path.rsplit("/loom/", 1)[1].removesuffix(".py").replace("/", ".")
            return f"{operation} in loom.{module}.{frame.name}"
    return operation


def timeout_line(rank: int, timeout_s: float, activity: Activity, error: BaseException, backend_words: str) -> str:
    return (f"rank {rank}: {activity.where()}, {waiting_operation(error)} waited longer than "
            f"train.timeout_s={timeout_s:g} ({backend_words}); another rank is stopped, hung or gone. The "
            f"checkpoints published before it are intact; raise train.timeout_s if a step or a save of this "
            f"run takes longer")
