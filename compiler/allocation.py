"""The interception resources an intent takes when it does not name them: a slot per intent.

Interception needs a packet mark (tproxy backend), a routing table holding
`local default dev lo` (one per inbound rule on the ebpf backend) and an ip
rule priority. Written in the intent (interception.fwmark, routingTable,
rulePriority) they are declared, and compiler/conflicts.py checks them against
other intents. Left out, they come from the intent's slot:

    slot n: fwmark 0x4b460001 + n (mask 0xffffffff), routing table 7100 + 64 n, priority 100 + n

Slot 0 gives the values the fields default to, so one intent alone compiles as
it always did. Two intents of one host get different slots: the reconciler
keeps an applied intent's slot (recorded in its nft table, set
`interception_slot`, so a fresh process finds it) and gives a new intent the
lowest slot whose values nothing else takes (another intent's slot, routing
tables, ip rule priorities and marks, read from the kernel; the claims of the
other intents of the same command). Without a kernel (validate, compile) the
intents of the inputs are given slots in input order.

Pure: what is taken is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .intent import NetworkIntent
from .routing import parse_mark

SLOT_SET = "interception_slot"
MARK_BASE = 0x4B460001
TABLE_BASE = 7100
TABLE_STRIDE = 64
"""Tables per slot: room for 64 inbound rules on the ebpf backend (one table each) before the next slot's."""
PRIORITY_BASE = 100
MAX_SLOTS = 1024

_FIELDS = ("fwmark", "routing_table", "rule_priority")


def slot_values(slot: int) -> tuple[str, int, int]:
    """(fwmark, routing table, rule priority) of `slot`."""
    return f"{MARK_BASE + slot:#x}/0xffffffff", TABLE_BASE + TABLE_STRIDE * slot, PRIORITY_BASE + slot


def defaulted(intent: NetworkIntent) -> tuple[str, ...]:
    """The interception settings `intent` leaves to its slot (none when it has no interception rule)."""
    section = intent.spec.interception
    if not section.rules:
        return ()
    return tuple(f for f in _FIELDS if f not in section.model_fields_set)


def needs_slot(intent: NetworkIntent) -> bool:
    return bool(defaulted(intent))


def with_slot(intent: NetworkIntent, slot: int) -> NetworkIntent:
    """`intent` with the interception settings it leaves out taken from `slot` (itself when it needs none)."""
    fields = defaulted(intent)
    if not fields:
        return intent
    mark, table, priority = slot_values(slot)
    values = {"fwmark": mark, "routing_table": table, "rule_priority": priority}
    section = intent.spec.interception.model_copy(update={f: values[f] for f in fields})
    # model_copy(update=) marks the fields as set: the result needs no slot, and is stable under with_slot.
    spec = intent.spec.model_copy(update={"interception": section})
    return intent.model_copy(update={"spec": spec})


def default_cgroup(name: str, netns: str | None) -> str:
    """The cgroup the ebpf backend's socket programs attach to when spec.ebpf.cgroup is left out: one per
    (intent, target), so an intent applied in several namespaces never attaches twice to one cgroup. Siblings,
    not nested (cgroup programs apply to descendants), and `@` never appears in an intent's name."""
    return f"kernform/{name}" if netns is None else f"kernform/{name}@{netns}"


def in_target(intent: NetworkIntent, netns: str | None) -> NetworkIntent:
    """`intent` as applied in `netns` (None: the host's namespace): spec.ebpf.cgroup filled in when left out."""
    if intent.spec.ebpf.cgroup is not None or netns is None:
        return intent
    ebpf = intent.spec.ebpf.model_copy(update={"cgroup": default_cgroup(intent.metadata.name, netns)})
    return intent.model_copy(update={"spec": intent.spec.model_copy(update={"ebpf": ebpf})})


def interception_tables(intent: NetworkIntent, backend: str, table: int) -> set[int]:
    """The routing tables interception takes from `table` on: one (tproxy), one per inbound rule (ebpf)."""
    rules = intent.spec.interception.rules
    if backend == "tproxy":
        return {table} if rules else set()
    return {table + i for i in range(sum(r.direction == "inbound" for r in rules))}


def marks_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether one packet mark can match both (value, mask) pairs: they agree on the bits both masks test."""
    common = a[1] & b[1]
    return (a[0] & common) == (b[0] & common)


@dataclass
class Taken:
    """What other intents hold: slots, routing tables, ip rule priorities, interception marks (value, mask)."""

    slots: set[int] = field(default_factory=set)
    tables: set[int] = field(default_factory=set)
    priorities: set[int] = field(default_factory=set)
    marks: list[tuple[int, int]] = field(default_factory=list)

    def add_intent(self, intent: NetworkIntent, backend: str) -> None:
        """The resources `intent` (slot values filled in) takes compiled for `backend`."""
        spec = intent.spec
        self.tables |= {t.id for t in spec.routing.tables}
        self.priorities |= {r.priority for r in spec.routing.rules}
        section = spec.interception
        tables = interception_tables(intent, backend, section.routing_table)
        if tables:
            self.tables |= tables
            self.priorities.add(section.rule_priority)
        if backend == "tproxy" and section.rules:
            self.marks.append(parse_mark(section.fwmark))


def is_free(intent: NetworkIntent, backend: str, slot: int, taken: Taken) -> bool:
    """Whether the values `intent` takes from `slot` are free: of other intents and of its own declared ones."""
    if slot in taken.slots:
        return False
    fields = defaulted(intent)
    mark, table, priority = slot_values(slot)
    spec = intent.spec
    own_tables = {t.id for t in spec.routing.tables}
    if "routing_table" in fields and interception_tables(intent, backend, table) & (taken.tables | own_tables):
        return False
    own_priorities = {r.priority for r in spec.routing.rules}
    if ("rule_priority" in fields and interception_tables(intent, backend, 0)
            and priority in taken.priorities | own_priorities):
        return False
    return not ("fwmark" in fields and backend == "tproxy"
                and any(marks_overlap(parse_mark(mark), other) for other in taken.marks))


def choose_slot(intent: NetworkIntent, backend: str, taken: Taken, recorded: int | None = None) -> int:
    """The slot `intent` gets: its recorded one while still free, else the lowest free one (slot 0 when nothing
    is free: compiler/conflicts.py and the apply-time checks then name what it collides with)."""
    if recorded is not None and is_free(intent, backend, recorded, taken):
        return recorded
    return next((n for n in range(MAX_SLOTS) if is_free(intent, backend, n, taken)), 0)


def assign_slots(intents: Sequence[NetworkIntent], backends: Sequence[str], taken: Taken | None = None,
                 recorded: Mapping[str, int] | None = None) -> dict[str, int]:
    """A slot for every intent of the inputs that needs one, in input order, given what is `taken` outside them
    (applied intents) and the slots `recorded` for those already applied. The inputs' declared resources are
    taken first, so a defaulted intent never lands on a value another intent of the inputs writes."""
    taken = taken if taken is not None else Taken()
    recorded = recorded or {}
    for intent, backend in zip(intents, backends, strict=True):
        if not needs_slot(intent):
            taken.add_intent(intent, backend)
        else:
            _add_declared(taken, intent, backend)
    slots: dict[str, int] = {}
    for intent, backend in zip(intents, backends, strict=True):
        name = intent.metadata.name
        if not needs_slot(intent) or name in slots:
            continue
        slot = choose_slot(intent, backend, taken, recorded.get(name))
        slots[name] = slot
        taken.slots.add(slot)
        taken.add_intent(with_slot(intent, slot), backend)
    return slots


def _add_declared(taken: Taken, intent: NetworkIntent, backend: str) -> None:
    """What an intent that needs a slot declares itself: its routing section and the interception settings
    it writes."""
    spec = intent.spec
    section = spec.interception
    taken.tables |= {t.id for t in spec.routing.tables}
    taken.priorities |= {r.priority for r in spec.routing.rules}
    written = set(_FIELDS) - set(defaulted(intent))
    if "routing_table" in written:
        taken.tables |= interception_tables(intent, backend, section.routing_table)
    if "rule_priority" in written and interception_tables(intent, backend, 0):
        taken.priorities.add(section.rule_priority)
    if "fwmark" in written and backend == "tproxy":
        taken.marks.append(parse_mark(section.fwmark))


def recorded_slot(elements: Iterable[str]) -> int | None:
    """The slot recorded in an intent's nft table (the elements of its set `interception_slot`)."""
    values = sorted(int(e) for e in elements)
    return values[0] if values else None
