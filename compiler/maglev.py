"""Maglev lookup tables for source-affinity load balancing.

A Maglev table (Eisenbud et al., NSDI 2016) maps M slots to backends so that
each backend holds a share of slots proportional to its weight, and adding or
removing one backend moves only about 1/N of the slots: clients hashed to a
slot keep their backend across most changes. Both backends use it: the tproxy
backend as an nft map indexed by `jhash ip saddr mod M`, the ebpf backend as
an array map.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

# Primes, so that every (offset, skip) permutation covers the whole table.
TABLE_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521)


def table_size(backend_count: int, slots_per_backend: int = 20) -> int:
    """The smallest listed prime giving each backend about `slots_per_backend` slots."""
    wanted = backend_count * slots_per_backend
    for size in TABLE_SIZES:
        if size >= wanted:
            return size
    return TABLE_SIZES[-1]


def _hash(text: str, salt: bytes) -> int:
    hasher = _KEYED.get(salt)
    if hasher is None:
        hasher = _KEYED[salt] = hashlib.blake2b(digest_size=8, key=salt)
    # a copy of the keyed state skips the key's compression: the same digest as blake2b(text, key=salt)
    h = hasher.copy()
    h.update(text.encode())
    return int.from_bytes(h.digest(), "big")


_KEYED: dict[bytes, Any] = {}


def _permutation(backend: str, size: int) -> tuple[int, int]:
    """(offset, skip) of a backend's preference list; kept, as a weight change leaves them as they are."""
    known = _PERMUTATIONS.get((backend, size))
    if known is None:
        if len(_PERMUTATIONS) > 100_000:
            _PERMUTATIONS.clear()
        known = _PERMUTATIONS[(backend, size)] = (_hash(backend, b"offset") % size,
                                                  _hash(backend, b"skip") % (size - 1) + 1)
    return known


_PERMUTATIONS: dict[tuple[str, int], tuple[int, int]] = {}


def build(backends: Sequence[str], weights: Sequence[int], size: int) -> list[int]:
    """Slot -> backend index. `backends` are stable identities (e.g. "10.0.0.1:80"), not positions."""
    if not backends:
        return []
    positions, skips = map(list, zip(*(_permutation(b, size) for b in backends), strict=True))
    if min(weights) == max(weights):
        return _build_equal(positions, skips, size)
    return _build_weighted(positions, skips, weights, size)


def _build_weighted(positions: list[int], skips: list[int], weights: Sequence[int], size: int) -> list[int]:
    count = len(positions)
    table = [-1] * size
    filled = 0
    top = max(weights)
    shares = [w / top for w in weights]
    # Weighted Maglev: in each round a backend places a slot only while its
    # accumulated credit (weight / max weight) reaches a whole slot. positions[i]
    # walks backend i's preference list (offset + k * skip mod size); the loop
    # is written for speed: a weight change rebuilds a 1,000-backend table.
    credit = [0.0] * count
    while True:
        for i in range(count):
            c = credit[i] + shares[i]
            if c >= 1.0:
                pos, skip = positions[i], skips[i]
                while c >= 1.0:
                    c -= 1.0
                    while table[pos] >= 0:
                        pos += skip
                        if pos >= size:
                            pos -= size
                    table[pos] = i
                    pos += skip
                    if pos >= size:
                        pos -= size
                    filled += 1
                    if filled == size:
                        return table
                positions[i] = pos
            credit[i] = c


def _build_equal(positions: list[int], skips: list[int], size: int) -> list[int]:
    """build() when every weight is the same: each round gives every backend one slot, in order, until the
    table is full (the same table as the weighted loop, without its credit arithmetic; a test compares)."""
    table = [-1] * size
    rounds, rest = divmod(size, len(positions))
    order = range(len(positions))
    for turn in range(rounds + 1):
        if turn == rounds:
            order = range(rest)
        for i in order:
            pos = positions[i]
            if table[pos] >= 0:
                skip = skips[i]
                pos = (pos + skip) % size
                while table[pos] >= 0:
                    pos = (pos + skip) % size
            table[pos] = i
            positions[i] = (pos + skips[i]) % size
    return table
