"""Checks that need the whole intent: names, references, families, clashes.

The schema checks shapes and the models check single values; what is left is
meaning across fields. Each finding is a (document path, message) pair so the
loader can point at the exact line and column.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator

from .errors import dotted
from .intent import NetworkIntent, Route
from .objects import canonical_metric
from .routing import _policy_rule, route_destination

Path = tuple[str | int, ...]
Finding = tuple[Path, str]

RESERVED_TABLES = {253: "default", 254: "main", 255: "local"}


class Related(str):
    """A finding's message that names other nodes of the intent (the first of two that clash).

    As a str it names them by document path; the loader, which knows where they
    were written, renders `template` with their FILE:LINE:COL instead.
    """

    template: str
    paths: tuple[Path, ...]

    def __new__(cls, template: str, *paths: Path) -> Related:
        message = super().__new__(cls, template.format(*map(dotted, paths)))
        message.template = template
        message.paths = paths
        return message


def _family(text: str) -> int:
    return ipaddress.ip_network(text, strict=False).version


def _duplicates(names: Iterable[str], base: Path, what: str) -> Iterator[Finding]:
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            yield (*base, index, "name"), f"duplicate {what} name {name!r} (first at index {seen[name]})"
        else:
            seen[name] = index


def check(intent: NetworkIntent) -> list[Finding]:
    """Every semantic problem of the intent (empty when it is sound)."""
    findings: list[Finding] = []
    findings += _check_interception(intent)
    findings += _check_load_balancing(intent)
    findings += _check_routing(intent)
    findings += _check_filtering(intent)
    return findings


def _check_interception(intent: NetworkIntent) -> Iterator[Finding]:
    section = intent.spec.interception
    base: Path = ("spec", "interception", "rules")
    yield from _duplicates((r.name for r in section.rules), base, "interception rule")
    for index, rule in enumerate(section.rules):
        here = (*base, index)
        if rule.proxy_port is None:
            yield (
                (*here, "name"),
                f"interception rule {rule.name!r} has no proxyPort: where should connections go?",
            )
        if rule.direction == "outbound" and rule.interfaces:
            yield (
                (*here, "interfaces"),
                "outbound interception matches locally originated traffic; interfaces apply to inbound rules only",
            )
        if rule.direction == "inbound" and (rule.exclude.uids or rule.exclude.gids):
            yield (
                (*here, "exclude"),
                "uids/gids exclusions only apply to outbound (locally originated) traffic",
            )
        if (
            rule.direction == "outbound"
            and rule.proxy_port is not None
            and not (rule.exclude.uids or rule.exclude.gids or rule.exclude.marks)
        ):
            yield (
                (*here, "exclude"),
                (
                    "outbound interception needs an exclusion for the proxy's own traffic "
                    "(exclude.uids, exclude.gids or exclude.marks), or its connections loop back into it"
                ),
            )
        if rule.destinations and rule.sources:
            d = {_family(c) for c in rule.destinations}
            s = {_family(c) for c in rule.sources}
            if not d & s:
                yield (
                    (*here, "sources"),
                    "sources and destinations share no address family: the rule can never match",
                )
    if section.routing_table in RESERVED_TABLES:
        yield (
            ("spec", "interception", "routingTable"),
            f"table {section.routing_table} is the system's {RESERVED_TABLES[section.routing_table]!r} table, "
            "which kernform never owns; choose another id, or leave routingTable out (the intent then gets "
            "one of its own)",
        )
    for t_index, table in enumerate(intent.spec.routing.tables):
        if section.rules and table.id == section.routing_table:
            yield (
                ("spec", "routing", "tables", t_index, "id"),
                (
                    f"table id {table.id} is interception.routingTable; choose another id or change interception.routingTable"
                ),
            )


def _address_family(address: str) -> int:
    """Family of an address the models already validated (IPv6 text always has a colon, IPv4 never)."""
    return 6 if ":" in address else 4


def _check_load_balancing(intent: NetworkIntent) -> Iterator[Finding]:
    base: Path = ("spec", "loadBalancing", "services")
    services = intent.spec.load_balancing.services
    yield from _duplicates((s.name for s in services), base, "service")
    seen: dict[tuple[str, int, str], str] = {}
    for index, svc in enumerate(services):
        here = (*base, index)
        key = (svc.vip, svc.port, svc.protocol)
        if key in seen:
            yield (
                (*here, "vip"),
                f"VIP {svc.vip}:{svc.port}/{svc.protocol} is already used by service {seen[key]!r}",
            )
        else:
            seen[key] = svc.name
        vip_family = _address_family(svc.vip)
        backends_seen: set[tuple[str, int]] = set()
        for b_index, backend in enumerate(svc.backends):
            if _address_family(backend.address) != vip_family:
                yield (
                    (*here, "backends", b_index, "address"),
                    (
                        f"backend {backend.address} is IPv{6 if vip_family == 4 else 4} but VIP {svc.vip} is IPv{vip_family}: "
                        "mixed families cannot be translated"
                    ),
                )
            target = (backend.address, backend.port or svc.port)
            if target in backends_seen:
                yield (
                    (*here, "backends", b_index, "address"),
                    f"backend {target[0]}:{target[1]} is listed twice",
                )
            backends_seen.add(target)


def _check_route(route: Route, here: Path) -> Iterator[Finding]:
    dest_family = 4 if route.to == "default" else 6 if route.to == "default6" else _family(route.to)
    if route.type == "unicast" and not (route.via or route.dev or route.nexthops):
        yield here, "a unicast route needs 'via', 'dev' or 'nexthops'"
    if route.type != "unicast" and (route.via or route.nexthops):
        yield here, f"a {route.type} route takes no next hop"
    if route.nexthops and (route.via or route.dev):
        yield (*here, "nexthops"), "give either via/dev or nexthops, not both"
    gateways = [(here, route.via)] + [((*here, "nexthops", i), nh.via) for i, nh in enumerate(route.nexthops)]
    for where, via in gateways:
        if via is not None and ipaddress.ip_address(via).version != dest_family:
            yield where, f"next hop {via} is not IPv{dest_family} like the destination {route.to}"
    # The kernel always reports the interface a next hop leaves through, so it
    # must be written down to be comparable (and reviewers see it in plans).
    if route.type == "unicast" and route.via and not route.dev:
        yield (*here, "via"), f"next hop {route.via} needs 'dev': the interface it is reached through"
    for i, nh in enumerate(route.nexthops):
        if not nh.dev:
            yield (*here, "nexthops", i), "a next hop needs 'dev': the interface it is reached through"
        if dest_family == 6 and len(route.nexthops) > 1 and not nh.via:
            yield (*here, "nexthops", i), "IPv6 multipath next hops need 'via' (the kernel merges only gateway routes)"


def _check_routing(intent: NetworkIntent) -> Iterator[Finding]:
    routing = intent.spec.routing
    tables_base: Path = ("spec", "routing", "tables")
    yield from _duplicates((t.name for t in routing.tables), tables_base, "routing table")
    ids: dict[int, str] = {}
    for index, table in enumerate(routing.tables):
        if table.id in RESERVED_TABLES:
            yield (
                (*tables_base, index, "id"),
                f"table id {table.id} is the system's {RESERVED_TABLES[table.id]!r} table",
            )
        if table.id in ids:
            yield (
                (*tables_base, index, "id"),
                f"table id {table.id} is already used by table {ids[table.id]!r}",
            )
        ids.setdefault(table.id, table.name)
        destinations: dict[tuple[str, int], Path] = {}
        for r_index, route in enumerate(table.routes):
            here = (*tables_base, index, "routes", r_index)
            yield from _check_route(route, here)
            # The route's kernel key: 'default' is 0.0.0.0/0, and IPv6 stores metric 0 as 1024.
            family, prefix = route_destination(route)
            key = (prefix, canonical_metric(family, route.metric))
            first = destinations.setdefault(key, (*here, "to"))
            if first != (*here, "to"):
                yield (*here, "to"), Related(
                    f"route to {route.to} (metric {route.metric}) is the same kernel route as the one at {{0}} "
                    f"(table {table.id} {prefix} metric {key[1]}): a table holds one route per destination and "
                    "metric; remove one, or give it another metric",
                    first,
                )
    names = {t.name for t in routing.tables}
    rules_base: Path = ("spec", "routing", "rules")
    yield from _duplicates((r.name for r in routing.rules), rules_base, "policy rule")
    for index, rule in enumerate(routing.rules):
        here = (*rules_base, index)
        if rule.table not in names:
            known = ", ".join(sorted(names)) or "none"
            yield (
                (*here, "table"),
                f"policy rule {rule.name!r} names table {rule.table!r}, which is not in routing.tables (known: {known})",
            )
        fams = {_family(c) for c in (rule.from_, rule.to) if c}
        if len(fams) > 1:
            yield (*here, "to"), "from and to are of different address families"
        if rule.family and fams and rule.family != "both" and {"ipv4": 4, "ipv6": 6}[rule.family] not in fams:
            yield (*here, "family"), f"family {rule.family} contradicts from/to"
        if (rule.ports or rule.source_ports) and not rule.protocol:
            yield (*here, "ports"), "ports need a protocol (tcp or udp)"
    yield from _same_policy_rules(intent)


def _same_policy_rules(intent: NetworkIntent) -> Iterator[Finding]:
    """Two policy rules that lower to the same kernel rule (every selector, priority and table equal)."""
    routing = intent.spec.routing
    table_ids = {t.name: t.id for t in routing.tables}
    rules_base: Path = ("spec", "routing", "rules")
    seen: dict[object, int] = {}
    for index, rule in enumerate(routing.rules):
        if rule.table not in table_ids:
            continue
        try:
            lowered = _policy_rule(rule, table_ids[rule.table])
        except ValueError:
            continue  # what is wrong with the rule itself is reported where it is
        for kernel_rule in lowered:
            first = seen.setdefault(kernel_rule.key, index)
            if first != index:
                yield (*rules_base, index, "name"), Related(
                    f"policy rule {rule.name!r} is the same kernel rule as policy rule "
                    f"{routing.rules[first].name!r} at {{0}} ({kernel_rule.describe()}); remove one, or make "
                    "them differ (another priority or selector)",
                    (*rules_base, first, "name"),
                )
                break


def _check_filtering(intent: NetworkIntent) -> Iterator[Finding]:
    for direction in ("input", "forward", "output"):
        chain = getattr(intent.spec.filtering, direction)
        if chain is None:
            continue
        base: Path = ("spec", "filtering", direction, "rules")
        yield from _duplicates((r.name for r in chain.rules), base, f"{direction} filter rule")
        for index, rule in enumerate(chain.rules):
            here: Path = (*base, index)
            if rule.action == "rate-limit" and rule.rate_limit is None:
                yield (*here, "action"), "action rate-limit needs rateLimit: {rate: N, per: second}"
            if rule.action != "rate-limit" and rule.rate_limit is not None:
                yield (*here, "rateLimit"), f"rateLimit only applies to action rate-limit, not {rule.action}"
            if rule.ports and rule.protocol not in ("tcp", "udp"):
                yield (*here, "ports"), "ports need protocol tcp or udp"
            if rule.sources and rule.destinations:
                s = {_family(c) for c in rule.sources}
                d = {_family(c) for c in rule.destinations}
                if not s & d:
                    yield (
                        (*here, "sources"),
                        "sources and destinations share no address family: the rule can never match",
                    )
