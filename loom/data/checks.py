"""The [data] section's checks, made before any worker starts: each a one-line SettingError
naming the key, the value and what is allowed."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from loom.data.batch import read_meta
from loom.data.dataset import BUILTIN_STDLIB, DATA_FORMATS, DataError, dataset_mask_token, megatron_meta, \
    open_megatron, resolve_sft_path, tokenizer_file
from loom.data.integrity import IntegrityError, verified_max_tokens
from loom.data.megatron import is_megatron_prefix
from loom.data.tokens import megatron_splits
from loom.data.stdlib import BUILTIN_DOCS
from loom.settings import SettingError, need, one_of

BUILTIN_CORPORA = (BUILTIN_STDLIB, BUILTIN_DOCS)

def blend_sources(d) -> list[str]:
    """The dataset paths a run reads: data.blend's, or data.path."""
    return [str(path) for _, path in d.blend] if d.blend else [d.path]


def check_blend_section(d) -> None:
    """data.blend: [[weight, path], ...] with positive weights, and data.path left at its default."""
    shown = f"data.blend={json.dumps(d.blend)}"
    for entry in d.blend:
        need(isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str),
             f"{shown}: each entry must be [weight, path]; got {entry!r}")
        weight = entry[0]
        need(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0 and weight < float("inf"),
             f"{shown}: the weight of {entry[1]!r} is {weight!r}; allowed: a positive number")
    paths = [p for _, p in d.blend]
    need(len(set(paths)) == len(paths), f"{shown}: a source is listed twice; allowed: each path once")
    need(d.path == BUILTIN_STDLIB, f"data.path={d.path!r} and data.blend are both set; allowed: one of them "
                                   f"(a one-source run is data.path, or data.blend with one entry)")
    need(d.format == "tokens", f"data.blend with data.format={d.format!r}; allowed: data.format='tokens'")


def check_data_section(d, model, model_name: str) -> None:
    """The [data] section's own checks (no disk access)."""
    one_of("data.format", d.format, DATA_FORMATS)
    if d.blend:
        check_blend_section(d)
    if d.format == "sft":
        need(model.causal, f"data.format='sft' trains on next tokens, which model.name={model_name!r} "
                           f"(bidirectional) does not predict; allowed with it: data.format='tokens'")
        need(d.path != BUILTIN_STDLIB, f"data.path={d.path!r} holds documents, not fine-tuning examples; allowed "
                                       f"with data.format='sft': 'builtin:python-stdlib-sft' or a folder written by "
                                       f"`loom prepare --format sft`")


def source_meta(path: str, key: str, tokenizer: str = "") -> dict:
    """meta of a prepared folder or a Megatron prefix (`key` names the setting in errors)."""
    if is_megatron_prefix(path):
        try:
            index = open_megatron(path)
            return megatron_meta(index, megatron_splits(index), tokenizer)
        except DataError as e:
            raise SettingError(str(e).replace("data.path", key, 1)) from None
    need(Path(path).is_dir() and (Path(path) / "meta.json").is_file(),
         f"{key}={path!r} is not a dataset (no {Path(path) / 'meta.json'}, and no {path}.bin + {path}.idx); allowed: "
         f"{BUILTIN_STDLIB!r}, a folder written by `loom prepare`, or a Megatron prefix (name.bin + name.idx)")
    return read_meta(path)


def _check_integrity(path: Path, meta: dict, model, key: str) -> None:
    """Sizes, and (on this machine's first use of the files) checksums and the largest token id
    against the model's vocabulary (loom.data.integrity)."""
    from loom.files import cache_dir

    try:
        largest = verified_max_tokens(path, meta, cache_dir() / "datasets.json")
    except IntegrityError as e:
        raise SettingError(str(e).replace("data.path", key, 1)) from None
    for split, top in largest.items():
        need(top < model.vocab_size, f"{key}={str(path)!r}: its {split} split holds token id {top:,}, "
                                     f"beyond model.vocab_size={model.vocab_size} (ids must be below it)")


def _check_token_source(path: str, key: str, d, seq_len: int, model) -> dict:
    """One dataset of documents: readable, both splits longer than a sequence, ids the model covers."""
    meta = source_meta(path, key, d.tokenizer)
    need(meta.get("format", "tokens") == "tokens",
         f"{key}={path!r} holds fine-tuning examples (`loom prepare --format sft`); allowed: data.format='sft' "
         f"for it, or a dataset of documents (`loom prepare` without --format sft)")
    for split in ("train", "val"):
        n = meta["splits"][split]["tokens"]
        need(n > seq_len, f"train.seq_len={seq_len} is longer than the {split} split of {key}={path!r} "
                          f"({n:,} tokens); allowed: a source of at least one sequence in each split")
    if not is_megatron_prefix(path):
        _check_integrity(Path(path), meta, model, key)
    vocab = meta["vocab_size"]
    need(vocab is None or model.vocab_size >= vocab,
         f"model.vocab_size={model.vocab_size} is smaller than the vocabulary ({vocab}) of {key}={path!r}")
    return meta


def tokenizer_identity(path: str, d) -> str | None:
    """A digest of a source's tokenizer (its tokenizer.json, or data.tokenizer), None if unknown."""
    if path in BUILTIN_CORPORA:
        return "builtin"
    file = tokenizer_file(path, d.tokenizer if is_megatron_prefix(path) else "")
    return hashlib.sha256(file.read_bytes()).hexdigest() if file is not None and file.is_file() else None


def _check_blend_files(d, seq_len: int, model) -> None:
    """Every source readable and long enough, and all of one tokenizer and vocabulary."""
    metas = {}
    for weight, path in d.blend:
        if path not in BUILTIN_CORPORA:
            metas[path] = _check_token_source(path, f"data.blend source {path!r}: data.path", d, seq_len, model)
    tokenizers = {path: tokenizer_identity(path, d) for _, path in d.blend}
    known = {p: t for p, t in tokenizers.items() if t is not None}
    first = next(iter(known), None)
    for path, digest in known.items():
        need(digest == known[first], f"data.blend mixes tokenizers: {first!r} and {path!r} were prepared with different "
                                     f"tokenizer.json files; allowed: sources of one tokenizer")
    vocabs = {p: m["vocab_size"] for p, m in metas.items() if m.get("vocab_size") is not None}
    need(len(set(vocabs.values())) <= 1, f"data.blend mixes vocabularies: {vocabs}; allowed: sources of one tokenizer")


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
    _check_integrity(path, meta, model, "data.path")


def check_data_files(d, seq_len: int, model, model_name: str) -> None:
    """The [data] section against the disk, before anything starts: datasets long enough for
    seq_len, a tokenizer file, a vocabulary the model covers, one tokenizer across a blend, and
    a [MASK] token where the model trains on masked-LM targets (bidirectional models)."""
    if d.tokenizer:
        need(Path(d.tokenizer).is_file(), f"data.tokenizer={d.tokenizer!r}: no such file")
    if d.format == "sft":
        _check_sft_files(d, seq_len, model)
        return  # its vocabulary was checked against the model with its token ids
    if d.blend:
        _check_blend_files(d, seq_len, model)
    elif d.path not in BUILTIN_CORPORA:
        _check_token_source(d.path, "data.path", d, seq_len, model)
    else:
        from loom.data.stdlib import BUILTIN_VOCAB_SIZE

        need(model.vocab_size >= BUILTIN_VOCAB_SIZE, f"model.vocab_size={model.vocab_size} is smaller than the "
                                                     f"vocabulary ({BUILTIN_VOCAB_SIZE}) of data.path={d.path!r}")
    if not model.causal:  # the builtin tokenizer has [MASK]
        from loom.data.mlm import MASK_TOKEN

        for path in blend_sources(d):
            need(path in BUILTIN_CORPORA or dataset_mask_token(path, d.tokenizer) is not None,
                 f"data.path={path!r}: its tokenizer has no {MASK_TOKEN} token, which masked-LM training of "
                 f"model.name={model_name!r} needs; allowed: a dataset whose tokenizer has {MASK_TOKEN}")

