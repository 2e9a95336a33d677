"""Step timing, throughput, model TFLOP/s, MFU and memory; accelerator peaks; CPU calibration."""
from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loom.files import cache_dir, read_json_table, write_json_table
from loom.kernels.matmul import bf16_via_fp32, matmul

# Dense peak FLOP/s per device by compute dtype, from the vendors' data sheets (no sparsity).
# `float32` is the plain fp32 rate; `tf32` applies when torch allows TF32 matmuls.
ACCELERATOR_PEAKS: dict[str, dict[str, float]] = {
    "h100-sxm": {"bfloat16": 989.4e12, "float16": 989.4e12, "fp8": 1978.9e12, "tf32": 494.7e12, "float32": 66.9e12},
    "h100-pcie": {"bfloat16": 756.0e12, "float16": 756.0e12, "fp8": 1513.0e12, "tf32": 378.0e12, "float32": 51.2e12},
    "h100-nvl": {"bfloat16": 835.5e12, "float16": 835.5e12, "fp8": 1670.5e12, "tf32": 417.5e12, "float32": 60.0e12},
    "h200": {"bfloat16": 989.4e12, "float16": 989.4e12, "fp8": 1978.9e12, "tf32": 494.7e12, "float32": 66.9e12},
    "a100": {"bfloat16": 312.0e12, "float16": 312.0e12, "tf32": 156.0e12, "float32": 19.5e12},
    "b200": {"bfloat16": 2250.0e12, "float16": 2250.0e12, "fp8": 4500.0e12, "tf32": 1100.0e12, "float32": 80.0e12},
    "l40s": {"bfloat16": 362.05e12, "float16": 362.05e12, "fp8": 733.0e12, "tf32": 183.0e12, "float32": 91.6e12},
}


def accelerator_name(device_name: str) -> str | None:
    """Map a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3') to a key of ACCELERATOR_PEAKS."""
    n = device_name.lower()
    if "h200" in n or "gh200" in n:
        return "h200"
    if "h100" in n:
        if "nvl" in n:
            return "h100-nvl"
        return "h100-pcie" if "pcie" in n else "h100-sxm"
    for key in ("a100", "b200", "l40s"):
        if key in n:
            return key
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 10, warmup_s: float = 0.5) -> float:
    """Best FLOP/s of an n x n x n matmul on CPU with the current thread count, through the
    kernel loom's models use for `dtype` (bf16 widened to fp32 where the CPU lacks bf16
    arithmetic, see loom.kernels.matmul)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    # Warm up for a while, not once: the first half second of matmuls runs measurably slower
    # here (clock ramp-up, page faults), which would understate the peak and inflate MFU.
    t_end = time.perf_counter() + warmup_s
    while time.perf_counter() < t_end:
        matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def cached_measurement(cache: Path, key: str, measure):
    """measure() once per key, kept in the JSON table `cache` (written atomically)."""
    table = read_json_table(cache)
    if key not in table:
        table[key] = measure()
        write_json_table(cache, table)
    return table[key]


CALIBRATION_ATTEMPTS = 3


def other_runnable_tasks() -> float:
    """Tasks that could take this CPU's cores now, besides the caller: Linux's count of runnable
    tasks (/proc/loadavg), else the 1-minute load average."""
    try:
        with open("/proc/loadavg") as f:
            return max(0, int(f.read().split()[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def calibrate_cpu(dtype: torch.dtype) -> dict:
    """The best of up to CALIBRATION_ATTEMPTS matmul measurements, stopping at the first taken
    while nothing else was runnable: {"flops", "measured_at", "other_tasks" (the fewest seen at a
    measurement), "quiet"}."""
    best, fewest = 0.0, float("inf")
    for _ in range(CALIBRATION_ATTEMPTS):
        others = other_runnable_tasks()
        best = max(best, measure_matmul_flops(dtype))
        fewest = min(fewest, others)
        if others == 0:
            break
    return {"flops": best, "measured_at": time.strftime("%Y-%m-%d %H:%M"), "other_tasks": fewest,
            "quiet": fewest == 0}


def _cpu_peak_key(dtype: torch.dtype) -> str:
    kernel = "|via-fp32" if dtype == torch.bfloat16 and bf16_via_fp32(torch.device("cpu")) else ""
    return f"{_cpu_model()}|threads={torch.get_num_threads()}|{dtype}{kernel}|torch={torch.__version__}"


def cpu_peak_record(dtype: torch.dtype, cache: Path | None = None) -> dict:
    """This machine's matmul rate in `dtype` at the current thread count (calibrate_cpu's record),
    cached. A record measured under load is provisional: it is measured again as soon as a run
    starts while the machine is quiet (checking costs nothing), and a run that achieves more
    than a record discards it (forget_cpu_peak). Entries of the older cache format (a bare
    number, kept whatever the load) are measured again."""
    cache = cache or cache_dir() / "cpu_peak.json"
    key = _cpu_peak_key(dtype)
    old = read_json_table(cache).get(key)
    if isinstance(old, dict) and (old.get("quiet") or other_runnable_tasks() > 0):
        return old
    record = calibrate_cpu(dtype)
    if isinstance(old, dict) and not record["quiet"] and old["flops"] > record["flops"]:
        return old  # both under load: the faster is the closer to the peak
    write_json_table(cache, {**read_json_table(cache), key: record})
    return record


def cpu_peak_flops(dtype: torch.dtype, cache: Path | None = None) -> float:
    """cpu_peak_record's FLOP/s."""
    return cpu_peak_record(dtype, cache)["flops"]


def forget_cpu_peak(dtype: torch.dtype, cache: Path | None = None) -> None:
    """Drop the cached calibration for `dtype` (a run achieved more than it: it was stale)."""
    cache = cache or cache_dir() / "cpu_peak.json"
    table = read_json_table(cache)
    if table.pop(_cpu_peak_key(dtype), None) is not None:
        write_json_table(cache, table)


@dataclass(frozen=True)
class Peak:
    flops: float | None  # per device; None where unknown
    source: str  # e.g. "h100-sxm bfloat16 data sheet", "cpu calibration (2 threads, bfloat16)"


def device_peak(device: torch.device, dtype: torch.dtype, fp8: bool = False) -> Peak:
    """The peak MFU is measured against. fp8: the run's linears compute in FP8 (train.fp8), on
    CUDA against the data sheet's dense FP8 rate; on CPU FP8 is emulated (operands rounded to
    float8, products in `dtype`), so the peak stays that of `dtype`'s matmuls, and says so."""
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = accelerator_name(name)
        if key is None:
            return Peak(None, f"unknown accelerator {name!r}")
        if fp8:
            flops = ACCELERATOR_PEAKS[key].get("fp8")
            return Peak(flops, f"{key} fp8 dense data sheet" if flops else f"{key} has no FP8 peak (no FP8 units)")
        if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
            dtype_name = "tf32"
        flops = ACCELERATOR_PEAKS[key].get(dtype_name)
        return Peak(flops, f"{key} {dtype_name} data sheet")
    if device.type == "cpu":
        record = cpu_peak_record(dtype)
        if dtype == torch.bfloat16 and bf16_via_fp32(device):
            dtype_name += " products widened to fp32"
        if fp8:
            dtype_name += "; FP8 emulated in these matmuls"
        when = (f"measured {record['measured_at']}, quiet" if record["quiet"] else
                f"measured now with {record['other_tasks']:g} other tasks runnable: provisional")
        return Peak(record["flops"], f"cpu matmul calibration ({torch.get_num_threads()} threads, {dtype_name}; {when})")
    return Peak(None, f"no peak known for device type {device.type!r}")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocator peak on CUDA, peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if platform.system() == "Darwin" else rss * 1024)


@dataclass
class StepMetrics:
    step_time_s: float
    tokens_per_s: float
    tokens_per_s_per_device: float
    tflops_per_device: float
    mfu: float | None


class ThroughputMeter:
    """Turns a step's wall time into the throughput figures of the metrics contract.

    Per-device figures are global figures divided by the number of devices (world size).
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, world_size: int, peak: Peak):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = peak
        self.peak_exceeded = False  # some step achieved more than the peak: the peak is stale

    def step(self, step_time_s: float) -> StepMetrics:
        tps = self.tokens_per_step / step_time_s
        per_device = tps / self.world_size
        flops = per_device * self.flops_per_token
        mfu = flops / self.peak.flops if self.peak.flops else None
        if mfu is not None and mfu > 1.0:  # never an MFU above 100%: the peak is what is wrong
            self.peak_exceeded, mfu = True, None
        return StepMetrics(step_time_s, tps, per_device, flops / 1e12, mfu)
