"""The planner: memory model against hand computations, FLOPs against `loom flops`, ranking and
output contract, bad input; the bench grid parser and an end-to-end two-layout sweep."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loom.models.transformer import ModelConfig
from loom.plan.hardware import GIB, get_spec
from loom.plan.memory import Layout, memory_breakdown, rank_memory

CFG = ModelConfig(dim=1024, n_layers=8, n_heads=16, n_kv_heads=8, ffn_dim=4096, vocab_size=32000)


def test_memory_of_a_4d_layout_by_hand():
    """tp=2 x cp=2 x pp=2 x dp=2, micro batch 1, seq 4096, 16 sequences, bf16, no recompute, 1F1B."""
    spec = get_spec("h100-sxm-80gb")
    lay = Layout(tp=2, cp=2, pp=2, dp=2, micro_batch=1, seq_len=4096, global_batch=16)
    m = rank_memory(CFG, lay, spec, 1)  # the last stage

    # One block: wq, wo 1024 x 1024; wk, wv 1024 x 512; w1, w3, w2 1024 x 4096; two norms of 1024.
    block = (2 * 1024 * 1024 + 2 * 1024 * 512 + 3 * 1024 * 4096) / 2 + 2 * 1024  # matrices over tp=2
    root = 32000 * 1024 / 2 + 1024  # output layer (vocab-parallel) + final norm
    stage = 4 * block + root  # layers 4-7
    per_device = stage / 4  # FSDP over dp x cp = 4
    assert m.parameters == pytest.approx(4 * per_device)
    # zero=3 reduce-scatters the gradients after every micro-batch, pipeline or not.
    assert m.gradients == pytest.approx(4 * per_device)
    assert m.optimizer == pytest.approx(8 * per_device)
    # ... and keeps every unit of the stage gathered (bf16) from the first forward to the last backward.
    assert m.fsdp_buffers == pytest.approx(2 * stage)
    # Activations per layer and local token (t = 4096 / cp = 2048), e = 2, h = 1024, hk = 512,
    # f = 4096, sp = tp = 2: 8h/2 + 2*2h + 2(h + 2hk)/2 + 2h/2 + 4*16/2 + 3*2f/2.
    per_token = 8 * 1024 / 2 + 4 * 1024 + 2 * 2048 / 2 + 1024 + 32 + 3 * 4096
    in_flight = 1  # the last stage of 1F1B holds one micro-batch (stage 0 holds pp = 2)
    assert m.activations == pytest.approx(4 * 2048 * per_token * in_flight)
    # The fused vocabulary-parallel loss: one chunk (all 2048 tokens fit a GPU's 1 GiB budget) of
    # fp32 logits over V / tp and their bf16 copy, plus the fp32 gradients of the output weight
    # shard and of h that it computes in forward.
    assert m.logits == pytest.approx(2048 * 16000 * (4 + 2) + 4 * (16000 * 1024 + 2048 * 1024))
    # Ring buffers (two KV blocks in bf16 + the fp32 dKV) and one gathered matmul input under SP.
    assert m.comm_buffers == pytest.approx(2048 * 2 * 512 / 2 * (2 * 2 + 4) + 2048 * 1024 * 2)
    counted = (m.parameters + m.gradients + m.optimizer + m.fsdp_buffers + m.activations + m.logits
               + m.comm_buffers)
    assert m.margin == pytest.approx(0.08 * counted)
    assert m.total == pytest.approx(counted * 1.08 + 1.5 * GIB)
    first = rank_memory(CFG, lay, spec, 0)
    assert first.activations == pytest.approx(4 * 2048 * per_token * 2)  # pp = 2 micro-batches in flight
    assert memory_breakdown(CFG, lay, spec).total == max(m.total, first.total)
    # zero=1 (and zero-bubble's split backward) accumulate the stage's gradients unsharded, in fp32.
    for other in (dataclasses.replace(lay, zero=1), dataclasses.replace(lay, pp_schedule="zero-bubble")):
        grown = rank_memory(CFG, other, spec, 1)
        assert grown.gradients == pytest.approx(4 * per_device + 4 * stage)
        assert grown.fsdp_buffers == m.fsdp_buffers


def test_memory_of_data_parallel_fp32_selective_by_hand():
    """dp=8 only, micro batch 2, seq 2048, fp32, selective recompute: the single stage holds the
    embedding, all layers, the output layer and the loss's logits chunk."""
    spec = get_spec("a100-80gb")
    lay = Layout(tp=1, cp=1, pp=1, dp=8, micro_batch=2, seq_len=2048, global_batch=32, recompute="selective",
                 dtype="float32")
    m = memory_breakdown(CFG, lay, spec)
    block = 2 * 1024 * 1024 + 2 * 1024 * 512 + 3 * 1024 * 4096 + 2 * 1024
    stage = 8 * block + 2 * 32000 * 1024 + 1024
    assert m.parameters + m.gradients + m.optimizer == pytest.approx(16 * stage / 8)
    # zero=3: the last unit (norm + output) kept, two others (the embedding, in fp32, is the
    # largest), and one block's fp32 gradients before their reduce-scatter.
    assert m.fsdp_buffers == pytest.approx(4 * (32000 * 1024 + 1024) + 2 * 4 * 32000 * 1024 + 4 * block)
    # e = 4, no sp: 8h + 2*4h + 4(h + 2hk) + 4h + 4*16 + 3*4f, minus selective's 2*4h + 4f.
    per_token = 8 * 1024 + 8 * 1024 + 4 * 2048 + 4 * 1024 + 64 + 12 * 4096 - 8 * 1024 - 4 * 4096
    assert m.activations == pytest.approx(8 * (2 * 2048) * per_token)
    chunk = (1 << 28) // 32000  # tokens whose fp32 logits fill 1 GiB
    assert m.logits == pytest.approx(min(4096, chunk) * 32000 * (4 + 4) + 4 * (32000 * 1024 + 4096 * 1024))
    assert m.comm_buffers == 0
    # zero=1: every unit stays gathered and the gradients accumulate unsharded.
    z1 = memory_breakdown(CFG, dataclasses.replace(lay, zero=1), spec)
    assert z1.gradients == pytest.approx(m.gradients + 4 * stage)
    assert z1.fsdp_buffers == pytest.approx(4 * stage)


def _cli(args, capsys):
    from loom.cli import main

    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_flops_match_loom_flops_and_rows_are_ranked(capsys):
    code, out, _ = _cli(["flops", "--model", "llama3.1-8b", "--seq-len", "8192", "--json"], capsys)
    fpt = json.loads(out)["flops_per_token"]["megatron"]
    code, out, _ = _cli(["plan", "--model", "llama3.1-8b", "--gpus", "16", "--gpu", "h100-sxm", "--seq-len", "8192",
                         "--global-batch", "64", "--json", "--top", "500"], capsys)
    assert code == 0
    rows = json.loads(out)
    keys = {"tp", "cp", "pp", "dp", "micro_batch", "recompute", "memory_gb", "fits", "tokens_per_s_per_device",
            "tflops_per_device"}
    assert rows and all(keys <= set(r) for r in rows)
    for r in rows:
        assert r["tp"] * r["cp"] * r["pp"] * r["dp"] == 16
        assert r["tflops_per_device"] == pytest.approx(r["tokens_per_s_per_device"] * fpt / 1e12, rel=1e-3)
    fitting = [r for r in rows if r["fits"]]
    assert [r["tokens_per_s_per_device"] for r in fitting] == sorted(
        (r["tokens_per_s_per_device"] for r in fitting), reverse=True)
    assert rows[: len(fitting)] == fitting  # OOM rows come last


def test_plan_marks_what_does_not_fit(capsys):
    code, out, _ = _cli(["plan", "--model", "llama3-70b", "--gpus", "8", "--gpu", "a100-40gb", "--seq-len", "8192",
                         "--global-batch", "8", "--json", "--top", "500"], capsys)
    rows = json.loads(out)
    assert code == 0 and rows and not any(r["fits"] for r in rows)  # 70B x 16 B does not fit in 8 x 40 GB
    code, out, _ = _cli(["plan", "--model", "llama3-70b", "--gpus", "8", "--gpu", "a100-40gb", "--seq-len", "8192",
                         "--global-batch", "8", "--gpu-memory-gb", "4000", "--json"], capsys)
    assert any(r["fits"] for r in json.loads(out))  # the override reaches the spec
    code, out, _ = _cli(["plan", "--model", "tiny", "--gpus", "4", "--gpu", "h100-sxm", "--seq-len", "1024",
                         "--global-batch", "8", "--tp", "2", "--cp", "2", "--pp", "1", "--micro-batch", "1",
                         "--explain"], capsys)
    assert code == 0 and "activations" in out and "cp ring (exposed)" in out and "OOM" not in out


BAD_PLANS = [
    (["--model", "llama3-9b"], "--model='llama3-9b'"),
    (["--gpu", "h100-pcie-99"], "--gpu='h100-pcie-99' is unknown"),
    (["--tp", "3"], "--tp=3 does not divide --gpus=8"),
    (["--tp", "8", "--gpus", "16", "--model", "tiny"], "--tp=8 does not divide the model's n_kv_heads=4"),
    (["--cp", "4", "--seq-len", "100"], "--seq-len=100 is too short or not divisible for --cp=4"),
    (["--global-batch", "3", "--tp", "1", "--cp", "1", "--pp", "1"], "no layout of 8 devices"),
    (["--gpus", "0"], "--gpus=0 must be a positive integer"),
]


@pytest.mark.parametrize("extra,message", BAD_PLANS, ids=[m for _, m in BAD_PLANS])
def test_bad_plan_input_is_one_line(extra, message, capsys):
    base = {"--model": "llama3.1-8b", "--gpus": "8", "--gpu": "h100-sxm", "--seq-len": "8192", "--global-batch": "64"}
    args = dict(base)
    it = iter(extra)
    for flag in it:
        args[flag] = next(it)
    code, _, err = _cli(["plan", *[x for kv in args.items() for x in kv]], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_spearman():
    from loom.bench.report import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)


def test_bad_grids_are_one_line(tmp_path, capsys):
    cases = {
        "missing": (None, "no such file"),
        "toml": ("[grid\n", "is not valid TOML"),
        "key": ("[grid]\nworld = [1]\nzz = [1]\n", "grid.zz is unknown"),
        "value": ("[grid]\nworld = [0]\n", "must be positive integers"),
        "base_tp": ("[base.parallel]\ntp = 2\n[grid]\nworld = [2]\n", "set per layout"),
        "empty": ("[base.train]\nsteps = 2\n", "no layouts"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name}.toml"
        if text is not None:
            path.write_text(text)
        code, _, err = _cli(["bench", "--grid", str(path)], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, (name, err)
    good = tmp_path / "good.toml"
    good.write_text("[grid]\nworld = [1]\n")
    for flags, message in ((["--repeats", "0"], "--repeats=0"), (["--timeout", "0"], "--timeout=0"),
                           (["--compare-only", "--out", str(tmp_path / "none")], "needs")):
        code, _, err = _cli(["bench", "--grid", str(good), *flags], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, (flags, err)

@pytest.mark.slow

def test_bench_sweeps_layouts_and_records_failures(dataset, tmp_path):
    """Two runnable layouts (one process; cp=2 on 2 ranks) and one loom refuses (tp=3): a CSV, the
    markdown table with the refusal marked, the plots, and the planner comparison."""
    grid = tmp_path / "g.toml"
    grid.write_text(f"""
[base.model]
name = "tiny"
dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
ffn_dim = 128
vocab_size = 300
[base.train]
seq_len = 64
global_batch = 4
steps = 4
eval_batches = 1
[base.data]
path = "{dataset}"
[[layouts]]
world = 1
[[layouts]]
world = 2
cp = 2
[[layouts]]
world = 3
tp = 3
""")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "loom", "bench", "--grid", str(grid), "--out", str(tmp_path / "out"),
                        "--compare-plan", "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("world,tp,cp,pp,micro_batch,seq_len,dp,status")
    statuses = [line.split(",")[7] for line in rows[1:]]
    assert statuses == ["ok", "ok", "invalid"]
    table = (out / "results.md").read_text()
    assert "| 3 | 1 | 1 | 1 |" in table and "invalid" in table and "tokens/s per device" in table
    assert (out / "throughput.png").stat().st_size > 1000
    assert "predicted / measured" in (out / "compare_plan.md").read_text()
    (out / "compare_plan.md").unlink()
    r = subprocess.run([sys.executable, "-m", "loom", "bench", "--grid", str(grid), "--out", str(out),
                        "--compare-only"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "2 layouts" not in r.stderr and (out / "compare_plan.md").exists(), r.stderr


def test_groups_that_cross_nodes_and_zero_modes_cost_what_they_move():
    """A tp group or cp ring larger than a node runs over the inter-node link; zero=3 gathers
    every micro-batch's parameters again and reduce-scatters every micro-batch, zero=1 once."""
    from loom.plan.timing import step_time

    spec = get_spec("h100-sxm-80gb")  # 8 GPUs per node
    cfg = ModelConfig(dim=8192, n_layers=16, n_heads=64, n_kv_heads=16, ffn_dim=28672, vocab_size=32000)
    inside = step_time(cfg, Layout(tp=8, cp=1, pp=1, dp=2, micro_batch=1, seq_len=8192, global_batch=16), spec)
    across = step_time(cfg, Layout(tp=16, cp=1, pp=1, dp=1, micro_batch=1, seq_len=8192, global_batch=16), spec)
    # tp=16 moves 15/16 instead of 7/8 of each [t, dim] per collective, but over a ~9x slower link.
    assert across.tp_comm > 5 * inside.tp_comm * (15 / 16) / (7 / 8)
    ring_inside = step_time(cfg, Layout(tp=4, cp=2, pp=1, dp=2, micro_batch=1, seq_len=8192, global_batch=16), spec)
    ring_across = step_time(cfg, Layout(tp=8, cp=2, pp=1, dp=1, micro_batch=1, seq_len=8192, global_batch=16), spec)
    # Under tp=8 each rank sends half the KV bytes of tp=4, but its ring spans 16 GPUs: 2 nodes.
    assert ring_across.cp_comm > ring_inside.cp_comm

    lay = Layout(tp=8, cp=1, pp=1, dp=4, micro_batch=1, seq_len=8192, global_batch=32)  # 8 micro-batches
    z3, z1 = step_time(cfg, lay, spec), step_time(cfg, dataclasses.replace(lay, zero=1), spec)
    assert z3.dp_comm > 2 * z1.dp_comm
    m3, m1 = memory_breakdown(cfg, lay, spec), memory_breakdown(cfg, dataclasses.replace(lay, zero=1), spec)
    assert m1.gradients > m3.gradients and m1.fsdp_buffers > m3.fsdp_buffers


MOE = ModelConfig(dim=1024, n_layers=4, n_heads=16, n_kv_heads=8, ffn_dim=2048, vocab_size=32000, moe_experts=8,
                  moe_top_k=2)


def test_moe_memory_and_time_under_expert_parallelism_by_hand():
    """tp=2 x dp=4, 8 experts of 3 x 1024 x 2048, ep=1 against ep=4: FSDP shards everything over
    dp x cp either way, but a block is gathered with E / ep experts; under ep the routed copies
    of the local tokens cross the ep group by all-to-all, and FSDP moves E / ep experts over
    dp x cp / ep ranks."""
    from loom.plan.timing import step_time

    spec = get_spec("h100-sxm-80gb")
    lay = Layout(tp=2, cp=1, pp=1, dp=4, micro_batch=1, seq_len=4096, global_batch=8)
    ep4 = dataclasses.replace(lay, ep=4)
    experts = 8 * 3 * 1024 * 2048  # not tensor-parallel
    attention = 2 * 1024 * 1024 + 2 * 1024 * 512
    block = attention / 2 + experts + 8 * 1024 + 2 * 1024  # attention over tp; experts, router, norms whole
    root = 32000 * 1024 / 2 * 2 + 1024  # embedding and output (vocab-parallel) + final norm
    stage = 4 * block + root
    m1, m4 = rank_memory(MOE, lay, spec, 0), rank_memory(MOE, ep4, spec, 0)
    assert m1.parameters == pytest.approx(4 * stage / 4) and m4.parameters == m1.parameters
    # zero=3: the output unit, two gathered blocks (or the fp32 embedding) and one block's fp32
    # gradient, as for a dense model; but ep=4 gathers a block with 2 experts, not 8.
    table, last = 32000 * 1024 / 2, 32000 * 1024 / 2 + 1024
    gathered = lambda b: 2 * last + 2 * max(2 * b, 4 * table) + 4 * b  # noqa: E731
    assert m1.fsdp_buffers == pytest.approx(gathered(block))
    assert m4.fsdp_buffers == pytest.approx(gathered(block - experts * 3 / 4))
    # Activations: a token's 2 experts, not over tp: the rank routes its sequence shard (4096 / 2).
    per_token = 8 * 1024 / 2 + 2 * 2 * 1024 + 2 * 2048 / 2 + 2 * 1024 / 2 + 4 * 16 / 2 + 2 * 3 * 2 * 2048 / 2
    assert m1.activations == m4.activations == pytest.approx(4 * 4096 * per_token)
    t1, t4 = step_time(MOE, lay, spec), step_time(MOE, ep4, spec)
    assert t1.ep_comm == 0
    # 4 all-to-alls per layer and micro-batch (2 forward, 2 backward), each of 3/4 of the 2048 local
    # tokens' 2 bf16 rows of 1024, over ep x tp = 8 GPUs: one node's NVLink.
    eff = spec.efficiency
    per_layer = 4 * 3 / 4 * 2048 * 2 * 1024 * 2 / (spec.intra_node_gbps * 1e9 * eff.link) + 4 * 3 * eff.collective_latency_s
    assert t4.ep_comm == pytest.approx(4 * 2 * per_layer)  # 4 layers, 2 micro-batches
    assert t4.dp_comm < t1.dp_comm  # experts gathered over one rank (dp x cp / ep = 1): not moved at all

@pytest.mark.slow

def test_plan_searches_expert_parallelism(capsys):
    args = ["plan", "--model", "mixtral-8x7b", "--gpus", "64", "--gpu", "h100-sxm", "--seq-len", "65536",
            "--global-batch", "64"]
    code, out, _ = _cli(args, capsys)
    assert code == 0 and " EP " in out.splitlines()[1]
    code, out, _ = _cli(args + ["--json", "--top", "1000"], capsys)
    rows = json.loads(out)
    assert {r["ep"] for r in rows} == {1, 2, 4, 8}
    for r in rows:
        assert (r["dp"] * r["cp"]) % r["ep"] == 0 and r["tp"] * r["cp"] * r["pp"] * r["dp"] == 64
    assert rows[0]["fits"] and rows[0]["ep"] > 1 and rows[0]["cp"] > 1  # long sequences: cp, and experts split
    for extra, message in ((["--ep", "3"], "--ep=3 does not divide the model's n_experts=8"),
                           (["--model", "llama3-8b", "--ep", "2"], "--ep=2 needs a mixture-of-experts model")):
        code, _, err = _cli(args + extra, capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_fp8_plans_gemms_at_the_fp8_peak_and_attention_at_bf16s():
    """--dtype fp8: the blocks' GEMMs at the FP8 peak, attention and the output layer at bf16's,
    the casts' traffic, FSDP gathering float8 block matrices; MFU against the FP8 peak."""
    from loom.plan.search import resolve_model
    from loom.plan.timing import fp8_cast_bytes_per_token, step_time, throughput

    cfg, spec = resolve_model("llama2-7b"), get_spec("h100-sxm")
    short = Layout(tp=1, cp=1, pp=1, dp=4, micro_batch=1, seq_len=4096, global_batch=8, dtype="bfloat16")
    bf16, fp8 = (step_time(cfg, dataclasses.replace(short, dtype=d), spec) for d in ("bfloat16", "fp8"))
    eff = spec.efficiency
    output_s = 2 * 6 * 4096 * cfg.vocab_size * cfg.dim / (989.4e12 * eff.matmul)  # 2 micro-batches, in bf16
    blocks_ratio = eff.matmul * 989.4 / (eff.fp8_matmul * 1978.9)
    assert fp8.matmul == pytest.approx((bf16.matmul - output_s) * blocks_ratio + output_s)
    assert fp8.attention == pytest.approx(bf16.attention)  # bf16 flash attention in both
    assert fp8.overhead > bf16.overhead and fp8_cast_bytes_per_token(cfg, dataclasses.replace(short, dtype="fp8")) > 0
    assert fp8.dp_comm <= bf16.dp_comm
    # zero=1 keeps every unit gathered: 32 blocks of float8 matrices instead of bf16
    mem_bf16, mem_fp8 = (memory_breakdown(cfg, dataclasses.replace(short, dtype=d, zero=1), spec)
                         for d in ("bfloat16", "fp8"))
    assert mem_fp8.fsdp_buffers < mem_bf16.fsdp_buffers and mem_fp8.activations == mem_bf16.activations
    perf = throughput(cfg, dataclasses.replace(short, dtype="fp8"), spec, fp8)
    assert perf.mfu == pytest.approx(perf.tflops_per_device / 1978.9)
    with pytest.raises(Exception, match="--dtype='fp8' has no peak for a100-80gb"):
        step_time(cfg, dataclasses.replace(short, dtype="fp8"), get_spec("a100"))

@pytest.mark.slow

def test_fp8_plan_reproduces_nemos_long_sequence_curve_with_cp():
    """benchmarks/long_sequence_cp.py (in-sample: two constants fitted to the 4K and 1M rows):
    with CP within 6% of the published TFLOP/s per GPU at every length from 4K to 1M, no CP
    layout chosen up to 16K, and CP helping more as sequences grow."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from long_sequence_cp import predictions

    rows = predictions(get_spec("h100-sxm"), None)
    for r in rows:
        assert r["cp"] == pytest.approx(r["pub_cp"], rel=0.06), r
    assert all("CP1," in r["cp_layout"] for r in rows if r["seq_k"] <= 16)
    gains = [r["cp"] / r["no_cp"] if r["no_cp"] else float("inf") for r in rows]
    assert gains[0] == 1.0 and gains[-1] == float("inf") and gains[4] > gains[3] > 1.0
