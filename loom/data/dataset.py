"""Token datasets a run reads, and the order it reads their sequences in.

`data.path` names one of:
    a folder written by `loom prepare`:
        meta.json            {"vocab_size", "dtype", "eos_id", "splits": {...}, "files": {...}}
        train.bin, val.bin   token ids, documents back to back, each ended by eos_id
        train.docs.npy ...   int64 start offset of every document
      or, prepared in shards, shards/NNNNN/{train,val}.{bin,docs.npy} ("shards": their count)
        tokenizer.json       the tokenizer that produced the ids
    a Megatron/NeMo indexed dataset prefix (prefix.bin + prefix.idx, loom.data.megatron)
    builtin:python-stdlib    the embedded corpus, built on first use
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from loom.data.batch import Batch, read_meta
from loom.data.integrity import IntegrityError, check_sizes, shard_files
from loom.data.megatron import MegatronFormatError, MegatronIndex, is_megatron_prefix
from loom.data.permutation import KeyedPermutation
from loom.data.tokens import LoomSplitFile, TokenStream, megatron_splits

BUILTIN_STDLIB = "builtin:python-stdlib"
ATTENTION_LEN_WINDOWS = 4096  # windows the packed attention length is measured on (all, if fewer)


class DataError(ValueError):
    """A dataset that cannot serve the run; the message is one line."""


def tokenizer_file(path: str | Path, tokenizer: str = "") -> Path | None:
    """The tokenizer.json of a dataset: `tokenizer` if given, else the one a prepared folder keeps."""
    if tokenizer:
        return Path(tokenizer)
    own = Path(path) / "tokenizer.json"
    return own if own.is_file() else None


def dataset_mask_token(path: str | Path, tokenizer: str = "") -> int | None:
    """The [MASK] id of a dataset's tokenizer, or None."""
    from loom.data.mlm import mask_token_id

    file = tokenizer_file(path, tokenizer)
    return mask_token_id(file) if file is not None and file.is_file() else None


def open_megatron(prefix: str | Path) -> MegatronIndex:
    """A Megatron dataset's index, or a one-line DataError naming data.path."""
    try:
        return MegatronIndex(prefix)
    except MegatronFormatError as e:
        raise DataError(f"data.path={str(prefix)!r}: {e}") from None


def megatron_meta(index: MegatronIndex, splits: tuple, tokenizer: str = "") -> dict:
    """What loom knows of a Megatron dataset: its token dtype, its splits' token counts (splits:
    megatron_splits(index)), and from `tokenizer` (data.tokenizer) the vocabulary size; the .idx
    records neither a vocabulary nor an end-of-document id."""
    vocab = None
    if tokenizer and Path(tokenizer).is_file():
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(tokenizer)).get_vocab_size()
    return {"format": "tokens", "source_format": "megatron", "vocab_size": vocab, "dtype": index.dtype.name,
            "eos_id": None, "splits": {name: {"tokens": len(span.tokens), "documents": span.n_documents}
                                       for name, span in zip(("train", "val"), splits)}}


def open_stream(path: str | Path, split: str, tokenizer: str = "") -> tuple[TokenStream, dict]:
    """A split's token stream and the dataset's meta, for a prepared folder or a Megatron prefix."""
    if is_megatron_prefix(path):
        index = open_megatron(path)
        train, val = megatron_splits(index)
        return TokenStream([train if split == "train" else val]), megatron_meta(index, (train, val), tokenizer)
    path = Path(path)
    meta = read_meta(path)
    if split not in meta["splits"]:
        raise DataError(f"dataset {path} has no split {split!r}")
    try:  # a truncated or replaced file, before it is read
        check_sizes(path, meta)
    except IntegrityError as e:
        raise DataError(str(e)) from None
    spans = [LoomSplitFile(path / tokens, path / starts, meta["dtype"]) for tokens, starts in shard_files(meta, split)]
    return TokenStream(spans), meta


class TokenDataset:
    """One split of a dataset, cut into windows of seq_len + 1 tokens.

    Sequence i is tokens[i * seq_len : (i + 1) * seq_len + 1]: inputs are its first seq_len
    tokens, labels its last seq_len. Windows run across document boundaries (standard
    pretraining packing); `stream.document_of` says which document a token belongs to.
    """

    def __init__(self, path: str | Path, split: str, seq_len: int, tokenizer: str = ""):
        self.path, self.split, self.tokenizer = Path(path), split, tokenizer
        self.stream, self.meta = open_stream(path, split, tokenizer)
        self.seq_len = seq_len
        self.n_sequences = max(0, (len(self.stream) - 1) // seq_len)
        if self.n_sequences == 0:
            raise DataError(f"train.seq_len={seq_len} is longer than the {split!r} split of {self.path} "
                            f"({len(self.stream)} tokens)")

    @property
    def attention_len(self) -> float:
        """With packed documents, the sequence length whose full attention costs what the
        documents' attention costs, per token: the mean over windows of sum(piece lengths^2) /
        seq_len, a document cut by a window's edge counting as its pieces (what attention sees);
        Megatron's count for packed batches. Measured on every window, or on ATTENTION_LEN_WINDOWS
        evenly spaced ones of a larger split (its cost must not grow with the data)."""
        s, n = self.seq_len, self.n_sequences
        windows = np.unique(np.linspace(0, n - 1, min(n, ATTENTION_LEN_WINDOWS)).astype(np.int64))
        total = 0.0
        for chunk in np.array_split(windows, max(1, len(windows) * s // (1 << 22))):
            docs = self.stream.document_of(chunk[:, None] * s + np.arange(s))  # [W, S]
            starts = np.ones(docs.shape, dtype=bool)
            starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
            edges = np.flatnonzero(np.append(starts.ravel(), True))
            pieces = np.diff(edges).astype(np.float64)
            total += float((pieces**2).sum())
        return total / len(windows) / s

    def sequences(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """indices [N] -> (inputs [N, S], labels [N, S]) int64."""
        s = self.seq_len
        rows = np.stack([self.stream.read(int(i) * s, int(i) * s + s + 1) for i in indices])
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def mask_token(self) -> int | None:
        """The [MASK] id of this dataset's tokenizer (masked-LM pretraining), or None."""
        return dataset_mask_token(self.path, self.tokenizer)

    def batch(self, indices: np.ndarray, documents: bool = False, masking=None) -> Batch:
        """The sequences `indices` as a Batch; with documents=True, which document each input
        token belongs to (a document runs from its first token to its eos token). With masking
        (a loom.data.mlm.MaskingSpec) the targets are masked-LM ones: the inputs are the
        sequence with chosen tokens masked, the labels those tokens (IGNORE_INDEX elsewhere)."""
        inputs, labels = self.sequences(indices)
        if masking is not None:
            from loom.data.mlm import mask_batch

            inputs, labels = mask_batch(inputs.numpy(), indices, masking)
        if not documents:
            return Batch(inputs, labels)
        s = self.seq_len
        positions = np.asarray(indices, dtype=np.int64)[:, None] * s + np.arange(s)
        return Batch(inputs, labels, torch.from_numpy(self.stream.document_of(positions)))


DATA_FORMATS = ("tokens", "sft")  # data.format: documents to pretrain on, or fine-tuning examples


def open_splits(path: str | Path, seq_len: int, progress: bool = True, data_format: str = "tokens",
                seed: int = 0, tokenizer: str = "") -> tuple:
    """(train, validation) of a prepared dataset, a Megatron prefix or `builtin:python-stdlib`
    (built on first use): TokenDatasets, or with data_format='sft' PackedExamples
    (loom.data.packing, packed with `seed`). Raises DataError when a split is too short."""
    if data_format == "sft":
        from loom.data.packing import PackedExamples

        path = resolve_sft_path(path, progress)
        return PackedExamples(path, "train", seq_len, seed), PackedExamples(path, "val", seq_len, seed)
    path = resolve_builtin(path, progress)
    return TokenDataset(path, "train", seq_len, tokenizer), TokenDataset(path, "val", seq_len, tokenizer)


def resolve_builtin(path: str | Path, progress: bool = True) -> str | Path:
    """The folder of a builtin corpus (built on first use), or `path` itself."""
    from loom.data import stdlib

    if str(path) == BUILTIN_STDLIB:
        return stdlib.builtin_dataset(progress=progress)
    if str(path) == stdlib.BUILTIN_DOCS:
        return stdlib.builtin_docs_dataset(progress=progress)
    return path


def resolve_sft_path(path: str | Path, progress: bool = True) -> Path:
    """The folder of an SFT dataset: `path`, or the embedded instruction set built on first use."""
    from loom.data.builtin_sft import BUILTIN_SFT, builtin_sft_dataset

    if str(path) == BUILTIN_SFT:
        return builtin_sft_dataset(progress=progress)
    return Path(path)


class EpochOrder:
    """The run's sample k over n sequences: sequence perm(seed, e)(k mod n) of epoch e = k // n,
    each epoch a fresh keyed permutation (loom.data.permutation) computed index by index, so
    any sample can be found without the ones before it and nothing grows with n."""

    def __init__(self, n: int, seed: int, stream: int = 0):
        self.n, self.key = n, (seed, stream)

    def __call__(self, samples) -> np.ndarray:
        epochs, offsets = np.divmod(np.asarray(samples, dtype=np.int64), self.n)
        out = np.empty_like(offsets)
        for e in np.unique(epochs):
            at = epochs == e
            out[at] = KeyedPermutation(self.n, (*self.key, int(e)))(offsets[at])
        return out


class BatchSchedule:
    """Which samples make up each global batch: samples step * global_batch ... of an order (an
    EpochOrder, or a blend's identity), so any step is reproduced without replaying the ones
    before it and does not depend on the layout."""

    def __init__(self, order, global_batch: int):
        self.order, self.global_batch = order, global_batch

    def global_indices(self, step: int) -> np.ndarray:
        """Sample indices [global_batch] of optimizer step `step` (0-based)."""
        return self.order(step * self.global_batch + np.arange(self.global_batch))

    def rank_indices(self, step: int, rank: int, n_ranks: int) -> np.ndarray:
        """This data-parallel rank's disjoint, contiguous slice of the global batch."""
        per_rank = self.global_batch // n_ranks
        return self.global_indices(step)[rank * per_rank : (rank + 1) * per_rank]
