"""The training run of one process or one torchrun rank, as a short loop over its parts:

    Layout               the process group and mesh of the layout (loom.parallel.layout)
    build_parallel_model the model on meta, converted, laid out, this rank's shards initialized
    TrainingBatches      this data rank's micro-batches of each step (loom.train.batches)
    StepEngine           forward/backward or the pipeline, clipping, AdamW (loom.train.step)
    Checkpointer         where the run starts, when it saves, how it stops (loom.train.checkpoint)
    RunReport            metrics rows, sinks and the summary (loom.train.report)
"""
from __future__ import annotations

import math
import os
import time

import torch

from loom.config import Config
from loom.models.transformer import ModelConfig
from loom.parallel.build import build_parallel_model
from loom.parallel.layout import Layout
from loom.train.batches import TrainingBatches
from loom.train.checkpoint import Checkpointer, TrainState
from loom.train.hangs import Activity
from loom.train.report import RunReport
from loom.train.resume import start_points
from loom.train.schedule import lr_at
from loom.train.signals import StopRequests
from loom.train.step import StepEngine


def resolve_device(name: str) -> torch.device:
    """CPU, or this rank's GPU (LOCAL_RANK under torchrun)."""
    use_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    if use_cuda:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class Trainer:
    """Single process, or one rank of a torchrun job (WORLD_SIZE > 1) with the configured layout."""

    def __init__(self, cfg: Config, model_cfg: ModelConfig, progress: bool = True, layout: Layout | None = None):
        """layout: the job's Layout of cfg.parallel, or None to join it here (WORLD_SIZE ranks)."""
        self.cfg, self.model_cfg = cfg, model_cfg
        self.activity = Activity()  # what this rank is doing, for the line a collective's timeout gives
        t = cfg.train
        if layout is None:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            layout = Layout.join(cfg.parallel, world_size, resolve_device(t.device), t.timeout_s)
        self.layout = layout
        self.rank = self.layout.rank
        self.progress = progress and self.rank == 0
        torch.manual_seed(t.seed)
        self.model = build_parallel_model(cfg, self.layout, self.layout.device)
        self.data = TrainingBatches(cfg, model_cfg, self.layout.dp_rank, self.layout.dp, self.layout.cp, self.progress)
        self.engine = StepEngine(cfg, self.model, self.layout, self.data.n_micro, self.activity)
        # Signals that stop the run after a step: installed by `loom train` around train().
        self.stop_requests = StopRequests()
        base, self.resumed_from = self.layout.agree(start_points(cfg, model_cfg))  # the same on every rank
        self.checkpointer = Checkpointer(cfg, model_cfg, self.model.parts, self.engine.optimizers, self.layout,
                                         base, self.activity)
        self.state = TrainState()
        if base is not None:
            self.checkpointer.load_weights(base)
        if self.resumed_from is not None:
            self.state = self.checkpointer.load(self.resumed_from)
            self.data.restore(self.state.data_state)
        self.val_by_source: dict[str, float] | None = None
        self.model.refresh_fp8_scales()

    def close(self, together: bool = True) -> None:
        """Leave the process group (see Layout.close)."""
        self.layout.close(together)

    def validation_loss(self) -> float:
        """The validation loss; for a blend, the blend's weighted mean of its sources' losses
        (each kept in self.val_by_source for the metrics row)."""
        losses = {name: self.engine.validation_loss(batches) for name, batches in self.data.validation_sets().items()}
        if self.data.blend is None:
            return losses[""]
        self.val_by_source = losses
        return sum(w * losses[name] for w, name in zip(self.data.blend.weights, self.data.blend.names))

    def train(self) -> dict:
        """Train from self.state.step to train.steps (or train.stop_at); returns the summary."""
        t = self.cfg.train
        last = min(t.steps, t.stop_at) if t.stop_at else t.steps  # stop_at: a planned exit, resumed later
        report = RunReport(self.cfg, self.model, self.layout, self.data, self.state.step, self.progress)
        try:
            if self.state.step == 0:  # a resumed run carries on the curves of the steps before it
                self.activity.now("validation")
                self.state.val_curve.append((0, self.validation_loss()))
            report.start_clock()
            for step in range(self.state.step + 1, last + 1):
                self.train_one_step(step, last, report)
            self.checkpointer.finish()
            summary = report.summary(self.state, last, self.checkpointer.timings, self.resumed_from)
            report.finish(self.state)
        finally:
            report.close()
        return summary

    def train_one_step(self, step: int, last: int, report: RunReport) -> None:
        """Step `step` (1-based) and what follows it: validation, its metrics row, a checkpoint,
        the agreed stop signal."""
        t = self.cfg.train
        lr = lr_at(step - 1, t.lr, t.min_lr, t.warmup_steps, t.steps)
        self.activity.now("forward and backward", step)
        t0 = time.perf_counter()
        batches = self.data.micro_batches(step - 1)
        data_wait = time.perf_counter() - t0
        loss, grad_norm = self.engine.train_step(batches, lr)
        if self.layout.device.type == "cuda":
            torch.cuda.synchronize(self.layout.device)
        seconds = time.perf_counter() - t0
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.nonfinite(step, loss, grad_norm, report)
        self.state.step = step
        self.state.train_curve.append((step, loss))
        report.step_done(loss, seconds, data_wait)
        val_loss, self.val_by_source = None, None
        if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
            self.activity.now("validation")
            val_loss = self.validation_loss()
            self.state.val_curve.append((step, val_loss))
        if report.due(step, last, val_loss):
            self.activity.now("the metrics of the step")
            report.log(step, lr, loss, grad_norm, val_loss, self.val_by_source)
        self.state.data_state = self.data.state(step)
        saved = self.checkpointer.save_if_due(self.state, last)
        self.activity.now("the check for a stop signal")
        signum = self.layout.max(self.stop_requests.signum)  # any rank's, so all stop after this step
        if signum:
            report.close()
            self.checkpointer.stop_with_checkpoint(signum, self.state, saved)

    def nonfinite(self, step: int, loss: float, grad_norm: float, report: RunReport) -> None:
        """A step whose loss or gradient norm is not finite (its update was not applied): stop
        the run, or with train.on_nonfinite='skip' count it and go on."""
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm} (loss {loss:.4f})"
        if self.cfg.train.on_nonfinite == "skip":
            report.skipped_step(step, what)
            return
        report.close()
        self.checkpointer.wait()
        raise FloatingPointError(f"non-finite {what} at step {step}; stopping (the weights were not updated and "
                                 f"no checkpoint of them is written; train.on_nonfinite='skip' drops such steps)")
