"""Training jobs with checkpoints, in one process or as one rank of a torchrun launch:
    torchrun --nproc-per-node N tests/ckpt_worker.py OUT.pt JOB=--a.b=1,--c.d=2 JOB2=...
Each job builds a Trainer (which resumes if its config says so) and trains. Rank 0 saves
{job: {"loaded": full parameters right after construction, "loaded_val": validation loss then,
"curve": [(step, loss), ...] including the steps before a resume, "params": full parameters at
the end}}.
"""
from __future__ import annotations

import os
import re
import sys

import torch

from loom.config import load_config, validate
from loom.train.trainer import Trainer
from parity import Layouts


def full_parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    params = {}
    for name, p in trainer.model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        params[name] = t.detach().cpu().clone()
    if trainer.layout.pp_enabled:  # each pipeline rank holds some stages: collect them all
        import torch.distributed as dist

        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, params)
        params = {k: v for part in parts for k, v in part.items()}
        if trainer.model_cfg.tie_embeddings and "output.weight" in params:  # the last stage's copy
            assert torch.equal(params.pop("output.weight"), params["tok_embeddings.weight"])
    return params


def run_job(overrides: list[str], layouts=None) -> tuple[dict, Trainer]:
    """layouts: a parity.Layouts shared by a launch's jobs (one mesh per layout), or None."""
    cfg = load_config(None, overrides)
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    layout = layouts.of(cfg) if layouts is not None else None
    trainer = Trainer(cfg, validate(cfg, world_size=world), progress=False, layout=layout)
    out = {"loaded": full_parameters(trainer), "loaded_val": trainer.validation_loss()}
    trainer.train()
    out["curve"] = list(trainer.state.train_curve)
    out["params"] = full_parameters(trainer)
    return out, trainer


def main() -> None:
    torch.set_num_threads(1)
    out, jobs = sys.argv[1], sys.argv[2:]
    results, trainer, layouts = {}, None, Layouts()
    for job in jobs:  # in order: a job may resume the checkpoint of one before it
        name, _, args = job.partition("=")
        results[name], trainer = run_job(re.split(r",(?=--)", args), layouts)  # values may hold commas
    if trainer.rank == 0:
        torch.save(results, out)
    trainer.close()


if __name__ == "__main__":
    main()
    from loom.train.worker_exit import leave

    leave(0)  # as loom's workers end: no interpreter teardown (see loom.train.worker_exit)
