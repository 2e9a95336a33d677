"""`loom prepare` tokens/s against its limit, the tokenizer's own encode_batch over the same
texts already in memory (which uses every core).

    python benchmarks/prepare.py [--mb 95] [--workers 1,2] [--formats jsonl,parquet,zst]

The corpus is the standard library's modules as JSONL documents (repeated up to --mb of JSONL),
also written as parquet (row groups of 1,000 documents) and .jsonl.zst; the tokenizer is the
builtin BPE. The limit and every prepare run in this process one after another; each prepare
writes a fresh dataset. Prints tokens/s and the ratio to the limit.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def corpus(folder: Path, megabytes: float) -> tuple[list[str], dict[str, Path]]:
    """The texts, and the corpus as one file per format."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from loom.data.stdlib import stdlib_files

    _, files = stdlib_files()
    base = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    texts, size = [], 0
    while size < megabytes * 1e6:
        for t in base:
            texts.append(t)
            size += len(json.dumps({"text": t})) + 1
            if size >= megabytes * 1e6:
                break
    paths = {f: folder / f / f"corpus.{ext}" for f, ext in (("jsonl", "jsonl"), ("parquet", "parquet"),
                                                            ("zst", "jsonl.zst"))}
    for p in paths.values():
        p.parent.mkdir(parents=True)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    paths["jsonl"].write_bytes(lines)
    paths["zst"].write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
    pq.write_table(pa.table({"text": texts}), paths["parquet"], row_group_size=1000)
    return texts, paths


def limit(texts: list[str], tokenizer_file: Path) -> tuple[float, int]:
    """(tokens/s, tokens) of encode_batch over the texts in memory, in batches as loom's."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    t0, n = time.perf_counter(), 0
    batch, chars = [], 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if chars >= 1 << 20:
            n += sum(len(e.ids) for e in tok.encode_batch_fast(batch, add_special_tokens=False))
            batch, chars = [], 0
    n += sum(len(e.ids) for e in tok.encode_batch_fast(batch, add_special_tokens=False))
    return n / (time.perf_counter() - t0), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=95)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--formats", default="jsonl,parquet,zst")
    args = parser.parse_args()
    from loom.data.prepare import prepare
    from loom.data.stdlib import builtin_dataset

    tokenizer = builtin_dataset(progress=False) / "tokenizer.json"
    work = Path(tempfile.mkdtemp(prefix="loom_prepare_bench."))
    try:
        texts, paths = corpus(work, args.mb)
        print(f"{len(texts):,} documents, {paths['jsonl'].stat().st_size / 1e6:.0f} MB of JSONL "
              f"(parquet {paths['parquet'].stat().st_size / 1e6:.0f} MB, zst {paths['zst'].stat().st_size / 1e6:.0f} MB); "
              f"builtin tokenizer")
        before, tokens = limit(texts, tokenizer)
        print(f"limit: encode_batch over the texts in memory ({tokens:,} tokens), measured before and after each "
              f"prepare; each ratio is against the mean of those two")
        for fmt in args.formats.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                out = work / f"out_{fmt}_{workers}"
                t0 = time.perf_counter()
                meta = prepare(paths[fmt].parent, tokenizer, out, progress=False, workers=workers)
                seconds = time.perf_counter() - t0
                shutil.rmtree(out)
                after, _ = limit(texts, tokenizer)
                rate = (before + after) / 2
                n = sum(s["tokens"] - s["documents"] for s in meta["splits"].values())  # text tokens, no EOS
                print(f"loom prepare {fmt:>7} --workers {workers}: {n / seconds / 1e3:,.0f}K tokens/s "
                      f"({seconds:.1f} s; limit {rate / 1e3:,.0f}K), {n / seconds / rate:.2f} of the limit")
                before = after
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
