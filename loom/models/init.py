"""Initialization whose values do not depend on where a parameter lives.

Every element's initial value is a pure function of (seed, parameter name, element index): a
parameter of global shape [R, ...] is cut into fixed blocks of rows (`rows_per_block`, a
function of the shape only), block b is drawn on the CPU from its own generator seeded by
(seed, name, b), and a tensor that holds any region of the parameter (the whole of it, an FSDP
shard, a tensor-parallel slice, both) draws only the blocks that overlap its rows and keeps
its part of them. So one process, any layout and any device hold bit-for-bit the same weights,
and initializing a shard needs the shard plus one block of memory (at most BLOCK_ELEMENTS
fp32 values, 4 MiB).

Torch's own random ops cannot give this: a DTensor's random draw depends on how it is sharded
on CUDA, and on CPU every rank draws the same values.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class InitSpec:
    """How one parameter starts: `normal` (mean 0, std), `trunc_normal` (mean 0, std, cut at
    +-3 std), or the constants `ones` and `zeros`."""

    kind: str
    std: float = 0.0
    key: str | None = None  # the name its values are drawn under, if not its own (a tied copy)

    KINDS = ("normal", "trunc_normal", "ones", "zeros")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"init kind {self.kind!r}; allowed: {', '.join(self.KINDS)}")

    @property
    def random(self) -> bool:
        return self.kind in ("normal", "trunc_normal")


def rows_per_block(shape: tuple[int, ...]) -> int:
    """Rows of dim 0 per generated block: as many as fit BLOCK_ELEMENTS, at least one."""
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, BLOCK_ELEMENTS // max(1, row))


def block_seed(seed: int, name: str, block: int) -> int:
    """A 63-bit generator seed for block `block` of parameter `name` (stable across Python
    processes and versions, unlike hash())."""
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# Uniform draws stay inside (-1, 1) by this margin: erfinv(+-1) is infinite, and a float32
# uniform_ returns its lower bound once in 2^24 draws (thousands of times in a 405B model).
_EDGE = 2.0**-23


def _draw(spec: InitSpec, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Values by inverse transform of one uniform draw per element, all in place: the draw
    needs no memory beyond its output (torch's own trunc_normal_ resamples through several
    temporaries) and its values do not change with torch's sampling algorithms."""
    out = torch.empty(shape, dtype=torch.float32)
    # trunc_normal: uniform over the CDF's range within +-3 std; normal: over (almost) all of it.
    edge = math.erf(3 / math.sqrt(2)) if spec.kind == "trunc_normal" else 1.0 - _EDGE
    out.uniform_(-edge, edge, generator=generator).erfinv_().mul_(spec.std * math.sqrt(2))
    if spec.kind == "trunc_normal":
        out.clamp_(-3 * spec.std, 3 * spec.std)  # rounding at the edges
    return out


@torch.no_grad()
def fill_region(out: torch.Tensor, name: str, global_shape: tuple[int, ...], offset: tuple[int, ...],
                spec: InitSpec, seed: int) -> None:
    """Write into `out` its region of parameter `name`: out covers global_shape's elements
    offset[d] .. offset[d] + out.shape[d] along every dim d. out may live on any device and in
    any dtype (values are drawn in fp32 on the CPU and copied)."""
    if out.numel() == 0:
        return
    name = spec.key or name
    if not spec.random:
        out.fill_(1.0 if spec.kind == "ones" else 0.0)
        return
    global_shape = tuple(global_shape)
    if len(global_shape) > 2 and tuple(offset[1:-1]) == (0,) * (len(global_shape) - 2) \
            and tuple(out.shape[1:-1]) == global_shape[1:-1]:
        # [E, F, D] (experts) holding whole dims 1 .. -2: blocks of rows of its [E x F, D] view, so
        # that a block stays one block's size however large one expert is.
        lead = math.prod(global_shape[:-1]) // global_shape[0]
        fill_region(out.view(-1, out.shape[-1]), name, (global_shape[0] * lead, global_shape[-1]),
                    (offset[0] * lead, offset[-1]), spec, seed)
        return
    if len(global_shape) == 0:  # a scalar parameter: one block of one element
        g = torch.Generator().manual_seed(block_seed(seed, name, 0))
        out.copy_(_draw(spec, (), g))
        return
    rows = rows_per_block(global_shape)
    first, last = offset[0], offset[0] + out.shape[0]  # this region's rows [first, last)
    inner = tuple(slice(o, o + n) for o, n in zip(offset[1:], out.shape[1:]))
    for block in range(first // rows, (last - 1) // rows + 1):
        start = block * rows
        stop = min(start + rows, global_shape[0])
        g = torch.Generator().manual_seed(block_seed(seed, name, block))
        values = _draw(spec, (stop - start, *global_shape[1:]), g)
        lo, hi = max(start, first), min(stop, last)
        out[lo - first: hi - first].copy_(values[(slice(lo - start, hi - start), *inner)])
        del values
