"""Reading back the kernel state one intent owns.

A target is a network namespace (or the host's own) with its drivers opened
once; the daemon keeps one for its whole life. Observation reads only what is
ours: the intent's nft table, and the ip rules and routes with kernform's
protocol in the routing tables the intent owns (the ones it wants now plus the
ones recorded from earlier applies, in its nft table and in reconciler.ownership's
file, so leftovers are swept).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from compiler.errors import KernelError
from compiler.objects import (
    KernelObject,
    ObjectKey,
    index_by_key,
    nft_table_name,
)

from . import ownership
from .drivers.netlink import NetlinkDriver
from .drivers.nft import NftDriver, NftObservation

if TYPE_CHECKING:
    from .drivers.bpf import BpfDriver


@dataclass(frozen=True)
class ObservedState:
    intent: str
    nft: NftObservation
    netlink: tuple[KernelObject, ...]
    routing_tables: frozenset[int]
    bpf: tuple[KernelObject, ...] = ()
    bpf_index: Mapping[ObjectKey, KernelObject] | None = None

    @property
    def objects(self) -> tuple[KernelObject, ...]:
        return self.nft.objects + self.netlink + self.bpf

    def by_key(self) -> dict[ObjectKey, KernelObject]:
        return self._index

    @functools.cached_property
    def _index(self) -> dict[ObjectKey, KernelObject]:
        # The nft part is indexed once per observation and kept by the driver with it.
        index = dict(self.nft.index)
        # Kinds differ between the parts, so their keys cannot collide.
        index.update(index_by_key(self.netlink))
        index.update(self.bpf_index if self.bpf_index is not None else index_by_key(self.bpf))
        return index


class Target:
    """The kernel of one network namespace, reached through kernform's drivers."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self.nft = NftDriver(netns)
        self.netlink = NetlinkDriver(netns)
        self._bpf: BpfDriver | None = None

    @property
    def bpf(self) -> BpfDriver:
        """The BPF driver, opened on first use: bcc is slow to import and tproxy-only hosts never need it."""
        if self._bpf is None:
            from .drivers.bpf import BpfDriver

            self._bpf = BpfDriver(self.netns)
        return self._bpf

    def has_bpf_state(self, intent: str) -> bool:
        """Whether the intent has BPF pins, or its cgroup, for this namespace (checked without importing bcc)."""
        from compiler.allocation import default_cgroup

        from .drivers.bpf import cgroup2_root, intent_pin_dir

        if intent_pin_dir(intent, self.netns).is_dir():
            return True
        try:
            return (cgroup2_root() / default_cgroup(intent, self.netns)).is_dir()
        except KernelError:
            return False  # no cgroup2: no cgroup of ours either

    @property
    def label(self) -> str:
        return f"netns {self.netns}" if self.netns else "host"

    def forget(self) -> None:
        """Read everything from the kernel on the next observe, trusting nothing kept from earlier passes."""
        self.nft.forget()
        if self._bpf is not None:
            self._bpf.forget()

    def adopt(self, desired: Mapping[ObjectKey, KernelObject]) -> None:
        """The kernel was just verified to hold `desired` (see NftDriver.adopt)."""
        self.nft.adopt(desired)
        if self._bpf is not None:
            self._bpf.adopt(desired)

    def close(self) -> None:
        self.nft.close()
        self.netlink.close()
        if self._bpf is not None:
            self._bpf.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def observe(self, intent: str, wanted_tables: frozenset[int] = frozenset(), bpf: bool = False) -> ObservedState:
        """What `intent` owns in this namespace; BPF state is read when `bpf` or when the intent has pins."""
        nft = self.nft.observe(nft_table_name(intent))
        # Both records of the intent's routing tables: the nft set, and the file that survives a flushed
        # ruleset or a run killed before its nft transaction (reconciler.ownership).
        tables = nft.owned_tables | wanted_tables | ownership.recorded_tables(self.netns, intent)
        netlink = tuple(self.netlink.observe(tables)) if tables else ()
        bpf_index = self.bpf.observe_index(intent) if bpf or self.has_bpf_state(intent) else {}
        return ObservedState(intent, nft, netlink, tables, tuple(bpf_index.values()), bpf_index)
