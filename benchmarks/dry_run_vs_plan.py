"""The dry run of the largest recipes beside the planner's prediction, per rank kind.

    python benchmarks/dry_run_vs_plan.py [--recipes llama3_70b.toml:64,llama31_405b.toml:512] [--gpu h100-sxm-80gb]

For each recipe at its world size: `loom train --dry-run` (the real layout on the fake process
group, one micro-batch traced) and `loom plan`'s memory model of the same layout
(loom.plan.memory.rank_memory) for the same pipeline ranks, in GiB, with the dry run's wall time.
The planner's activation and buffer terms are formulas, the dry run's are measured: their
difference is what the planner does not model yet.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loom.config import load_config, validate  # noqa: E402
from loom.plan.hardware import GIB, get_spec  # noqa: E402
from loom.plan.memory import Layout, rank_memory  # noqa: E402
from loom.train.dry_run import dry_run  # noqa: E402


def compare(recipe: str, world: int, gpu: str) -> None:
    cfg = load_config(str(ROOT / "configs" / recipe), [])
    model_cfg = validate(cfg, world, check_files=False)
    t0 = time.perf_counter()
    report = dry_run(cfg, model_cfg, world)
    wall = time.perf_counter() - t0
    layout = Layout.from_config(cfg, report.dims)
    spec = get_spec(gpu)
    dims = report.dims
    print(f"\n### {recipe} at {world} ranks: " + " x ".join(f"{k}={v}" for k, v in dims.degrees().items() if v > 1)
          + f" (dry run {wall:.0f} s; planner spec {spec.name})\n")
    head = "| GiB per rank | " + " | ".join(f"{r.kind} (rank {r.rank}): dry run | plan" for r in report.rows) + " |"
    print(head)
    print("|---|" + "---:|---:|" * len(report.rows))
    plans = [rank_memory(model_cfg, layout, spec, r.rank // (dims.world_size // dims.pp)) for r in report.rows]
    lines = [
        ("parameters", [r.parameters for r in report.rows], [p.parameters for p in plans]),
        ("gradients", [r.gradients for r in report.rows], [p.gradients for p in plans]),
        ("optimizer states", [r.optimizer for r in report.rows], [p.optimizer for p in plans]),
        ("FSDP gathered", [r.gathered for r in report.rows], [p.fsdp_buffers for p in plans]),
        ("activations", [r.activations for r in report.rows], [p.activations for p in plans]),
        ("loss (plan) / backward working memory (dry run)", [r.backward_working for r in report.rows],
         [p.logits for p in plans]),
        ("total (plan: + buffers, reserve, 8% margin)", [r.total for r in report.rows], [p.total for p in plans]),
    ]
    for label, measured, planned in lines:
        cells = [f"{(m or 0) / GIB:.2f} | {p / GIB:.2f}" for m, p in zip(measured, planned)]
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="llama3_70b.toml:64,llama31_405b.toml:512")
    ap.add_argument("--gpu", default="h100-sxm-80gb")
    args = ap.parse_args()
    for item in args.recipes.split(","):
        recipe, world = item.split(":")
        compare(recipe, int(world), args.gpu)


if __name__ == "__main__":
    main()
