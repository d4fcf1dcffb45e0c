"""Reading back the kernel state one intent owns.

A target is a network namespace (or the host's own) with its drivers opened
once; the daemon keeps one for its whole life. Observation reads only what is
ours: the intent's nft table, and the ip rules and routes with kernform's
protocol in the routing tables the intent owns (the ones it wants now plus the
ones its table records from earlier applies, so leftovers are swept).
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.objects import OWNED_TABLES_SET, KernelObject, NftElement, ObjectKey, index_by_key, nft_table_name

from .drivers.netlink import NetlinkDriver
from .drivers.nft import NftDriver, NftObservation


@dataclass(frozen=True)
class ObservedState:
    intent: str
    nft: NftObservation
    netlink: tuple[KernelObject, ...]
    routing_tables: frozenset[int]

    @property
    def objects(self) -> tuple[KernelObject, ...]:
        return self.nft.objects + self.netlink

    def by_key(self) -> dict[ObjectKey, KernelObject]:
        return index_by_key(self.objects)


class Target:
    """The kernel of one network namespace, reached through kernform's drivers."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self.nft = NftDriver(netns)
        self.netlink = NetlinkDriver(netns)

    @property
    def label(self) -> str:
        return f"netns {self.netns}" if self.netns else "host"

    def close(self) -> None:
        self.netlink.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def observe(self, intent: str, wanted_tables: frozenset[int] = frozenset()) -> ObservedState:
        nft = self.nft.observe(nft_table_name(intent))
        recorded = {
            int(o.element) for o in nft.objects if isinstance(o, NftElement) and o.set == OWNED_TABLES_SET
        }
        tables = frozenset(recorded | set(wanted_tables))
        netlink = tuple(self.netlink.observe(tables)) if tables else ()
        return ObservedState(intent, nft, netlink, tables)
