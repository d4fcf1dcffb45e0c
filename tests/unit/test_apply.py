"""apply() with fake drivers: ordering, no-op passes, rollback when the kernel does not end up as desired."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from compiler.errors import ApplyError, KernelError
from compiler.objects import (
    DesiredState,
    IpRule,
    KernelObject,
    NftElement,
    NftSet,
    NftTable,
    ip_rule,
)
from reconciler import ownership
from reconciler.apply import apply, destroy
from reconciler.drivers.nft import NftObservation
from reconciler.observe import ObservedState
from reconciler.plan import Action


@dataclass
class FakeNft:
    objects: list[KernelObject] = field(default_factory=list)
    broken: bool = False  # accepts transactions but changes nothing (a kernel that lies)
    fail: bool = False
    restored: list[str | None] = field(default_factory=list)
    calls: int = 0

    def observe(self, table: str) -> NftObservation:
        exists = any(isinstance(o, NftTable) for o in self.objects)
        return NftObservation(table, tuple(self.objects), () if exists else None)

    def snapshot(self, table: str) -> str | None:
        return "SNAPSHOT"

    def apply(self, actions: Sequence[Action], desired: Iterable[KernelObject], observed: NftObservation,
              desired_index: object = None) -> int:
        self.calls += 1
        if self.fail:
            raise KernelError("nft rejected the transaction")
        if not self.broken:
            keys = {a.key for a in actions if a.op != "add"}
            self.objects = [o for o in self.objects if o.key not in keys]
            self.objects += [a.new for a in actions if a.new is not None]
        return len(actions)

    def restore(self, table: str, snapshot: str | None) -> None:
        self.restored.append(snapshot)

    def forget(self) -> None:
        pass


@dataclass
class FakeNetlink:
    objects: list[KernelObject] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def observe(self, tables: Iterable[int]) -> list[KernelObject]:
        return list(self.objects)

    def apply(self, actions: Sequence[Action]) -> int:
        for action in actions:
            self.log.append(f"{action.op} {action.key.name}")
            if action.old is not None:
                self.objects.remove(action.old)
            if action.new is not None:
                self.objects.append(action.new)
        return len(actions)


@pytest.fixture(autouse=True)
def _ownership_records_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake target's ownership records (reconciler.ownership) go to the test's own directory."""
    monkeypatch.setattr(ownership, "RUN_DIR", tmp_path)


class FakeTarget:
    label = "fake"
    netns = None

    def __init__(self) -> None:
        self.nft = FakeNft()
        self.netlink = FakeNetlink()

    def forget(self) -> None:
        self.nft.forget()

    def adopt(self, desired: object) -> None:
        pass

    def observe(self, intent: str, wanted: frozenset[int] = frozenset(), bpf: bool = False) -> ObservedState:
        return ObservedState(intent, self.nft.observe(intent), tuple(self.netlink.observe(wanted)), wanted)


def desired() -> DesiredState:
    table = "kernform-t"
    objects: list[KernelObject] = [
        NftTable(table),
        NftSet(table, "s", "d1", False, "type ipv4_addr;"),
        NftElement(table, "s", "10.0.0.0/8"),
        ip_rule(4, 100, 7100, fwmark=1),
    ]
    return DesiredState("t", "tproxy", tuple(objects), frozenset({7100}))


def test_apply_then_noop() -> None:
    target = FakeTarget()
    first = apply(target, desired())  # type: ignore[arg-type]
    assert first.operations == 4
    second = apply(target, desired())  # type: ignore[arg-type]
    assert second.plan.empty and second.operations == 0 and target.nft.calls == 1


def test_kernel_that_does_not_hold_the_state_is_restored() -> None:
    target = FakeTarget()
    target.nft.broken = True
    with pytest.raises(ApplyError) as caught:
        apply(target, desired())  # type: ignore[arg-type]
    assert not caught.value.residual.empty  # type: ignore[attr-defined]
    assert target.nft.restored == [None]  # the table did not exist before: restore removes it
    assert target.netlink.objects == []  # the ip rule added first was taken back


def test_failed_nft_transaction_undoes_netlink() -> None:
    target = FakeTarget()
    target.nft.fail = True
    with pytest.raises(KernelError):
        apply(target, desired())  # type: ignore[arg-type]
    assert target.netlink.objects == []
    assert target.netlink.log[0].startswith("add") and target.netlink.log[-1].startswith("remove")


def test_destroy_removes_everything_it_observes() -> None:
    target = FakeTarget()
    apply(target, desired())  # type: ignore[arg-type]
    result = destroy(target, "t")  # type: ignore[arg-type]
    assert {a.op for a in result.plan.actions} == {"remove"}
    assert target.netlink.objects == [] and target.nft.objects == []
    assert isinstance(result.plan.actions[0].old, IpRule)  # netlink removals come first, the table last
