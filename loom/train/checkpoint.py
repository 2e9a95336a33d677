"""Checkpoints of the whole training state: when to save (checkpoint.every, the last step, a stop
signal), saving (synchronous or in the background), publishing, keeping the newest N, and
loading under any layout. The folder format lives in `checkpoint_files`, where a run starts in
`resume`, the state dicts in `state_dicts`.

Each rank saves its share through torch.distributed.checkpoint (DCP): model parameters and AdamW
states (DTensor shards under FSDP/TP, under the full model's parameter names, so a checkpoint
loads under any tp, pp, dp, cp or world size, or into one process), and its RNG states. Every
rank checksums its own files; rank 0 writes the manifest and renames the folder into place. No
non-tensor entry is saved: optimizer hyperparameters come from the config on resume.
"""
from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loom.parallel.init import local_shard
from loom.parallel.layout import Layout
from loom.train.checkpoint_files import (DATA_KEYS, DATA_ORDER, DELETING_PREFIX, FORMAT, SINGLE_PROCESS_WARNING, TMP_PREFIX,
                                         CheckpointError, check_files, check_same_model, checkpoint_name, disk_full,
                                         file_record, lora_fields, model_fields, one_line, publish_folder, published,
                                         read_manifest, safe_planner, safe_reader)
from loom.train.hangs import Activity, collective_timeout
from loom.train.resume import check_compatible
from loom.train.signals import StoppedBySignal
from loom.train.state_dicts import load_optimizer_state, model_state, optimizer_state, rng_state, set_model_state, set_rng_state


# -- the checkpointer --------------------------------------------------------------------------
@dataclass
class TrainState:
    """What besides tensors a resumed run needs: the last finished step and the curves so far."""

    step: int = 0
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    # Where the data stream stands after `step`, where it cannot be recomputed cheaply (a blend's
    # per-source counts: TrainingBatches.state); None otherwise.
    data_state: dict | None = None


@dataclass
class _PendingSave:
    step: int
    tmp: Path
    final: Path
    manifest: dict
    future: Future | None
    started: float


class Checkpointer:
    """Saves and loads one rank's share of the training state, and decides when to.

    Every rank calls `save`, `poll`, `wait`, `load` and the policy's `save_if_due` and
    `stop_with_checkpoint` at the same points (they hold collectives, through the Layout). Async
    saves run their collectives on a separate gloo group so they never interleave with training's.
    Without checkpoint.dir nothing is saved (a run may still start from a checkpoint).
    """

    def __init__(self, cfg, model_cfg, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                 layout: Layout, base: Path | None = None, activity: Activity | None = None):
        self.cfg, self.model_cfg = cfg, model_cfg
        # LoRA: checkpoints hold the adapters only, and name the base the run started from
        # (None: the seed's initialization, which the seed reproduces).
        self.lora = lora_fields(cfg.lora, model_cfg)
        self.base = str(Path(base).resolve()) if base is not None else None
        self.parts, self.optimizers = parts, optimizers
        self.layout, self.device = layout, layout.device
        self.rank, self.world = layout.rank, layout.world_size
        self.activity = activity or Activity()
        self.directory = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
        self.async_save = cfg.checkpoint.async_save
        self.async_group = layout.new_gloo_group(cfg.train.timeout_s) if self.async_save and self.directory else None
        if not layout.distributed:  # DCP warns it assumes one process (we know), also from its writer thread
            warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        self.pending: _PendingSave | None = None
        self.timings: list[dict] = []  # {"step", "blocking_s", "total_s"} of every finished save
        if self.directory is not None and self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for p in self.directory.iterdir():  # leftovers of a crash mid-save or mid-delete
                if p.name.startswith((TMP_PREFIX, DELETING_PREFIX)):
                    shutil.rmtree(p, ignore_errors=True)
        layout.barrier()

    # -- the policy: when to save, and how a run stops with a checkpoint ----------------------------
    def save_if_due(self, state: TrainState, last: int) -> bool:
        """Publish a finished background save, and save when checkpoint.every says so or at the
        last step; whether this step saved."""
        if self.directory is None:
            return False
        every = self.cfg.checkpoint.every
        self.activity.now("a checkpoint save")
        self.guarded(self.poll)
        if (every and state.step % every == 0) or state.step == last:
            self.save_checked(state)
            return True
        return False

    def save_checked(self, state: TrainState) -> None:
        """Save, unless a weight is not finite on some rank (then stop: the last good checkpoint
        stays the newest)."""
        finite = all(bool(local_shard(p).isfinite().all()) for part in self.parts for p in part.parameters())
        if not self.layout.all_true(finite):
            raise FloatingPointError(f"non-finite weights after step {state.step}; no checkpoint written "
                                     f"(the last good one stays in {self.cfg.checkpoint.dir})")
        self.guarded(self.save, state)

    def stop_with_checkpoint(self, signum: int, state: TrainState, saved: bool) -> None:
        """Write the checkpoint of this step (unless it just saved), publish it, and end the run
        with StoppedBySignal."""
        folder = None
        if self.directory is not None:
            if not saved:
                self.save_checked(state)
            self.wait()
            folder = str(self.directory / checkpoint_name(state.step))
        raise StoppedBySignal(signal.Signals(signum).name, state.step, folder)

    def finish(self) -> None:
        """Publish the save in flight at the end of a run."""
        self.activity.now("the last checkpoint save")
        self.guarded(self.wait)

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

    # -- save ------------------------------------------------------------------------------
    def save(self, state: TrainState) -> None:
        """Write the checkpoint of step `state.step` (in the background when async)."""
        self.wait()  # one save in flight at a time
        t0 = time.perf_counter()
        final = self.directory / checkpoint_name(state.step)
        tmp = self.directory / f"{TMP_PREFIX}{final.name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        self.layout.barrier()
        torch.save(rng_state(self.device), tmp / "rng" / f"rank-{self.rank:05d}.pt")
        tensors = {"model": self._saved_model_state(), "optimizer": optimizer_state(self.parts, self.optimizers)}
        manifest = self._manifest(state)
        import torch.distributed.checkpoint as dcp

        writer = dcp.FileSystemWriter(tmp)
        future = None
        with self._failing_as(final):
            if self.async_save:
                # DCP copies the tensors to host memory before it returns, then writes in a
                # thread (collectives on its own group) while training modifies the parameters.
                future = dcp.async_save(tensors, storage_writer=writer, process_group=self.async_group,
                                        no_dist=not self.layout.distributed)
            else:
                dcp.save(tensors, storage_writer=writer, no_dist=not self.layout.distributed)
        self.pending = _PendingSave(state.step, tmp, final, manifest, future, t0)
        self.timings.append({"step": state.step, "blocking_s": time.perf_counter() - t0})
        if future is None:
            self._publish()
            self.timings[-1]["blocking_s"] = time.perf_counter() - t0

    @contextlib.contextmanager
    def _failing_as(self, final: Path):
        """A failed write (a full disk, a lost rank) as one line, with the free space and the size
        needed when the disk is full; its partial folder is removed, published checkpoints are
        intact. A collective that passed train.timeout_s (another rank stopped or gone) is not a
        failed write: it goes on as it came, to end the run as every other timeout does (with
        checkpoint.on_error='continue' the next collective would only wait again)."""
        try:
            yield
        except (KeyboardInterrupt, SystemExit, CheckpointError):
            raise
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            if self.rank == 0:
                shutil.rmtree(final.with_name(f"{TMP_PREFIX}{final.name}"), ignore_errors=True)
            if collective_timeout(e) is not None:
                raise
            if disk_full(e):
                from loom.train.outputs import checkpoint_bytes

                needed = checkpoint_bytes(self.model_cfg)
                why = (f"no space left on its filesystem: {shutil.disk_usage(final.parent).free / 2**30:,.2f} GiB "
                       f"free, one checkpoint needs about {needed / 2**30:,.2f} GiB")
            else:
                why = one_line(e, "written")
            raise CheckpointError(f"saving checkpoint {final} failed ({why}); its partial folder is removed and "
                                  f"the checkpoints published before it are intact") from None

    def poll(self) -> None:
        """Publish a finished background save (call between steps on every rank)."""
        if self.pending is None or self.pending.future is None:
            return
        # Every rank must agree, or the publish collectives would not match (on the default group:
        # the background writer owns the async one).
        if self.layout.all_true(self.pending.future.done()):
            self._publish()

    def wait(self) -> None:
        """Finish and publish the save in flight, if any."""
        if self.pending is not None:
            self._publish()

    def _publish(self) -> None:
        """Checksum this rank's files, gather the sums on rank 0, which writes loom.json and renames
        the folder into place, then drops the oldest checkpoints beyond checkpoint.keep."""
        p = self.pending
        self.pending = None
        if p.future is not None:
            with self._failing_as(p.final):
                p.future.result()  # waits; re-raises a failed background write
        mine = sorted(p.tmp.glob(f"__{self.rank}_*.distcp")) + [p.tmp / "rng" / f"rank-{self.rank:05d}.pt"]
        gathered = self.layout.all_gather_object({str(f.relative_to(p.tmp)): file_record(f) for f in mine})
        if self.rank == 0:
            files = {k: v for part in gathered for k, v in part.items()}
            files[".metadata"] = file_record(p.tmp / ".metadata")
            # The same step saved again (a resumed run) replaces the older folder whole.
            publish_folder(p.tmp, p.final, {**p.manifest, "files": files})
            self._prune()
        self.layout.barrier()
        if self.timings and self.timings[-1]["step"] == p.step:
            self.timings[-1]["total_s"] = time.perf_counter() - p.started

    def _prune(self) -> None:
        old = published(self.directory)[: -self.cfg.checkpoint.keep]
        for _, path in old:
            gone = self.directory / f"{DELETING_PREFIX}{path.name}"
            path.rename(gone)  # atomic: never a half-deleted folder under a published name
        for p in self.directory.iterdir():
            if p.name.startswith(DELETING_PREFIX):
                shutil.rmtree(p, ignore_errors=True)

    def _saved_model_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds of the model: every parameter, or a LoRA run's adapters."""
        from loom.models.lora import is_adapter

        state = model_state(self.parts)
        return {k: v for k, v in state.items() if is_adapter(k)} if self.lora else state

    def _manifest(self, state: TrainState) -> dict:
        cfg = self.cfg
        lora = {"lora": {**self.lora, "base": self.base}} if self.lora else {}
        return {
            **lora,
            "format": FORMAT,
            "step": state.step,
            "contents": ["model", "optimizer", "train", "rng"],
            "model": model_fields(self.model_cfg),
            "model_name": cfg.model.name,
            "data": {**{f"{s}.{k}": getattr(getattr(cfg, s), k) for s, k in DATA_KEYS}, "data.order": DATA_ORDER},
            "data_state": state.data_state,
            "layout": self.layout.degrees(),
            "dtype": cfg.train.dtype,
            "train_curve": list(state.train_curve),  # copies: training goes on during an async save
            "val_curve": list(state.val_curve),
        }

    # -- load ------------------------------------------------------------------------------
    def load(self, path: str | Path) -> TrainState:
        """Load checkpoint `path` into this rank's model parts (and optimizers, RNG), whatever the
        layout that saved it. Returns the training state (step 0 for a weights-only checkpoint)."""
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        manifest = read_manifest(path)
        check_compatible(path, manifest, self.cfg, self.model_cfg)
        self._checked(lambda: check_files(path, manifest, checksums=True, part=(self.rank, self.world)))
        model = self._saved_model_state()
        tensors = {"model": model}
        if "optimizer" in manifest["contents"]:
            tensors["optimizer"] = optimizer_state(self.parts, self.optimizers)
        self._checked(lambda: dcp.load(tensors, storage_reader=safe_reader(path), planner=safe_planner(),
                                       no_dist=not self.layout.distributed))
        set_model_state(self.parts, model)
        if "optimizer" in tensors:
            load_optimizer_state(self.parts, self.optimizers, tensors["optimizer"])
        if "rng" in manifest["contents"]:
            own = path / "rng" / f"rank-{self.rank:05d}.pt"
            same_layout = manifest.get("layout", {}).get("world_size") == self.world
            # Under another world size ranks do not correspond: every rank takes rank 0's state.
            source = own if same_layout and own.exists() else path / "rng" / "rank-00000.pt"
            set_rng_state(torch.load(source, weights_only=True), self.device)
        if "train" not in manifest["contents"]:
            return TrainState()
        return TrainState(manifest["step"], [tuple(x) for x in manifest["train_curve"]],
                          [tuple(x) for x in manifest["val_curve"]], manifest.get("data_state"))

    def load_weights(self, path: str | Path) -> None:
        """The model weights of checkpoint `path` as this run's starting point (a base for LoRA,
        a pretrained model to fine-tune): no optimizer state, no step, no RNG. Parameters the
        checkpoint does not hold (LoRA's adapters) keep their initialization."""
        import torch.distributed.checkpoint as dcp
        from loom.models.lora import is_adapter

        path = Path(path)
        manifest = read_manifest(path)
        check_same_model(path, manifest, self.model_cfg)
        self._checked(lambda: check_files(path, manifest, checksums=True, part=(self.rank, self.world)))
        model = {k: v for k, v in model_state(self.parts).items() if not is_adapter(k)}
        self._checked(lambda: dcp.load({"model": model}, storage_reader=safe_reader(path), planner=safe_planner(),
                                       no_dist=not self.layout.distributed))
        set_model_state(self.parts, model)

    def _checked(self, fn) -> None:
        """Run fn on every rank; if it fails on any rank, raise the first rank's error on all of
        them (so no rank is left waiting in a collective)."""
        error = ""
        try:
            fn()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            error = one_line(e)
        errors = [e for e in self.layout.all_gather_object(error) if e]
        if errors:
            raise CheckpointError(errors[0])
