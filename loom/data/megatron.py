"""Megatron/NeMo indexed datasets (`prefix.bin` + `prefix.idx`), read in place and written.

The .idx (little-endian), as Megatron-Core's `IndexedDataset` writes it:

    9 bytes  b"MMIDIDX\\x00\\x00"      magic
    uint64   1                       version
    uint8    dtype code              1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    uint64   S                       sequences
    uint64   D                       entries of document_indices (documents + 1)
    int32    sizes [S]               tokens per sequence
    int64    pointers [S]            byte offset of each sequence in the .bin
    int64    document_indices [D]    the sequence each document starts at, then S

Every array is memory-mapped: opening a dataset of any size reads the 34-byte header only.
"""
from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
TOKEN_CODES = (1, 4, 5, 8)  # the integer codes token ids come in (Megatron writes uint16 or int32)
HEADER = struct.Struct("<9sQBQQ")


class MegatronFormatError(ValueError):
    """An .idx/.bin pair that is not a Megatron indexed dataset; the message is one line."""


def is_megatron_prefix(path: str | Path) -> bool:
    """`path` names a prefix whose .bin and .idx both exist."""
    p = str(path)
    return Path(p + ".idx").is_file() and Path(p + ".bin").is_file()


class MegatronIndex:
    """The memory-mapped index of `prefix.idx` with its token file `prefix.bin`.

    tokens [T] the .bin as one token stream (sequences back to back); sizes [S], pointers [S],
    document_indices [D] as in the file. A document's tokens run from the start of its first
    sequence to the start of the next document's.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        idx, bin_ = Path(self.prefix + ".idx"), Path(self.prefix + ".bin")
        with open(idx, "rb") as f:
            raw = f.read(HEADER.size)
        if len(raw) < HEADER.size or not raw.startswith(MAGIC):
            raise MegatronFormatError(f"{idx}: not a Megatron index (its first bytes are {raw[:9]!r}, "
                                      f"expected {MAGIC!r})")
        _, version, code, n_seq, n_doc = HEADER.unpack(raw)
        if version != VERSION:
            raise MegatronFormatError(f"{idx}: index version {version}; allowed: {VERSION}")
        if code not in TOKEN_CODES:
            known = f"{np.dtype(DTYPES[code]).name}, not token ids" if code in DTYPES else "unknown"
            raise MegatronFormatError(f"{idx}: dtype code {code} ({known}); allowed: "
                                      + ", ".join(f"{c} ({np.dtype(DTYPES[c]).name})" for c in TOKEN_CODES))
        self.dtype = np.dtype(DTYPES[code])
        at = HEADER.size
        need = at + n_seq * 4 + n_seq * 8 + n_doc * 8
        if idx.stat().st_size < need or n_doc < 1:
            raise MegatronFormatError(f"{idx}: {idx.stat().st_size:,} bytes, too short for the {n_seq:,} sequences "
                                      f"and {n_doc:,} document entries its header declares ({need:,} bytes)")
        raw = np.memmap(idx, dtype=np.uint8, mode="r")
        random_access(raw)
        self.sizes = MappedColumn(raw, at, n_seq, np.int32)
        self.pointers = MappedColumn(raw, at + n_seq * 4, n_seq, np.int64)
        self.document_indices = MappedColumn(raw, at + n_seq * 12, n_doc, np.int64)
        tokens_bytes = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n_seq else 0
        if bin_.stat().st_size != tokens_bytes:
            raise MegatronFormatError(f"{bin_}: {bin_.stat().st_size:,} bytes, but its index {idx.name} ends its last "
                                      f"sequence at byte {tokens_bytes:,} (a .bin and .idx of different datasets, "
                                      f"or a truncated file)")
        if int(self.document_indices[-1]) != n_seq:
            raise MegatronFormatError(f"{idx}: its document indices end at sequence {int(self.document_indices[-1]):,}, "
                                      f"not at its {n_seq:,} sequences")
        self.tokens = np.memmap(bin_, dtype=self.dtype, mode="r") if tokens_bytes else np.zeros(0, self.dtype)
        self.n_documents = n_doc - 1

    def document_start(self, document) -> np.ndarray:
        """Token offsets [N] where documents [N] start (document n_documents: the end)."""
        seq = self.document_indices.take(document)
        inside = seq < len(self.sizes)
        starts = self.pointers.take(np.where(inside, seq, 0)) // self.dtype.itemsize if len(self.sizes) else seq
        return np.where(inside, starts, len(self.tokens))

    def document_of(self, positions: np.ndarray) -> np.ndarray:
        """The document [N] holding each token offset [N] (binary searches in the mapped arrays)."""
        byte = np.asarray(positions, dtype=np.int64) * self.dtype.itemsize
        seq = search_right(self.pointers, byte) - 1
        return search_right(self.document_indices, seq) - 1


class MappedColumn:
    """An array of the .idx read in place. Its int64 arrays start at unaligned offsets (after the
    34-byte header and the int32 sizes), and numpy copies an unaligned array whole to search or
    index it (76 MB per search of a 10^10-token index): this gathers the bytes of the elements
    asked for, and nothing else."""

    def __init__(self, raw: np.memmap, offset: int, length: int, dtype):
        self.raw, self.offset, self.length, self.dtype = raw, offset, length, np.dtype(dtype)

    def __len__(self) -> int:
        return self.length

    def take(self, indices) -> np.ndarray:
        """Elements [N] at indices [N] (int64)."""
        indices = np.asarray(indices, dtype=np.int64)
        size = self.dtype.itemsize
        at = (self.offset + size * indices.ravel())[:, None] + np.arange(size)
        return np.ascontiguousarray(self.raw[at]).view(self.dtype).astype(np.int64).reshape(indices.shape)

    def __getitem__(self, i: int) -> int:
        return int(self.take(np.array([i % self.length]))[0])



def random_access(mapped: np.memmap) -> None:
    """Tell the kernel a mapped index is read at scattered places (binary searches), so that a
    page touched does not read ahead its neighbours."""
    import mmap

    handle = getattr(mapped, "_mmap", None)
    if handle is not None and hasattr(handle, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        handle.madvise(mmap.MADV_RANDOM)


def search_right(mapped: MappedColumn, values: np.ndarray) -> np.ndarray:
    """np.searchsorted(mapped, values, side="right"), a bisection reading O(log n) elements per
    value (numpy's own would copy the unaligned column whole)."""
    values = np.asarray(values, dtype=np.int64)
    lo = np.zeros(values.shape, dtype=np.int64)
    hi = np.full(values.shape, len(mapped), dtype=np.int64)
    while (lo < hi).any():
        mid = (lo + hi) // 2
        go_right = (lo < hi) & (mapped.take(np.minimum(mid, len(mapped) - 1)) <= values)
        lo = np.where(go_right, mid + 1, lo)
        hi = np.where((lo < hi) & ~go_right, mid, hi)
    return lo


class MegatronWriter:
    """Writes `prefix.bin` + `prefix.idx` a document at a time, in bounded memory: the per-sequence
    sizes go to a scratch file and the index is assembled at close. Files appear only when
    complete (written beside, then renamed)."""

    def __init__(self, prefix: str | Path, dtype):
        self.prefix = str(prefix)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        code = {np.dtype(v): k for k, v in DTYPES.items()}[self.dtype]
        self.code = code
        self.scratch = Path(tempfile.mkdtemp(prefix=".megatron.", dir=Path(self.prefix).parent))
        self.bin = open(self.scratch / "tokens.bin", "wb")
        self.sizes = open(self.scratch / "sizes.i32", "wb")
        self.n_seq = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents back to back (tokens [sum(lengths)], lengths [D]), each one sequence
        (Megatron's `preprocess_data` without sentence splitting)."""
        self.bin.write(np.asarray(tokens).astype(self.dtype, copy=False).tobytes())
        self.sizes.write(np.asarray(lengths, dtype=np.int32).tobytes())
        self.n_seq += len(lengths)

    def close(self) -> None:
        self.bin.close()
        self.sizes.close()
        sizes = np.memmap(self.scratch / "sizes.i32", dtype=np.int32, mode="r") if self.n_seq else np.zeros(0, np.int32)
        with open(self.scratch / "index.idx", "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, self.code, self.n_seq, self.n_seq + 1))
            f.write(np.asarray(sizes).tobytes())
            step, offset = 1 << 20, 0
            for i in range(0, self.n_seq, step):  # pointers in bounded chunks
                chunk = np.asarray(sizes[i:i + step], dtype=np.int64) * self.dtype.itemsize
                f.write((offset + np.cumsum(chunk) - chunk).tobytes())
                offset += int(chunk.sum())
            for i in range(0, self.n_seq + 1, step):  # one sequence per document
                f.write(np.arange(i, min(i + step, self.n_seq + 1), dtype=np.int64).tobytes())
        os.replace(self.scratch / "tokens.bin", self.prefix + ".bin")
        os.replace(self.scratch / "index.idx", self.prefix + ".idx")
        shutil.rmtree(self.scratch, ignore_errors=True)

    def abort(self) -> None:
        for f in (self.bin, self.sizes):
            f.close()
        shutil.rmtree(self.scratch, ignore_errors=True)
