"""Fast CIDR handling for big lists: validation, canonical text, collapsing.

The ipaddress module is exact but slow (tens of microseconds per network);
intents with 10,000 CIDRs are normal and a daemon re-reads them on every
save. Here prefixes are plain integers. Results are identical to
ipaddress.ip_network(strict=True) / collapse_addresses (a test checks),
and anything unusual falls back to ipaddress itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import NamedTuple

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


def parse(text: str) -> tuple[int, int, int]:
    """(family, network as int, prefix length); raises ValueError like ip_network(strict=True)."""
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
    family, value, prefixlen = parse(text)
    return f"{_address_text(family, value)}/{prefixlen}"


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
        merged: list[list[int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        result[family] = [p for start, end in merged for p in _ranges_to_prefixes(family, start, end)]
    return result


def collapse_to_elements(cidrs: Iterable[str]) -> dict[int, list[str]]:
    return {family: [element_text(family, v, n) for v, n in prefixes] for family, prefixes in collapse(cidrs).items()}
