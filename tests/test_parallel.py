"""Parity of parallel layouts (data, tensor, pipeline, context) with the single-process run (gloo,
one thread per rank); `packed` cases train on packed documents against a packed reference.

Same seed, same data: every step's loss and the gradients after step 1 must match within
relative 1e-5 in fp32 and 1e-2 in bf16.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_rel_close
from parity import case_steps

pytestmark = pytest.mark.slow  # launches, forks or long runs: not in `make test-fast`

HERE = Path(__file__).parent
# Two blocks: every layout's collectives run per block, so the suite's time goes with the depth.
# Layouts of 4 pipeline stages (2 ranks x 2 virtual stages) take 4 blocks (FOUR_BLOCKS).
LAYERS = 2
MODEL = ["--parallel.dp_shard=1", "--parallel.pp=1", "--model.dim=64", f"--model.n_layers={LAYERS}", "--model.n_heads=8",
         "--model.n_kv_heads=4", "--model.ffn_dim=128", "--model.vocab_size=300"]
FOUR_BLOCKS = "--model.n_layers=4"
TRAIN = ["--train.seq_len=32", "--train.global_batch=8", "--train.micro_batch=2", "--train.lr=1e-3",
         "--train.warmup_steps=0"]

# A model of 59M parameters (235 MB in fp32) for the cases named big_*: under dp_shard=4 a rank
# must never hold it whole, not even while initializing it.
BIG = ["--model.dim=512", "--model.n_layers=16", "--model.ffn_dim=1536", "--model.vocab_size=8192"]

# FP8 (torchao, emulated on CPU) on top of bf16; a case's micro-batches hold the reference's
# sequences, since a tensorwise scale is the amax of a whole micro-batch's activations.
FP8 = ["--train.dtype=bfloat16", "--train.fp8=tensorwise"]
FP8_ROWWISE = ["--train.dtype=bfloat16", "--train.fp8=rowwise"]
LAYOUTS = {  # world size -> {case: layout overrides}
    2: {
        "dp_shard2": ["--parallel.dp_shard=2"],
        "dp_replicate2": ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"],
        "dp_shard2_bf16": ["--parallel.dp_shard=2", "--train.dtype=bfloat16"],
        "dp_shard2_zero1": ["--parallel.dp_shard=2", "--parallel.zero=1"],
        "tp2": ["--parallel.tp=2", "--parallel.dp_shard=1"],
        "tp2_no_sp": ["--parallel.tp=2", "--parallel.dp_shard=1", "--parallel.sequence_parallel=false"],
        "tp2_bf16_selective": ["--parallel.tp=2", "--parallel.dp_shard=1", "--train.dtype=bfloat16",
                               "--train.recompute=selective"],
        "cp2_p2p": ["--parallel.dp_shard=1", "--parallel.cp=2"],
        "cp2_p2p_contiguous": ["--parallel.dp_shard=1", "--parallel.cp=2", "--parallel.cp_load_balance=false"],
        "cp2_allgather": ["--parallel.dp_shard=1", "--parallel.cp=2", "--parallel.cp_comm=allgather"],
        "cp2_a2a": ["--parallel.dp_shard=1", "--parallel.cp=2", "--parallel.cp_comm=a2a"],
        "cp2_p2p_packed": ["--parallel.dp_shard=1", "--parallel.cp=2", "--data.pack_documents=true"],
        "cp2_allgather_bf16_packed": ["--parallel.dp_shard=1", "--parallel.cp=2", "--parallel.cp_comm=allgather",
                                      "--train.dtype=bfloat16", "--data.pack_documents=true"],
        "pp2_gpipe": ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=gpipe"],
        "pp2_1f1b": ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=1f1b"],
        "pp2_interleaved": ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_virtual_stages=2", FOUR_BLOCKS,
                            "--parallel.pp_schedule=interleaved-1f1b"],
        "pp2_zero_bubble": ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_virtual_stages=2", FOUR_BLOCKS,
                            "--parallel.pp_schedule=zero-bubble"],
        "dp_shard2_fp8": ["--parallel.dp_shard=2", *FP8],
        "tp2_fp8": ["--parallel.tp=2", "--parallel.dp_shard=1", *FP8],
        "cp2_fp8": ["--parallel.dp_shard=1", "--parallel.cp=2", *FP8],
        "pp2_fp8_rowwise": ["--parallel.pp=2", "--parallel.dp_shard=1", *FP8_ROWWISE],
        "dp_shard2_fp8_rowwise": ["--parallel.dp_shard=2", *FP8_ROWWISE],
    },
    4: {
        "big_dp_shard4": ["--parallel.dp_shard=4", *BIG],  # first: its RSS is measured
        "cp4_p2p": ["--parallel.dp_shard=1", "--parallel.cp=4"],
        "cp4_allgather": ["--parallel.dp_shard=1", "--parallel.cp=4", "--parallel.cp_comm=allgather"],
        "cp4_a2a": ["--parallel.dp_shard=1", "--parallel.cp=4", "--parallel.cp_comm=a2a"],
        "cp4_p2p_packed": ["--parallel.dp_shard=1", "--parallel.cp=4", "--data.pack_documents=true"],
        "cp4_a2a_packed": ["--parallel.dp_shard=1", "--parallel.cp=4", "--parallel.cp_comm=a2a",
                           "--data.pack_documents=true"],
        "cp2_tp2": ["--parallel.dp_shard=1", "--parallel.cp=2", "--parallel.tp=2"],
        "cp2_pp2": ["--parallel.dp_shard=1", "--parallel.cp=2", "--parallel.pp=2"],
        "cp2_dp_shard2": ["--parallel.dp_shard=2", "--parallel.cp=2"],
        "cp2_dp_replicate2": ["--parallel.dp_replicate=2", "--parallel.dp_shard=1", "--parallel.cp=2"],
        "cp2_tp2_bf16_selective_packed": ["--parallel.dp_shard=1", "--parallel.cp=2", "--parallel.tp=2",
                                          "--train.dtype=bfloat16", "--train.recompute=selective",
                                          "--data.pack_documents=true"],
        "cp2_pp2_interleaved_packed": ["--parallel.dp_shard=1", "--parallel.cp=2", "--parallel.pp=2",
                                       "--parallel.pp_virtual_stages=2", FOUR_BLOCKS, "--parallel.pp_schedule=interleaved-1f1b",
                                       "--data.pack_documents=true"],
        "cp2_pp2_full_recompute_packed": ["--parallel.dp_shard=1", "--parallel.cp=2", "--parallel.pp=2",
                                          "--train.recompute=full", "--data.pack_documents=true"],
        "dp_replicate2_dp_shard2": ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"],
        "dp_shard4": ["--parallel.dp_shard=4", "--train.micro_batch=1"],
        "dp_shard2_tp2": ["--parallel.dp_shard=2", "--parallel.tp=2"],
        "dp_shard2_tp2_zero1": ["--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.zero=1"],
        "dp_shard2_pp2_zero1": ["--parallel.dp_shard=2", "--parallel.pp=2", "--parallel.zero=1"],
        "cp2_dp_shard2_zero1": ["--parallel.dp_shard=2", "--parallel.cp=2", "--parallel.zero=1"],
        "dp_shard2_tp2_full_recompute": ["--parallel.dp_shard=2", "--parallel.tp=2", "--train.recompute=full"],
        "tp4": ["--parallel.dp_shard=1", "--parallel.tp=4"],
        "dp_shard2_pp2_full_recompute": ["--parallel.dp_shard=2", "--parallel.pp=2", "--train.recompute=full"],
        "tp2_pp2": ["--parallel.dp_shard=1", "--parallel.tp=2", "--parallel.pp=2"],
        "tp2_pp2_bf16_selective": ["--parallel.dp_shard=1", "--parallel.tp=2", "--parallel.pp=2",
                                   "--train.dtype=bfloat16", "--train.recompute=selective"],
        "dp_shard2_tp2_fp8_full_recompute": ["--parallel.dp_shard=2", "--parallel.tp=2", "--train.recompute=full", *FP8],
        "cp2_tp2_fp8": ["--parallel.dp_shard=1", "--parallel.cp=2", "--parallel.tp=2", *FP8],
    },
    8: {
        "dp_shard2_tp2_pp2": ["--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.pp=2"],
        "cp2_tp2_pp2": ["--parallel.dp_shard=1", "--parallel.cp=2", "--parallel.tp=2", "--parallel.pp=2"],
        "cp2_tp2_pp2_packed": ["--parallel.dp_shard=1", "--parallel.cp=2", "--parallel.tp=2", "--parallel.pp=2",
                               "--data.pack_documents=true"],
    },
}


# The other families (tiny-gpt3: learned positions, LayerNorm and biases, GeLU, tied embeddings;
# tiny-nemotron: layernorm1p, squared-ReLU, half-rotary RoPE; tiny-bert: bidirectional post-norm
# encoder with token types, masked-LM head and its bias) at the test shape, through the same layouts.
FAMILIES = {"gpt3": "tiny-gpt3", "nemotron": "tiny-nemotron", "bert": "tiny-bert"}
FAMILY_LAYOUTS = {
    2: {"dp_shard2": ["--parallel.dp_shard=2"], "tp2": ["--parallel.tp=2", "--parallel.dp_shard=1"],
        "pp2_1f1b": ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=1f1b"],
        "cp2_p2p": ["--parallel.dp_shard=1", "--parallel.cp=2"]},
    8: {"dp_shard2_tp2_pp2": ["--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.pp=2"]},
}
for _world, _cases in FAMILY_LAYOUTS.items():
    for _family, _name in FAMILIES.items():
        for _case, _extra in _cases.items():
            LAYOUTS[_world][f"{_family}_{_case}"] = [f"--model.name={_name}", *_extra]
LAYOUTS[2].update({
    "nemotron_cp2_p2p_packed": ["--model.name=tiny-nemotron", "--parallel.dp_shard=1", "--parallel.cp=2",
                                "--data.pack_documents=true"],
    # Where a family's parts meet a layout's special cases: replicated position tables without
    # sequence parallelism, the tied copy under a split backward, bidirectional Ulysses, bf16
    # LayerNorms gathered by FSDP.
    "gpt3_tp2_no_sp": ["--model.name=tiny-gpt3", "--parallel.tp=2", "--parallel.dp_shard=1",
                       "--parallel.sequence_parallel=false"],
    "gpt3_pp2_zero_bubble": ["--model.name=tiny-gpt3", "--parallel.pp=2", "--parallel.dp_shard=1",
                             "--parallel.pp_virtual_stages=2", FOUR_BLOCKS, "--parallel.pp_schedule=zero-bubble"],
    "bert_cp2_a2a": ["--model.name=tiny-bert", "--parallel.dp_shard=1", "--parallel.cp=2", "--parallel.cp_comm=a2a"],
    "bert_dp_shard2_bf16": ["--model.name=tiny-bert", "--parallel.dp_shard=2", "--train.dtype=bfloat16"],
})


# Mixture of experts (tiny-moe: 8 experts, top-2, aux loss 0.01) under every axis, expert
# parallelism (ep, borrowed from dp_shard x cp) among them; with a capacity factor the same tokens
# are dropped as in one process, also where the micro-batch's tokens are spread over cp and tp.
# Every case keeps 2 sequences per micro-batch: the aux loss is a statistic of a micro-batch.
MOE_LAYOUTS = {
    2: {"dp_shard2": ["--parallel.dp_shard=2"],
        "pp2_1f1b": ["--parallel.pp=2", "--parallel.dp_shard=1"],
        "dp_shard2_capacity": ["--parallel.dp_shard=2", "--moe.capacity_factor=1.0"],
        "dp_shard2_ep2": ["--parallel.dp_shard=2", "--parallel.ep=2"],
        "dp_shard2_ep2_capacity_full_recompute": ["--parallel.dp_shard=2", "--parallel.ep=2",
                                                  "--moe.capacity_factor=1.0", "--train.recompute=full"],
        "tp2": ["--parallel.tp=2", "--parallel.dp_shard=1"],
        "tp2_no_sp": ["--parallel.tp=2", "--parallel.dp_shard=1", "--parallel.sequence_parallel=false"],
        "cp2_ep2": ["--parallel.cp=2", "--parallel.dp_shard=1", "--parallel.ep=2", "--moe.z_loss_coeff=0.001"],
        "cp2_ep2_packed": ["--parallel.cp=2", "--parallel.dp_shard=1", "--parallel.ep=2",
                           "--data.pack_documents=true"],
        "cp2_capacity": ["--parallel.cp=2", "--parallel.dp_shard=1", "--moe.capacity_factor=1.0"],
        # bf16: see check_moe_bf16.
        "dp_shard2_bf16": ["--parallel.dp_shard=2", "--train.dtype=bfloat16"],
        "dp_shard2_ep2_bf16": ["--parallel.dp_shard=2", "--parallel.ep=2", "--train.dtype=bfloat16"]},
    4: {"dp_shard4_ep4": ["--parallel.dp_shard=4", "--parallel.ep=4"],
        "dp_shard4_ep2": ["--parallel.dp_shard=4", "--parallel.ep=2"],
        "dp_shard2_tp2_ep2_selective": ["--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.ep=2",
                                        "--train.recompute=selective"],
        "dp_shard2_pp2_ep2": ["--parallel.dp_shard=2", "--parallel.pp=2", "--parallel.ep=2"],
        "cp2_dp_shard2_ep4_packed": ["--parallel.cp=2", "--parallel.dp_shard=2", "--parallel.ep=4",
                                     "--data.pack_documents=true"],
        "cp2_tp2_ep2_capacity": ["--parallel.cp=2", "--parallel.tp=2", "--parallel.dp_shard=1", "--parallel.ep=2",
                                 "--moe.capacity_factor=1.0"],
        "dp_replicate2_dp_shard2_ep2": ["--parallel.dp_replicate=2", "--parallel.dp_shard=2", "--parallel.ep=2"],
        # The aux losses dominate the router's gradient here, so that it checks their value as
        # computed from shares spread over cp x tp (measured: 99% of its norm at coefficient 1.0,
        # 11% at the default 0.01).
        "cp2_tp2_ep2_strong_aux": ["--parallel.cp=2", "--parallel.tp=2", "--parallel.dp_shard=1", "--parallel.ep=2",
                                   "--moe.aux_loss_coeff=1.0", "--moe.z_loss_coeff=0.1"]},
}
for _world, _cases in MOE_LAYOUTS.items():
    for _case, _extra in _cases.items():
        LAYOUTS[_world][f"moe_{_case}"] = ["--model.name=tiny-moe", *_extra]


# Packed fine-tuning examples (data.format='sft'): the loss is the mean over the global batch's
# answer tokens, which micro-batches and ranks hold unevenly; dp_shard4 also cuts the batch into
# micro-batches of 1 instead of the reference's 2, which that mean does not see.
SFT = ["--data.format=sft", "--data.path=SFT_DATA"]
LAYOUTS[2].update({
    "sft_dp_shard2": ["--parallel.dp_shard=2", *SFT],
    "sft_tp2": ["--parallel.tp=2", "--parallel.dp_shard=1", *SFT],
    "sft_pp2_1f1b": ["--parallel.pp=2", "--parallel.dp_shard=1", *SFT],
    "sft_cp2_p2p": ["--parallel.cp=2", "--parallel.dp_shard=1", *SFT],
})
LAYOUTS[4]["sft_dp_shard4"] = ["--parallel.dp_shard=4", "--train.micro_batch=1", *SFT]
LAYOUTS[8]["sft_dp_shard2_tp2_pp2"] = ["--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.pp=2", *SFT]

# LoRA (rank 4 on every projection, the base frozen) on the same packed examples. B starts at
# zero, so A's gradient after step 1 is zero: the adapters' gradients are also compared after
# the last step (parity.py's grads_after), when B has moved.
LORA = [*SFT, "--lora.rank=4", "--lora.alpha=8"]
LAYOUTS[2].update({
    "lora_dp_shard2": ["--parallel.dp_shard=2", *LORA],
    "lora_tp2": ["--parallel.tp=2", "--parallel.dp_shard=1", *LORA],
    "lora_pp2_1f1b": ["--parallel.pp=2", "--parallel.dp_shard=1", *LORA],
    "lora_cp2_p2p": ["--parallel.cp=2", "--parallel.dp_shard=1", *LORA],
})
LAYOUTS[4]["lora_dp_shard2_tp2_bf16_full_recompute"] = ["--parallel.dp_shard=2", "--parallel.tp=2", "--train.dtype=bfloat16",
                                                        "--train.recompute=full", "--lora.base_dtype=bfloat16", *LORA]
LAYOUTS[8]["lora_dp_shard2_tp2_pp2"] = ["--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.pp=2", *LORA]


def with_data(extra: list[str], sft_dataset) -> list[str]:
    return [a.replace("SFT_DATA", str(sft_dataset)) for a in extra]


def common(dataset, tmp):
    return MODEL + TRAIN + [f"--data.path={dataset}", f"--metrics.jsonl={tmp}/m.jsonl", "--metrics.plot="]


# Cases a check needs besides the one it reports on: bf16 expert parallelism is held to the same
# layout without it (check_moe_bf16), and the FSDP collectives test reads these.
COMPANIONS = {"moe_dp_shard2_ep2_bf16": ["moe_dp_shard2_bf16"]}
ZERO_CASES = {2: ["dp_shard2", "dp_shard2_zero1"],
              4: ["cp2_dp_shard2", "cp2_dp_shard2_zero1", "dp_shard2_pp2_full_recompute", "dp_shard2_pp2_zero1"]}
CASES = [(world, name) for world in sorted(LAYOUTS) for name in LAYOUTS[world]]


def needed_cases(items) -> dict[int, list[str]]:
    """The layout cases the selected tests of this module need, by world size (so that `-k` on
    one case launches that case, not its world's 40)."""
    wanted: dict[int, set[str]] = {}
    for item in items:
        if item.module.__name__ != __name__:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "case" in params:
            world, name = params["case"]
            wanted.setdefault(world, set()).update([name, *COMPANIONS.get(name, [])])
        if item.originalname == "test_fsdp_collectives_follow_parallel_zero":
            for world, names in ZERO_CASES.items():
                wanted.setdefault(world, set()).update(names)
    return {world: launch_order(world, [n for n in LAYOUTS[world] if n in names]) for world, names in wanted.items()}


def launch_order(world: int, names: list[str]) -> list[str]:
    """Cases of the same degrees one after another (they share one Layout: parity.Layouts, and
    DTensor's sharding decisions are cached per mesh); a big_* case first, as its resident-set
    growth is measured."""
    from loom.config import load_config
    from loom.parallel.dims import ParallelDims

    def degrees(name: str) -> tuple:
        cfg = load_config(None, MODEL + LAYOUTS[world][name])
        return tuple(ParallelDims.from_section(cfg.parallel, world).degrees().values())

    return sorted(names, key=lambda name: (not name.startswith("big"), degrees(name)))


@pytest.fixture(scope="module")
def needed(request) -> dict[int, list[str]]:
    return needed_cases(request.session.items)


@pytest.fixture(scope="module")
def reference(dataset, sft_dataset, tmp_path_factory, needed):
    """The single-process runs the needed cases compare with, one per reference key."""
    sys.path.insert(0, str(HERE))
    from parity import run_case

    tmp = tmp_path_factory.mktemp("ref")
    steps = {reference_key(LAYOUTS[world][name]): case_steps(name) for world, names in needed.items() for name in names}
    refs = {}
    for key in sorted(steps):
        r = run_case(common(dataset, tmp) + with_data(list(key), sft_dataset), steps=steps[key])
        r.pop("trainer")
        refs[key] = r
    return refs


@pytest.fixture(scope="module")
def launched(dataset, sft_dataset, tmp_path_factory, needed):
    """results(world) -> {case: what parity.py recorded}: one torchrun launch per world size,
    shared by that world's cases, on first use."""
    cache: dict[int, dict] = {}

    def results(world: int) -> dict:
        if world not in cache:
            tmp = tmp_path_factory.mktemp(f"world{world}")
            cases = [f"{name}=" + ",".join(common(dataset, tmp) + with_data(LAYOUTS[world][name], sft_dataset))
                     for name in needed[world]]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            r = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                 str(HERE / "parity.py"), str(tmp / "result.pt"), *cases],
                capture_output=True, text=True, env=env, timeout=900, cwd=tmp,
            )
            assert r.returncode == 0, r.stderr[-4000:]
            cache[world] = torch.load(tmp / "result.pt", weights_only=True)
        return cache[world]

    return results


# The settings a case's single-process reference shares with it: the model, the dtype, packing
# and the MoE settings (the layout's own keys, and micro-batching, are what the case varies).
REFERENCE_KEYS = ("--model.", "--train.dtype", "--train.fp8", "--data.pack_documents", "--data.format", "--data.path",
                  "--moe.", "--lora.")


def reference_key(extra: list[str]) -> tuple[str, ...]:
    return tuple(a for a in extra if a.startswith(REFERENCE_KEYS))


@pytest.mark.parametrize("case", CASES, ids=[f"{name}-{world}ranks" for world, name in CASES])
def test_layout_matches_single_process(case, launched, reference):
    """Same seed, same data: every step's loss and the gradients after step 1 (and, for LoRA,
    after the last step) match one process within relative 1e-5 in fp32 and 1e-2 in bf16; the
    weights start bit for bit alike, initialized without a whole parameter on any rank."""
    world, name = case
    results = launched(world)
    got = results[name]
    assert "error" not in got, got.get("error")
    fp8 = "fp8" in name
    bf16 = "bf16" in name or fp8
    ref = reference[reference_key(LAYOUTS[world][name])]
    rel = 1e-2 if bf16 else 1e-5
    assert len(got["losses"]) == len(ref["losses"]) == case_steps(name)
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        assert a == pytest.approx(b, rel=rel), (name, step, got["losses"], ref["losses"])
    check_initialization(name, got, ref)
    assert got["grads"].keys() == ref["grads"].keys()
    if bf16 and name.startswith("moe"):
        check_moe_bf16(name, got["grads"], ref["grads"], results)
    elif fp8:
        check_fp8(name, got["grads"], ref["grads"])
        if name.startswith("cp2"):
            check_whole_sequence_scales(got["fp8_scales"], ref["fp8_scales"])
    else:
        check_grads(name, got, ref, rel, bf16)


def check_initialization(name: str, got: dict, ref: dict) -> None:
    """Every layout starts from the single-process weights, bit for bit, and initializing them
    held no more than this rank's shards plus one generated block."""
    assert got["init"]["crc32"] == ref["init"]["crc32"], name
    init = got["init"]
    assert init["peak_bytes"] <= init["shard_bytes"] + init["block_bytes"], (name, init)
    if name.startswith("big"):  # and the process did not grow by anything like the whole model
        whole = 4 * sum(g.numel() for g in ref["grads"].values())
        assert init["shard_bytes"] < whole / 3 and init["rss_growth_bytes"] < whole / 2, (name, init)


def check_grads(name: str, got: dict, ref: dict, rel: float, bf16: bool) -> None:
    """Tensor by tensor after step 1, and (LoRA) after the last step."""
    for grads in ("grads", "grads_after"):
        assert got[grads].keys() == ref[grads].keys(), name
        if not ref[grads]:  # grads_after: LoRA cases only
            continue
        if grads == "grads_after" and bf16:
            # After AdamW steps on bf16 gradients (measured: 1.1e-2 on one tensor, 3e-3 whole).
            assert relative_error(got[grads], ref[grads]) < rel, (name, relative_error(got[grads], ref[grads]))
            continue
        floor = 1e-4 * max((g.abs().max().item() for g in ref[grads].values()), default=0)
        for pname, g in got[grads].items():
            assert_rel_close(g, ref[grads][pname], rel, floor), (name, grads, pname)
    if name.startswith("lora"):  # only adapters train, and after the first step all of them
        assert got["grads"] and all(p.endswith((".lora_a", ".lora_b")) for p in got["grads"]), name
        assert all(g.abs().max() > 0 for g in got["grads_after"].values()), name


def check_moe_bf16(name: str, grads: dict, ref: dict, results: dict) -> None:
    """A router's top-k is discontinuous: in bf16, the rounding a layout changes (FSDP gathers the
    norms' weights in bf16, which autocast leaves in fp32 in one process) flips a near-tied
    choice of a few tokens, moving their whole contribution from one expert to another (measured:
    4-7% of one layer's expert gradients, 0.34% of the whole gradient). So against one process
    the whole gradient is held to 1e-2 (relative 2-norm), and expert parallelism, which changes
    no rounding, to the same layout without it, tensor by tensor."""
    assert relative_error(grads, ref) < 1e-2, (name, relative_error(grads, ref))
    if "_ep" in name:
        same_rounding = results[name.replace("_ep2", "")]["grads"]
        for pname, g in grads.items():
            assert_rel_close(g, same_rounding[pname], 1e-2, 1e-4 * max(t.abs().max().item() for t in ref.values()))


def relative_error(grads: dict, ref: dict) -> float:
    """|got - want| / |want| in 2-norm over all of the tensors."""
    err = sum(((g.double() - ref[p].double()) ** 2).sum() for p, g in grads.items())
    return (err / sum((g.double() ** 2).sum() for g in ref.values())).sqrt().item()


def check_fp8(name: str, grads: dict, ref: dict) -> None:
    """FP8 rounds to 3 significant bits: a bf16 input one rounding apart (what tensor and context
    parallelism change: partial sums rounded before their reduction, attention merged by its
    log-sum-exp) flips an element's float8 rounding by 1/16, and the gradients move far more than
    in bf16. Measured in one process, PyTorch's bf16 kernels instead of loom's move bf16
    gradients by 1.5e-3 and FP8 tensorwise ones by 1.8e-2 (relative 2-norm); the layouts here
    by 0.2-2.8e-2. So against one process: the whole gradient within 5e-2, each tensor within
    0.15. FSDP alone changes no rounding, and its float8 weights are cast with the whole
    parameter's scale before the gather: there the rule is bf16's, tensor by tensor (measured
    1.4e-3; per-shard scales would move it by about 2e-2)."""
    if name == "dp_shard2_fp8":
        floor = 1e-4 * max(g.abs().max().item() for g in ref.values())
        for pname, g in grads.items():
            assert_rel_close(g, ref[pname], 1e-2, floor), (name, pname)
        return
    assert relative_error(grads, ref) < 5e-2, (name, relative_error(grads, ref))
    for pname, g in grads.items():
        assert relative_error({pname: g}, {pname: ref[pname]}) < 0.15, (name, pname)


def check_whole_sequence_scales(scales: dict, ref: dict) -> None:
    """Under cp each rank holds half of a sequence (and under tp a hidden shard of some inputs),
    yet each FP8 linear's input is cast with the scale of the whole tensor's amax, as in one
    process: the first block's q, k, v input is the same tensor in both (the same bits), later
    inputs differ by bf16 rounding (measured: at most 0.7% apart; with each rank's own amax
    instead, the first block's scale was 12% off)."""
    assert scales.keys() == ref.keys() and len(scales) == 7 * LAYERS, scales
    for proj in ("wq", "wk", "wv"):
        assert scales[f"layers.0.attention.{proj}"] == ref[f"layers.0.attention.{proj}"]
    for name, scale in scales.items():
        assert scale == pytest.approx(ref[name], rel=0.02), (name, scale, ref[name])


def test_fsdp_collectives_follow_parallel_zero(launched):
    """parallel.zero's communication pattern, counted on rank 0 over one step of 2 micro-batches
    with LAYERS + 2 FSDP units (embedding, the blocks, norm + output): zero=3 gathers every unit for each
    forward and again for its backward, except the last unit (kept gathered) and the embedding
    (whose backward reads no weight), and reduce-scatters every unit after every micro-batch;
    zero=1 gathers and reduce-scatters each unit once per step."""
    units, micro = LAYERS + 2, 2
    zero3 = {"all_gather_single": micro * (2 * units - 2), "reduce_scatter_single": micro * units}
    zero1 = {"all_gather_single": units, "reduce_scatter_single": units}
    for world, zero3_case in ((2, "dp_shard2"), (4, "cp2_dp_shard2")):
        results = launched(world)
        assert results[zero3_case]["collectives"] == zero3, (zero3_case, results[zero3_case]["collectives"])
        assert results[f"{zero3_case}_zero1"]["collectives"] == zero1, results[f"{zero3_case}_zero1"]["collectives"]
    # A pipeline stage (rank 0: embedding + half the blocks) keeps its units gathered through the step in
    # both modes; zero=3 still reduce-scatters after each micro-batch, zero=1 once.
    results, stage_units = launched(4), LAYERS // 2 + 1
    assert results["dp_shard2_pp2_full_recompute"]["collectives"] == {
        "all_gather_single": stage_units, "reduce_scatter_single": micro * stage_units}
    assert results["dp_shard2_pp2_zero1"]["collectives"] == {
        "all_gather_single": stage_units, "reduce_scatter_single": stage_units}


def test_nproc_launches_torchrun_and_rank0_reports(dataset, tmp_path):
    """`loom train --nproc 2` with cp=2 and packed documents, validating every step: rank 0 writes
    the metrics once, and the validation losses equal the single-process run's."""
    import json

    args = MODEL + TRAIN + [f"--data.path={dataset}", "--train.steps=3", "--metrics.log_every=1",
                            "--train.eval_every=1", "--train.eval_batches=2", "--data.pack_documents=true"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    rows = {}
    for name, extra in (("single", []), ("cp2", ["--nproc", "2", "--parallel.cp=2"])):
        jsonl = tmp_path / f"{name}.jsonl"
        r = subprocess.run([sys.executable, "-m", "loom", "train", "--quiet", *extra, *args,
                            f"--metrics.jsonl={jsonl}", f"--metrics.plot={tmp_path}/{name}.png"],
                           capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-4000:]
        rows[name] = [json.loads(line) for line in open(jsonl)]
        stdout = r.stdout
    cp_rows = rows["cp2"]
    assert [row["step"] for row in cp_rows] == [1, 2, 3]  # written once, by rank 0
    assert cp_rows[0]["layout"] == {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 2, "tp": 1, "ep": 1, "world_size": 2}
    assert cp_rows[0]["tokens_per_s_per_device"] == pytest.approx(cp_rows[0]["tokens_per_s"] / 2)
    assert stdout.count("tokens/s per device") == 1 and "cp=2" in stdout
    for a, b in zip(cp_rows, rows["single"]):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_stage_split_is_balanced_not_refused():
    from loom.parallel.pipeline import local_stage_ids, stage_layers

    assert stage_layers(4, 2) == [[0, 1], [2, 3]]
    assert stage_layers(5, 2) == [[0, 1, 2], [3, 4]]  # uneven: the output layer's stage gets fewer
    assert stage_layers(7, 4) == [[0, 1], [2, 3], [4, 5], [6]]
    assert local_stage_ids(1, 2, 3) == [1, 3, 5]
