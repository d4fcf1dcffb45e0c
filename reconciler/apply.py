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

from compiler.ebpf import needs_local_addresses, with_local_addresses
from compiler.errors import ApplyError, KernelError, KernformError, TemporaryError
from compiler.objects import BPF_KINDS, NETLINK_KINDS, NFT_KINDS, BpfProgram, DesiredState, NftElement, index_by_key

from . import audit, collector, ownership
from .audit import Cause
from .drivers.nfnetlink import GenerationChanged
from .observe import ObservedState, Target
from .plan import Action, Plan, diff


@dataclass(frozen=True)
class ApplyResult:
    plan: Plan
    operations: int
    seconds: float


def complete(target: Target, desired: DesiredState) -> DesiredState:
    """`desired` with the facts of the target it needs (the ebpf backend's mirror of the namespace's
    own addresses); unchanged for everything else."""
    if needs_local_addresses(desired):
        return with_local_addresses(desired, target.netlink.local_addresses())
    return desired


def make_plan(target: Target, desired: DesiredState) -> tuple[Plan, ObservedState]:
    desired = complete(target, desired)
    # Only the ebpf backend compiles BPF objects (a tproxy intent's own BPF pins are seen by observe).
    wants_bpf = desired.backend == "ebpf"
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
          observed: ObservedState | None = None, *, cause: Cause | None = None, verb: str = "apply") -> ApplyResult:
    """Make the kernel hold `desired`; with a plan (and its observation) given, execute exactly that plan
    (unless the nft table changed since that observation: then a fresh plan is made and executed).
    A plan that changes anything, or fails to, leaves an audit record (reconciler.audit) of `verb`
    ("apply", "destroy" or "repair") for `cause`."""
    with collector.paused():
        return _apply_verified(target, desired, plan, observed, cause, verb)


def _apply_verified(target: Target, desired: DesiredState, plan: Plan | None, observed: ObservedState | None,
                    cause: Cause | None, verb: str) -> ApplyResult:
    started = time.perf_counter()
    desired = complete(target, desired)
    if plan is None or observed is None:
        plan, observed = make_plan(target, desired)
    try:
        try:
            result = _apply(target, desired, plan, observed, started)
        except GenerationChanged:
            # Someone committed an nft transaction after we observed; nothing of ours was left applied.
            target.forget()
            plan, observed = make_plan(target, desired)
            result = _apply(target, desired, plan, observed, started)
    except KernformError as exc:
        if not plan.empty:
            # A TemporaryError comes after everything else was applied (a proxy not listening yet).
            outcome = "incomplete" if isinstance(exc, TemporaryError) else "failed"
            audit.record(verb, desired.intent, target.label, cause, _audited(plan), outcome, error=str(exc))
        raise
    # Verified (or nothing to do, which the same observation proves): the kernel holds the intent's
    # routes and rules in exactly its wanted tables.
    ownership.settle(target.netns, desired.intent, desired.routing_tables, destroyed=verb == "destroy")
    if not plan.empty:
        done = {"apply": "applied", "destroy": "destroyed", "repair": "repaired"}.get(verb, verb)
        audit.record(verb, desired.intent, target.label, cause, _audited(plan), done, operations=result.operations)
    return result


def _audited(plan: Plan) -> list[dict[str, str]]:
    return [{"op": a.op, "kind": a.kind, "key": a.key.name, "origin": a.origin} for a in plan.actions]


def _apply(target: Target, desired: DesiredState, plan: Plan, observed: ObservedState, started: float) -> ApplyResult:
    if plan.empty:
        return ApplyResult(plan, 0, time.perf_counter() - started)
    netlink_actions = plan.of_kinds(NETLINK_KINDS)
    nft_actions = plan.of_kinds(NFT_KINDS)
    bpf_actions = plan.of_kinds(BPF_KINDS)
    if any(a.kind == BpfProgram.kind and a.op != "remove" for a in bpf_actions):
        programs = [o for o in desired.objects if isinstance(o, BpfProgram)]
        # Before loading anything: a kernel without a needed feature fails here, by name.
        if programs:
            target.bpf.probe(programs)
    # The text snapshot is the way back if verification fails; only needed when nft changes, and not
    # for a plan of element additions and removals, which inverse actions undo exactly.
    elements_only = all(a.kind == NftElement.kind for a in nft_actions)
    snapshot = (target.nft.snapshot(observed.nft.table)
                if nft_actions and observed.nft.exists and not elements_only else None)
    if netlink_actions:
        # Recorded before the first netlink change: a run killed from here on leaves objects a fresh
        # process still finds as this intent's, whatever becomes of the nft table.
        touched = {getattr(a.new or a.old, "table", None) for a in netlink_actions}
        ownership.widen(target.netns, desired.intent,
                        desired.routing_tables | {t for t in touched if isinstance(t, int)})
    operations = target.netlink.apply(netlink_actions) if netlink_actions else 0
    try:
        operations += target.nft.apply(nft_actions, desired.objects, observed.nft, desired.by_key())
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
            _restore(target, desired, observed, snapshot, netlink_actions, nft_actions, elements_only)
            raise
    residual, _ = make_plan(target, desired)
    if not residual.empty:
        _restore(target, desired, observed, snapshot, netlink_actions, nft_actions, elements_only,
                 bpf=bool(bpf_actions))
        raise ApplyError(
            f"the kernel does not hold the desired state after applying ({len(residual.actions)} differences); "
            "the previous state was restored",
            residual,
        )
    target.adopt(desired.by_key())
    return ApplyResult(plan, operations, time.perf_counter() - started)


def _restore(target: Target, desired: DesiredState, observed: ObservedState, snapshot: str | None,
             netlink_actions: tuple[Action, ...], nft_actions: tuple[Action, ...], elements_only: bool,
             bpf: bool = False) -> None:
    target.forget()
    if bpf:
        # The BPF driver's own journal is closed once its apply returns: converge its part back to the
        # observation the plan was made from, read afresh (programs still pinned are reused, not compiled).
        previous = dict(observed.bpf_index) if observed.bpf_index is not None else index_by_key(observed.bpf)
        now = target.bpf.observe_index(desired.intent)
        back = diff(desired.intent, desired.backend, target.label, previous, dict(now))
        if not back.empty:
            target.bpf.apply(desired.intent, back.of_kinds(BPF_KINDS), tuple(previous.values()))
        target.forget()
    if nft_actions and elements_only:
        target.nft.restore_elements(observed.nft)
    elif nft_actions:
        target.nft.restore(observed.nft.table, snapshot)
    if netlink_actions:
        target.netlink.apply(inverse(netlink_actions))


def destroy(target: Target, intent: str, *, cause: Cause | None = None) -> ApplyResult:
    """Remove every object the intent owns; foreign objects are untouched."""
    empty = DesiredState(intent=intent, backend="none", objects=())
    return apply(target, empty, cause=cause, verb="destroy")
