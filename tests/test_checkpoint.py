"""Checkpoints: exact continuation after an interruption, resharding across layouts (also of
experts), a killed save, bad and incompatible checkpoints, old ones, a full disk.

Continuation is exact: in fp32 the resumed run's losses equal the uninterrupted run's to the last
bit (same layout). Across layouts the rule is parity's (relative 1e-5)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs import cli_env, common, launch, run_in_process, train_cli

pytestmark = pytest.mark.slow  # launches, forks or long runs: not in `make test-fast`

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


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_single_process_continues_exactly(dataset, tmp_path, asynchronous):
    results = run_in_process(continuation_jobs(common(dataset, tmp_path, CONTINUATION_STEPS), tmp_path / "ck",
                                               asynchronous))
    assert_exact_continuation(results, asynchronous)
    ck = tmp_path / "ck"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000006", "step-00000009", "step-00000012"]


@pytest.fixture(scope="module")
def four_ranks(dataset, small_source, tmp_path_factory) -> tuple[Path, dict]:
    """One 4-rank launch for every 4-rank checkpoint test of this module: dp_shard=2 x tp=2 stops
    after step 6 and resumes (fp32, and FP8 tensorwise); checkpoints saved under tp=2 x pp=2 (Llama,
    and tiny GPT-3 with its tied embedding) load under dp_shard=4; tiny-moe saved under ep=4 loads
    under dp_shard=2 x tp=2 x ep=2. Returns (its folder, {job: results})."""
    tmp = tmp_path_factory.mktemp("four_ranks")
    args = common(dataset, tmp, CONTINUATION_STEPS)
    jobs = {f"dp2tp2_{k}": v + ["--parallel.dp_shard=2", "--parallel.tp=2"]
            for k, v in continuation_jobs(args, tmp / "ck_dp2tp2").items()}
    jobs.update({f"fp8_{k}": v + ["--parallel.dp_shard=2", "--parallel.tp=2", "--train.dtype=bfloat16",
                                  "--train.fp8=tensorwise"]
                 for k, v in continuation_jobs(args, tmp / "ck_fp8").items()})
    for family, extra in (("llama", []), ("gpt3", ["--model.name=tiny-gpt3"])):
        jobs[f"{family}_tp2pp2_save"] = common(dataset, tmp, steps=9) + extra + [
            "--parallel.tp=2", "--parallel.pp=2", f"--checkpoint.dir={tmp}/ck_{family}", "--train.stop_at=6"]
        jobs[f"{family}_dp4_load"] = common(dataset, tmp, steps=9) + extra + [
            "--parallel.dp_shard=4", f"--checkpoint.dir={tmp}/ck_{family}_dp4",
            f"--checkpoint.resume={tmp}/ck_{family}/step-00000006"]
    moe = common(dataset, tmp, steps=9) + ["--model.name=tiny-moe"]
    jobs["ep4_save"] = moe + ["--parallel.dp_shard=4", "--parallel.ep=4", f"--checkpoint.dir={tmp}/ck_ep4",
                              "--train.stop_at=6"]
    jobs["ep2_load"] = moe + ["--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.ep=2",
                              f"--checkpoint.dir={tmp}/ck_ep2", f"--checkpoint.resume={tmp}/ck_ep4/step-00000006"]
    blend = blend_args(dataset, small_source)
    jobs["blend_tp2pp2_save"] = blend + ["--parallel.tp=2", "--parallel.pp=2", f"--checkpoint.dir={tmp}/ck_blend",
                                         "--train.stop_at=6", f"--metrics.jsonl={tmp}/blend.jsonl"]
    jobs["blend_dp4_load"] = blend + ["--parallel.dp_shard=4", f"--checkpoint.dir={tmp}/ck_blend",
                                      f"--metrics.jsonl={tmp}/blend.jsonl"]
    return tmp, launch(4, tmp / "out.pt", jobs, tmp)


@pytest.fixture(scope="module")
def small_source(text_corpus, tmp_path_factory) -> Path:
    """A small dataset in the test dataset's tokenizer (12 of its documents), which a blend reads
    for several epochs."""
    import shutil

    from loom.data.prepare import prepare

    root, tok, _ = text_corpus
    corpus = tmp_path_factory.mktemp("small_corpus")
    for text in sorted((root / "a").glob("*.txt"))[:12]:
        shutil.copy(text, corpus / text.name)
    small = tmp_path_factory.mktemp("small") / "ds"
    prepare(corpus, tok, small, val_fraction=0.25, progress=False)
    return small


def blend_args(dataset, small) -> list[str]:
    """9 steps on a 0.6 / 0.4 blend of the test dataset and the small source."""
    args = [a for a in common(dataset, "unused", steps=9) if not a.startswith(("--data.path=", "--metrics.jsonl="))]
    return args + [f'--data.blend=[[0.6, "{dataset}"], [0.4, "{small}"]]']


def test_a_blend_resumed_under_another_layout_continues_the_run(four_ranks, dataset, small_source, tmp_path):
    """A blend saved after step 6 under tp=2 x pp=2 and resumed under dp_shard=4 (with the
    per-source counts its checkpoint holds) gives every loss of an uninterrupted one-process run
    (fp32 parity); its metrics count each source's samples, and the small source ran epochs."""
    tmp, results = four_ranks
    single = run_in_process({"blend": blend_args(dataset, small_source) + [f"--metrics.jsonl={tmp_path}/m.jsonl"]})
    expected = dict(single["blend"]["curve"])
    saved, resumed = results["blend_tp2pp2_save"]["curve"], results["blend_dp4_load"]["curve"]
    assert [s for s, _ in saved] == list(range(1, 7)) and [s for s, _ in resumed] == list(range(1, 10))
    for step, loss in resumed:
        assert loss == pytest.approx(expected[step], rel=1e-5), step
    manifest = json.loads((tmp / "ck_blend" / "step-00000006" / "loom.json").read_text())
    assert manifest["data_state"] == {"blend_samples": 48, "blend_drawn": [29, 19]}
    rows = [json.loads(line) for line in open(tmp / "blend.jsonl")]
    assert rows[0]["blend"] == [[0.6, str(dataset)], [0.4, str(small_source)]]
    assert rows[-1]["step"] == 9 and rows[-1]["samples_by_source"] == {str(dataset): 43, str(small_source): 29}
    assert set(rows[-1]["val_loss_by_source"]) == {str(dataset), str(small_source)}
    from loom.data.dataset import TokenDataset

    assert TokenDataset(small_source, "train", 32).n_sequences < 29  # so it was read for more than an epoch


@pytest.mark.parametrize("layout", ["dp2tp2", "fp8"])
def test_four_ranks_continue_exactly(four_ranks, layout):
    """dp_shard=2 x tp=2 stops after step 6 and resumes exactly, in fp32 and with FP8
    (tensorwise, whose weight scales are set again from the loaded weights)."""
    _, results = four_ranks
    assert_exact_continuation({k.removeprefix(f"{layout}_"): v for k, v in results.items()
                               if k.startswith(f"{layout}_")})


def loaded_alike(saved: dict, loaded: list[dict], single: dict) -> None:
    """Runs that resumed a checkpoint saved at step 6 (`saved`'s) start from its weights bit for
    bit and go on like the single-process one (parity rule)."""
    for run in loaded:
        assert run["loaded"].keys() == saved["params"].keys()
        for name, p in saved["params"].items():
            assert torch.equal(run["loaded"][name], p), name
        assert run["curve"][:6] == saved["curve"]
        for (s1, a), (s2, b) in zip(run["curve"][6:], single["curve"][6:]):
            assert s1 == s2 and a == pytest.approx(b, rel=1e-5)


def test_tp2_pp2_checkpoint_loads_under_dp4_and_in_one_process(dataset, four_ranks):
    """A checkpoint saved under tp=2 x pp=2 loads under dp_shard=4 and into a single process:
    the same weights bit for bit, the same validation loss, and training goes on alike."""
    from conftest import assert_rel_close

    tmp, results = four_ranks
    single = run_in_process({"single": common(dataset, tmp, steps=9) + [
        f"--checkpoint.dir={tmp}/ck_single", f"--checkpoint.resume={tmp}/ck_llama/step-00000006"]})["single"]
    loaded_alike(results["llama_tp2pp2_save"], [results["llama_dp4_load"], single], single)
    # The validation loss of the loaded weights is the same under both layouts.
    assert single["loaded_val"] == pytest.approx(results["llama_dp4_load"]["loaded_val"], rel=1e-5)
    for name, p in single["params"].items():
        assert_rel_close(results["llama_dp4_load"]["params"][name], p, 1e-4)


def test_tied_embedding_checkpoint_loads_without_the_pipeline_copy(dataset, four_ranks):
    """A tied family (tiny GPT-3): the last pipeline stage's copy of the embedding is saved as the
    embedding, so the checkpoint loads into layouts (and a process) without the copy."""
    tmp, results = four_ranks
    single = run_in_process({"single": common(dataset, tmp, steps=9) + [
        "--model.name=tiny-gpt3", f"--checkpoint.dir={tmp}/ck_gpt3_single",
        f"--checkpoint.resume={tmp}/ck_gpt3/step-00000006"]})["single"]
    loaded_alike(results["gpt3_tp2pp2_save"], [results["gpt3_dp4_load"], single], single)


def test_expert_parallel_checkpoint_reshards_to_any_ep(dataset, four_ranks):
    """tiny-moe saved under ep=4 (experts split over 4 ranks) loads under dp_shard=2 x tp=2 x
    ep=2 and in one process: the same weights bit for bit, and training goes on alike."""
    tmp, results = four_ranks
    single = run_in_process({"single": common(dataset, tmp, steps=9) + [
        "--model.name=tiny-moe", f"--checkpoint.dir={tmp}/ck_ep_single",
        f"--checkpoint.resume={tmp}/ck_ep4/step-00000006"]})["single"]
    assert any(".experts." in name for name in results["ep4_save"]["params"])
    loaded_alike(results["ep4_save"], [results["ep2_load"], single], single)


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
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), cwd=tmp_path)
    deadline = time.time() + 300
    while not (ck / ".tmp-step-00000004").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ck / "step-00000002" / "loom.json").exists() and not (ck / "step-00000004").exists()

    r = subprocess.run([sys.executable, "-m", "loom", "train", *args], capture_output=True, text=True,
                       env=cli_env(), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step-00000002" in r.stdout
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000006"]  # leftovers and old ones gone


# -- bad checkpoints and bad resumes: one line, exit 2, nothing touched ----------------------------
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
    code, err = train_cli(saved[1] + [f"--checkpoint.resume={path}", "--train.steps=6"], capsys)
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
        code, err = train_cli(base + extra, capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, (extra, err)
    assert _snapshot(ck) == before
    # A checkpoint of the per-epoch permutations loom drew before keyed ones: its data stream
    # cannot be continued (its weights can start a run).
    old = _copy(saved, tmp_path / "old")
    manifest = json.loads((old / "loom.json").read_text())
    del manifest["data"]["data.order"]
    (old / "loom.json").write_text(json.dumps(manifest))
    code, err = train_cli(base + [f"--checkpoint.resume={old}", "--train.steps=6"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "ordered its samples by epoch-permutation, this loom by keyed-permutation" in err
    assert f"allowed: checkpoint.init_from='{old}'" in err


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
    code, err = train_cli(saved[1] + [f"--checkpoint.resume={ck}", "--train.steps=6"], capsys)
    assert code == 2 and "unsafe" in err and ("posix.system" in err or "os.system" in err), err
    assert err.count("\n") == 1
    assert not marker.exists()


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
