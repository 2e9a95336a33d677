"""What the checkpoint, fault and conversion tests share: the test model, training launches
(in this process, or under torchrun with tests/ckpt_worker.py), the CLI and its processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent

MODEL = ["--parallel.dp_shard=1", "--parallel.pp=1", "--model.dim=64", "--model.n_layers=2",
         "--model.n_heads=8", "--model.n_kv_heads=4", "--model.ffn_dim=128", "--model.vocab_size=300"]
TRAIN = ["--train.seq_len=32", "--train.global_batch=8", "--train.micro_batch=2", "--train.lr=3e-3",
         "--train.warmup_steps=2", "--train.eval_every=0", "--train.eval_batches=2"]


def common(dataset, tmp, steps=20):
    return MODEL + TRAIN + [f"--train.steps={steps}", f"--data.path={dataset}",
                            f"--metrics.jsonl={tmp}/m.jsonl", "--metrics.plot="]


def launch(world: int, out: Path, jobs: dict[str, list[str]], cwd: Path) -> dict:
    cases = [f"{name}=" + ",".join(args) for name, args in jobs.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={world}", str(HERE / "ckpt_worker.py"), str(out), *cases],
                       capture_output=True, text=True, env=env, timeout=600, cwd=cwd)
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(out, weights_only=True)


def run_in_process(jobs: dict[str, list[str]]) -> dict:
    from ckpt_worker import run_job

    torch.set_num_threads(1)
    return {name: run_job(args)[0] for name, args in jobs.items()}


def worker_pids(marker: str, workers_only: bool = True) -> list[int]:
    """Pids of torchrun workers (they have LOCAL_RANK) whose command line contains marker; with
    workers_only=False of every process whose command line does (torchrun's too)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmd and (not workers_only or any(e.startswith(b"LOCAL_RANK=") for e in env)):
            pids.append(int(d.name))
    return pids


def left_running(marker: str) -> list[int]:
    """loom, torchrun and worker processes of a finished command that are still there."""
    return worker_pids(marker, workers_only=False)


def cli_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if path.exists() else []


def train_cli(args, capsys) -> tuple[int, str]:
    from loom.cli import main

    code = main(["train", "--quiet", *args])
    return code, capsys.readouterr().err


def published_files(ck: Path) -> dict:
    return {p.name: {f.name: f.read_bytes() for f in p.rglob("*") if f.is_file()}
            for p in ck.iterdir() if p.name.startswith("step-")}


def assert_unchanged(ck: Path, published: dict) -> None:
    for name, files in published.items():
        assert {f.name: f.read_bytes() for f in (ck / name).rglob("*") if f.is_file()} == files, name
