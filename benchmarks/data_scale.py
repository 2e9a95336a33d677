"""A rank's cost of opening a dataset as it grows: 10^6, 10^8 and 10^10 tokens.

    python benchmarks/data_scale.py [--sizes 1e6,1e8,1e10] [--seq-len 2048] [--out DIR]

For each size it writes a loom dataset (one shard) and a Megatron indexed dataset whose token
files are sparse (nothing but their index is written to disk: 20 GB of uint16 at 10^10) with
documents of 1,000 tokens, then, in a fresh process per dataset, opens it as a training rank
does (both splits and the sample order) and reads the first global batch of a step deep into the
run with packed documents. It prints the open time, the resident memory the open added, and the
time to that first batch. The per-epoch permutation loom used to materialize is shown for
comparison as its computed size (8 bytes per sequence), not measured.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DOC_TOKENS = 1000
CHUNK = 1 << 24


def rss_bytes(kind: str = "VmRSS") -> int:
    """This process's resident memory: VmRSS (all), RssAnon (its own allocations) or RssFile
    (mapped file pages, which the kernel may map in large folios around a page touched)."""
    for line in open("/proc/self/status"):
        if line.startswith(f"{kind}:"):
            return int(line.split()[1]) * 1024
    return 0


def sparse(path: Path, nbytes: int) -> None:
    with open(path, "wb") as f:
        f.truncate(nbytes)


def write_loom(folder: Path, tokens: int) -> None:
    """A one-shard loom dataset: sparse token files, real document starts, meta with sizes."""
    shard = folder / "shards" / "00000"
    shard.mkdir(parents=True)
    files = {}
    for split, n in (("train", tokens - tokens // 100), ("val", tokens // 100)):
        sparse(shard / f"{split}.bin", 2 * n)
        starts = np.lib.format.open_memmap(shard / f"{split}.docs.npy", mode="w+", dtype=np.int64,
                                           shape=((n + DOC_TOKENS - 1) // DOC_TOKENS,))
        for i in range(0, len(starts), CHUNK):
            starts[i:i + CHUNK] = np.arange(i, min(i + CHUNK, len(starts)), dtype=np.int64) * DOC_TOKENS
        starts.flush()
        files[f"shards/00000/{split}.bin"] = {"bytes": 2 * n, "crc32": 0}
        files[f"shards/00000/{split}.docs.npy"] = {"bytes": (shard / f"{split}.docs.npy").stat().st_size, "crc32": 0}
    meta = {"vocab_size": 8192, "dtype": "uint16", "eos_id": 0, "shards": 1, "files": files,
            "splits": {"train": {"tokens": tokens - tokens // 100}, "val": {"tokens": tokens // 100}}}
    (folder / "meta.json").write_text(json.dumps(meta))


def write_megatron(prefix: Path, tokens: int) -> None:
    """A Megatron indexed dataset: sparse .bin, a real .idx of one sequence per document."""
    import struct

    from loom.data.megatron import HEADER, MAGIC

    n = (tokens + DOC_TOKENS - 1) // DOC_TOKENS
    sparse(Path(f"{prefix}.bin"), 2 * tokens)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(HEADER.pack(MAGIC, 1, 8, n, n + 1))
        for part, dtype in (("sizes", np.int32), ("pointers", np.int64), ("documents", np.int64)):
            count = n + (part == "documents")
            for i in range(0, count, CHUNK):
                idx = np.arange(i, min(i + CHUNK, count), dtype=np.int64)
                values = {"sizes": np.minimum(DOC_TOKENS, tokens - idx * DOC_TOKENS),
                          "pointers": idx * DOC_TOKENS * 2, "documents": idx}[part]
                f.write(values.astype(dtype).tobytes())
    del struct


def measure(path: str, seq_len: int) -> dict:
    """In this (fresh) process: open as a rank does, then the first batch of step 10^5."""
    from loom.data.dataset import BatchSchedule, EpochOrder, open_splits

    before = {k: rss_bytes(k) for k in ("VmRSS", "RssAnon", "RssFile")}
    t0 = time.perf_counter()
    train, val = open_splits(path, seq_len, progress=False)
    schedule = BatchSchedule(EpochOrder(train.n_sequences, 0), 8)
    opened = time.perf_counter() - t0
    rss = {k: rss_bytes(k) - v for k, v in before.items()}
    t1 = time.perf_counter()
    batch = train.batch(schedule.rank_indices(100_000, 0, 1), documents=True)
    first = time.perf_counter() - t1
    assert batch.inputs.shape == (8, seq_len)
    return {"open_s": opened, "rss_added_bytes": rss, "first_batch_s": first, "sequences": train.n_sequences}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e8,1e10")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", default="")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.seq_len)))
        return
    root = Path(args.out or tempfile.mkdtemp(prefix="loom_data_scale."))
    print(f"datasets under {root} (sparse token files); seq_len {args.seq_len}, documents of {DOC_TOKENS} tokens")
    print(f"{'tokens':>8} {'format':>9} {'open':>9} {'RSS added':>10} {'anon':>8} {'file':>8} {'1st batch':>10} "
          f"{'old perm/epoch':>15}")
    for size in (int(float(s)) for s in args.sizes.split(",")):
        for fmt in ("loom", "megatron"):
            path = root / f"{fmt}_{size:.0e}"
            if not path.exists() and not Path(f"{path}.idx").exists():
                write_loom(path, size) if fmt == "loom" else write_megatron(path, size)
            r = subprocess.run([sys.executable, __file__, "--measure", str(path), "--seq-len", str(args.seq_len)],
                               capture_output=True, text=True, check=True)
            m = json.loads(r.stdout.strip().splitlines()[-1])
            r = {k: v / 2**20 for k, v in m["rss_added_bytes"].items()}
            print(f"{size:>8.0e} {fmt:>9} {1e3 * m['open_s']:>7.1f}ms {r['VmRSS']:>8.1f}MB {r['RssAnon']:>6.1f}MB "
                  f"{r['RssFile']:>6.1f}MB {1e3 * m['first_batch_s']:>8.1f}ms {m['sequences'] * 8 / 2**20:>13.1f}MB")


if __name__ == "__main__":
    main()
