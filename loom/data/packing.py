"""Fine-tuning examples packed into training sequences (`data.format = "sft"`).

An example of n tokens gives n - 1 (input, label) pairs: inputs are its tokens but the last,
labels its tokens but the first, and a label counts only where the prepared loss mask marks its
token (an answer token), else it is IGNORE_INDEX. So labels never cross an example boundary.
Examples are packed into sequences of seq_len pairs by first-fit-decreasing (NeMo's default);
the rest of a sequence is padding (EOS inputs, ignored labels) in a document of its own, so
that attention, which never crosses documents, keeps every example to itself.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from loom.data.batch import Batch, read_meta
from loom.data.mlm import IGNORE_INDEX


def first_fit_decreasing(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """Bins of example indices, each holding at most `capacity` of their lengths: examples by
    decreasing length (equal lengths in an order drawn from `seed`), each into the first bin
    with room. The same lengths and seed give the same bins."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example of {max(lengths)} exceeds the capacity {capacity}")
    tie_order = np.random.default_rng(seed).permutation(len(lengths))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tie_order[i]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


class PackedExamples:
    """One split of a prepared SFT dataset (loom.data.sft), packed into sequences of seq_len."""

    def __init__(self, path: str | Path, split: str, seq_len: int, seed: int):
        path = Path(path)
        meta = read_meta(path)
        self.seq_len, self.eos = seq_len, meta["eos_id"]
        self.tokens = np.memmap(path / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
        self.mask = np.memmap(path / f"{split}.mask.bin", dtype=np.uint8, mode="r")
        starts = np.load(path / f"{split}.docs.npy")
        self.bounds = list(zip(starts.tolist(), [*starts[1:].tolist(), len(self.tokens)]))
        pairs = [b - a - 1 for a, b in self.bounds]
        self.sequences = first_fit_decreasing(pairs, seq_len, seed)
        self.pairs = sum(pairs)
        # Per example, the labels that count: mask[p + 1] for p in [a, b - 1).
        counted = np.concatenate([[0], np.cumsum(self.mask, dtype=np.int64)])
        per_example = np.array([counted[b] - counted[a + 1] for a, b in self.bounds], dtype=np.int64)
        # Per packed sequence: its answer tokens, and the sum of its examples' squared lengths
        # (attention FLOPs are per example, as Megatron counts packed batches).
        self.targets = np.array([per_example[s].sum() for s in self.sequences], dtype=np.int64)
        self.squares = np.array([sum(pairs[i] ** 2 for i in s) for s in self.sequences], dtype=np.int64)
        self.meta = meta

    @property
    def n_sequences(self) -> int:
        return len(self.sequences)

    @property
    def efficiency(self) -> float:
        """Real (input, label) pairs over the slots of all packed sequences."""
        return self.pairs / max(1, self.n_sequences * self.seq_len)

    @property
    def attention_len(self) -> float:
        """The sequence length whose full attention costs what the examples' attention costs,
        per packed token on average: mean over sequences of sum(n_i^2) / seq_len."""
        return float(self.squares.mean()) / self.seq_len

    def answer_tokens(self, indices: np.ndarray) -> int:
        """Labels that carry loss in packed sequences `indices`."""
        return int(self.targets[np.asarray(indices, dtype=np.int64)].sum())

    def mask_token(self) -> None:
        return None  # fine-tuning targets are next tokens, never masked-LM ones

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs, labels, documents) [seq_len] of packed sequence i."""
        inputs = np.full(self.seq_len, self.eos, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        documents = np.empty(self.seq_len, dtype=np.int64)
        at = 0
        for doc, example in enumerate(self.sequences[i]):
            a, b = self.bounds[example]
            n = b - a - 1
            tokens = np.asarray(self.tokens[a:b], dtype=np.int64)
            inputs[at : at + n] = tokens[:-1]
            labels[at : at + n] = np.where(self.mask[a + 1 : b] != 0, tokens[1:], IGNORE_INDEX)
            documents[at : at + n] = doc
            at += n
        documents[at:] = len(self.sequences[i])  # the padding: a document of its own
        return inputs, labels, documents

    def batch(self, indices: np.ndarray, documents: bool = True, masking=None) -> Batch:
        """Packed sequences `indices` as a Batch [N, seq_len], always with their documents
        (examples); `documents` and `masking` are TokenDataset.batch's, and do not apply."""
        rows = [self.sequence(int(i)) for i in indices]
        inputs, labels, documents = (torch.from_numpy(np.stack(x)) for x in zip(*rows))
        return Batch(inputs, labels, documents)
