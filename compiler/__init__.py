"""kernform's compiler: a NetworkIntent in, the desired kernel objects out. Pure: no kernel I/O."""

from __future__ import annotations

import dataclasses
import ipaddress

from .allocation import SLOT_SET, in_target, needs_slot, with_slot
from .errors import BackendUnavailable
from .intent import NetworkIntent
from .objects import (
    VIP_SETS,
    DesiredState,
    KernelObject,
    NftElement,
    NftSet,
    NftTable,
    begin_compile,
    digest,
    nft_table_name,
    shared,
)

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
    record = _records(resolved, slot if needs_slot(intent) else None)
    if not record:
        return desired
    objects = desired.objects
    at = next(i for i, o in enumerate(objects) if isinstance(o, NftTable))  # the first few objects
    return dataclasses.replace(desired, objects=(*objects[:at + 1], *record, *objects[at + 1:]))


def _records(intent: NetworkIntent, slot: int | None) -> list[KernelObject]:
    """What other intents' applies must know of this one, as sets of its nft table (both backends keep the
    table), so a fresh process reads them from the kernel (reconciler.applied): its interception slot, and
    the VIPs it balances (VIP_SETS: address . protocol . port)."""
    table = nft_table_name(intent.metadata.name)
    record: list[KernelObject] = []
    if slot is not None:
        decl = "type mark;"
        record += [NftSet(table, SLOT_SET, digest(decl), False, decl, "interception slot record"),
                   shared(NftElement, table, SLOT_SET, str(slot), None, "interception slot record")]
    by_family: dict[int, list[str]] = {}
    for service in intent.spec.load_balancing.services:
        address = ipaddress.ip_address(service.vip)
        by_family.setdefault(address.version, []).append(f"{address.compressed} . {service.protocol} . {service.port}")
    for family, elements in sorted(by_family.items()):
        name, decl = VIP_SETS[family]
        record.append(NftSet(table, name, digest(decl), False, decl, "VIP record"))
        record += [shared(NftElement, table, name, e, None, "VIP record") for e in sorted(set(elements))]
    return record
