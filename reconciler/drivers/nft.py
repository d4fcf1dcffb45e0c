"""The nftables driver: the only code that reads or writes nft state.

Ownership: kernform owns exactly the tables named `kernform-<intent>` in the
inet family, and everything inside them; any other table is foreign and never
read for diffing, changed or deleted, even when it hooks the same places.

Writes are text commands handed to libnftables as one buffer, which the kernel
applies as one atomic transaction: either the whole change lands or nothing
does; a plan that only adds or removes elements of address interval sets goes
straight to the kernel as one raw batch instead (nfnetlink.py: libnftables
would first load each whole set). Reads use nft's JSON output. Rules and sets
carry `kf:` comments with a digest of what we wrote, so reading back needs no
parser of nft expressions.

The last observation is kept with the ruleset generation it was read at: the
next `observe` reads the generation (one netlink round trip) and lists the
table again only if any nft transaction has committed since. After a raw batch
that moved the generation by exactly one, the kept observation is updated with
the batch's elements instead of being listed again: the kernel refuses a batch
tagged with a stale generation, so nothing else can have happened in between.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from compiler.allocation import SLOT_SET, recorded_slot
from compiler.errors import KernelError
from compiler.objects import (
    NFT_FAMILY,
    NFT_TABLE_PREFIX,
    OWNED_TABLES_SET,
    KernelObject,
    NftChain,
    NftCounter,
    NftElement,
    NftRule,
    NftSet,
    NftTable,
    ObjectKey,
    index_by_key,
)

from ..netns import entered
from ..plan import Action
from . import nfnetlink
from .nfnetlink import ElementChanges, NfTablesSocket

# Debian ships the libnftables binding outside the venv's path.
if "/usr/lib/python3/dist-packages" not in sys.path:
    sys.path.append("/usr/lib/python3/dist-packages")
import nftables  # noqa: E402

ELEMENTS_PER_COMMAND = 4000


@dataclass(frozen=True)
class NftObservation:
    """Our table as the kernel holds it (at ruleset `generation`, when known): objects to diff."""

    table: str
    objects: tuple[KernelObject, ...]
    snapshot: tuple[dict[str, Any], ...] | None
    counters: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    generation: int | None = None

    @property
    def exists(self) -> bool:
        return self.snapshot is not None

    @functools.cached_property
    def index(self) -> dict[ObjectKey, KernelObject]:
        return index_by_key(self.objects)

    @functools.cached_property
    def owned_tables(self) -> frozenset[int]:
        """The routing tables recorded in our table as the intent's (to sweep those it no longer wants)."""
        return frozenset(int(o.element) for o in self.objects
                         if isinstance(o, NftElement) and o.set == OWNED_TABLES_SET)

    @property
    def interception_slot(self) -> int | None:
        """The interception slot recorded in our table (compiler.allocation), None when none is."""
        return recorded_slot(o.element for o in self.objects if isinstance(o, NftElement) and o.set == SLOT_SET)

    def with_elements(self, actions: Sequence[Action], generation: int) -> NftObservation:
        """This observation after element `actions` were carried out, at `generation`."""
        index = dict(self.index)
        for action in actions:
            if action.op == "remove":
                del index[action.key]
            else:
                assert action.new is not None
                index[action.key] = action.new
        updated = NftObservation(self.table, tuple(index.values()), self.snapshot, self.counters, generation)
        updated.__dict__["index"] = index
        if not any(getattr(a.new or a.old, "set", None) == OWNED_TABLES_SET for a in actions):
            updated.__dict__["owned_tables"] = self.owned_tables
        return updated


class NftDriver:
    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        with entered(netns):
            # The context's netlink socket is bound to the namespace it was created in.
            self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(True)
        self._text: nftables.Nftables | None = None
        self._raw: NfTablesSocket | None = None
        self._known: NftObservation | None = None
        self._adopted: NftObservation | None = None
        # Rule text digest -> digest of the kernel's reading of that text (content_digest), learned from
        # the kernel right after writing it; a rule whose text is here is written with it at once.
        self._contents: dict[str, str] = {}
        self.operations = 0

    @property
    def raw(self) -> NfTablesSocket:
        if self._raw is None:
            self._raw = NfTablesSocket(self.netns)
        return self._raw

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def forget(self) -> None:
        """List the table again on the next observe, whatever the generation says."""
        self._known = None

    def adopt(self, desired: Mapping[ObjectKey, KernelObject]) -> None:
        """The kernel was verified to hold `desired`: keep the desired objects themselves as the observation,
        so the next diff against a compile that shares them settles them by identity."""
        known = self._known
        if known is None or self._adopted is known:
            return
        index = {key: desired.get(key, obj) for key, obj in known.index.items()}
        adopted = NftObservation(known.table, tuple(index.values()), known.snapshot, known.counters, known.generation)
        adopted.__dict__["index"] = index
        adopted.__dict__["owned_tables"] = known.owned_tables
        self._known = self._adopted = adopted

    # ------------------------------------------------------------------ reading
    def _run(self, command: str) -> str:
        rc, output, error = self._nft.cmd(command)
        if rc != 0:
            raise KernelError(f"nft: {error.strip() or 'command failed'} (in: {command[:200]})")
        return str(output)

    def tables(self) -> list[str]:
        """Names of the kernform tables in this namespace (one per applied intent)."""
        return sorted(name for name in self.raw.table_names() if name.startswith(NFT_TABLE_PREFIX))

    def observe(self, table: str) -> NftObservation:
        # Read before listing: a transaction between the two makes the kept generation stale, never wrong.
        generation = self.raw.generation()
        known = self._known
        if known is not None and known.table == table and known.generation == generation:
            return known
        rc, output, _ = self._nft.cmd(f"list table {NFT_FAMILY} {table}")
        if rc != 0:
            # A missing table is the normal state before the first apply.
            if table not in self.tables():
                observation = NftObservation(table, (), None, generation=generation)
                self._known = observation
                return observation
            raise KernelError(f"nft: cannot list table {table}")
        items = [item for item in json.loads(output)["nftables"] if "metainfo" not in item]
        observation = _parse_table(table, items, generation, self._contents)
        self._known = observation
        return observation

    def counters(self, table: str) -> dict[str, tuple[int, int]]:
        """(packets, bytes) of every named counter in `table`, read now (never from a kept observation)."""
        rc, output, _ = self._nft.cmd(f"list counters table {NFT_FAMILY} {table}")
        if rc != 0:
            return {}
        return {item["counter"]["name"]: (item["counter"].get("packets", 0), item["counter"].get("bytes", 0))
                for item in json.loads(output)["nftables"] if "counter" in item}

    def element_counters(self, table: str) -> dict[str, dict[str, tuple[int, int]]]:
        """Per map with element counters (a service's backends): {map: {value: (packets, bytes)}}, summed
        over the elements that map to the same value, read now."""
        rc, output, _ = self._nft.cmd(f"list table {NFT_FAMILY} {table}")
        if rc != 0:
            return {}
        result: dict[str, dict[str, tuple[int, int]]] = {}
        for item in json.loads(output)["nftables"]:
            body = item.get("map")
            if not isinstance(body, dict):
                continue
            for elem in body.get("elem", []):
                if not isinstance(elem, list) or not isinstance(elem[0], dict) or "elem" not in elem[0]:
                    continue
                counter = elem[0]["elem"].get("counter")
                if not isinstance(counter, dict):
                    continue
                per_value = result.setdefault(body["name"], {})
                value = element_text(elem[1])
                packets, octets = per_value.get(value, (0, 0))
                per_value[value] = (packets + counter.get("packets", 0), octets + counter.get("bytes", 0))
        return result

    # ------------------------------------------------------------------ writing
    def apply(self, actions: Sequence[Action], desired: Iterable[KernelObject], observed: NftObservation,
              desired_index: Mapping[ObjectKey, KernelObject] | None = None) -> int:
        """Carry out the nft actions of a plan in one transaction; returns the number of kernel messages or
        commands sent. Raises GenerationChanged (nothing written) when a raw element batch finds that
        the table may have changed since `observed`: observe and plan again."""
        actions = [a for a in actions if a.kind.startswith("nft.")]
        desired = tuple(desired)
        index = desired_index if desired_index is not None else index_by_key(desired)
        element_sets = raw_element_sets(actions, index, observed)
        if element_sets is not None and observed.generation is not None:
            sent = self.raw.write_elements(observed.table, observed.generation, element_sets)
            generation = self.raw.generation()
            self._known = None
            if generation == observed.generation + 1:
                # Nothing else committed in between (the batch carried the observed generation): the
                # table is the observed one except for the elements this batch touched, and those are
                # read back from the kernel now. Verification compares with the kernel, never with what
                # was sent.
                held = self.raw.read_elements(observed.table, element_sets)
                self._known = observed.with_elements(_held_actions(observed, element_sets, held, index), generation)
            self.operations += sent
            return sent
        written: list[NftRule] = []
        commands = build_batch(actions, desired, observed, self._contents, written)
        if not commands:
            return 0
        self._transaction(commands)
        return len(commands) + self._record_contents(observed.table, desired, written)

    def _record_contents(self, table: str, desired: Sequence[KernelObject], written: Sequence[NftRule]) -> int:
        """Give the rules just `written` without the digest of their content (texts this driver has not seen
        the kernel's reading of yet) that digest: learn it from their chains as listed right after our own
        transaction, then rewrite those chains (only those) with it, in one more transaction."""
        unknown = {r.digest for r in written if r.digest not in self._contents}
        if not unknown:
            return 0
        chains = sorted({r.chain for r in written if r.digest in unknown})
        generation = self.raw.generation()
        # A listing costs libnftables' cache fill whatever its scope: a chain or two, else the table once.
        listings = [f"list chain {NFT_FAMILY} {table} {c}" for c in chains] if len(chains) <= 2 else [
            f"list table {NFT_FAMILY} {table}"]
        items: list[Any] = []
        for listing in listings:
            rc, output, _ = self._nft.cmd(listing)
            if rc != 0:
                return 0
            items += json.loads(output)["nftables"]
        if self.raw.generation() != generation:
            return 0  # someone else committed meanwhile: the rules stay unrecorded, the next pass rewrites them
        for item in items:
            body = item.get("rule")
            if not isinstance(body, dict):
                continue
            rule_id, _, recorded = _comment_digest(body).rpartition(":")
            digest = recorded.partition(".")[0]
            if rule_id and digest in unknown:
                self._contents.setdefault(digest, content_digest(body.get("expr")))
        chains = [c for c in chains if any(r.chain == c and r.digest in self._contents for r in written)]
        if not chains:
            return 0
        rules = sorted((o for o in desired if isinstance(o, NftRule) and o.table == table and o.chain in chains),
                       key=lambda r: (r.chain, r.index))
        commands = [f"flush chain {NFT_FAMILY} {table} {c}" for c in chains]
        commands += [rule_command(r, self._contents) for r in rules]
        self._transaction(commands)
        return len(commands)

    def _transaction(self, commands: Sequence[str]) -> None:
        self._known = None
        rc, _, error = self._nft.cmd("\n".join(commands) + "\n")
        if rc != 0:
            raise KernelError(f"nft rejected the transaction, nothing was changed: {error.strip()}")
        self.operations += len(commands)

    def snapshot(self, table: str) -> str | None:
        """Our table as nft text, which `nft -f` reads back exactly (JSON cannot express every map type)."""
        if self._text is None:
            with entered(self.netns):
                self._text = nftables.Nftables()
        rc, output, _ = self._text.cmd(f"list table {NFT_FAMILY} {table}")
        return str(output) if rc == 0 else None

    def rule_texts(self, table: str) -> dict[ObjectKey, str]:
        """What each of our rules in `table` says, as nft prints it (its comment left out), by the rule's
        key: shown as the old side of a changed rule in a plan (the JSON listing has no text to show)."""
        texts: dict[ObjectKey, str] = {}
        chain = ""
        for line in (self.snapshot(table) or "").splitlines():
            stripped = line.strip()
            if stripped.startswith("chain ") and stripped.endswith("{"):
                chain = stripped.split()[1]
                continue
            found = _RULE_LINE.fullmatch(stripped)
            if found and chain:
                texts[ObjectKey(NftRule.kind, f"{chain}/{found['rule_id']}")] = found["text"]
        return texts

    def restore(self, table: str, snapshot: str | None) -> None:
        """Put our table back exactly as `snapshot` (from `snapshot()`) had it, in one transaction."""
        self._known = None
        commands = [f"delete table {NFT_FAMILY} {table}"] if table in self.tables() else []
        if snapshot:
            commands.append(snapshot)
        if not commands:
            return
        rc, _, error = self._nft.cmd("\n".join(commands) + "\n")
        if rc != 0:
            raise KernelError(f"nft: could not restore table {table}: {error.strip()}")

    def restore_elements(self, before: NftObservation) -> int:
        """Put the elements of our table back as `before` lists them, after an element-only apply that
        failed verification: the table is listed again and the difference written through libnftables'
        text, not the raw encoder that may be what went wrong."""
        self._known = None
        now = self.observe(before.table)
        was = {k: o for k, o in before.index.items() if isinstance(o, NftElement)}
        held = {k: o for k, o in now.index.items() if isinstance(o, NftElement)}
        actions = [Action("remove", k, o, None) for k, o in held.items() if k not in was]
        actions += [Action("add", k, None, o) for k, o in was.items() if k not in held]
        actions += [Action("change", k, held[k], o) for k, o in was.items() if k in held and held[k] != o]
        commands = build_batch(actions, (), now)
        if commands:
            self._transaction(commands)
        return len(commands)

    def delete_table(self, table: str) -> int:
        if table not in self.tables():
            return 0
        self._transaction([f"delete table {NFT_FAMILY} {table}"])
        return 1


# ---------------------------------------------------------------------- parsing
_RULE_LINE = re.compile(r'(?P<text>.*) comment "kf:(?P<rule_id>[^"]+):[^":]+"')


def content_digest(expr: Any) -> str:
    """What a rule does, as the kernel holds it: a digest of its expressions in nft's JSON (handles,
    positions and the comment are not part of them)."""
    return hashlib.sha256(json.dumps(expr, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def _comment_digest(body: Mapping[str, Any]) -> str:
    comment = str(body.get("comment", ""))
    return comment[3:] if comment.startswith("kf:") else ""


def element_text(value: Any) -> str:
    """nft JSON element (key or map value) to the canonical text the compiler writes."""
    if isinstance(value, dict):
        if "prefix" in value:
            return f"{value['prefix']['addr']}/{value['prefix']['len']}"
        if "range" in value:
            low, high = value["range"]
            return f"{element_text(low)}-{element_text(high)}"
        if "concat" in value:
            return " . ".join(element_text(v) for v in value["concat"])
        if "elem" in value:
            return element_text(value["elem"]["val"])
        for verdict in ("goto", "jump"):
            if verdict in value:
                return f"{verdict} {value[verdict]['target']}"
    return str(value)


def _parse_table(table: str, items: list[dict[str, Any]], generation: int | None = None,
                 learned: dict[str, str] | None = None) -> NftObservation:
    """The observation of `table` from its JSON listing; `learned` gains the content digest of every rule
    the kernel holds as its comment records (so a fresh process writes those texts with it at once)."""
    objects: list[KernelObject] = []
    counters: dict[str, tuple[int, int]] = {}
    rule_positions: dict[str, int] = {}
    for item in items:
        ((kind, body),) = item.items()
        if kind == "table":
            objects.append(NftTable(table))
        elif kind == "counter":
            counters[body["name"]] = (body.get("packets", 0), body.get("bytes", 0))
            objects.append(NftCounter(table, body["name"], packets=body.get("packets", 0), bytes=body.get("bytes", 0)))
        elif kind in ("set", "map"):
            objects.append(NftSet(table, body["name"], _comment_digest(body), kind == "map"))
            if "timeout" in body.get("flags", []):
                continue  # meters: their elements are data-plane state, not configuration
            for elem in body.get("elem", []):
                if kind == "map":
                    key, value = elem if isinstance(elem, list) else (elem["elem"]["val"], None)
                    objects.append(NftElement(table, body["name"], element_text(key), element_text(value)))
                else:
                    objects.append(NftElement(table, body["name"], element_text(elem)))
        elif kind == "chain":
            objects.append(NftChain(table, body["name"], body.get("type", ""), body.get("hook", ""),
                                    int(body.get("prio", 0)), body.get("policy", "accept")))
        elif kind == "rule":
            chain = body["chain"]
            index = rule_positions.get(chain, 0)
            rule_positions[chain] = index + 1
            rule_id, _, recorded = _comment_digest(body).rpartition(":")
            rule_digest, _, content = recorded.partition(".")
            if not rule_id:
                # Not written by us (or edited): a unique id makes the diff remove it.
                rule_id, rule_digest = f"unknown-handle-{body.get('handle')}", ""
            elif content != content_digest(body.get("expr")):
                # What the rule does is not what kernform wrote under this comment (edited by hand, or
                # its content never recorded): a digest no desired rule has, so the plan rewrites it.
                rule_digest += ".changed"
            elif learned is not None:
                learned.setdefault(rule_digest, content)
            objects.append(NftRule(table, chain, rule_id, index, rule_digest))
    return NftObservation(table, tuple(objects), tuple(items), counters, generation)


# ------------------------------------------------------------------- the batch
def raw_element_sets(actions: Sequence[Action], desired: Mapping[ObjectKey, KernelObject],
                     observed: NftObservation) -> list[ElementChanges] | None:
    """The plan as element changes per set for a raw batch, or None when it needs libnftables: anything
    besides element changes, or a set that does not exist yet or has no raw layout (nfnetlink.layout_of)."""
    if not actions or any(a.kind != NftElement.kind for a in actions):
        return None
    changes: dict[str, tuple[list[str], list[tuple[str, str | None]]]] = {}
    for action in actions:
        removed, added = changes.setdefault((action.new or action.old).set, ([], []))  # type: ignore[union-attr]
        if isinstance(action.old, NftElement):
            removed.append(action.old.element)
        if isinstance(action.new, NftElement):
            added.append((action.new.element, action.new.value))
    result = []
    for name, (removed, added) in sorted(changes.items()):
        key = ObjectKey(NftSet.kind, name)
        wanted = desired.get(key)
        layout = nfnetlink.layout_of(wanted.declaration) if isinstance(wanted, NftSet) else None
        if layout is None or key not in observed.index:
            return None
        result.append(ElementChanges(name, layout, removed, added))
    return result


def _held_actions(observed: NftObservation, element_sets: Sequence[ElementChanges],
                  held: Mapping[str, Mapping[str, bytes]],
                  desired: Mapping[ObjectKey, KernelObject]) -> list[Action]:
    """Actions that turn `observed` into what the kernel was read to hold for the elements of `element_sets`.
    An element held exactly as desired (the interval, and for a map the value's bytes) is the desired object
    itself; any other is rebuilt from the kernel's bytes."""
    actions: list[Action] = []
    for change in element_sets:
        wanted = dict(change.added)
        now = held.get(change.set, {})
        layout = change.layout
        for text in dict.fromkeys([*change.removed, *wanted]):
            key = ObjectKey(NftElement.kind, f"{change.set} {text}")
            before = observed.index.get(key)
            if text not in now:
                if before is not None:
                    actions.append(Action("remove", key, before, None))
                continue
            value_bytes = now[text]
            if text in wanted:
                desired_value = wanted[text]
                same = (not value_bytes if desired_value is None or layout.value_family is None
                        else value_bytes == nfnetlink.map_value(layout, desired_value))
                element = desired.get(key) if same else None
                if isinstance(element, NftElement):
                    actions.append(Action("add" if before is None else "change", key, before, element))
                    continue
            value = (nfnetlink.map_value_text(layout, value_bytes)
                     if layout.value_family is not None and value_bytes else None)
            element = NftElement(observed.table, change.set, text, value)
            actions.append(Action("add" if before is None else "change", key, before, element))
    return actions


def _quote(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'


def _set_command(s: NftSet, table: str) -> str:
    word = "map" if s.is_map else "set"
    return f"add {word} {NFT_FAMILY} {table} {s.name} {{ {s.declaration} comment {_quote('kf:' + s.digest)}; }}"


def _element_commands(verb: str, table: str, set_name: str, elements: Sequence[NftElement]) -> list[str]:
    commands = []
    for start in range(0, len(elements), ELEMENTS_PER_COMMAND):
        chunk = elements[start : start + ELEMENTS_PER_COMMAND]
        body = ", ".join(
            e.element if (e.value is None or verb == "delete") else f"{e.element} : {e.value}" for e in chunk
        )
        commands.append(f"{verb} element {NFT_FAMILY} {table} {set_name} {{ {body} }}")
    return commands


def rule_command(rule: NftRule, contents: Mapping[str, str] | None = None) -> str:
    """The command adding `rule`; its comment carries the digest of its text and, when `contents` knows it,
    the digest of what the kernel makes of that text (content_digest), by which drift is seen."""
    content = (contents or {}).get(rule.digest)
    comment = rule.comment() + (f".{content}" if content else "")
    return f"add rule {NFT_FAMILY} {rule.table} {rule.chain} {rule.text} comment {_quote(comment)}"


def build_batch(actions: Sequence[Action], desired: Iterable[KernelObject], observed: NftObservation,
                contents: Mapping[str, str] | None = None, written: list[NftRule] | None = None) -> list[str]:
    """The text commands of one transaction that carries out `actions` (see the module docstring).

    Rules are never edited in place: a chain with any rule change is flushed and
    refilled in order, in the same transaction, so rule order is always right;
    counters are named objects and survive it.
    """
    actions = [a for a in actions if a.kind.startswith("nft.")]
    if not actions:
        return []
    table = observed.table
    if any(a.kind == NftTable.kind and a.op == "remove" for a in actions):
        return [f"delete table {NFT_FAMILY} {table}"]
    desired_list = [o for o in desired if o.kind.startswith("nft.")]
    observed_keys: dict[ObjectKey, KernelObject] = {o.key: o for o in observed.objects}
    by_kind: dict[tuple[str, str], list[Action]] = {}
    for action in actions:
        by_kind.setdefault((action.kind, action.op), []).append(action)

    def acted(kind: str, *ops: str) -> list[Action]:
        return [a for op in ops for a in by_kind.get((kind, op), [])]

    commands: list[str] = []
    if acted(NftTable.kind, "add"):
        commands.append(f"add table {NFT_FAMILY} {table}")
    commands += [f"add counter {NFT_FAMILY} {table} {a.key.name}" for a in acted(NftCounter.kind, "add")]

    sets_dropped = {a.key.name for a in acted(NftSet.kind, "change", "remove")}
    chains_replaced = {a.key.name for a in acted(NftChain.kind, "change")}
    chains_removed = {a.key.name for a in acted(NftChain.kind, "remove")}
    rewrite = {(a.new or a.old).chain for a in acted(NftRule.kind, "add", "change", "remove")}  # type: ignore[union-attr]
    rewrite |= chains_replaced
    existing_chains = {o.name for o in observed.objects if isinstance(o, NftChain)}
    if sets_dropped:
        # A set cannot be deleted while a rule refers to it: refill the chains of the rules that do. A
        # rule left alone is the kernel's copy of the desired one (same comment, same content), so the
        # desired rule says which sets it uses; every other rule is being rewritten anyway.
        rewrite |= {o.chain for o in desired_list if isinstance(o, NftRule) and sets_dropped.intersection(o.sets)}
    flush = sorted((rewrite | chains_removed) & existing_chains)
    commands += [f"flush chain {NFT_FAMILY} {table} {c}" for c in flush]

    stale: dict[str, list[NftElement]] = {}
    for action in acted(NftElement.kind, "remove", "change"):
        element = action.old
        assert isinstance(element, NftElement)
        if element.set not in sets_dropped:
            stale.setdefault(element.set, []).append(element)
    for set_name, elements in sorted(stale.items()):
        commands += _element_commands("delete", table, set_name, elements)
    for action in acted(NftSet.kind, "change", "remove"):
        old = action.old
        assert isinstance(old, NftSet)
        commands.append(f"delete {'map' if old.is_map else 'set'} {NFT_FAMILY} {table} {old.name}")
    # After the elements and the sets: a chain cannot be deleted while a verdict map element jumps to it
    # (the rules using the sets are flushed above).
    commands += [f"delete chain {NFT_FAMILY} {table} {c}" for c in sorted(chains_replaced | chains_removed)]

    # Chains before the elements: a verdict map element names the chain it jumps to.
    for action in acted(NftChain.kind, "add", "change"):
        chain = action.new
        assert isinstance(chain, NftChain)
        declaration = chain.declaration()
        commands.append(f"add chain {NFT_FAMILY} {table} {chain.name}" + (f" {{ {declaration} }}" if declaration else ""))
    new_sets = {a.key.name: a.new for a in acted(NftSet.kind, "add", "change")}
    commands += [_set_command(s, table) for s in new_sets.values() if isinstance(s, NftSet)]
    fresh: dict[str, list[NftElement]] = {}
    recreated = {name for name in new_sets if ObjectKey(NftSet.kind, name) in observed_keys}
    for obj in desired_list:
        if isinstance(obj, NftElement) and obj.set in recreated:
            fresh.setdefault(obj.set, []).append(obj)
    for action in acted(NftElement.kind, "add", "change"):
        element = action.new
        assert isinstance(element, NftElement)
        if element.set not in recreated:
            fresh.setdefault(element.set, []).append(element)
    for set_name, elements in sorted(fresh.items()):
        commands += _element_commands("add", table, set_name, elements)

    rules = sorted((o for o in desired_list if isinstance(o, NftRule) and o.chain in rewrite),
                   key=lambda r: (r.chain, r.index))
    commands += [rule_command(r, contents) for r in rules]
    if written is not None:
        written += rules
    commands += [f"delete counter {NFT_FAMILY} {table} {a.key.name}" for a in acted(NftCounter.kind, "remove")]
    return commands
