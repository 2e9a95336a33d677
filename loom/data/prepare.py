"""Text files -> a prepared token dataset (see loom.data.dataset for the format)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from loom.data.integrity import split_files
from loom.files import file_record

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")


class PrepareError(ValueError):
    pass


def find_text_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))


def iter_documents(files: Iterable[Path], root: Path) -> Iterator[tuple[str, str]]:
    """(document id, text) for every .txt file and every line of every .jsonl file."""
    for path in files:
        rel = path.relative_to(root).as_posix() if root.is_dir() else path.name
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise PrepareError(
                            f"{path}:{n + 1} is not a JSON object with a 'text' field"
                        ) from None
                    yield f"{rel}:{n}", text
        else:
            yield rel, path.read_text(encoding="utf-8", errors="replace")


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Deterministic held-out choice by a hash of the document's id (stable across runs)."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
    return h / 2**64 < val_fraction


def find_eos(tokenizer) -> int:
    for name in EOS_CANDIDATES:
        i = tokenizer.token_to_id(name)
        if i is not None:
            return i
    raise PrepareError(
        f"the tokenizer has none of the end-of-document tokens {', '.join(EOS_CANDIDATES)}"
    )


def token_dtype(vocab_size: int) -> type:
    """The smallest unsigned integer type of the token files for a vocabulary."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


@contextlib.contextmanager
def atomic_folder(output: Path):
    """A temporary sibling of `output` to write into, renamed to `output` when the block ends
    without error and removed otherwise: an interrupted run never leaves a half-written
    dataset behind."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        yield tmp
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_inputs(input_path: Path, tokenizer_path: str | Path, output: Path, val_fraction: float):
    """The checks every `loom prepare` makes of its paths and split (one-line PrepareErrors),
    then the tokenizer, which must have an end-of-document token."""
    from tokenizers import Tokenizer

    if not input_path.exists():
        raise PrepareError(f"--input={str(input_path)!r}: no such file or folder")
    if not Path(tokenizer_path).is_file():
        raise PrepareError(f"--tokenizer={str(tokenizer_path)!r}: no such file")
    if output.exists():
        raise PrepareError(f"--output={str(output)!r} already exists; allowed: a new path")
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"--val-fraction={val_fraction} must be in [0, 1)")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise PrepareError(f"--tokenizer={str(tokenizer_path)!r} is not a tokenizer.json: {e}") from None
    find_eos(tokenizer)
    return tokenizer


def prepare(
    input_path: str | Path,
    tokenizer_path: str | Path,
    output: str | Path,
    val_fraction: float = 0.01,
    progress: bool = True,
) -> dict:
    """`loom prepare`: every .txt / .jsonl document under input_path -> a dataset at output."""
    input_path, output = Path(input_path), Path(output)
    tokenizer = open_inputs(input_path, tokenizer_path, output, val_fraction)
    files = find_text_files(input_path)
    if not files:
        raise PrepareError(f"--input={str(input_path)!r} holds no .txt or .jsonl files")
    return write_dataset(
        iter_documents(files, input_path), tokenizer, output, val_fraction,
        source=str(input_path), progress=progress,
    )


def write_dataset(
    documents: Iterable[tuple[str, str]],
    tokenizer,
    output: Path,
    val_fraction: float,
    source: str,
    batch_docs: int = 256,
    progress: bool = True,
) -> dict:
    """Tokenize (id, text) documents, end each with EOS, split train/val by id; write atomically.

    The output folder appears only once complete (written to a temporary sibling, then renamed),
    so an interrupted run never leaves a half-written dataset behind.
    """
    from tqdm import tqdm

    eos = find_eos(tokenizer)
    vocab = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab)
    with atomic_folder(output) as tmp:
        outs = {s: open(tmp / f"{s}.bin", "wb") for s in ("train", "val")}
        starts: dict[str, list[int]] = {"train": [], "val": []}
        sizes = {"train": 0, "val": 0}
        largest = {"train": -1, "val": -1}

        def flush(batch: list[tuple[str, str]]) -> None:
            encoded = tokenizer.encode_batch([text for _, text in batch], add_special_tokens=False)
            for (doc_id, _), enc in zip(batch, encoded):
                split = "val" if is_validation(doc_id, val_fraction) else "train"
                ids = np.asarray(enc.ids + [eos], dtype=dtype)
                largest[split] = max(largest[split], int(ids.max()))
                starts[split].append(sizes[split])
                sizes[split] += len(ids)
                outs[split].write(ids.tobytes())

        batch: list[tuple[str, str]] = []
        for doc in tqdm(documents, desc="tokenizing", unit="doc", disable=not progress, leave=False):
            batch.append(doc)
            if len(batch) == batch_docs:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        for f in outs.values():
            f.close()
        for split in ("train", "val"):
            np.save(tmp / f"{split}.docs.npy", np.asarray(starts[split], dtype=np.int64))
        tokenizer.save(str(tmp / "tokenizer.json"))
        splits = {s: {"tokens": sizes[s], "documents": len(starts[s]), "max_token": largest[s]} for s in ("train", "val")}
        meta = _dataset_meta(tmp, vocab, dtype, eos, val_fraction, source, splits)
    return meta


def _dataset_meta(folder: Path, vocab: int, dtype, eos: int, val_fraction: float, source: str, splits: dict) -> dict:
    """meta.json of a token dataset whose files are written in `folder`: written, and returned."""
    meta = {
        "vocab_size": vocab,
        "dtype": np.dtype(dtype).name,
        "eos_id": eos,
        "val_fraction": val_fraction,
        "source": source,
        "splits": splits,
        # What a run checks before using the files (loom.data.integrity).
        "files": {name: file_record(folder / name) for s in ("train", "val") for name in split_files(s)},
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta
