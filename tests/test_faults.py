"""Faults end in one line and leave nothing running: a killed worker (torchrun restarts the
job, which resumes), SIGTERM (stop after the step with a checkpoint) and a second SIGTERM (stop at
once), a rank that stops answering (the collective timeout), loom errors and unexpected errors
inside workers, non-finite losses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runs import (HERE, assert_unchanged, cli_env, common, jsonl_rows, left_running, published_files,
                  train_cli, worker_pids)

pytestmark = pytest.mark.slow  # launches, forks or long runs: not in `make test-fast`


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
                                env=cli_env(), cwd=tmp_path)
        if name == "killed":
            deadline = time.time() + 300
            while not (ck / "step-00000010").exists():
                assert proc.poll() is None and time.time() < deadline, "the run ended before its step-10 checkpoint"
                time.sleep(0.02)
            victims = worker_pids(str(ck))
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
                            env=cli_env(), cwd=tmp_path)
    deadline = time.time() + 300
    while len(jsonl_rows(tmp_path / "stopped.jsonl")) < 5:
        assert proc.poll() is None and time.time() < deadline, "the run ended before step 5"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    signalled = time.time()
    out, err = proc.communicate(timeout=120)
    stop_s = time.time() - signalled
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    # Within the step in flight, the next (the signal may land after a step's agreement) and the
    # save, plus torchrun's teardown, far inside its 30 s grace (measured: 1.5-1.7 s, steps of 0.15-0.19 s).
    step_s = max(r["step_time_s"] for r in jsonl_rows(tmp_path / "stopped.jsonl"))
    assert stop_s < 2 * step_s + 10, (stop_s, step_s)
    lines = [line for line in err.splitlines() if line.startswith("loom train")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    step = int(lines[0].split("after step ")[1].split(";")[0])
    assert 5 <= step <= 7  # the step in flight when the workers got the signal (or the next)
    assert f"checkpoint {ck}/step-{step:08d} written" in lines[0]
    assert sorted(p.name for p in ck.iterdir()) == [f"step-{step:08d}"]
    assert not left_running(str(ck))
    for name, extra in (("resumed", runs["stopped"]), ("uninterrupted", runs["uninterrupted"])):
        r = subprocess.run(cmd + extra, capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=300)
        assert r.returncode == 0, (name, r.stderr[-3000:])
    full, resumed = jsonl_rows(tmp_path / "full.jsonl"), jsonl_rows(tmp_path / "stopped.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]


def _injected(tmp_path: Path, code: str) -> dict:
    """The CLI's environment with `code` run at start-up by torchrun's workers only (a
    sitecustomize module that acts where LOCAL_RANK is set)."""
    inject = tmp_path / "inject"
    inject.mkdir(exist_ok=True)
    body = "".join(f"    {line}\n" for line in code.strip().splitlines())
    (inject / "sitecustomize.py").write_text(f"import os\nif 'LOCAL_RANK' in os.environ:\n{body}")
    return {**cli_env(), "PYTHONPATH": os.pathsep.join([str(inject), str(HERE.parent)])}


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
    published = published_files(ck)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("loom train")]
    assert lines == ["loom train: stopped at once by a second SIGTERM; the checkpoints published before it are "
                     "intact"], err[-3000:]
    assert not left_running(str(ck))
    assert_unchanged(ck, published)


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
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=tmp_path)
    deadline = time.time() + 300
    while len(jsonl_rows(tmp_path / "m.jsonl")) < 3:
        assert proc.poll() is None and time.time() < deadline, "the run ended before step 3"
        time.sleep(0.01)
    rank_1 = [pid for pid in worker_pids(str(ck)) if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
    os.kill(rank_1[0], signal.SIGSTOP)
    stopped_at = time.time()
    published = published_files(ck)
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
    assert not left_running(str(ck))
    assert "step-00000002" in published
    assert_unchanged(ck, published)


def test_a_workers_loom_error_is_one_line_with_status_2(dataset, tmp_path):
    """A non-finite loss on the workers of `loom train --nproc 2`: loom's one line, exit status 2,
    none of torchrun's failure report, no process left."""
    args = common(dataset, tmp_path, steps=5)[2:] + [
        "--parallel.dp_shard=2", "--parallel.pp=1", "--train.lr=1e9", "--train.warmup_steps=0", "--train.grad_clip=0",
        f"--checkpoint.dir={tmp_path}/ck_nan"]
    r = subprocess.run([sys.executable, "-m", "loom", "train", "--quiet", "--nproc", "2", *args], capture_output=True,
                       text=True, env={k: v for k, v in cli_env().items() if k != "OMP_NUM_THREADS"},
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("loom train: error: non-finite loss"), r.stderr[-3000:]
    assert not left_running(f"{tmp_path}/ck_nan")


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
    assert not left_running(f"{run}/ck")


def test_nonfinite_loss_stops_or_skips_and_is_never_saved(dataset, tmp_path, capsys):
    """An absurd learning rate makes step 2's gradients non-finite: 'stop' names the step and
    leaves only step 1's checkpoint; 'skip' drops the steps and saves only finite weights."""
    args = common(dataset, tmp_path, steps=4) + ["--train.lr=1e30", "--train.min_lr=0",
                                                 "--train.warmup_steps=0", "--checkpoint.every=1"]
    code, err = train_cli(args + [f"--checkpoint.dir={tmp_path}/stop"], capsys)
    assert code == 2 and "at step 2; stopping" in err and err.count("\n") == 1, err
    assert [p.name for p in (tmp_path / "stop").iterdir()] == ["step-00000001"]

    code, err = train_cli(args + [f"--checkpoint.dir={tmp_path}/skip", "--train.on_nonfinite=skip"], capsys)
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
