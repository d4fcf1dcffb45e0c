"""What the ebpf backend refuses to lower, each at the exact field of the intent that asks for it.

Backends are equal or refuse: where the ebpf lowering would behave differently
from the tproxy backend, the intent is refused with the reason and what to
write instead, never approximated. This module owns that list. It is a pure
function of the intent, like semantics.check: every refusal is a (document
path, message) pair, all of them found in one pass, so that `kernform
validate --backend ebpf` reports each at FILE:LINE:COL. compiler/ebpf.py
calls refusals() before lowering anything and raises BackendUnavailable with
every finding; the lowering may then assume none of these constructs.

A path may name a field the file leaves out (a default such as `protocol:
any`); the loader places it at the nearest part of the document that is
written.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .cidr import collapsed_prefixes
from .intent import FilterChain, FilterRule, InterceptionRule, NetworkIntent
from .semantics import Finding, Path

MAX_RULE_DESCRIPTORS = 256
"""The most spec.ebpf.limits.rules allows (KF_MAX_RULES): rule bitmaps are whole 64-bit words, the verifier
allows 256."""

MAX_SERVICE_BACKENDS = 65535
"""Backends of one service (kf_service.backend_count is 16 bits)."""

MAX_ID_RANGE = 256
"""Ids of one excluded uid/gid range: the exclusion maps list ids one by one."""

# Descriptors a filter rule takes per port range: icmp is ICMP and ICMPv6.
_FILTER_PROTOCOLS = {"any": 1, "tcp": 1, "udp": 1, "icmp": 2}


def refusals(intent: NetworkIntent) -> list[Finding]:
    """Every construct of the intent that the ebpf backend cannot express (empty when it can lower all of it)."""
    findings: list[Finding] = []
    findings += _filtering(intent)
    findings += _interception(intent)
    findings += _interfaces(intent)
    findings += _load_balancing_limits(intent)
    findings += _prefix_limits(intent)
    return list(dict.fromkeys(findings))


# ------------------------------------------------------------------ limits
# Programs are built for spec.ebpf.limits, never for the intent's size (growing is map updates): an intent
# beyond a limit is refused here, at the item that crosses it, rather than failing in the kernel mid-apply.
def _limit_hint(name: str) -> str:
    return f"raise spec.ebpf.limits.{name} (the programs that use it are rebuilt once), or use the tproxy backend"


def _load_balancing_limits(intent: NetworkIntent) -> Iterator[Finding]:
    limits = intent.spec.ebpf.limits
    services = intent.spec.load_balancing.services
    base: Path = ("spec", "loadBalancing", "services")
    if len(services) > limits.services:
        yield (
            (*base, limits.services),
            f"service {services[limits.services].name!r} is beyond spec.ebpf.limits.services: the intent has "
            f"{len(services)} services and the ebpf programs hold {limits.services}; {_limit_hint('services')}",
        )
    totals = {4: 0, 6: 0}
    for service in services:
        totals[6 if ":" in service.vip else 4] += len(service.backends)
    running = {4: 0, 6: 0}
    for index, service in enumerate(services):
        family = 6 if ":" in service.vip else 4
        before = running[family]
        running[family] += len(service.backends)
        if len(service.backends) > MAX_SERVICE_BACKENDS:
            yield (
                (*base, index, "backends"),
                f"service {service.name!r} has {len(service.backends)} backends; an ebpf service holds at most "
                f"{MAX_SERVICE_BACKENDS}; split it, or use the tproxy backend",
            )
        if before <= limits.backends < running[family]:
            yield (
                (*base, index, "backends"),
                f"service {service.name!r} is beyond spec.ebpf.limits.backends: the IPv{family} services have "
                f"{totals[family]} backends in all and the ebpf programs hold {limits.backends} per address family; "
                f"{_limit_hint('backends')}",
            )


def _prefix_limits(intent: NetworkIntent) -> Iterator[Finding]:
    """Entries of each LPM trie: per filter program (interface) the distinct source and the distinct
    destination prefixes of its rules, per family; per interception program the destinations."""
    limit = intent.spec.ebpf.limits.prefixes
    fallback = intent.spec.ebpf.interfaces
    groups: dict[tuple[str, str], list[tuple[Path, str, Sequence[str]]]] = {}
    for direction, chain in _chains(intent):
        for index, rule in enumerate(chain.rules):
            here: Path = ("spec", "filtering", direction, "rules", index)
            for interface in rule.interfaces or fallback:
                for field in ("sources", "destinations"):
                    groups.setdefault((f"the filter program on {interface!r}", field), []).append(
                        ((*here, field), rule.name, getattr(rule, field)))
    for index, icpt in enumerate(intent.spec.interception.rules):
        at: Path = ("spec", "interception", "rules", index)
        program = "the inbound interception program" if icpt.direction == "inbound" else "the cgroup programs"
        for where, listed in (((*at, "destinations"), icpt.destinations),
                              ((*at, "exclude", "destinations"), icpt.exclude.destinations)):
            groups.setdefault((program, "destinations"), []).append((where, icpt.name, listed))
    for (program, field), items in groups.items():
        # every rule adds at most its own CIDRs and the two any-prefixes: count exactly only past the limit
        if sum(len(cidrs) for _, _, cidrs in items) + 2 <= limit:
            continue
        held: dict[int, set[tuple[int, int]]] = {4: set(), 6: set()}
        for path, name, cidrs in items:
            networks = collapsed_prefixes(list(cidrs)) if cidrs else None
            before = {family: len(held[family]) for family in held}
            if networks is None:
                held[4].add((0, 0))
                held[6].add((0, 0))
            else:
                for network in networks:
                    held[network.version].add((network.value, network.prefixlen))
            for family in (4, 6):
                if before[family] <= limit < len(held[family]):
                    yield (
                        path,
                        f"rule {name!r} is beyond spec.ebpf.limits.prefixes: {program} would hold more than "
                        f"{limit} IPv{family} {field} prefixes in one LPM trie; {_limit_hint('prefixes')}",
                    )


# -------------------------------------------------------------------- filtering
def _chains(intent: NetworkIntent) -> list[tuple[str, FilterChain]]:
    chains = ((d, getattr(intent.spec.filtering, d)) for d in ("input", "forward", "output"))
    return [(direction, chain) for direction, chain in chains if chain is not None]


def _filtering(intent: NetworkIntent) -> Iterator[Finding]:
    chains = _chains(intent)
    yield from _chain_settings(chains, intent.spec.ebpf.interfaces)
    fallback = intent.spec.ebpf.interfaces
    placed: list[tuple[Path, FilterRule, int, Sequence[str]]] = []
    for direction, chain in chains:
        for index, rule in enumerate(chain.rules):
            here: Path = ("spec", "filtering", direction, "rules", index)
            if not rule.interfaces and not fallback:
                yield (
                    (*here, "interfaces"),
                    f"{direction} filter rule {rule.name!r} names no interface: the ebpf backend filters at tc on "
                    "interfaces; name them on the rule (interfaces) or in spec.ebpf.interfaces, or use the tproxy "
                    "backend",
                )
            for i, interface in enumerate(rule.interfaces):
                if interface.endswith("*"):
                    yield (*here, "interfaces", i), _wildcard(interface)
            if chain.stateful and rule.action in ("deny", "rate-limit") and rule.protocol != "tcp":
                yield (*here, "protocol"), _stateless_protocol(direction, rule)
            limit = rule.rate_limit
            if rule.action == "rate-limit" and limit is not None and limit.per == "minute" and limit.rate % 60:
                yield (
                    (*here, "rateLimit", "rate"),
                    f"{direction} filter rule {rule.name!r}: the ebpf backend refills tokens per second and "
                    f"{limit.rate}/minute is not a whole number per second; give a multiple of 60 per minute, "
                    "a rate per second, or use the tproxy backend",
                )
            count = _FILTER_PROTOCOLS[rule.protocol] * (len(rule.ports) or 1)
            placed.append((here, rule, count, rule.interfaces or fallback))
    yield from _filter_descriptors(placed, intent.spec.ebpf.limits.rules)


def _chain_settings(chains: Sequence[tuple[str, FilterChain]], interfaces: Sequence[str] = ()) -> Iterator[Finding]:
    """A default deny without interfaces to apply it on, and a stateful default deny. (Each chain has its
    own default and statefulness: tc_filter tells input, forward and output apart by the packet's
    addresses.)"""
    for direction, chain in chains:
        if chain.default == "deny" and not interfaces:
            yield (
                ("spec", "filtering", direction, "default"),
                f"filtering.{direction}: the ebpf backend filters on the interfaces it is given, so a default deny "
                "needs them listed in spec.ebpf.interfaces (the tproxy backend's default applies to every "
                "interface); list them, or use the tproxy backend",
            )
        if chain.default == "deny" and chain.stateful:
            field = "stateful" if "stateful" in chain.model_fields_set else "default"
            yield (
                ("spec", "filtering", direction, field),
                f"filtering.{direction}: a stateful default deny needs connection tracking, and the ebpf backend's "
                "filter is stateless (it recognises established TCP connections by the ACK flag, nothing else): "
                "replies of UDP and ICMP exchanges would be dropped; say `stateful: false` to accept that (every "
                "packet is then filtered), or use the tproxy backend",
            )


def _stateless_protocol(direction: str, rule: FilterRule) -> str:
    flows = "non-TCP" if rule.protocol == "any" else rule.protocol.upper()
    if rule.action == "deny":
        effect, stateless = f"also drop packets of established {flows} flows, replies included", "filters"
    else:
        effect, stateless = f"count every packet of established {flows} flows, not only their first", "counts"
    return (
        f"{direction} filter rule {rule.name!r} ({rule.action}, protocol {rule.protocol}) is in a stateful chain, "
        "which passes packets of established connections before its rules; the ebpf backend has no connection "
        "tracking and recognises those packets only for TCP (by the ACK flag), so this rule would "
        f"{effect}; say `protocol: tcp`, or `stateful: false` on filtering.{direction} (then the rule "
        f"{stateless} every packet), or use the tproxy backend"
    )


def _filter_descriptors(placed: Sequence[tuple[Path, FilterRule, int, Sequence[str]]], limit: int) -> Iterator[Finding]:
    """One filter program per interface holds the descriptors of every rule attached there."""
    totals: dict[str, int] = {}
    for _, _, count, interfaces in placed:
        for interface in interfaces:
            totals[interface] = totals.get(interface, 0) + count
    running: dict[str, int] = {}
    for here, rule, count, interfaces in placed:
        for interface in interfaces:
            before = running.get(interface, 0)
            running[interface] = before + count
            if before <= limit < before + count:
                yield (
                    here,
                    f"filter rule {rule.name!r} is beyond what one ebpf filter program holds: interface "
                    f"{interface!r} would need {totals[interface]} rule descriptors (one per protocol and port "
                    f"range of each rule on it) and spec.ebpf.limits.rules is {limit}"
                    + (f" (at most {MAX_RULE_DESCRIPTORS})" if limit < MAX_RULE_DESCRIPTORS else
                       ", the most the ebpf backend supports") + "; merge ports into ranges, spread the rules "
                    "over interfaces, " + ("raise the limit, " if limit < MAX_RULE_DESCRIPTORS else "")
                    + "or use the tproxy backend",
                )


# ------------------------------------------------------------------ interception
def _interception(intent: NetworkIntent) -> Iterator[Finding]:
    base: Path = ("spec", "interception", "rules")
    rules = list(enumerate(intent.spec.interception.rules))
    for index, rule in rules:
        here: Path = (*base, index)
        if rule.sources:
            yield (
                (*here, "sources"),
                f"interception rule {rule.name!r}: the ebpf backend intercepts by destination and port only; "
                "source CIDRs need the tproxy backend",
            )
        if rule.exclude.sources:
            yield (
                (*here, "exclude", "sources"),
                f"interception rule {rule.name!r}: the ebpf backend intercepts by destination and port only; "
                "excluding source CIDRs needs the tproxy backend",
            )
        if rule.exclude.marks:
            yield (
                (*here, "exclude", "marks"),
                f"interception rule {rule.name!r}: the ebpf backend cannot exclude by mark (it redirects at "
                "connect(), before any mark is set); exclude the proxy by exclude.uids or exclude.gids, or use the "
                "tproxy backend",
            )
        if rule.direction == "inbound" and not rule.interfaces:
            # Its policy routing (`iif <interface> lookup <table>`) makes the destinations local; without an
            # interface it would also catch the host's own outgoing connections, which tproxy leaves alone.
            yield (
                (*here, "interfaces"),
                f"interception rule {rule.name!r} names no interface: the ebpf backend intercepts inbound "
                "connections on named interfaces only; list them in `interfaces`, or use the tproxy backend",
            )
        if rule.direction == "inbound":
            for i, interface in enumerate(rule.interfaces):
                if interface.endswith("*"):
                    yield (*here, "interfaces", i), _wildcard(interface)
        for key in ("uids", "gids"):
            for i, text in enumerate(getattr(rule.exclude, key)):
                low, high = _id_range(text)
                if high - low >= MAX_ID_RANGE:
                    yield (
                        (*here, "exclude", key, i),
                        f"interception rule {rule.name!r}: the ebpf backend lists excluded {key} one by one, at most "
                        f"{MAX_ID_RANGE} per range, and {_id_text(low, high)} holds {high - low + 1}; exclude "
                        "narrower ranges (the proxy's own uid or gid), or use the tproxy backend",
                    )
    yield from _inbound_tables(intent)
    yield from _outbound_exclusions([(i, r) for i, r in rules if r.direction == "outbound"])
    for direction, program in (("inbound", "sk_lookup"), ("outbound", "cgroup connect")):
        yield from _intercept_descriptors([(i, r) for i, r in rules if r.direction == direction], direction, program,
                                          intent.spec.ebpf.limits.rules)
    yield from _proxy_limit(intent)


def _proxy_limit(intent: NetworkIntent) -> Iterator[Finding]:
    """The inbound program keeps a listener slot per proxy port and protocol."""
    limit = intent.spec.ebpf.limits.proxies
    slots: set[tuple[int | None, str]] = set()
    for index, rule in enumerate(intent.spec.interception.rules):
        if rule.direction != "inbound":
            continue
        before = len(slots)
        slots.update((rule.proxy_port, protocol) for protocol in rule.protocols)
        if before <= limit < len(slots):
            yield (
                ("spec", "interception", "rules", index, "proxyPort"),
                f"interception rule {rule.name!r} is beyond spec.ebpf.limits.proxies: the inbound rules name more "
                f"than {limit} proxy listeners (port and protocol); {_limit_hint('proxies')}",
            )


def _inbound_tables(intent: NetworkIntent) -> Iterator[Finding]:
    """The ebpf backend gives each inbound rule its own routing table, interception.routingTable + its index
    among the inbound rules (semantics.py checks routingTable itself against routing.tables)."""
    section = intent.spec.interception
    inbound = [r for r in section.rules if r.direction == "inbound"]
    taken = {section.routing_table + offset: rule for offset, rule in enumerate(inbound) if offset}
    for index, table in enumerate(intent.spec.routing.tables):
        if table.id in taken:
            yield (
                ("spec", "routing", "tables", index, "id"),
                f"routing table {table.id} ({table.name!r}) is the table the ebpf backend gives inbound interception "
                f"rule {taken[table.id].name!r} (interception.routingTable {section.routing_table} + its index "
                "among the inbound rules); give the table another id, or move interception.routingTable",
            )


def _outbound_exclusions(outbound: Sequence[tuple[int, InterceptionRule]]) -> Iterator[Finding]:
    """The cgroup programs keep one set of excluded uids and one of gids for every outbound rule."""
    if len(outbound) < 2:
        return
    first_index, first = outbound[0]
    for key in ("uids", "gids"):
        expected = _id_set(getattr(first.exclude, key))
        for index, rule in outbound[1:]:
            ids = _id_set(getattr(rule.exclude, key))
            if ids != expected:
                yield (
                    ("spec", "interception", "rules", index, "exclude", key),
                    f"outbound interception rule {rule.name!r} excludes {_ids_text(key, ids)} but rule "
                    f"{first.name!r} excludes {_ids_text(key, expected)}: the ebpf backend keeps one set of excluded "
                    f"{key} for all outbound rules; give every outbound rule the same exclude.{key}, or use the "
                    "tproxy backend",
                )


def _intercept_descriptors(rules: Sequence[tuple[int, InterceptionRule]], direction: str,
                           program: str, limit: int) -> Iterator[Finding]:
    """Each protocol of a rule takes a descriptor per excluded prefix, excluded port range and port range."""
    counts = []
    for index, rule in rules:
        per_protocol = len(rule.exclude.ports) + (len(rule.ports) or 1)
        counts.append((index, rule, per_protocol, len(rule.exclude.destinations)))
    # Excluded destinations count once collapsed, which costs a little: only when the plain count is too high.
    if sum(len(r.protocols) * (n + cidrs) for _, r, n, cidrs in counts) <= limit:
        return
    sizes = [(index, rule, len(rule.protocols) * (n + len(collapsed_prefixes(rule.exclude.destinations))))
             for index, rule, n, _ in counts]
    total = sum(size for _, _, size in sizes)
    running = 0
    for index, rule, size in sizes:
        if running <= limit < running + size:
            yield (
                ("spec", "interception", "rules", index),
                f"interception rule {rule.name!r} is beyond what the ebpf {direction} interception program "
                f"({program}) holds: the {direction} rules need {total} rule descriptors (per protocol, one per "
                f"excluded prefix, excluded port range and port range) and spec.ebpf.limits.rules is {limit}; "
                "merge ports into ranges, " + ("raise the limit, " if limit < MAX_RULE_DESCRIPTORS else "")
                + f"or use the tproxy backend (the ebpf backend supports at most {MAX_RULE_DESCRIPTORS})",
            )
        running += size


def _id_range(text: int | str) -> tuple[int, int]:
    low, _, high = str(text).partition("-")
    return int(low), int(high or low)


def _id_set(ranges: Sequence[int | str]) -> tuple[tuple[int, int], ...]:
    """The ids as sorted, merged ranges: [1000, "1001-1005"] equals ["1000-1005"]."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(_id_range(text) for text in ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
        else:
            merged.append((low, high))
    return tuple(merged)


def _id_text(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def _ids_text(key: str, ids: tuple[tuple[int, int], ...]) -> str:
    return f"{key} [{', '.join(_id_text(low, high) for low, high in ids)}]" if ids else f"no {key}"


# ------------------------------------------------------------------ interfaces
def _wildcard(interface: str) -> str:
    return (
        f"the ebpf backend attaches its programs to interfaces by exact name, and {interface!r} is a prefix "
        "pattern; list the interfaces, or use the tproxy backend (which matches name prefixes)"
    )


def _interfaces(intent: NetworkIntent) -> Iterator[Finding]:
    """Wildcards in the interface lists the tc programs attach to (rules' own lists are checked with the rule)."""
    spec = intent.spec
    services = spec.load_balancing.services
    if services:
        for i, interface in enumerate(spec.load_balancing.interfaces):
            if interface.endswith("*"):
                yield ("spec", "loadBalancing", "interfaces", i), _wildcard(interface)
    filter_fallback = any(not rule.interfaces for _, chain in _chains(intent) for rule in chain.rules)
    lb_fallback = bool(services) and not spec.load_balancing.interfaces
    if filter_fallback or lb_fallback:
        for i, interface in enumerate(spec.ebpf.interfaces):
            if interface.endswith("*"):
                yield ("spec", "ebpf", "interfaces", i), _wildcard(interface)
