"""`loom prepare`: documents -> a prepared token dataset (format: loom.data.dataset), or a
Megatron indexed dataset (--output-format megatron).

    inputs     find the files, check what can be checked, cut them into shards (loom.data.inputs)
    tokenizer  its tokenizer.json and the BOS/EOS around documents (loom.data.special_tokens)
    shards     tokenized by --workers processes, each written atomically (loom.data.shards) into
               .NAME.partial/, which a rerun with the same arguments continues
    manifest   meta.json over the shards; the folder is renamed to NAME when complete
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from loom.data.inputs import PrepareError, Shard, check_inputs, find_inputs, plan_shards
from loom.data.integrity import split_files
from loom.data.shards import SPLITS, ShardProgress, ShardSpec, is_validation, write_shard
from loom.data.special_tokens import DocumentTokens, document_tokens, load_tokenizer
from loom.files import file_record

OUTPUT_FORMATS = ("loom", "megatron")
__all__ = ["PrepareError", "is_validation", "prepare", "write_dataset"]


def find_eos(tokenizer) -> int:
    """The end-of-document id of a tokenizer (the first of EOS_CANDIDATES it has)."""
    from loom.data.special_tokens import EOS_CANDIDATES, guessed_eos

    eos = guessed_eos(tokenizer)
    if eos is None:
        raise PrepareError(f"the tokenizer has none of the end-of-document tokens {', '.join(EOS_CANDIDATES)}")
    return eos


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
    check_arguments(input_path, output, val_fraction, workers=1, output_format="loom")
    tokenizer, _ = load_tokenizer(tokenizer_path)
    find_eos(tokenizer)
    return tokenizer


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


def check_arguments(input_path: Path, output: Path, val_fraction: float, workers: int, output_format: str) -> None:
    """One-line errors for the arguments, before anything is read."""
    from loom.settings import SettingError, one_of

    if not input_path.exists():
        raise PrepareError(f"--input={str(input_path)!r}: no such file or folder")
    try:
        one_of("--output-format", output_format, OUTPUT_FORMATS)
    except SettingError as e:
        raise PrepareError(str(e)) from None
    taken = [output] if output_format == "loom" else [Path(f"{output}.bin"), Path(f"{output}.idx")]
    for path in taken:
        if path.exists():
            raise PrepareError(f"--output={str(output)!r}: {path} already exists; allowed: a new path")
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"--val-fraction={val_fraction} must be in [0, 1)")
    if workers < 1:
        raise PrepareError(f"--workers={workers} must be at least 1")


def prepare(input_path: str | Path, tokenizer_path: str | Path, output: str | Path, val_fraction: float = 0.01,
            progress: bool = True, *, text_key: str = "text", eos_token: str | None = None,
            bos_token: str | None = None, workers: int = 1, output_format: str = "loom") -> dict:
    """`loom prepare`: every document under input_path -> a dataset at output (a folder, or with
    output_format='megatron' the prefix of a .bin + .idx pair, all documents in one file)."""
    input_path, output = Path(input_path), Path(output)
    check_arguments(input_path, output, val_fraction, workers, output_format)
    tokenizer, tokenizer_file = load_tokenizer(tokenizer_path)
    tokens = document_tokens(tokenizer, tokenizer_file, eos_token, bos_token)
    files = find_inputs(input_path)
    if not files:
        raise PrepareError(f"--input={str(input_path)!r} holds no .txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet "
                           f"files (nor a `datasets` save_to_disk folder)")
    check_inputs(files, text_key)
    shards = plan_shards(files, input_path)
    megatron = output_format == "megatron"
    vocab = tokenizer.get_vocab_size()
    spec = ShardSpec(str(tokenizer_file.resolve()), text_key, 0.0 if megatron else val_fraction, tokens,
                     np.dtype(token_dtype(vocab)).name)
    work = resumable_folder(output, spec, shards)
    try:
        records = run_shards(shards, spec, work / "shards", workers, progress)
    except PrepareError:  # bad input: nothing is kept
        shutil.rmtree(work, ignore_errors=True)
        raise
    except BaseException:  # an interrupt: the finished shards stay for the rerun, nothing half-written
        for tmp in (work / "shards").glob(".*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if megatron:
        return write_megatron(work, output, records, spec, vocab)
    meta = shards_manifest(work, records, spec, vocab, str(input_path))
    shutil.copy(tokenizer_file, work / "tokenizer.json")
    os.replace(work, output)
    return meta


def resumable_folder(output: Path, spec: ShardSpec, shards: list[Shard]) -> Path:
    """.NAME.partial beside the output: kept from an interrupted run with the same plan (the
    arguments that decide the bytes, and every input file's size and time), else made anew."""
    work = output.parent / f".{output.name}.partial"
    plan = {"spec": asdict(spec), "tokenizer": file_record(Path(spec.tokenizer_file))["crc32"],
            "shards": [[[p.rel, p.start, p.stop, p.path.stat().st_size, p.path.stat().st_mtime_ns] for p in s.parts]
                       for s in shards]}
    plan_file = work / "plan.json"
    if work.is_dir() and plan_file.is_file() and json.loads(plan_file.read_text()) == json.loads(json.dumps(plan)):
        return work
    shutil.rmtree(work, ignore_errors=True)
    (work / "shards").mkdir(parents=True)
    plan_file.write_text(json.dumps(plan))
    return work


def finished(shards_dir: Path, number: int) -> dict | None:
    record = shards_dir / f"{number:05d}" / "shard.json"
    return json.loads(record.read_text()) if record.is_file() else None


class Progress:
    """A bar over the input's bytes, with tokens/s and the ETA."""

    def __init__(self, total: int, done: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, desc="tokenizing", leave=False,
                        disable=not enabled or None, dynamic_ncols=True)
        self.tokens, self.started = 0, time.perf_counter()

    def add(self, input_bytes: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(input_bytes)
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{rate / 1e3:,.0f}K tokens/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def run_shards(shards: list[Shard], spec: ShardSpec, shards_dir: Path, workers: int, progress: bool) -> list[dict]:
    """Every shard's record, tokenizing those not yet finished (in `workers` processes)."""
    records = [finished(shards_dir, i) for i in range(len(shards))]
    pending = [i for i, r in enumerate(records) if r is None]
    bar = Progress(sum(s.size for s in shards), sum(shards[i].size for i in range(len(shards)) if records[i]), progress)
    try:
        if workers == 1 or len(pending) <= 1:
            for i in pending:
                records[i] = write_shard(shards[i], i, spec, shards_dir, ShardProgress(bar.add))
        else:
            from loom.data.pool import run_in_pool

            for i, record in run_in_pool(pending, shards, spec, shards_dir, workers, bar.add):
                records[i] = record
    finally:
        bar.close()
    return records


def shards_manifest(work: Path, records: list[dict], spec: ShardSpec, vocab: int, source: str) -> dict:
    """meta.json over the shards: summed counts, every file's size and CRC (from the shards' own
    records), the tokens around documents."""
    splits = {s: {"tokens": sum(r["splits"][s]["tokens"] for r in records),
                  "documents": sum(r["splits"][s]["documents"] for r in records),
                  "max_token": max(r["splits"][s]["max_token"] for r in records)} for s in SPLITS}
    meta = {"vocab_size": vocab, "dtype": spec.dtype, "eos_id": spec.tokens.eos, "bos_id": spec.tokens.bos,
            "val_fraction": spec.val_fraction, "text_key": spec.text_key, "source": source, "splits": splits,
            "shards": len(records),
            "files": {f"shards/{i:05d}/{name}": rec for i, r in enumerate(records) for name, rec in r["files"].items()}}
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def write_megatron(work: Path, prefix: Path, records: list[dict], spec: ShardSpec, vocab: int) -> dict:
    """The shards' documents as one Megatron indexed dataset prefix.bin + prefix.idx."""
    from loom.data.megatron import MegatronWriter

    writer = MegatronWriter(prefix, np.dtype(spec.dtype))
    try:
        for i in range(len(records)):
            folder = work / "shards" / f"{i:05d}"
            starts = np.load(folder / "train.docs.npy")
            n = records[i]["splits"]["train"]["tokens"]
            if n:
                tokens = np.memmap(folder / "train.bin", dtype=np.dtype(spec.dtype), mode="r")
                writer.add_documents(tokens, np.diff(np.append(starts, n)))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    shutil.rmtree(work, ignore_errors=True)
    train = {k: sum(r["splits"]["train"][k] for r in records) for k in ("tokens", "documents")}
    return {"vocab_size": vocab, "dtype": spec.dtype, "eos_id": spec.tokens.eos, "bos_id": spec.tokens.bos,
            "output_format": "megatron", "splits": {"train": train, "val": {"tokens": 0, "documents": 0}}}


def kept_after_stop(output: str | Path) -> str:
    """What an interrupted `loom prepare --output output` left: its finished shards, or nothing."""
    output = Path(output)
    work = output.parent / f".{output.name}.partial"
    done = sorted((work / "shards").glob("[0-9]*")) if work.is_dir() else []
    if not done:
        shutil.rmtree(work, ignore_errors=True)
        return "nothing was written"
    return (f"kept {len(done)} finished shard(s) in {work} (the same command continues from them; "
            f"delete the folder to start over)")
