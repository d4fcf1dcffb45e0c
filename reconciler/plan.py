"""A plan: the ordered difference between desired and observed state, as a value.

`diff()` computes it (pure); `render_text()` shows it to people, Terraform
style (+ add, ~ change, - remove), naming the intent rule each change comes
from; `to_json()` gives machines the same value (schemas/plan.schema.json).
`apply` executes exactly this value.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import compress
from operator import is_not
from typing import Any, Literal, NamedTuple

from compiler.objects import KIND_ORDER, KernelObject, ObjectKey

Op = Literal["add", "change", "remove"]
_SYMBOL = {"add": "+", "change": "~", "remove": "-"}
_KIND_RANK = {kind: rank for rank, kind in enumerate(KIND_ORDER)}


class Action(NamedTuple):
    """One step of a plan. A tuple: a re-sliced map of a thousand backends makes thousands of them per
    pass, and a frozen dataclass costs several times as much to build."""

    op: Op
    key: ObjectKey
    old: KernelObject | None
    new: KernelObject | None
    # For a removal: the intent part the removed object's set or program belongs to (a map element
    # re-sliced away is part of a service, not "not in the intent"); an object read from the kernel
    # carries no origin of its own.
    container_origin: str = ""

    @property
    def kind(self) -> str:
        return self.key.kind

    @property
    def moved_only(self) -> bool:
        """A rule that says the same and only sits at another position (rules before it came or went): a
        consequence of the actions around it, not a change of its own. It stays in the plan (the chain is
        refilled in order) but is neither counted nor shown as a change."""
        old, new = self.old, self.new
        return (self.op == "change" and old is not None and new is not None and self.key.kind == "nft.rule"
                and getattr(old, "digest", None) == getattr(new, "digest", None)
                and getattr(old, "index", None) != getattr(new, "index", None))

    @property
    def origin(self) -> str:
        source = self.new if self.new is not None else self.old
        origin = getattr(source, "origin", "") if source is not None else ""
        return origin or self.container_origin or ("not in the intent" if self.op == "remove" else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "kind": self.key.kind,
            "key": self.key.name,
            "origin": self.origin,
            "old": _object_dict(self.old),
            "new": _object_dict(self.new),
        }


@dataclass(frozen=True)
class Plan:
    intent: str
    backend: str
    target: str
    actions: tuple[Action, ...]

    @property
    def empty(self) -> bool:
        return not self.actions

    def counts(self) -> dict[str, int]:
        """Actions per op; rules that only moved (Action.moved_only) are not changes."""
        result = {"add": 0, "change": 0, "remove": 0}
        for action in self.actions:
            if not action.moved_only:
                result[action.op] += 1
        return result

    def of_kinds(self, kinds: Iterable[str]) -> tuple[Action, ...]:
        wanted = set(kinds)
        return tuple(a for a in self.actions if a.kind in wanted)

    def to_dict(self) -> dict[str, Any]:
        return {
            "formatVersion": 1,
            "intent": self.intent,
            "backend": self.backend,
            "target": self.target,
            "summary": self.counts(),
            "actions": [a.to_dict() for a in self.actions],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


@dataclass(frozen=True)
class PlanSet:
    """The plans of several intents for one target, in the order apply takes them (the input order).

    Its JSON is formatVersion 2: every element of `plans` is a whole formatVersion 1 plan, so a reader
    of single-intent plans reads each part unchanged; `summary` totals them."""

    target: str
    plans: tuple[Plan, ...]

    @property
    def empty(self) -> bool:
        return all(p.empty for p in self.plans)

    def counts(self) -> dict[str, int]:
        result = {"add": 0, "change": 0, "remove": 0}
        for plan in self.plans:
            for op, count in plan.counts().items():
                result[op] += count
        return result

    def to_dict(self) -> dict[str, Any]:
        return {
            "formatVersion": 2,
            "target": self.target,
            "summary": {**self.counts(), "intents": len(self.plans),
                        "intentsWithChanges": sum(not p.empty for p in self.plans)},
            "plans": [p.to_dict() for p in self.plans],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def diff(intent: str, backend: str, target: str,
         desired: Mapping[ObjectKey, KernelObject], observed: Mapping[ObjectKey, KernelObject]) -> Plan:
    """The actions that turn `observed` into `desired`: creations in dependency order, removals in reverse."""
    # Written for the running reconciler's case: tens of thousands of objects of which the
    # observation mostly holds the very objects desired last time (see observe.Target), so
    # the identity test settles nearly every key and the key-set differences run in C.
    creations = [Action("add", key, None, desired[key]) for key in desired.keys() - observed.keys()]
    # Keys whose observed object is not the desired one itself (missing ones yield the desired: not a
    # suspect), found by C iteration; only those are compared field by field.
    haves = list(map(observed.get, desired.keys(), desired.values()))
    for key, have in compress(zip(desired.keys(), haves, strict=True), map(is_not, haves, desired.values())):
        want = desired[key]
        if have != want:
            creations.append(Action("change", key, have, want))
    removals = [Action("remove", key, observed[key], None, _container_origin(observed[key], desired))
                for key in observed.keys() - desired.keys()]
    creations.sort(key=_creation_order)
    removals.sort(key=_removal_order)
    return Plan(intent=intent, backend=backend, target=target, actions=tuple(creations + removals))


def _container_origin(obj: KernelObject, desired: Mapping[ObjectKey, KernelObject]) -> str:
    """The origin of the desired set (for a set element) or program (for a map entry) holding `obj`."""
    container = getattr(obj, "set", None)
    kind = "nft.set"
    if container is None:
        container, kind = getattr(obj, "program", None), "bpf.program"
    if not isinstance(container, str):
        return ""
    return str(getattr(desired.get(ObjectKey(kind, container)), "origin", "") or "")


def _creation_order(action: Action) -> tuple[int, int, str]:
    key = action[1]
    return _KIND_RANK[key[0]], getattr(action[3], "index", 0), key[1]


def _removal_order(action: Action) -> tuple[int, str]:
    key = action[1]
    return -_KIND_RANK[key[0]], key[1]


def _object_dict(obj: KernelObject | None) -> dict[str, Any] | None:
    if obj is None:
        return None
    data = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name not in ("origin",)}
    data["description"] = obj.describe()
    return json.loads(json.dumps(data, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


# ------------------------------------------------------------------- rendering
_COLOURS = {"add": "\033[32m", "change": "\033[33m", "remove": "\033[31m"}
_RESET = "\033[0m"
ELEMENTS_SHOWN_PER_SET = 8


def render_text(plan: Plan, colour: bool = False, full: bool = False, title: str | None = None) -> str:
    """Terraform-style text: one line per action, large element changes summarised per set unless `full`."""
    lines = [title or f"kernform plan: intent {plan.intent} (backend {plan.backend}) on {plan.target}", ""]
    switch = backend_switch(plan)
    if switch:
        lines[1:1] = [f"Backend switch: {switch[0]} -> {switch[1]} (the {switch[0]} objects go, the {switch[1]} "
                      "ones come)"]
    elif len(plan.actions) > 1 and title is None:
        lines[1:1] = ["By intent part: " + summary_by_origin(plan)]
    element_groups: dict[tuple[str, str], list[Action]] = {}
    for action in plan.actions:
        if action.kind == "nft.element":
            obj = action.new or action.old
            element_groups.setdefault((action.op, getattr(obj, "set", "")), []).append(action)
    shown_groups: set[tuple[str, str]] = set()
    # Rules that only moved are shown once per chain, and only when nothing else in the chain explains it.
    rule_changes = {getattr(a.new or a.old, "chain", "") for a in plan.actions
                    if a.kind == "nft.rule" and not a.moved_only}
    reordered: set[str] = set()
    for action in plan.actions:
        if action.moved_only:
            chain = getattr(action.new, "chain", "")
            if chain not in rule_changes and chain not in reordered:
                reordered.add(chain)
                lines.append(_line(action, f"chain {chain}: its rules put back in the intent's order", colour))
            continue
        if action.kind == "nft.element" and not full:
            obj = action.new or action.old
            group_key = (action.op, getattr(obj, "set", ""))
            group = element_groups[group_key]
            if len(group) > ELEMENTS_SHOWN_PER_SET:
                if group_key in shown_groups:
                    continue
                shown_groups.add(group_key)
                sample = ", ".join(_element_label(a) for a in group[:3])
                text = f"{len(group)} elements of {group_key[1]} ({sample}, ...)"
                lines.append(_line(action, text, colour))
                continue
        lines.append(_line(action, _describe(action), colour))
    counts = plan.counts()
    if plan.empty:
        lines.append("No changes. The kernel matches the intent.")
    else:
        lines.append("")
        lines.append(f"Plan: {counts['add']} to add, {counts['change']} to change, {counts['remove']} to remove.")
    return "\n".join(lines) + "\n"


def summary_by_origin(plan: Plan, shown: int = 6) -> str:
    """`loadBalancing/web +2 -2, filtering.forward/deny-docs +1`: what each part of the intent changes, the
    parts with the most changes first, a reviewer's first line."""
    counts: dict[str, dict[str, int]] = {}
    for action in plan.actions:
        if action.moved_only:
            continue
        part = counts.setdefault(action.origin, {"add": 0, "change": 0, "remove": 0})
        part[action.op] += 1
    ranked = sorted(counts.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    parts = [f"{origin} " + " ".join(f"{_SYMBOL[op]}{n}" for op, n in ops.items() if n) for origin, ops in ranked]
    more = f", and {len(parts) - shown} more parts" if len(parts) > shown else ""
    return ", ".join(parts[:shown]) + more


def backend_switch(plan: Plan) -> tuple[str, str] | None:
    """(from, to) when `plan` moves its intent from one backend to the other: the ebpf backend's programs
    come while tproxy's hooked chains go, or the other way round."""
    added = {a.kind for a in plan.actions if a.op == "add"}
    removed_programs = any(a.kind == "bpf.program" and a.op == "remove" for a in plan.actions)
    removed_hooks = any(a.kind == "nft.chain" and a.op == "remove" and getattr(a.old, "hook", "")
                        for a in plan.actions)
    if plan.backend == "ebpf" and "bpf.program" in added and removed_hooks:
        return "tproxy", "ebpf"
    if plan.backend == "tproxy" and removed_programs and "nft.chain" in added:
        return "ebpf", "tproxy"
    return None


def render_set_text(plans: PlanSet, colour: bool = False, full: bool = False) -> str:
    """One section per intent (render_text), then the totals over all of them."""
    sections = [render_text(plan, colour=colour, full=full) for plan in plans.plans]
    counts = plans.counts()
    changed = [p.intent for p in plans.plans if not p.empty]
    if not changed:
        total = f"No changes in any of the {len(plans.plans)} intents on {plans.target}."
    else:
        total = (f"Total over {len(plans.plans)} intents on {plans.target} ({len(changed)} with changes: "
                 f"{', '.join(changed)}): {counts['add']} to add, {counts['change']} to change, "
                 f"{counts['remove']} to remove.")
    return "\n".join(sections) + "\n" + total + "\n"


def _element_label(action: Action) -> str:
    obj = action.new or action.old
    return getattr(obj, "element", "?")


def _describe(action: Action) -> str:
    if action.op == "change" and action.old is not None and action.new is not None:
        old, new = action.old.describe(), action.new.describe()
        return f"{new}\n      (was: {old})" if old != new else new
    obj = action.new if action.new is not None else action.old
    return obj.describe() if obj is not None else str(action.key)


def _line(action: Action, text: str, colour: bool) -> str:
    symbol = _SYMBOL[action.op]
    origin = f"   # {action.origin}" if action.origin else ""
    line = f"  {symbol} {text}{origin}"
    return f"{_COLOURS[action.op]}{line}{_RESET}" if colour else line
