"""Fit the planner's CPU framework overheads to a measured sweep (how CPU_EFFICIENCY's constants in
loom/plan/hardware.py were obtained).

    python benchmarks/fit_cpu_constants.py --grid benchmarks/grids/cpu_4d.toml --results runs/bench/cpu_4d/results.csv

Everything else in the CPU spec is measured (matmul rate, memory bandwidth, gloo bandwidth and
latency); the per-layer, per-tp-layer, per-ring-step and per-FSDP-block overheads enter the step
time linearly, so they are the non-negative least-squares solution on the relative step-time
error over the sweep's layouts. Prints the constants and the fit per layout.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loom.bench.grid import load_grid  # noqa: E402
from loom.bench.report import read_csv  # noqa: E402
from loom.config import load_config  # noqa: E402
from loom.plan.hardware import get_spec  # noqa: E402
from loom.plan.memory import Layout  # noqa: E402
from loom.plan.timing import step_time  # noqa: E402

NAMES = ("layer_overhead_s", "tp_layer_overhead_s", "cp_step_overhead_s", "fsdp_block_overhead_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True)
    parser.add_argument("--results", required=True)
    args = parser.parse_args()
    grid = load_grid(args.grid)
    results = [r for r in read_csv(Path(args.results)) if r.status == "ok"]
    spec = get_spec("cpu")

    def predict(values, r) -> float:
        s = dataclasses.replace(spec, efficiency=dataclasses.replace(spec.efficiency, **dict(zip(NAMES, values))))
        lay = r.layout
        cfg = load_config(None, [*grid.base, *lay.overrides()])
        layout = Layout(tp=lay.tp, cp=lay.cp, pp=lay.pp, dp=lay.dp, micro_batch=lay.micro_batch,
                        seq_len=lay.seq_len, global_batch=cfg.train.global_batch, recompute=cfg.train.recompute,
                        dtype=cfg.train.dtype)
        return step_time(cfg.model_config(), layout, s).total

    measured = np.array([r.step_time_s for r in results])
    zero = [0.0] * len(NAMES)
    base = np.array([predict(zero, r) for r in results])
    columns = []
    for k in range(len(NAMES)):
        unit = list(zero)
        unit[k] = 1e-3
        columns.append((np.array([predict(unit, r) for r in results]) - base) / 1e-3)
    a = np.array(columns).T / measured[:, None]
    b = (measured - base) / measured
    active = np.ones(len(NAMES), dtype=bool)
    x = np.zeros(len(NAMES))
    for _ in range(len(NAMES)):  # non-negative least squares by dropping negative coefficients
        x[:] = 0
        x[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        if (x >= 0).all():
            break
        active &= x > 0
    x = np.clip(x, 0, None)
    for name, v in zip(NAMES, x):
        print(f"{name} = {v:.3e}")
    fitted = base + np.array(columns).T @ x
    print("\n| world | TP | CP | PP | MB | measured step (s) | fitted (s) | predicted/measured tokens/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r, m, f in zip(results, measured, fitted):
        lay = r.layout
        print(f"| {lay.world} | {lay.tp} | {lay.cp} | {lay.pp} | {lay.micro_batch} | {m:.3f} | {f:.3f} | {m / f:.2f} |")
    within = int(np.sum(np.abs(measured / fitted - 1) <= 0.25))
    print(f"\n{within} of {len(results)} within 25% (in sample)")


if __name__ == "__main__":
    main()
