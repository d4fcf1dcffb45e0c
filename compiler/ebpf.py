"""Lowering an intent for the `ebpf` backend: BPF programs from bpf/ and the contents of their maps.

Configuration is data: the programs are compiled once per (source, settings)
and every CIDR, backend, weight or port is a map entry, so changing them is a
map update. What goes where:

- filtering: one tc program (bpf/tc_filter.c) per interface, clsact ingress
  for input/forward rules and egress for output rules; ordered rule
  descriptors, LPM tries of prefixes holding rule bitmaps, per-rule counters.
- inbound interception: the netns-wide sk_lookup program (bpf/sk_lookup.c)
  hands a matching connection to the proxy's listening socket (a sockmap
  slot); policy routing (`iif ... lookup T`, `local <destination> dev lo` in T)
  delivers the intercepted destinations locally in the first place.
- load balancing and outbound interception: cgroup programs
  (bpf/sock_connect.c) rewrite connect()/sendmsg() destinations at the socket
  for processes in the intent's cgroup; the proxy learns the original
  destination with getsockopt(SO_ORIGINAL_DST). Connections from other hosts
  are balanced by tc programs (bpf/tc_lb.c) on loadBalancing.interfaces:
  DNAT at ingress from the same service and backend maps, reverse at egress.
- routing: the same ip rules and routes as the tproxy backend.

Differences from tproxy that a user can observe are refused, never silently
approximated: ebpf_refusals lists them all, each at its field of the intent,
and compile_intent raises BackendUnavailable with every one before lowering.
"""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import struct
import zlib
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from pathlib import Path

from . import bpf_layout as L
from . import maglev
from .allocation import default_cgroup
from .cidr import Prefix, collapse_in, collapsed_prefixes
from .ebpf_refusals import refusals
from .errors import BackendUnavailable
from .intent import EbpfLimits, FilterChain, FilterRule, InterceptionRule, NetworkIntent, Service, parse_port_range
from .objects import (
    OWNED_TABLES_SET,
    BpfMapEntry,
    BpfProgram,
    DesiredState,
    KernelObject,
    Nexthop,
    NftElement,
    NftSet,
    NftTable,
    digest,
    ip_route,
    ip_rule,
    nft_table_name,
    remembered,
    shared,
)
from .routing import lower_routing

BACKEND = "ebpf"
BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
FULL_PORTS = (0, 65535)
_PROTO = {"tcp": 6, "udp": 17}
Network = Prefix


def source_digest(source: str, cflags: Sequence[str], attachments: Sequence[tuple[str, str]]) -> str:
    """Identity of a compiled program: its source file, every shared header, its settings and attach points."""
    h = hashlib.sha256()
    for path in [BPF_DIR / source, *sorted((BPF_DIR / "lib").glob("*.h"))]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(repr((tuple(cflags), tuple(attachments))).encode())
    return h.hexdigest()[:16]


def max_rules_setting(limits: EbpfLimits, count: int, what: str) -> int:
    """KF_MAX_RULES: spec.ebpf.limits.rules, whatever the intent holds (ebpf_refusals refuses more)."""
    if count > limits.rules:
        raise BackendUnavailable(f"{what} needs {count} rule descriptors; spec.ebpf.limits.rules is {limits.rules}")
    return limits.rules


def _settings(limits: EbpfLimits, *names: str) -> list[str]:
    """The -D settings of a program: its limits, never a size of the intent, so that growth within them
    changes map entries only (the program's digest, and so its id and attachments, stay)."""
    values = {
        "KF_MAX_RULES": limits.rules,
        "KF_MAX_PREFIXES": limits.prefixes,
        "KF_MAX_PROXIES": limits.proxies,
        "KF_MAX_SERVICES": limits.services,
        "KF_MAX_BACKENDS": limits.backends,
        "KF_MAGLEV_CHUNKS": maglev_chunks_limit(limits),
    }
    return [f"-D{name}={values[name]}" for name in names]


def maglev_chunks_limit(limits: EbpfLimits) -> int:
    """Entries of the maglev hash: a service of n backends takes at most 1 + n / 6 chunks
    (maglev.table_size gives about 20 to 40 slots per backend, in chunks of bpf_layout.MAGLEV_CHUNK)."""
    return limits.services + 2 * limits.backends // 6 + 1


def lpm_values(prefix_bits: dict[Network, int]) -> dict[Network, int]:
    """Each prefix's bitmap ORed with those of every prefix containing it (an LPM lookup sees only the longest)."""
    lengths = sorted({n.prefixlen for n in prefix_bits})
    return {network: _lpm_value(network, prefix_bits, lengths) for network in prefix_bits}


def _lpm_value(network: Network, prefix_bits: dict[Network, int], lengths: list[int]) -> int:
    total = prefix_bits[network]
    for length in lengths:
        if length >= network.prefixlen:
            break
        total |= prefix_bits.get(network.supernet(length), 0)
    return total


def _any(family: int) -> Network:
    return Prefix(family, 0, 0)


def _port_ranges(ports: Sequence[int | str]) -> list[tuple[int, int]]:
    return [parse_port_range(p) for p in ports] or [FULL_PORTS]


@dataclass
class _Program:
    """Entries of one program being built."""

    name: str
    source: str
    origin: str
    entries: list[BpfMapEntry] = field(default_factory=list)

    def entry(self, map_name: str, key: bytes, value: bytes, origin: str) -> None:
        # No label: describe() decodes one only for the entries that get printed.
        self.entries.append(shared(BpfMapEntry, self.name, map_name, key.hex(), value.hex(), "", origin))

    def lpm(self, map_prefix: str, prefix_bits: dict[Network, int], words: int, origin: str) -> None:
        def make(network: Network, bits: int) -> BpfMapEntry:
            return shared(BpfMapEntry, self.name, f"{map_prefix}_v{network.version}", L.lpm_key(network).hex(),
                          L.bitmap(bits, words).hex(), "", origin)

        slot = (self.name, map_prefix, words, origin)
        table = _LPM_TABLES.get(slot)
        if table is None:
            if len(_LPM_TABLES) >= 256:
                _LPM_TABLES.clear()
            table = _LPM_TABLES[slot] = _LpmTable()
        self.entries += table.entries(prefix_bits, make)


class _LpmTable:
    """The entries of one LPM map pair (lpm_values of a prefix -> bitmap table), kept between compiles
    so that a few changed prefixes cost about that: a changed prefix changes its own entry and those of
    the prefixes inside it, nothing else. Equal to building them afresh (a test checks)."""

    def __init__(self) -> None:
        self.bits: dict[Network, int] = {}
        self.order: list[Network] = []  # sorted prefixes of `bits`
        self.lengths: dict[int, int] = {}  # prefix length -> how many prefixes have it
        self.made: dict[Network, BpfMapEntry] = {}

    def entries(self, prefix_bits: dict[Network, int],
                make: Callable[[Network, int], BpfMapEntry]) -> list[BpfMapEntry]:
        changed = {network for network, _ in prefix_bits.items() ^ self.bits.items()}
        if len(changed) > 64 + len(prefix_bits) // 16:
            self._rebuild(prefix_bits, make)
        else:
            self._update(prefix_bits, changed, make)
        return list(map(self.made.__getitem__, self.order))

    def _rebuild(self, prefix_bits: dict[Network, int], make: Callable[[Network, int], BpfMapEntry]) -> None:
        self.bits = dict(prefix_bits)
        self.order = sorted(prefix_bits)
        self.lengths = {}
        for network in self.order:
            self.lengths[network.prefixlen] = self.lengths.get(network.prefixlen, 0) + 1
        self.made = {network: make(network, value) for network, value in lpm_values(prefix_bits).items()}

    def _update(self, prefix_bits: dict[Network, int], changed: set[Network],
                make: Callable[[Network, int], BpfMapEntry]) -> None:
        for network in changed:
            if network not in prefix_bits:
                del self.order[bisect_right(self.order, network) - 1]
                self.lengths[network.prefixlen] -= 1
                del self.made[network]
            elif network not in self.bits:
                insort(self.order, network)
                self.lengths[network.prefixlen] = self.lengths.get(network.prefixlen, 0) + 1
        self.bits = dict(prefix_bits)
        lengths = sorted(length for length, count in self.lengths.items() if count)
        affected = set()
        for network in changed:
            affected.add(network)
            # the prefixes inside it follow it in sorted order
            last = network.value + (1 << (_BITS[network.version] - network.prefixlen)) - 1
            at = bisect_right(self.order, network)
            while at < len(self.order) and self.order[at].version == network.version \
                    and self.order[at].value <= last:
                affected.add(self.order[at])
                at += 1
        for network in affected:
            if network in prefix_bits:
                self.made[network] = make(network, _lpm_value(network, prefix_bits, lengths))


_LPM_TABLES: dict[tuple[str, str, int, str], _LpmTable] = {}
_BITS = {4: 32, 6: 128}


def _add_bits(table: dict[Network, int], networks: Iterable[Network], bit: int) -> None:
    for network in networks:
        table[network] = table.get(network, 0) | (1 << bit)


def _networks(cidrs: Sequence[str], slot: tuple[str, ...]) -> list[Network]:
    """Collapsed prefixes, IPv4 first; `slot` names the list so that a one-CIDR change costs about that."""
    if len(cidrs) < 64:
        return collapsed_prefixes(cidrs)
    by_family = collapse_in(("ebpf", *slot), cidrs, Prefix)
    return list(chain.from_iterable(by_family[family] for family in sorted(by_family)))


def _program(p: _Program, attachments: list[tuple[str, str]], cflags: list[str]) -> BpfProgram:
    attached = tuple(sorted(attachments))
    return BpfProgram(p.name, p.source, attached, tuple(cflags), source_digest(p.source, cflags, attached), p.origin)


def compile_intent(intent: NetworkIntent) -> DesiredState:
    refused = refusals(intent)
    if refused:
        raise BackendUnavailable(refused)
    name = intent.metadata.name
    programs: list[BpfProgram] = []
    entries: list[BpfMapEntry] = []
    routing: list[KernelObject] = list(lower_routing(intent))
    tables = _LbTables(intent.spec.load_balancing.services, intent.spec.ebpf.limits)
    for program, program_entries in (
        *_filtering(intent),
        *_inbound_interception(intent, routing),
        *_tc_balancing(intent, tables),
        *_socket_programs(intent, tables),
    ):
        programs.append(program)
        entries += program_entries
    owned = sorted({o.table for o in routing if hasattr(o, "table") and isinstance(o.table, int)}
                   | {t.id for t in intent.spec.routing.tables})
    # The nft table carries no chain here: it is only the kernel-held record of
    # the routing tables this intent owns (see OWNED_TABLES_SET).
    table = nft_table_name(name)
    decl = "type mark;"
    meta: list[KernelObject] = [NftTable(table, origin="intent"),
                                NftSet(table, OWNED_TABLES_SET, digest(decl), False, decl, "ownership record")]
    meta += [shared(NftElement, table, OWNED_TABLES_SET, str(t), None, "ownership record") for t in owned]
    objects: list[KernelObject] = [*meta, *routing, *programs, *entries]
    return DesiredState(name, BACKEND, tuple(objects), frozenset(owned))


def with_local_addresses(desired: DesiredState, addresses: Iterable[str]) -> DesiredState:
    """`desired` completed with the target namespace's own addresses, for the programs that must know
    them (outbound interception never captures a local destination: sock_connect's local_addrs).

    The addresses are a fact of the target, not of the intent, so the reconciler reads them and calls
    this before planning; the result is still a pure function of its inputs. Entries of an earlier
    completion are replaced."""
    wanted = frozenset(addresses)
    for source, known, completed in _COMPLETIONS:
        # A daemon completes the same desired state on every pass (and apply completes it three times:
        # before planning, in the plan, in the verification): 33,000 objects filtered each time otherwise.
        if known == wanted and (source is desired or completed is desired):
            return completed
    completed = _complete(desired, wanted)
    _COMPLETIONS.appendleft((desired, wanted, completed))
    return completed


_COMPLETIONS: collections.deque[tuple[DesiredState, frozenset[str], DesiredState]] = collections.deque(maxlen=4)


def _complete(desired: DesiredState, addresses: frozenset[str]) -> DesiredState:
    # One pass over the objects (tens of thousands): the programs, who intercepts, earlier completions.
    intercepting: set[str] = set()
    candidates: list[BpfProgram] = []
    local_maps = frozenset(L.LOCAL_ADDRESS_MAPS.values())
    earlier = False
    for o in desired.objects:
        if type(o) is BpfMapEntry:
            if o.map == "intercept_rules":
                intercepting.add(o.program)
            elif o.map in local_maps:
                earlier = True
        elif type(o) is BpfProgram and o.source in L.LOCAL_ADDRESS_MAPS:
            candidates.append(o)
    # sock_connect needs them only to intercept; the filter and sk_lookup always.
    programs = [p for p in candidates if p.source != "sock_connect.c" or p.name in intercepting]
    objects = desired.objects
    if earlier:
        objects = tuple(o for o in objects if not (type(o) is BpfMapEntry and o.map in local_maps))
    if not programs and not earlier:
        return desired
    present = L.EXCLUDE.pack(1).hex()
    entries = tuple(
        BpfMapEntry(p.name, L.LOCAL_ADDRESS_MAPS[p.source], L.local_address_key(a).hex(), present, "",
                    "a local address (never intercepted)")
        for p in programs for a in sorted(set(addresses)))
    return DesiredState(desired.intent, desired.backend, objects + entries, desired.routing_tables)


def needs_local_addresses(desired: DesiredState) -> bool:
    return desired.backend == BACKEND and any(
        isinstance(o, BpfProgram) and o.source in L.LOCAL_ADDRESS_MAPS for o in desired.objects)


# -------------------------------------------------------------------- filtering
@dataclass(frozen=True)
class _Descriptor:
    flags: int
    proto: int
    action: int
    counter: int
    ports: tuple[int, int]
    rate: int = 0
    burst: int = 0


def _filter_rules_by_interface(intent: NetworkIntent) -> dict[str, list[tuple[str, FilterRule]]]:
    by_interface: dict[str, list[tuple[str, FilterRule]]] = {}
    for direction in ("input", "forward", "output"):
        chain: FilterChain | None = getattr(intent.spec.filtering, direction)
        if chain is None:
            continue
        for rule in chain.rules:
            # ebpf_refusals: every rule has interfaces (its own or spec.ebpf's), none of them a wildcard.
            for interface in rule.interfaces or intent.spec.ebpf.interfaces:
                by_interface.setdefault(interface, []).append((direction, rule))
        if chain.default == "deny":
            # A default applies where the filter runs: every interface of spec.ebpf.interfaces (ebpf_refusals:
            # a default deny needs them), rules or not.
            for interface in intent.spec.ebpf.interfaces:
                by_interface.setdefault(interface, [])
    return by_interface


# A chain's rule flags: the tc hook that sees its packets and the chain itself (the program tells the
# chains apart by the packet's addresses, see bpf/tc_filter.c).
_CHAIN_FLAGS = {"input": L.RULE_INGRESS | L.RULE_INPUT, "forward": L.RULE_INGRESS | L.RULE_FORWARD,
                "output": L.RULE_EGRESS | L.RULE_OUTPUT}
_CHAIN_HOOK = {"input": "ingress", "forward": "ingress", "output": "egress"}


def _filter_config(intent: NetworkIntent) -> tuple[bytes | None, set[str]]:
    """The config entry (each chain's default and statefulness; None when all are the program's own
    defaults: allow, stateless) and the hooks a default deny needs attached. ebpf_refusals: no chain
    is a stateful deny. In a stateful chain, packets of established TCP connections (ACK set) pass
    before the rules, as `ct state established` does."""
    defaults = {"input": L.ACT_ALLOW, "forward": L.ACT_ALLOW, "output": L.ACT_ALLOW}
    stateful = 0
    hooks: set[str] = set()
    for direction in ("input", "forward", "output"):
        chain: FilterChain | None = getattr(intent.spec.filtering, direction)
        if chain is None:
            continue
        if chain.default == "deny":
            defaults[direction] = L.ACT_DENY
            hooks.add(_CHAIN_HOOK[direction])
        if chain.stateful:
            stateful |= _CHAIN_FLAGS[direction] & ~(L.RULE_INGRESS | L.RULE_EGRESS)
    if not hooks and not stateful:
        return None, hooks
    return L.FILTER_CONFIG.pack(defaults["input"], defaults["forward"], defaults["output"], stateful), hooks


def _rate(rule: FilterRule, where: str) -> tuple[int, int]:
    assert rule.rate_limit is not None
    limit = rule.rate_limit
    if limit.per == "minute":  # a whole number per second (ebpf_refusals)
        return limit.rate // 60, limit.burst
    return limit.rate, limit.burst


def _filtering(intent: NetworkIntent) -> list[tuple[BpfProgram, list[BpfMapEntry]]]:
    by_interface = _filter_rules_by_interface(intent)
    if not by_interface:
        return []
    config, default_hooks = _filter_config(intent)
    result = []
    for interface, rules in sorted(by_interface.items()):
        program = _Program(f"tc-{interface}", "tc_filter.c", f"filtering@{interface}")
        descriptors: list[tuple[_Descriptor, list[Network], list[Network], str]] = []
        for counter, (direction, rule) in enumerate(rules):
            where = f"filtering.{direction}/{rule.name}"
            flags = _CHAIN_FLAGS[direction]
            action = {"allow": L.ACT_ALLOW, "deny": L.ACT_DENY, "rate-limit": L.ACT_RATE_LIMIT}[rule.action]
            rate, burst = _rate(rule, where) if rule.action == "rate-limit" else (0, 0)
            sources = _networks(rule.sources, (where, "sources")) or [_any(4), _any(6)]
            destinations = _networks(rule.destinations, (where, "destinations")) or [_any(4), _any(6)]
            protos = {"any": [0], "tcp": [6], "udp": [17], "icmp": [1, 58]}[rule.protocol]
            for proto in protos:
                for ports in _port_ranges(rule.ports):
                    descriptors.append((_Descriptor(flags, proto, action, counter, ports, rate, burst),
                                        sources, destinations, where))
        max_rules = max_rules_setting(intent.spec.ebpf.limits, len(descriptors), f"interface {interface}")
        words = max_rules // 64
        src_bits: dict[Network, int] = {}
        dst_bits: dict[Network, int] = {}
        for index, (d, sources, destinations, where) in enumerate(descriptors):
            _add_bits(src_bits, sources, index)
            _add_bits(dst_bits, destinations, index)
            value = L.RULE.pack(d.flags, d.proto, d.action, d.counter, d.ports[0], d.ports[1], d.rate, d.burst, 0)
            program.entry("rules", L.U32.pack(index), value, where)
        program.lpm("src", src_bits, words, "filtering")
        program.lpm("dst", dst_bits, words, "filtering")
        if config is not None:
            program.entry("config", L.U32.pack(0), config, "filtering defaults")
        hooks = {"egress" if d.flags & L.RULE_EGRESS else "ingress" for d, *_ in descriptors} | default_hooks
        attachments = [(f"kf_tc_{hook}", f"tc:{interface}:{hook}") for hook in sorted(hooks)]
        cflags = _settings(intent.spec.ebpf.limits, "KF_MAX_RULES", "KF_MAX_PREFIXES")
        result.append((_program(program, attachments, cflags), program.entries))
    return result


# ------------------------------------------------------------ interception
@dataclass(frozen=True)
class _InterceptDescriptor:
    action: int
    proto: int
    ports: tuple[int, int]
    proxy_port: int
    slot: int
    counter: int


def _intercept_tables(rules: Sequence[InterceptionRule], where_prefix: str,
                      slots: dict[tuple[int, int], int] | None) -> tuple[list[_InterceptDescriptor], dict[Network, int]]:
    """Ordered descriptors (exceptions before the redirect) and destination prefix bitmaps."""
    descriptors: list[_InterceptDescriptor] = []
    bits: dict[Network, int] = {}
    for counter, rule in enumerate(rules):
        # ebpf_refusals: no source CIDRs, no mark exclusions.
        where = f"{where_prefix}/{rule.name}"
        destinations = _networks(rule.destinations, (where, "destinations")) or [_any(4), _any(6)]
        assert rule.proxy_port is not None
        for proto_name in rule.protocols:
            proto = _PROTO[proto_name]
            slot = 0
            if slots is not None:
                slot = slots.setdefault((rule.proxy_port, proto), len(slots))
            for network in _networks(rule.exclude.destinations, (where, "exclude.destinations")):
                _add_bits(bits, [network], len(descriptors))
                descriptors.append(_InterceptDescriptor(L.ICPT_BYPASS, proto, FULL_PORTS, 0, 0, counter))
            for ports in [parse_port_range(p) for p in rule.exclude.ports]:
                _add_bits(bits, destinations, len(descriptors))
                descriptors.append(_InterceptDescriptor(L.ICPT_BYPASS, proto, ports, 0, 0, counter))
            for ports in _port_ranges(rule.ports):
                _add_bits(bits, destinations, len(descriptors))
                descriptors.append(_InterceptDescriptor(L.ICPT_REDIRECT, proto, ports, rule.proxy_port, slot, counter))
    return descriptors, bits


def _intercept_entries(program: _Program, descriptors: list[_InterceptDescriptor], bits: dict[Network, int],
                       where: str, limits: EbpfLimits) -> int:
    max_rules = max_rules_setting(limits, len(descriptors), where)
    for index, d in enumerate(descriptors):
        value = L.INTERCEPT_RULE.pack(d.action, d.proto, d.ports[0], d.ports[1], d.proxy_port, d.slot, d.counter)
        program.entry("intercept_rules", L.U32.pack(index), value, where)
    program.lpm("intercept", bits, max_rules // 64, where)
    return max_rules


def _inbound_interception(intent: NetworkIntent, routing: list[KernelObject]) -> list[tuple[BpfProgram, list[BpfMapEntry]]]:
    section = intent.spec.interception
    rules = [r for r in section.rules if r.direction == "inbound"]
    if not rules:
        return []
    program = _Program("sk-lookup", "sk_lookup.c", "interception (inbound)")
    slots: dict[tuple[int, int], int] = {}
    descriptors, bits = _intercept_tables(rules, "interception", slots)
    # ebpf_refusals: every inbound rule names its interfaces (policy routing `iif <interface>` makes its
    # destinations local; without one it would also catch the host's own outgoing connections).
    max_rules = _intercept_entries(program, descriptors, bits, "interception", intent.spec.ebpf.limits)
    # A rule applies to connections arriving on its interfaces only (never lo unless named): per
    # interface, the descriptors of the rules that name it. The reconciler resolves names to ifindexes.
    by_interface: dict[str, int] = {}
    for index, d in enumerate(descriptors):
        for ifname in rules[d.counter].interfaces:
            by_interface[ifname] = by_interface.get(ifname, 0) | (1 << index)
    for ifname, allowed in sorted(by_interface.items()):
        program.entry("intercept_ifs", L.ifname_key(ifname), L.bitmap(allowed, max_rules // 64),
                      f"interception on {ifname}")
    # A slot holds the proxy's listener per family: proxies listen with separate IPv4 and IPv6 sockets.
    families: dict[int, set[int]] = {}
    for rule in rules:
        assert rule.proxy_port is not None
        versions = {n.version for n in _networks(rule.destinations, (f"interception/{rule.name}", "destinations"))}
        versions = versions or {4, 6}
        for proto_name in rule.protocols:
            families.setdefault(slots[(rule.proxy_port, _PROTO[proto_name])], set()).update(versions)
    for (port, proto), slot in sorted(slots.items(), key=lambda i: i[1]):
        for family in sorted(families[slot]):
            map_name = "proxy_socks" if family == 4 else "proxy_socks6"
            program.entry(map_name, L.U32.pack(slot), L.PROXY_SOCKET.pack(port, proto), f"proxy :{port}")
    # Policy routing makes the intercepted destinations local for traffic from
    # the rule's interfaces, so the kernel runs the socket lookup at all.
    for index, rule in enumerate(rules):
        table = section.routing_table + index
        origin = f"interception/{rule.name} (local delivery)"
        where = f"interception/{rule.name}"
        destinations = _networks(rule.destinations, (where, "destinations")) or [_any(4), _any(6)]
        for network in destinations:
            routing.append(ip_route(network.version, table, network.with_prefixlen, type="local",
                                    nexthops=_lo(), origin=origin))
        for network in _networks(rule.exclude.destinations, (where, "exclude.destinations")):
            routing.append(ip_route(network.version, table, network.with_prefixlen, type="throw", origin=origin))
        rule_families = sorted({n.version for n in destinations})
        for family in rule_families:
            interfaces: list[str | None] = list(rule.interfaces) or [None]
            port_ranges: list[tuple[int, int] | None] = [parse_port_range(p) for p in rule.ports] or [None]
            for interface in interfaces:
                for proto_name in rule.protocols:
                    for ports in port_ranges:
                        routing.append(ip_rule(family, section.rule_priority, table, iif=interface,
                                               ip_proto=_PROTO[proto_name], dport=ports, origin=origin))
    cflags = _settings(intent.spec.ebpf.limits, "KF_MAX_RULES", "KF_MAX_PREFIXES", "KF_MAX_PROXIES")
    return [(_program(program, [("kf_sk_lookup", "netns:sk_lookup")], cflags), program.entries)]


def _lo() -> tuple[Nexthop, ...]:
    return (Nexthop(None, "lo", 1),)


# ------------------------------------------------- socket-level programs
def _cgroup(intent: NetworkIntent) -> str:
    return intent.spec.ebpf.cgroup or default_cgroup(intent.metadata.name, None)


def _expand_ids(ranges: Iterable[int | str], where: str) -> list[int]:
    ids: list[int] = []
    for text in ranges:
        low, _, high = str(text).partition("-")
        lo, hi = int(low), int(high or low)  # at most MAX_ID_RANGE ids (ebpf_refusals)
        ids += range(lo, hi + 1)
    return ids


def _tc_balancing(intent: NetworkIntent, tables: _LbTables) -> list[tuple[BpfProgram, list[BpfMapEntry]]]:
    """tc_lb.c on each interface where clients of other hosts reach the VIPs (see LoadBalancing.interfaces)."""
    services = intent.spec.load_balancing.services
    interfaces = intent.spec.load_balancing.interfaces or intent.spec.ebpf.interfaces
    if not services or not interfaces:
        return []
    limits = intent.spec.ebpf.limits
    result = []
    for interface in sorted(set(interfaces)):  # exact names (ebpf_refusals)
        program = _Program(f"lb-{interface}", "tc_lb.c", f"loadBalancing@{interface}")
        program.entries += tables.entries(program)
        attachments = [("kf_lb_ingress", f"tc:{interface}:ingress"), ("kf_lb_egress", f"tc:{interface}:egress")]
        cflags = _settings(limits, "KF_MAX_SERVICES", "KF_MAX_BACKENDS", "KF_MAGLEV_CHUNKS")
        result.append((_program(program, attachments, cflags), program.entries))
    return result


def _socket_programs(intent: NetworkIntent, tables: _LbTables) -> list[tuple[BpfProgram, list[BpfMapEntry]]]:
    services = intent.spec.load_balancing.services
    outbound = [r for r in intent.spec.interception.rules if r.direction == "outbound"]
    if not services and not outbound:
        return []
    program = _Program("sock", "sock_connect.c", f"cgroup {_cgroup(intent)}")
    limits = intent.spec.ebpf.limits
    program.entries += tables.entries(program)
    if outbound:
        descriptors, bits = _intercept_tables(outbound, "interception", None)
        _intercept_entries(program, descriptors, bits, "interception (outbound)", limits)
        for rule in outbound:
            where = f"interception/{rule.name}"
            for uid in _expand_ids(rule.exclude.uids, where):
                program.entry("exclude_uid", L.U32.pack(uid), L.EXCLUDE.pack(1), where)
            for gid in _expand_ids(rule.exclude.gids, where):
                program.entry("exclude_gid", L.U32.pack(gid), L.EXCLUDE.pack(1), where)
    cgroup = _cgroup(intent)
    hooks = ["connect4", "connect6"]
    if any(s.protocol == "udp" for s in services) or any("udp" in r.protocols for r in outbound):
        hooks += ["sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6"]
    attachments = [(f"kf_{hook}", f"cgroup:{cgroup}:{hook}") for hook in hooks]
    if outbound:
        attachments += [("kf_sockops", f"cgroup:{cgroup}:sock_ops"), ("kf_getsockopt", f"cgroup:{cgroup}:getsockopt")]
    cflags = _settings(limits, "KF_MAX_RULES", "KF_MAX_PREFIXES", "KF_MAX_SERVICES", "KF_MAX_BACKENDS",
                       "KF_MAGLEV_CHUNKS")
    return [(_program(program, attachments, cflags), program.entries)]


# ------------------------------------------------------- load-balancing tables
# Service ids and backend indexes are slots of open-addressing tables, filled in a deterministic order:
# each item's home is a hash of its identity (crc32, stable across processes), items are placed in
# order of (home, identity) at the first free slot from their home. An id therefore depends on the
# services near it in that table, not on the service's position in the intent: adding or removing a
# service leaves every other service's id, backend indexes and Maglev rows as they were (bar the few
# that had been displaced past it), which keeps a one-service change a handful of map updates.


def allocate_slots(identities: Sequence[bytes], capacity: int) -> list[int]:
    """A distinct slot in [0, capacity) for each identity (which must be distinct), as described above."""
    if len(identities) > capacity:
        raise BackendUnavailable(f"{len(identities)} items do not fit {capacity} slots")  # ebpf_refusals
    crc = zlib.crc32
    homes = [crc(identity) % capacity for identity in identities]
    order = sorted(zip(homes, identities, range(len(identities)), strict=True))
    slots = [0] * len(identities)
    cursor = 0
    wrapped: list[int] = []
    for home, _, i in order:
        at = home if home >= cursor else cursor
        if at >= capacity:
            wrapped.append(i)
            continue
        slots[i] = at
        cursor = at + 1
    if wrapped:
        late = set(wrapped)
        used = {slots[i] for _, _, i in order if i not in late}
        free = (at for at in range(capacity) if at not in used)
        for i in wrapped:
            slots[i] = next(free)
    return slots


class _SlotTable:
    """allocate_slots() kept between compiles: a few identities added or removed cost about that (the
    slots after each change are recomputed until they agree with the previous ones again). Equal to
    allocate_slots of the same identities (a test checks)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.order: list[tuple[int, bytes]] = []  # (home, identity), sorted
        self.slots: dict[bytes, int] = {}
        self.wrapped = False

    def assign(self, identities: Sequence[bytes]) -> dict[bytes, int]:
        wanted = set(identities)
        added = [i for i in identities if i not in self.slots]
        removed = [i for i in self.slots if i not in wanted] if len(wanted) - len(added) != len(self.slots) else []
        if not added and not removed:
            return self.slots
        if len(added) + len(removed) > 64 + len(wanted) // 16 or not self._update(added, removed):
            self._rebuild(identities)
        return self.slots

    def _rebuild(self, identities: Sequence[bytes]) -> None:
        slots = allocate_slots(identities, self.capacity)
        crc, capacity = zlib.crc32, self.capacity
        self.order = sorted((crc(identity) % capacity, identity) for identity in identities)
        self.slots = dict(zip(identities, slots, strict=True))
        # slots wrapped past the end break the order _update relies on
        self.wrapped = any(self.slots[identity] < home for home, identity in self.order[-64:])

    def _update(self, added: list[bytes], removed: list[bytes]) -> bool:
        """Applies the change in place; False when the table must be rebuilt instead."""
        if self.wrapped:
            return False
        crc, capacity, order = zlib.crc32, self.capacity, self.order
        slots = dict(self.slots)
        for identity in removed:
            del order[bisect_left(order, (crc(identity) % capacity, identity))]
            del slots[identity]
        for identity in added:
            insort(order, (crc(identity) % capacity, identity))
        # where each change is now: an added item, or the item that followed a removed one
        touched = [bisect_left(order, (crc(identity) % capacity, identity)) for identity in added + removed]
        start, end = min(touched), max(touched)
        previous = slots[order[start - 1][1]] if start > 0 else -1
        at = start
        while at < len(order):
            home, identity = order[at]
            slot = home if home > previous else previous + 1
            if slot >= capacity:
                return False
            if at > end and slots.get(identity) == slot:
                break  # every later slot follows from this one, as before
            slots[identity] = slot
            previous = slot
            at += 1
        self.slots = slots
        return True


_SLOT_TABLES: dict[tuple[str, int], _SlotTable] = {}


def _slot_table(name: str, capacity: int) -> _SlotTable:
    table = _SLOT_TABLES.get((name, capacity))
    if table is None:
        if len(_SLOT_TABLES) >= 16:
            _SLOT_TABLES.clear()
        table = _SLOT_TABLES[(name, capacity)] = _SlotTable(capacity)
    return table


@dataclass(frozen=True)
class _ServiceInputs:
    """What one service contributes to the load-balancing maps, decoded once per service text."""

    family: int
    key: bytes  # its services_v4/v6 key
    entry_value: bytes  # kf_service without id: backend_count, algorithm, flags, Maglev size
    backends: tuple[bytes, ...]  # kf_backend_v4/v6 values, in the intent's order (position = index)
    slots: tuple[int, ...]  # its Maglev table: slot -> the backend's position + 1


def _service_inputs(service: Service) -> tuple[str, _ServiceInputs]:
    text = service.model_dump_json()  # a str caches its hash: cheap as a key below
    return text, remembered(("service inputs", text), lambda: _decode_service(service))


def _decode_service(service: Service) -> _ServiceInputs:
    family = 6 if ":" in service.vip else 4  # canonical addresses (intent.py)
    packed = _packed_v4 if family == 4 else _packed_v6
    proto = _PROTO[service.protocol]
    key = (L.SVC_KEY_V4 if family == 4 else L.SVC_KEY_V6).pack(packed(service.vip), service.port, proto)
    pack = (L.BACKEND_V4 if family == 4 else L.BACKEND_V6).pack
    backends = tuple(pack(packed(b.address), b.port or service.port) for b in service.backends)
    names = tuple(f"{b.address}:{b.port or service.port}" for b in service.backends)
    weights = tuple(b.weight for b in service.backends)
    size = maglev.table_size(len(names))
    table = remembered(("maglev", names, weights, size), lambda: maglev.build(list(names), list(weights), size))
    algorithm = L.LB_AFFINITY if service.algorithm == "source-hash" else L.LB_RANDOM
    value = struct.pack("<HBBI", len(backends), algorithm, 0, size)
    return _ServiceInputs(family, key, value, backends, tuple(position + 1 for position in table))


def _packed_v4(address: str) -> bytes:
    return bytes(map(int, address.split(".")))  # canonical dotted quad (intent.py)


def _packed_v6(address: str) -> bytes:
    return ipaddress.IPv6Address(address).packed


class _LbTables:
    """The load-balancing map contents of an intent's services: decoded and given ids once per compile,
    then entries per program (tc_lb and sock_connect hold the same)."""

    def __init__(self, services: Sequence[Service], limits: EbpfLimits) -> None:
        self.services = services
        pairs = [_service_inputs(service) for service in services]
        self.texts = [text for text, _ in pairs]
        self.inputs = [svc for _, svc in pairs]
        self.ids: list[int] = []
        if services:
            # one id space for both families (the maglev hash and the counters are shared)
            identities = [bytes([svc.family]) + svc.key for svc in self.inputs]
            ids = _slot_table("services", limits.services).assign(identities)
            self.ids = list(map(ids.__getitem__, identities))

    def entries(self, program: _Program) -> list[BpfMapEntry]:
        """services_v4/v6, backends_v4/v6 and maglev entries of every service, for `program`."""
        entries: list[BpfMapEntry] = []
        for service, text, svc, svc_id in zip(self.services, self.texts, self.inputs, self.ids, strict=True):
            # A service's entries depend only on these inputs (its text decodes to `svc`): a change
            # elsewhere in the intent reuses the list an earlier compile made, objects and all.
            entries += remembered(("service entries", program.name, program.source, text, svc_id),
                                  partial(_service_entries, program, service.name, svc, svc_id))
        return entries


def _service_entries(program: _Program, name: str, svc: _ServiceInputs, svc_id: int) -> list[BpfMapEntry]:
    """A service's entry, its backends (chunks of bpf_layout.BACKEND_CHUNK) and its Maglev table (chunks of
    bpf_layout.MAGLEV_CHUNK): about three entries for a service of ten backends."""
    where = f"loadBalancing/{name}"
    out = _Program(program.name, program.source, program.origin)
    out.entry(f"services_v{svc.family}", svc.key, L.U32.pack(svc_id) + svc.entry_value, where)
    size = (L.BACKEND_V4 if svc.family == 4 else L.BACKEND_V6).size
    for key, value in L.backend_chunks(svc_id, svc.backends, size):
        out.entry(f"backends_v{svc.family}", key, value, where)
    for key, value in L.maglev_chunks(svc_id, svc.slots):
        out.entry("maglev", key, value, where)
    return out.entries
