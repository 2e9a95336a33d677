"""Run each layout of a grid as a real `loom train --nproc N` job (torchrun), a few steps each, and
read back what it measured. A layout that runs out of memory, fails or times out is recorded as
such; the sweep goes on."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loom.bench.grid import BenchLayout, Grid

WARMUP_STEPS = 2  # the first steps pay for allocation and caches; their times are left out


@dataclass
class BenchResult:
    layout: BenchLayout
    status: str  # ok | OOM | failed | invalid | timeout
    message: str = ""
    tokens_per_s_per_device: float | None = None
    step_time_s: float | None = None
    peak_memory_bytes: int | None = None
    global_batch: int | None = None
    wall_s: float | None = None
    mfu: float | None = None  # model FLOP/s per device over the peak that peak_source names
    peak_source: str = ""

    def as_row(self) -> dict:
        return {**asdict(self.layout), "dp": self.layout.dp, "status": self.status, "message": self.message,
                "tokens_per_s_per_device": self.tokens_per_s_per_device, "step_time_s": self.step_time_s,
                "peak_memory_bytes": self.peak_memory_bytes, "global_batch": self.global_batch, "wall_s": self.wall_s,
                "mfu": self.mfu, "peak_source": self.peak_source}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # one thread per rank (torchrun's default), one process included
    return env


def run_layout(grid: Grid, layout: BenchLayout, work: Path, timeout_s: float, tag: str = "") -> BenchResult:
    from loom.config import ConfigError, load_config, validate

    tag = f"w{layout.world}_tp{layout.tp}_cp{layout.cp}_pp{layout.pp}_mb{layout.micro_batch}_s{layout.seq_len}{tag}"
    jsonl = work / f"{tag}.jsonl"
    overrides = [*grid.base, *layout.overrides(), f"--metrics.jsonl={jsonl}", "--metrics.plot=",
                 "--metrics.log_every=1", "--metrics.tensorboard=", "--checkpoint.dir="]
    try:
        cfg = load_config(None, overrides)
        validate(cfg, world_size=layout.world)
    except ConfigError as e:
        return BenchResult(layout, "invalid", str(e))
    if jsonl.exists():
        jsonl.unlink()
    cmd = [sys.executable, "-m", "loom", "train", "--quiet", "--nproc", str(layout.world), *overrides]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout_s, cwd=work)
    except subprocess.TimeoutExpired:
        return BenchResult(layout, "timeout", f"over {timeout_s:.0f} s", global_batch=cfg.train.global_batch)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        text = r.stderr + r.stdout
        oom = "out of memory" in text.lower() or "OutOfMemoryError" in text or r.returncode in (-9, 137)
        last = [line for line in text.strip().splitlines() if line.strip()][-1:] or [""]
        return BenchResult(layout, "OOM" if oom else "failed", last[0][-200:], global_batch=cfg.train.global_batch,
                           wall_s=wall)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    times = [row["step_time_s"] for row in rows if row["step"] > WARMUP_STEPS] or [rows[-1]["step_time_s"]]
    step = statistics.median(times)
    tokens = cfg.train.global_batch * cfg.train.seq_len / layout.world
    mfus = [row["mfu"] for row in rows if row["step"] > WARMUP_STEPS and row.get("mfu") is not None]
    return BenchResult(layout, "ok", "", tokens / step, step, max(row["peak_memory_bytes"] for row in rows),
                       cfg.train.global_batch, wall, statistics.median(mfus) if mfus else None,
                       rows[0].get("peak_source", ""))


def run_grid(grid: Grid, out: Path, timeout_s: float, progress: bool = True, repeats: int = 1) -> list[BenchResult]:
    """Run every layout `repeats` times, round-robin (so a slow spell of a shared machine spreads over
    all layouts instead of hitting one), and keep per layout the run with the median step time."""
    work = out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[BenchLayout, list[BenchResult]] = {layout: [] for layout in grid.layouts}
    total = len(grid.layouts) * repeats
    done = 0
    for round_ in range(repeats):
        for layout in grid.layouts:
            previous = runs[layout]
            if previous and previous[-1].status in ("invalid", "OOM"):
                continue  # deterministic outcomes: no need to repeat them
            res = run_layout(grid, layout, work, timeout_s, tag=f"r{round_}" if repeats > 1 else "")
            previous.append(res)
            done += 1
            if progress:
                what = (f"{res.tokens_per_s_per_device:,.0f} tokens/s/device, peak {res.peak_memory_bytes / 2**20:,.0f} MiB"
                        if res.status == "ok" else f"{res.status}: {res.message}")
                print(f"[{done}/{total}] world={layout.world} tp={layout.tp} cp={layout.cp} pp={layout.pp} "
                      f"mb={layout.micro_batch} seq={layout.seq_len}: {what}", file=sys.stderr, flush=True)
    results = []
    for layout, tries in runs.items():
        ok = sorted((r for r in tries if r.status == "ok"), key=lambda r: r.step_time_s)
        results.append(ok[(len(ok) - 1) // 2] if ok else tries[-1])
    return results
