import json
import math

import pytest
import torch

from loom.cli import main
from loom.config import load_config, validate
from loom.train.schedule import lr_at
from loom.train.trainer import Trainer

MICRO = ["--parallel.dp_shard=1", "--parallel.pp=1", "--model.name=tiny", "--model.dim=64", "--model.n_layers=2", "--model.n_heads=4",
         "--model.n_kv_heads=2", "--model.ffn_dim=128", "--model.vocab_size=300"]


def make_trainer(dataset, tmp_path, *extra):
    cfg = load_config(None, [*MICRO, f"--data.path={dataset}", "--train.seq_len=32",
                             f"--metrics.jsonl={tmp_path}/m.jsonl", f"--metrics.plot={tmp_path}/loss.png",
                             *extra])
    return Trainer(cfg, validate(cfg), progress=False)


def test_overfits_a_tiny_batch(dataset, tmp_path):
    trainer = make_trainer(dataset, tmp_path, "--train.weight_decay=0", "--train.micro_batch=4",
                           "--train.global_batch=4")
    batch = trainer.data.micro_batches(0)
    losses = [trainer.engine.train_step(batch, lr=3e-3)[0] for _ in range(120)]
    assert losses[0] > 4.0  # about ln(300) at init
    assert losses[-1] < 0.3, losses[-10:]


def test_gradient_accumulation_equals_one_big_batch(dataset, tmp_path):
    grads = {}
    for mb in (8, 2):
        trainer = make_trainer(dataset, tmp_path, f"--train.micro_batch={mb}", "--train.global_batch=8")
        batches = trainer.data.micro_batches(0)
        assert len(batches) == 8 // mb
        loss = sum(trainer.engine.forward_loss(b) / len(batches) for b in batches)
        loss.backward()
        grads[mb] = [p.grad.clone() for p in trainer.model.parameters()]
    for a, b in zip(grads[8], grads[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_lr_schedule():
    vals = [lr_at(s, 1.0, 0.1, 4, 20) for s in range(20)]
    assert vals[:4] == [0.25, 0.5, 0.75, 1.0]
    assert vals[4] == pytest.approx(1.0) and vals[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(vals[4:], vals[5:]))
    assert lr_at(12, 1.0, 0.1, 4, 20) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 8 / 15)))


def test_train_cli_writes_metrics_plot_and_summary(dataset, tmp_path, capsys):
    tb = tmp_path / "tb"
    args = ["train", *MICRO, f"--data.path={dataset}", "--train.seq_len=32", "--train.steps=12",
            "--train.micro_batch=2", "--train.global_batch=4", "--train.eval_every=6",
            "--metrics.log_every=5", f"--metrics.jsonl={tmp_path}/run/m.jsonl",
            f"--metrics.plot={tmp_path}/run/loss.png", f"--metrics.tensorboard={tb}", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for words in ("tokens/s per device", "model TFLOP/s per device", "MFU", "cpu matmul calibration",
                  "validation loss"):
        assert words in out
    rows = [json.loads(line) for line in open(tmp_path / "run" / "m.jsonl")]
    assert [r["step"] for r in rows] == [1, 5, 6, 10, 12]
    assert rows[0]["layout"] == {"dp_replicate": 1, "dp_shard": 1, "tp": 1, "cp": 1, "pp": 1, "ep": 1, "world_size": 1}
    assert rows[0]["flops_convention"] == "megatron"
    assert all("layout" not in r for r in rows[1:])
    keys = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device",
            "tflops_per_device", "mfu", "peak_memory_bytes", "step_time_s"}
    for r in rows:
        assert keys <= r.keys()
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_per_device"] == r["tokens_per_s"]
        assert 0 < r["mfu"] < 1.5 and r["peak_memory_bytes"] > 10 * 2**20 and r["step_time_s"] > 0
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
    assert [r["val_loss"] is not None for r in rows] == [False, False, True, False, True]
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(p.name.startswith("events.out.tfevents") for p in tb.iterdir())
    # A second run starts a new metrics file rather than mixing runs.
    assert main(args[:-1] + ["--train.steps=2", "--quiet"]) == 0
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "m.jsonl")] == [1, 2]


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_bf16_tracks_fp32(dataset, tmp_path, recompute):
    losses = {}
    for dtype in ("float32", "bfloat16"):
        trainer = make_trainer(dataset, tmp_path, f"--train.dtype={dtype}", f"--train.recompute={recompute}",
                               "--train.micro_batch=4", "--train.global_batch=4")
        losses[dtype] = [trainer.engine.train_step(trainer.data.micro_batches(s), lr=1e-3)[0] for s in range(4)]
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights
    for a, b in zip(losses["float32"], losses["bfloat16"]):
        assert b == pytest.approx(a, rel=1e-2)


def test_clip_grad_norm_matches_torch():
    from loom.train.optim import clip_grad_norm

    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    want = torch.nn.utils.clip_grad_norm_(twins, 0.5).item()
    assert clip_grad_norm(params, 0.5) == pytest.approx(want, rel=1e-6)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.grad, q.grad)
    assert clip_grad_norm(params, 100.0) == pytest.approx(0.5, rel=1e-5)  # no scaling below the bound


def test_bert_trains_on_masked_lm_targets(dataset, tmp_path):
    """tiny-bert learns its masked-LM objective: batches carry Megatron's masking (15% chosen;
    of those 80% [MASK], 10% random, 10% kept; loss on chosen tokens only), deterministic for a
    sequence, and the masked-LM validation loss falls."""
    import numpy as np

    trainer = make_trainer(dataset, tmp_path, "--model.name=tiny-bert", "--train.steps=30", "--train.lr=3e-3",
                           "--train.warmup_steps=3", "--train.eval_every=0", "--train.eval_batches=4",
                           "--metrics.plot=")
    spec = trainer.data.masking
    assert spec is not None and trainer.model_cfg.causal is False
    # Masking statistics over many sequences, and the same masks for the same sequences.
    idx = np.arange(min(200, trainer.data.train.n_sequences))
    batch = trainer.data.train.batch(idx, False, spec)
    raw, _ = trainer.data.train.sequences(idx)
    chosen = batch.labels != -100
    assert 0.12 < chosen.float().mean().item() < 0.18
    assert torch.equal(batch.labels[chosen], raw[chosen])  # the label is the original token
    assert not chosen[raw == spec.mask_id].any() and not chosen[raw == spec.special_ids[0]].any()
    masked = (batch.inputs == spec.mask_id) & chosen
    kept = (batch.inputs == raw) & chosen
    assert 0.72 < masked.sum() / chosen.sum() < 0.88 and 0.05 < kept.sum() / chosen.sum() < 0.2
    assert torch.equal((batch.inputs != raw), chosen & ~kept)  # only chosen tokens change
    again = trainer.data.train.batch(idx[::-1].copy(), False, spec)
    assert torch.equal(again.labels.flip(0), batch.labels)
    summary = trainer.train()
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.5, summary


def test_a_run_faster_than_the_calibrated_peak_reports_no_mfu_and_discards_the_peak(dataset, tmp_path, monkeypatch):
    """A stale calibration (here 1 FLOP/s): no row and no summary shows an MFU (never above
    100%), the summary says the peak is stale, and the cached calibration is dropped."""
    from loom.metrics.meter import Peak
    from loom.train import report as report_module

    forgotten = []
    monkeypatch.setattr(report_module, "device_peak", lambda device, dtype, fp8=False: Peak(1.0, "cpu matmul calibration (test)"))
    monkeypatch.setattr(report_module, "forget_cpu_peak", forgotten.append)
    trainer = make_trainer(dataset, tmp_path, "--train.steps=3", "--train.eval_every=0", "--metrics.log_every=1",
                           "--metrics.plot=")
    summary = trainer.train()
    assert summary["mfu"] is None and "stale" in summary["peak_source"]
    assert forgotten == [torch.float32]
    assert all(json.loads(line)["mfu"] is None for line in open(tmp_path / "m.jsonl"))


def test_a_collective_timeout_is_recognised_through_chained_errors(tmp_path):
    """gloo's words for a collective past the process-group timeout are found also where another
    error was raised from it (a pipeline schedule re-raises), and nothing else is taken for one."""
    from loom.train.hangs import Activity, collective_timeout

    try:
        try:
            raise RuntimeError("[/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms for recv "
                               "operation to complete")
        except RuntimeError as e:
            raise ValueError("stage 1 failed") from e
    except ValueError as e:
        chained = e
    assert collective_timeout(chained) == "Timed out waiting 6000ms for recv operation to complete"
    assert collective_timeout(RuntimeError("Connection closed by peer")) is None
    assert collective_timeout(ZeroDivisionError("Timed out")) is None
    # A save that meets one is not a failed write (a CheckpointError, which on_error='continue'
    # would let training go on from): the timeout itself goes on, its partial folder removed.
    from types import SimpleNamespace

    from loom.train.checkpoint import CheckpointError, Checkpointer
    from loom.train.checkpoint_files import TMP_PREFIX

    final = tmp_path / "step-00000004"
    partial = tmp_path / f"{TMP_PREFIX}step-00000004"
    for error, passes_through in ((chained, True), (OSError("disk on fire"), False)):
        partial.mkdir()
        with pytest.raises(BaseException) as raised:
            with Checkpointer._failing_as(SimpleNamespace(rank=0), final):
                raise error
        assert (raised.value is error) == passes_through
        assert isinstance(raised.value, CheckpointError) != passes_through
        assert not partial.exists()
    activity = Activity()
    assert activity.where() == "before the first step (start-up)"
    activity.now("validation", step=7)
    assert activity.where() == "in step 7 (validation)"


def wandb_records(run_file) -> list:
    """The records of an offline W&B run file (run-<id>.wandb): wandb's own protobuf Records in
    LevelDB's log framing (a 7-byte file header; 32 KiB blocks of chunks, each with a 7-byte
    header: CRC, length, type 1 full / 2 first / 3 middle / 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, parts, records = run_file.read_bytes(), 7, [], []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def test_wandb_sink_records_the_metrics_rows_offline(dataset, tmp_path, monkeypatch, capsys):
    """metrics.wandb='project/run' with W&B offline: the run is named so, holds the run's config,
    every logged row's numeric entries at its step (nested ones flattened) and the final losses;
    the console shows loom's lines only. A bad name is one line before anything starts."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    args = ["train", *MICRO, f"--data.path={dataset}", "--train.seq_len=32", "--train.steps=4", "--train.micro_batch=2",
            "--train.global_batch=4", "--metrics.log_every=2", f"--metrics.jsonl={run}/m.jsonl", "--metrics.plot=",
            "--metrics.wandb=loom-tests/tiny-run", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert not [line for line in out.splitlines() if line.lower().startswith("wandb")]
    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (meta.project, meta.display_name) == ("loom-tests", "tiny-run")
    assert '"seq_len"' in meta.config.SerializeToString().decode(errors="replace")
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    rows = [json.loads(line) for line in open(run / "m.jsonl")]
    assert [h["_step"] for h in history] == [r["step"] for r in rows] == [1, 2, 4]
    for h, row in zip(history, rows):
        assert h["loss"] == pytest.approx(row["loss"]) and h["tokens_per_s"] == pytest.approx(row["tokens_per_s"])
    summary = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for item in r.summary.update if item.key}
    assert summary["final_loss"] == pytest.approx(rows[-1]["loss"])
    assert main(args[:-2] + ["--metrics.wandb=a/b/c", "--quiet"]) == 2
    assert "metrics.wandb='a/b/c' must be 'project' or 'project/run'" in capsys.readouterr().err
