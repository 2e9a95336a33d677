"""The planner's predictions in the shape of published 4D scaling tables: rows (TP, CP, PP, micro
batch), columns GPU count; cells predicted tokens/s per GPU (predicted memory per GPU, GB), OOM
where it does not fit, '-' where the layout cannot run (degrees or batch do not divide).

    python benchmarks/plan_tables.py [--model llama3.1-8b] [--gpus h100-sxm-80gb,a100-80gb]
        [--seq-lens 8192,16384] [--tokens-per-batch 4194304] [--worlds 8,16,32,64,128,256]

The global batch is --tokens-per-batch / seq_len sequences (4M tokens by default, Llama 3's
pre-training batch); each cell takes the fastest recompute mode that fits.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loom.plan.hardware import GIB, PlanError, get_spec  # noqa: E402
from loom.plan.search import plan, resolve_model  # noqa: E402

DEGREES = (1, 2, 4)


def table(model: str, gpu: str, seq_len: int, tokens_per_batch: int, worlds: list[int]) -> str:
    cfg = resolve_model(model)
    spec = get_spec(gpu)
    global_batch = tokens_per_batch // seq_len
    cells: dict[tuple, str] = {}
    best: dict[int, tuple] = {}
    for world in worlds:
        for tp, cp, pp, mb in itertools.product(DEGREES, DEGREES, DEGREES, DEGREES):
            try:
                rows = plan(cfg, world, spec, seq_len, global_batch, "bfloat16", tp, cp, pp, mb)
            except PlanError:
                cells[(tp, cp, pp, mb), world] = "-"
                continue
            r = rows[0]
            if r.fits:
                tps = r.perf.tokens_per_s_per_device
                cells[(tp, cp, pp, mb), world] = f"{tps:,.0f} ({r.memory.total / GIB:.0f}){'' if r.layout.recompute == 'none' else ' ' + r.layout.recompute[0]}"
                if world not in best or tps > best[world][0]:
                    best[world] = (tps, (tp, cp, pp, mb), r.perf.mfu)
            else:
                cells[(tp, cp, pp, mb), world] = "OOM"
    lines = [f"### {model}, {spec.name}, sequence {seq_len:,}, global batch {global_batch} sequences "
             f"({tokens_per_batch / 2**20:.0f}M tokens), bf16",
             "", "| TP | CP | PP | MB | " + " | ".join(f"{w} GPUs" for w in worlds) + " |",
             "|---:|---:|---:|---:|" + "---:|" * len(worlds)]
    for key in itertools.product(DEGREES, DEGREES, DEGREES, DEGREES):
        row = [cells.get((key, w), "-") for w in worlds]
        if all(c == "-" for c in row):
            continue
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(row) + " |")
    lines += ["", "Best per GPU count: " + "; ".join(
        f"{w}: TP{b[1][0]} CP{b[1][1]} PP{b[1][2]} MB{b[1][3]} {b[0]:,.0f} tok/s/GPU (MFU {100 * b[2]:.0f}%)"
        for w, b in sorted(best.items())), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3.1-8b")
    parser.add_argument("--gpus", default="h100-sxm-80gb,a100-80gb")
    parser.add_argument("--seq-lens", default="8192,16384")
    parser.add_argument("--tokens-per-batch", type=int, default=4 * 2**20)
    parser.add_argument("--worlds", default="8,16,32,64,128,256")
    args = parser.parse_args()
    worlds = [int(x) for x in args.worlds.split(",")]
    print("Cells: predicted tokens/s per GPU (predicted memory per GPU, GiB; s/f: selective/full "
          "recompute needed to fit); OOM: does not fit even with full recompute; -: cannot run.\n")
    for gpu in args.gpus.split(","):
        for seq in (int(x) for x in args.seq_lens.split(",")):
            print(table(args.model, gpu, seq, args.tokens_per_batch, worlds))


if __name__ == "__main__":
    main()
