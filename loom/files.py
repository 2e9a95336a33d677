"""Small file helpers shared by checkpoints, datasets and per-machine caches: loom's cache folder,
a file's size and CRC-32, and JSON tables written atomically."""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

CHUNK_BYTES = 1 << 24


def cache_dir() -> Path:
    """loom's per-user cache (built kernels, the builtin corpus and base, CPU calibrations):
    $XDG_CACHE_HOME/loom, or ~/.cache/loom."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "loom"


def file_crc32(path: Path, chunk: int = CHUNK_BYTES) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def file_record(path: Path) -> dict:
    """A file's manifest entry: its size and CRC-32."""
    return {"bytes": path.stat().st_size, "crc32": file_crc32(path)}


def read_json_table(path: Path) -> dict:
    """The JSON object in `path`; {} when it is missing or unreadable (a cache rebuilds)."""
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def write_json_table(path: Path, table: dict) -> None:
    """Atomically: a reader sees the old table or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, path)
