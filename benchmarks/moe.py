"""Mixture of experts on this CPU: the experts as grouped GEMMs (torch._grouped_mm) against a
Python loop over experts, and the routing balance with and without the load-balancing loss.

    python benchmarks/moe.py [--steps 12] [--seq-len 512]

1. tokens/s of a tiny-moe training step (one process, fp32, loom's kernels installed), experts
   grouped vs looped, runs alternating so that machine noise hits both alike.
2. max / mean tokens per expert (over layers and the last 10 steps) of a short training run on
   the builtin corpus, aux_loss_coeff 0.01 against 0.
3. expert parallelism on 2 ranks (`loom train --nproc 2`, dp_shard=2, gloo, one thread per
   rank): tokens/s with every expert on both ranks (ep=1, FSDP-sharded) against 4 experts per
   rank with all-to-all dispatch (ep=2), runs alternating, --rounds of each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from loom.models.converters import convert_model
from loom.models.moe import MoE
from loom.models.registry import MODELS
from loom.models.transformer import init_model


def step_rates(seq_len: int, steps: int) -> dict[str, float]:
    cfg = MODELS["tiny-moe"]
    model = init_model(cfg, torch.device("cpu"), seed=0)
    convert_model(model, "auto", torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq_len + 1), generator=torch.Generator().manual_seed(0))
    experts = [m.experts for m in model.modules() if isinstance(m, MoE)]
    times: dict[str, list[float]] = {"grouped": [], "loop": []}
    for i in range(2 * steps + 2):
        mode = "grouped" if i % 2 == 0 else "loop"
        for e in experts:
            e.grouped = mode == "grouped"
        t0 = time.perf_counter()
        model(tokens[:, :-1], labels=tokens[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # the first of each is a warm-up
            times[mode].append(time.perf_counter() - t0)
    return {mode: 2 * seq_len / statistics.median(ts) for mode, ts in times.items()}


def balance(aux: float, steps: int) -> float:
    from loom.config import load_config, validate
    from loom.train.trainer import Trainer

    cfg = load_config(None, ["--model.name=tiny-moe", "--parallel.dp_shard=1", "--parallel.pp=1",
                             f"--moe.aux_loss_coeff={aux}", f"--train.steps={steps}", "--train.eval_every=0",
                             "--metrics.jsonl=/tmp/loom-moe-bench.jsonl", "--metrics.plot=", "--train.seq_len=128"])
    trainer = Trainer(cfg, validate(cfg), progress=False)
    ratios = []
    for step in range(steps):
        trainer.engine.train_step(trainer.data.micro_batches(step), cfg.train.lr)
        if step >= steps - 10:
            for layer in trainer.model.moe_layers():
                counts = layer.last_counts.double()
                ratios.append((counts.max() / counts.mean()).item())
    return statistics.mean(ratios)


def launch_rate(ep: int, steps: int, seq_len: int, out: Path) -> float:
    """Median tokens/s (global) over the logged steps after the first of a 2-rank tiny-moe run."""
    jsonl = out / f"ep{ep}.jsonl"
    jsonl.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "loom", "train", "--quiet", "--nproc", "2", "--model.name=tiny-moe",
           "--parallel.pp=1", "--parallel.dp_shard=2", f"--parallel.ep={ep}", f"--train.steps={steps}",
           f"--train.seq_len={seq_len}", "--train.micro_batch=2", "--train.global_batch=4", "--train.eval_every=0",
           "--metrics.log_every=1", f"--metrics.jsonl={jsonl}", "--metrics.plot="]
    subprocess.run(cmd, check=True, env=env, cwd=out, capture_output=True)
    rows = [json.loads(line) for line in open(jsonl)]
    return statistics.median(r["tokens_per_s"] for r in rows[1:])


def expert_parallel_rates(rounds: int, steps: int, seq_len: int) -> dict[int, list[float]]:
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for ep in (1, 2):
                rates[ep].append(launch_rate(ep, steps, seq_len, Path(tmp)))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2, help="alternating 2-rank launches per ep degree")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rates = step_rates(args.seq_len, args.steps)
    print(f"\n## tiny-moe (8 experts, top-2, hidden 256, expert ffn 384, 4 layers), batch 2 x {args.seq_len}, fp32")
    print("| experts | tokens/s | vs loop |")
    print("|---|---:|---:|")
    for mode in ("grouped", "loop"):
        print(f"| {mode} | {rates[mode]:,.0f} | {rates[mode] / rates['loop']:.2f}x |")
    print(f"\n## routing balance: max / mean tokens per expert over the last 10 of {args.train_steps} steps "
          f"(1.0 = perfectly even)")
    print("| aux_loss_coeff | max / mean |")
    print("|---:|---:|")
    for aux in (0.01, 0.0):
        print(f"| {aux} | {balance(aux, args.train_steps):.3f} |", flush=True)
    rates = expert_parallel_rates(args.rounds, args.steps, args.seq_len)
    print(f"\n## expert parallelism: tiny-moe on 2 ranks (dp_shard=2), 2 x {args.seq_len} tokens per rank and "
          f"step, median tokens/s of steps 2-{args.steps}")
    print("| layout | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " | vs ep=1 |")
    print("|---|" + "---:|" * (args.rounds + 1))
    for ep in (1, 2):
        ratio = statistics.mean(rates[ep]) / statistics.mean(rates[1])
        print(f"| ep={ep} | " + " | ".join(f"{r:,.0f}" for r in rates[ep]) + f" | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
