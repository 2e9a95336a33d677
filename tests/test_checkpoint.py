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

MODEL = ["--parallel.dp_shard=1", "--parallel.pp=1", "--model.dim=64", "--model.n_layers=2",
         "--model.n_heads=8", "--model.n_kv_heads=4", "--model.ffn_dim=128", "--model.vocab_size=300"]
TRAIN = ["--train.seq_len=32", "--train.global_batch=8", "--train.micro_batch=2", "--train.lr=3e-3",
         "--train.warmup_steps=2", "--train.eval_every=0", "--train.eval_batches=2"]


def common(dataset, tmp, steps=20):
    return MODEL + TRAIN + [f"--train.steps={steps}", f"--data.path={dataset}",
                            f"--metrics.jsonl={tmp}/m.jsonl", "--metrics.plot="]


CONTINUATION_STEPS = 12


def continuation_jobs(args: list[str], ck: Path, asynchronous: bool = False) -> dict[str, list[str]]:
    """An uninterrupted 12-step run; the same run stopped after step 6 (checkpoints every 3 steps);
    a new launch resuming it (auto); with async saves also a resume from step 3, whose checkpoint
    was written in the background while steps 4-6 trained."""
    a = [f"--checkpoint.async_save={str(asynchronous).lower()}", "--checkpoint.keep=3"]
    jobs = {
        "uninterrupted": args,
        "stopped": args + a + [f"--checkpoint.dir={ck}", "--checkpoint.every=3", "--train.stop_at=6"],
    }
    if asynchronous:
        jobs["from_step3"] = args + a + [f"--checkpoint.dir={ck}_3", f"--checkpoint.resume={ck}/step-00000003"]
    jobs["resumed"] = args + a + [f"--checkpoint.dir={ck}", "--checkpoint.every=3"]
    return jobs


def assert_exact_continuation(results: dict, asynchronous: bool = False) -> None:
    full = results["uninterrupted"]["curve"]
    assert [s for s, _ in full] == list(range(1, CONTINUATION_STEPS + 1))
    assert results["stopped"]["curve"] == full[:6]
    assert results["resumed"]["curve"] == full  # steps 1-6 from the checkpoint, 7-12 trained again
    for name, p in results["uninterrupted"]["params"].items():
        assert torch.equal(results["resumed"]["params"][name], p), name
    if asynchronous:
        assert results["from_step3"]["curve"][3:] == full[3:]


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
    results = run_in_process(continuation_jobs(common(dataset, tmp_path, CONTINUATION_STEPS), tmp_path / "ck",
                                               asynchronous))
    assert_exact_continuation(results, asynchronous)
    ck = tmp_path / "ck"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000006", "step-00000009", "step-00000012"]


RESHARD_STEPS = ["--train.steps=9", "--train.stop_at=0"]


def test_four_ranks_continue_exactly_and_reshard(dataset, tmp_path):
    """One 4-rank launch: dp_shard=2 x tp=2 stops after step 6 and resumes exactly, in fp32 and
    with FP8 (tensorwise, whose weight scales are set again from the loaded weights); a checkpoint
    saved under tp=2 x pp=2 loads under dp_shard=4, and (in this process) into a single process:
    the same weights bit for bit, the same validation loss, and training goes on alike."""
    args = common(dataset, tmp_path, CONTINUATION_STEPS)
    jobs = {f"dp2tp2_{k}": v + ["--parallel.dp_shard=2", "--parallel.tp=2"]
            for k, v in continuation_jobs(args, tmp_path / "ck_dp2tp2").items()}
    jobs.update({f"fp8_{k}": v + ["--parallel.dp_shard=2", "--parallel.tp=2", "--train.dtype=bfloat16",
                                  "--train.fp8=tensorwise"]
                 for k, v in continuation_jobs(args, tmp_path / "ck_fp8").items()})
    saved = tmp_path / "ck_tp2pp2"
    jobs["tp2pp2_save"] = common(dataset, tmp_path, steps=9) + [
        "--parallel.tp=2", "--parallel.pp=2", f"--checkpoint.dir={saved}", "--train.stop_at=6"]
    jobs["dp4_load"] = common(dataset, tmp_path, steps=9) + [
        "--parallel.dp_shard=4", f"--checkpoint.dir={tmp_path}/ck_dp4",
        f"--checkpoint.resume={saved}/step-00000006"]
    # A tied family (tiny GPT-3): the last pipeline stage's copy of the embedding is saved as the
    # embedding, so the checkpoint loads into layouts (and a process) without the copy.
    gpt3 = ["--model.name=tiny-gpt3"]
    jobs["gpt3_tp2pp2_save"] = common(dataset, tmp_path, steps=9) + gpt3 + [
        "--parallel.tp=2", "--parallel.pp=2", f"--checkpoint.dir={tmp_path}/ck_gpt3", "--train.stop_at=6"]
    jobs["gpt3_dp4_load"] = common(dataset, tmp_path, steps=9) + gpt3 + [
        "--parallel.dp_shard=4", f"--checkpoint.dir={tmp_path}/ck_gpt3_dp4",
        f"--checkpoint.resume={tmp_path}/ck_gpt3/step-00000006"]
    results = launch(4, tmp_path / "out.pt", jobs, tmp_path)
    for layout in ("dp2tp2_", "fp8_"):
        assert_exact_continuation({k.removeprefix(layout): v for k, v in results.items() if k.startswith(layout)})
    gpt3_single = run_in_process({"single": common(dataset, tmp_path, steps=9) + gpt3 + [
        f"--checkpoint.dir={tmp_path}/ck_gpt3_single", f"--checkpoint.resume={tmp_path}/ck_gpt3/step-00000006"]})
    for loaded in (results["gpt3_dp4_load"], gpt3_single["single"]):
        saved_gpt3 = results["gpt3_tp2pp2_save"]["params"]
        assert loaded["loaded"].keys() == saved_gpt3.keys()
        for name, p in saved_gpt3.items():
            assert torch.equal(loaded["loaded"][name], p), name
        for (s1, a), (s2, b) in zip(loaded["curve"][6:], gpt3_single["single"]["curve"][6:]):
            assert s1 == s2 and a == pytest.approx(b, rel=1e-5)

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
    """cp=2 with packed documents resumes exactly (async saves); its step-6 checkpoint also
    resumes under tp=2 and goes on like the cp=2 run (parity rule)."""
    args = common(dataset, tmp_path, CONTINUATION_STEPS) + ["--data.pack_documents=true"]
    jobs = continuation_jobs(args + ["--parallel.cp=2"], tmp_path / "ck", asynchronous=True)
    jobs["tp2_from_cp2"] = args + ["--parallel.tp=2", f"--checkpoint.dir={tmp_path}/ck_tp2",
                                   f"--checkpoint.resume={tmp_path}/ck/step-00000006"]
    results = launch(2, tmp_path / "out.pt", jobs, tmp_path)
    assert_exact_continuation(results, asynchronous=True)
    full = results["uninterrupted"]["curve"]
    for (s1, a), (s2, b) in zip(results["tp2_from_cp2"]["curve"][6:], full[6:]):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5)


def _worker_pids(marker: str, workers_only: bool = True) -> list[int]:
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


def _left_running(marker: str) -> list[int]:
    """loom, torchrun and worker processes of a finished command that are still there."""
    return _worker_pids(marker, workers_only=False)


def _cli_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}


def test_killed_worker_restarts_and_resumes(dataset, tmp_path):
    """`loom train --nproc 4 --max-restarts 1`: a worker SIGKILLed after the step-10 checkpoint;
    torchrun restarts the job, it resumes from the newest checkpoint, and ends with the
    uninterrupted run's final loss (same layout: bit for bit)."""
    import signal
    import time

    args = common(dataset, tmp_path, steps=30)[2:] + [
        "--parallel.dp_shard=2", "--parallel.pp=2", "--checkpoint.every=10", "--metrics.log_every=1"]
    finals = {}
    for name in ("uninterrupted", "killed"):
        ck = tmp_path / f"ck_{name}"
        cmd = [sys.executable, "-m", "loom", "train", "--quiet", "--nproc", "4", "--max-restarts", "1",
               *args, f"--checkpoint.dir={ck}", f"--metrics.jsonl={tmp_path}/{name}.jsonl"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_cli_env(), cwd=tmp_path)
        if name == "killed":
            deadline = time.time() + 300
            while not (ck / "step-00000010").exists():
                assert proc.poll() is None and time.time() < deadline, "the run ended before its step-10 checkpoint"
                time.sleep(0.02)
            victims = _worker_pids(str(ck))
            assert len(victims) == 4
            os.kill(victims[1], signal.SIGKILL)
            killed_before_end = not (ck / "step-00000030").exists()
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
        rows = [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")]
        assert [r["step"] for r in rows] == list(range(1, 31))  # the repeated steps' rows replaced
        finals[name] = (rows[-1]["loss"], out)
    assert killed_before_end
    assert "resumed from" in finals["killed"][1] and "step-00000010" in finals["killed"][1]
    assert finals["killed"][0] == finals["uninterrupted"][0]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if path.exists() else []


def test_sigterm_stops_after_a_step_with_a_checkpoint_and_resumes_exactly(dataset, tmp_path):
    """Preemption: `loom train --nproc 2` gets SIGTERM once step 5 is logged. Its workers finish
    the step in flight, agree on it, write its checkpoint and end; the launcher exits with status
    3 and one line; no process is left. The same command then resumes, and every step's loss
    equals the uninterrupted run's, bit for bit."""
    import signal
    import time

    from loom.train.signals import EXIT_STOPPED

    args = common(dataset, tmp_path, steps=12)[2:] + ["--parallel.dp_shard=2", "--parallel.pp=1", "--metrics.log_every=1"]
    ck = tmp_path / "ck"
    runs = {"uninterrupted": args + [f"--metrics.jsonl={tmp_path}/full.jsonl"],
            "stopped": args + [f"--checkpoint.dir={ck}", f"--metrics.jsonl={tmp_path}/stopped.jsonl"]}
    cmd = [sys.executable, "-m", "loom", "train", "--quiet", "--nproc", "2"]
    proc = subprocess.Popen(cmd + runs["stopped"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_cli_env(), cwd=tmp_path)
    deadline = time.time() + 300
    while len(_rows(tmp_path / "stopped.jsonl")) < 5:
        assert proc.poll() is None and time.time() < deadline, "the run ended before step 5"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    signalled = time.time()
    out, err = proc.communicate(timeout=120)
    stop_s = time.time() - signalled
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    # Within the step in flight, the next (the signal may land after a step's agreement) and the
    # save, plus torchrun's teardown, far inside its 30 s grace (measured: 1.5-1.7 s, steps of 0.15-0.19 s).
    step_s = max(r["step_time_s"] for r in _rows(tmp_path / "stopped.jsonl"))
    assert stop_s < 2 * step_s + 10, (stop_s, step_s)
    lines = [line for line in err.splitlines() if line.startswith("loom train")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    step = int(lines[0].split("after step ")[1].split(";")[0])
    assert 5 <= step <= 7  # the step in flight when the workers got the signal (or the next)
    assert f"checkpoint {ck}/step-{step:08d} written" in lines[0]
    assert sorted(p.name for p in ck.iterdir()) == [f"step-{step:08d}"]
    assert not _left_running(str(ck))
    for name, extra in (("resumed", runs["stopped"]), ("uninterrupted", runs["uninterrupted"])):
        r = subprocess.run(cmd + extra, capture_output=True, text=True, env=_cli_env(), cwd=tmp_path, timeout=300)
        assert r.returncode == 0, (name, r.stderr[-3000:])
    full, resumed = _rows(tmp_path / "full.jsonl"), _rows(tmp_path / "stopped.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]


def _injected(tmp_path: Path, code: str) -> dict:
    """The CLI's environment with `code` run at start-up by torchrun's workers only (a
    sitecustomize module that acts where LOCAL_RANK is set)."""
    inject = tmp_path / "inject"
    inject.mkdir(exist_ok=True)
    body = "".join(f"    {line}\n" for line in code.strip().splitlines())
    (inject / "sitecustomize.py").write_text(f"import os\nif 'LOCAL_RANK' in os.environ:\n{body}")
    return {**_cli_env(), "PYTHONPATH": os.pathsep.join([str(inject), str(HERE.parent)])}


def _published(ck: Path) -> dict:
    return {p.name: {f.name: f.read_bytes() for f in p.rglob("*") if f.is_file()}
            for p in ck.iterdir() if p.name.startswith("step-")}


def _assert_unchanged(ck: Path, published: dict) -> None:
    for name, files in published.items():
        assert {f.name: f.read_bytes() for f in (ck / name).rglob("*") if f.is_file()} == files, name


def test_second_sigterm_stops_at_once_and_leaves_published_checkpoints(dataset, tmp_path):
    """Two SIGTERMs in a row: the launcher kills torchrun and its workers at once, says so in one
    line and exits with 128 + 15; the checkpoints published before are byte for byte unchanged."""
    import signal
    import time

    ck = tmp_path / "ck"
    args = common(dataset, tmp_path, steps=400)[2:] + [
        "--parallel.dp_shard=2", "--parallel.pp=1", "--metrics.log_every=1", f"--checkpoint.dir={ck}",
        "--checkpoint.every=4", "--checkpoint.keep=100", f"--metrics.jsonl={tmp_path}/m.jsonl"]
    # The graceful stop the first signal starts is made slow (its save waits 60 s), so that it
    # cannot end before the second signal arrives (two signals sent at once may arrive as one).
    env = _injected(tmp_path, """
import time
import loom.train.checkpoint as c
stop = c.Checkpointer.stop_with_checkpoint
def slow_stop(self, *a):
    time.sleep(60)
    return stop(self, *a)
c.Checkpointer.stop_with_checkpoint = slow_stop""")
    proc = subprocess.Popen([sys.executable, "-m", "loom", "train", "--quiet", "--nproc", "2", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.time() + 300
    while not (ck / "step-00000004").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.01)
    published = _published(ck)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("loom train")]
    assert lines == ["loom train: stopped at once by a second SIGTERM; the checkpoints published before it are "
                     "intact"], err[-3000:]
    assert not _left_running(str(ck))
    _assert_unchanged(ck, published)


def test_a_stopped_rank_ends_the_job_within_the_timeout_with_one_line(dataset, tmp_path):
    """A rank stopped (SIGSTOP) after step 3: the other's next collective waits train.timeout_s,
    then the job ends with one line naming the step, what it was doing and the collective, exit
    status 5, within the timeout (plus torchrun's teardown), no process left, and the checkpoints
    published before are byte for byte unchanged."""
    import re
    import signal
    import time

    from loom.train.hangs import EXIT_TIMEOUT

    ck, timeout_s = tmp_path / "ck", 6
    args = common(dataset, tmp_path, steps=400)[2:] + [
        "--parallel.dp_shard=2", "--parallel.pp=1", "--metrics.log_every=1", f"--checkpoint.dir={ck}",
        "--checkpoint.every=2", "--checkpoint.keep=100", f"--train.timeout_s={timeout_s}"]
    proc = subprocess.Popen([sys.executable, "-m", "loom", "train", "--quiet", "--nproc", "2", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_cli_env(), cwd=tmp_path)
    deadline = time.time() + 300
    while len(_rows(tmp_path / "m.jsonl")) < 3:
        assert proc.poll() is None and time.time() < deadline, "the run ended before step 3"
        time.sleep(0.01)
    rank_1 = [pid for pid in _worker_pids(str(ck)) if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
    os.kill(rank_1[0], signal.SIGSTOP)
    stopped_at = time.time()
    published = _published(ck)
    out, err = proc.communicate(timeout=120)
    ended_after = time.time() - stopped_at
    assert proc.returncode == EXIT_TIMEOUT, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    m = re.fullmatch(rf"loom train: rank 0: in step (\d+) \((.+)\), (.+) waited longer than train.timeout_s={timeout_s} "
                     rf"\((.+)\); another rank is stopped, hung or gone\. The checkpoints published before it are "
                     rf"intact; raise train.timeout_s if a step or a save of this run takes longer", lines[0])
    # Step 3's row is written before its stop check, so rank 1 may be stopped before it joins that
    # check: the wait can begin in step 3 as well as in a later one.
    assert m and int(m.group(1)) >= 3 and "Timed out" in m.group(4), lines[0]
    assert timeout_s <= ended_after < timeout_s + 15, ended_after  # torchrun's teardown: not its 30 s wait
    assert not _left_running(str(ck))
    assert "step-00000002" in published
    _assert_unchanged(ck, published)


def test_a_workers_loom_error_is_one_line_with_status_2(dataset, tmp_path):
    """A non-finite loss on the workers of `loom train --nproc 2`: loom's one line, exit status 2,
    none of torchrun's failure report, no process left."""
    args = common(dataset, tmp_path, steps=5)[2:] + [
        "--parallel.dp_shard=2", "--parallel.pp=1", "--train.lr=1e9", "--train.warmup_steps=0", "--train.grad_clip=0",
        f"--checkpoint.dir={tmp_path}/ck_nan"]
    r = subprocess.run([sys.executable, "-m", "loom", "train", "--quiet", "--nproc", "2", *args], capture_output=True,
                       text=True, env={k: v for k, v in _cli_env().items() if k != "OMP_NUM_THREADS"},
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("loom train: error: non-finite loss"), r.stderr[-3000:]
    assert not _left_running(f"{tmp_path}/ck_nan")


def test_an_unexpected_worker_error_is_one_line_with_its_traceback_in_a_file(dataset, tmp_path):
    """A bug inside the workers (injected: ZeroDivisionError in step 3 on every rank, through a
    sitecustomize module that only torchrun's workers load): one line naming the exception and
    the file holding its traceback, exit status 4, no traceback on the terminal, no process left."""
    import re

    from loom.train.crash import EXIT_CRASH

    env = _injected(tmp_path, """
import loom.train.trainer as t
step = t.Trainer.train_one_step
def broken(self, step_number, *a):
    if step_number == 3:
        raise ZeroDivisionError('injected in step 3')
    return step(self, step_number, *a)
t.Trainer.train_one_step = broken""")
    run = tmp_path / "run"
    args = common(dataset, tmp_path, steps=5)[2:] + ["--parallel.dp_shard=2", "--parallel.pp=1",
                                                      f"--metrics.jsonl={run}/m.jsonl", f"--checkpoint.dir={run}/ck"]
    r = subprocess.run([sys.executable, "-m", "loom", "train", "--quiet", "--nproc", "2", *args], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == EXIT_CRASH, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    m = re.fullmatch(r"loom train: rank (\d): unexpected ZeroDivisionError: injected in step 3 \(full traceback in "
                     r"(.*traceback-rank-0000\d\.txt)\)", lines[0])
    assert m, lines[0]
    assert "ZeroDivisionError: injected in step 3" in Path(m.group(2)).read_text()
    assert not _left_running(f"{run}/ck")


def test_killed_save_leaves_the_previous_checkpoint_usable(dataset, tmp_path):
    """SIGKILL while the step-4 checkpoint is being written (its temporary folder exists, the
    published one does not): step 2 stays complete, and `resume=auto` continues from it."""
    import signal
    import time

    ck = tmp_path / "ck"
    # A model large enough (34M parameters, a 400 MB checkpoint) that its save takes a while.
    args = common(dataset, tmp_path, steps=6)[8:] + [
        "--parallel.dp_shard=1", "--parallel.pp=1", "--model.dim=512", "--model.n_layers=8",
        "--model.n_heads=8", "--model.n_kv_heads=8", "--model.ffn_dim=1536", "--model.vocab_size=300",
        f"--checkpoint.dir={ck}", "--checkpoint.every=2", "--checkpoint.keep=1"]
    proc = subprocess.Popen([sys.executable, "-m", "loom", "train", "--quiet", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_cli_env(), cwd=tmp_path)
    deadline = time.time() + 300
    while not (ck / ".tmp-step-00000004").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ck / "step-00000002" / "loom.json").exists() and not (ck / "step-00000004").exists()

    r = subprocess.run([sys.executable, "-m", "loom", "train", *args], capture_output=True, text=True,
                       env=_cli_env(), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step-00000002" in r.stdout
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000006"]  # leftovers and old ones gone


# -- bad checkpoints and bad resumes: one line, exit 2, nothing touched ----------------------------
def test_expert_parallel_checkpoint_reshards_to_any_ep(dataset, tmp_path):
    """tiny-moe saved under ep=4 (experts split over 4 ranks) loads under dp_shard=2 x tp=2 x
    ep=2 and in one process: the same weights bit for bit, and training goes on alike."""
    moe = common(dataset, tmp_path, steps=9) + ["--model.name=tiny-moe"]
    saved = tmp_path / "ck_ep4"
    jobs = {
        "ep4_save": moe + ["--parallel.dp_shard=4", "--parallel.ep=4", f"--checkpoint.dir={saved}",
                           "--train.stop_at=6"],
        "ep2_load": moe + ["--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.ep=2",
                           f"--checkpoint.dir={tmp_path}/ck_ep2", f"--checkpoint.resume={saved}/step-00000006"],
    }
    results = launch(4, tmp_path / "out.pt", jobs, tmp_path)
    single = run_in_process({"single": moe + [f"--checkpoint.dir={tmp_path}/ck_single",
                                              f"--checkpoint.resume={saved}/step-00000006"]})["single"]
    saved_params = results["ep4_save"]["params"]
    assert any(".experts." in name for name in saved_params)
    for loaded in (results["ep2_load"], single):
        assert loaded["loaded"].keys() == saved_params.keys()
        for name, p in saved_params.items():
            assert torch.equal(loaded["loaded"][name], p), name
        assert loaded["curve"][:6] == results["ep4_save"]["curve"]
    for (s1, a), (s2, b) in zip(results["ep2_load"]["curve"][6:], single["curve"][6:]):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5)


@pytest.fixture(scope="module")
def saved(dataset, tmp_path_factory):
    """A finished 4-step single-process run with checkpoints at steps 2 and 4."""
    from ckpt_worker import run_job

    tmp = tmp_path_factory.mktemp("saved")
    args = common(dataset, tmp, steps=4) + [f"--checkpoint.dir={tmp}/ck", "--checkpoint.every=2"]
    run_job(args)
    return tmp, args


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(args, capsys) -> tuple[int, str]:
    from loom.cli import main

    code = main(["train", "--quiet", *args])
    return code, capsys.readouterr().err


def _copy(saved, tmp_path) -> Path:
    import shutil

    src = saved[0] / "ck" / "step-00000004"
    dst = tmp_path / "copy" / "step-00000004"
    shutil.copytree(src, dst)
    return dst


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _then(action, result):
    """Run the damaging action (its return value ignored), give back the checkpoint to resume."""
    return result


BAD_RESUMES = {
    "missing": (lambda ck: ck.parent / "nope", "no such file or directory"),
    "no_manifest": (lambda ck: _then((ck / "loom.json").unlink(), ck), "loom.json is missing"),
    "bad_manifest": (lambda ck: _then((ck / "loom.json").write_text("{not json"), ck), "is corrupted"),
    "truncated": (lambda ck: _then(os.truncate(ck / "__0_0.distcp", 1000), ck), "__0_0.distcp is truncated"),
    "missing_shard": (lambda ck: _then((ck / "__0_0.distcp").unlink(), ck), "__0_0.distcp is missing"),
    "corrupted": (lambda ck: _then(_flip_byte(ck / "__0_0.distcp", 5000), ck), "__0_0.distcp is corrupted"),
}


@pytest.mark.parametrize("case", sorted(BAD_RESUMES))
def test_bad_checkpoint_is_one_line_and_touches_nothing(case, saved, tmp_path, capsys):
    damage, message = BAD_RESUMES[case]
    path = damage(_copy(saved, tmp_path))
    out_dir = saved[0] / "ck"
    before = _snapshot(out_dir), _snapshot(tmp_path / "copy")
    code, err = _cli(saved[1] + [f"--checkpoint.resume={path}", "--train.steps=6"], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err and str(path.name) in err, err
    assert "Traceback" not in err
    assert (_snapshot(out_dir), _snapshot(tmp_path / "copy")) == before


def test_incompatible_resumes_are_refused(saved, tmp_path, capsys):
    base = saved[1]
    ck = saved[0] / "ck"
    before = _snapshot(ck)
    cases = [
        (["--model.dim=128"], "holds another model: model.dim=64 there, 128 in this config"),
        (["--train.seq_len=64"], "train.seq_len=32, this config has 64"),
        (["--train.seed=1"], "train.seed=0, this config has 1"),
        (["--train.steps=4"], "is at step 4, train.steps=4: nothing left to train"),
        (["--checkpoint.resume=never"], "already holds checkpoints (step-00000004)"),
    ]
    for extra, message in cases:
        code, err = _cli(base + extra, capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, (extra, err)
    assert _snapshot(ck) == before


def test_forged_metadata_is_never_unpickled(saved, tmp_path, capsys):
    """A .metadata that would run code when unpickled (and a manifest forged to match it) is
    refused by the restricted unpickler; the code never runs."""
    import pickle
    import zlib

    ck = _copy(saved, tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ck / ".metadata").write_bytes(pickle.dumps(Exploit()))
    manifest = json.loads((ck / "loom.json").read_text())
    data = (ck / ".metadata").read_bytes()
    manifest["files"][".metadata"] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    (ck / "loom.json").write_text(json.dumps(manifest))
    code, err = _cli(saved[1] + [f"--checkpoint.resume={ck}", "--train.steps=6"], capsys)
    assert code == 2 and "unsafe" in err and ("posix.system" in err or "os.system" in err), err
    assert err.count("\n") == 1
    assert not marker.exists()


def test_nonfinite_loss_stops_or_skips_and_is_never_saved(dataset, tmp_path, capsys):
    """An absurd learning rate makes step 2's gradients non-finite: 'stop' names the step and
    leaves only step 1's checkpoint; 'skip' drops the steps and saves only finite weights."""
    args = common(dataset, tmp_path, steps=4) + ["--train.lr=1e30", "--train.min_lr=0",
                                                 "--train.warmup_steps=0", "--checkpoint.every=1"]
    code, err = _cli(args + [f"--checkpoint.dir={tmp_path}/stop"], capsys)
    assert code == 2 and "at step 2; stopping" in err and err.count("\n") == 1, err
    assert [p.name for p in (tmp_path / "stop").iterdir()] == ["step-00000001"]

    code, err = _cli(args + [f"--checkpoint.dir={tmp_path}/skip", "--train.on_nonfinite=skip"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert rows[-1]["step"] == 4 and rows[-1]["grad_norm"] is None
    from loom.config import load_config
    from loom.models.transformer import build_model
    from loom.train.checkpoint_files import load_model_weights, published

    saved_steps = published(tmp_path / "skip")
    assert [step for step, _ in saved_steps] == [3, 4]
    model = build_model(load_config(None, args).model_config(), "cpu")
    for _, path in saved_steps:
        load_model_weights(path, model)
        assert all(p.isfinite().all() for p in model.parameters())


# -- Hugging Face interop ---------------------------------------------------------------------------
def _hf_model(transformers, dtype=torch.float32):
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
        tie_word_embeddings=False, attention_bias=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm gains too, so a mixed-up name cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.to(dtype)


def test_hugging_face_round_trip(tmp_path, capsys, dataset):
    """HF LlamaForCausalLM (random weights, local config) -> `loom convert --from-hf` -> loom logits
    equal HF's within 1e-5 -> trains from it -> `loom convert --to-hf` -> transformers loads the
    export and gives the loom model's logits."""
    transformers = pytest.importorskip("transformers")
    from loom.cli import main
    from loom.models.transformer import build_model
    from loom.train.checkpoint_files import load_model_weights

    hf = _hf_model(transformers)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "imported")]) == 0
    printed = capsys.readouterr().out
    command = printed.strip().splitlines()[-1].split()  # "loom train --model.name=... --checkpoint.resume=..."
    assert command[:3] == ["loom", "train", "--model.name=llama3.1-8b"]

    from loom.config import load_config, validate

    model_cfg = validate(load_config(None, command[2:-1] + [f"--data.path={dataset}"]))
    ours = build_model(model_cfg, "cpu")
    load_model_weights(tmp_path / "imported", ours)
    tokens = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        want = hf(tokens).logits
        torch.testing.assert_close(ours(tokens), want, rtol=1e-5, atol=1e-5)

    # A run starts from the imported weights (step 0, fresh optimizer) and saves a training checkpoint.
    run = command[2:] + common(dataset, tmp_path, steps=2)[8:] + [
        "--parallel.dp_shard=1", "--parallel.pp=1", f"--checkpoint.dir={tmp_path}/run", "--train.lr=1e-4", "--train.min_lr=1e-5"]
    assert main(["train", "--quiet", *run]) == 0
    assert "resumed from" in capsys.readouterr().out

    for source, dtype, rel in ((tmp_path / "imported", "float32", 1e-5), (tmp_path / "run/step-00000002", "float32", 1e-5),
                               (tmp_path / "run/step-00000002", "bfloat16", 2e-2)):
        out = tmp_path / f"export_{source.name}_{dtype}"
        assert main(["convert", "--to-hf", str(source), "--output", str(out), "--dtype", dtype,
                     "--max-shard-gb", "0.0002"]) == 0  # ~200 KB: several shards and an index
        assert (out / "model.safetensors.index.json").exists()
        back = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
        load_model_weights(source, ours)
        with torch.no_grad():
            torch.testing.assert_close(back(tokens).logits, ours(tokens), rtol=rel, atol=rel)
    capsys.readouterr()


def test_hugging_face_import_of_bf16_weights_and_refusals(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from loom.cli import main
    from loom.models.hf import hf_param_name
    from loom.models.transformer import build_model
    from loom.convert import import_hf

    hf = _hf_model(transformers, torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    path, cfg = import_hf(tmp_path / "hf", tmp_path / "ck")
    ours = build_model(cfg, "cpu")  # fp32 master weights take the bf16 values exactly
    from loom.train.checkpoint_files import load_model_weights

    load_model_weights(path, ours)
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, hf_params[hf_param_name(name, cfg)].float()), name

    (tmp_path / "pickled").mkdir()
    torch.save({}, tmp_path / "pickled" / "pytorch_model.bin")
    (tmp_path / "pickled" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    cases = [
        (["--from-hf", str(tmp_path / "pickled"), "--output", str(tmp_path / "x")], "never unpickles"),
        (["--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ck")], "already exists"),
        (["--from-hf", str(tmp_path / "nope"), "--output", str(tmp_path / "y")], "no config.json"),
        (["--to-hf", str(tmp_path / "ck"), "--output", str(tmp_path / "hf")], "is not empty"),
    ]
    capsys.readouterr()  # transformers' own progress bars
    for args, message in cases:
        assert main(["convert", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


_STREAMED_IMPORT = r"""
import json, resource, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from loom.convert import import_hf
from loom.models.hf import hf_param_name
from loom.models.hf.llama import LlamaAdapter
from loom.models.transformer import ModelConfig, build_model

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = ModelConfig(dim=1024, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=4096, vocab_size=8192)
folder.mkdir()
(folder / "config.json").write_text(json.dumps(LlamaAdapter().hf_config(cfg, "bfloat16")))
weight_map, largest, total = {}, 0, 0
for i, (name, p) in enumerate(build_model(cfg, "meta").named_parameters()):  # one file per tensor
    t = torch.full(p.shape, float(i % 7), dtype=torch.bfloat16)
    save_file({hf_param_name(name, cfg): t}, str(folder / f"w{i:03d}.safetensors"))
    weight_map[hf_param_name(name, cfg)] = f"w{i:03d}.safetensors"
    largest, total = max(largest, t.nbytes), total + t.nbytes
    del t
(folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import_hf(folder, out)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"grew": grew, "largest": largest, "total": total}))
"""


def test_hugging_face_import_streams_one_tensor_at_a_time(tmp_path):
    """Importing a 302 MB (bf16) model grows the process by about its largest tensor (16 MB), not
    by the model; the checkpoint holds every tensor."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _STREAMED_IMPORT, str(tmp_path / "hf"), str(tmp_path / "ck")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["total"] > 15 * m["largest"]
    assert m["grew"] < 4 * m["largest"], m  # holding the model would grow by m["total"]
    from loom.train.checkpoint_files import checkpoint_tensor_shapes

    assert len(checkpoint_tensor_shapes(tmp_path / "ck")) == 8 * 9 + 3


def test_checkpoints_from_before_the_model_families_still_load():
    """A manifest written before ModelConfig had its family fields (norm, mlp, ...) describes a
    Llama: it is compatible with the Llama config and refused for another family."""
    from loom.config import load_config, validate
    from loom.train.checkpoint_files import CheckpointError, model_fields
    from loom.train.resume import check_compatible

    cfg = load_config(None, ["--model.name=tiny"])
    llama = validate(cfg, check_files=False)
    old_fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "norm_eps", "rope_theta",
                  "rope_scaling", "max_seq_len")
    manifest = {"model": {k: v for k, v in model_fields(llama).items() if k in old_fields}, "contents": ["model"]}
    check_compatible("old", manifest, cfg, llama)
    other = load_config(None, ["--model.name=tiny", "--model.norm=layernorm"])
    with pytest.raises(CheckpointError, match="model.norm='rmsnorm' there, 'layernorm' in this config"):
        check_compatible("old", manifest, other, validate(other, check_files=False))


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_a_save_on_a_full_disk_is_one_line_and_keeps_the_published_checkpoints(dataset, tmp_path, on_error,
                                                                                monkeypatch):
    """The saves after step 2 fail as on a full disk (ENOSPC from DCP's file writes): one line
    with the free space and the size needed, no partial folder, step 2 byte for byte unchanged;
    the run stops at step 4, or with checkpoint.on_error='continue' says so at steps 4 and 6 and
    trains on to its end."""
    import errno

    from torch.distributed.checkpoint import filesystem

    from ckpt_worker import run_job
    from loom.train.checkpoint_files import CheckpointError

    ck = tmp_path / "ck"
    writes = filesystem._write_item

    def full_from_step_4(*args, **kwargs):  # full once step 2 is published
        if (ck / "step-00000002").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return writes(*args, **kwargs)

    step2 = {}

    def snapshot_after_step_2(*args, **kwargs):
        if not step2 and (ck / "step-00000002").exists():
            step2.update({f.name: f.read_bytes() for f in (ck / "step-00000002").rglob("*") if f.is_file()})
        return full_from_step_4(*args, **kwargs)

    monkeypatch.setattr(filesystem, "_write_item", snapshot_after_step_2)
    args = common(dataset, tmp_path, steps=6) + [f"--checkpoint.dir={ck}", "--checkpoint.every=2",
                                                  "--checkpoint.keep=5", f"--checkpoint.on_error={on_error}"]
    torch.set_num_threads(1)
    if on_error == "stop":
        with pytest.raises(CheckpointError) as failed:
            run_job(args)
        message = str(failed.value)
        assert "\n" not in message
    else:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            out, _ = run_job(args)
        assert [s for s, _ in out["curve"]] == list(range(1, 7))  # trained on to the end
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 2 and all("training goes on (checkpoint.on_error='continue')" in x for x in lines)
        message = lines[0]
    assert f"saving checkpoint {ck}/step-00000004 failed (no space left on its filesystem:" in message
    assert "GiB free, one checkpoint needs about" in message and "partial folder is removed" in message
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000002"]  # no partial folder
    assert step2 and {f.name: f.read_bytes() for f in (ck / "step-00000002").rglob("*") if f.is_file()} == step2
