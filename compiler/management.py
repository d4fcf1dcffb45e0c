"""Whether an intent would cut the connection kernform is being run over (an SSH session).

Pure: the intent and the connection in, the parts of the intent that would
drop, divert or rewrite a new TCP connection from the client to the server's
port out, each at its document path (the CLI turns them into FILE:LINE:COL).

A new connection is what counts, not only the packets of the open one: a
stateful chain lets the open session's packets through, but the next login
after a network blip would be refused, which is the same lock-out an hour
later. Checked, for the connection arriving at the server on `interface`:
- filtering.input, rule by rule in order as the backends evaluate it: the
  first rule that matches decides (deny or rate-limit: cut; allow: kept); no
  match: the chain's default;
- interception: an inbound rule that would hand the connection to a proxy;
- load balancing: a service whose VIP and port are the server's.
An interface the connection's route cannot be told (None) matches every rule
that names interfaces: the check errs on the side of refusing.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .errors import DocPath
from .intent import FilterRule, InterceptionRule, NetworkIntent


@dataclass(frozen=True)
class Connection:
    """A TCP connection into this host: from `client` to `server`:`port`, arriving on `interface`."""

    client: str
    server: str
    port: int
    interface: str | None = None

    @classmethod
    def from_ssh(cls, value: str, interface: str | None = None) -> Connection | None:
        """From SSH_CONNECTION ("client-ip client-port server-ip server-port"); None when it is not one."""
        parts = value.split()
        if len(parts) != 4 or not parts[3].isdigit():
            return None
        try:
            ipaddress.ip_address(parts[0])
            ipaddress.ip_address(parts[2])
        except ValueError:
            return None
        return cls(parts[0], parts[2], int(parts[3]), interface)

    def describe(self) -> str:
        via = f" on {self.interface}" if self.interface else ""
        return f"tcp {self.client} -> {self.server}:{self.port}{via}"


def cuts(intent: NetworkIntent, connection: Connection) -> list[tuple[DocPath, str]]:
    """The places of `intent` that would cut a new `connection`, with why (empty: it stays reachable)."""
    found: list[tuple[DocPath, str]] = []
    spec = intent.spec
    what = f"the connection this command runs over ({connection.describe()})"
    chain = spec.filtering.input
    if chain is not None:
        decided = False
        for index, rule in enumerate(chain.rules):
            if not _filter_matches(rule, connection):
                continue
            decided = True
            if rule.action != "allow":
                found.append((("spec", "filtering", "input", "rules", index),
                              f"input filter rule {rule.name!r} ({rule.action}) would {_verb(rule.action)} {what}"))
            break
        if not decided and chain.default == "deny":
            found.append((("spec", "filtering", "input", "default"),
                          f"the input chain's default (deny) would drop {what}: no rule allows it"))
    for index, capture in enumerate(spec.interception.rules):
        if _intercepts(capture, connection):
            found.append((("spec", "interception", "rules", index), f"interception rule {capture.name!r} would "
                          f"hand {what} to the proxy on port {capture.proxy_port}"))
    for index, service in enumerate(spec.load_balancing.services):
        if service.protocol == "tcp" and service.port == connection.port and _same(service.vip, connection.server):
            found.append((("spec", "loadBalancing", "services", index),
                          f"service {service.name!r} would send {what} to its backends"))
    return found


def _verb(action: str) -> str:
    return "drop" if action == "deny" else "rate-limit (and drop beyond the limit)"


def _filter_matches(rule: FilterRule, connection: Connection) -> bool:
    return (rule.protocol in ("tcp", "any")
            and _interface_matches(rule.interfaces, connection.interface)
            and _in_any(connection.client, rule.sources)
            and _in_any(connection.server, rule.destinations)
            and _port_matches(rule.ports, connection.port))


def _intercepts(rule: InterceptionRule, connection: Connection) -> bool:
    if rule.direction != "inbound" or "tcp" not in rule.protocols:
        return False
    excluded = rule.exclude
    if (excluded.sources and _in_any(connection.client, excluded.sources)) or \
            (excluded.destinations and _in_any(connection.server, excluded.destinations)) or \
            (excluded.ports and _port_matches(excluded.ports, connection.port)):
        return False
    return (_interface_matches(rule.interfaces, connection.interface)
            and _in_any(connection.client, rule.sources)
            and _in_any(connection.server, rule.destinations)
            and _port_matches(rule.ports, connection.port))


def _interface_matches(names: list[str], interface: str | None) -> bool:
    if not names or interface is None:
        return True
    return any(interface.startswith(n[:-1]) if n.endswith("*") else interface == n for n in names)


def _in_any(address: str, cidrs: list[str]) -> bool:
    if not cidrs:
        return True
    ip = ipaddress.ip_address(address)
    for cidr in cidrs:
        network = ipaddress.ip_network(cidr, strict=False)
        if network.version == ip.version and ip in network:
            return True
    return False


def _port_matches(ports: list[int | str], port: int) -> bool:
    if not ports:
        return True
    for spec in ports:
        if isinstance(spec, int):
            if spec == port:
                return True
        else:
            low, _, high = spec.partition("-")
            if int(low) <= port <= int(high or low):
                return True
    return False


def _same(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)
