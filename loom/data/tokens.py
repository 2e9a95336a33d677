"""Token streams: a split's tokens as one memory-mapped sequence with its document boundaries,
whatever the files behind it.

    TokenSpan    one token file and its document starts: a loom split file (`train.bin` +
                 `train.docs.npy`) or a token range of a Megatron indexed dataset
    TokenStream  spans back to back (the shards of a prepared dataset), read as one

Nothing here grows with the data: token files and document indexes are memory-mapped, and a
document is found by binary search.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from loom.data.megatron import MegatronIndex

MEGATRON_VAL_FRACTION = 0.01  # a Megatron dataset's validation split: its documents past 99% of its tokens


class TokenSpan:
    """Tokens [T] (memory-mapped) and document_of(positions [N]) -> document index [N]."""

    tokens: np.ndarray
    n_documents: int

    def document_of(self, positions: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class LoomSplitFile(TokenSpan):
    """A split file written by `loom prepare`: token ids, and the int64 start of every document."""

    def __init__(self, tokens_path: Path, starts_path: Path, dtype):
        self.tokens = np.memmap(tokens_path, dtype=np.dtype(dtype), mode="r") if tokens_path.stat().st_size else \
            np.zeros(0, np.dtype(dtype))
        self.starts = np.load(starts_path, mmap_mode="r")
        self.n_documents = len(self.starts)

    def document_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, positions, side="right") - 1


class MegatronRange(TokenSpan):
    """Documents [first, last) of a Megatron indexed dataset."""

    def __init__(self, index: MegatronIndex, first: int, last: int):
        self.index, self.first = index, first
        lo, hi = (int(x) for x in index.document_start(np.array([first, last])))
        self.lo = lo
        self.tokens = index.tokens[lo:hi]
        self.n_documents = last - first

    def document_of(self, positions: np.ndarray) -> np.ndarray:
        return self.index.document_of(np.asarray(positions, dtype=np.int64) + self.lo) - self.first


def megatron_splits(index: MegatronIndex) -> tuple[MegatronRange, MegatronRange]:
    """(train, validation) of a Megatron dataset: validation holds its last documents, from the
    one holding the token at 99% of the dataset on (so at least 1% of its tokens), train the
    ones before. (Megatron splits by its own `--split`; loom needs one held-out split.)"""
    n = index.n_documents
    cut_token = min(int(len(index.tokens) * (1 - MEGATRON_VAL_FRACTION)), max(len(index.tokens) - 1, 0))
    cut = int(index.document_of(np.array([cut_token]))[0]) if len(index.tokens) else 0
    cut = min(max(cut, 0), max(n - 1, 0))
    return MegatronRange(index, 0, cut), MegatronRange(index, cut, n)


class TokenStream:
    """Spans back to back as one stream of tokens [T] and documents."""

    def __init__(self, spans: list[TokenSpan]):
        self.spans = spans
        self.offsets = np.cumsum([0] + [len(s.tokens) for s in spans])  # [n_spans + 1]
        self.document_bases = np.cumsum([0] + [s.n_documents for s in spans])
        self.n_documents = int(self.document_bases[-1])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def dtype(self) -> np.dtype:
        return self.spans[0].tokens.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [stop - start] of positions [start, stop)."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < stop:
            span, base = self.spans[first], int(self.offsets[first])
            end = min(stop, int(self.offsets[first + 1]))
            parts.append(np.asarray(span.tokens[start - base:end - base]))
            start, first = end, first + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def document_of(self, positions: np.ndarray) -> np.ndarray:
        """The document (numbered across spans) [N] of each position [N]."""
        positions = np.asarray(positions, dtype=np.int64)
        span = np.searchsorted(self.offsets, positions, side="right") - 1
        out = np.empty(positions.shape, dtype=np.int64)
        for s in np.unique(span):
            at = span == s
            out[at] = self.spans[s].document_of(positions[at] - self.offsets[s]) + self.document_bases[s]
        return out
