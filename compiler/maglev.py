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
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, key=salt).digest(), "big")


def build(backends: Sequence[str], weights: Sequence[int], size: int) -> list[int]:
    """Slot -> backend index. `backends` are stable identities (e.g. "10.0.0.1:80"), not positions."""
    if not backends:
        return []
    count = len(backends)
    offsets = [_hash(b, b"offset") % size for b in backends]
    skips = [_hash(b, b"skip") % (size - 1) + 1 for b in backends]
    next_index = [0] * count
    table = [-1] * size
    filled = 0
    top = max(weights)
    # Weighted Maglev: in each round a backend places a slot only while its
    # accumulated credit (weight / max weight) reaches a whole slot.
    credit = [0.0] * count
    while True:
        for i in range(count):
            credit[i] += weights[i] / top
            while credit[i] >= 1.0:
                credit[i] -= 1.0
                while True:
                    slot = (offsets[i] + next_index[i] * skips[i]) % size
                    next_index[i] += 1
                    if table[slot] < 0:
                        break
                table[slot] = i
                filled += 1
                if filled == size:
                    return table
