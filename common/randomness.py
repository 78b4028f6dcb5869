"""Stateless randomness from integer seeds: the same numbers on every machine, Python and library version,
which exact resume relies on (a resumed data stream recomputes its choices instead of restoring an RNG)."""

from __future__ import annotations

import zlib

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 chained)."""
    h = 0x9E3779B97F4A7C15
    for value in values:
        h = (h ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h


def seeded_permutation(n: int, *seed: int) -> list[int]:
    """A permutation of range(n) from integer seeds (Fisher-Yates on `mix_seed`)."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = mix_seed(*seed, i) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def name_seed(name: str) -> int:
    """An integer seed from a name (CRC-32 of its UTF-8 bytes)."""
    return zlib.crc32(name.encode())
