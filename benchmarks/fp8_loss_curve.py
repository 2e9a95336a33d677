"""FP8's loss curve against bf16's, step by step: the embedded default's model and corpus in one
process, 4 x 128 tokens per step, the same seed and data. Prints, per FP8 recipe and seed, the
largest and the mean relative difference of the per-step losses, and both curves' first and
last losses. tests/test_fp8.py runs the first 30 steps of the same comparison.

    python benchmarks/fp8_loss_curve.py [--steps 100] [--seeds 0 1] [--recipes tensorwise rowwise]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loom.config import load_config, validate  # noqa: E402
from loom.data.stdlib import builtin_dataset  # noqa: E402
from loom.train.schedule import lr_at  # noqa: E402
from loom.train.trainer import Trainer  # noqa: E402


def loss_curve(fp8: str, steps: int, seed: int = 0) -> list[float]:
    """The per-step training losses of `steps` steps of the embedded default's model in bf16,
    with train.fp8=fp8 ('none': plain bf16)."""
    torch.manual_seed(seed)
    cfg = load_config(None, ["--parallel.dp_shard=1", "--parallel.pp=1", f"--data.path={builtin_dataset(progress=False)}",
                             "--train.seq_len=128", "--train.global_batch=4", "--train.micro_batch=4",
                             f"--train.steps={steps}", "--train.warmup_steps=10", "--train.dtype=bfloat16",
                             f"--train.fp8={fp8}", f"--train.seed={seed}", "--metrics.plot="])
    trainer = Trainer(cfg, validate(cfg), progress=False)
    t = cfg.train
    return [trainer.engine.train_step(trainer.data.micro_batches(s), lr_at(s, t.lr, t.min_lr, t.warmup_steps, t.steps))[0]
            for s in range(t.steps)]


def relative_differences(curve: list[float], reference: list[float]) -> list[float]:
    return [abs(a - b) / b for a, b in zip(curve, reference)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--recipes", nargs="+", default=["tensorwise", "rowwise"])
    args = parser.parse_args()
    print("| recipe | seed | steps | max rel. diff | mean rel. diff | bf16 loss | fp8 loss |")
    print("|---|---:|---:|---:|---:|---|---|")
    for seed in args.seeds:
        bf16 = loss_curve("none", args.steps, seed)
        for recipe in args.recipes:
            fp8 = loss_curve(recipe, args.steps, seed)
            rel = relative_differences(fp8, bf16)
            print(f"| {recipe} | {seed} | {args.steps} | {100 * max(rel):.2f}% | {100 * sum(rel) / len(rel):.2f}% | "
                  f"{bf16[0]:.3f} -> {bf16[-1]:.3f} | {fp8[0]:.3f} -> {fp8[-1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
