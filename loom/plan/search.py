"""Layout search: every valid (tp, cp, pp, dp, ep, micro batch) for a model on N devices, each with
its predicted memory and throughput, ranked by predicted tokens/s per device (ep, for MoE models:
a divisor of dp x cp and of the experts)."""
from __future__ import annotations

from dataclasses import dataclass

from loom.models.transformer import ModelConfig
from loom.models.registry import UnknownModelError, get_model_config
from loom.parallel.zero import ZERO_MODES
from loom.plan.hardware import GIB, HardwareSpec, PlanError
from loom.plan.memory import Layout, MemoryBreakdown, capacity_bytes, memory_breakdown
from loom.plan.timing import Throughput, TimeBreakdown, step_time, throughput

MICRO_BATCHES = (1, 2, 4, 8)
RECOMPUTE_ORDER = ("none", "selective", "full")  # fastest first; the first that fits is chosen


@dataclass(frozen=True)
class PlanRow:
    layout: Layout
    memory: MemoryBreakdown
    time: TimeBreakdown
    perf: Throughput
    fits: bool

    def as_json(self) -> dict:
        lay = self.layout
        return {"tp": lay.tp, "cp": lay.cp, "pp": lay.pp, "dp": lay.dp, "ep": lay.ep, "micro_batch": lay.micro_batch,
                "recompute": lay.recompute, "zero": lay.zero, "memory_gb": round(self.memory.total / GIB, 3), "fits": self.fits,
                "tokens_per_s_per_device": round(self.perf.tokens_per_s_per_device, 3),
                "tflops_per_device": round(self.perf.tflops_per_device, 4),
                "mfu": round(self.perf.mfu, 4), "step_time_s": round(self.perf.step_time_s, 6)}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_model(name: str) -> ModelConfig:
    try:
        return get_model_config(name)
    except UnknownModelError as e:
        raise PlanError(str(e).replace("model.name=", "--model=")) from None


def check_inputs(cfg: ModelConfig, gpus: int, seq_len: int, global_batch: int, tp: int | None, cp: int | None,
                 pp: int | None, micro_batch: int | None, ep: int | None = None) -> None:
    """One-line errors for input no layout can satisfy."""
    for flag, v in (("--gpus", gpus), ("--seq-len", seq_len), ("--global-batch", global_batch),
                    ("--tp", tp), ("--cp", cp), ("--pp", pp), ("--micro-batch", micro_batch), ("--ep", ep)):
        if v is not None and v < 1:
            raise PlanError(f"{flag}={v} must be a positive integer")
    fixed = 1
    for flag, v in (("--tp", tp), ("--cp", cp), ("--pp", pp)):
        if v is not None:
            fixed *= v
            if gpus % fixed:
                raise PlanError(f"{flag}={v} does not divide --gpus={gpus} (with the other fixed degrees: {fixed})")
    if ep is not None and ep > 1:
        if not cfg.moe_experts:
            raise PlanError(f"--ep={ep} needs a mixture-of-experts model; this one is dense: allowed --ep=1")
        if cfg.moe_experts % ep:
            raise PlanError(f"--ep={ep} does not divide the model's n_experts={cfg.moe_experts}")
    if tp is not None:
        for key in ("n_heads", "n_kv_heads"):
            if getattr(cfg, key) % tp:
                raise PlanError(f"--tp={tp} does not divide the model's {key}={getattr(cfg, key)}")
    if pp is not None and pp > cfg.n_layers:
        raise PlanError(f"--pp={pp} exceeds the model's n_layers={cfg.n_layers}")
    if cp is not None and cp > 1:
        chunks = 2 * cp * (tp or 1)
        if seq_len % chunks:
            raise PlanError(f"--seq-len={seq_len} is too short or not divisible for --cp={cp}: it must be a "
                            f"multiple of 2 x cp{' x tp' if tp else ''} = {chunks}")


def candidate_layouts(cfg: ModelConfig, gpus: int, spec: HardwareSpec, seq_len: int, global_batch: int,
                      dtype: str, tp: int | None = None, cp: int | None = None, pp: int | None = None,
                      micro_batch: int | None = None, recompute: str | None = None,
                      zero: int | None = None, ep: int | None = None) -> list[Layout]:
    """Every layout loom can run (its config validation's rules), one per recompute mode and
    FSDP sharding mode (parallel.zero; only 3 where nothing is FSDP-sharded)."""
    out = []
    tps = [tp] if tp else [d for d in _divisors(gpus) if cfg.n_kv_heads % d == 0 and cfg.n_heads % d == 0
                           and (spec.cores is not None or d <= spec.gpus_per_node)]
    for t in tps:
        cps = [cp] if cp else [d for d in _divisors(gpus // t) if d & (d - 1) == 0]
        for c in cps:
            if gpus % (t * c) or (c > 1 and seq_len % (2 * c * t)) or (c == 1 and t > 1 and seq_len % t):
                continue
            pps = [pp] if pp else [d for d in _divisors(gpus // (t * c)) if d <= cfg.n_layers]
            for p in pps:
                if gpus % (t * c * p):
                    continue
                dp = gpus // (t * c * p)
                for mb in ([micro_batch] if micro_batch else MICRO_BATCHES):
                    if global_batch % (dp * mb) or global_batch // (dp * mb) < p:
                        continue
                    zeros = [zero] if zero else (ZERO_MODES if dp * c > 1 else (3,))
                    for e in _expert_degrees(cfg, dp * c, ep):
                        for rc in ([recompute] if recompute else RECOMPUTE_ORDER):
                            for z in zeros:
                                out.append(Layout(tp=t, cp=c, pp=p, dp=dp, micro_batch=mb, seq_len=seq_len,
                                                  global_batch=global_batch, recompute=rc, dtype=dtype, zero=z, ep=e))
    return out


def _expert_degrees(cfg: ModelConfig, shard: int, ep: int | None) -> list[int]:
    """ep degrees a layout can take: divisors of dp x cp (the ranks ep borrows) and of the experts."""
    if ep is not None:
        return [ep] if shard % ep == 0 else []
    return [e for e in _divisors(shard) if cfg.moe_experts % e == 0] if cfg.moe_experts else [1]


def evaluate(cfg: ModelConfig, layout: Layout, spec: HardwareSpec) -> PlanRow:
    mem = memory_breakdown(cfg, layout, spec)
    time = step_time(cfg, layout, spec)
    return PlanRow(layout, mem, time, throughput(cfg, layout, spec, time),
                   mem.total <= capacity_bytes(spec, layout.world))


def plan(cfg: ModelConfig, gpus: int, spec: HardwareSpec, seq_len: int, global_batch: int, dtype: str = "bfloat16",
         tp: int | None = None, cp: int | None = None, pp: int | None = None, micro_batch: int | None = None,
         recompute: str | None = None, zero: int | None = None, ep: int | None = None) -> list[PlanRow]:
    """Ranked rows: layouts that fit first, by predicted tokens/s per device; per (tp, cp, pp, micro
    batch) the fastest recompute and zero modes that fit (or, if none fits, the smallest, marked
    OOM)."""
    check_inputs(cfg, gpus, seq_len, global_batch, tp, cp, pp, micro_batch, ep)
    spec.peak_flops(dtype)  # a dtype the spec has a peak for
    layouts = candidate_layouts(cfg, gpus, spec, seq_len, global_batch, dtype, tp, cp, pp, micro_batch, recompute,
                                zero, ep)
    if not layouts:
        raise PlanError(f"no layout of {gpus} devices runs --seq-len={seq_len} with --global-batch={global_batch} "
                        f"(global batch must be a multiple of dp x micro batch, with at least pp micro-batches)")
    def preference(row: PlanRow) -> tuple:  # fitting first, then faster; else smaller
        return (row.fits, row.perf.tokens_per_s_per_device if row.fits else -row.memory.total)

    chosen: dict[tuple, PlanRow] = {}
    for layout in layouts:
        key = (layout.tp, layout.cp, layout.pp, layout.ep, layout.micro_batch)
        row = evaluate(cfg, layout, spec)
        if key not in chosen or preference(row) > preference(chosen[key]):
            chosen[key] = row
    return sorted(chosen.values(), key=lambda r: (not r.fits, -r.perf.tokens_per_s_per_device))
