"""A seeded permutation of [0, n) computed index by index, never materialized.

A run's sample order must not cost memory that grows with the data: at 15T tokens in 8K
sequences a materialized permutation is 1.8 billion int64 values per rank. Instead sample i of
an epoch is `KeyedPermutation(n, key)(i)`: a balanced Feistel network over the smallest even
number of bits covering n is a bijection of [0, 2^bits); values that land at or past n are
encrypted again (cycle-walking) until they fall inside, which keeps it a bijection of [0, n).
Since 2^bits < 4n, fewer than four rounds of walking are needed on average.
"""
from __future__ import annotations

import numpy as np

ROUNDS = 6  # Feistel rounds; 4 already give a pseudo-random permutation (Luby-Rackoff), 6 for margin
_MASK64 = np.uint64(2**64 - 1)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective scrambling of uint64 values [N] -> [N]."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def round_keys(key: tuple[int, ...]) -> np.ndarray:
    """ROUNDS uint64 round keys [ROUNDS] derived from the integers of `key` (seed, epoch, ...)."""
    state = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for part in key:
            state = _mix(np.asarray([state ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF)], dtype=np.uint64))[0]
        return _mix(state + np.arange(1, ROUNDS + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))


class KeyedPermutation:
    """A bijection of [0, n) chosen by `key` (a tuple of integers, e.g. (seed, epoch)).

    perm(indices) -> the permuted values, same shape, int64. O(len(indices)) time, O(1) state.
    """

    def __init__(self, n: int, key: tuple[int, ...]):
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        self.n = n
        half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
        self.half_bits = np.uint64(half_bits)
        self.half_mask = np.uint64((1 << half_bits) - 1)
        self.keys = round_keys(key)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        """One pass of the Feistel network over [0, 2^(2 * half_bits)): uint64 [N] -> [N]."""
        left, right = x >> self.half_bits, x & self.half_mask
        with np.errstate(over="ignore"):
            for k in self.keys:
                left, right = right, left ^ (_mix(right ^ k) & self.half_mask)
        return (left << self.half_bits) | right

    def __call__(self, indices) -> np.ndarray:
        x = np.asarray(indices, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"indices outside [0, {self.n})")
        out = self._encrypt(x.astype(np.uint64).ravel())
        outside = out >= np.uint64(self.n)
        while outside.any():  # cycle-walking: re-encrypt until the value falls inside [0, n)
            out[outside] = self._encrypt(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64).reshape(x.shape)
