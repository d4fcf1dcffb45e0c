"""Fast CIDR handling for big lists: validation, canonical text, collapsing.

The ipaddress module is exact but slow (tens of microseconds per network);
intents with 10,000 CIDRs are normal and a daemon re-reads them on every
save. Here prefixes are plain integers. Results are identical to
ipaddress.ip_network(strict=True) / collapse_addresses (a test checks),
and anything unusual falls back to ipaddress itself.
"""

from __future__ import annotations

import ipaddress
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Hashable, Iterable
from itertools import chain
from typing import Generic, NamedTuple, TypeVar

_T = TypeVar("_T")

_BITS = {4: 32, 6: 128}


class Prefix(NamedTuple):
    """A network as integers: hashing, comparing and taking supernets cost next to nothing."""

    version: int
    value: int
    prefixlen: int

    @classmethod
    def of(cls, text: str) -> Prefix:
        return cls(*parse(text))

    def supernet(self, prefixlen: int) -> Prefix:
        bits = _BITS[self.version]
        return Prefix(self.version, self.value >> (bits - prefixlen) << (bits - prefixlen) if prefixlen else 0,
                      prefixlen)

    @property
    def packed(self) -> bytes:
        return self.value.to_bytes(_BITS[self.version] // 8, "big")

    @property
    def with_prefixlen(self) -> str:
        return f"{_address_text(self.version, self.value)}/{self.prefixlen}"

    def __str__(self) -> str:
        return self.with_prefixlen


def collapsed_prefixes(cidrs: Iterable[str]) -> list[Prefix]:
    """collapse() as Prefixes, IPv4 first."""
    return [Prefix(family, value, length) for family, prefixes in sorted(collapse(cidrs).items())
            for value, length in prefixes]


def _fast_v4(text: str) -> tuple[int, int] | None:
    address, slash, length = text.partition("/")
    parts = address.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for part in parts:
        # leading zeros and other oddities: let ipaddress decide
        if not part.isdigit() or len(part) > 3 or (part[0] == "0" and len(part) > 1) or int(part) > 255:
            return None
        value = value << 8 | int(part)
    if not slash:
        prefixlen = 32
    elif length.isdigit() and len(length) <= 2 and int(length) <= 32:
        prefixlen = int(length)
    else:
        return None
    return value, prefixlen


# Parsed and canonical forms by text. A daemon sees the same 10,000 strings on
# every pass; a dict lookup is ~50x cheaper than parsing. Bounded: cleared when full.
_MEMO_LIMIT = 500_000
_PARSED: dict[str, tuple[int, int, int]] = {}
_CANONICAL: dict[str, str] = {}


def parse(text: str) -> tuple[int, int, int]:
    """(family, network as int, prefix length); raises ValueError like ip_network(strict=True)."""
    parsed = _PARSED.get(text)
    if parsed is None:
        if len(_PARSED) >= _MEMO_LIMIT:
            _PARSED.clear()
        parsed = _PARSED[text] = _parse(text)
    return parsed


def _parse(text: str) -> tuple[int, int, int]:
    fast = _fast_v4(text) if ":" not in text else None
    if fast is not None:
        value, prefixlen = fast
        if value & ((1 << (32 - prefixlen)) - 1):
            raise ValueError(f"{text} has host bits set")
        return 4, value, prefixlen
    network = ipaddress.ip_network(text, strict=True)
    return network.version, int(network.network_address), network.prefixlen


def _address_text(family: int, value: int) -> str:
    if family == 4:
        return f"{value >> 24}.{value >> 16 & 255}.{value >> 8 & 255}.{value & 255}"
    return str(ipaddress.IPv6Address(value))


def canonical(text: str) -> str:
    """`with_prefixlen` text of a CIDR or single address (10.0.0.1 -> 10.0.0.1/32)."""
    result = _CANONICAL.get(text)
    if result is None:
        family, value, prefixlen = parse(text)
        if len(_CANONICAL) >= _MEMO_LIMIT:
            _CANONICAL.clear()
        result = _CANONICAL[text] = f"{_address_text(family, value)}/{prefixlen}"
    return result


# A dotted quad as canonical as nft and ipaddress write it (no leading zeros, each part <= 255), with an
# optional prefix length written without leading zeros: what a large blocklist is made of.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_V4 = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}(?:/(?:3[0-2]|[12]?[0-9]))?")


def canonical_list(texts: list[str]) -> list[str]:
    """[canonical(t) for t in texts], at dict-lookup speed for texts seen before: only the texts not seen
    yet (the one CIDR an edit added to a 10,000-CIDR blocklist) are looked at one by one. Those that are
    canonical IPv4 already (a new blocklist's hundreds of thousands) are checked at C speed where it can:
    a regex for the form (which also bounds every octet), then the value and its host bits."""
    known = list(map(_CANONICAL.get, texts))
    if None not in known:
        return known  # type: ignore[return-value]  # no None in it
    unseen = set(texts).difference(_CANONICAL)
    if len(unseen) >= _MEMO_LIMIT:
        return [canonical(t) for t in texts]  # more than the memo holds: nothing to keep
    if len(_CANONICAL) + len(unseen) >= _MEMO_LIMIT:
        _CANONICAL.clear()
        _PARSED.clear()
    match = _CANONICAL_V4.fullmatch
    for text in unseen:
        if not match(text):
            canonical(text)
            continue
        address, slash, length = text.partition("/")
        prefixlen = int(length) if slash else 32
        value = int.from_bytes(bytes(map(int, address.split("."))), "big")
        if value & ((1 << (32 - prefixlen)) - 1):
            raise ValueError(f"{text} has host bits set")
        _PARSED[text] = (4, value, prefixlen)
        _CANONICAL[text] = text if slash else f"{text}/32"
    return list(map(_CANONICAL.__getitem__, texts))


def element_text(family: int, value: int, prefixlen: int) -> str:
    """nft's canonical element: a host prefix is a bare address."""
    address = _address_text(family, value)
    return address if prefixlen == _BITS[family] else f"{address}/{prefixlen}"


def _ranges_to_prefixes(family: int, start: int, end: int) -> list[tuple[int, int]]:
    bits = _BITS[family]
    prefixes = []
    while start <= end:
        # the largest aligned block starting at `start` that does not pass `end`
        size = (start & -start).bit_length() - 1 if start else bits
        while size > 0 and start + (1 << size) - 1 > end:
            size -= 1
        prefixes.append((start, bits - size))
        start += 1 << size
    return prefixes


def collapse(cidrs: Iterable[str]) -> dict[int, list[tuple[int, int]]]:
    """Merged, sorted (network, prefixlen) per family, as ipaddress.collapse_addresses would give."""
    ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for text in cidrs:
        family, value, prefixlen = parse(text)
        ranges[family].append((value, value + (1 << (_BITS[family] - prefixlen)) - 1))
    result: dict[int, list[tuple[int, int]]] = {}
    for family, spans in ranges.items():
        if not spans:
            continue
        spans.sort()
        result[family] = [p for start, end in _merge(spans) for p in _ranges_to_prefixes(family, start, end)]
    return result


def collapse_to_elements(cidrs: Iterable[str]) -> dict[int, list[str]]:
    return {family: [element_text(family, v, n) for v, n in prefixes] for family, prefixes in collapse(cidrs).items()}


# ----------------------------------------------------------- incremental collapse
class _Span(Generic[_T]):
    """collapse() of one family, kept so that adding or removing a few inputs costs about that.

    inputs: every input range (start, end), sorted. merged: the union as disjoint,
    non-adjacent ranges, sorted (starts and ends in two lists, for bisect). items:
    for each merged range, its maximal aligned blocks converted by `convert`;
    the result is their concatenation, so unchanged blocks keep their objects.
    """

    def __init__(self, family: int, ranges: list[tuple[int, int]], convert: Callable[[int, int, int], _T]) -> None:
        self.family = family
        self.convert = convert
        self.inputs = sorted(ranges)
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.items: list[list[_T]] = []
        for start, end in _merge(self.inputs):
            self.starts.append(start)
            self.ends.append(end)
            self.items.append(self._blocks(start, end))

    def _blocks(self, start: int, end: int) -> list[_T]:
        family, convert = self.family, self.convert
        return [convert(family, v, n) for v, n in _ranges_to_prefixes(family, start, end)]

    def _replace(self, lo: int, hi: int, ranges: list[tuple[int, int]]) -> None:
        self.starts[lo:hi] = [s for s, _ in ranges]
        self.ends[lo:hi] = [e for _, e in ranges]
        self.items[lo:hi] = [self._blocks(s, e) for s, e in ranges]

    def add(self, start: int, end: int) -> None:
        self.inputs.insert(bisect_left(self.inputs, (start, end)), (start, end))
        # merged ranges that overlap [start, end] or touch it: a contiguous run ending before `hi`
        hi = bisect_right(self.starts, end + 1)
        lo = hi
        while lo > 0 and self.ends[lo - 1] >= start - 1:
            lo -= 1
        if lo < hi:
            start, end = min(start, self.starts[lo]), max(end, self.ends[hi - 1])
        self._replace(lo, hi, [(start, end)])

    def remove(self, start: int, end: int) -> None:
        del self.inputs[bisect_left(self.inputs, (start, end))]
        # only the merged range that held it changes: merge again the inputs inside it
        at = bisect_right(self.starts, start) - 1
        low, high = self.starts[at], self.ends[at]
        inside = self.inputs[bisect_left(self.inputs, (low, -1)):bisect_right(self.inputs, (high, 1 << 129))]
        self._replace(at, at + 1, _merge(inside))

    def result(self) -> list[_T]:
        return list(chain.from_iterable(self.items))


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ranges to their union as disjoint, non-adjacent ranges."""
    merged: list[list[int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _range_of(text: str) -> tuple[int, int, int]:
    family, value, prefixlen = parse(text)
    return family, value, value + (1 << (_BITS[family] - prefixlen)) - 1


class IncrementalCollapse(Generic[_T]):
    """collapse() of a list that changes a little between calls (a daemon re-reading a blocklist).

    Each call diffs the texts against the previous call's (set operations, in C)
    and updates only the merged ranges the difference touches; a large
    difference rebuilds. The result equals collapse() (a test checks), with the
    blocks converted by `convert(family, network, prefixlen)`, each converted
    object reused for as long as its block stays.
    """

    def __init__(self, convert: Callable[[int, int, int], _T]) -> None:
        self.convert = convert
        self.texts: frozenset[str] = frozenset()
        self.count: dict[tuple[int, int, int], int] = {}
        self.spans: dict[int, _Span[_T]] = {}
        self._rebuild(frozenset())

    def __call__(self, texts: Iterable[str]) -> dict[int, list[_T]]:
        new = frozenset(texts)
        added, removed = new - self.texts, self.texts - new
        if len(added) + len(removed) > 64 + len(new) // 16:
            self._rebuild(new)
        else:
            try:
                for text in removed:
                    self._remove(text)
                for text in added:
                    self._add(text)
            except ValueError:
                self._rebuild(frozenset())  # a bad text: start clean next time, and say so now
                raise
            self.texts = new
        return {family: span.result() for family, span in sorted(self.spans.items()) if span.starts}

    def _rebuild(self, texts: frozenset[str]) -> None:
        self.texts = frozenset()
        count: dict[tuple[int, int, int], int] = {}
        for text in texts:
            key = _range_of(text)
            count[key] = count.get(key, 0) + 1
        by_family: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for family, start, end in count:
            by_family[family].append((start, end))
        self.spans = {family: _Span(family, ranges, self.convert) for family, ranges in by_family.items()}
        self.count, self.texts = count, texts

    def _add(self, text: str) -> None:
        key = _range_of(text)
        self.count[key] = self.count.get(key, 0) + 1
        if self.count[key] == 1:
            self.spans[key[0]].add(key[1], key[2])

    def _remove(self, text: str) -> None:
        key = _range_of(text)
        self.count[key] -= 1
        if not self.count[key]:
            del self.count[key]
            self.spans[key[0]].remove(key[1], key[2])


_COLLAPSERS: dict[Hashable, IncrementalCollapse[object]] = {}


def collapse_in(slot: Hashable, texts: Iterable[str], convert: Callable[[int, int, int], _T]) -> dict[int, list[_T]]:
    """collapse() converted by `convert`, kept per `slot` (say, one rule's destinations) so that the next
    call for the same slot costs about what changed. Equal to the stateless result for any input."""
    key = (slot, convert)
    collapser = _COLLAPSERS.get(key)
    if collapser is None:
        if len(_COLLAPSERS) >= 1024:
            _COLLAPSERS.clear()
        collapser = _COLLAPSERS[key] = IncrementalCollapse(convert)
    return collapser(texts)  # type: ignore[return-value]
