"""The documents `loom prepare` reads: files found under --input, cut into shards, each read as
(document id, text) pairs in bounded memory.

    .txt                 the whole file is one document
    .jsonl               one JSON object per line, its --text-key field the text
    .jsonl.gz .jsonl.zst the same, compressed (streamed: never whole in memory)
    .parquet             its --text-key column, a row group at a time (pyarrow)
    a `datasets` save_to_disk folder (state.json + Arrow files), a record batch at a time

Shards are whole files, ranges of row groups of a large parquet file, or line-aligned byte
ranges of a large plain .jsonl; they depend on the input alone, so any number of workers writes
the same bytes. Document ids (`file@byte`, `file#row`, `file`) decide the validation split.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SHARD_BYTES = 64 << 20  # input bytes per shard of a large file: bounded work and memory per task
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
MAGIC = {".jsonl.gz": b"\x1f\x8b", ".jsonl.zst": b"\x28\xb5\x2f\xfd"}


class PrepareError(ValueError):
    """Input `loom prepare` cannot use; the message is one line."""


def kind_of(path: Path) -> str | None:
    """The input kind of a file by its name (one of SUFFIXES), or None."""
    name = path.name
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def arrow_files(folder: Path) -> list[Path] | None:
    """The Arrow files of a `datasets` save_to_disk folder (state.json lists them), else None."""
    state = folder / "state.json"
    if not state.is_file():
        return None
    try:
        files = [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return files


@dataclass(frozen=True)
class Part:
    """Part of the input: `path` whole (start = stop = 0), row groups [start, stop) of a parquet
    file, or bytes [start, stop) of a plain .jsonl. `rel`: the path shown in document ids."""

    path: Path
    kind: str
    rel: str
    start: int = 0
    stop: int = 0
    size: int = 0  # input bytes it covers (progress)


@dataclass(frozen=True)
class Shard:
    """A unit of work and of output: consecutive parts of about SHARD_BYTES."""

    parts: tuple[Part, ...]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


def find_inputs(root: Path) -> list[tuple[Path, str]]:
    """(file, kind) under --input in name order; a save_to_disk folder gives its Arrow files."""
    if root.is_file():
        if kind_of(root) is None:
            raise PrepareError(f"--input={str(root)!r} is not a supported file; allowed: {', '.join(SUFFIXES)} files, "
                               f"or a folder of them")
        return [(root, kind_of(root))]
    found: list[tuple[Path, str]] = []
    for folder, subfolders, names in sorted(os.walk(root)):
        arrows = arrow_files(Path(folder))
        if arrows is not None:
            found += [(f, "arrow") for f in arrows]
            subfolders.clear()
            continue
        subfolders.sort()
        found += [(Path(folder) / n, kind_of(Path(n))) for n in sorted(names) if kind_of(Path(n))]
    return sorted(found, key=lambda f: f[0].relative_to(root).as_posix())


def plan_shards(files: list[tuple[Path, str]], root: Path) -> list[Shard]:
    """The shards of the input, in order: large files cut into parts, small ones grouped."""
    parts: list[Part] = []
    for path, kind in files:
        rel = path.relative_to(root).as_posix() if root.is_dir() else path.name
        size = path.stat().st_size
        if kind == ".jsonl" and size > SHARD_BYTES:
            parts += [Part(path, kind, rel, a, b, b - a) for a, b in _line_ranges(path, size)]
        elif kind == ".parquet":
            parts += _parquet_parts(path, rel)
        else:
            parts.append(Part(path, kind, rel, size=size))
    shards, group = [], []
    for part in parts:
        if group and sum(p.size for p in group) + part.size > SHARD_BYTES:
            shards.append(Shard(tuple(group)))
            group = []
        group.append(part)
    return shards + ([Shard(tuple(group))] if group else [])


def _line_ranges(path: Path, size: int) -> list[tuple[int, int]]:
    """Byte ranges of about SHARD_BYTES, each starting at a line's start."""
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + SHARD_BYTES < size:
            f.seek(cuts[-1] + SHARD_BYTES)
            f.readline()  # to the end of the line the cut fell in
            if f.tell() >= size:
                break
            cuts.append(f.tell())
    return list(zip(cuts, cuts[1:] + [size]))


def _parquet_parts(path: Path, rel: str) -> list[Part]:
    """Runs of row groups of about SHARD_BYTES (compressed) each."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    shards, start, size = [], 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= SHARD_BYTES or g == meta.num_row_groups - 1:
            shards.append(Part(path, ".parquet", rel, start, g + 1, size))
            start, size = g + 1, 0
    return shards


def check_inputs(files: list[tuple[Path, str]], text_key: str) -> None:
    """What can be checked before any worker starts: a text column of strings in every parquet and
    Arrow file, and the magic bytes of every compressed file."""
    for path, kind in files:
        if kind in MAGIC:
            with open(path, "rb") as f:
                head = f.read(len(MAGIC[kind]))
            if head != MAGIC[kind]:
                raise PrepareError(f"{path}: not a {kind[len('.jsonl.'):]} file (it starts with {head!r}); "
                                   f"allowed: a compressed JSONL file")
        elif kind in (".parquet", "arrow"):
            schema = _arrow_schema(path, kind)
            if text_key not in schema.names:
                raise PrepareError(f"{path}: no column {text_key!r} (--text-key); its columns: {', '.join(schema.names)}")
            import pyarrow as pa

            tp = schema.field(text_key).type
            if not (pa.types.is_string(tp) or pa.types.is_large_string(tp)):
                raise PrepareError(f"{path}: column {text_key!r} holds {tp}, not text; allowed: a string column")


def _arrow_schema(path: Path, kind: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == ".parquet":
            return pq.read_schema(path)
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).schema
    except (pa.ArrowInvalid, OSError) as e:
        raise PrepareError(f"{path}: not a readable {'parquet' if kind == '.parquet' else 'Arrow'} file ({e})") from None


def read_shard(shard: Shard, text_key: str) -> Iterator[tuple[str, str, int]]:
    """(document id, text, input bytes of the shard read so far) of every document of `shard`."""
    before = 0
    for part in shard.parts:
        for doc_id, text, done in read_part(part, text_key):
            yield doc_id, text, before + done
        before += part.size


def read_part(shard: Part, text_key: str) -> Iterator[tuple[str, str, int]]:
    """(document id, text, input bytes of the part read so far) of every document of a part."""
    if shard.kind == ".txt":
        yield shard.rel, shard.path.read_text(encoding="utf-8", errors="replace"), shard.size
    elif shard.kind in (".parquet", "arrow"):
        yield from _read_columnar(shard, text_key)
    else:
        yield from _read_jsonl(shard, text_key)


def _open_jsonl(shard: Part):
    """(binary line stream, raw file whose tell() is progress) of a .jsonl[.gz|.zst] shard."""
    raw = open(shard.path, "rb")
    if shard.kind == ".jsonl.gz":
        return gzip.GzipFile(fileobj=raw), raw
    if shard.kind == ".jsonl.zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)), raw
    raw.seek(shard.start)
    return raw, raw


def _read_jsonl(shard: Part, text_key: str) -> Iterator[tuple[str, str, int]]:
    lines, raw = _open_jsonl(shard)
    at = shard.start if shard.kind == ".jsonl" else 0  # byte offset (decompressed) of the line
    end = shard.stop if shard.kind == ".jsonl" and shard.stop else None  # a byte range, or the whole file
    with raw, lines:
        while end is None or at < end:
            try:
                line = lines.readline()
            except (OSError, EOFError, ValueError) as e:  # gzip's BadGzipFile is an OSError; zstd's a ZstdError
                raise PrepareError(f"{shard.path}: corrupt {shard.kind[len('.jsonl.'):]} data after line "
                                   f"{_line_number(shard, at)} ({e})") from None
            except Exception as e:
                if type(e).__name__ == "ZstdError":
                    raise PrepareError(f"{shard.path}: corrupt zst data after line {_line_number(shard, at)} ({e})") from None
                raise
            if not line:
                break
            doc_at, at = at, at + len(line)
            if not line.strip():
                continue
            yield f"{shard.rel}@{doc_at}", _text_of(line, text_key, shard, doc_at), raw.tell() - shard.start


def _text_of(line: bytes, text_key: str, shard: Part, at: int) -> str:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PrepareError(f"{shard.path}:{_line_number(shard, at)} is not a JSON object") from None
    if not isinstance(record, dict) or text_key not in record:
        raise PrepareError(f"{shard.path}:{_line_number(shard, at)} has no {text_key!r} field (--text-key)"
                           + (f"; its fields: {', '.join(record)}" if isinstance(record, dict) else ""))
    text = record[text_key]
    if not isinstance(text, str):
        raise PrepareError(f"{shard.path}:{_line_number(shard, at)}: {text_key!r} is {type(text).__name__} "
                           f"{json.dumps(text)[:40]}, not text")
    return text


def _line_number(shard: Part, at: int) -> int:
    """The 1-based line at (decompressed) byte `at` of the shard's file (counted on errors only)."""
    lines, raw = _open_jsonl(Part(shard.path, shard.kind, shard.rel))
    count, done = 1, 0
    with raw, lines:
        while done < at:
            chunk = lines.read(min(1 << 20, at - done))
            if not chunk:
                break
            count += chunk.count(b"\n")
            done += len(chunk)
    return count


def _read_columnar(shard: Part, text_key: str) -> Iterator[tuple[str, str, int]]:
    """Rows of a parquet shard's row groups, or of an Arrow file's record batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    row, done = 0, 0
    if shard.kind == ".parquet":
        f = pq.ParquetFile(shard.path)
        row = sum(f.metadata.row_group(g).num_rows for g in range(shard.start))
        tables = ((f.read_row_group(g, columns=[text_key]), f.metadata.row_group(g).total_byte_size)
                  for g in range(shard.start, shard.stop))
    else:
        source = pa.memory_map(str(shard.path))
        tables = ((batch, batch.nbytes) for batch in pa.ipc.open_stream(source))
    for table, size in tables:
        column = table.column(text_key).to_pylist()
        done += size
        for text in column:
            if not isinstance(text, str):
                raise PrepareError(f"{shard.path}: row {row} has {text_key!r} = {text!r}, not text")
            yield f"{shard.rel}#{row}", text, min(done, shard.size or done)
            row += 1
