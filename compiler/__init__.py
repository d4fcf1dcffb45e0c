"""kernform's compiler: a NetworkIntent in, the desired kernel objects out. Pure: no kernel I/O."""

from __future__ import annotations

import dataclasses

from .allocation import SLOT_SET, in_target, needs_slot, with_slot
from .errors import BackendUnavailable
from .intent import NetworkIntent
from .objects import DesiredState, KernelObject, NftElement, NftSet, NftTable, begin_compile, digest, shared

BACKENDS = ("tproxy", "ebpf")
__all__ = ["BACKENDS", "BackendUnavailable", "compile_intent"]


def compile_intent(intent: NetworkIntent, backend: str | None = None, slot: int = 0,
                   netns: str | None = None) -> DesiredState:
    """Lower `intent` for `backend` (default: the intent's spec.backend), as applied in network namespace `netns`
    (None: the host's), the interception settings it leaves out taken from `slot` (compiler.allocation; the
    reconciler chooses it) and the slot recorded in its nft table."""
    chosen = backend or intent.spec.backend
    begin_compile()
    resolved = in_target(with_slot(intent, slot), netns)
    if chosen == "tproxy":
        from . import tproxy

        desired = tproxy.compile_intent(resolved)
    elif chosen == "ebpf":
        from . import ebpf as ebpf_backend

        desired = ebpf_backend.compile_intent(resolved)
    else:
        raise BackendUnavailable(f"unknown backend {chosen!r} (choose one of {', '.join(BACKENDS)})")
    if not needs_slot(intent):
        return desired
    return dataclasses.replace(desired, objects=_with_slot_record(desired.objects, slot))


def _with_slot_record(objects: tuple[KernelObject, ...], slot: int) -> tuple[KernelObject, ...]:
    """The intent's slot as a set of its nft table (both backends keep the table): a fresh process finds it."""
    (at,) = (i for i, o in enumerate(objects) if isinstance(o, NftTable))
    table = objects[at].name  # type: ignore[union-attr]
    decl = "type mark;"
    record: list[KernelObject] = [NftSet(table, SLOT_SET, digest(decl), False, decl, "interception slot record"),
                                  shared(NftElement, table, SLOT_SET, str(slot), None, "interception slot record")]
    return (*objects[:at + 1], *record, *objects[at + 1:])
