"""Checkpoints for a safe apply on remote hosts: apply, then keep it only if confirmed in time.

`kernform apply --confirm-within SECONDS` (as netplan try and nmstate's
checkpoints do) saves what each intent owned before the apply, applies, runs
the probes, and leaves a waiter process behind (detached from the terminal:
an SSH session that dies with the new rules must not take it along). Unless
`kernform confirm` arrives before the deadline, the waiter puts the previous
state back and records a rollback in the audit trail; `kernform rollback` does
so at once.

A checkpoint is a file, /run/kernform/checkpoints/<target>-<intent>.json
(root-only directory): the deadline, the waiter's pid, and the previous state
itself: the intent's nft table as nft text (what `nft -f` reads back exactly),
and its ip rules and routes and BPF objects as the observation read them
(kernel objects as plain data). Reverting converges to that state the way
apply does, and verifies it by reading the kernel back. While a checkpoint is
pending, other applies of that intent are refused: the change under trial is
confirmed or rolled back first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.errors import ApplyError, KernformError
from compiler.objects import (
    BPF_KINDS,
    NETLINK_KINDS,
    BpfLeftover,
    BpfMapEntry,
    BpfProgram,
    IpRoute,
    IpRule,
    KernelObject,
    Nexthop,
    index_by_key,
    nft_table_name,
)

from . import audit, ownership
from .audit import Cause
from .lock import RUN_DIR
from .observe import ObservedState, Target
from .plan import Plan, diff

_CLASSES: dict[str, type] = {cls.kind: cls for cls in (IpRoute, IpRule, BpfProgram, BpfMapEntry)}


class CheckpointPending(KernformError):
    """A change of this intent awaits confirmation: confirm it or roll it back first."""


@dataclass(frozen=True)
class Checkpoint:
    intent: str
    netns: str | None
    deadline: float  # time.time()
    nft_snapshot: str | None  # the intent's nft table as nft text; None: there was none
    netlink: tuple[KernelObject, ...]
    bpf: tuple[KernelObject, ...]
    routing_tables: frozenset[int]
    waiter: int | None = None
    confirmed: bool = False
    claims: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # reconciler.ownership's, before

    @property
    def remaining(self) -> float:
        return self.deadline - time.time()


def directory() -> Path:
    return RUN_DIR / "checkpoints"


def path_of(netns: str | None, intent: str) -> Path:
    return directory() / f"{netns or 'host'}-{intent}.json"


def take(target: Target, observed: ObservedState, within: float) -> Checkpoint:
    """The previous state of the observed intent, kept until `within` seconds from now."""
    snapshot = target.nft.snapshot(observed.nft.table) if observed.nft.exists else None
    netlink = tuple(o for o in observed.netlink if o.kind in NETLINK_KINDS)
    # The tables the intent owned then (not those the new version wants, which the observation also read).
    owned = (observed.nft.owned_tables | ownership.recorded_tables(target.netns, observed.intent)
             | {o.table for o in netlink if isinstance(o, IpRoute | IpRule)})
    checkpoint = Checkpoint(
        observed.intent, target.netns, time.time() + within, snapshot, netlink,
        tuple(o for o in observed.bpf if o.kind in BPF_KINDS and not isinstance(o, BpfLeftover)),
        frozenset(owned), claims=ownership.recorded_claims(target.netns, observed.intent))
    save(checkpoint)
    return checkpoint


def save(checkpoint: Checkpoint) -> None:
    directory().mkdir(parents=True, exist_ok=True, mode=0o700)
    path = path_of(checkpoint.netns, checkpoint.intent)
    body = {
        "intent": checkpoint.intent, "netns": checkpoint.netns, "deadline": checkpoint.deadline,
        "nft_snapshot": checkpoint.nft_snapshot, "routing_tables": sorted(checkpoint.routing_tables),
        "netlink": [_to_data(o) for o in checkpoint.netlink], "bpf": [_to_data(o) for o in checkpoint.bpf],
        "waiter": checkpoint.waiter, "confirmed": checkpoint.confirmed, "claims": dict(checkpoint.claims),
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(body).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def load(netns: str | None, intent: str) -> Checkpoint | None:
    try:
        body = json.loads(path_of(netns, intent).read_text())
    except (OSError, ValueError):
        return None
    return Checkpoint(
        body["intent"], body["netns"], float(body["deadline"]), body["nft_snapshot"],
        tuple(_from_data(d) for d in body["netlink"]), tuple(_from_data(d) for d in body["bpf"]),
        frozenset(body["routing_tables"]), body.get("waiter"), bool(body.get("confirmed")), body.get("claims") or {})


def pending(netns: str | None) -> list[Checkpoint]:
    """The checkpoints of this target still awaiting confirmation."""
    found = []
    for path in sorted(directory().glob(f"{netns or 'host'}-*.json")):
        body_intent = path.stem[len(f"{netns or 'host'}-"):]
        checkpoint = load(netns, body_intent)
        if checkpoint is not None and not checkpoint.confirmed:
            found.append(checkpoint)
    return found


def confirm(netns: str | None, intent: str) -> bool:
    """Keep the applied state: the waiter finds the checkpoint confirmed and leaves. False: none pending."""
    checkpoint = load(netns, intent)
    if checkpoint is None or checkpoint.confirmed:
        return False
    save(dataclasses.replace(checkpoint, confirmed=True))
    return True


def discard(netns: str | None, intent: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        path_of(netns, intent).unlink()


def revert(target: Target, checkpoint: Checkpoint, cause: Cause) -> int:
    """Put the intent's previous state back (nft table, ip rules and routes, BPF objects) and verify it;
    returns the number of actions. Raises ApplyError when the kernel does not hold it afterwards."""
    intent = checkpoint.intent
    table = nft_table_name(intent)
    target.forget()
    tables = checkpoint.routing_tables | target.nft.observe(table).owned_tables | ownership.recorded_tables(
        target.netns, intent)
    target.nft.restore(table, checkpoint.nft_snapshot)
    previous_netlink = index_by_key(checkpoint.netlink)
    netlink_plan = diff(intent, "previous", target.label, previous_netlink,
                        index_by_key(target.netlink.observe(tables) if tables else []))
    if not netlink_plan.empty:
        ownership.widen(target.netns, intent, tables)
        target.netlink.apply(netlink_plan.actions)
    actions = len(netlink_plan.actions) + 1
    previous_bpf = index_by_key(checkpoint.bpf)
    if previous_bpf or target.has_bpf_state(intent):
        now = dict(target.bpf.observe_index(intent))
        bpf_plan = diff(intent, "previous", target.label, previous_bpf, now)
        if not bpf_plan.empty:
            target.bpf.apply(intent, bpf_plan.actions, checkpoint.bpf)
            actions += len(bpf_plan.actions)
    target.forget()
    residual = _residual(target, checkpoint, tables)
    if not residual.empty:
        raise ApplyError(f"intent {intent}: rolling back left {len(residual.actions)} differences", residual)
    # An intent that held nothing before the trial holds nothing now: its record goes too.
    held_nothing = checkpoint.nft_snapshot is None and not checkpoint.netlink and not checkpoint.bpf
    ownership.settle(target.netns, intent, checkpoint.routing_tables, destroyed=held_nothing)
    if not held_nothing:
        ownership.record_claims(target.netns, intent, dict(checkpoint.claims))
    audit.record("rollback", intent, target.label, cause,
                 [{"op": "restore", "kind": "checkpoint", "key": intent, "origin": ""}], "rolled back",
                 operations=actions)
    return actions


def _residual(target: Target, checkpoint: Checkpoint, tables: Iterable[int]) -> Plan:
    wanted: dict[Any, KernelObject] = dict(index_by_key(checkpoint.netlink))
    found: dict[Any, KernelObject] = dict(index_by_key(target.netlink.observe(frozenset(tables))))
    if checkpoint.bpf or target.has_bpf_state(checkpoint.intent):
        wanted.update(index_by_key(checkpoint.bpf))
        found.update({k: o for k, o in target.bpf.observe_index(checkpoint.intent).items()
                      if not isinstance(o, BpfLeftover)})
    exists = nft_table_name(checkpoint.intent) in target.nft.tables()
    plan = diff(checkpoint.intent, "previous", target.label, wanted, found)
    if exists != (checkpoint.nft_snapshot is not None):
        raise ApplyError(f"intent {checkpoint.intent}: rolling back did not restore its nft table", plan)
    return plan


def _to_data(obj: KernelObject) -> dict[str, Any]:
    data: dict[str, Any] = {"kind": obj.kind}
    for f in dataclasses.fields(obj):
        if f.name == "origin":
            continue
        value = getattr(obj, f.name)
        data[f.name] = [dataclasses.asdict(n) for n in value] if f.name == "nexthops" else value
    return data


def _from_data(data: Mapping[str, Any]) -> KernelObject:
    cls = _CLASSES[data["kind"]]
    fields: dict[str, Any] = {}
    for name, value in data.items():
        if name == "kind":
            continue
        if name == "nexthops":
            value = tuple(Nexthop(**n) for n in value)
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        fields[name] = value
    return cls(**fields)
