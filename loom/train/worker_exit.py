"""How a torchrun worker ends once its work is done and written.

`destroy_process_group` shuts the groups down but does not free them: every FSDP unit, DTensor
mesh and pipeline stage still referencing one keeps its gloo threads running (measured on a
4-rank checkpoint job: 26 `gloo_tcp_loop` and 52 `pt_gloo_runloop` threads after it). The
interpreter's teardown then destroys those C++ objects in no fixed order while their threads
run, and twice in CI a worker aborted there (SIGABRT, "terminate called without an active
exception") after a successful or a failed run, so that torchrun reported a signal instead of
the run's status. A worker therefore leaves without that teardown, as the last thing it does.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def leave(status: int) -> NoReturn:
    """Flush what this process has to say, then exit with `status` at once (no atexit hooks, no
    destructors): everything the run writes (checkpoints, metrics, error files) is closed
    before this is called."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(status)
