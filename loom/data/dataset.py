"""Memory-mapped token files and deterministic batches.

A prepared dataset is a folder:
    meta.json          {"vocab_size", "dtype", "eos_id", "splits": {"train": {...}, "val": {...}}}
    train.bin, val.bin token ids, documents back to back, each ended by eos_id
    train.docs.npy ... int64 start offset of every document (the index of boundaries)
    tokenizer.json     the tokenizer that produced the ids
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


from loom.data.batch import Batch, read_meta
from loom.data.integrity import IntegrityError, check_sizes, split_files, verified_max_tokens
from loom.settings import SettingError, need

BUILTIN_STDLIB = "builtin:python-stdlib"


class DataError(ValueError):
    """A dataset that cannot serve the run; the message is one line."""


def dataset_mask_token(path: str | Path) -> int | None:
    """The [MASK] id of the tokenizer a prepared dataset keeps (tokenizer.json), or None."""
    from loom.data.mlm import mask_token_id

    tokenizer = Path(path) / "tokenizer.json"
    return mask_token_id(tokenizer) if tokenizer.is_file() else None


class TokenDataset:
    """One split of a prepared dataset, cut into windows of seq_len + 1 tokens.

    Sequence i is tokens[i * seq_len : (i + 1) * seq_len + 1]: inputs are its first seq_len
    tokens, labels its last seq_len. Windows run across document boundaries (standard
    pretraining packing); `doc_starts` says where documents begin.
    """

    def __init__(self, path: str | Path, split: str, seq_len: int):
        self.path = Path(path)
        meta = read_meta(self.path)
        if split not in meta["splits"]:
            raise DataError(f"dataset {self.path} has no split {split!r}")
        self.meta = meta
        self.seq_len = seq_len
        try:  # a truncated or replaced file, before it is read
            check_sizes(self.path, meta)
        except IntegrityError as e:
            raise DataError(str(e)) from None
        self.tokens = np.memmap(self.path / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
        self.doc_starts = np.load(self.path / f"{split}.docs.npy")
        self.n_sequences = max(0, (len(self.tokens) - 1) // seq_len)
        if self.n_sequences == 0:
            raise DataError(
                f"train.seq_len={seq_len} is longer than the {split!r} split of {self.path} "
                f"({len(self.tokens)} tokens)"
            )

    @property
    def attention_len(self) -> float:
        """With packed documents, the sequence length whose full attention costs what the
        documents' attention costs, per token on average over the split's windows: the mean
        over windows of sum(piece lengths^2) / seq_len, a document cut by a window's edge
        counting as its pieces (what attention sees). Megatron's count for packed batches."""
        s, n = self.seq_len, self.n_sequences
        edges = np.union1d(np.clip(self.doc_starts, 0, n * s), np.arange(0, n * s + 1, s))
        pieces = np.diff(edges).astype(np.float64)
        window = edges[:-1] // s
        return float(np.bincount(window, weights=pieces**2, minlength=n).mean()) / s

    def sequences(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """indices [N] -> (inputs [N, S], labels [N, S]) int64."""
        s = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * s : i * s + s + 1]) for i in indices])
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def mask_token(self) -> int | None:
        """The [MASK] id of this dataset's tokenizer (masked-LM pretraining), or None."""
        return dataset_mask_token(self.path)

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
        doc = np.searchsorted(self.doc_starts, positions, side="right") - 1
        return Batch(inputs, labels, torch.from_numpy(doc.astype(np.int64)))


DATA_FORMATS = ("tokens", "sft")  # data.format: documents to pretrain on, or fine-tuning examples


def open_splits(path: str | Path, seq_len: int, progress: bool = True, data_format: str = "tokens",
                seed: int = 0) -> tuple:
    """(train, validation) of a prepared dataset or of `builtin:python-stdlib` (built on first
    use): TokenDatasets, or with data_format='sft' PackedExamples (loom.data.packing, packed
    with `seed`). Raises DataError when a split is too short for seq_len."""
    if data_format == "sft":
        from loom.data.packing import PackedExamples

        path = resolve_sft_path(path, progress)
        return PackedExamples(path, "train", seq_len, seed), PackedExamples(path, "val", seq_len, seed)
    if str(path) == BUILTIN_STDLIB:
        from loom.data.stdlib import builtin_dataset

        path = builtin_dataset(progress=progress)
    return TokenDataset(path, "train", seq_len), TokenDataset(path, "val", seq_len)


def resolve_sft_path(path: str | Path, progress: bool = True) -> Path:
    """The folder of an SFT dataset: `path`, or the embedded instruction set built on first use."""
    from loom.data.builtin_sft import BUILTIN_SFT, builtin_sft_dataset

    if str(path) == BUILTIN_SFT:
        return builtin_sft_dataset(progress=progress)
    return Path(path)


class BatchSchedule:
    """Which sequences make up each global batch: a fresh seeded permutation every epoch.

    Sample g of the run (g = step * global_batch + j) is sequence perm_e[g mod n] of epoch
    e = g // n, so the order depends only on (seed, n, global_batch) and any step can be
    reproduced without replaying the ones before it.
    """

    def __init__(self, n_sequences: int, global_batch: int, seed: int):
        self.n = n_sequences
        self.global_batch = global_batch
        self.seed = seed
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perm_cache[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        """Sequence indices [global_batch] of optimizer step `step` (0-based)."""
        g = step * self.global_batch + np.arange(self.global_batch)
        epochs, offsets = np.divmod(g, self.n)
        return np.array([self._perm(int(e))[int(o)] for e, o in zip(epochs, offsets)])

    def rank_indices(self, step: int, rank: int, n_ranks: int) -> np.ndarray:
        """This data-parallel rank's disjoint, contiguous slice of the global batch."""
        per_rank = self.global_batch // n_ranks
        return self.global_indices(step)[rank * per_rank : (rank + 1) * per_rank]


def data_vocab_size(data) -> int:
    """Vocabulary size of the [data] section's dataset, read without tokenizing anything."""
    from loom.data.stdlib import BUILTIN_VOCAB_SIZE

    if data.path == BUILTIN_STDLIB:
        return BUILTIN_VOCAB_SIZE
    return int(read_meta(data.path)["vocab_size"])


def _check_integrity(path: Path, meta: dict, model) -> None:
    """Sizes, and (on this machine's first use of the files) checksums and the largest token id
    against the model's vocabulary (loom.data.integrity)."""
    from loom.files import cache_dir

    try:
        largest = verified_max_tokens(path, meta, cache_dir() / "datasets.json")
    except IntegrityError as e:
        raise SettingError(str(e)) from None
    for split, top in largest.items():
        need(top < model.vocab_size, f"data.path={str(path)!r}: {split_files(split)[0]} holds token id {top:,}, "
                                     f"beyond model.vocab_size={model.vocab_size} (ids must be below it)")


def check_data_section(d, model, model_name: str) -> None:
    """The [data] section's own checks (no disk access)."""
    from loom.settings import one_of

    one_of("data.format", d.format, DATA_FORMATS)
    if d.format == "sft":
        need(model.causal, f"data.format='sft' trains on next tokens, which model.name={model_name!r} "
                           f"(bidirectional) does not predict; allowed with it: data.format='tokens'")
        need(d.path != BUILTIN_STDLIB, f"data.path={d.path!r} holds documents, not fine-tuning examples; allowed "
                                       f"with data.format='sft': 'builtin:python-stdlib-sft' or a folder written by "
                                       f"`loom prepare --format sft`")


def _check_sft_files(d, seq_len: int, model) -> None:
    """A prepared SFT dataset whose every example fits a sequence of seq_len."""
    from loom.data.builtin_sft import BUILTIN_SFT

    path = resolve_sft_path(d.path, progress=False)
    need(path.is_dir() and (path / "meta.json").is_file(),
         f"data.path={d.path!r} is not a prepared dataset (no {path / 'meta.json'}); allowed with data.format='sft': "
         f"{BUILTIN_SFT!r} or a folder written by `loom prepare --format sft`")
    meta = read_meta(path)
    need(meta.get("format") == "sft", f"data.path={d.path!r} holds documents (`loom prepare`), not fine-tuning "
                                      f"examples; allowed: data.format='tokens' for it, or a folder written by "
                                      f"`loom prepare --format sft`")
    for split, info in meta["splits"].items():
        need(info["examples"] > 0, f"data.path={d.path!r}: its {split} split holds no examples")
        need(info["max_example"] - 1 <= seq_len,
             f"train.seq_len={seq_len} is shorter than the longest {split} example of data.path={d.path!r} "
             f"({info['max_example']} tokens, so {info['max_example'] - 1} (input, label) pairs); allowed: "
             f"train.seq_len >= {info['max_example'] - 1}, or prepare with --seq-len={seq_len}")
    _check_integrity(path, meta, model)


def check_data_files(d, seq_len: int, model, model_name: str) -> None:
    """The [data] section against the disk, before anything starts: a prepared dataset long
    enough for seq_len, a tokenizer file, a vocabulary the model covers, and a [MASK] token
    where the model trains on masked-LM targets (bidirectional models)."""
    if d.format == "sft":
        _check_sft_files(d, seq_len, model)
    elif d.path != BUILTIN_STDLIB:
        need(Path(d.path).is_dir() and (Path(d.path) / "meta.json").is_file(),
             f"data.path={d.path!r} is not a prepared dataset (no {Path(d.path) / 'meta.json'}); "
             f"allowed: {BUILTIN_STDLIB!r} or a folder written by `loom prepare`")
        meta = read_meta(d.path)
        need(meta.get("format", "tokens") == "tokens",
             f"data.path={d.path!r} holds fine-tuning examples (`loom prepare --format sft`); allowed: "
             f"data.format='sft' for it, or a dataset of documents (`loom prepare` without --format sft)")
        for split, info in meta["splits"].items():
            need(info["tokens"] > seq_len,
                 f"train.seq_len={seq_len} is longer than the {split} split of data.path={d.path!r} "
                 f"({info['tokens']} tokens)")
        _check_integrity(Path(d.path), meta, model)
    if d.tokenizer:
        need(Path(d.tokenizer).is_file(), f"data.tokenizer={d.tokenizer!r}: no such file")
    if d.format == "sft":
        return  # its vocabulary was checked against the model with its token ids
    vocab = data_vocab_size(d)
    need(model.vocab_size >= vocab,
         f"model.vocab_size={model.vocab_size} is smaller than the vocabulary ({vocab}) of data.path={d.path!r}")
    if not model.causal and d.path != BUILTIN_STDLIB:  # the builtin tokenizer has [MASK]
        from loom.data.mlm import MASK_TOKEN

        need(dataset_mask_token(d.path) is not None,
             f"data.path={d.path!r}: its tokenizer has no {MASK_TOKEN} token, which masked-LM training of "
             f"model.name={model_name!r} needs; allowed: a dataset whose tokenizer has {MASK_TOKEN}")
