"""Lowering the routing section (tables, routes, policy rules) to netlink objects.

Both backends share it: routing lives in the kernel's FIB whichever data path
intercepts, balances or filters.
"""

from __future__ import annotations

import ipaddress

from .intent import NetworkIntent, PolicyRule, Route, parse_port_range
from .objects import IpRule, KernelObject, Nexthop, ip_route, ip_rule


def parse_mark(text: int | str) -> tuple[int, int]:
    """A canonical mark ("0xVALUE/0xMASK", see intent._check_mark) as (value, mask)."""
    value, _, mask = str(text).partition("/")
    return int(value, 0), int(mask, 0) if mask else 0xFFFFFFFF


def route_destination(route: Route) -> tuple[int, str]:
    if route.to == "default":
        return 4, "0.0.0.0/0"
    if route.to == "default6":
        return 6, "::/0"
    network = ipaddress.ip_network(route.to)
    return network.version, network.with_prefixlen


def lower_routing(intent: NetworkIntent) -> list[KernelObject]:
    routing = intent.spec.routing
    result: list[KernelObject] = []
    table_ids = {t.name: t.id for t in routing.tables}
    for table in routing.tables:
        for route in table.routes:
            family, destination = route_destination(route)
            if route.nexthops:
                hops = tuple(Nexthop(h.via, h.dev, h.weight) for h in route.nexthops)
            elif route.via or route.dev:
                hops = (Nexthop(route.via, route.dev, 1),)
            else:
                hops = ()
            result.append(ip_route(family, table.id, destination, metric=route.metric, type=route.type,
                                   nexthops=hops, origin=f"routing.tables/{table.name}"))
    for rule in routing.rules:
        result += _policy_rule(rule, table_ids[rule.table])
    return result


_IP_PROTO = {"tcp": 6, "udp": 17}


def _policy_rule(rule: PolicyRule, table_id: int) -> list[IpRule]:
    families = {ipaddress.ip_network(c).version for c in (rule.from_, rule.to) if c}
    if not families:
        families = {4, 6} if rule.family in (None, "both") else {4 if rule.family == "ipv4" else 6}
    fwmark, fwmask = parse_mark(rule.fwmark) if rule.fwmark else (None, None)
    uid = None
    if rule.uid_range:
        low, _, high = str(rule.uid_range).partition("-")
        uid = (int(low), int(high))
    return [
        ip_rule(
            family,
            rule.priority,
            table_id,
            source=rule.from_,
            destination=rule.to,
            fwmark=fwmark,
            fwmask=fwmask,
            iif=rule.iif,
            oif=rule.oif,
            ip_proto=_IP_PROTO[rule.protocol] if rule.protocol else None,
            sport=parse_port_range(rule.source_ports) if rule.source_ports else None,
            dport=parse_port_range(rule.ports) if rule.ports else None,
            uid_range=uid,
            origin=f"routing.rules/{rule.name}",
        )
        for family in sorted(families)
    ]
