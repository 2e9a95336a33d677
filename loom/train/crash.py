"""An unexpected exception in a run, as one line: its full traceback goes to a file in the run's
folder (beside the metrics JSONL), and under torchrun the line goes to torchrun's error file,
from which `loom train --nproc` (loom.launch) prints the first failing rank's line once."""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

EXIT_CRASH = 4  # an unexpected error; its traceback is in the file the line names


def record_crash(error: BaseException, run_folder: Path, rank: int) -> str:
    """Write `error`'s traceback to run_folder/traceback-rank-R.txt; returns the one line."""
    path: Path | None = run_folder / f"traceback-rank-{rank:05d}.txt"
    try:
        run_folder.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(error)))
    except OSError:
        path = None
    first = (str(error).strip().splitlines() or [""])[0]
    line = f"rank {rank}: unexpected {type(error).__name__}: {first}" + (
        f" (full traceback in {path})" if path else " (its traceback could not be written)")
    tell_torchrun(line, error)
    return line


def tell_torchrun(line: str, error: BaseException) -> None:
    """Under torchrun, write `line` into its error file for this worker, which torchrun reads
    into the failure it reports (its own record's format) and loom.launch prints."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return
    record = {"message": {"message": line, "extraInfo": {
        "py_callstack": "".join(traceback.format_exception(error)), "timestamp": str(int(time.time()))}}}
    # Written beside and renamed over: torchrun SIGTERMs the surviving workers once one fails and
    # then parses every error file; a worker stopped mid-write would leave it empty, and torchrun's
    # agent itself would die on the JSON error (seen in CI when a killed rank's peers crashed).
    partial = f"{error_file}.{os.getpid()}.partial"
    with open(partial, "w") as f:
        json.dump(record, f)
    os.replace(partial, error_file)


def error_chain(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions behind it: causes, contexts, and DCP's per-rank failures
    (a CheckpointException's `failures`: rank -> (exception, traceback))."""
    pending, seen = [error], []
    while pending:
        e = pending.pop()
        if isinstance(e, tuple):  # DCP's (exception, traceback) pairs
            pending += [x for x in e if isinstance(x, BaseException)]
            continue
        if e is None or any(e is x for x in seen):
            continue
        seen.append(e)
        failures = getattr(e, "failures", None)  # CheckpointException: rank -> failure
        if isinstance(failures, dict):
            pending += list(failures.values())
        pending += [e.__cause__, e.__context__]
    return seen
