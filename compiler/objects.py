"""Kernel objects: what the compiler wants and what the reconciler observes.

Desired and observed state are made of the same frozen dataclasses, so a diff
is plain equality. Fields that are not kernel state (where an object came from
in the intent, readable text, counters) are excluded from comparison. Every
object has a stable ObjectKey, unique within one intent.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, TypeVar

# kernform's own routing protocol number (see /etc/iproute2/rt_protos): the
# kernel stores it on every ip rule and route we create, and it is how a fresh
# process tells our rules and routes from everyone else's.
RTPROT_KERNFORM = 158

NFT_TABLE_PREFIX = "kernform-"
NFT_FAMILY = "inet"
# Set in our nft table listing the routing tables this intent owns; the kernel
# keeps it, so a fresh process can sweep routes of tables that left the intent.
OWNED_TABLES_SET = "owned_routing_tables"
# The VIPs an intent balances, recorded in its nft table for other intents' conflict checks (reconciler.applied).
VIP_SETS = {4: ("claimed_vips4", "typeof ip daddr . meta l4proto . th dport;"),
            6: ("claimed_vips6", "typeof ip6 daddr . meta l4proto . th dport;")}
_T = TypeVar("_T")


def nft_table_name(intent_name: str) -> str:
    return NFT_TABLE_PREFIX + intent_name


def digest(text: str) -> str:
    """Short content hash kept in nft comments: it says whether a rule or set is the one we meant."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _computed_once:  # noqa: N801 - used like functools.cached_property
    """functools.cached_property without its lock (Python 3.11 takes one on every first access, which
    costs more than the key itself when a diff indexes tens of thousands of objects)."""

    def __init__(self, method: Callable[[Any], Any]) -> None:
        self.method = method
        self.name = method.__name__
        self.__doc__ = method.__doc__

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.method(obj)
        return value


_RECENT: list[dict[tuple[Any, ...], Any]] = [{}, {}]
_KEY_OF = operator.attrgetter("key")


def begin_compile() -> None:
    """Start a compile: objects made by the one before it stay shareable (see `shared`), older ones go."""
    _RECENT[:] = [{}, _RECENT[0]]


def shared(cls: type[_T], *fields: Any) -> _T:
    """`cls(*fields)`, or the equal object an earlier compile made.

    Successive compiles of a slightly changed intent then hand out the very same
    objects for everything unchanged, and a diff settles those by identity
    (reconciler.plan.diff) instead of comparing tens of thousands of fields.
    """
    key = (cls, *fields)
    current, previous = _RECENT
    obj = current.get(key)
    if obj is None:
        obj = previous.get(key)
        if obj is None:
            obj = cls(*fields)
        current[key] = obj
    return obj


def shared_each(cls: type[_T], head: tuple[Any, ...], values: Sequence[Any], tail: tuple[Any, ...]) -> list[_T]:
    """`[shared(cls, *head, v, *tail) for v in values]`, at the cost of a dict lookup (in C) per value
    seen by this compile or the one before: a 10,000-element set whose one element changed."""
    key = (shared_each, cls, head, tail)
    current, previous = _RECENT
    made = current.get(key)
    if made is None:
        made = previous.get(key)
        if made is None or len(made) > 2 * len(values) + 1024:
            # start afresh, keeping what is still in use (objects leave with the elements that left)
            made = {v: made[v] for v in values if v in made} if made else {}
        current[key] = made
    for value in set(values).difference(made):
        made[value] = cls(*head, value, *tail)  # type: ignore[call-arg]
    return list(map(made.__getitem__, values))


def remembered(key: tuple[Any, ...], make: Callable[[], _T]) -> _T:
    """`make()`, or what it returned for the same `key` in this compile or the one before (see `shared`).
    The key must name every input of `make`."""
    current, previous = _RECENT
    if key in current:
        return current[key]
    value = previous[key] if key in previous else make()
    current[key] = value
    return value


class ObjectKey(NamedTuple):
    """(kind, name). A tuple of two strings, so hashing and comparing keys, which a
    diff of tens of thousands of map entries does for each one, runs in C."""

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(frozen=True)
class NftTable:
    kind: ClassVar[str] = "nft.table"
    name: str
    origin: str = field(default="", compare=False)

    @_computed_once
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

    @_computed_once
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

    @_computed_once
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

    @_computed_once
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

    @_computed_once
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.name)

    def declaration(self) -> str:
        """The part between the braces of `add chain`; empty for a regular chain (no hook)."""
        if not self.hook:
            return ""
        return f"type {self.type} hook {self.hook} priority {self.priority}; policy {self.policy};"

    def describe(self) -> str:
        return f"chain {self.name} {{ {self.declaration()} }}" if self.hook else f"chain {self.name}"


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

    @_computed_once
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

    @_computed_once
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

    @_computed_once
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

@dataclass(frozen=True)
class BpfProgram:
    """One BPF object file compiled with its settings, its functions attached at their points.

    `name` is the attachment's identity within the intent and its pin directory
    (/sys/fs/bpf/kernform/<intent>/<name>/). `attachments` pairs each function
    with where it is attached: "tc:<ifname>:ingress", "tc:<ifname>:egress",
    "netns:sk_lookup", or "cgroup:<path below the cgroup2 mount>:<attach type>"
    (connect4, connect6, sendmsg4, sendmsg6, recvmsg4, recvmsg6, sock_ops,
    getsockopt). `digest` covers the sources, the settings and the attachments:
    a program whose digest is unchanged is never compiled or reloaded again.
    """

    kind: ClassVar[str] = "bpf.program"
    name: str
    source: str
    attachments: tuple[tuple[str, str], ...]
    cflags: tuple[str, ...]
    digest: str
    origin: str = field(default="", compare=False)

    @_computed_once
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.name)

    def describe(self) -> str:
        points = ", ".join(f"{fn} at {point}" for fn, point in self.attachments)
        return f"program {self.name} ({self.source}: {points}) [{self.digest}]"


@dataclass(frozen=True)
class BpfMapEntry:
    """One entry of a configuration map of a program (counters and runtime state are not entries).

    Keys and values are the exact bytes the kernel holds, as hex. For array
    maps an all-zero value means "no entry": it is never desired and never observed.
    `label` is readable text (compiler.bpf_layout decodes it from the bytes).
    """

    kind: ClassVar[str] = "bpf.entry"
    program: str
    map: str
    key_hex: str
    value_hex: str
    label: str = field(default="", compare=False)
    origin: str = field(default="", compare=False)

    @_computed_once
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, f"{self.program}/{self.map} {self.key_hex}")

    def readable(self) -> str:
        """The entry as text: `label`, or decoded from the bytes when it was not given."""
        if self.label:
            return self.label
        from .bpf_layout import label as decode

        return decode("", self.map, bytes.fromhex(self.key_hex), bytes.fromhex(self.value_hex))

    def describe(self) -> str:
        return f"map {self.program}/{self.map} {self.readable()}"


@dataclass(frozen=True)
class BpfLeftover:
    """Something of an intent's BPF state that no program of it accounts for: what an interrupted apply or
    destroy left behind (`what`: "pin directory", "clsact marker" or "cgroup", at `path`). Never desired,
    only observed: the plan removes it, so `destroy` after any interruption leaves nothing."""

    kind: ClassVar[str] = "bpf.leftover"
    what: str
    path: str
    origin: str = field(default="left by an interrupted run", compare=False)

    @_computed_once
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.path)

    def describe(self) -> str:
        return f"{self.what} {self.path}"


KernelObject = (NftTable | NftCounter | NftSet | NftElement | NftChain | NftRule | IpRoute | IpRule | BpfProgram
                | BpfMapEntry | BpfLeftover)

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
    BpfProgram.kind,
    BpfMapEntry.kind,
    BpfLeftover.kind,
)
NFT_KINDS = frozenset(k for k in KIND_ORDER if k.startswith("nft."))
NETLINK_KINDS = frozenset(k for k in KIND_ORDER if k.startswith("ip."))
BPF_KINDS = frozenset(k for k in KIND_ORDER if k.startswith("bpf."))
BPF_PIN_ROOT = "/sys/fs/bpf/kernform"


@dataclass(frozen=True)
class DesiredState:
    """What one intent wants in the kernel, as compiled for one backend."""

    intent: str
    backend: str
    objects: tuple[KernelObject, ...]
    routing_tables: frozenset[int] = frozenset()

    def by_key(self) -> dict[ObjectKey, KernelObject]:
        """The objects by key, computed once: a daemon diffs the same desired state on every pass."""
        return self._index

    @functools.cached_property
    def _index(self) -> dict[ObjectKey, KernelObject]:
        return index_by_key(self.objects)

    def of_kind(self, kind: str) -> Iterator[KernelObject]:
        return (o for o in self.objects if o.kind == kind)


def index_by_key(objects: Iterable[KernelObject]) -> dict[ObjectKey, KernelObject]:
    objects = tuple(objects)
    # Built by C iteration (keys of shared objects are computed already); the loop below only
    # runs to name the duplicate when there is one.
    index: dict[ObjectKey, KernelObject] = dict(zip(map(_KEY_OF, objects), objects, strict=True))
    if len(index) == len(objects):
        return index
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


# ------------------------------------------------ canonical routes and rules
# The kernel reports routes and rules in one normal form; the compiler must
# build them in the same form, or the diff would never be empty. These pure
# functions are that form, and the netlink driver builds its observed objects
# through them too, so both sides agree by construction. They raise ValueError
# for objects the kernel cannot hold or would report differently (the compiler
# turns that into an IntentError at the offending line).

ROUTE_TYPES: tuple[str, ...] = ("unicast", "local", "blackhole", "unreachable", "prohibit", "throw")
# Types with no next hop at all (IPv6 reports `dev lo` for them; it is noise). `throw` ends the
# lookup in this table so the next rule is tried.
REJECT_ROUTE_TYPES = frozenset({"blackhole", "unreachable", "prohibit", "throw"})
# IPv6 has no metric 0: the kernel stores a route asked with metric 0 as 1024 (IP6_RT_PRIO_USER).
IPV6_DEFAULT_METRIC = 1024
U32_MAX = 0xFFFFFFFF


def _check_family(family: int) -> None:
    if family not in (4, 6):
        raise ValueError(f"address family must be 4 or 6, not {family!r}")


def canonical_prefix(family: int, text: str) -> str:
    """`text` as the kernel reports it: network address with its length ("10.1.0.0/16", "::/0").

    Host bits must be zero: the kernel refuses them in routes and keeps them
    verbatim in rules, so accepting them here would only hide a typo.
    """
    _check_family(family)
    network = ipaddress.ip_network(text, strict=True)
    if network.version != family:
        raise ValueError(f"{text} is not an IPv{family} prefix")
    return network.with_prefixlen


def canonical_address(family: int, text: str) -> str:
    """An address in the text ipaddress prints ("fd00::1", never "fd00:0::1")."""
    _check_family(family)
    address = ipaddress.ip_address(text)
    if address.version != family:
        raise ValueError(f"{text} is not an IPv{family} address")
    return str(address)


def canonical_metric(family: int, metric: int) -> int:
    """The metric the kernel will report: IPv6 turns 0 into 1024, IPv4 keeps 0 ("no metric")."""
    _check_family(family)
    if not 0 <= metric <= U32_MAX:
        raise ValueError(f"metric {metric} is out of range 0..{U32_MAX}")
    return IPV6_DEFAULT_METRIC if family == 6 and metric == 0 else metric


def _nexthop_order(hop: Nexthop) -> tuple[str, str, int]:
    return (hop.gateway or "", hop.dev or "", hop.weight)


def canonical_nexthops(nexthops: Iterable[Nexthop]) -> tuple[Nexthop, ...]:
    """Next hops in kernform's canonical order: sorted by (gateway text, dev, weight).

    The kernel keeps multipath next hops in the order they were given, but
    that order carries no meaning kernform models, and IPv6 rebuilds it from
    sibling routes; sorting on both sides makes the comparison order-free.
    A single next hop always has weight 1: the kernel keeps no weight for a
    route with one path, so none can be read back.
    """
    hops = [
        Nexthop(None if hop.gateway is None else str(ipaddress.ip_address(hop.gateway)), hop.dev or None,
                hop.weight)
        for hop in nexthops
    ]
    if len(hops) == 1:
        hops[0] = Nexthop(hops[0].gateway, hops[0].dev, 1)
    return tuple(sorted(hops, key=_nexthop_order))


def ip_route(
    family: int,
    table: int,
    destination: str,
    *,
    metric: int = 0,
    type: str = "unicast",
    nexthops: Iterable[Nexthop] = (),
    origin: str = "",
) -> IpRoute:
    """A route in canonical form, equal to what the netlink driver observes once it is in the kernel.

    - `destination`: prefix text ("0.0.0.0/0", "::/0", "fd70:1::/64").
    - `metric`: as reported; IPv6 metric 0 becomes 1024 (see canonical_metric).
    - `nexthops` by type:
      * unicast: one or more; every next hop names its `dev`, because the
        kernel always reports the device it resolved, so a hop without one
        could never compare equal. IPv6 multipath hops need a gateway (the
        kernel only merges gateway routes into one multipath route). Weights
        1..256 (a single hop: weight 1, see canonical_nexthops).
      * local: exactly one hop with a dev and no gateway (`local 0.0.0.0/0 dev lo`).
      * blackhole / unreachable / prohibit: none, `()`.
    """
    _check_family(family)
    if type not in ROUTE_TYPES:
        raise ValueError(f"route type {type!r} is not one of {', '.join(ROUTE_TYPES)}")
    if not 1 <= table <= U32_MAX or table in (253, 254, 255):
        raise ValueError(f"table {table} is not a table kernform may own (1..{U32_MAX}, not 253-255)")
    prefix = canonical_prefix(family, destination)
    hops = canonical_nexthops(nexthops)
    for hop in hops:
        if hop.gateway is not None:
            canonical_address(family, hop.gateway)
        if not 1 <= hop.weight <= 256:
            raise ValueError(f"route {prefix}: next hop weight {hop.weight} is out of range 1..256")
    if type in REJECT_ROUTE_TYPES and hops:
        raise ValueError(f"{type} route {prefix} has no next hop")
    if type == "local" and (len(hops) != 1 or hops[0].dev is None or hops[0].gateway is not None):
        raise ValueError(f"local route {prefix} needs exactly one device and no gateway (e.g. dev lo)")
    if type == "unicast":
        if not hops:
            raise ValueError(f"route {prefix} needs a next hop (via and dev)")
        if any(hop.dev is None for hop in hops):
            raise ValueError(f"route {prefix}: every next hop must name its device (dev)")
        if family == 6 and len(hops) > 1 and any(hop.gateway is None for hop in hops):
            raise ValueError(f"IPv6 multipath route {prefix}: every next hop needs a gateway (via)")
    return IpRoute(family, table, prefix, canonical_metric(family, metric), type, hops, origin=origin)


def _port_range(label: str, span: tuple[int, int] | None, top: int) -> tuple[int, int] | None:
    if span is None:
        return None
    low, high = span
    if (label != "uid_range" and (low, high) == (0, 0)) or (label == "uid_range" and (low, high) == (0, top)):
        return None  # the kernel's "unset"
    if not 0 <= low <= high <= top or (label != "uid_range" and low == 0):
        raise ValueError(f"{label} {low}-{high} is not a range within {0 if label == 'uid_range' else 1}..{top}")
    return (low, high)


def ip_rule(
    family: int,
    priority: int,
    table: int,
    *,
    source: str | None = None,
    destination: str | None = None,
    fwmark: int | None = None,
    fwmask: int | None = None,
    iif: str | None = None,
    oif: str | None = None,
    ip_proto: int | None = None,
    sport: tuple[int, int] | None = None,
    dport: tuple[int, int] | None = None,
    uid_range: tuple[int, int] | None = None,
    origin: str = "",
) -> IpRule:
    """A rule (action: lookup `table`) in canonical form, equal to what the netlink driver observes.

    Unset selectors are None, including the ones the kernel treats as unset:
    a /0 source or destination, fwmark 0 with mask 0, ip_proto 0, port range
    0-0, uid range 0-4294967295. A fwmark without a mask gets mask 0xffffffff
    (as the kernel does); a mask without a mark means mark 0 under that mask.
    """
    _check_family(family)
    if not 0 <= priority <= U32_MAX:
        raise ValueError(f"rule priority {priority} is out of range")
    if not 1 <= table <= U32_MAX:
        raise ValueError(f"rule table {table} is out of range")
    src = canonical_prefix(family, source) if source else None
    dst = canonical_prefix(family, destination) if destination else None
    src = None if src is not None and src.endswith("/0") else src
    dst = None if dst is not None and dst.endswith("/0") else dst
    mark, mask = fwmark or 0, fwmask if fwmask is not None else (U32_MAX if fwmark else 0)
    if not (0 <= mark <= U32_MAX and 0 <= mask <= U32_MAX):
        raise ValueError(f"fwmark {mark:#x}/{mask:#x} is out of range")
    return IpRule(
        family,
        priority,
        table,
        source=src,
        destination=dst,
        fwmark=mark if (mark or mask) else None,
        fwmask=mask if (mark or mask) else None,
        iif=iif or None,
        oif=oif or None,
        ip_proto=ip_proto or None,
        sport=_port_range("sport", sport, 0xFFFF),
        dport=_port_range("dport", dport, 0xFFFF),
        uid_range=_port_range("uid_range", uid_range, U32_MAX),
        origin=origin,
    )
