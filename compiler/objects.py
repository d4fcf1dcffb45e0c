"""Kernel objects: what the compiler wants and what the reconciler observes.

Desired and observed state are made of the same frozen dataclasses, so a diff
is plain equality. Fields that are not kernel state (where an object came from
in the intent, readable text, counters) are excluded from comparison. Every
object has a stable ObjectKey, unique within one intent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Union

# kernform's own routing protocol number (see /etc/iproute2/rt_protos): the
# kernel stores it on every ip rule and route we create, and it is how a fresh
# process tells our rules and routes from everyone else's.
RTPROT_KERNFORM = 158

NFT_TABLE_PREFIX = "kernform-"
NFT_FAMILY = "inet"
# Set in our nft table listing the routing tables this intent owns; the kernel
# keeps it, so a fresh process can sweep routes of tables that left the intent.
OWNED_TABLES_SET = "owned_routing_tables"


def nft_table_name(intent_name: str) -> str:
    return NFT_TABLE_PREFIX + intent_name


def digest(text: str) -> str:
    """Short content hash kept in nft comments: it says whether a rule or set is the one we meant."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, order=True)
class ObjectKey:
    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(frozen=True)
class NftTable:
    kind: ClassVar[str] = "nft.table"
    name: str
    origin: str = field(default="", compare=False)

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.name)

    def describe(self) -> str:
        return f"table {NFT_FAMILY} {self.name}"


@dataclass(frozen=True)
class NftCounter:
    """A named counter; rules reference it, so rewriting a chain keeps the counts."""

    kind: ClassVar[str] = "nft.counter"
    table: str
    name: str
    origin: str = field(default="", compare=False)
    packets: int = field(default=0, compare=False)
    bytes: int = field(default=0, compare=False)

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.name)

    def describe(self) -> str:
        return f"counter {self.name}"


@dataclass(frozen=True)
class NftSet:
    """A named set or map. `declaration` is its nft body; the kernel keeps `digest(declaration)` as the comment."""

    kind: ClassVar[str] = "nft.set"
    table: str
    name: str
    digest: str
    is_map: bool = False
    declaration: str = field(default="", compare=False)
    origin: str = field(default="", compare=False)

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.name)

    def describe(self) -> str:
        word = "map" if self.is_map else "set"
        return f"{word} {self.name} {{ {self.declaration} }}" if self.declaration else f"{word} {self.name}"


@dataclass(frozen=True)
class NftElement:
    """One element of a named set (value None) or map. Keys and values are in nft's canonical text."""

    kind: ClassVar[str] = "nft.element"
    table: str
    set: str
    element: str
    value: str | None = None
    origin: str = field(default="", compare=False)

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, f"{self.set} {self.element}")

    def describe(self) -> str:
        text = self.element if self.value is None else f"{self.element} : {self.value}"
        return f"element {self.set} {text}"


@dataclass(frozen=True)
class NftChain:
    kind: ClassVar[str] = "nft.chain"
    table: str
    name: str
    type: str
    hook: str
    priority: int
    policy: str = "accept"
    origin: str = field(default="", compare=False)

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.name)

    def declaration(self) -> str:
        return f"type {self.type} hook {self.hook} priority {self.priority}; policy {self.policy};"

    def describe(self) -> str:
        return f"chain {self.name} {{ {self.declaration()} }}"


@dataclass(frozen=True)
class NftRule:
    """A rule at `index` in its chain. The kernel keeps `kf:<rule_id>:<digest>` as its comment."""

    kind: ClassVar[str] = "nft.rule"
    table: str
    chain: str
    rule_id: str
    index: int
    digest: str
    text: str = field(default="", compare=False)
    sets: tuple[str, ...] = field(default=(), compare=False)
    origin: str = field(default="", compare=False)

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, f"{self.chain}/{self.rule_id}")

    def comment(self) -> str:
        return f"kf:{self.rule_id}:{self.digest}"

    def describe(self) -> str:
        body = self.text or f"(digest {self.digest})"
        return f"rule {self.chain}[{self.index}] {body}"


@dataclass(frozen=True)
class Nexthop:
    gateway: str | None
    dev: str | None
    weight: int = 1

    def describe(self) -> str:
        parts = [f"via {self.gateway}" if self.gateway else "", f"dev {self.dev}" if self.dev else ""]
        return " ".join(p for p in parts if p) + (f" weight {self.weight}" if self.weight != 1 else "")


@dataclass(frozen=True)
class IpRoute:
    """A route in a table we own, tagged with protocol RTPROT_KERNFORM."""

    kind: ClassVar[str] = "ip.route"
    family: int
    table: int
    destination: str
    metric: int = 0
    type: str = "unicast"
    nexthops: tuple[Nexthop, ...] = ()
    origin: str = field(default="", compare=False)

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, f"table {self.table} {self.destination} metric {self.metric}")

    def describe(self) -> str:
        words = [] if self.type == "unicast" else [self.type]
        words += [self.destination]
        if len(self.nexthops) == 1:
            words.append(self.nexthops[0].describe())
        else:
            words += [f"nexthop {nh.describe()}" for nh in self.nexthops]
        if self.metric:
            words.append(f"metric {self.metric}")
        words.append(f"table {self.table}")
        return "route " + " ".join(words)


@dataclass(frozen=True)
class IpRule:
    """A policy routing rule, tagged with protocol RTPROT_KERNFORM. Its key is its whole selector."""

    kind: ClassVar[str] = "ip.rule"
    family: int
    priority: int
    table: int
    source: str | None = None
    destination: str | None = None
    fwmark: int | None = None
    fwmask: int | None = None
    iif: str | None = None
    oif: str | None = None
    ip_proto: int | None = None
    sport: tuple[int, int] | None = None
    dport: tuple[int, int] | None = None
    uid_range: tuple[int, int] | None = None
    origin: str = field(default="", compare=False)

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.describe())

    def describe(self) -> str:
        words = [f"ipv{self.family}", f"priority {self.priority}"]
        if self.source:
            words.append(f"from {self.source}")
        if self.destination:
            words.append(f"to {self.destination}")
        if self.fwmark is not None:
            words.append(f"fwmark {self.fwmark:#x}/{(self.fwmask or 0xFFFFFFFF):#x}")
        if self.iif:
            words.append(f"iif {self.iif}")
        if self.oif:
            words.append(f"oif {self.oif}")
        if self.ip_proto is not None:
            words.append(f"ipproto {_PROTO_NAMES.get(self.ip_proto, self.ip_proto)}")
        for label, span in (("sport", self.sport), ("dport", self.dport), ("uidrange", self.uid_range)):
            if span:
                words.append(
                    f"{label} {span[0]}"
                    if span[0] == span[1] and label != "uidrange"
                    else f"{label} {span[0]}-{span[1]}"
                )
        words.append(f"lookup {self.table}")
        return "rule " + " ".join(words)


_PROTO_NAMES = {6: "tcp", 17: "udp"}

KernelObject = Union[NftTable, NftCounter, NftSet, NftElement, NftChain, NftRule, IpRoute, IpRule]

# Creation order; removal runs backwards. Rules come after the sets and
# counters they reference; ip rules after the routes they select.
KIND_ORDER: tuple[str, ...] = (
    NftTable.kind,
    NftCounter.kind,
    NftSet.kind,
    NftElement.kind,
    NftChain.kind,
    NftRule.kind,
    IpRoute.kind,
    IpRule.kind,
)
NFT_KINDS = frozenset(k for k in KIND_ORDER if k.startswith("nft."))
NETLINK_KINDS = frozenset(k for k in KIND_ORDER if k.startswith("ip."))


@dataclass(frozen=True)
class DesiredState:
    """What one intent wants in the kernel, as compiled for one backend."""

    intent: str
    backend: str
    objects: tuple[KernelObject, ...]
    routing_tables: frozenset[int] = frozenset()

    def by_key(self) -> dict[ObjectKey, KernelObject]:
        return index_by_key(self.objects)

    def of_kind(self, kind: str) -> Iterator[KernelObject]:
        return (o for o in self.objects if o.kind == kind)


def index_by_key(objects: Iterable[KernelObject]) -> dict[ObjectKey, KernelObject]:
    result: dict[ObjectKey, KernelObject] = {}
    for obj in objects:
        if obj.key in result:
            from .errors import InternalError

            raise InternalError(f"two kernel objects share the key {obj.key}")
        result[obj.key] = obj
    return result


def count_by_kind(objects: Iterable[KernelObject]) -> Mapping[str, int]:
    counts: dict[str, int] = {}
    for obj in objects:
        counts[obj.kind] = counts.get(obj.kind, 0) + 1
    return counts
