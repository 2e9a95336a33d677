"""Trainer for one process or one torchrun rank: build on meta, apply the layout, allocate and
initialize the local shards, then a short loop over a step function."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch

from loom.config import Config
from loom.data.dataset import Batch, BatchSchedule, open_splits
from loom.metrics.flops import flops_per_token, hardware_flops_per_token, param_counts
from loom.metrics.meter import Peak, ThroughputMeter, device_peak, forget_cpu_peak, peak_memory_bytes
from loom.models.attention import document_positions
from loom.models.converters import convert_model
from loom.models.loss import IGNORE_INDEX
from loom.models.moe import MoE
from loom.models.transformer import ModelConfig, Transformer, build_model
from loom.parallel.apply import materialize, parallelize
from loom.parallel.fsdp import accumulates_unsharded_grads, set_micro_batch
from loom.parallel.init import local_shard
from loom.parallel.pipeline import sum_tied_grads, tied_copy
from loom.parallel.dims import ParallelDims
from loom.train.report import MetricsWriter, format_bytes, format_count, log_line, plot_losses, summary_table
from loom.train.checkpoint import Checkpointer, TrainState
from loom.train.checkpoint_files import CheckpointError, checkpoint_name, start_points
from loom.train.schedule import lr_at
from loom.train.hangs import Activity
from loom.train.signals import StoppedBySignal, StopRequests
from loom.train.settings import DTYPES

FLOPS_CONVENTION = "megatron"


def resolve_device(name: str) -> torch.device:
    """CPU, or this rank's GPU (LOCAL_RANK under torchrun)."""
    use_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    if use_cuda:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm gains and biases are vectors and are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused AdamW takes a group's tensors in one call, which cannot mix DTensors with plain
    # tensors (tensor parallelism without sequence parallelism leaves norms plain beside sharded
    # biases): one group per (decay, kind).
    groups = []
    for decay, matrices in ((cfg.weight_decay, True), (0.0, False)):
        for distributed in (True, False):
            members = [p for p in params if (p.ndim >= 2) == matrices and hasattr(p, "device_mesh") == distributed]
            if members:
                groups.append({"params": members, "weight_decay": decay})
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=True
    )


def clip_grad_norm(params, max_norm: float, pp_group=None, also_scale=()) -> float:
    """Scale gradients so that their global 2-norm is at most max_norm; returns the norm before.

    Gradients may be plain tensors and DTensors on different meshes at once (norm gains left
    unsharded beside tensor-parallel matrices, FSDP's 1-D and 2-D shards): torch's clip_grad_norm_
    refuses such a mix, so the norm is taken per mesh, gathered, and combined here.
    also_scale: parameters left out of the norm (copies of one counted elsewhere) but clipped
    with the rest.
    """
    groups: dict[int, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(id(getattr(p.grad, "device_mesh", None)), []).append(p.grad)
    squares = torch.zeros((), dtype=torch.float64)
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        squares = squares + _local(norm).double().cpu() ** 2
    if pp_group is not None:  # each pipeline rank holds different parameters
        import torch.distributed as dist

        dev = next(iter(groups.values()))[0].device if groups else torch.device("cpu")
        squares = squares.to(dev)
        dist.all_reduce(squares, group=pp_group)
    total = squares.sqrt().item()
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
        for p in also_scale:
            if p.grad is not None:
                p.grad.mul_(coef)
    return total


def _stage_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The pipeline schedule's loss function: the last stage already returns its micro-batch's
    mean loss (the fused output layer gets the labels as a keyword input, like the positions)."""
    return output


def _local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a replicated DTensor (the loss under tensor parallelism)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def init_model(model_cfg: ModelConfig, device: torch.device, seed: int) -> Transformer:
    """A whole model on one device, initialized from `seed` (tests, benchmarks, one process)."""
    model = build_model(model_cfg, "meta")
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model


class Trainer:
    """Single process, or one rank of a torchrun job (WORLD_SIZE > 1) with the configured layout."""

    def __init__(self, cfg: Config, model_cfg: ModelConfig, progress: bool = True):
        self.cfg, self.model_cfg = cfg, model_cfg
        self.activity = Activity()  # what this rank is doing, for the line a collective's timeout gives
        t = cfg.train
        self.device = resolve_device(t.device)
        self.dtype = DTYPES[t.dtype]
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.dims = ParallelDims.from_section(cfg.parallel, self.world_size)
        self._join_process_group()
        self.progress = progress and self.rank == 0
        torch.manual_seed(t.seed)
        self._build_model()
        # One AdamW per model part (pipeline stage), so that optimizer states are saved under the
        # full model's parameter names and load under any other pipeline split.
        self.optimizers = [build_optimizer(m, t) for m in self.parts]

        self.sft = cfg.data.format == "sft"
        self.train_data, self.val_data = open_splits(cfg.data.path, t.seq_len, progress=self.progress,
                                                     data_format=cfg.data.format, seed=t.seed)
        self.masking = self._masking()
        self.schedule = BatchSchedule(self.train_data.n_sequences, t.global_batch, t.seed)
        self.tokens_per_step = t.global_batch * t.seq_len

        self.state = TrainState()
        # Signals that stop the run after a step: installed by `loom train` around train().
        self.stop_requests = StopRequests()
        self.checkpointer = None
        base, resume = self._agreed(start_points(cfg, model_cfg))
        if cfg.checkpoint.dir or resume is not None or base is not None:
            layout = {**self.dims.degrees(), "world_size": self.world_size}
            self.checkpointer = Checkpointer(cfg, model_cfg, self.parts, self.optimizers, self.device,
                                             layout, async_save=cfg.checkpoint.async_save, base=base)
        self.resumed_from = resume
        if base is not None:
            self.checkpointer.load_weights(base)
        if resume is not None:
            self.state = self.checkpointer.load(resume)
        self.refresh_fp8_scales()

    def _masking(self):
        """Masked-LM targets for a bidirectional model (BERT), else None (next-token targets)."""
        if self.model_cfg.causal:
            return None
        from loom.data.mlm import MaskingSpec

        mask_id = self.train_data.mask_token()
        if mask_id is None:
            raise ValueError(f"model {self.cfg.model.name!r} trains on masked-LM targets, but the tokenizer of "
                             f"data.path={self.cfg.data.path!r} has no [MASK] token")
        eos = self.train_data.meta.get("eos_id")
        special = tuple(i for i in (eos, mask_id) if i is not None)
        return MaskingSpec(mask_id, self.train_data.meta["vocab_size"], special, self.cfg.train.seed)

    def _join_process_group(self) -> None:
        """Under torchrun: the process group and the layout's DeviceMesh; this rank's place."""
        self.mesh = None
        self.rank = self.dp_rank = self.cp_rank = 0
        if self.world_size == 1:
            return
        import torch.distributed as dist

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        timeout = timedelta(seconds=self.cfg.train.timeout_s)  # loom.train.hangs
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", timeout=timeout)
        self.rank = dist.get_rank()
        self.mesh = self.dims.build_mesh(self.device.type)
        self.mesh.set_timeout(timeout)
        self.dp_rank = self.mesh["dp"].get_local_rank()
        self.cp_rank = self.mesh["cp"].get_local_rank()

    def _build_model(self) -> None:
        """Built and laid out on meta; each rank then allocates and initializes only its shards,
        with the values of one process (loom.parallel.init), so every layout starts alike.
        Sets self.model (the model, or its stages as a ModuleList), self.parts (the stages) and,
        under pipeline parallelism, self.pp_schedule."""
        t, p = self.cfg.train, self.cfg.parallel
        self.model = build_model(self.model_cfg, "meta")
        # Converters (loom's CPU kernels) between construction and parallelization; the kernels
        # are built (first run on this machine) or loaded here, before any step is timed, and the
        # summary says which run and, where loom's cannot, why.
        self.fsdp = self.mesh is not None and self.dims.dp * self.dims.cp > 1
        self.lora = self.cfg.lora.spec(self.model_cfg)
        self.kernels = convert_model(self.model, t.kernels, self.device, self.dtype, t.fp8,
                                     float8_gather=self.fsdp, fp8_bf16_blocks=t.fp8_bf16_blocks, lora=self.lora)
        self.pp = self.mesh is not None and self.dims.pp > 1
        self.n_micro = n_micro = t.global_batch // self.dims.dp // t.micro_batch  # per data rank and step
        self.cp = self.dims.cp if self.mesh is not None else 1
        modules, self.stage_ids = parallelize(self.model, self.dims, self.mesh, p, t.recompute, self.dtype, t.fp8)
        spec_of = self.model.init_spec
        if self.lora is not None:
            from loom.models.lora import adapter_init_spec

            spec_of = adapter_init_spec(spec_of, self.model_cfg)
        self.init_peak_bytes, self.shard_bytes = materialize(modules, self.device, t.seed, spec_of)
        if self.pp:
            from loom.parallel.pipeline import build_schedule

            self.model = torch.nn.ModuleList(modules)  # what the optimizer and clipping see
            self.n_stages = self.dims.pp * p.pp_virtual_stages
            reduce_each = self.fsdp and not accumulates_unsharded_grads(p.zero, self.dims.pp, p.pp_schedule)
            self.pp_schedule = build_schedule(modules, self.stage_ids, self.n_stages, self.mesh["pp"].get_group(),
                                              self.device, p.pp_schedule, n_micro, _stage_loss,
                                              reduce_every_micro_batch=reduce_each)
        if t.compile:
            for module in modules:
                for block in module.layers.values():
                    block.compile()
        self.parts = modules
        self.moe_layers = [m for part in modules for m in part.modules() if isinstance(m, MoE)]
        # A micro-batch's auxiliary MoE losses weigh what its main loss weighs in the step's
        # gradients: 1 / micro-batches, except under pipeline schedules, which divide every
        # gradient by the micro-batches themselves.
        for layer in self.moe_layers:
            layer.aux_grad_scale = 1.0 if self.pp else 1.0 / n_micro

    def _agreed(self, value):
        """Rank 0's value on every rank (so all ranks resume from the same checkpoint)."""
        if self.mesh is None:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, together: bool = True) -> None:
        """Leave the process group (a torchrun worker must, before it exits). together: all ranks
        at once, since rank 0 reports a run's end (or the error every rank met) before this and
        torchrun ends the job's other ranks as soon as one exits with an error; not after an
        error this rank may have met alone."""
        if self.mesh is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                if together:
                    dist.barrier()
                dist.destroy_process_group()

    # -- one step -------------------------------------------------------------------------
    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        # fp32 master weights and optimizer; matmuls and attention in bf16 (see README).
        return torch.autocast(self.device.type, dtype=self.dtype)

    def model_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """This rank's (tokens [B, L], labels [B, L], keyword inputs of the model) of a batch of
        whole sequences [B, S]: under context parallelism L = S / cp, the rank's load-balanced
        shard, with its global RoPE positions; with packed documents, the document ids of the
        whole sequence and positions that restart at every document."""
        inputs, labels = batch.inputs.to(self.device), batch.labels.to(self.device)
        documents = batch.documents.to(self.device) if batch.documents is not None else None
        positions = document_positions(documents) if documents is not None else None
        kwargs = {}
        if batch.loss_tokens is not None:  # a share of the step's global divisor (global_divisors)
            kwargs["loss_tokens"] = batch.loss_tokens.to(self.device)
        elif self.cp > 1:
            # Each rank's mean is its share of the whole sequences' mean (see loss_divisor).
            kwargs["loss_tokens"] = (labels != IGNORE_INDEX).sum(dim=1).float() / self.cp
        if self.cp > 1:
            from loom.parallel.context import shard_index

            b, s = inputs.shape
            idx = shard_index(self.cp_rank, self.cp, s, self.cfg.parallel.cp_load_balance, self.device)
            if positions is None:
                positions = torch.arange(s, device=self.device).expand(b, s)
            inputs, labels, positions = inputs[:, idx], labels[:, idx], positions[:, idx]
        if positions is not None:  # [B, L]: batch-first, so pipeline micro-batching splits it
            kwargs["positions"] = positions
        if documents is not None:
            kwargs["documents"] = documents
        return inputs, labels, kwargs

    def forward_loss(self, batch: Batch) -> torch.Tensor:
        """Mean loss of a micro-batch (of this rank's tokens), by the fused output layer (the
        vocabulary-parallel one under tensor parallelism)."""
        inputs, labels, kwargs = self.model_inputs(batch)
        with self.autocast():
            return self.model(inputs, labels=labels, **kwargs)

    def named_parameters(self):
        """(full-model name, parameter) of this rank's parameters (a pipeline stage keeps the
        names of the whole model)."""
        modules = list(self.model) if self.pp else [self.model]
        for module in modules:
            yield from module.named_parameters()

    def _pipeline_run(self, micro_batches: list[Batch], train: bool) -> torch.Tensor:
        """One pass of the schedule over this rank's micro-batches; returns the mean loss on every
        pipeline rank (it is known on the last stage only)."""
        import torch.distributed as dist

        parts = [self.model_inputs(b) for b in micro_batches]
        inputs = torch.cat([x for x, _, _ in parts])
        labels = torch.cat([y for _, y, _ in parts])
        # Positions, documents and labels go to every stage (the schedule splits them into
        # micro-batches); the last stage's fused output layer turns the labels into the loss.
        kwargs = {key: torch.cat([kw[key] for _, _, kw in parts]) for key in parts[0][2]}
        kwargs["labels"] = labels
        first, last = 0 in self.stage_ids, self.n_stages - 1 in self.stage_ids
        losses: list[torch.Tensor] = []
        run = self.pp_schedule.step if train else self.pp_schedule.eval
        with self.autocast():
            args = (inputs,) if first else ()
            if last:
                run(*args, target=labels, losses=losses, return_outputs=False, **kwargs)
            else:
                run(*args, **kwargs)
        if last:
            loss = torch.stack([_local(x).detach().float() for x in losses]).mean()
        else:
            loss = torch.zeros((), device=self.device)
        dist.all_reduce(loss, group=self.mesh["pp"].get_group())
        return loss

    def forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Accumulate this rank's gradients; returns its mean loss (a detached scalar)."""
        if self.pp:
            loss = self._pipeline_run(micro_batches, train=True)
            sum_tied_grads(list(self.model), self.n_stages, self.mesh["pp"].get_group())
            return loss
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            if self.fsdp:
                set_micro_batch(self.model, self.cfg.parallel.zero, last=i == len(micro_batches) - 1)
            loss = self.forward_loss(batch) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        return total

    def clip_gradients(self) -> float:
        """Clip to train.grad_clip; returns the global gradient norm before clipping."""
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        # A tied output weight's copy on the last pipeline stage is counted once, on the first.
        copies = {id(p) for p in map(tied_copy, self.parts) if p is not None}
        params = [p for p in self.model.parameters() if id(p) not in copies]
        return clip_grad_norm(params, clip, self.mesh["pp"].get_group() if self.pp else None,
                              also_scale=[p for p in self.model.parameters() if id(p) in copies])

    def apply_gradients(self, lr: float, skip: bool = False) -> None:
        """AdamW step at learning rate lr (unless skip), then zero the gradients."""
        for opt in self.optimizers:
            if not skip:
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
            opt.zero_grad(set_to_none=True)
        if not skip:
            self.refresh_fp8_scales()

    def refresh_fp8_scales(self) -> None:
        """FSDP gathers FP8 weights as float8 with a scale from the whole parameter's amax: set
        once the weights change (initialized, loaded, stepped), before the next forward (a no-op
        for recipes whose weights FSDP gathers in bf16: loom.models.fp8.apply_fp8 decides)."""
        if self.fsdp and self.cfg.train.fp8 != "none":
            from loom.models.fp8 import refresh_weight_scales

            refresh_weight_scales(self.parts)

    def optimizer_step(self, lr: float) -> float:
        """Clip, step, zero the gradients; returns the global gradient norm before clipping."""
        grad_norm = self.clip_gradients()
        self.apply_gradients(lr)
        return grad_norm

    def _mean_over(self, value: torch.Tensor, axis: str, n_ranks: int) -> float:
        """The mean of a per-rank scalar over the n_ranks ranks of a mesh axis."""
        if self.mesh is None or n_ranks == 1:
            return value.item()
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value, group=self.mesh[axis].get_group())  # gloo has no AVG
        return value.item() / n_ranks

    def mean_over_data_ranks(self, value: torch.Tensor) -> float:
        """The mean of a per-rank scalar over the ranks that hold different tokens."""
        return self._mean_over(value, "dp_cp", self.dims.dp * self.dims.cp)

    def train_step(self, micro_batches: list[Batch], lr: float) -> tuple[float, float]:
        """Accumulate gradients over the micro-batches, clip, step. Returns (loss, grad norm).

        A non-finite loss or gradient norm (the same on every rank: both are global) is never
        applied to the weights: with train.on_nonfinite='skip' the step is dropped, otherwise the
        caller stops the run."""
        local_loss = self.forward_backward(micro_batches)
        self.activity.now("the loss's mean over the data ranks")
        loss = self.mean_over_data_ranks(local_loss)
        self.activity.now("the gradient norm")
        grad_norm = self.clip_gradients()
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        self.activity.now("the optimizer step")
        self.apply_gradients(lr, skip=not finite)
        return loss, grad_norm

    def weights_finite(self) -> bool:
        """Whether every parameter on every rank is finite (checked before each save)."""
        local = all(bool(local_shard(p).isfinite().all()) for p in self.model.parameters())
        if self.mesh is None:
            return local
        import torch.distributed as dist

        flag = torch.tensor([int(local)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def save_checkpoint(self) -> None:
        if not self.weights_finite():
            raise FloatingPointError(
                f"non-finite weights after step {self.state.step}; no checkpoint written "
                f"(the last good one stays in {self.cfg.checkpoint.dir})"
            )
        self.guarded(self.checkpointer.save, self.state)

    def guarded(self, checkpoint_op, *args) -> None:
        """A checkpoint operation whose failure (a CheckpointError: a full disk, a lost file)
        stops the run, or with checkpoint.on_error='continue' is said in one line and training
        goes on."""
        try:
            checkpoint_op(*args)
        except CheckpointError as e:
            if self.cfg.checkpoint.on_error != "continue":
                raise
            if self.rank == 0:
                print(f"loom train: {e}; training goes on (checkpoint.on_error='continue')", file=sys.stderr, flush=True)

    def agreed_stop_signal(self) -> int:
        """The stop signal any rank has received (0: none), the same on every rank, so that all
        stop after the same step (one small all-reduce per step under a layout)."""
        local = self.stop_requests.signum
        if self.mesh is None:
            return local
        import torch.distributed as dist

        flag = torch.tensor([local], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def stop_by_signal(self, signum: int, step: int, saved: bool) -> None:
        """Write the checkpoint of `step` (unless this step just wrote it), publish it, and end
        the run with StoppedBySignal."""
        import signal

        folder = None
        if self.checkpointer is not None and self.cfg.checkpoint.dir:
            if not saved:
                self.save_checkpoint()
            self.checkpointer.wait()
            folder = os.path.join(self.cfg.checkpoint.dir, checkpoint_name(step))
        raise StoppedBySignal(signal.Signals(signum).name, step, folder)

    def moe_stats(self) -> dict:
        """Routing of the last micro-batch over every MoE layer of every rank: the share of
        token-expert assignments each expert got (min, max, mean over experts; mean = 1/E) and
        the load-balancing loss averaged over layers (unscaled). {} for a dense model. A
        collective: every rank calls it at the same steps."""
        if not self.model_cfg.moe_experts:
            return {}
        e = self.model_cfg.moe_experts
        totals = torch.zeros(e + 2, dtype=torch.float64, device=self.device)  # counts, balance sum, layers
        for layer in self.moe_layers:
            if layer.last_counts is not None:
                totals[:e] += layer.last_counts.double()
            if layer.last_aux is not None:  # a share of the micro-batch's loss under sequence sharding
                totals[e] += layer.last_aux[0].double()
                totals[e + 1] += 1 / layer.routing.size
        if self.mesh is not None:
            import torch.distributed as dist

            dist.all_reduce(totals)
        share = totals[:e] / totals[:e].sum().clamp(min=1)
        return {"moe_expert_share": {"min": share.min().item(), "max": share.max().item(), "mean": share.mean().item()},
                "moe_aux_loss": (totals[e] / totals[e + 1].clamp(min=1)).item()}

    def micro_batches(self, step: int) -> list[Batch]:
        """This data-parallel rank's share of optimizer step `step` (whole sequences; context-
        parallel ranks read the same ones and keep their shards), cut into micro-batches."""
        idx = self.schedule.rank_indices(step, self.dp_rank, self.dims.dp)
        mb = self.cfg.train.micro_batch
        packed = self.cfg.data.pack_documents
        batches = [self.train_data.batch(idx[i : i + mb], packed, self.masking) for i in range(0, len(idx), mb)]
        if not self.sft:
            return batches
        share = self.global_divisor(step) / mb
        return [dataclasses.replace(b, loss_tokens=torch.full((len(b.inputs),), share)) for b in batches]

    def global_divisor(self, step: int) -> float:
        """What each micro-batch's summed loss is divided by so that the step's gradient is that
        of the mean over the answer tokens of the whole global batch, in every layout:
        T / (micro-batches x dp x cp), T the global batch's answer tokens. Micro-batches are
        averaged (1 / micro-batches, or the pipeline schedule's gradient scaling) and FSDP
        averages over the dp x cp ranks, which together undo that denominator; every rank
        knows T without a collective, since every rank knows the global batch."""
        tokens = self.train_data.answer_tokens(self.schedule.global_indices(step))
        return max(tokens, 1) / (self.n_micro * self.dims.dp * self.cp)

    def peak_memory(self) -> int:
        """The largest peak over all ranks."""
        peak = peak_memory_bytes(self.device)
        if self.mesh is None:
            return peak
        import torch.distributed as dist

        t = torch.tensor([peak], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    @torch.no_grad()
    def validation_loss(self) -> float:
        mb = self.cfg.train.micro_batch
        n = min(self.cfg.train.eval_batches * mb, self.val_data.n_sequences)
        losses, counts = [], []
        for i in range(0, n, mb):
            batch = self.val_data.batch(np.arange(i, min(i + mb, n)), self.cfg.data.pack_documents, self.masking)
            if self.pp:  # the schedule wants its micro-batch count: repeat this one
                repeats = self.pp_schedule._n_microbatches
                losses.append(self._pipeline_run([batch] * repeats, train=False).item())
            else:
                losses.append(self.forward_loss(batch).item())
            # Batches weigh by their answer tokens (fine-tuning: the mean over all of them).
            counts.append(self.val_data.answer_tokens(np.arange(i, min(i + mb, n))) if self.sft else len(batch.inputs))
        self._free_gathered_units()
        local = torch.tensor(np.average(losses, weights=counts), dtype=torch.float64, device=self.device)
        # Under context parallelism each rank holds a part of every sequence's tokens.
        return self._mean_over(local, "cp", self.cp)

    def _free_gathered_units(self) -> None:
        """A forward without backward leaves the FSDP units that stay gathered after forward (the
        last one; all of them under zero=1 or PP) gathered, in train.dtype: free them, so that
        parameters read between steps (a save, an export, a test) are the fp32 shards, not bf16
        copies, and their memory is not held until the next step."""
        if not self.fsdp:
            return
        from torch.distributed.fsdp import FSDPModule

        for part in self.parts:
            for module in part.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    # -- the run --------------------------------------------------------------------------
    def train(self) -> dict:
        """Train from self.state.step to train.steps (or train.stop_at); returns the summary."""
        cfg, t = self.cfg, self.cfg.train
        run = self._open_run()
        last = min(t.steps, t.stop_at) if t.stop_at else t.steps  # stop_at: a planned exit, resumed later
        for step in range(run.start + 1, last + 1):
            lr = lr_at(step - 1, t.lr, t.min_lr, t.warmup_steps, t.steps)
            self.activity.now("forward and backward", step)
            t0 = time.perf_counter()
            loss, grad_norm = self.train_step(self.micro_batches(step - 1), lr)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                self._nonfinite(run, step, loss, grad_norm)
            self.state.step = step
            run.step_times.append(dt)
            run.window.append(dt)
            self.state.train_curve.append((step, loss))
            run.bar.update(1)
            run.bar.set_postfix(loss=f"{loss:.3f}")

            val_loss = None
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                self.activity.now("validation")
                val_loss = self.validation_loss()
                self.state.val_curve.append((step, val_loss))
            if step % cfg.metrics.log_every == 0 or step == last or val_loss is not None or step == run.start + 1:
                self._log(run, step, lr, loss, grad_norm, val_loss)
            saved = self._save_on_schedule(step, last)
            self.activity.now("the check for a stop signal")
            signum = self.agreed_stop_signal()
            if signum:
                run.close()
                self.stop_by_signal(signum, step, saved)
        run.bar.close()
        if self.checkpointer is not None:
            self.activity.now("the last checkpoint save")
            self.guarded(self.checkpointer.wait)
        run.close()
        return self._summary(run, last)

    def _open_run(self) -> "_Run":
        """The run's meter, metrics writer and progress bar; validates step 0 of a fresh run (a
        resumed run carries on the curves in self.state of the steps before its checkpoint)."""
        from tqdm import tqdm

        cfg, t = self.cfg, self.cfg.train
        attention_len = self.attention_len()  # a pass over the data's document index when packed
        fpt = flops_per_token(self.model_cfg, attention_len, FLOPS_CONVENTION, **self.frozen_flops())
        # Only rank 0 reports; a CPU calibration on every rank would just contend for the cores.
        peak = device_peak(self.device, self.dtype, t.fp8 != "none") if self.rank == 0 else Peak(None, "not rank 0")
        start = self.state.step
        writer = None
        if self.rank == 0:
            writer = MetricsWriter(cfg.metrics.jsonl, cfg.metrics.tensorboard, fresh=start == 0, keep_until=start)
        if start == 0:
            self.activity.now("validation")
            self.state.val_curve.append((0, self.validation_loss()))
        bar = tqdm(total=t.steps, initial=start, desc="training", unit="step",
                   disable=not self.progress or None, file=sys.stderr, dynamic_ncols=True)
        hw_ratio = hardware_flops_per_token(self.model_cfg, attention_len, t.recompute, FLOPS_CONVENTION,
                                            **self.frozen_flops()) / fpt
        return _Run(start=start, hw_ratio=hw_ratio, meter=ThroughputMeter(self.tokens_per_step, fpt, self.world_size, peak),
                    writer=writer, bar=bar, layout={**self.dims.degrees(), "world_size": self.world_size},
                    started=time.perf_counter())

    def trainable_params(self) -> int:
        """Parameters that train (all of them, or LoRA's adapters), counted from the model config."""
        if self.lora is None:
            return param_counts(self.model_cfg).total
        from loom.metrics.flops import adapter_params

        return adapter_params(self.model_cfg, self.lora)

    def attention_len(self) -> float:
        """The sequence length attention FLOPs are counted at: train.seq_len, or for packed
        examples or documents the length whose attention costs what theirs does."""
        packed = self.sft or self.cfg.data.pack_documents
        return self.train_data.attention_len if packed else self.cfg.train.seq_len

    def frozen_flops(self) -> dict:
        """flops_per_token's keywords for LoRA: its adapters, and no weight gradients of frozen matrices."""
        return {} if self.lora is None else {"lora": self.lora}

    def _nonfinite(self, run: "_Run", step: int, loss: float, grad_norm: float) -> None:
        """A step whose loss or gradient norm is not finite (its update was not applied): stop
        the run, or with train.on_nonfinite='skip' count it and go on."""
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm} (loss {loss:.4f})"
        if self.cfg.train.on_nonfinite != "skip":
            run.bar.close()
            if self.checkpointer is not None:
                self.checkpointer.wait()
            raise FloatingPointError(
                f"non-finite {what} at step {step}; stopping (the weights were not updated and "
                f"no checkpoint of them is written; train.on_nonfinite='skip' drops such steps)"
            )
        run.skipped += 1
        if run.writer is not None:
            run.bar.write(f"step {step}: non-finite {what}; step skipped (train.on_nonfinite='skip')", file=sys.stdout)

    def _log(self, run: "_Run", step: int, lr: float, loss: float, grad_norm: float, val_loss: float | None) -> None:
        """One metrics row over the steps since the last: every rank takes part in its figures'
        collectives, rank 0 writes it and prints its line."""
        self.activity.now("the metrics of the step")
        m = run.meter.step(sum(run.window) / len(run.window))
        run.window = []
        row = {
            "step": step,
            "loss": loss if math.isfinite(loss) else None,  # JSON has no NaN
            "lr": lr,
            "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
            "tokens_per_s": m.tokens_per_s,
            "tokens_per_s_per_device": m.tokens_per_s_per_device,
            "tflops_per_device": m.tflops_per_device,
            "hw_tflops_per_device": m.tflops_per_device * run.hw_ratio,
            "mfu": m.mfu,
            "peak_memory_bytes": self.peak_memory(),
            "step_time_s": m.step_time_s,
            "val_loss": val_loss,
            **self.moe_stats(),
        }
        if step == 1:
            row = {**row, "layout": run.layout, "flops_convention": FLOPS_CONVENTION, "peak_source": run.meter.peak.source}
        if run.writer is not None:
            run.writer.write(row)
            run.bar.write(log_line(row, self.cfg.train.steps), file=sys.stdout)

    def _save_on_schedule(self, step: int, last: int) -> bool:
        """Poll a save in flight, and save when checkpoint.every says so or at the last step;
        whether this step saved."""
        ck = self.cfg.checkpoint
        if self.checkpointer is None or not ck.dir:
            return False
        self.activity.now("a checkpoint save")
        self.guarded(self.checkpointer.poll)
        if (ck.every and step % ck.every == 0) or step == last:
            self.save_checkpoint()
            return True
        return False

    def _summary(self, run: "_Run", last: int) -> dict:
        """The run's figures over its steady state (the first steps pay for allocation and warm-up)."""
        cfg, t = self.cfg, self.cfg.train
        steady = run.step_times[min(3, len(run.step_times) - 1):] or [float("nan")]
        m = run.meter.step(sum(steady) / len(steady))
        peak = run.meter.peak
        if run.meter.peak_exceeded and self.device.type == "cpu":
            forget_cpu_peak(self.dtype)
            peak = Peak(peak.flops, f"{peak.source}; stale: this run achieved more, so it is discarded and "
                                    f"measured again next run")
        pc = param_counts(self.model_cfg)
        train_curve, val_curve = self.state.train_curve, self.state.val_curve
        summary = {
            "model": cfg.model.name,
            "params": pc.total,
            "trainable_params": self.trainable_params(),
            "packing_efficiency": self.train_data.efficiency if self.sft else None,
            "layout": run.layout,
            "steps": last,
            "tokens": last * self.tokens_per_step,
            "wall_time_s": time.perf_counter() - run.started,
            "step_time_s": m.step_time_s,
            "tokens_per_s": m.tokens_per_s,
            "tokens_per_s_per_device": m.tokens_per_s_per_device,
            "tflops_per_device": m.tflops_per_device,
            "mfu": m.mfu,
            "peak_flops": peak.flops,
            "peak_source": peak.source,
            "flops_convention": FLOPS_CONVENTION,
            "peak_memory_bytes": self.peak_memory(),
            "first_loss": train_curve[0][1],
            "final_loss": train_curve[-1][1],
            "initial_val_loss": val_curve[0][1],
            "final_val_loss": val_curve[-1][1],
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "skipped_steps": run.skipped,
            "checkpoint_saves": list(self.checkpointer.timings) if self.checkpointer else [],
            "dtype": t.dtype if t.fp8 == "none" else f"{t.dtype} + fp8 {t.fp8}",
            "recompute": t.recompute,
            "device": str(self.device),
            "kernels": self.kernels,
        }
        if cfg.metrics.plot and self.rank == 0:
            plot_losses(cfg.metrics.plot, train_curve, val_curve,
                        f"loom: {cfg.model.name} ({format_count(pc.total)} params), {t.dtype}")
        return summary


@dataclass
class _Run:
    """What one call of Trainer.train keeps between steps."""

    start: int  # the step the run starts after (0, or a resumed checkpoint's)
    hw_ratio: float  # hardware FLOPs (with recomputation) per model FLOP
    meter: ThroughputMeter  # with the peak its MFU is against
    writer: MetricsWriter | None  # rank 0's
    bar: object  # tqdm
    layout: dict
    started: float  # perf_counter after the start's validation
    step_times: list = field(default_factory=list)
    window: list = field(default_factory=list)  # step times since the last metrics row
    skipped: int = 0

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def format_summary(s: dict, jsonl: str, plot: str) -> str:
    layout = " x ".join(f"{k}={v}" for k, v in s["layout"].items() if k != "world_size" and v > 1) or "single process"
    items = [
        ("model", f"{s['model']} ({format_count(s['params'])} params"
                  + (f", {format_count(s['trainable_params'])} = {100 * s['trainable_params'] / s['params']:.2f}% "
                     f"trainable)" if s.get("trainable_params", s["params"]) != s["params"] else ")")),
        ("layout", f"{layout} ({s['layout']['world_size']} rank(s), {s['device']}, {s['dtype']})"),
        ("steps / tokens", f"{s['steps']} / {format_count(s['tokens'])}"),
        ("wall time", f"{s['wall_time_s']:.1f} s"
                      + (f" (resumed from {s['resumed_from']})" if s.get("resumed_from") else "")),
        ("train loss", f"{s['first_loss']:.3f} -> {s['final_loss']:.3f}"
                       + (f" ({s['skipped_steps']} non-finite steps skipped)" if s.get("skipped_steps") else "")),
        ("validation loss", f"{s['initial_val_loss']:.3f} -> {s['final_val_loss']:.3f}"
                            + (" (answer tokens)" if s.get("packing_efficiency") is not None else "")),
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
