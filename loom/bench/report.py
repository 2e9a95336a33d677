"""Sweep results as a CSV, markdown tables in the shape of published 4D scaling tables (rows
(TP, CP, PP, micro batch), columns world size), PNG plots, and measured-vs-predicted."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from loom.bench.runner import BenchResult


def write_csv(results: list[BenchResult], path: Path) -> None:
    rows = [r.as_row() for r in results]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[BenchResult]:
    """Results written by write_csv (to compare them with the planner again without re-running)."""
    from loom.bench.grid import BenchLayout

    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            lay = BenchLayout(*(int(row[k]) for k in ("world", "tp", "cp", "pp", "micro_batch", "seq_len")))

            def num(key, kind=float):
                return kind(float(row[key])) if row[key] not in ("", "None") else None

            out.append(BenchResult(lay, row["status"], row["message"], num("tokens_per_s_per_device"),
                                   num("step_time_s"), num("peak_memory_bytes", int), num("global_batch", int),
                                   num("wall_s"), num("mfu") if row.get("mfu") is not None else None,
                                   row.get("peak_source") or ""))
    return out


def _cell(r: BenchResult | None) -> str:
    if r is None:
        return ""
    if r.status == "ok":
        return f"{r.tokens_per_s_per_device:,.0f} ({r.peak_memory_bytes / 2**20:,.0f} MiB)"
    return r.status


def markdown_tables(results: list[BenchResult], title: str) -> str:
    """One table per sequence length: rows (TP, CP, PP, MB), columns world size; cells tokens/s per
    device (peak memory per device), or why the layout did not run."""
    out = [f"# {title}", "", "Cells: tokens/s per device (peak memory per device); OOM, failed, invalid or "
           "timeout where the layout did not run; empty where it is not in the grid.", ""]
    peaks = sorted({r.peak_source for r in results if r.peak_source})
    if peaks:
        best = max((r for r in results if r.mfu is not None), key=lambda r: r.mfu, default=None)
        out += [f"MFU against: {'; '.join(peaks)}" + (f" (best layout: {100 * best.mfu:.1f}%)" if best else ""), ""]
    for seq in sorted({r.layout.seq_len for r in results}):
        sub = [r for r in results if r.layout.seq_len == seq]
        worlds = sorted({r.layout.world for r in sub})
        rows = sorted({r.layout.row for r in sub})
        cells = {(r.layout.row, r.layout.world): r for r in sub}
        out += [f"## sequence length {seq:,}", "",
                "| TP | CP | PP | MB | " + " | ".join(f"{w} rank{'s' if w > 1 else ''}" for w in worlds) + " |",
                "|---:|---:|---:|---:|" + "---:|" * len(worlds)]
        for row in rows:
            out.append("| " + " | ".join(map(str, row)) + " | "
                       + " | ".join(_cell(cells.get((row, w))) for w in worlds) + " |")
        out.append("")
    return "\n".join(out)


def plot_throughput(results: list[BenchResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok"]
    if not ok:
        return
    ok.sort(key=lambda r: (r.layout.seq_len, r.layout.world, -r.tokens_per_s_per_device))
    labels = [f"w{r.layout.world} tp{r.layout.tp} cp{r.layout.cp} pp{r.layout.pp} mb{r.layout.micro_batch}"
              + (f" s{r.layout.seq_len}" if len({x.layout.seq_len for x in ok}) > 1 else "") for r in ok]
    fig, ax = plt.subplots(figsize=(8, max(3, 0.28 * len(ok) + 1)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    worlds = sorted({r.layout.world for r in ok})
    ax.barh(range(len(ok)), [r.tokens_per_s_per_device for r in ok],
            color=[colors[worlds.index(r.layout.world) % len(colors)] for r in ok])
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s per device (measured)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cp_speedups(results: list[BenchResult]) -> dict[int, list[tuple[int, float]]]:
    """world -> [(seq_len, best cp>1 tokens/s per device / best cp=1 tokens/s per device)]."""
    ok = [r for r in results if r.status == "ok"]
    out: dict[int, list[tuple[int, float]]] = {}
    for world in sorted({r.layout.world for r in ok}):
        for seq in sorted({r.layout.seq_len for r in ok}):
            same = [r for r in ok if r.layout.world == world and r.layout.seq_len == seq]
            with_cp = [r.tokens_per_s_per_device for r in same if r.layout.cp > 1]
            without = [r.tokens_per_s_per_device for r in same if r.layout.cp == 1]
            if with_cp and without:
                out.setdefault(world, []).append((seq, max(with_cp) / max(without)))
    return out


def plot_cp_speedup(results: list[BenchResult], path: Path, title: str) -> bool:
    speedups = cp_speedups(results)
    if not speedups:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for world, points in speedups.items():
        ax.plot([s for s, _ in points], [x for _, x in points], marker="o", label=f"{world} ranks")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("best with cp > 1 / best with cp = 1")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else float("nan")


def compare_table(pairs: list[tuple[BenchResult, float]]) -> tuple[str, dict]:
    """Markdown of measured vs predicted tokens/s per device, with the share within 25% and the
    Spearman rank correlation."""
    lines = ["| world | TP | CP | PP | MB | seq | measured tok/s/dev | predicted | predicted / measured |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = []
    for r, pred in pairs:
        lay = r.layout
        ratio = pred / r.tokens_per_s_per_device
        ratios.append(ratio)
        lines.append(f"| {lay.world} | {lay.tp} | {lay.cp} | {lay.pp} | {lay.micro_batch} | {lay.seq_len} | "
                     f"{r.tokens_per_s_per_device:,.0f} | {pred:,.0f} | {ratio:.2f} |")
    within = sum(abs(x - 1) <= 0.25 for x in ratios)
    rho = spearman([r.tokens_per_s_per_device for r, _ in pairs], [p for _, p in pairs])
    stats = {"layouts": len(pairs), "within_25pct": within, "spearman": rho,
             "median_ratio": sorted(ratios)[len(ratios) // 2] if ratios else float("nan")}
    lines += ["", f"{within} of {len(pairs)} layouts within 25%; Spearman rank correlation {rho:.3f}; "
                  f"median predicted/measured {stats['median_ratio']:.2f}"]
    return "\n".join(lines), stats
