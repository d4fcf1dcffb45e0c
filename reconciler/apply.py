"""Applying a plan: all or nothing, verified.

Order: netlink first (routes before the rules that select them), then the nft
transaction. If the nft transaction fails, the netlink changes are undone; after
both, the kernel is observed again and must match the desired state exactly,
otherwise the previous state is restored (the nft table from its snapshot, the
netlink objects by inverse actions) and ApplyError carries the residual diff.
A plan with no actions performs no kernel operation at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from compiler.errors import ApplyError, KernelError, TemporaryError
from compiler.objects import BPF_KINDS, NETLINK_KINDS, NFT_KINDS, BpfProgram, DesiredState

from .observe import ObservedState, Target
from .plan import Action, Plan, diff


@dataclass(frozen=True)
class ApplyResult:
    plan: Plan
    operations: int
    seconds: float


def make_plan(target: Target, desired: DesiredState) -> tuple[Plan, ObservedState]:
    wants_bpf = any(o.kind in BPF_KINDS for o in desired.objects)
    observed = target.observe(desired.intent, desired.routing_tables, bpf=wants_bpf)
    plan = diff(desired.intent, desired.backend, target.label, desired.by_key(), observed.by_key())
    return plan, observed


def inverse(actions: tuple[Action, ...]) -> tuple[Action, ...]:
    """Actions undoing `actions`, in reverse order."""
    undo = []
    for action in reversed(actions):
        if action.op == "add":
            undo.append(Action("remove", action.key, action.new, None))
        elif action.op == "remove":
            undo.append(Action("add", action.key, None, action.old))
        else:
            undo.append(Action("change", action.key, action.new, action.old))
    return tuple(undo)


def apply(target: Target, desired: DesiredState, plan: Plan | None = None,
          observed: ObservedState | None = None) -> ApplyResult:
    """Make the kernel hold `desired`; with a plan (and its observation) given, execute exactly that plan."""
    started = time.perf_counter()
    if plan is None or observed is None:
        plan, observed = make_plan(target, desired)
    if plan.empty:
        return ApplyResult(plan, 0, time.perf_counter() - started)
    netlink_actions = plan.of_kinds(NETLINK_KINDS)
    nft_actions = plan.of_kinds(NFT_KINDS)
    bpf_actions = plan.of_kinds(BPF_KINDS)
    programs = [o for o in desired.objects if isinstance(o, BpfProgram)]
    if programs and any(a.kind == BpfProgram.kind and a.op != "remove" for a in bpf_actions):
        # Before loading anything: a kernel without a needed feature fails here, by name.
        target.bpf.probe(programs)
    # The text snapshot is the way back if verification fails; only needed when nft changes.
    snapshot = target.nft.snapshot(observed.nft.table) if nft_actions and observed.nft.exists else None
    operations = target.netlink.apply(netlink_actions) if netlink_actions else 0
    try:
        operations += target.nft.apply(nft_actions, desired.objects, observed.nft)
    except KernelError:
        if netlink_actions:
            target.netlink.apply(inverse(netlink_actions))
        raise
    if bpf_actions:
        try:
            # The BPF driver undoes its own partial work before raising.
            operations += target.bpf.apply(desired.intent, bpf_actions, desired.objects)
        except TemporaryError:
            # Everything is in place but a runtime dependency (the proxy's listening
            # socket is not there yet): keep what was applied; a later pass completes it.
            raise
        except KernelError:
            _restore(target, observed, snapshot, netlink_actions, bool(nft_actions))
            raise
    residual, _ = make_plan(target, desired)
    if not residual.empty:
        _restore(target, observed, snapshot, netlink_actions, bool(nft_actions))
        raise ApplyError(
            f"the kernel does not hold the desired state after applying ({len(residual.actions)} differences); "
            "the previous state was restored",
            residual,
        )
    return ApplyResult(plan, operations, time.perf_counter() - started)


def _restore(target: Target, observed: ObservedState, snapshot: str | None,
             netlink_actions: tuple[Action, ...], nft_changed: bool = True) -> None:
    if nft_changed:
        target.nft.restore(observed.nft.table, snapshot)
    if netlink_actions:
        target.netlink.apply(inverse(netlink_actions))


def destroy(target: Target, intent: str) -> ApplyResult:
    """Remove every object the intent owns; foreign objects are untouched."""
    empty = DesiredState(intent=intent, backend="none", objects=())
    return apply(target, empty)
