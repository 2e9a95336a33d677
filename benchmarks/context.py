"""Context parallelism on this machine: long-sequence throughput, ring overlap, longest sequence.

    python benchmarks/context.py throughput [--lengths 4096,8192,16384,32768] [--plot cp.png]
    python benchmarks/context.py overlap    [--cp 2,4] [--lengths 1024,2048,4096] [--kv-heads 8]
    python benchmarks/context.py memory     [--budget-mib 256]

throughput: total tokens/s of one training step of the tiny model on the 2 cores, for one
    process with 2 threads, tp=2 and cp=2 (one thread per rank), per sequence length, in the
    shape of NeMo's long-sequence table (speedup of cp=2 over the others), and a PNG plot. Each
    run is `loom train` itself (median step time after the first step); the setups alternate
    and each cell is the median over --rounds runs.
overlap: ring attention (forward + backward, GQA) under torchrun at cp ranks: the time with
    communication overlapped, against the same kernel calls alone and the same transfers alone;
    hidden = (compute + comm - overlapped) / comm.
memory: for cp = 1, 2, 4, 8, the longest power-of-two sequence whose training step (forward,
    backward) fits a per-rank budget of step memory (peak RSS of the step above the RSS before
    it; the gradients it allocates included), measured, not extrapolated. Each rank holds the
    whole model (no FSDP), so the figure isolates what grows with the sequence.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}


# -- (a) throughput ---------------------------------------------------------------------------
SETUPS = [  # label, ranks, overrides
    ("1 process, 2 threads", 1, []),
    ("tp=2", 2, ["--parallel.tp=2"]),
    ("cp=2", 2, ["--parallel.cp=2"]),
]


def train_step_time(seq_len: int, overrides: list[str], steps: int, tmp: Path) -> float:
    jsonl = tmp / "m.jsonl"
    cmd = [sys.executable, "-m", "loom", "train", "--quiet", "--model.name=tiny",
           f"--train.seq_len={seq_len}", f"--train.steps={steps}", "--train.global_batch=1",
           "--train.micro_batch=1", "--train.eval_every=0", "--train.eval_batches=1", "--train.warmup_steps=0",
           "--metrics.log_every=1", f"--metrics.jsonl={jsonl}", "--metrics.plot=",
           "--parallel.dp_shard=1", "--parallel.pp=1", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1])
    rows = [json.loads(line) for line in open(jsonl)]
    return statistics.median(row["step_time_s"] for row in rows if row["step"] > 1)


def throughput(args) -> None:
    lengths = [int(x) for x in args.lengths.split(",")]
    # This VM's speed drifts by a third with its neighbours' load: the setups alternate within
    # each round, and each cell is the median over the rounds.
    # Samples accumulate in --results across invocations, so a long sweep can be run in parts.
    results = Path(args.results)
    stored = json.loads(results.read_text()) if results.exists() else {}
    samples: dict[int, dict[str, list[float]]] = {int(s): row for s, row in stored.items()}
    for s in lengths:
        samples.setdefault(s, {label: [] for label, _, _ in SETUPS})
    with tempfile.TemporaryDirectory() as tmp:
        for seq_len in lengths:
            steps = 3 if seq_len <= 8192 else 2
            for _ in range(args.rounds):
                for label, ranks, overrides in SETUPS:
                    nproc = ["--nproc", str(ranks)] if ranks > 1 else []
                    # `loom train --nproc` itself is the launcher; one process keeps torch's 2 threads.
                    t = train_step_time(seq_len, nproc + overrides, steps, Path(tmp))
                    samples[seq_len][label].append(seq_len / t)
                    results.write_text(json.dumps(samples, indent=1))
                    print(f"seq {seq_len} {label}: {seq_len / t:,.0f} tokens/s ({t:.2f} s/step)",
                          file=sys.stderr, flush=True)
    lengths = sorted(samples)
    table = {s: {label: statistics.median(v) for label, v in samples[s].items()} for s in lengths}
    rounds = sorted({len(v) for row in samples.values() for v in row.values()})
    print(f"\n## tiny model, one sequence per step, fp32, 2 cores: total tokens/s (median of "
          f"{'/'.join(map(str, rounds))} runs per cell, from {results})\n")
    print("| sequence length | 1 process (2 threads) | tp=2 | cp=2 | cp=2 speedup vs 1 process | cp=2 speedup vs tp=2 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for seq_len, row in table.items():
        one, tp, cp = row["1 process, 2 threads"], row["tp=2"], row["cp=2"]
        print(f"| {seq_len:,} | {one:,.0f} | {tp:,.0f} | {cp:,.0f} | {cp / one:.2f}x | {cp / tp:.2f}x |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, _, _ in SETUPS:
            ax.plot(lengths, [table[s][label] for s in lengths], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{s // 1024}K" for s in lengths])
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("tokens/s (2 CPU cores in all)")
        ax.set_title("loom tiny model: context parallelism vs tp and one process")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nplot: {args.plot}")


# -- (b) overlap ------------------------------------------------------------------------------
def overlap_worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from loom.parallel.context.group import CPGroup, wait
    from loom.parallel.context.ring import ring_attention
    from loom.parallel.context.sharding import all_spans

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cp = CPGroup.from_mesh(init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",)))
    n = cp.size
    b, hq, hkv, d = 1, 8, args.kv_heads, 32  # the tiny model's heads (8 x 32); KV heads as asked
    local = args.seq_len // n
    spans = all_spans(n, args.seq_len, True)
    q = torch.randn(b, hq, local, d, requires_grad=True)
    k = torch.randn(b, hkv, local, d, requires_grad=True)
    v = torch.randn(b, hkv, local, d, requires_grad=True)
    dout = torch.randn(b, hq, local, d)

    blocked = [0.0]  # seconds the ring spent waiting for a transfer that had not arrived

    class TimedWait:
        def __init__(self, request):
            self.request = request

        def wait(self):
            t0 = time.perf_counter()
            self.request.wait()
            blocked[0] += time.perf_counter() - t0

    class WaitTimedRing(CPGroup):
        def exchange(self, send, recv, tag):
            return [TimedWait(r) for r in CPGroup.exchange(self, send, recv, tag)]

    timed_ring = WaitTimedRing(cp.group, cp.rank, cp.size, cp.ranks)

    def overlapped():
        out = ring_attention(q, k, v, timed_ring, spans, None)
        out.backward(dout)

    class NoTransfers(CPGroup):
        """The same ring code, with each transfer replaced by a local copy of the same size."""

        def exchange(self, send, recv, tag):
            recv.copy_(send)
            return []

    local_ring = NoTransfers(cp.group, cp.rank, cp.size, cp.ranks)

    def compute_only():  # every kernel call, merge and buffer of the ring; no transfers
        out = ring_attention(q, k, v, local_ring, spans, None)
        out.backward(dout)

    def comm_only():  # the same transfers: n-1 KV blocks forward; n-1 KV and n KV-gradient blocks backward
        kv = torch.stack((k.detach(), v.detach()))
        grad = torch.zeros(kv.shape)
        for _ in range(n - 1):
            buf = torch.empty_like(kv)
            wait(cp.exchange(kv, buf, 1))
        for step in range(n):
            if step + 1 < n:
                wait(cp.exchange(kv, torch.empty_like(kv), 1))
            wait(cp.exchange(grad, torch.empty_like(grad), 2))

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    # Interleaved, so that the machine's drift hits the three alike; the first round is warm-up.
    rounds = []
    for _ in range(args.repeats + 1):
        blocked[0] = 0.0
        t = [timed(fn) for fn in (overlapped, compute_only, comm_only)]
        rounds.append(t + [blocked[0]])
    t_overlap, t_compute, t_comm, t_blocked = (statistics.median(col) for col in zip(*rounds[1:]))
    if cp.rank == 0:
        hidden = (t_compute + t_comm - t_overlap) / t_comm if t_comm > 0 else float("nan")
        print(json.dumps({"cp": n, "seq_len": args.seq_len, "kv_heads": hkv, "overlapped_s": t_overlap, "compute_s": t_compute,
                          "comm_s": t_comm, "blocked_s": t_blocked, "hidden_fraction": hidden}))
    dist.destroy_process_group()


def launch(worker: str, nproc: int, extra: list[str], env: dict | None = None) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(HERE), worker, *extra]
    env = {**_env(), "OMP_NUM_THREADS": "1", **(env or {})}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def overlap(args) -> None:
    rows = []
    for seq_len in [int(x) for x in args.lengths.split(",")]:
        for cp in [int(x) for x in args.cp.split(",")]:
            rows += launch("overlap-worker", cp, [f"--seq-len={seq_len}", f"--repeats={args.repeats}",
                                                  f"--kv-heads={args.kv_heads}"])
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"\n## ring attention (forward + backward), gloo, one thread per rank, 8 query heads, "
          f"{args.kv_heads} KV heads, head dim 32 (medians of {args.repeats} interleaved rounds)\n")
    print("hidden = (compute + transfers - overlapped) / transfers; waited = time the ring blocked on a "
          "transfer not yet arrived, as a share of the transfers' own time\n")
    print("| cp | sequence | overlapped (s) | compute alone (s) | transfers alone (s) | sum (s) | hidden | waited |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['cp']} | {row['seq_len']:,} | {row['overlapped_s']:.4f} | {row['compute_s']:.4f} | "
              f"{row['comm_s']:.4f} | {row['compute_s'] + row['comm_s']:.4f} | {100 * row['hidden_fraction']:.0f}% | "
              f"{100 * row['blocked_s'] / row['comm_s']:.0f}% |")


# -- (c) memory -------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_worker(args) -> None:
    """One training step per length; prints {"seq_len", "step_mib" (max over ranks), "fits"}."""
    import torch
    import torch.distributed as dist

    from loom.models.registry import get_model_config
    from loom.models.transformer import build_model
    from loom.parallel.context import apply_context_parallel, shard_index

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    cfg = get_model_config("tiny")
    model = build_model(cfg, "cpu")
    model.init_weights(seed=0)
    if world > 1:
        apply_context_parallel(model, mesh, "p2p", load_balance=True)
    budget_kib = args.budget_mib * 1024
    rank = mesh.get_local_rank() if world > 1 else 0
    # Warm-up step (not reported): one-time allocations (thread pools, communication buffers).
    warm = torch.randint(cfg.vocab_size, (1, 1024 // world))
    model(warm, torch.arange(1024 // world)[None], labels=warm).backward()
    seq_len = args.first_len
    while seq_len <= args.max_len:
        tokens = torch.randint(cfg.vocab_size, (1, seq_len + 1))
        idx = shard_index(rank, world, seq_len, True) if world > 1 else torch.arange(seq_len)
        inputs, labels = tokens[:, :-1][:, idx], tokens[:, 1:][:, idx]
        positions = idx.expand(1, -1)
        model.zero_grad(set_to_none=True)
        base = _rss_kib("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
        loss = model(inputs, positions, labels=labels)
        peak = _rss_kib("VmHWM") - base
        over = torch.tensor([peak > budget_kib], dtype=torch.int64)
        if world > 1:
            dist.all_reduce(over)
        if not over.item():  # forward fits: run the backward (its peak counts too)
            loss.backward()
            peak = _rss_kib("VmHWM") - base
        del loss
        worst = torch.tensor([peak], dtype=torch.int64)
        if world > 1:
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        fits = worst.item() <= budget_kib
        if rank == 0:
            print(json.dumps({"cp": world, "seq_len": seq_len, "step_mib": worst.item() / 1024, "fits": fits}), flush=True)
        if not fits:
            break
        seq_len *= 2
    if world > 1:
        dist.destroy_process_group()


def memory(args) -> None:
    rows = []
    for cp in (1, 2, 4, 8):
        start = max([r["seq_len"] for r in rows if r["fits"]] or [1024])  # never below what cp/2 fit
        # A fixed mmap threshold makes glibc return every large freed block to the system at once,
        # so the resident set follows the live tensors (glibc's adaptive threshold would keep
        # freed blocks in the heap, and a later step reusing them would look smaller than it is).
        rows += launch("memory-worker", cp, [f"--budget-mib={args.budget_mib}", f"--first-len={start}",
                                             f"--max-len={args.max_len}"],
                       env={"MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
        print([r for r in rows if r["cp"] == cp], file=sys.stderr, flush=True)
    print(f"\n## longest sequence of the tiny model whose training step fits {args.budget_mib} MiB per rank\n")
    print("| cp | longest that fits | its step memory per rank | next length | its memory per rank |")
    print("|---:|---:|---:|---:|---:|")
    for cp in (1, 2, 4, 8):
        mine = [r for r in rows if r["cp"] == cp]
        ok = [r for r in mine if r["fits"]]
        bad = [r for r in mine if not r["fits"]]
        best = f"{ok[-1]['seq_len']:,} | {ok[-1]['step_mib']:.0f} MiB" if ok else "none | "
        nxt = f"{bad[0]['seq_len']:,} | {bad[0]['step_mib']:.0f} MiB (over)" if bad else "not tried | "
        print(f"| {cp} | {best} | {nxt} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--lengths", default="4096,8192,16384,32768")
    t.add_argument("--plot", default="cp_throughput.png")
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--results", default="cp_throughput.json")
    o = sub.add_parser("overlap")
    o.add_argument("--cp", default="2,4")
    # Short sequences and full KV heads: transfers grow with S, kernels with S^2, so this is where
    # communication is a large enough part of the step to see how much of it is hidden.
    o.add_argument("--lengths", default="1024,2048,4096")
    o.add_argument("--kv-heads", type=int, default=8)
    o.add_argument("--repeats", type=int, default=10)
    ow = sub.add_parser("overlap-worker")
    ow.add_argument("--seq-len", type=int, required=True)
    ow.add_argument("--kv-heads", type=int, required=True)
    ow.add_argument("--repeats", type=int, default=10)
    m = sub.add_parser("memory")
    m.add_argument("--budget-mib", type=int, default=256)
    m.add_argument("--max-len", type=int, default=1 << 17)
    mw = sub.add_parser("memory-worker")
    mw.add_argument("--budget-mib", type=int, required=True)
    mw.add_argument("--first-len", type=int, required=True)
    mw.add_argument("--max-len", type=int, required=True)
    args = ap.parse_args()
    {"throughput": throughput, "overlap": overlap, "overlap-worker": overlap_worker, "memory": memory,
     "memory-worker": memory_worker}[args.what](args)


if __name__ == "__main__":
    main()
