"""A line of scripts/gpu_check.sh's table for each training run: the medians of steps 3 onward
(tokens/s per device, model TFLOP/s, MFU and the peak it is against), the peak memory, and on a
GPU the planner's predicted memory for the same layout beside it.

    python scripts/gpu_check_figures.py RUN.jsonl [RUN2.jsonl ...]

Each run's --section.key=value overrides are read from RUN.args beside it (one per line), as
gpu_check.sh writes them: one process for all runs (each costs an import of torch and loom).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def planned_gib(overrides: list[str]) -> str:
    """The planner's memory per device for this run's layout on this GPU, or why there is none.
    A CPU run (the script's smoke mode) is planned on an H100's spec, to exercise the path: its
    figure is not comparable to the run's."""
    import torch

    from loom.config import load_config, validate
    from loom.metrics.meter import accelerator_name
    from loom.parallel.dims import ParallelDims
    from loom.plan.hardware import GIB, PlanError, get_spec
    from loom.plan.memory import Layout, memory_breakdown

    cfg = load_config(None, [o for o in overrides if o.startswith("--") and "=" in o])
    model = validate(cfg, world_size=1)
    on_gpu = torch.cuda.is_available()
    try:
        spec = get_spec(accelerator_name(torch.cuda.get_device_name(0)) or "unknown" if on_gpu else "h100-sxm")
    except PlanError as e:
        return f"planner: {e}"
    layout = Layout.from_config(cfg, ParallelDims.from_section(cfg.parallel, 1))
    planned = f"planned {memory_breakdown(model, layout, spec).total / GIB:.1f} GiB"
    return planned if on_gpu else f"{planned} on {spec.name}: a CPU smoke run, not comparable"


def main() -> None:
    for path in sys.argv[1:]:
        overrides = Path(path).with_suffix(".args").read_text().splitlines()
        print(figures_line(path, overrides))


def figures_line(path: str, overrides: list[str]) -> str:
    rows = [json.loads(line) for line in open(path)]
    late = [r for r in rows if r["step"] >= 3] or rows

    def median(key: str) -> float | None:
        values = [r[key] for r in late if r.get(key) is not None]
        return statistics.median(values) if values else None

    mfu = median("mfu")
    return (f"  {Path(path).stem}: {median('tokens_per_s_per_device'):,.0f} tokens/s, "
            f"{median('tflops_per_device'):.1f} model TFLOP/s, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} "
            f"(peak: {rows[0].get('peak_source', '?')}), peak memory "
            f"{max(r['peak_memory_bytes'] for r in rows) / 2**30:.1f} GiB ({planned_gib(overrides)}), "
            f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")


if __name__ == "__main__":
    main()
