"""A benchmark grid: a TOML file naming the base config of every run and the layouts to sweep.

    [base.model]               # any config section and key, applied to every run
    name = "tiny"
    [base.train]
    seq_len = 512
    global_batch = 8
    steps = 6

    [grid]                     # the product of these lists; layouts loom cannot run are skipped
    world = [1, 2, 4, 8]       # ranks; dp_shard = world / (tp x cp x pp)
    tp = [1, 2]
    cp = [1, 2]
    pp = [1, 2]
    micro_batch = [1, 2]
    seq_len = [512, 1024]      # optional: also sweep sequence lengths

    [[layouts]]                # optional: explicit layouts, beside or instead of [grid]
    world = 4
    tp = 2
    cp = 2
"""
from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GRID_KEYS = ("world", "tp", "cp", "pp", "micro_batch", "seq_len")


class GridError(ValueError):
    """A grid file that cannot be swept; one line naming the file, the key and what is allowed."""


@dataclass(frozen=True)
class BenchLayout:
    world: int
    tp: int
    cp: int
    pp: int
    micro_batch: int
    seq_len: int

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.cp * self.pp)

    def overrides(self) -> list[str]:
        return [f"--parallel.tp={self.tp}", f"--parallel.cp={self.cp}", f"--parallel.pp={self.pp}",
                f"--parallel.dp_shard={self.dp}", "--parallel.dp_replicate=1",
                f"--train.micro_batch={self.micro_batch}", f"--train.seq_len={self.seq_len}"]

    @property
    def row(self) -> tuple[int, int, int, int]:
        return (self.tp, self.cp, self.pp, self.micro_batch)


@dataclass(frozen=True)
class Grid:
    name: str
    base: list[str]  # --section.key=value overrides of every run
    layouts: list[BenchLayout]
    default_seq_len: int


def _as_override(section: str, key: str, value) -> str:
    if isinstance(value, bool):
        value = str(value).lower()
    return f"--{section}.{key}={value}"


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise GridError(f"--grid={str(path)!r}: no such file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise GridError(f"--grid={str(path)!r} is not valid TOML: {e}") from None
    unknown = set(data) - {"base", "grid", "layouts"}
    if unknown:
        raise GridError(f"{path}: unknown table [{sorted(unknown)[0]}]; allowed: [base.*], [grid], [[layouts]]")
    base = []
    for section, keys in data.get("base", {}).items():
        if not isinstance(keys, dict):
            raise GridError(f"{path}: base.{section} must be a table of config keys, e.g. [base.train]")
        for key, value in keys.items():
            if (section, key) in (("parallel", k) for k in ("tp", "cp", "pp", "dp_shard")):
                raise GridError(f"{path}: base.parallel.{key} is set per layout; put it in [grid] or [[layouts]]")
            base.append(_as_override(section, key, value))
    seq_default = data.get("base", {}).get("train", {}).get("seq_len", 256)

    def values(table: dict, key: str, where: str) -> list[int]:
        v = table.get(key, [seq_default] if key == "seq_len" else [1])
        v = v if isinstance(v, list) else [v]
        if not v or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
            raise GridError(f"{path}: {where}.{key}={v!r} must be positive integers")
        return v

    layouts: list[BenchLayout] = []
    grid = data.get("grid")
    if grid is not None:
        bad = set(grid) - set(GRID_KEYS)
        if bad:
            raise GridError(f"{path}: grid.{sorted(bad)[0]} is unknown; allowed: {', '.join(GRID_KEYS)}")
        lists = [values(grid, k, "grid") for k in GRID_KEYS]
        for world, tp, cp, pp, mb, seq in itertools.product(*lists):
            if world % (tp * cp * pp) == 0:
                layouts.append(BenchLayout(world, tp, cp, pp, mb, seq))
    for i, entry in enumerate(data.get("layouts", [])):
        bad = set(entry) - set(GRID_KEYS)
        if bad:
            raise GridError(f"{path}: layouts[{i}].{sorted(bad)[0]} is unknown; allowed: {', '.join(GRID_KEYS)}")
        v = {k: values(entry, k, f"layouts[{i}]")[0] for k in GRID_KEYS}
        if "world" not in entry:
            v["world"] = v["tp"] * v["cp"] * v["pp"]
        if v["world"] % (v["tp"] * v["cp"] * v["pp"]):
            raise GridError(f"{path}: layouts[{i}] world={v['world']} is not divisible by tp x cp x pp")
        layouts.append(BenchLayout(**v))
    if not layouts:
        raise GridError(f"{path}: no layouts (give [grid] lists or [[layouts]] entries)")
    return Grid(path.stem, base, list(dict.fromkeys(layouts)), seq_default)
