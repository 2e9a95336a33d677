"""`loom prepare --workers N`: shards tokenized by N processes (spawned: a tokenizer's thread pool
does not survive a fork), their progress sent back over a queue. A worker's PrepareError comes
back as itself (one line); on any error or interrupt the other workers are stopped."""
from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
from collections.abc import Callable, Iterator
from pathlib import Path

from loom.data.inputs import Shard
from loom.data.shards import ShardProgress, ShardSpec, write_shard

_PROGRESS = None  # the worker's end of the progress queue (set by _start)


def _start(progress) -> None:
    """A worker's set-up: its progress queue; Ctrl-C (sent to the whole process group) is left to
    the parent, which stops the workers, so that no worker prints a traceback of its own."""
    import signal

    global _PROGRESS
    _PROGRESS = progress
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _work(args: tuple) -> tuple[int, dict]:
    number, shard, spec, shards_dir = args
    report = ShardProgress(lambda input_bytes, tokens: _PROGRESS.put((input_bytes, tokens)))
    return number, write_shard(shard, number, spec, shards_dir, report)


def run_in_pool(pending: list[int], shards: list[Shard], spec: ShardSpec, shards_dir: Path, workers: int,
                add: Callable[[int, int], None]) -> Iterator[tuple[int, dict]]:
    """(shard number, record) of every pending shard as workers finish them."""
    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    pool = ctx.Pool(min(workers, len(pending)), initializer=_start, initargs=(progress,))
    try:
        results = pool.imap_unordered(_work, [(i, shards[i], spec, shards_dir) for i in pending])
        left = len(pending)
        while left:
            try:
                number, record = results.next(timeout=0.2)
            except mp.TimeoutError:
                _drain(progress, add)
                continue
            _drain(progress, add)
            left -= 1
            yield number, record
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _drain(progress, add) -> None:
    while True:
        try:
            add(*progress.get_nowait())
        except queue_module.Empty:
            return
