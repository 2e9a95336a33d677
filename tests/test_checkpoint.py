"""Checkpoints: exact continuation after an interruption, resharding across layouts, restart after
a killed worker, a killed save, bad checkpoints, non-finite losses, Hugging Face interop.

Continuation is exact: in fp32 the resumed run's losses equal the uninterrupted run's to the last
bit (same layout). Across layouts the rule is parity's (relative 1e-5)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

MODEL = ["--parallel.dp_shard=1", "--parallel.pp=1", "--model.dim=64", "--model.n_layers=4",
         "--model.n_heads=8", "--model.n_kv_heads=4", "--model.ffn_dim=128", "--model.vocab_size=300"]
TRAIN = ["--train.seq_len=32", "--train.global_batch=8", "--train.micro_batch=2", "--train.lr=3e-3",
         "--train.warmup_steps=2", "--train.eval_every=0", "--train.eval_batches=2"]


def common(dataset, tmp, steps=20):
    return MODEL + TRAIN + [f"--train.steps={steps}", f"--data.path={dataset}",
                            f"--metrics.jsonl={tmp}/m.jsonl", "--metrics.plot="]


def continuation_jobs(args: list[str], ck: Path, asynchronous: bool = False) -> dict[str, list[str]]:
    """An uninterrupted 20-step run; the same run stopped after step 10 (checkpoints every 5 steps);
    a new launch resuming it (auto); with async saves also a resume from step 5, whose checkpoint
    was written in the background while steps 6-10 trained."""
    a = [f"--checkpoint.async_save={str(asynchronous).lower()}", "--checkpoint.keep=3"]
    jobs = {
        "uninterrupted": args,
        "stopped": args + a + [f"--checkpoint.dir={ck}", "--checkpoint.every=5", "--train.stop_at=10"],
    }
    if asynchronous:
        jobs["from_step5"] = args + a + [f"--checkpoint.dir={ck}_5", f"--checkpoint.resume={ck}/step-00000005"]
    jobs["resumed"] = args + a + [f"--checkpoint.dir={ck}", "--checkpoint.every=5"]
    return jobs


def assert_exact_continuation(results: dict, asynchronous: bool = False) -> None:
    full = results["uninterrupted"]["curve"]
    assert [s for s, _ in full] == list(range(1, 21))
    assert results["stopped"]["curve"] == full[:10]
    assert results["resumed"]["curve"] == full  # steps 1-10 from the checkpoint, 11-20 trained again
    for name, p in results["uninterrupted"]["params"].items():
        assert torch.equal(results["resumed"]["params"][name], p), name
    if asynchronous:
        assert results["from_step5"]["curve"][5:] == full[5:]


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


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_single_process_continues_exactly(dataset, tmp_path, asynchronous):
    results = run_in_process(continuation_jobs(common(dataset, tmp_path), tmp_path / "ck", asynchronous))
    assert_exact_continuation(results, asynchronous)
    ck = tmp_path / "ck"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000010", "step-00000015", "step-00000020"]


RESHARD_STEPS = ["--train.steps=9", "--train.stop_at=0"]


def test_four_ranks_continue_exactly_and_reshard(dataset, tmp_path):
    """One 4-rank launch: dp_shard=2 x tp=2 stops after step 10 and resumes exactly; a checkpoint
    saved under tp=2 x pp=2 loads under dp_shard=4, and (in this process) into a single process:
    the same weights bit for bit, the same validation loss, and training goes on alike."""
    args = common(dataset, tmp_path)
    jobs = {f"dp2tp2_{k}": v + ["--parallel.dp_shard=2", "--parallel.tp=2"]
            for k, v in continuation_jobs(args, tmp_path / "ck_dp2tp2").items()}
    saved = tmp_path / "ck_tp2pp2"
    jobs["tp2pp2_save"] = common(dataset, tmp_path, steps=9) + [
        "--parallel.tp=2", "--parallel.pp=2", f"--checkpoint.dir={saved}", "--train.stop_at=6"]
    jobs["dp4_load"] = common(dataset, tmp_path, steps=9) + [
        "--parallel.dp_shard=4", f"--checkpoint.dir={tmp_path}/ck_dp4",
        f"--checkpoint.resume={saved}/step-00000006"]
    results = launch(4, tmp_path / "out.pt", jobs, tmp_path)
    assert_exact_continuation({k.removeprefix("dp2tp2_"): v for k, v in results.items() if k.startswith("dp2tp2_")})

    saved_params = results["tp2pp2_save"]["params"]
    single = run_in_process({"single_load": common(dataset, tmp_path, steps=9) + [
        f"--checkpoint.dir={tmp_path}/ck_single", f"--checkpoint.resume={saved}/step-00000006"]})["single_load"]
    for loaded in (results["dp4_load"], single):
        assert loaded["loaded"].keys() == saved_params.keys()
        for name, p in saved_params.items():
            assert torch.equal(loaded["loaded"][name], p), name
        assert loaded["curve"][:6] == results["tp2pp2_save"]["curve"]
    # Outputs: the validation loss of the loaded weights equals the saving layout's at step 6
    # (the saving run's own later steps are compared against it as the reference).
    from conftest import assert_rel_close

    assert single["loaded_val"] == pytest.approx(results["dp4_load"]["loaded_val"], rel=1e-5)
    # Training goes on: steps 7-9 under dp_shard=4 and in one process agree (parity rule).
    for (s1, a), (s2, b) in zip(results["dp4_load"]["curve"][6:], single["curve"][6:]):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5)
    for name, p in single["params"].items():
        assert_rel_close(results["dp4_load"]["params"][name], p, 1e-4)


def test_cp2_continues_exactly_with_async_saves(dataset, tmp_path):
    args = common(dataset, tmp_path) + ["--parallel.cp=2", "--data.pack_documents=true"]
    results = launch(2, tmp_path / "out.pt", continuation_jobs(args, tmp_path / "ck", asynchronous=True), tmp_path)
    assert_exact_continuation(results, asynchronous=True)


def _worker_pids(marker: str) -> list[int]:
    """Pids of torchrun workers (they have LOCAL_RANK) whose command line contains marker."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmd and any(e.startswith(b"LOCAL_RANK=") for e in env):
            pids.append(int(d.name))
    return pids


def _cli_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}


def test_killed_worker_restarts_and_resumes(dataset, tmp_path):
    """`loom train --nproc 4 --max-restarts 1`: a worker SIGKILLed after the step-20 checkpoint;
    torchrun restarts the job, it resumes from the newest checkpoint, and ends with the
    uninterrupted run's final loss (same layout: bit for bit)."""
    import signal
    import time

    args = common(dataset, tmp_path, steps=60)[2:] + [
        "--parallel.dp_shard=2", "--parallel.pp=2", "--checkpoint.every=20", "--metrics.log_every=1"]
    finals = {}
    for name in ("uninterrupted", "killed"):
        ck = tmp_path / f"ck_{name}"
        cmd = [sys.executable, "-m", "loom", "train", "--quiet", "--nproc", "4", "--max-restarts", "1",
               *args, f"--checkpoint.dir={ck}", f"--metrics.jsonl={tmp_path}/{name}.jsonl"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_cli_env(), cwd=tmp_path)
        if name == "killed":
            deadline = time.time() + 300
            while not (ck / "step-00000020").exists():
                assert proc.poll() is None and time.time() < deadline, "the run ended before its step-20 checkpoint"
                time.sleep(0.02)
            victims = _worker_pids(str(ck))
            assert len(victims) == 4
            os.kill(victims[1], signal.SIGKILL)
            killed_before_end = not (ck / "step-00000060").exists()
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
        rows = [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")]
        assert [r["step"] for r in rows] == list(range(1, 61))  # the repeated steps' rows replaced
        finals[name] = (rows[-1]["loss"], out)
    assert killed_before_end
    assert "resumed from" in finals["killed"][1] and "step-00000020" in finals["killed"][1]
    assert finals["killed"][0] == finals["uninterrupted"][0]
