"""Measured against predicted: the planner, fed this machine's spec (`cpu`), for each layout that ran."""
from __future__ import annotations

from loom.bench.grid import Grid
from loom.bench.report import compare_table
from loom.bench.runner import BenchResult


def predicted_tokens_per_s(grid: Grid, result: BenchResult, spec) -> float:
    from loom.config import load_config
    from loom.plan.memory import Layout
    from loom.plan.search import evaluate

    lay = result.layout
    cfg = load_config(None, [*grid.base, *lay.overrides()])
    p = cfg.parallel
    layout = Layout(tp=lay.tp, cp=lay.cp, pp=lay.pp, dp=lay.dp, micro_batch=lay.micro_batch, seq_len=lay.seq_len,
                    global_batch=cfg.train.global_batch, recompute=cfg.train.recompute, dtype=cfg.train.dtype,
                    pp_schedule=p.pp_schedule, pp_virtual_stages=p.pp_virtual_stages,
                    sequence_parallel=p.sequence_parallel)
    return evaluate(cfg.model_config(), layout, spec).perf.tokens_per_s_per_device


def compare_with_plan(grid: Grid, results: list[BenchResult]) -> tuple[str, dict]:
    from loom.plan.hardware import get_spec

    spec = get_spec("cpu")
    pairs = [(r, predicted_tokens_per_s(grid, r, spec)) for r in results if r.status == "ok"]
    text, stats = compare_table(pairs)
    return f"Planner (spec cpu: {spec.description}) against measurement\n\n{text}", stats
