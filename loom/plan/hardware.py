"""Hardware specs as data, and the constants of the planner's models, stated in one place.

A spec describes one device (a GPU, or one CPU rank) and the links between devices. GPU figures are
the vendors' data sheets (dense, no sparsity); `cpu` is measured on this machine: one thread's fp32
matmul rate and memory bandwidth, and gloo's point-to-point bandwidth and latency between two
local processes, measured once and cached.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3


class PlanError(ValueError):
    """Bad planner input; the message is one line naming the setting, the value and what is allowed."""


@dataclass(frozen=True)
class Efficiency:
    """How much of the data sheet a real step gets, per kind of work. These are the planner's
    assumptions; everything else is arithmetic.

    matmul: sustained fraction of peak for the GEMMs of a transformer block (large GPU GEMMs reach
        70-80% in isolation; 0.65 leaves room for their smaller shapes under tp).
    attention: sustained fraction of the bf16 peak for flash attention forward + backward, on the
        FLOPs it does (causal: half the scores); attention runs in bf16 under FP8 too.
    memory: fraction of the memory bandwidth that element-wise kernels reach.
    link: fraction of a link's bandwidth that collectives reach (NCCL bus bandwidth ~80%).
    cp_overlap: share of ring-attention transfer time hidden behind the attention kernels (loom
        posts the next block's transfer before the current block's kernel).
    dp_overlap: share of FSDP's all-gathers and reduce-scatters hidden behind compute (prefetch).
    layer_overhead_s: fixed time per layer, micro-batch and pass (forward or backward) outside the
        FLOP- and bandwidth-bound work: kernel launches, Python.
    collective_latency_s: fixed cost of each collective or transfer.
    tp_layer_overhead_s, cp_step_overhead_s, fsdp_block_overhead_s: framework time per layer and
        pass under tp (DTensor dispatch and redistribution), per ring step and pass under cp (tile
        planning, merges), per block gather or reduce under FSDP; small on GPUs (asynchronous
        kernels hide them), large on CPU ranks that run them on the cores that compute.
    """

    matmul: float
    attention: float
    memory: float
    link: float
    cp_overlap: float
    dp_overlap: float
    layer_overhead_s: float
    collective_latency_s: float
    tp_layer_overhead_s: float = 0.0
    cp_step_overhead_s: float = 0.0
    fsdp_block_overhead_s: float = 0.0
    fp8_matmul: float = 0.0  # sustained fraction of the FP8 peak for the blocks' GEMMs under FP8


# fp8_matmul and attention are fitted to NeMo's long-sequence table (in-sample, see
# benchmarks/long_sequence_cp.py): the FP8 GEMM share from its 4K row, where GEMMs dominate,
# attention from its 1M row, where attention is 97% of the FLOPs; every other constant is set
# from the data sheets and typical kernel figures named above, not fitted.
GPU_EFFICIENCY = Efficiency(matmul=0.65, attention=0.32, memory=0.7, link=0.8, cp_overlap=0.9, dp_overlap=0.9,
                            layer_overhead_s=40e-6, collective_latency_s=15e-6, fp8_matmul=0.77)


@dataclass(frozen=True)
class HardwareSpec:
    """One device and its links. Bandwidths are per device, one direction, in GB/s (1e9 B/s)."""

    name: str
    description: str
    peak_tflops: dict[str, float]  # training dtype -> dense TFLOP/s per device
    memory_gb: float  # GiB a process can allocate on the device
    intra_node_gbps: float  # to a device in the same node (NVLink)
    inter_node_gbps: float  # to a device in another node (InfiniBand / RoCE)
    gpus_per_node: int
    memory_gbps: float  # device memory bandwidth (the optimizer step is bound by it)
    efficiency: Efficiency = GPU_EFFICIENCY
    reserved_gb: float = 1.5  # CUDA context, NCCL and cuBLAS workspaces, not seen by the allocator
    cores: int | None = None  # CPU only: devices (ranks) beyond this many share the cores

    def peak_flops(self, dtype: str) -> float:
        if dtype not in self.peak_tflops:
            raise PlanError(f"--dtype={dtype!r} has no peak for {self.name}; allowed: {', '.join(self.peak_tflops)}")
        return self.peak_tflops[dtype] * 1e12


GPUS: dict[str, HardwareSpec] = {
    "h100-sxm-80gb": HardwareSpec(
        "h100-sxm-80gb", "NVIDIA H100 SXM5 80GB, NVLink 4 (450 GB/s per direction), 8 x 400 Gb/s IB per node",
        {"bfloat16": 989.4, "fp8": 1978.9, "float32": 66.9}, 79.1, 450.0, 50.0, 8, 3350.0),
    "h100-94gb": HardwareSpec(
        "h100-94gb", "NVIDIA H100 NVL 94GB (PCIe; NVLink bridge 300 GB/s per direction), 8 x 400 Gb/s per node",
        {"bfloat16": 835.5, "fp8": 1670.5, "float32": 60.0}, 93.0, 300.0, 50.0, 8, 3900.0),
    "h200-141gb": HardwareSpec(
        "h200-141gb", "NVIDIA H200 SXM 141GB, NVLink 4 (450 GB/s per direction), 8 x 400 Gb/s IB per node",
        {"bfloat16": 989.4, "fp8": 1978.9, "float32": 66.9}, 140.0, 450.0, 50.0, 8, 4800.0),
    "a100-40gb": HardwareSpec(
        "a100-40gb", "NVIDIA A100 SXM4 40GB, NVLink 3 (300 GB/s per direction), 8 x 200 Gb/s IB per node",
        {"bfloat16": 312.0, "float32": 19.5}, 39.4, 300.0, 25.0, 8, 1555.0),
    "a100-80gb": HardwareSpec(
        "a100-80gb", "NVIDIA A100 SXM4 80GB, NVLink 3 (300 GB/s per direction), 8 x 200 Gb/s IB per node",
        {"bfloat16": 312.0, "float32": 19.5}, 79.1, 300.0, 25.0, 8, 2039.0),
}
ALIASES = {"h100-sxm": "h100-sxm-80gb", "h100": "h100-sxm-80gb", "h100-nvl": "h100-94gb", "h200": "h200-141gb",
           "a100": "a100-80gb"}
SPEC_NAMES = (*GPUS, "cpu")


# A CPU rank runs one thread: matmuls of loom's small CPU models reach about half of the big-GEMM
# calibration, attention (the flash op) a third; gloo cannot overlap transfers with compute on the
# same cores. The four framework overheads (Python, DTensor dispatch, ring tiles, FSDP hooks) are
# fitted by least squares to the cpu_4d sweep (benchmarks/fit_cpu_constants.py, results in
# benchmarks/results/plan_vs_measured.md); everything else in the cpu spec is measured.
CPU_EFFICIENCY = Efficiency(matmul=0.55, attention=0.35, memory=0.5, link=1.0, cp_overlap=0.3, dp_overlap=0.0,
                            layer_overhead_s=1.34e-3, collective_latency_s=100e-6, tp_layer_overhead_s=22.2e-3,
                            cp_step_overhead_s=3.07e-3, fsdp_block_overhead_s=6.27e-3)


def cpu_spec() -> HardwareSpec:
    """This machine as a spec: a device is one rank with one thread. Its one-thread fp32 matmul
    rate, memory bandwidth and gloo link are measured together, once, and cached."""
    cal = cpu_calibration()
    cores = os.cpu_count() or 1
    mem = _total_memory_gib()
    eff = dataclasses.replace(CPU_EFFICIENCY, collective_latency_s=cal["latency_s"])
    return HardwareSpec(
        "cpu", f"this machine: {cores} cores, {mem:.0f} GiB; per rank (1 thread): fp32 matmul "
        f"{cal['matmul_flops'] / 1e9:.0f} GFLOP/s, memory {cal['copy_gbps']:.1f} GB/s; gloo {cal['gbps']:.2f} GB/s, "
        f"{1e6 * cal['latency_s']:.0f} us per message (measured)",
        {"float32": cal["matmul_flops"] / 1e12}, mem, cal["gbps"], cal["gbps"], cores, cal["copy_gbps"],
        efficiency=eff, reserved_gb=0.23, cores=cores)


def get_spec(name: str, overrides: dict | None = None) -> HardwareSpec:
    """The named spec with any field overridden (e.g. {"memory_gb": 64})."""
    key = ALIASES.get(name, name)
    if key == "cpu":
        spec = cpu_spec()
    elif key in GPUS:
        spec = GPUS[key]
    else:
        import difflib

        close = difflib.get_close_matches(name, [*SPEC_NAMES, *ALIASES], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PlanError(f"--gpu={name!r} is unknown{hint} allowed: {', '.join(SPEC_NAMES)}")
    for field, value in (overrides or {}).items():
        if value is None:
            continue
        if field == "peak_tflops":
            spec = dataclasses.replace(spec, peak_tflops={k: value for k in spec.peak_tflops})
        else:
            spec = dataclasses.replace(spec, **{field: value})
    return spec


def _copy_gbps() -> float:
    """One thread's memory bandwidth: bytes read plus written by a 64 MB copy, best of 5."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.ones(16 * 2**20), torch.empty(16 * 2**20)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            b.copy_(a)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 2 * a.numel() * 4 / best / 1e9


def _total_memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return 16.0


# -- gloo link calibration -----------------------------------------------------------------------
def cpu_calibration(cache: Path | None = None) -> dict:
    """{"matmul_flops", "copy_gbps", "gbps", "latency_s"}: one thread's fp32 matmul rate and memory
    bandwidth, and a gloo send/recv between two local processes; measured once on an idle machine
    (the planner's own cache: the trainer's calibration may run beside busy ranks)."""
    import torch

    from loom.files import cache_dir
    from loom.metrics.meter import _cpu_model, cached_measurement

    key = f"{_cpu_model()}|cores={os.cpu_count()}|torch={torch.__version__}"
    return cached_measurement(cache or cache_dir() / "cpu_plan.json", key, _measure_cpu)


def _measure_cpu() -> dict:
    import socket
    import tempfile

    import torch
    import torch.multiprocessing as mp

    from loom.metrics.meter import measure_matmul_flops
    from loom.parallel.collectives import gloo_link_worker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flops = measure_matmul_flops(torch.float32, n=1024, repeats=20, warmup_s=1.0)
    finally:
        torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "link.json")
        mp.start_processes(gloo_link_worker, args=(port, out), nprocs=2, start_method="spawn")
        link = json.loads(Path(out).read_text())
    return {"matmul_flops": flops, "copy_gbps": _copy_gbps(), **link}
