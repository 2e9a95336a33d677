"""Where a run's metrics go, behind one small interface: the JSONL file (the contract of the
metrics rows), TensorBoard, Weights & Biases, and the loss-curve plot.

A sink gets every logged row (`write`), the run's loss curves once it has trained to the end
(`finish`), and `close` in every case, also after an error or a stop. Only rank 0 opens sinks.
To add one: subclass MetricSink, and open it in `open_sinks` from its [metrics] key.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

Curve = list[tuple[int, float]]  # (step, loss)


class MetricSink:
    def write(self, row: dict) -> None:
        """One logged step (loom's metrics row: see the README's metrics contract)."""

    def finish(self, train_curve: Curve, val_curve: Curve) -> None:
        """The run trained to its end; its whole loss curves (a resumed run's include the steps
        before its checkpoint)."""

    def close(self) -> None:
        """Release what the sink holds (files, a W&B run); called once, whatever happened."""


def scalars(row: dict, sep: str = "/") -> dict[str, float]:
    """The numeric entries of a row, nested ones flattened ("moe_expert_share/max"), without
    `step` and without nulls (a non-finite loss)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update({f"{key}{sep}{k}": v for k, v in scalars(value, sep).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[key] = value
    return out


class JsonlSink(MetricSink):
    """Appends one JSON object per logged step, durably (a crash loses no row written)."""

    def __init__(self, path: str, fresh: bool, keep_until: int = 0):
        """fresh: a new run replaces the file. Otherwise (a resumed run) rows after step
        keep_until, logged before a crash by steps the run now repeats, are dropped."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()
        elif self.path.exists():
            self._keep_rows_until(keep_until)

    def _keep_rows_until(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line cut short by a crash
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


class TensorBoardSink(MetricSink):
    """Every numeric entry as a scalar, at its step."""

    def __init__(self, folder: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(folder)

    def write(self, row: dict) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.writer.close()


class WandbSink(MetricSink):
    """A Weights & Biases run "project/name" (or "project": W&B names it) holding the numeric
    entries at their steps, the run's settings as its config, and its files under `folder`.
    Online or offline as wandb's own settings say (`WANDB_MODE=offline`, `wandb login`)."""

    def __init__(self, target: str, folder: str, config: dict):
        import wandb

        project, _, name = target.partition("/")
        Path(folder).mkdir(parents=True, exist_ok=True)
        # Silent, and not capturing the console: the run's own log lines and summary are loom's.
        self.run = wandb.init(project=project, name=name or None, dir=folder, config=config,
                              settings=wandb.Settings(silent=True, console="off"))

    def write(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def finish(self, train_curve: Curve, val_curve: Curve) -> None:
        if train_curve:
            self.run.summary["final_loss"] = train_curve[-1][1]
        if val_curve:
            self.run.summary["final_val_loss"] = val_curve[-1][1]

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() can return before W&B's service has written the run's last records; teardown
        # waits for it. Its atexit hook would too, but torchrun workers leave by os._exit
        # (loom.train.worker_exit), and an in-process caller reads the files at once.
        wandb.teardown()


class LossPlotSink(MetricSink):
    """The training and validation loss curves as a PNG, drawn when the run ends."""

    def __init__(self, path: str, title: str):
        self.path, self.title = path, title
        self.by_source: dict[str, list[tuple[int, float]]] = {}  # a blend's validation loss per source

    def write(self, row: dict) -> None:
        for name, loss in (row.get("val_loss_by_source") or {}).items():
            self.by_source.setdefault(name, []).append((row["step"], loss))

    def finish(self, train_curve: Curve, val_curve: Curve) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        if train_curve:
            ax.plot(*zip(*train_curve), label="train loss", lw=1.2)
        if val_curve:
            ax.plot(*zip(*val_curve), "o-", label="validation loss", lw=1.2)
        for name, curve in self.by_source.items():
            ax.plot(*zip(*curve), "s--", label=f"validation: {name}", lw=1, ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(self.title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.path, dpi=110)
        plt.close(fig)


def open_sinks(metrics, fresh: bool, keep_until: int, plot_title: str, run_config: dict) -> list[MetricSink]:
    """The sinks the [metrics] section asks for (`metrics`: jsonl, tensorboard, wandb, plot).
    fresh / keep_until: see JsonlSink; run_config: the run's settings, for W&B."""
    sinks: list[MetricSink] = [JsonlSink(metrics.jsonl, fresh, keep_until)]
    if metrics.tensorboard:
        sinks.append(TensorBoardSink(metrics.tensorboard))
    if metrics.wandb:
        sinks.append(WandbSink(metrics.wandb, str(Path(metrics.jsonl).parent), run_config))
    if metrics.plot:
        sinks.append(LossPlotSink(metrics.plot, plot_title))
    return sinks
