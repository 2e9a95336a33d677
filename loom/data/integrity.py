"""A prepared dataset's integrity: what `loom prepare` records of its files, and the checks made
before a run uses them.

    meta.json "files": {"train.bin": {"bytes", "crc32"}, ...}   every file prepare wrote
    meta.json "splits": {split: {..., "max_token"}}             the largest token id of a split

- Sizes are checked at every open (cheap): a truncated or replaced token file is refused. A
  dataset from before these records has its token files' sizes checked against its token counts.
- Checksums and the largest token id are checked on the first use of a dataset on a machine (the
  result is cached with the files' sizes and times) and by `loom prepare --verify`: a file whose
  bytes changed, or a token id the model's vocabulary does not cover, is refused before any
  worker starts instead of failing inside one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from loom.files import CHUNK_BYTES, file_record, read_json_table, write_json_table


class IntegrityError(ValueError):
    """A dataset whose files are not what `loom prepare` wrote; the message is one line."""


def split_files(split: str) -> tuple[str, str]:
    return f"{split}.bin", f"{split}.docs.npy"


def shard_files(meta: dict, split: str) -> list[tuple[str, str]]:
    """(token file, document starts file) of each shard of a split, in order: shards/NNNNN/...
    for a dataset prepared in shards (meta "shards": their count), else the split's one pair."""
    if "shards" not in meta:
        return [split_files(split)]
    return [tuple(f"shards/{i:05d}/{name}" for name in split_files(split)) for i in range(meta["shards"])]


def check_sizes(path: Path, meta: dict) -> None:
    """Every recorded file has its recorded size (older datasets: each token file holds its
    split's token count)."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    expected = dict((name, rec["bytes"]) for name, rec in meta.get("files", {}).items()) or {
        shard_files(meta, split)[0][0]: info["tokens"] * itemsize for split, info in meta["splits"].items()}
    for name, size in expected.items():
        f = path / name
        if not f.is_file():
            raise IntegrityError(f"data.path={str(path)!r}: {name} is missing; prepare the dataset again")
        if f.stat().st_size != size:
            raise IntegrityError(f"data.path={str(path)!r}: {name} is {f.stat().st_size:,} bytes, but loom prepare "
                                 f"wrote {size:,} (truncated or replaced); prepare the dataset again")


def max_token(path: Path, meta: dict, split: str) -> int:
    """The largest token id in a split's token files, read in chunks."""
    top = -1
    for name, _ in shard_files(meta, split):
        if (path / name).stat().st_size == 0:
            continue
        tokens = np.memmap(path / name, dtype=np.dtype(meta["dtype"]), mode="r")
        step = CHUNK_BYTES // tokens.itemsize
        top = max([top] + [int(tokens[i:i + step].max()) for i in range(0, len(tokens), step)])
    return top


def verify(path: Path, meta: dict) -> dict[str, int]:
    """Checksums of every recorded file against meta.json, and each split's largest token id
    (read from the file, checked against the recorded one). Returns {split: largest id}."""
    check_sizes(path, meta)
    for name, rec in meta.get("files", {}).items():
        if file_record(path / name)["crc32"] != rec["crc32"]:
            raise IntegrityError(f"data.path={str(path)!r}: {name} does not match the checksum loom prepare "
                                 f"recorded (its bytes changed); prepare the dataset again")
    largest = {split: max_token(path, meta, split) for split in meta["splits"]}
    for split, info in meta["splits"].items():
        if "max_token" in info and largest[split] != info["max_token"]:
            raise IntegrityError(f"data.path={str(path)!r}: its {split} split holds token id "
                                 f"{largest[split]:,}, but loom prepare recorded {info['max_token']:,} as its largest")
    return largest


def verified_max_tokens(path: Path, meta: dict, cache: Path) -> dict[str, int]:
    """verify() once per machine and dataset state (its files' sizes and modification times),
    remembered in `cache`; the sizes are checked every time."""
    check_sizes(path, meta)
    names = sorted({*meta.get("files", {}), *(shard_files(meta, s)[0][0] for s in meta["splits"])})
    stamp = {n: [(path / n).stat().st_size, (path / n).stat().st_mtime_ns] for n in names}
    key = str(path.resolve())
    known = read_json_table(cache).get(key, {})
    if known.get("stamp") == stamp:
        return known["max_token"]
    largest = verify(path, meta)
    write_json_table(cache, {**read_json_table(cache), key: {"stamp": stamp, "max_token": largest}})
    return largest
