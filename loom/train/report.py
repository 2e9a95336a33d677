"""What a run tells its user: a metrics row per logged step (through the sinks of
loom.metrics.sinks: JSONL, TensorBoard, W&B, the loss plot) with its log line, and the summary
table at the end. Every rank takes part in a row's collectives; rank 0 writes and prints."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

from loom.metrics.flops import flops_per_token, hardware_flops_per_token, param_counts
from loom.metrics.meter import Peak, ThroughputMeter, device_peak, forget_cpu_peak, peak_memory_bytes
from loom.metrics.sinks import MetricSink, open_sinks
from loom.models.moe import routing_statistics
from loom.settings import DTYPES, need

FLOPS_CONVENTION = "megatron"


def format_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def log_line(row: dict, total_steps: int) -> str:
    parts = [
        f"step {row['step']:>{len(str(total_steps))}}/{total_steps}",
        "loss " + (f"{row['loss']:.4f}" if row["loss"] is not None else "non-finite"),
    ]
    if row.get("val_loss") is not None:
        parts.append(f"val {row['val_loss']:.4f}")
    parts += [
        f"lr {row['lr']:.2e}",
        "gnorm " + (f"{row['grad_norm']:.3f}" if row["grad_norm"] is not None else "non-finite"),
        f"{format_count(row['tokens_per_s_per_device'])} tok/s/dev",
        f"{row['tflops_per_device']:.3f} TFLOP/s/dev",
        "MFU " + (f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"),
        f"mem {format_bytes(row['peak_memory_bytes'])}",
        f"{1000 * row['step_time_s']:.0f} ms/step",
    ]
    return " | ".join(parts)


def summary_table(items: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in items)
    vwidth = max(len(v) for _, v in items)
    rule = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    lines = [rule]
    for k, v in items:
        lines.append(f"| {k:<{width}} | {v:<{vwidth}} |")
    lines.append(rule)
    return "\n".join(lines)


def check_metrics(m) -> None:
    """The [metrics] section's checks."""
    need(m.log_every > 0, f"metrics.log_every={m.log_every} must be a positive integer")
    need(bool(m.jsonl), "metrics.jsonl='' must name a file")
    if m.tensorboard:
        _need_package("tensorboard", f"metrics.tensorboard={m.tensorboard!r}", "tensorboard")
    if m.wandb:
        project, _, name = m.wandb.partition("/")
        need(bool(project) and "/" not in name,
             f"metrics.wandb={m.wandb!r} must be 'project' or 'project/run' (a Weights & Biases project and run name)")
        _need_package("wandb", f"metrics.wandb={m.wandb!r}", "wandb")


def _need_package(module: str, setting: str, extra: str) -> None:
    import importlib.util

    need(importlib.util.find_spec(module) is not None,
         f"{setting} needs the {module} package (pip install 'loom-train[{extra}]'); allowed without it: ''")


@dataclass
class StepTimes:
    """Step times of a run: all of them, and those since the last metrics row."""

    all: list[float] = field(default_factory=list)
    window: list[float] = field(default_factory=list)
    data_window: list[float] = field(default_factory=list)  # of which waiting for the step's batches
    all_data: list[float] = field(default_factory=list)

    def add(self, seconds: float, data_wait: float = 0.0) -> None:
        self.all.append(seconds)
        self.all_data.append(data_wait)
        self.window.append(seconds)
        self.data_window.append(data_wait)

    def take_window(self) -> tuple[float, float]:
        """The mean step time and data wait since the last row, which starts a new window."""
        mean = sum(self.window) / len(self.window)
        wait = sum(self.data_window) / len(self.data_window)
        self.window, self.data_window = [], []
        return mean, wait

    def steady(self) -> float:
        """The mean step time after the first steps, which pay for allocation and warm-up."""
        steady = self.all[min(3, len(self.all) - 1):] or [float("nan")]
        return sum(steady) / len(steady)


class RunReport:
    """The metrics of one call of Trainer.train: a row per logged step (its figures' collectives
    on every rank; rank 0 writes it to the sinks and prints its line), the progress bar, and
    the summary at the end. start: the step the run starts after (0, or a resumed checkpoint's)."""

    def __init__(self, cfg, model, layout, batches, start: int, progress: bool):
        from tqdm import tqdm

        t = cfg.train
        self.cfg, self.model, self.layout, self.batches, self.start = cfg, model, layout, batches, start
        attention_len = batches.attention_len  # a pass over the data's document index when packed: once
        lora = {} if model.lora is None else {"lora": model.lora}
        fpt = flops_per_token(model.config, attention_len, FLOPS_CONVENTION, **lora)
        self.hw_ratio = hardware_flops_per_token(model.config, attention_len, t.recompute, FLOPS_CONVENTION, **lora) / fpt
        # Only rank 0 reports; a CPU calibration on every rank would just contend for the cores.
        rank0 = layout.rank == 0
        peak = device_peak(layout.device, DTYPES[t.dtype], t.fp8 != "none") if rank0 else Peak(None, "not rank 0")
        self.meter = ThroughputMeter(batches.tokens_per_step, fpt, layout.world_size, peak)
        title = f"loom: {cfg.model.name} ({format_count(param_counts(model.config).total)} params), {t.dtype}"
        self.sinks: list[MetricSink] = open_sinks(cfg.metrics, start == 0, start, title, _run_config(cfg)) if rank0 else []
        self.bar = tqdm(total=t.steps, initial=start, desc="training", unit="step", file=sys.stderr,
                        disable=not (progress and rank0) or None, dynamic_ncols=True)
        self.times = StepTimes()
        self.skipped = 0
        self.started = time.perf_counter()

    def start_clock(self) -> None:
        """The run's wall time counts from here (after the start's validation)."""
        self.started = time.perf_counter()

    def step_done(self, loss: float, seconds: float, data_wait: float = 0.0) -> None:
        """A step of `seconds`, `data_wait` of them spent reading its batches."""
        self.times.add(seconds, data_wait)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}")

    def skipped_step(self, step: int, what: str) -> None:
        """A step whose loss or gradient norm was not finite, dropped (train.on_nonfinite='skip')."""
        self.skipped += 1
        if self.layout.rank == 0:
            self.say(f"step {step}: non-finite {what}; step skipped (train.on_nonfinite='skip')")

    def say(self, line: str) -> None:
        self.bar.write(line, file=sys.stdout)

    def due(self, step: int, last: int, val_loss: float | None) -> bool:
        """Whether step gets a metrics row: every metrics.log_every, the first and last steps of
        the run, and every validation."""
        return (step % self.cfg.metrics.log_every == 0 or step == last or val_loss is not None
                or step == self.start + 1)

    def log(self, step: int, lr: float, loss: float, grad_norm: float, val_loss: float | None,
            val_by_source: dict[str, float] | None = None) -> None:
        """One metrics row over the steps since the last (a collective: every rank calls it);
        val_by_source: a blend's validation loss per source, at a validation step."""
        step_time, data_wait = self.times.take_window()
        m = self.meter.step(step_time)
        row = {
            "step": step,
            "loss": loss if math.isfinite(loss) else None,  # JSON has no NaN
            "lr": lr,
            "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
            "tokens_per_s": m.tokens_per_s,
            "tokens_per_s_per_device": m.tokens_per_s_per_device,
            "tflops_per_device": m.tflops_per_device,
            "hw_tflops_per_device": m.tflops_per_device * self.hw_ratio,
            "mfu": m.mfu,
            "peak_memory_bytes": self.peak_memory(),
            "step_time_s": m.step_time_s,
            "val_loss": val_loss,
            "data_wait_s": data_wait,
            **self.moe_statistics(),
            **self.blend_figures(step, val_by_source),
        }
        if step == 1:
            row = {**row, "layout": self.layout.degrees(), "flops_convention": FLOPS_CONVENTION,
                   "peak_source": self.meter.peak.source}
            if self.batches.blend is not None:
                row["blend"] = [[w, name] for w, name in zip(self.batches.blend.weights, self.batches.blend.names)]
        for sink in self.sinks:
            sink.write(row)
        if self.sinks:
            self.say(log_line(row, self.cfg.train.steps))

    def peak_memory(self) -> int:
        """The largest peak memory over all ranks (a collective)."""
        return self.layout.max(peak_memory_bytes(self.layout.device))

    def blend_figures(self, step: int, val_by_source: dict[str, float] | None) -> dict:
        """A blend's samples so far from each source, and its validation loss per source."""
        drawn = self.batches.samples_by_source(step)
        if drawn is None:
            return {}
        return {"samples_by_source": drawn, **({"val_loss_by_source": val_by_source} if val_by_source else {})}

    def moe_statistics(self) -> dict:
        """The last micro-batch's routing over every MoE layer of every rank ({} for a dense
        model; a collective)."""
        if not self.model.config.moe_experts:
            return {}
        return routing_statistics(self.model.moe_layers(), self.model.config.moe_experts, self.layout.device,
                                  self.layout.sum_)

    def summary(self, state, last: int, checkpoint_saves: list, resumed_from) -> dict:
        """The run's figures over its steady state (a collective: the peak memory)."""
        cfg, t = self.cfg, self.cfg.train
        m = self.meter.step(self.times.steady())
        peak = self.meter.peak
        if self.meter.peak_exceeded and self.layout.device.type == "cpu":
            forget_cpu_peak(DTYPES[t.dtype])
            peak = Peak(peak.flops, f"{peak.source}; stale: this run achieved more, so it is discarded and "
                                    f"measured again next run")
        total = param_counts(self.model.config).total
        return {
            "model": cfg.model.name, "params": total, "trainable_params": self.trainable_params(total),
            "packing_efficiency": self.batches.packing_efficiency, "layout": self.layout.degrees(),
            "steps": last, "tokens": last * self.batches.tokens_per_step,
            "wall_time_s": time.perf_counter() - self.started, "step_time_s": m.step_time_s,
            "tokens_per_s": m.tokens_per_s, "tokens_per_s_per_device": m.tokens_per_s_per_device,
            "tflops_per_device": m.tflops_per_device, "mfu": m.mfu, "peak_flops": peak.flops,
            "peak_source": peak.source, "flops_convention": FLOPS_CONVENTION, "peak_memory_bytes": self.peak_memory(),
            "first_loss": state.train_curve[0][1], "final_loss": state.train_curve[-1][1],
            "initial_val_loss": state.val_curve[0][1], "final_val_loss": state.val_curve[-1][1],
            "resumed_from": str(resumed_from) if resumed_from else None, "skipped_steps": self.skipped,
            "checkpoint_saves": list(checkpoint_saves),
            "dtype": t.dtype if t.fp8 == "none" else f"{t.dtype} + fp8 {t.fp8}",
            "recompute": t.recompute, "device": str(self.layout.device), "kernels": self.model.kernels,
            "data_wait_s": sum(self.times.all_data) / max(1, len(self.times.all_data)),
            **self.blend_summary(last),
        }

    def blend_summary(self, last: int) -> dict:
        """A blend's sources: weight, samples read and epochs of each over the run's `last` steps."""
        blend = self.batches.blend
        if blend is None:
            return {}
        samples = last * self.cfg.train.global_batch
        return {"blend": [{"source": name, "weight": w, "samples": n, "epochs": e} for name, w, n, e in
                          zip(blend.names, blend.weights, blend.drawn_at(samples), blend.epochs(samples))]}

    def trainable_params(self, total: int) -> int:
        """Parameters that train: all of them, or LoRA's adapters (counted from the model config)."""
        if self.model.lora is None:
            return total
        from loom.metrics.flops import adapter_params

        return adapter_params(self.model.config, self.model.lora)

    def finish(self, state) -> None:
        """The run trained to its end: the sinks get its whole curves (the plot is drawn)."""
        for sink in self.sinks:
            sink.finish(state.train_curve, state.val_curve)

    def close(self) -> None:
        self.bar.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _run_config(cfg) -> dict:
    """The run's settings by section, for sinks that record them (W&B's config)."""
    import dataclasses

    return {name: dataclasses.asdict(getattr(cfg, name)) for name in (f.name for f in dataclasses.fields(cfg))}


def format_summary(s: dict, jsonl: str, plot: str) -> str:
    """The summary table `loom train` prints at the end of a run."""
    layout = " x ".join(f"{k}={v}" for k, v in s["layout"].items() if k != "world_size" and v > 1) or "single process"
    trainable = s.get("trainable_params", s["params"])
    items = [
        ("model", f"{s['model']} ({format_count(s['params'])} params"
                  + (f", {format_count(trainable)} = {100 * trainable / s['params']:.2f}% trainable)"
                     if trainable != s["params"] else ")")),
        ("layout", f"{layout} ({s['layout']['world_size']} rank(s), {s['device']}, {s['dtype']})"),
        ("steps / tokens", f"{s['steps']} / {format_count(s['tokens'])}"),
        ("wall time", f"{s['wall_time_s']:.1f} s" + (f" (resumed from {s['resumed_from']})" if s.get("resumed_from") else "")),
        ("train loss", f"{s['first_loss']:.3f} -> {s['final_loss']:.3f}"
                       + (f" ({s['skipped_steps']} non-finite steps skipped)" if s.get("skipped_steps") else "")),
        ("validation loss", f"{s['initial_val_loss']:.3f} -> {s['final_val_loss']:.3f}"
                            + (" (answer tokens)" if s.get("packing_efficiency") is not None else "")
                            + (" (the blend's weighted mean)" if s.get("blend") else "")),
        *[(f"source {b['source']}", f"weight {b['weight']:.3f}: {b['samples']:,} samples, {b['epochs']:.3f} epochs")
          for b in s.get("blend", [])],
        *([("packing", f"{100 * s['packing_efficiency']:.1f}% of the slots hold example tokens")]
          if s.get("packing_efficiency") is not None else []),
        ("tokens/s (global)", f"{s['tokens_per_s']:,.0f}"),
        ("tokens/s per device", f"{s['tokens_per_s_per_device']:,.0f}"),
        ("model TFLOP/s per device", f"{s['tflops_per_device']:.4f} ({s['flops_convention']} convention)"),
        ("peak FLOP/s", f"{s['peak_flops'] / 1e12:.4f} TFLOP/s, {s['peak_source']}" if s["peak_flops"] else s["peak_source"]),
        ("MFU", f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "n/a"),
        ("kernels", s["kernels"]),
        ("peak memory per device", format_bytes(s["peak_memory_bytes"])),
        ("metrics", jsonl + (f", loss curve {plot}" if plot else "")),
    ]
    return summary_table(items)
