"""Throughput of parallel layouts on this machine, in the shape of published 4D scaling tables.

Runs `loom train` for a few steps per layout (through torchrun for several ranks) and prints
rows (TP, CP, PP, micro batch) x columns (ranks) with tokens/s per device, and peak memory per
rank; then the ratio of each layout's tokens/s per device to the single-process run's.
Figures are medians over the steps after warm-up. On a 2-core machine every extra rank shares
the same two cores: per-device figures there measure overhead, not scaling.

    python benchmarks/layouts.py [--steps 8] [--model tiny] [--seq-len 256]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = [  # (label, overrides)
    ("single", []),
    ("dp_shard=2", ["--parallel.dp_shard=2"]),
    ("dp_replicate=2", ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]),
    ("tp=2", ["--parallel.tp=2", "--parallel.dp_shard=1"]),
    ("tp=4", ["--parallel.tp=4", "--parallel.dp_shard=1"]),
    ("dp_shard=2 x tp=2", ["--parallel.dp_shard=2", "--parallel.tp=2"]),
    ("pp=2 (1f1b)", ["--parallel.pp=2", "--parallel.dp_shard=1"]),
    ("pp=2 (interleaved, 2 virtual)", ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_virtual_stages=2",
                                       "--parallel.pp_schedule=interleaved-1f1b"]),
    ("tp=2 x pp=2", ["--parallel.tp=2", "--parallel.pp=2", "--parallel.dp_shard=1"]),
    ("dp_shard=2 x tp=2 x pp=2", ["--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.pp=2"]),
]


def run(label: str, overrides: list[str], args, tmp: Path) -> dict:
    jsonl = tmp / f"{label.replace(' ', '')}.jsonl"
    cmd = [sys.executable, "-m", "loom", "train", "--quiet", f"--model.name={args.model}",
           f"--train.seq_len={args.seq_len}", f"--train.steps={args.steps}", "--train.global_batch=8",
           f"--train.micro_batch={args.micro_batch}", "--train.eval_every=0", "--train.eval_batches=1",
           "--metrics.log_every=1", f"--metrics.jsonl={jsonl}", "--metrics.plot=",
           "--parallel.dp_shard=1", "--parallel.pp=1", *overrides]  # one process unless the layout says
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    rows = [json.loads(line) for line in open(jsonl)]
    steady = [row for row in rows if row["step"] > 2] or rows
    return {
        "layout": rows[0]["layout"],
        "tokens_per_s_per_device": statistics.median(row["tokens_per_s_per_device"] for row in steady),
        "peak_memory_bytes": max(row["peak_memory_bytes"] for row in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)  # pp needs >= pp micro-batches per rank
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in LAYOUTS:
            results[label] = run(label, overrides, args, Path(tmp))
            print(f"{label}: {results[label]}", file=sys.stderr, flush=True)

    ok = {k: v for k, v in results.items() if "error" not in v}
    worlds = sorted({v["layout"]["world_size"] for v in ok.values()})
    keyed: dict[tuple, dict[int, dict]] = {}
    for v in ok.values():
        lay = v["layout"]
        keyed.setdefault((lay["tp"], lay["cp"], lay["pp"], args.micro_batch), {})[lay["world_size"]] = v
    print(f"\n## loom layouts: {args.model}, seq {args.seq_len}, global batch 8, fp32, {args.steps} steps "
          f"(tokens/s per device; peak memory per rank)\n")
    print("| (TP, CP, PP, micro batch) | " + " | ".join(f"{w} rank{'s' if w > 1 else ''}" for w in worlds) + " |")
    print("|---|" + "---:|" * len(worlds))
    for key in sorted(keyed):
        cells = []
        for w in worlds:
            v = keyed[key].get(w)
            cells.append(f"{v['tokens_per_s_per_device']:,.0f} ({v['peak_memory_bytes'] / 2**20:.0f} MiB)" if v else "")
        print(f"| {key} | " + " | ".join(cells) + " |")
    single = ok.get("single")
    print("\n| layout | ranks | tokens/s per device | vs single process |")
    print("|---|---:|---:|---:|")
    for label, v in results.items():
        if "error" in v:
            print(f"| {label} | | failed: {v['error']} | |")
            continue
        ratio = v["tokens_per_s_per_device"] / single["tokens_per_s_per_device"] if single else float("nan")
        print(f"| {label} | {v['layout']['world_size']} | {v['tokens_per_s_per_device']:,.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
