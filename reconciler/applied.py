"""What the intents already applied in a target hold, read back from the kernel, and who a new intent would collide with.

compiler/conflicts.py refuses conflicts within the intents given to one
command. An apply must also respect intents applied earlier from files this
command never sees (another repository, another team), and the kernel keeps no
copy of their files: their claims are reconstructed from what the kernel holds
and from the ownership records kernform leaves there.

Checked, for each other intent applied in the target (its name from its nft
table `kernform-<name>` or its BPF pin directory, reconciler.status.applied_intents):
- routing tables: the set `owned_routing_tables` of its nft table (both
  backends keep it) against the routing tables the new intent's desired
  state owns (DesiredState.routing_tables: the tables of its routes and rules
  and every routing.tables id);
- ip rule priorities: its ip rules of protocol 158 in those tables against the
  priorities of the new intent's desired ip rules;
- interception marks: its fwmark rules whose table holds a `local default` route
  (tproxy interception hands marked packets to the proxy that way) against the
  new intent's interception.fwmark (tproxy).

- VIPs: the VIP record of its nft table (compiler.objects.VIP_SETS, both
  backends) against the new intent's services.

- interception rules and the cgroup of socket programs: from the record each
  apply leaves (reconciler.ownership, compiler.conflicts.claims_record),
  compared as compiler/conflicts.py compares two files' intents (overlapping
  interception to another proxy, the same cgroup). An intent applied by a
  kernform that wrote no such record is not compared this way.

Not checked: a routing.rules fwmark selector of the new intent against
another's mark.

An applied intent that is also in the inputs is compared as it is applied now
only when it comes later in the input order (it still holds its resources when
the earlier one is applied); the ones before it are replaced by their new
desired state first, which compiler/conflicts.py compares.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from compiler.allocation import Taken, assign_slots, in_target, needs_slot, with_slot
from compiler.conflicts import REASONS, against_record, claims, marks_overlap
from compiler.errors import DocPath, Problem
from compiler.intent import NetworkIntent
from compiler.loader import LoadedIntent
from compiler.objects import OWNED_TABLES_SET, VIP_SETS, DesiredState, IpRoute, IpRule, NftElement, nft_table_name
from compiler.routing import parse_mark

from . import ownership
from .observe import Target
from .status import applied_intents

_LOCAL_DEFAULT = frozenset({"0.0.0.0/0", "::/0"})


@dataclass(frozen=True)
class AppliedClaims:
    """The routing resources an applied intent holds, as the kernel shows them."""

    intent: str
    tables: frozenset[int]
    rules: tuple[IpRule, ...]
    marks: tuple[IpRule, ...]
    """Its interception rules: fwmark rules looking up a table that holds a local default route."""
    vips: frozenset[tuple[str, int, str]] = frozenset()
    """The VIPs it balances (address, port, protocol), from its VIP record (compiler.objects.VIP_SETS)."""
    record: Mapping[str, Any] = field(default_factory=dict)
    """Its interception rules and cgroup as recorded when it was applied (compiler.conflicts.claims_record)."""


def read_applied(target: Target, intent: str) -> AppliedClaims:
    """What `intent` holds in `target` (nothing when it has no nft table: no routing of its own)."""
    observation = target.nft.observe(nft_table_name(intent))
    tables = observation.owned_tables if observation.exists else frozenset()
    objects = target.netlink.observe(tables) if tables else []
    rules = tuple(o for o in objects if isinstance(o, IpRule))
    local = {o.table for o in objects if isinstance(o, IpRoute) and o.type == "local"
             and o.destination in _LOCAL_DEFAULT}
    marks = tuple(r for r in rules if r.fwmark is not None and r.table in local)
    record = {name for name, _ in VIP_SETS.values()}
    vips = set()
    for o in observation.objects if observation.exists else ():
        if isinstance(o, NftElement) and o.set in record:
            address, protocol, port = o.element.split(" . ")
            vips.add((address, int(port), protocol))
    return AppliedClaims(intent, frozenset(tables), rules, marks, frozenset(vips),
                         ownership.recorded_claims(target.netns, intent))


def allocate_slots(target: Target | None, loaded: Sequence[LoadedIntent], backend: str | None) -> dict[str, int]:
    """The interception slot of every input intent that needs one (compiler.allocation): an applied intent
    keeps the slot recorded in its nft table, a new one takes the lowest slot whose values neither the
    intents applied in `target` (their slots, routing tables, ip rule priorities, marks) nor the other
    inputs take. Without a target, the inputs only."""
    if not any(needs_slot(item.intent) for item in loaded):
        return {}  # nothing to allocate: no kernel reads (a watch pass over a changed file stays cheap)
    names = {item.intent.metadata.name for item in loaded}
    taken = Taken()
    recorded: dict[str, int] = {}
    for name in applied_intents(target) if target is not None else ():
        slot = target.nft.observe(nft_table_name(name)).interception_slot  # type: ignore[union-attr]
        if name in names:
            if slot is not None:
                recorded[name] = slot
            continue
        if slot is not None:
            taken.slots.add(slot)
        held = read_applied(target, name)  # type: ignore[arg-type]
        taken.tables |= held.tables
        taken.priorities |= {r.priority for r in held.rules}
        taken.marks += [(r.fwmark, r.fwmask if r.fwmask is not None else 0xFFFFFFFF)
                        for r in held.marks if r.fwmark is not None]
    intents = [item.intent for item in loaded]
    return assign_slots(intents, [backend or i.spec.backend for i in intents], taken, recorded)


def applied_conflicts(target: Target, items: Sequence[tuple[LoadedIntent, DesiredState]],
                      slots: Mapping[str, int] | None = None) -> list[Problem]:
    """Every collision of the intents to apply (in this order) with intents applied in `target`, each at the
    new intent's FILE:LINE:COL, naming the applied intent and the kernel object that holds the resource."""
    applied = applied_intents(target)
    if not applied:
        return []
    order = [loaded.intent.metadata.name for loaded, _ in items]
    cache: dict[str, AppliedClaims] = {}
    problems: list[Problem] = []
    for position, (loaded, desired) in enumerate(items):
        earlier = set(order[:position + 1])
        later = set(order[position + 1:])
        for name in applied:
            if name in earlier:
                continue  # itself, or replaced by its new desired state before this one is applied
            if name not in cache:
                cache[name] = read_applied(target, name)
            intent = in_target(with_slot(loaded.intent, (slots or {}).get(loaded.intent.metadata.name, 0)),
                               target.netns)
            found = _collisions(loaded, intent, desired, cache[name], target.label)
            if name in later:
                note = (f" (intent {name!r} is also in the inputs, after this one, and still holds it when this one "
                        "is applied: put it first if its new version gives the resource up)")
                found = [(path, message + note) for path, message in found]
            problems += loaded.problems_at(found)
    return problems


def _collisions(loaded: LoadedIntent, intent: NetworkIntent, desired: DesiredState, other: AppliedClaims,
                where: str) -> list[tuple[DocPath, str]]:
    """`intent` is `loaded`'s with its slot's interception settings filled in."""
    mine = claims(intent, desired.backend)
    index: dict[tuple[str, Hashable], tuple[DocPath, str]] = {}
    for claim in mine:
        index.setdefault((claim.resource, claim.value), (claim.path, claim.label))
    found: list[tuple[DocPath, str]] = []
    owner = f"intent {other.intent!r} applied in {where}"
    for claim in mine:
        if claim.resource != "vip":
            continue
        address, port, protocol = cast(tuple[str, int, str], claim.value)
        if (ipaddress.ip_address(address).compressed, port, protocol) in other.vips:
            found.append((claim.path, (
                f"{claim.label} conflicts with {owner}, which balances that VIP (recorded in nft table "
                f"{nft_table_name(other.intent)}): {REASONS['vip']}")))
    for table in sorted(desired.routing_tables & other.tables):
        path, label = index.get(("routing-table", table), (("metadata", "name"), f"routing table {table}"))
        found.append((path, (
            f"{label} conflicts with {owner}, which owns routing table {table} (recorded in nft table "
            f"{nft_table_name(other.intent)}, set {OWNED_TABLES_SET}): {REASONS['routing-table']}")))
    theirs: dict[int, IpRule] = {}
    for rule in other.rules:
        theirs.setdefault(rule.priority, rule)
    priorities = sorted({o.priority for o in desired.objects if isinstance(o, IpRule)})
    for priority in priorities:
        if priority in theirs:
            path, label = index.get(("rule-priority", priority),
                                    (("metadata", "name"), f"ip rule priority {priority}"))
            found.append((path, (
                f"{label} conflicts with {owner}, whose ip rule `{theirs[priority].describe()}` has that "
                f"priority: {REASONS['rule-priority']}")))
    if desired.backend == "tproxy" and intent.spec.interception.rules:
        mark = parse_mark(intent.spec.interception.fwmark)
        for rule in other.marks:
            assert rule.fwmark is not None
            if marks_overlap(mark, (rule.fwmark, rule.fwmask if rule.fwmask is not None else 0xFFFFFFFF)):
                path, label = index.get(("fwmark", mark), (("spec", "interception", "fwmark"), "interception.fwmark"))
                found.append((path, (
                    f"{label} conflicts with {owner}, whose interception rule `{rule.describe()}` takes packets "
                    f"with that mark: {REASONS['fwmark']}")))
                break
    found += against_record(intent, desired.backend, other.intent, other.record, where)
    return found
