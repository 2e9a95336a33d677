"""One exclusive file lock for the few places where several ranks may build the same cached file
at once (loom's CPU kernels, the builtin corpus). fcntl on POSIX, msvcrt on Windows; elsewhere no
lock (concurrent builders then each write to a temporary name and rename into place)."""
from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """Hold an exclusive lock on file `path` (created if missing) for the block."""
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:
            fcntl = None
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        else:
            try:
                import msvcrt
            except ImportError:
                msvcrt = None
            if msvcrt is not None:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
        yield
