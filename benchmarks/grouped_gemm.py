"""The MoE experts' GEMMs on any device: one grouped GEMM per projection (torch._grouped_mm, as
loom.models.moe runs them) against a Python loop of one matmul per expert, forward + backward.

    python benchmarks/grouped_gemm.py                          # this CPU, fp32, a small shape
    python benchmarks/grouped_gemm.py --device cuda --dtype bfloat16 --experts 8 --dim 4096 \\
        --ffn 14336 --tokens 16384                             # Mixtral 8x7B's experts, 8K tokens x top-2

Routing is drawn at random with a skew (expert e gets a share proportional to e + 1), so the
groups are uneven as real routing is. Prints achieved TFLOP/s of each and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from loom.models.moe import GroupedExperts


def counts_for(tokens: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    """Uneven assignments per expert [E] summing to `tokens`."""
    weights = torch.arange(1, experts + 1, dtype=torch.float64)
    draw = torch.multinomial(weights / weights.sum(), tokens, replacement=True, generator=gen)
    return torch.bincount(draw, minlength=experts)


def time_mode(experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor, grouped: bool, repeats: int) -> float:
    """Median seconds of one forward + backward."""
    experts.grouped = grouped
    times = []
    for i in range(repeats + 2):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        experts(x, counts).float().square().mean().backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-ups
            times.append(time.perf_counter() - t0)
        experts.zero_grad(set_to_none=True)
        x.grad = None
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=384)
    ap.add_argument("--tokens", type=int, default=2048, help="token-expert assignments (tokens x top-k)")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    experts = GroupedExperts(args.experts, args.dim, args.ffn).to(dev, dtype)
    with torch.no_grad():
        for w in (experts.w1, experts.w3, experts.w2):
            w.normal_(0, 0.02)
    counts = counts_for(args.tokens, args.experts, gen).to(dev)
    x = torch.randn(args.tokens, args.dim, generator=gen).to(dev, dtype).requires_grad_()
    flops = 3 * 2 * args.tokens * 3 * args.dim * args.ffn  # three GEMMs, forward + 2x backward
    print(f"torch {torch.__version__}, {args.device} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{args.dtype}; {args.experts} experts of {args.dim} x {args.ffn}, {args.tokens} assignments "
          f"(per expert {min(counts.tolist())}-{max(counts.tolist())})")
    rates = {}
    for mode in ("grouped", "loop"):
        rates[mode] = flops / time_mode(experts, x, counts, mode == "grouped", args.repeats) / 1e12
    print("| experts | TFLOP/s (fwd+bwd) | vs loop |")
    print("|---|---:|---:|")
    for mode in ("grouped", "loop"):
        print(f"| {mode} | {rates[mode]:.3f} | {rates[mode] / rates['loop']:.2f}x |")


if __name__ == "__main__":
    main()
