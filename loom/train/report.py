"""What a run tells its user: log lines, the metrics JSONL, TensorBoard, summary table, plot."""
from __future__ import annotations

import json
import os
from pathlib import Path

from loom.settings import need


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


class MetricsWriter:
    """Appends one JSON object per logged step; mirrors scalars to TensorBoard if asked."""

    def __init__(self, jsonl: str, tensorboard: str, fresh: bool, keep_until: int = 0):
        """fresh: a new run replaces the file. Otherwise (a resumed run) rows after step
        keep_until, logged before a crash by steps the run now repeats, are dropped."""
        self.path = Path(jsonl)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()
        elif self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= keep_until:
                        kept.append(line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut short by a crash
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tensorboard)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step" and value is not None:
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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


def plot_losses(path: str, train: list[tuple[int, float]], val: list[tuple[int, float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_metrics(m) -> None:
    """The [metrics] section's checks."""
    need(m.log_every > 0, f"metrics.log_every={m.log_every} must be a positive integer")
    need(bool(m.jsonl), "metrics.jsonl='' must name a file")
