"""Conflicts between intents: resources two intents of one host would both take, refused before the kernel.

A host holds many intents (a GitOps repository has one per team or concern), and
each intent owns its kernel objects by name; everything two of them could both
want is either allocated per intent (nft tables, BPF pin directories, tc
handles, default cgroups, and the interception settings an intent leaves out:
compiler.allocation) or declared in the intent and checked here. This
module owns that check over a set of loaded intents. It is pure: the claims
of an intent are a function of the intent and the backend it is compiled for,
mirroring what compiler/tproxy.py and compiler/ebpf.py lower (a unit test
compares them with the compiled objects). What is refused, each naming both
sides at FILE:LINE:COL:

- `vip`: the same VIP:port/protocol balanced by two intents.
- `interception`: rules of one direction that can match the same connection
  (a common protocol, overlapping destinations and ports, sources unless both
  give disjoint ones, for inbound rules a common interface: no list means any
  but lo, `eth*` is a prefix) and hand it to different proxy ports. Rules
  sending it to the same proxy are accepted: the connection ends where both
  intents want it. Exclusions are not subtracted (a pair disjoint only through
  `exclude` is refused: write the split into destinations or ports instead).
  Outbound rules of two ebpf intents only overlap when their cgroups are the
  same or nested: their programs see only their cgroup's processes.
- `routing-table`: one routing table id in two intents (routing.tables[].id,
  interception.routingTable when the intent has interception rules; on the
  ebpf backend each inbound rule takes interception.routingTable + its index
  among the inbound rules). Each intent sweeps the routes of protocol 158 in
  its tables, so one would remove the other's.
- `rule-priority`: one ip rule priority in two intents (routing.rules[].priority,
  interception.rulePriority when the intent has interception rules; inbound
  ones on ebpf). Rules of equal priority run in the order they were added.
- `fwmark`: interception marks (tproxy backend) that overlap under both masks.
- `cgroup`: two ebpf intents attaching socket programs (services or outbound
  interception) to the same cgroup. Nested cgroups are not refused.

Two ebpf intents may filter one interface: each has its own tc filter (handle
allocated per intent, reconciler/drivers/bpf.py), a packet passes only if both
allow it, as with two nft tables hooked at one point.

Not checked here (see reconciler/applied.py for what is checked against the
intents already applied in a kernel): a routing.rules fwmark selector of one
intent matching another's interception mark, ports the proxies themselves
listen on.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import cidr
from .allocation import assign_slots, default_cgroup, in_target, marks_overlap, with_slot
from .errors import DocPath, Problem
from .intent import InterceptionRule, NetworkIntent, parse_port_range
from .loader import LoadedIntent
from .routing import parse_mark

ANY_PORT = (0, 65535)

REASONS = {
    "vip": (
        "one VIP:port/protocol can be balanced by one intent only (each would translate its connections to "
        "its own backends); merge the services into one intent or change one of them"
    ),
    "routing-table": (
        "two intents cannot own one routing table: each sweeps the routes of protocol 158 in the tables it "
        "owns, so applying or destroying one would remove the other's routes; give one of them another id"
    ),
    "rule-priority": (
        "ip rules of equal priority are evaluated in the order they were added, so which intent's rule wins "
        "would depend on the order of applies; give one of them another priority"
    ),
    "fwmark": (
        "a packet one intent marks for its proxy would also match the other's mark rules (its ip rule and "
        "its hand-over to the proxy); choose marks that differ under both masks"
    ),
    "cgroup": (
        "both intents' socket programs would rewrite the connections of the same processes, with exclusions "
        "and counters that know nothing of each other; give each intent its own spec.ebpf.cgroup"
    ),
    "interception": (
        "which intent takes such a connection would depend on the order the kernel runs their hooks; make "
        "the rules disjoint (protocols, destinations, ports or interfaces) or send both to the same proxy"
    ),
}


@dataclass(frozen=True)
class Claim:
    """A resource an intent takes: what (`resource`, `value`), where it is written (`path`), how it is named."""

    resource: str
    value: Hashable
    path: DocPath
    label: str
    """The resource as a message names it, with where it comes from: `routing table 200 (routing.tables 'b')`."""
    hint: str = ""
    """Said when the value is a default every intent shares."""


@dataclass(frozen=True)
class Conflict:
    """Two intents taking one resource: `second` (later in input order) collides with `first`."""

    resource: str
    first: LoadedIntent
    first_path: DocPath
    first_label: str
    second: LoadedIntent
    second_path: DocPath
    second_label: str
    detail: str = ""
    hint: str = ""

    def message(self) -> str:
        other = self.first.intent.metadata.name
        detail = f": {self.detail}" if self.detail else ""
        hint = f" ({self.hint})" if self.hint else ""
        return (f"{self.second_label} conflicts with {self.first_label} of intent {other!r} at "
                f"{self.first.where(self.first_path)}{detail}: {REASONS[self.resource]}{hint}")

    def problem(self) -> Problem:
        (problem,) = self.second.problems_at([(self.second_path, self.message())])
        return problem


def conflicts(loaded: Sequence[LoadedIntent], backend: str | None = None,
              slots: Mapping[str, int] | None = None, netns: str | None = None) -> list[Problem]:
    """Every conflict between the intents, as a problem at the later one's FILE:LINE:COL naming the earlier
    one's (`backend` overrides each intent's spec.backend, as `--backend` does)."""
    return [c.problem() for c in find(loaded, backend, slots, netns)]


def find(loaded: Sequence[LoadedIntent], backend: str | None = None,
         slots: Mapping[str, int] | None = None, netns: str | None = None) -> list[Conflict]:
    """Every conflict between the intents, each once: a later intent against the first that took the resource.

    The interception settings an intent leaves out are its slot's (compiler.allocation): `slots` as the
    reconciler allocated them against a kernel, else as the inputs alone give them; the default cgroup
    is the one of target namespace `netns` (compiler.allocation.default_cgroup)."""
    if len(loaded) < 2:
        return []
    if slots is None:
        intents = [item.intent for item in loaded]
        slots = assign_slots(intents, [backend or i.spec.backend for i in intents])
    found: list[Conflict] = []
    taken: dict[tuple[str, Hashable], tuple[LoadedIntent, Claim]] = {}
    marks: list[tuple[LoadedIntent, Claim]] = []
    rules: list[tuple[LoadedIntent, int, InterceptionRule, _Match]] = []
    for item in loaded:
        intent = in_target(with_slot(item.intent, slots.get(item.intent.metadata.name, 0)), netns)
        chosen = backend or intent.spec.backend
        mine: set[tuple[str, Hashable]] = set()
        for claim in claims(intent, chosen):
            if claim.resource == "fwmark":
                for other, theirs in marks:
                    if marks_overlap(claim.value, theirs.value):  # type: ignore[arg-type]
                        found.append(_conflict(other, theirs, item, claim))
                marks.append((item, claim))
                continue
            key = (claim.resource, claim.value)
            if key in mine:
                continue  # the intent's own business (semantics.py checks what must be unique within one)
            mine.add(key)
            if key in taken:
                found.append(_conflict(*taken[key], item, claim))
            else:
                taken[key] = (item, claim)
        own: list[tuple[LoadedIntent, int, InterceptionRule, _Match]] = []
        for index, rule in enumerate(intent.spec.interception.rules):
            match = _Match.of(intent, rule, chosen)
            for other, other_index, other_rule, other_match in rules:
                if other_rule.proxy_port == rule.proxy_port:
                    continue
                overlap = match.overlap(other_match)
                if overlap:
                    found.append(Conflict(
                        "interception", other, ("spec", "interception", "rules", other_index),
                        f"rule {other_rule.name!r} (to proxy port {other_rule.proxy_port})",
                        item, ("spec", "interception", "rules", index),
                        f"{rule.direction} interception rule {rule.name!r} (to proxy port {rule.proxy_port})",
                        f"both match {overlap}"))
            own.append((item, index, rule, match))
        rules += own
    return found


def _conflict(first: LoadedIntent, theirs: Claim, second: LoadedIntent, mine: Claim) -> Conflict:
    return Conflict(mine.resource, first, theirs.path, theirs.label, second, mine.path, mine.label,
                    hint=mine.hint or theirs.hint)


# ------------------------------------------------------------------------ claims
def claims(intent: NetworkIntent, backend: str | None = None) -> list[Claim]:
    """The resources `intent` takes when compiled for `backend` (default: its spec.backend)."""
    chosen = backend or intent.spec.backend
    return [*_vips(intent), *_tables(intent, chosen), *_priorities(intent, chosen), *_marks(intent, chosen),
            *_cgroups(intent, chosen)]


def _vips(intent: NetworkIntent) -> Iterator[Claim]:
    for index, service in enumerate(intent.spec.load_balancing.services):
        yield Claim("vip", (service.vip, service.port, service.protocol),
                    ("spec", "loadBalancing", "services", index, "vip"),
                    f"VIP {_hostport(service.vip, service.port)}/{service.protocol} of service {service.name!r}")


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _inbound(intent: NetworkIntent) -> list[tuple[int, InterceptionRule]]:
    return [(i, r) for i, r in enumerate(intent.spec.interception.rules) if r.direction == "inbound"]


def _intercepts_with_routing(intent: NetworkIntent, backend: str) -> bool:
    """Whether the interception section takes its routing table, rule priority (and on tproxy its mark)."""
    rules = intent.spec.interception.rules
    return bool(rules) if backend == "tproxy" else bool(_inbound(intent))


def _setting(intent: NetworkIntent, field: str, alias: str) -> tuple[DocPath, str, str]:
    """(path, how it is named, hint) of an interception setting. The intents compared have their slots filled
    in (compiler.allocation), so a value the file does not write is the intent's allocated one."""
    written = field in intent.spec.interception.model_fields_set
    return (("spec", "interception", alias), f"interception.{alias}" + ("" if written else ", the default"), "")


def _tables(intent: NetworkIntent, backend: str) -> Iterator[Claim]:
    for index, table in enumerate(intent.spec.routing.tables):
        yield Claim("routing-table", table.id, ("spec", "routing", "tables", index, "id"),
                    f"routing table {table.id} (routing.tables {table.name!r})")
    section = intent.spec.interception
    if not _intercepts_with_routing(intent, backend):
        return
    path, label, hint = _setting(intent, "routing_table", "routingTable")
    if backend == "tproxy":
        yield Claim("routing-table", section.routing_table, path,
                    f"routing table {section.routing_table} ({label})", hint)
        return
    # ebpf: one table per inbound rule, from interception.routingTable on (compiler/ebpf.py).
    for offset, (index, rule) in enumerate(_inbound(intent)):
        table_id = section.routing_table + offset
        where = path if "routing_table" in section.model_fields_set else ("spec", "interception", "rules", index)
        extra = f" + {offset}" if offset else ""
        yield Claim("routing-table", table_id, where,
                    f"routing table {table_id} ({label}{extra}, inbound rule {rule.name!r} on the ebpf backend)", hint)


def _priorities(intent: NetworkIntent, backend: str) -> Iterator[Claim]:
    for index, rule in enumerate(intent.spec.routing.rules):
        yield Claim("rule-priority", rule.priority, ("spec", "routing", "rules", index, "priority"),
                    f"ip rule priority {rule.priority} (routing.rules {rule.name!r})")
    if _intercepts_with_routing(intent, backend):
        path, label, hint = _setting(intent, "rule_priority", "rulePriority")
        priority = intent.spec.interception.rule_priority
        yield Claim("rule-priority", priority, path, f"ip rule priority {priority} ({label})", hint)


def _marks(intent: NetworkIntent, backend: str) -> Iterator[Claim]:
    if backend != "tproxy" or not intent.spec.interception.rules:
        return  # the ebpf backend intercepts without marks
    path, label, hint = _setting(intent, "fwmark", "fwmark")
    mark, mask = parse_mark(intent.spec.interception.fwmark)
    yield Claim("fwmark", (mark, mask), path, f"fwmark {mark:#x}/{mask:#x} ({label})", hint)


def ebpf_cgroup(intent: NetworkIntent) -> str:
    """The cgroup the ebpf backend attaches socket programs to (compiler/ebpf.py's rule)."""
    return intent.spec.ebpf.cgroup or default_cgroup(intent.metadata.name, None)


def _uses_cgroup(intent: NetworkIntent) -> bool:
    return bool(intent.spec.load_balancing.services) or any(
        r.direction == "outbound" for r in intent.spec.interception.rules)


def _cgroups(intent: NetworkIntent, backend: str) -> Iterator[Claim]:
    if backend != "ebpf" or not _uses_cgroup(intent):
        return
    written = intent.spec.ebpf.cgroup is not None
    cgroup = ebpf_cgroup(intent)
    yield Claim("cgroup", cgroup, ("spec", "ebpf", "cgroup"),
                f"cgroup {cgroup} (spec.ebpf.cgroup{'' if written else ', the default'})")


# ------------------------------------------------------------------ interception
Ranges = dict[int, list[tuple[int, int]]]


def _ranges(cidrs: Sequence[str]) -> Ranges | None:
    """Merged address ranges per family, or None for 'any address'."""
    if not cidrs:
        return None
    spans: Ranges = {}
    for text in cidrs:
        family, value, prefixlen = cidr.parse(text)
        bits = 32 if family == 4 else 128
        spans.setdefault(family, []).append((value, value + (1 << (bits - prefixlen)) - 1))
    merged: Ranges = {}
    for family, items in spans.items():
        items.sort()
        out: list[tuple[int, int]] = []
        for low, high in items:
            if out and low <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], high))
            else:
                out.append((low, high))
        merged[family] = out
    return merged


def _common_range(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The first range both sorted, merged lists hold (two pointers: linear in their lengths)."""
    i = j = 0
    while i < len(a) and j < len(b):
        low, high = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if low <= high:
            return low, high
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return None


def _common_addresses(a: Ranges | None, b: Ranges | None) -> str | None:
    """Text of addresses both match ('any' when neither lists any), or None when they are disjoint."""
    if a is None and b is None:
        return "any address"
    if a is None or b is None:
        listed = a if a is not None else b
        assert listed is not None
        family = min(listed)
        return _range_text(family, *listed[family][0])
    for family in sorted(a.keys() & b.keys()):
        common = _common_range(a[family], b[family])
        if common is not None:
            return _range_text(family, *common)
    return None


def _range_text(family: int, low: int, high: int) -> str:
    make = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    networks = list(ipaddress.summarize_address_range(make(low), make(high)))
    return str(networks[0]) + (" and more" if len(networks) > 1 else "")


def _ports(specs: Sequence[int | str]) -> list[tuple[int, int]]:
    return sorted(parse_port_range(p) for p in specs) or [ANY_PORT]


def _interface_matches(a: str, b: str) -> str | None:
    """An interface both names (`eth*` is a prefix) match, as text, or None."""
    if a.endswith("*") and b.endswith("*"):
        return max(a, b, key=len) if a[:-1].startswith(b[:-1]) or b[:-1].startswith(a[:-1]) else None
    if a.endswith("*"):
        return b if b.startswith(a[:-1]) else None
    if b.endswith("*"):
        return a if a.startswith(b[:-1]) else None
    return a if a == b else None


def _common_interface(a: Sequence[str], b: Sequence[str]) -> str | None:
    """An interface both inbound rules take connections from (no list: any but lo), or None."""
    if not a and not b:
        return "any interface but lo"
    if not a or not b:
        listed = a or b
        return next((name for name in listed if name != "lo"), None)
    for x in a:
        for y in b:
            found = _interface_matches(x, y)
            if found:
                return found
    return None


def _cgroups_related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


@dataclass(frozen=True)
class _Match:
    """What one interception rule can match, prepared for comparing many pairs."""

    direction: str
    protocols: frozenset[str]
    destinations: Ranges | None
    sources: Ranges | None
    ports: tuple[tuple[int, int], ...]
    interfaces: tuple[str, ...]
    cgroup: str | None  # ebpf outbound: only the processes of this cgroup

    @classmethod
    def of(cls, intent: NetworkIntent, rule: InterceptionRule, backend: str) -> _Match:
        cgroup = ebpf_cgroup(intent) if backend == "ebpf" and rule.direction == "outbound" else None
        return cls(rule.direction, frozenset(rule.protocols), _ranges(rule.destinations), _ranges(rule.sources),
                   tuple(_ports(rule.ports)), tuple(rule.interfaces), cgroup)

    def overlap(self, other: _Match) -> str | None:
        """Text of connections both rules can match, or None when they are disjoint."""
        if self.direction != other.direction:
            return None
        protocols = sorted(self.protocols & other.protocols)
        if not protocols:
            return None
        if self.cgroup is not None and other.cgroup is not None and not _cgroups_related(self.cgroup, other.cgroup):
            return None
        destinations = _common_addresses(self.destinations, other.destinations)
        if destinations is None:
            return None
        if self.sources is not None and other.sources is not None and _common_addresses(
                self.sources, other.sources) is None:
            return None
        ports = next((r for a in self.ports for b in other.ports if (r := _common_range([a], [b]))), None)
        if ports is None:
            return None
        words = [f"{protocols[0]} connections to {destinations}"]
        if ports != ANY_PORT:
            words.append(f"port {ports[0]}" if ports[0] == ports[1] else f"ports {ports[0]}-{ports[1]}")
        if self.direction == "inbound":
            interface = _common_interface(self.interfaces, other.interfaces)
            if interface is None:
                return None
            words.append(f"arriving on {interface}")
        elif self.cgroup is not None and other.cgroup is not None:
            words.append(f"from processes of cgroup {max(self.cgroup, other.cgroup, key=len)}")
        return " ".join(words)


# ------------------------------------------------------------ against applied intents
def claims_record(intent: NetworkIntent, backend: str) -> dict[str, Any]:
    """What an applied intent takes that another intent's apply must check and the kernel cannot tell
    (reconciler.ownership keeps it): its interception rules and, on ebpf, the cgroup of its socket
    programs. `intent` as applied in its target (compiler.allocation.in_target). Plain data (JSON)."""
    record: dict[str, Any] = {"backend": backend}
    if backend == "ebpf" and _uses_cgroup(intent):
        record["cgroup"] = ebpf_cgroup(intent)
    rules = intent.spec.interception.rules
    if rules:
        record["interception"] = [rule.model_dump(mode="json", by_alias=True) for rule in rules]
    return record


def against_record(intent: NetworkIntent, backend: str, other: str, record: Mapping[str, Any],
                   where: str) -> list[tuple[DocPath, str]]:
    """Collisions of `intent` (as applied in the target) with intent `other` applied there, from its
    claims_record: overlapping interception to another proxy, the same socket-program cgroup."""
    found: list[tuple[DocPath, str]] = []
    owner = f"intent {other!r} applied in {where}"
    theirs_backend = str(record.get("backend", "tproxy"))
    cgroup = record.get("cgroup")
    for claim in _cgroups(intent, backend):
        if cgroup is not None and claim.value == cgroup:
            found.append((claim.path, f"{claim.label} conflicts with {owner}, whose socket programs are attached "
                                      f"there: {REASONS['cgroup']}"))
    theirs: list[tuple[InterceptionRule, _Match]] = []
    for data in record.get("interception", []) or []:
        try:
            rule = InterceptionRule.model_validate(data)
        except ValueError:
            continue  # a record of another version of kernform: nothing to compare it with
        match = _Match.of(intent, rule, theirs_backend)
        if match.cgroup is not None:
            match = dataclasses.replace(match, cgroup=str(cgroup) if cgroup else None)
        theirs.append((rule, match))
    for index, rule in enumerate(intent.spec.interception.rules):
        mine = _Match.of(intent, rule, backend)
        for other_rule, other_match in theirs:
            if other_rule.proxy_port == rule.proxy_port:
                continue
            overlap = mine.overlap(other_match)
            if overlap:
                found.append((("spec", "interception", "rules", index), (
                    f"{rule.direction} interception rule {rule.name!r} (to proxy port {rule.proxy_port}) conflicts "
                    f"with rule {other_rule.name!r} (to proxy port {other_rule.proxy_port}) of {owner}: both "
                    f"match {overlap}: {REASONS['interception']}")))
                break
    return found
