"""Checkpoint costs on this machine: save and load times, and what saving costs training.

    python benchmarks/checkpoint.py io       [--models tiny,small] [--repeats 3]
    python benchmarks/checkpoint.py training [--steps 60] [--every 10] [--rounds 3]

io: one process, the model after one AdamW step (so the optimizer states exist). A synchronous
    save (DCP write, CRC-32 of every file, atomic publish), the blocking part of an asynchronous
    save (the host copy DCP makes before it returns) and its total, and a load into a fresh model
    and optimizer (checksums verified, then DCP read). Medians over --repeats; sizes on disk.
training: `Trainer.train()` of the tiny model in one process (2 threads) for --steps steps, three
    ways, alternating over --rounds: no checkpoints, a synchronous save every --every steps, an
    asynchronous one. Reports the loop's wall time (median), the extra time per save against no
    checkpoints, and how long each save blocked the loop. On 2 cores the background writer
    competes with training for the same cores; on a GPU node it runs on otherwise idle host cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loom.config import load_config, validate  # noqa: E402
from loom.models.transformer import init_model  # noqa: E402
from loom.parallel.layout import Layout  # noqa: E402
from loom.train.checkpoint import Checkpointer, TrainState  # noqa: E402
from loom.train.optim import build_optimizer  # noqa: E402


def _setup(model: str, ck: Path):
    cfg = load_config(None, [f"--model.name={model}", "--parallel.dp_shard=1", "--parallel.pp=1",
                             f"--checkpoint.dir={ck}", "--checkpoint.keep=1"])
    model_cfg = validate(cfg)
    net = init_model(model_cfg, torch.device("cpu"), 0)
    opt = build_optimizer(net, cfg.train)
    tokens = torch.randint(0, model_cfg.vocab_size, (1, 65))
    net(tokens[:, :-1], labels=tokens[:, 1:]).backward()
    opt.step()
    return cfg, model_cfg, net, opt


def bench_io(models: list[str], repeats: int) -> None:
    print("| model | params | checkpoint size | sync save (s) | MB/s | async: blocking (s) | async: total (s) | load (s) | MB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in models:
        root = Path(tempfile.mkdtemp(prefix="loom-ckpt-bench-"))
        try:
            cfg, model_cfg, net, opt = _setup(model, root / "ck")
            n_params = sum(p.numel() for p in net.parameters())
            layout = Layout.single("cpu")
            async_cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, async_save=True))
            sync = Checkpointer(cfg, model_cfg, [net], [opt], layout)
            asyn = Checkpointer(async_cfg, model_cfg, [net], [opt], layout)
            saves, blocks, totals, loads = [], [], [], []
            step = 0
            for _ in range(repeats):
                step += 1
                t0 = time.perf_counter()
                sync.save(TrainState(step=step))
                saves.append(time.perf_counter() - t0)
                step += 1
                t0 = time.perf_counter()
                asyn.save(TrainState(step=step))
                blocks.append(time.perf_counter() - t0)
                asyn.wait()
                totals.append(time.perf_counter() - t0)
                fresh_net = init_model(model_cfg, torch.device("cpu"), 1)
                fresh_opt = build_optimizer(fresh_net, cfg.train)
                loader = Checkpointer(cfg, model_cfg, [fresh_net], [fresh_opt], layout)
                t0 = time.perf_counter()
                loader.load(root / "ck" / f"step-{step:08d}")
                loads.append(time.perf_counter() - t0)
                assert all(torch.equal(a, b) for a, b in zip(net.parameters(), fresh_net.parameters()))
            folder = root / "ck" / f"step-{step:08d}"
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            med = statistics.median
            print(f"| {model} | {n_params / 1e6:.1f}M | {size / 1e6:.0f} MB | {med(saves):.3f} | "
                  f"{size / 1e6 / med(saves):.0f} | {med(blocks):.3f} | {med(totals):.3f} | {med(loads):.3f} | "
                  f"{size / 1e6 / med(loads):.0f} |", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)


def bench_training(steps: int, every: int, rounds: int) -> None:
    from loom.train.trainer import Trainer

    torch.set_num_threads(2)
    modes = {"none": [], "sync": ["--checkpoint.async_save=false"], "async": ["--checkpoint.async_save=true"]}
    walls: dict[str, list[float]] = {m: [] for m in modes}
    blocking: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(rounds):
        for mode, extra in modes.items():
            root = Path(tempfile.mkdtemp(prefix="loom-ckpt-train-"))
            try:
                ck = [f"--checkpoint.dir={root}/ck", f"--checkpoint.every={every}", "--checkpoint.keep=1"] if mode != "none" else []
                cfg = load_config(None, ["--parallel.dp_shard=1", "--parallel.pp=1", f"--train.steps={steps}",
                                         "--train.eval_every=0", "--train.eval_batches=1",
                                         f"--metrics.jsonl={root}/m.jsonl", "--metrics.plot=", *ck, *extra])
                trainer = Trainer(cfg, validate(cfg), progress=False)
                summary = trainer.train()
                walls[mode].append(summary["wall_time_s"])
                blocking[mode] += [t["blocking_s"] for t in summary["checkpoint_saves"]]
            finally:
                shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    base = med(walls["none"])
    n_saves = steps // every
    print(f"tiny model, one process, {steps} steps, a save every {every} steps ({n_saves} saves, the last at the end), "
          f"medians of {rounds} rounds")
    print("| checkpoints | loop wall time (s) | extra vs none (s) | extra per save (s) | loop blocked per save (s) |")
    print("|---|---:|---:|---:|---:|")
    for mode in modes:
        w = med(walls[mode])
        extra = w - base
        per = f"{extra / n_saves:.3f}" if mode != "none" else "-"
        blk = f"{med(blocking[mode]):.3f}" if blocking[mode] else "-"
        print(f"| {mode} | {w:.2f} | {extra:+.2f} | {per} | {blk} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    io = sub.add_parser("io")
    io.add_argument("--models", default="tiny,small")
    io.add_argument("--repeats", type=int, default=3)
    tr = sub.add_parser("training")
    tr.add_argument("--steps", type=int, default=60)
    tr.add_argument("--every", type=int, default=10)
    tr.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.what == "io":
        bench_io(args.models.split(","), args.repeats)
    else:
        bench_training(args.steps, args.every, args.rounds)


if __name__ == "__main__":
    main()
