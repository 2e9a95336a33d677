"""Run a few training steps under a layout and record what parity compares.

In-process (world size 1) it is the reference; under torchrun it is one rank of a layout:
    torchrun --nproc-per-node N tests/parity.py OUT.pt CASE=--a.b=1,--c.d=2 CASE2=...
Rank 0 saves {case: {"losses": [...], "grads": {name: full tensor after step 1}, ...}}, or
{case: {"error": one line}} for a case that failed (on every rank alike), so that one failing
case does not hide the others.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

from loom.config import load_config, validate
from loom.parallel.dims import ParallelDims
from loom.parallel.layout import Layout
from loom.train.trainer import Trainer

# Steps a parity case trains: the first one's gradients and every step's loss are compared, so
# two steps check updates made on shards. The big_* cases (a memory check: nothing whole on a
# rank) train 2: their 59M AdamW updates amplify float noise fastest, so only 2 losses compare.
STEPS = 3


def case_steps(name: str) -> int:
    return 2 if name.startswith("big") else STEPS


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


def resident_bytes() -> int:
    """This process's resident set now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def init_checksums(trainer) -> dict:
    """{"crc32": {name: CRC-32 of the whole initial parameter's bytes}, "peak_bytes",
    "shard_bytes" (this rank's), "block_bytes"}: the weights every layout starts from, gathered
    (collectives on every rank), and what initializing them cost in memory."""
    import zlib

    from loom.models.init import BLOCK_ELEMENTS

    crcs = {}
    for name, p in trainer.model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        crcs[name] = zlib.crc32(full.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    if trainer.layout.pp_enabled:
        import torch.distributed as dist

        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, crcs)
        crcs = {k: v for part in parts for k, v in part.items()}
        if trainer.model_cfg.tie_embeddings and "output.weight" in crcs:  # the last stage's copy
            assert crcs.pop("output.weight") == crcs["tok_embeddings.weight"], "tied copies start apart"
    return {"crc32": crcs, "peak_bytes": trainer.model.init_peak_bytes, "shard_bytes": trainer.model.shard_bytes,
            "block_bytes": 4 * BLOCK_ELEMENTS}


@contextlib.contextmanager
def recording_fp8_input_scales(trainer, scales: dict):
    """The float8 scale of each FP8 linear's first input while the block runs: the scale it was
    cast with where it arrives cast (context parallelism casts it before the linear), else the
    scale torchao will compute from it (its own function)."""
    handles = []
    for part in trainer.model.parts:
        for name, module in part.named_modules():
            if type(module).__name__ != "Float8Linear":
                continue

            def record(mod, args, name=name):
                from torchao.float8.float8_utils import tensor_to_scale

                x = args[0].to_local() if hasattr(args[0], "to_local") else args[0]  # a DTensor's shard
                if name not in scales:
                    scale = x._scale if hasattr(x, "_scale") else tensor_to_scale(
                        x, mod.config.cast_config_input.target_dtype)
                    scales[name] = float(scale.to_local() if hasattr(scale, "to_local") else scale)
            handles.append(module.register_forward_pre_hook(record))
    try:
        yield scales
    finally:
        for h in handles:
            h.remove()


class Layouts:
    """One Layout per degrees, shared by the cases of those degrees: every mesh makes process
    groups, and an idle gloo group still costs CPU (its threads wake), so a launch of 40 cases
    should not make 40 meshes. (Their groups cannot be destroyed safely: torch's DTensor caches
    take meshes of one shape for equal, whatever their groups.)"""

    def __init__(self):
        self.layouts: dict[ParallelDims, Layout] = {}

    def of(self, cfg) -> Layout:
        dims = ParallelDims.from_section(cfg.parallel, int(os.environ.get("WORLD_SIZE", "1")))
        if dims not in self.layouts:
            self.layouts[dims] = Layout.join(cfg.parallel, dims.world_size, torch.device("cpu"), cfg.train.timeout_s)
        return self.layouts[dims]


def run_case(overrides: list[str], steps: int, layouts: Layouts | None = None) -> dict:
    cfg = load_config(None, overrides)
    world = os.environ.get("WORLD_SIZE")
    model_cfg = validate(cfg, world_size=int(world) if world else None)
    rss_before = resident_bytes()
    layout = layouts.of(cfg) if layouts is not None else None
    trainer = Trainer(cfg, model_cfg, progress=False, layout=layout)
    rss_growth = peak_resident_bytes() - rss_before
    init = {**init_checksums(trainer), "rss_growth_bytes": rss_growth}
    fp8_scales: dict[str, float] = {}
    engine, data = trainer.engine, trainer.data
    with recording_fp8_input_scales(trainer, fp8_scales):
        loss = engine.forward_backward(data.micro_batches(0))
    grads = gathered_grads(trainer)
    losses = [trainer.layout.mean_over_data_ranks(loss)]
    engine.clip_gradients()
    engine.apply_gradients(cfg.train.lr)
    collectives: dict[str, int] = {}
    for step in range(1, steps):
        # The second step's collectives, per rank: the first runs pipeline schedules' shape inference.
        with counting_fsdp_collectives(collectives) if step == 1 else contextlib.nullcontext():
            losses.append(engine.train_step(data.micro_batches(step), cfg.train.lr)[0])
    grads_after = {}
    if trainer.model.lora is not None:  # LoRA's A has no gradient at step 1 (B starts at zero): again now
        engine.forward_backward(data.micro_batches(steps))
        grads_after = gathered_grads(trainer)
    return {"losses": losses, "grads": grads, "grads_after": grads_after, "collectives": collectives, "init": init,
            "fp8_scales": fp8_scales, "trainer": trainer}


def gathered_grads(trainer) -> dict:
    """{full-model name: full gradient} of every trainable parameter, on every rank."""
    grads = {}
    for name, p in trainer.model.named_parameters():
        if not p.requires_grad:  # frozen (LoRA's base)
            continue
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.detach().float().cpu().clone()
    if trainer.layout.pp_enabled:  # each pipeline rank holds some stages: collect them all
        import torch.distributed as dist

        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, grads)
        grads = {k: v for part in parts for k, v in part.items()}
        if trainer.model_cfg.tie_embeddings and "output.weight" in grads:
            # The last stage's copy of the tied weight: the same gradient as the embedding's
            # (summed over both stages), and no parameter of the single-process model.
            copy = grads.pop("output.weight")
            assert torch.equal(copy, grads["tok_embeddings.weight"]), "tied copies' gradients differ"
    return grads


def warm_up() -> None:
    """Start the process group and load what every Trainer loads (modules, loom's kernels)
    before any case, so that a case's resident-set growth is its own."""
    import torch.distributed as dist
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.pipelining  # noqa: F401
    import torch.distributed.tensor.parallel  # noqa: F401

    from loom.kernels import library

    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    library.status()


def main() -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    warm_up()
    out, cases = sys.argv[1], sys.argv[2:]
    results, layouts = {}, Layouts()
    for case in cases:
        name, _, args = case.partition("=")
        try:
            r = run_case(args.split(","), steps=case_steps(name), layouts=layouts)
        except Exception as e:  # noqa: BLE001 - reported as this case's result
            if os.environ.get("TRACE") and os.environ.get("RANK") == "0":
                import traceback
                traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        r.pop("trainer")
        results[name] = r
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from loom.train.worker_exit import leave

    leave(0)  # as loom's workers end: no interpreter teardown (see loom.train.worker_exit)
