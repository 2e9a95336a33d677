"""One optimizer step on this rank: the model's inputs, forward and backward (or the pipeline
schedule's pass), the global gradient norm and clipping, the AdamW step. Also the validation
loss, which runs the same forward.

Losses are means over every rank's tokens in every layout: a micro-batch's loss is its own
tokens' mean (or, for packed fine-tuning examples and under context parallelism, its sum over a
share of the global divisor: loom.models.loss), micro-batches are averaged, and FSDP averages
gradients over the dp x cp ranks.
"""
from __future__ import annotations

import contextlib
import math

import torch

from loom.data.batch import Batch
from loom.models.attention import document_positions
from loom.models.loss import IGNORE_INDEX
from loom.parallel.build import ParallelModel
from loom.parallel.context import shard_batch
from loom.parallel.fsdp import set_micro_batch
from loom.parallel.zero import accumulates_unsharded_grads
from loom.parallel.layout import Layout
from loom.parallel.pipeline import PipelineDriver, tied_copy
from loom.settings import DTYPES
from loom.train.hangs import Activity
from loom.train.optim import build_optimizer, clip_grad_norm

ModelInputs = tuple[torch.Tensor, torch.Tensor, dict]  # tokens [B, L], labels [B, L], keyword inputs


class StepEngine:
    """Forward, backward and the optimizer over a ParallelModel laid out for `layout`."""

    def __init__(self, cfg, model: ParallelModel, layout: Layout, n_micro: int, activity: Activity | None = None):
        t, p = cfg.train, cfg.parallel
        self.cfg, self.model, self.layout = cfg, model, layout
        self.device, self.dtype = layout.device, DTYPES[t.dtype]
        self.activity = activity or Activity()
        # One AdamW per model part (pipeline stage), so that optimizer states are saved under the
        # full model's parameter names and load under any other pipeline split.
        self.optimizers = [build_optimizer(part, t) for part in model.parts]
        self.pipeline = None
        if layout.pp_enabled:
            reduce_each = layout.fsdp_enabled and not accumulates_unsharded_grads(p.zero, layout.pp, p.pp_schedule)
            self.pipeline = PipelineDriver(model.parts, model.stage_ids, model.n_stages, layout, self.device,
                                           p.pp_schedule, n_micro, reduce_every_micro_batch=reduce_each)
        # A micro-batch's auxiliary MoE losses weigh what its main loss weighs in the step's
        # gradients: 1 / micro-batches, except under pipeline schedules, which divide every
        # gradient by the micro-batches themselves.
        for layer in model.moe_layers():
            layer.aux_grad_scale = 1.0 if self.pipeline else 1.0 / n_micro

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        # fp32 master weights and optimizer; matmuls and attention in bf16 (see README).
        return torch.autocast(self.device.type, dtype=self.dtype)

    # -- forward and backward ------------------------------------------------------------------
    def model_inputs(self, batch: Batch) -> ModelInputs:
        """This rank's (tokens [B, L], labels [B, L], keyword inputs of the model) of a batch of
        whole sequences [B, S]: under context parallelism L = S / cp, the rank's load-balanced
        shard, with its global RoPE positions; with packed documents, the document ids of the
        whole sequence and positions that restart at every document."""
        inputs, labels = batch.inputs.to(self.device), batch.labels.to(self.device)
        documents = batch.documents.to(self.device) if batch.documents is not None else None
        positions = document_positions(documents) if documents is not None else None
        kwargs = {}
        cp = self.layout.cp
        if batch.loss_tokens is not None:  # a share of the step's global divisor (TrainingBatches)
            kwargs["loss_tokens"] = batch.loss_tokens.to(self.device)
        elif self.layout.cp_enabled:
            # Each rank's mean is its share of the whole sequences' mean (see loss_divisor).
            kwargs["loss_tokens"] = (labels != IGNORE_INDEX).sum(dim=1).float() / cp
        if self.layout.cp_enabled:
            inputs, labels, positions = shard_batch(inputs, labels, positions, self.layout.cp_rank, cp,
                                                    self.cfg.parallel.cp_load_balance)
        if positions is not None:  # [B, L]: batch-first, so pipeline micro-batching splits it
            kwargs["positions"] = positions
        if documents is not None:
            kwargs["documents"] = documents
        return inputs, labels, kwargs

    def forward_loss(self, batch: Batch) -> torch.Tensor:
        """Mean loss of a micro-batch (of this rank's tokens), by the fused output layer (the
        vocabulary-parallel one under tensor parallelism). Not under pipelining."""
        inputs, labels, kwargs = self.model_inputs(batch)
        with self.autocast():
            return self.model.module(inputs, labels=labels, **kwargs)

    def forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Accumulate this rank's gradients; returns its mean loss (a detached scalar)."""
        if self.pipeline is not None:
            inputs = [self.model_inputs(b) for b in micro_batches]
            with self.autocast():
                loss = self.pipeline.run(inputs, train=True)
            self.pipeline.sum_tied_grads()
            return loss
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            if self.layout.fsdp_enabled:
                set_micro_batch(self.model.module, self.cfg.parallel.zero, last=i == len(micro_batches) - 1)
            loss = self.forward_loss(batch) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        return total

    # -- the update ----------------------------------------------------------------------------
    def clip_gradients(self) -> float:
        """Clip to train.grad_clip; returns the global gradient norm before clipping."""
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        # A tied output weight's copy on the last pipeline stage is counted once, on the first.
        copies = {id(p) for p in map(tied_copy, self.model.parts) if p is not None}
        params = list(self.model.parameters())
        over_stages = (lambda t: self.layout.sum_(t, "pp")) if self.layout.pp_enabled else None
        return clip_grad_norm([p for p in params if id(p) not in copies], clip, over_stages,
                              also_scale=[p for p in params if id(p) in copies])

    def apply_gradients(self, lr: float, skip: bool = False) -> None:
        """AdamW step at learning rate lr (unless skip), then zero the gradients."""
        for opt in self.optimizers:
            if not skip:
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
            opt.zero_grad(set_to_none=True)
        if not skip:
            self.model.refresh_fp8_scales()

    def train_step(self, micro_batches: list[Batch], lr: float) -> tuple[float, float]:
        """Accumulate gradients over the micro-batches, clip, step. Returns (loss, grad norm).

        A non-finite loss or gradient norm (the same on every rank: both are global) is never
        applied to the weights: with train.on_nonfinite='skip' the step is dropped, otherwise the
        caller stops the run."""
        local_loss = self.forward_backward(micro_batches)
        self.activity.now("the loss's mean over the data ranks")
        loss = self.layout.mean_over_data_ranks(local_loss)
        self.activity.now("the gradient norm")
        grad_norm = self.clip_gradients()
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        self.activity.now("the optimizer step")
        self.apply_gradients(lr, skip=not finite)
        return loss, grad_norm

    # -- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self, batches) -> float:
        """The weighted mean loss over (batch, weight) pairs (TrainingBatches.validation_batches),
        over every rank's tokens."""
        losses, weights = [], []
        for batch, weight in batches:
            if self.pipeline is not None:  # the schedule wants its micro-batch count: repeat this one
                inputs = [self.model_inputs(batch)] * self.pipeline.n_micro
                with self.autocast():
                    loss = self.pipeline.run(inputs, train=False)
            else:
                loss = self.forward_loss(batch)
            losses.append(loss.item())
            weights.append(weight)
        self.model.free_gathered_units()
        local = sum(loss * w for loss, w in zip(losses, weights)) / sum(weights)
        # Under context parallelism each rank holds a part of every sequence's tokens.
        return self.layout.mean_over(torch.tensor(local, dtype=torch.float64, device=self.device), "cp")

    def weights_finite(self) -> bool:
        """Whether every parameter on every rank is finite (checked before each save)."""
        from loom.parallel.init import local_shard

        return self.layout.all_true(all(bool(local_shard(p).isfinite().all()) for p in self.model.parameters()))
