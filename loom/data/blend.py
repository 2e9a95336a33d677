"""A blend of datasets (`data.blend = [[weight, path], ...]`), mixed as Megatron mixes them.

The run's k-th sample comes from the source whose count so far falls furthest below
weight x max(k, 1) (the first such source on a tie): `build_blending_indices` of
megatron/core/datasets/helpers.cpp, tested against megatron-core's own build. Every source's
share is then within one sample of its weight at every step. Inside a source, its j-th sample is
sequence EpochOrder(n, seed, source + 1)(j): its own seeded order, each epoch shuffled anew, so a
small source repeats epoch after epoch.

The rule is sequential: the sources of samples [a, b) need the counts at sample a. The counts are
kept as the run goes (and saved in checkpoints, `state`); from nothing they are replayed from
sample 0, about a million samples a second.
"""
from __future__ import annotations

import numpy as np
import torch

from loom.data.batch import Batch
from loom.data.dataset import EpochOrder


def normalized(weights) -> list[float]:
    """Weights divided by their sum, as Megatron normalizes a blend's (float64)."""
    w = np.asarray(weights, dtype=np.float64)
    return (w / w.sum()).tolist()


class BlendSequence:
    """Which source each sample of the run comes from, and the how-manieth of that source it is."""

    def __init__(self, weights):
        self.weights = normalized(weights)
        self.at, self.drawn = 0, [0] * len(self.weights)

    def restore(self, at: int, drawn: list[int]) -> None:
        """Continue from sample `at`, with `drawn[i]` samples drawn from source i before it."""
        if len(drawn) != len(self.weights) or sum(drawn) != at:
            raise ValueError(f"blend state of {len(drawn)} sources at sample {at} does not fit this blend")
        self.at, self.drawn = at, list(drawn)

    def seek(self, sample: int) -> None:
        """Move to `sample` (forward by drawing, backward by replaying from sample 0)."""
        if sample < self.at:
            self.at, self.drawn = 0, [0] * len(self.weights)
        if sample > self.at:
            self.draw(sample - self.at)

    def draw(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `count` samples: (source [count] int64, index within its source [count] int64)."""
        w, drawn, k, n = self.weights, self.drawn, self.at, len(self.weights)
        sources = np.empty(count, dtype=np.int64)
        within = np.empty(count, dtype=np.int64)
        for j in range(count):
            x = float(k) if k > 1 else 1.0
            best, error = 0, w[0] * x - drawn[0]
            for i in range(1, n):
                e = w[i] * x - drawn[i]
                if e > error:
                    best, error = i, e
            sources[j], within[j] = best, drawn[best]
            drawn[best] += 1
            k += 1
        self.at = k
        return sources, within


class BlendedDataset:
    """Token datasets (one split of each source) read as one: `batch(samples)` takes the run's
    sample numbers (BatchSchedule over the identity order) and reads each from its source."""

    def __init__(self, names: list[str], weights, datasets: list, seed: int):
        self.names, self.datasets = names, datasets
        self.sequence = BlendSequence(weights)
        self.weights = self.sequence.weights
        self.orders = [EpochOrder(d.n_sequences, seed, i + 1) for i, d in enumerate(datasets)]
        self.seq_len = datasets[0].seq_len
        self.meta = datasets[0].meta
        self.n_sequences = sum(d.n_sequences for d in datasets)
        self._block = (0, np.zeros(0, np.int64), np.zeros(0, np.int64))  # (first sample, sources, within)

    @staticmethod
    def order(samples) -> np.ndarray:
        return np.asarray(samples, dtype=np.int64)

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source [N], sequence within it [N]) of run samples [N] (a contiguous range)."""
        samples = np.asarray(samples, dtype=np.int64)
        lo, hi = int(samples.min()), int(samples.max()) + 1
        first, sources, within = self._block
        if not (first <= lo and hi <= first + len(sources)):
            self.sequence.seek(lo)
            sources, within = self.sequence.draw(hi - lo)
            self._block = first, sources, within = lo, sources, within
        at = samples - first
        src, j = sources[at], within[at]
        seq = np.empty_like(j)
        for s in np.unique(src):
            seq[src == s] = self.orders[s](j[src == s])
        return src, seq

    def drawn_at(self, sample: int) -> list[int]:
        """Samples drawn from each source before run sample `sample`."""
        self.sequence.seek(sample)
        return list(self.sequence.drawn)

    def epochs(self, samples: int) -> list[float]:
        """How many epochs of each source the run's first `samples` samples ran."""
        return [d / ds.n_sequences for d, ds in zip(self.drawn_at(samples), self.datasets)]

    def mask_token(self) -> int | None:
        return self.datasets[0].mask_token()

    @property
    def attention_len(self) -> float:
        return float(sum(w * d.attention_len for w, d in zip(self.weights, self.datasets)))

    def batch(self, samples: np.ndarray, documents: bool = False, masking=None) -> Batch:
        """Run samples [N] as one Batch [N, S], each row read from its source."""
        src, seq = self.locate(samples)
        shape = (len(src), self.seq_len)
        inputs, labels = torch.empty(shape, dtype=torch.int64), torch.empty(shape, dtype=torch.int64)
        docs = torch.empty(shape, dtype=torch.int64) if documents else None
        for s in np.unique(src):
            at = torch.from_numpy(np.flatnonzero(src == s))
            part = self.datasets[s].batch(seq[at.numpy()], documents, masking)
            inputs[at], labels[at] = part.inputs, part.labels
            if docs is not None:
                docs[at] = part.documents
        return Batch(inputs, labels, docs)
