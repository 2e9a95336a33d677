"""`loom train --dry-run`: the real layout on torch's fake process group, measured per rank, and
the planner's memory model held to it."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loom.config import load_config, validate
from loom.plan.hardware import get_spec
from loom.plan.memory import Layout, rank_memory
from loom.train.dry_run import dry_run, peak_live_micro_batches, trace_micro_batch

pytestmark = pytest.mark.slow  # launches, forks or long runs: not in `make test-fast`

ROOT = Path(__file__).parent.parent
RECIPES = [("llama2_7b.toml", 64), ("llama3_8b.toml", 64), ("llama3_70b.toml", 64), ("llama31_8b_128k.toml", 64),
           ("llama31_405b.toml", 512), ("gpt3_175b.toml", 128), ("nemotron4_340b.toml", 384), ("bert_large.toml", 8),
           ("mixtral_8x7b_64k.toml", 128)]


@pytest.mark.parametrize("recipe, world", RECIPES)
def test_planner_states_agree_with_the_real_layout(recipe, world):
    """Parameters, gradients and AdamW states per rank kind: the planner within 2% of the bytes of
    the shards the real layout allocates (on fake tensors)."""
    cfg = load_config(str(ROOT / "configs" / recipe), [])
    model_cfg = validate(cfg, world, check_files=False)  # the recipe's data is not here
    report = dry_run(cfg, model_cfg, world, trace=False)
    layout = Layout.from_config(cfg, report.dims)
    spec = get_spec("h100-sxm-80gb")
    assert len(report.rows) == (3 if report.dims.pp > 2 else report.dims.pp)
    for row in report.rows:
        planned = rank_memory(model_cfg, layout, spec, row.rank // (report.dims.world_size // report.dims.pp))
        for what in ("parameters", "gradients", "optimizer"):
            got, want = getattr(planned, what), getattr(row, what)
            assert got == pytest.approx(want, rel=0.02), (recipe, row.kind, what, got, want)


def test_fake_trace_measures_what_real_tensors_hold():
    """One process: the activations the dry run counts on fake tensors are the bytes the same
    micro-batch keeps on real ones. In bf16, so that real tensors take the same code path as fake
    ones (loom's fp32 CPU kernels, which need real memory, then have nothing to do but RMSNorm,
    which saves what PyTorch's path saves)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from loom.parallel.dims import ParallelDims
    from loom.models.transformer import init_model

    cfg = load_config(None, ["--parallel.dp_shard=1", "--parallel.pp=1", "--train.seq_len=128", "--train.micro_batch=2",
                             "--train.recompute=selective", "--train.dtype=bfloat16"])
    model_cfg = validate(cfg, 1, check_files=False)
    dims = ParallelDims.from_section(cfg.parallel, 1)
    real = trace_micro_batch(init_model(model_cfg, torch.device("cpu"), 0), model_cfg, cfg, dims, torch.bfloat16)
    from loom.models.transformer import build_model

    model = build_model(model_cfg, "meta")
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        fake = trace_micro_batch(model, model_cfg, cfg, dims, torch.bfloat16)
    assert real[0] > 0 and fake[0] == real[0]


def test_in_flight_micro_batches_follow_the_schedule():
    from torch.distributed.pipelining.schedules import _Action, _ComputationType as C

    # Stage 0 of 1F1B over 2 ranks and 4 micro-batches: F0 F1 B0 F2 B1 F3 B2 B3 -> 2 alive at most.
    order = [_Action(0, C.FORWARD, 0), _Action(0, C.FORWARD, 1), _Action(0, C.FULL_BACKWARD, 0),
             _Action(0, C.FORWARD, 2), _Action(0, C.FULL_BACKWARD, 1), _Action(0, C.FORWARD, 3),
             _Action(0, C.FULL_BACKWARD, 2), _Action(0, C.FULL_BACKWARD, 3)]
    assert peak_live_micro_batches(order, [0]) == [2]
    # A split backward frees a micro-batch at its weight half.
    order = [_Action(1, C.FORWARD, 0), _Action(1, C.BACKWARD_INPUT, 0), _Action(1, C.FORWARD, 1),
             _Action(1, C.BACKWARD_WEIGHT, 0), _Action(1, C.BACKWARD_INPUT, 1), _Action(1, C.BACKWARD_WEIGHT, 1)]
    assert peak_live_micro_batches(order, [1]) == [2]


def _loom(*args):
    return subprocess.run([sys.executable, "-m", "loom", "train", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def test_dry_run_cli_prints_each_rank_kind_without_data_or_workers():
    """A GPU recipe whose data is absent here, shrunk to 4 layers, at 32 ranks with a 4-stage
    pipeline: three rank kinds, every figure traced."""
    r = _loom("--config", "configs/llama2_7b.toml", "--dry-run", "--world", "32", "--parallel.pp=4",
              "--parallel.tp=2", "--model.n_layers=4", "--train.seq_len=1024", "--train.global_batch=64")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "llama2-7b" in out and "32 ranks" in out and "pp=4 x dp_shard=4 x tp=2" in out
    for kind in ("first stage (rank 0)", "middle stage (rank 16)", "last stage (rank 24)"):
        assert kind in out
    assert "not traced" not in out
    for row in ("parameters (fp32 shards)", "gradients (fp32)", "optimizer states (AdamW)",
                "FSDP gathered parameters", "activations (in flight)", "micro-batches in flight, per stage"):
        assert row in out


@pytest.mark.parametrize("args, message", [
    (["--world", "6", "--parallel.tp=4", "--parallel.dp_shard=-1"],
     "world size 6 is not divisible by parallel.pp x dp_replicate x cp x tp = 2 x 1 x 1 x 4 = 8"),
    (["--parallel.tp=3"], "parallel.tp=3 does not divide model.n_kv_heads=4"),
    (["--nproc", "2"], "--nproc=2 starts processes; a dry run starts none"),
])
def test_dry_run_bad_layouts_are_one_line(args, message):
    r = _loom("--dry-run", *args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr


def test_world_needs_dry_run():
    r = _loom("--world", "8")
    assert r.returncode == 2 and "--world=8 needs --dry-run" in r.stderr


def test_dry_run_traces_expert_parallelism_and_gathers_only_local_experts():
    """Mixtral's 64K recipe shrunk to 2 layers and one stage, at 128 ranks (tp=4 x cp=8 x dp_shard=4):
    the balanced all-to-all dispatch is traced on fake tensors, and FSDP gathers each block with
    its E / ep experts: ep=8 gathers 7/8 of the experts' bytes fewer than ep=1."""
    shrink = ["--model.n_layers=2", "--parallel.pp=1", "--parallel.pp_virtual_stages=1", "--train.global_batch=8",
              "--train.seq_len=8192"]
    rows = {}
    for ep in (8, 1):
        cfg = load_config(str(ROOT / "configs" / "mixtral_8x7b_64k.toml"), shrink + [f"--parallel.ep={ep}"])
        report = dry_run(cfg, validate(cfg, 128, check_files=False), 128)
        assert report.dims.ep == ep and report.dims.dp_shard == 4
        (rows[ep],) = report.rows
        assert rows[ep].note == "" and rows[ep].activations > 0  # traced
    experts = 2 * 8 * 3 * 4096 * 14336  # 2 layers of 8 experts, not tensor-parallel
    assert rows[1].gathered - rows[8].gathered == pytest.approx(2 * experts * 7 / 8, rel=1e-6)  # bf16
    assert rows[8].parameters == rows[1].parameters  # both sharded over dp_shard x cp = 32 ranks


def test_lora_holds_gradients_and_adamw_states_of_its_adapters_only():
    """The LoRA recipe's real layout (8 ranks of FSDP): gradients and AdamW moments are the
    adapters' 80M parameters (fp32, sharded 8 ways), against 6.7B in the SFT recipe."""
    from loom.metrics.flops import adapter_params

    reports = {}
    for recipe in ("llama2_7b_sft.toml", "llama2_7b_lora.toml"):
        cfg = load_config(str(ROOT / "configs" / recipe), [])
        model_cfg = validate(cfg, 8, check_files=False)
        reports[recipe] = dry_run(cfg, model_cfg, 8, trace=False).rows[0]
        if "lora" in recipe:
            adapters = adapter_params(model_cfg, cfg.lora.spec(model_cfg))
    lora, sft = reports["llama2_7b_lora.toml"], reports["llama2_7b_sft.toml"]
    assert lora.gradients == pytest.approx(4 * adapters / 8, rel=0.01)
    assert lora.optimizer == pytest.approx(8 * adapters / 8, rel=0.01)
    assert sft.optimizer > 50 * lora.optimizer
    assert lora.parameters == pytest.approx(sft.parameters + 4 * adapters / 8, rel=0.01)


def test_the_dry_run_builds_what_a_run_builds(monkeypatch):
    """The dry run and the trainer share loom.parallel.build.build_parallel_model, converters
    included: under train.fp8 the traced linears are torchao's Float8Linear, which keep float8
    copies of their inputs for backward, so an FP8 layout traces fewer activation bytes than the
    same layout in bf16 (measured: 1.214 against 1.319 GB per rank, Llama 3 8B's shape cut to 2
    layers, dp_shard=2 x tp=2, seq 1024), where a dry run without the converters (before) traced
    the same bytes for both."""
    import loom.parallel.build as build
    import loom.train.dry_run as dry_run_module
    import loom.train.trainer as trainer_module

    assert dry_run_module.build_parallel_model is build.build_parallel_model
    assert trainer_module.build_parallel_model is build.build_parallel_model
    base = ["--model.n_layers=2", "--train.seq_len=1024", "--train.global_batch=8", "--train.dtype=bfloat16",
            "--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.cp=1", "--parallel.pp=1"]
    rows = {}
    for fp8 in ("none", "tensorwise"):
        cfg = load_config(str(ROOT / "configs" / "llama3_8b.toml"), [*base, f"--train.fp8={fp8}"])
        rows[fp8] = dry_run(cfg, validate(cfg, 4, check_files=False), 4).rows[0]
    assert rows["tensorwise"].activations < 0.97 * rows["none"].activations, (rows["tensorwise"], rows["none"])
    assert rows["tensorwise"].parameters == rows["none"].parameters  # the same shards, converted
