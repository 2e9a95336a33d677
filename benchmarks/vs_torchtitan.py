"""loom vs torchtitan 0.3.0: training tokens/s on the same shape and layouts, on this machine.

The shape of issue 20 (and of ../shared/peers/torchtitan): Llama, 4 layers, dim 256, 8 heads,
8 KV heads, FFN 1024, vocabulary 32000, seq 1024, AdamW at a constant lr 3e-4, no clipping,
micro-batch 1, global batch 4 sequences. A single process runs 2 threads; each rank of a layout 1.
torchtitan runs through the shared runner in its own environment (set up as its README says);
without it this script says so and measures loom alone.

Precision (--dtype): torchtitan 0.3.0 always applies FSDP (of degree 1 where there is no data
parallelism), and its FSDP casts parameters to `training.mixed_precision_param`, bfloat16 by
default, whatever `training.dtype` says: the shared runner's "fp32" config computes in bf16. So
each side's precision is set explicitly: fp32 = loom `train.dtype=float32` against torchtitan
`mixed_precision_param=float32`; bf16 = loom `train.dtype=bfloat16` (autocast, bf16 FSDP
gathers, fp32 master weights) against torchtitan `mixed_precision_param=bfloat16` (bf16 FSDP
gathers, fp32 master weights).

Runs alternate (torchtitan, loom, next layout, ...) and repeat for --rounds, because this
machine's speed drifts. Tokens/s = 4096 tokens / the mean step time of steps 3..N: loom's from
its metrics JSONL (`step_time_s`), torchtitan's from its per-rank `tps` log field (its tokens/s
per device: global = tps x world size, so a step took 4096 / (tps x world)).

    python benchmarks/vs_torchtitan.py [--rounds 2] [--steps 20] [--dtype fp32|bf16|both]
        [--layouts 1,dp2,tp2,pp2,dp2tp2pp2] [--vocab-128k] [--titan-python /tmp/titan/bin/python]
        [--assets /tmp/titan-assets] [--write benchmarks/results/vs_torchtitan.md]

--vocab-128k adds a 1-process row at the Llama 3 vocabulary (128256). The shared runner's config
fixes torchtitan's vocabulary at 32000, so torchtitan runs through benchmarks/titan_vocab, the
same config at the vocabulary of the asset folder.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE.parent.parent / "shared" / "peers" / "torchtitan"
GLOBAL_TOKENS = 4 * 1024
SHAPE = {"LAYERS": 4, "HIDDEN": 256, "HEADS": 8, "KV_HEADS": 8, "INTER": 1024, "SEQ": 1024}

# name -> (world size, loom's parallel settings, torchtitan's (dp_shard, tp, pp))
LAYOUTS = {
    "1": (1, [], (1, 1, 1)),
    "dp2": (2, ["--parallel.dp_shard=2"], (2, 1, 1)),
    "tp2": (2, ["--parallel.dp_shard=1", "--parallel.tp=2"], (1, 2, 1)),
    "pp2": (2, ["--parallel.dp_shard=1", "--parallel.pp=2", "--parallel.pp_schedule=1f1b"], (1, 1, 2)),
    "dp2tp2pp2": (8, ["--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.pp=2", "--parallel.pp_schedule=1f1b"],
                  (2, 2, 2)),
}
# loom's train.dtype and torchtitan's training.mixed_precision_param for each --dtype
PRECISIONS = {"fp32": ("float32", "float32"), "bf16": ("bfloat16", "bfloat16")}
LABELS = {"1": "1 process", "dp2": "dp_shard=2", "tp2": "tp=2", "pp2": "pp=2 (1F1B, 4 micro-batches)",
          "dp2tp2pp2": "dp_shard=2 x tp=2 x pp=2"}


def titan_ready(python: str) -> str | None:
    """None if torchtitan runs under `python`, else why not."""
    if not Path(python).exists():
        return f"{python} does not exist"
    r = subprocess.run([python, "-c", "import torchtitan"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"torchtitan does not import under {python}: {r.stderr.strip()[-200:]}"


def ensure_assets(python: str, assets: Path, vocab: int) -> None:
    """torchtitan's synthetic corpus, tokenizer and model config for the shape (make_assets.py)."""
    stamp = assets / "stamp.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("V") == vocab:
        return
    env = {**os.environ, **{k: str(v) for k, v in SHAPE.items()}, "VOCAB": str(vocab)}
    subprocess.run([python, str(PEERS / "make_assets.py"), str(assets)], check=True, env=env, cwd=PEERS)


def loom_dataset(assets: Path, work: Path) -> Path:
    """The same corpus prepared for loom. The word-level tokenizer has no end-of-document token,
    which `loom prepare` needs: its [UNK] (never produced from this corpus) is renamed </s>, so
    the vocabulary and every other id stay as they are."""
    out = work / f"loom_data_{assets.name}"
    if (out / "meta.json").exists():
        return out
    tok = json.loads((assets / "model" / "tokenizer.json").read_text())
    for added in tok["added_tokens"]:
        if added["content"] == "[UNK]":
            added["content"] = "</s>"
    vocab = tok["model"]["vocab"]
    vocab["</s>"] = vocab.pop("[UNK]")
    tok["model"]["unk_token"] = "</s>"
    tok_path = work / f"tokenizer_{assets.name}.json"
    tok_path.write_text(json.dumps(tok))
    subprocess.run([sys.executable, "-m", "loom", "prepare", "--input", str(assets / "data" / "train.jsonl"),
                    "--tokenizer", str(tok_path), "--output", str(out), "--quiet"], check=True)
    return out


def run_loom(layout: str, data: Path, vocab: int, steps: int, work: Path, dtype: str) -> float:
    world, parallel, _ = LAYOUTS[layout]
    jsonl = work / f"loom_{layout}.jsonl"
    args = [sys.executable, "-m", "loom", "train", "--quiet", *(["--nproc", str(world)] if world > 1 else []),
            "--model.name=tiny", f"--model.dim={SHAPE['HIDDEN']}", f"--model.n_layers={SHAPE['LAYERS']}",
            f"--model.n_heads={SHAPE['HEADS']}", f"--model.n_kv_heads={SHAPE['KV_HEADS']}",
            f"--model.ffn_dim={SHAPE['INTER']}", f"--model.vocab_size={vocab}", f"--data.path={data}",
            f"--train.seq_len={SHAPE['SEQ']}", "--train.global_batch=4", "--train.micro_batch=1",
            f"--train.steps={steps}", "--train.lr=3e-4", "--train.min_lr=3e-4", "--train.warmup_steps=0",
            "--train.grad_clip=0", "--train.eval_every=0", "--train.eval_batches=1", "--metrics.log_every=1",
            f"--metrics.jsonl={jsonl}", "--metrics.plot=", f"--train.dtype={PRECISIONS[dtype][0]}",
            "--parallel.dp_shard=1", "--parallel.pp=1", *parallel]
    r = subprocess.run(args, capture_output=True, text=True, cwd=work)
    if r.returncode:
        raise RuntimeError(f"loom {layout} failed: {r.stderr[-2000:]}")
    times = [json.loads(line)["step_time_s"] for line in jsonl.read_text().splitlines()]
    return GLOBAL_TOKENS / statistics.mean(times[2:])


def run_titan(python: str, layout: str, assets: Path, steps: int, work: Path, dtype: str) -> float:
    world, _, (dp, tp, pp) = LAYOUTS[layout]
    local_batch = GLOBAL_TOKENS // SHAPE["SEQ"] // dp if pp > 1 else 1
    torchrun = str(Path(python).parent / "torchrun")
    env = {**os.environ, "PEERS_ASSET": str(assets), "PYTHONPATH": f"{PEERS}{os.pathsep}{HERE}", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "2" if world == 1 else "1"}
    args = [torchrun, "--nproc_per_node", str(world), "--master_addr", "127.0.0.1", "--master_port", "29555",
            str(PEERS / "titan_cpu_train.py"), "--module", "titan_vocab", "--config", "llama3_peers_vocab",
            "--training.mixed_precision_param", PRECISIONS[dtype][1],
            "--training.steps", str(steps), "--training.local_batch_size", str(local_batch),
            "--training.global_batch_size", "4", "--parallelism.data_parallel_shard_degree", str(dp),
            "--parallelism.tensor_parallel_degree", str(tp), "--parallelism.pipeline_parallel_degree", str(pp),
            "--parallelism.pipeline_parallel_microbatch_size", "1", "--parallelism.pipeline_parallel_schedule",
            "1F1B", "--parallelism.spmd_backend", "partial_dtensor", "--dump_folder", str(work / "titan_out")]
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=work)
    if r.returncode:
        raise RuntimeError(f"torchtitan {layout} failed: {r.stderr[-2000:]}")
    # One log line per step (rank 0's): "step: N ... tps: 2,479 ..." (with colour codes).
    plain = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr)
    tps = {int(m.group(1)): float(m.group(2).replace(",", ""))
           for m in re.finditer(r"step:\s*(\d+).*?tps:\s*([\d,]+)", plain)}
    step_times = [GLOBAL_TOKENS / (tps[s] * world) for s in sorted(tps) if s >= 3]
    return GLOBAL_TOKENS / statistics.mean(step_times)


def table(rows: list[tuple[str, list[float], list[float]]], rounds: int) -> str:
    head = "| layout | " + " | ".join(f"loom r{r + 1} | torchtitan r{r + 1} | ratio r{r + 1}" for r in range(rounds)) + " |"
    lines = [head, "|---|" + "---:|" * (3 * rounds)]
    for name, loom, titan in rows:
        cells = []
        for r in range(rounds):
            ratio = f"{loom[r] / titan[r]:.2f}" if titan[r] else "-"
            cells += [f"{loom[r]:,.0f}", f"{titan[r]:,.0f}" if titan[r] else "-", ratio]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", choices=[*PRECISIONS, "both"], default="fp32")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--vocab-128k", action="store_true", help="also a 1-process row at vocabulary 128256")
    ap.add_argument("--titan-python", default="/tmp/titan/bin/python")
    ap.add_argument("--assets", default="/tmp/titan-assets")
    ap.add_argument("--write", default="", help="also write the tables (markdown) here, above its '## ' sections")
    a = ap.parse_args()
    missing = titan_ready(a.titan_python)
    if missing:
        print(f"torchtitan is not set up ({missing}); measuring loom alone. Set it up as "
              f"{PEERS / 'README.md'} says.", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="loom_vs_titan_"))
    runs = [(name, 32000, Path(a.assets)) for name in a.layouts.split(",")]
    if a.vocab_128k:
        runs.append(("1", 128256, Path(f"{a.assets}-128k")))
    data = {}
    for _, vocab, assets in runs:
        if not missing:  # its make_assets.py needs torchtitan's environment (tokenizers, transformers)
            ensure_assets(a.titan_python, assets, vocab)
        if not assets.exists():
            sys.exit(f"{assets} does not exist: it is made with torchtitan's environment ({PEERS / 'README.md'})")
        data[vocab] = loom_dataset(assets, work)
    dtypes = list(PRECISIONS) if a.dtype == "both" else [a.dtype]
    tables = [f"### {dtype}\n\n" + table(measure(a, missing, runs, data, work, dtype), a.rounds) for dtype in dtypes]
    print("\n\n".join(tables))
    if a.write:
        write_tables(Path(a.write), a, tables)


def measure(a, missing: str | None, runs: list, data: dict, work: Path, dtype: str) -> list:
    """(row label, loom's tokens/s per round, torchtitan's per round) for each run, alternating."""
    results = {(name, vocab): ([], []) for name, vocab, _ in runs}
    for _ in range(a.rounds):
        for name, vocab, assets in runs:
            titan = 0.0 if missing else run_titan(a.titan_python, name, assets, a.steps, work, dtype)
            loom = run_loom(name, data[vocab], vocab, a.steps, work, dtype)
            results[(name, vocab)][0].append(loom)
            results[(name, vocab)][1].append(titan)
            print(f"{dtype}, {LABELS[name]}, vocab {vocab}: loom {loom:,.0f}, torchtitan "
                  + (f"{titan:,.0f}" if titan else "-") + " tokens/s", flush=True)
    return [(LABELS[name] + ("" if vocab == 32000 else f", vocabulary {vocab}"), *results[(name, vocab)])
            for name, vocab, _ in runs]


def write_tables(path: Path, a, tables: list[str]) -> None:
    """The tables at the top of `path`; its own '## ' sections (findings written by hand) are kept."""
    old = path.read_text() if path.exists() else ""
    kept = old[old.index("\n## "):] if "\n## " in old else ""
    path.write_text(
        "# loom vs torchtitan 0.3.0 on this CPU (tokens/s, global)\n\n"
        f"`python benchmarks/vs_torchtitan.py --rounds {a.rounds} --steps {a.steps} --dtype {a.dtype}"
        f"{' --vocab-128k' if a.vocab_128k else ''}`; runs alternate, each round runs every layout "
        "once for each. See the script's docstring for the shape, the precisions and how tokens/s is "
        "taken.\n\n" + "\n\n".join(tables) + "\n" + kept)


if __name__ == "__main__":
    main()
