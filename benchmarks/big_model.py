"""A model no rank could hold whole on this machine, trained on 8 ranks: peak memory per rank
and the losses against one process.

    python benchmarks/big_model.py [--steps 2] [--layouts dp_shard8,tp2_pp2_dp_shard2] [--no-reference]

The model: Llama of 48 layers, dim 1024, 8 heads, FFN 2816, vocabulary 8192 (0.63B parameters,
2.5 GB in fp32), seq 128, 8 sequences per step, fp32, on the builtin corpus. Each layout runs
`loom train --nproc 8` (one thread per rank); the reference runs the same config in one process
(2 threads; it holds the whole model, its gradients and AdamW states: ~10 GB). Printed per run:
every step's loss, its largest relative difference from the reference, and the peak resident
memory of the largest rank over the whole run (the run's `peak_memory_bytes`, the max over
ranks of each process's peak RSS), against one fp32 copy of the model.

The runs set glibc's mmap threshold to a fixed 4 MiB (MALLOC_MMAP_THRESHOLD_), as the README
advises for large models on CPU: with glibc's adaptive threshold, buffers of 1-32 MiB freed by
FSDP and autograd stay in a fragmented heap, and each rank's resident set climbs past 3 GB while
its live tensors stay near 2.2 GB (8 such ranks are OOM-killed on a 24 GB machine). With the
fixed threshold the resident set follows the live tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--model.name=small", "--model.n_layers=48", "--model.dim=1024", "--model.n_heads=8",
         "--model.n_kv_heads=8", "--model.ffn_dim=2816", "--model.vocab_size=8192"]
LAYOUTS = {
    "dp_shard8": ["--parallel.dp_shard=8", "--parallel.pp=1"],
    "tp2_pp2_dp_shard2": ["--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.pp=2"],
    # torch's own pipeline behaviour: every micro-batch's gradients accumulated unsharded in fp32
    "tp2_pp2_dp_shard2_zero1": ["--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.pp=2", "--parallel.zero=1"],
}
DEFAULT_LAYOUTS = "dp_shard8,tp2_pp2_dp_shard2"


def train(name: str, layout: list[str], nproc: int, steps: int, out: Path) -> dict:
    jsonl = out / f"{name}.jsonl"
    args = [sys.executable, "-m", "loom", "train", "--quiet", *MODEL, *layout,
            f"--train.steps={steps}", "--train.seq_len=128", "--train.global_batch=8", "--train.micro_batch=1",
            "--train.warmup_steps=0", "--train.eval_every=0", "--train.eval_batches=1", "--metrics.log_every=1",
            f"--metrics.jsonl={jsonl}", "--metrics.plot="]
    if nproc > 1:
        args[4:4] = ["--nproc", str(nproc)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["MALLOC_MMAP_THRESHOLD_"] = str(4 << 20)
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    return {"losses": [row["loss"] for row in rows], "peak": max(row["peak_memory_bytes"] for row in rows),
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--layouts", default=DEFAULT_LAYOUTS, help=f"any of {', '.join(LAYOUTS)}")
    ap.add_argument("--no-reference", action="store_true", help="skip the one-process run (10 GB)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from loom.config import load_config
    from loom.metrics.flops import param_counts

    cfg = load_config(None, MODEL)
    whole = 4 * param_counts(cfg.model_config()).total
    out = Path(tempfile.mkdtemp(prefix="loom-big-"))
    runs = {}
    if not args.no_reference:
        runs["one process"] = train("reference", ["--parallel.dp_shard=1", "--parallel.pp=1"], 1, args.steps, out)
    for name in args.layouts.split(","):
        runs[name] = train(name, LAYOUTS[name], 8, args.steps, out)
    ref = runs.get("one process")
    print(f"model: {param_counts(cfg.model_config()).total / 1e9:.3f}B parameters, one fp32 copy "
          f"{whole / 2**30:.2f} GiB; {args.steps} steps of 8 x 128 tokens, fp32")
    print("| run | ranks | losses | max rel. diff vs one process | peak RSS of the largest rank | / one fp32 copy | wall (s) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, run in runs.items():
        diff = "-" if ref is None or run is ref else f"{max(abs(a - b) / abs(b) for a, b in zip(run['losses'], ref['losses'])):.1e}"
        ranks = 1 if run is ref else 8
        print(f"| {name} | {ranks} | {', '.join(f'{x:.6f}' for x in run['losses'])} | {diff} | "
              f"{run['peak'] / 2**30:.2f} GiB | {run['peak'] / whole:.2f} | {run['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
