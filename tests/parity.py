"""Run a few training steps under a layout and record what parity compares.

In-process (world size 1) it is the reference; under torchrun it is one rank of a layout:
    torchrun --nproc-per-node N tests/parity.py OUT.pt CASE=--a.b=1,--c.d=2 CASE2=...
Rank 0 saves {case: {"losses": [...], "grads": {name: full tensor after step 1}}}.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

from loom.config import load_config, validate
from loom.train.trainer import Trainer


@contextlib.contextmanager
def counting_fsdp_collectives(counts: dict):
    """Count FSDP2's all-gathers and reduce-scatters (torch.distributed's *_single functions,
    which FSDP2 calls by module attribute) while the block runs."""
    import torch.distributed as dist

    originals = {name: getattr(dist, name, None) for name in ("all_gather_single", "reduce_scatter_single")}
    for name, fn in originals.items():
        if fn is not None:
            def counted(*args, _fn=fn, _name=name, **kwargs):
                counts[_name] = counts.get(_name, 0) + 1
                return _fn(*args, **kwargs)
            setattr(dist, name, counted)
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            if fn is not None:
                setattr(dist, name, fn)


def run_case(overrides: list[str], steps: int) -> dict:
    cfg = load_config(None, overrides)
    world = os.environ.get("WORLD_SIZE")
    trainer = Trainer(cfg, validate(cfg, world_size=int(world) if world else None), progress=False)
    collectives: dict[str, int] = {}
    with counting_fsdp_collectives(collectives):  # one step's worth, per rank
        loss = trainer.forward_backward(trainer.micro_batches(0))
    grads = {}
    for name, p in trainer.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.detach().float().cpu().clone()
    if trainer.pp:  # each pipeline rank holds some stages: collect them all
        import torch.distributed as dist

        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, grads)
        grads = {k: v for part in parts for k, v in part.items()}
    losses = [trainer.mean_over_data_ranks(loss)]
    trainer.optimizer_step(cfg.train.lr)
    for step in range(1, steps):
        losses.append(trainer.train_step(trainer.micro_batches(step), cfg.train.lr)[0])
    return {"losses": losses, "grads": grads, "collectives": collectives, "trainer": trainer}


def main() -> None:
    torch.set_num_threads(1)
    out, cases = sys.argv[1], sys.argv[2:]
    results, trainer = {}, None
    for case in cases:
        name, _, args = case.partition("=")
        r = run_case(args.split(","), steps=4)
        trainer = r.pop("trainer")
        results[name] = r
    if trainer.rank == 0:
        torch.save(results, out)
    trainer.close()


if __name__ == "__main__":
    main()
