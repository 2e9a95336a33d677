"""One shard of `loom prepare`: its documents tokenized into split files, written atomically.

    shards/NNNNN/train.bin, val.bin          token ids, [bos] + text + eos per document
    shards/NNNNN/train.docs.npy, val.docs... int64 start of every document
    shards/NNNNN/shard.json                  counts, largest ids and file records

A shard folder appears only complete (written as .NNNNN.tmp, then renamed), so a killed prepare
keeps its finished shards and redoes the rest. Memory stays bounded by one batch of documents.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loom.data.inputs import Shard, read_shard
from loom.data.special_tokens import DocumentTokens
from loom.files import file_record

BATCH_CHARS = 1 << 20
CHUNK_DOCUMENTS = 1 << 20  # document starts copied at a time when a split file is closed  # text per encode_batch call: enough for the tokenizer's threads, bounded memory
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ShardSpec:
    """Everything that decides a shard's bytes (and so belongs to the resume check)."""

    tokenizer_file: str
    text_key: str
    val_fraction: float
    tokens: DocumentTokens
    dtype: str


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Deterministic held-out choice by a hash of the document's id (stable across runs)."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
    return h / 2**64 < val_fraction


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(path: str):
    """The tokenizer of a spec, loaded once per process."""
    if path not in _TOKENIZERS:
        from tokenizers import Tokenizer

        _TOKENIZERS[path] = Tokenizer.from_file(path)
    return _TOKENIZERS[path]


class SplitWriter:
    """A split's token file and document starts, appended a batch at a time. The starts go to a
    scratch file as they come (a single compressed input is one shard of any number of
    documents) and become the .npy at close, copied in bounded chunks."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.file = open(folder / f"{split}.bin", "wb")
        self.starts_file = open(folder / f"{split}.starts.i64", "wb")
        self.tokens, self.documents, self.largest = 0, 0, -1

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Documents back to back: ids [sum(lengths)], lengths [D]."""
        if not len(lengths):
            return
        self.file.write(ids.astype(self.dtype, copy=False).tobytes())
        self.starts_file.write((self.tokens + np.cumsum(lengths) - lengths).astype(np.int64).tobytes())
        self.tokens += int(lengths.sum())
        self.documents += len(lengths)
        self.largest = max(self.largest, int(ids.max()))

    def close(self) -> dict:
        self.file.close()
        self.starts_file.close()
        scratch = self.folder / f"{self.split}.starts.i64"
        out = np.lib.format.open_memmap(self.folder / f"{self.split}.docs.npy", mode="w+", dtype=np.int64,
                                        shape=(self.documents,))
        if self.documents:
            starts = np.memmap(scratch, dtype=np.int64, mode="r")
            for i in range(0, self.documents, CHUNK_DOCUMENTS):
                out[i:i + CHUNK_DOCUMENTS] = starts[i:i + CHUNK_DOCUMENTS]
            del starts
        out.flush()
        del out
        scratch.unlink()
        return {"tokens": self.tokens, "documents": self.documents, "max_token": self.largest}


def encode(texts: list[str], spec: ShardSpec) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (ids [T], lengths [D]) with BOS and EOS around each, ids in spec.dtype."""
    encodings = _tokenizer(spec.tokenizer_file).encode_batch_fast(texts, add_special_tokens=False)
    bos, eos = spec.tokens.bos, spec.tokens.eos
    flat: list[int] = []
    lengths = np.empty(len(encodings), dtype=np.int64)
    extra = 1 + (bos is not None)
    for d, e in enumerate(encodings):  # one Python list per document is the tokenizer's API
        ids = e.ids
        if bos is not None:
            flat.append(bos)
        flat.extend(ids)
        flat.append(eos)
        lengths[d] = len(ids) + extra
    return np.array(flat, dtype=np.dtype(spec.dtype)), lengths


class ShardProgress:
    """Turns a shard's (input bytes read so far, tokens of the batch) into increments."""

    def __init__(self, add):
        self.add, self.read = add, 0

    def __call__(self, read: int, tokens: int) -> None:
        self.add(max(0, read - self.read), tokens)
        self.read = max(self.read, read)


def write_shard(shard: Shard, number: int, spec: ShardSpec, shards_dir: Path, report=None) -> dict:
    """Tokenize `shard` into shards_dir/NNNNN (atomically); returns its shard.json.
    report(input_bytes, tokens): progress, called after every batch."""
    final = shards_dir / f"{number:05d}"
    tmp = shards_dir / f".{number:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writers = {s: SplitWriter(tmp, s, np.dtype(spec.dtype)) for s in SPLITS}
        # The tokenizer (which releases the GIL and uses every core) encodes one batch while this
        # thread reads, parses and writes the next and the last: their Python work overlaps it.
        with ThreadPoolExecutor(max_workers=1) as encoder:
            pending = None
            for batch, done in batches(read_shard(shard, spec.text_key)):
                submitted = encoder.submit(encode, [text for _, text in batch], spec), batch, done
                if pending is not None:
                    _write(pending, spec, writers, report)
                pending = submitted
            if pending is not None:
                _write(pending, spec, writers, report)
        record = {"input": [[p.rel, p.start, p.stop] for p in shard.parts],
                  "splits": {s: w.close() for s, w in writers.items()}}
        record["files"] = {f"{s}.{ext}": file_record(tmp / f"{s}.{ext}") for s in SPLITS for ext in ("bin", "docs.npy")}
        (tmp / "shard.json").write_text(json.dumps(record, indent=1))
        os.replace(tmp, final)
        return record
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def batches(documents):
    """(documents, input bytes read) in batches of about BATCH_CHARS of text."""
    batch, chars, done = [], 0, 0
    for doc_id, text, done in documents:
        batch.append((doc_id, text))
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield batch, done
            batch, chars = [], 0
    if batch:
        yield batch, done


def _write(pending, spec: ShardSpec, writers: dict, report) -> None:
    """An encoded batch to its splits (each document by its id's hash), then the progress."""
    future, batch, done = pending
    ids, lengths = future.result()
    val = np.fromiter((is_validation(d, spec.val_fraction) for d, _ in batch), dtype=bool, count=len(batch))
    for split, chosen in (("train", ~val), ("val", val)):
        if chosen.any():
            writers[split].add(ids if chosen.all() else ids[np.repeat(chosen, lengths)], lengths[chosen])
    if report is not None:
        report(done, int(lengths.sum()))
