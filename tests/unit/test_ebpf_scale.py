"""The ebpf lowering at scale: program settings independent of the intent's size, stable service ids,
the kept slot table equal to a fresh allocation, the equal-weight Maglev path equal to the weighted loop,
and refusals beyond spec.ebpf.limits at FILE:LINE:COL."""

from __future__ import annotations

import random

import pytest

from compiler import compile_intent, maglev
from compiler.ebpf import _SlotTable, allocate_slots
from compiler.errors import BackendUnavailable
from compiler.loader import parse_text
from compiler.objects import BpfMapEntry, BpfProgram


def intent(services: int, backends: int = 1, rules: int = 1, limits: str = "") -> str:
    lines = ["apiVersion: kernform/v1", "kind: NetworkIntent", "metadata: {name: t}", "spec:", "  backend: ebpf",
             "  ebpf:", "    interfaces: [eth0]"]
    if limits:
        lines.append(f"    limits: {{{limits}}}")
    lines += ["  filtering:", "    input:", "      rules:"]
    lines += [f"        - {{name: r{r}, action: allow, protocol: tcp, ports: [{1000 + r}]}}" for r in range(rules)]
    lines += ["  loadBalancing:", "    services:"]
    for i in range(services):
        lines.append(f"      - name: s{i}\n        vip: 10.96.{i // 256}.{i % 256}\n        port: 80\n        backends:")
        lines += [f"          - {{address: 10.1.{i % 256}.{j + 1}, port: 8080}}" for j in range(backends)]
    return "\n".join(lines) + "\n"


def compiled(text: str):  # type: ignore[no-untyped-def]
    return compile_intent(parse_text(text, "t.yaml").intent, "ebpf")


def programs(desired) -> dict[str, tuple[str, tuple[str, ...]]]:  # type: ignore[no-untyped-def]
    return {o.name: (o.digest, o.cflags) for o in desired.objects if isinstance(o, BpfProgram)}


@pytest.mark.parametrize(("before", "after"), [
    ((1, 12, 1), (1, 13, 1)),  # a larger Maglev table (251 -> 509 slots)
    ((16, 1, 1), (17, 1, 1)),  # past 16 services
    ((1, 1, 64), (1, 1, 65)),  # past 64 filter rules
    ((1, 1, 1), (300, 60, 200)),
])
def test_growth_changes_no_program(before: tuple[int, int, int], after: tuple[int, int, int]) -> None:
    assert programs(compiled(intent(*before))) == programs(compiled(intent(*after)))


def test_a_service_keeps_its_id_and_entries_when_others_come_and_go() -> None:
    def entries(desired, name: str) -> set[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
        return {(o.map, o.key_hex, o.value_hex) for o in desired.objects
                if isinstance(o, BpfMapEntry) and o.program == "sock" and o.origin == f"loadBalancing/{name}"}

    small, grown = compiled(intent(50, 3)), compiled(intent(80, 3))
    assert all(entries(small, f"s{i}") == entries(grown, f"s{i}") for i in range(50))
    # removing the first service in the file moves no other service
    text = intent(50, 3)
    first = text.index("      - name: s0\n")
    without = text[:first] + text[text.index("      - name: s1\n"):]
    shrunk = compiled(without)
    assert all(entries(small, f"s{i}") == entries(shrunk, f"s{i}") for i in range(1, 50))


@pytest.mark.parametrize("capacity", [40, 1000, 65536])
def test_the_kept_slot_table_equals_a_fresh_allocation(capacity: int) -> None:
    rng = random.Random(capacity)
    table = _SlotTable(capacity)
    items = [rng.randbytes(6) for _ in range(min(capacity - 5, 60))]
    for _ in range(300):
        if rng.random() < 0.5 and items:
            items.pop(rng.randrange(len(items)))
        if len(items) < capacity:
            items.insert(rng.randrange(len(items) + 1), rng.randbytes(6))
        got = table.assign(list(items))
        assert got == dict(zip(items, allocate_slots(items, capacity), strict=True))
        assert len(set(got.values())) == len(items) and all(0 <= s < capacity for s in got.values())


@pytest.mark.parametrize(("count", "size"), [(1, 251), (3, 251), (10, 251), (13, 509), (100, 2039)])
def test_the_equal_weight_maglev_path_builds_the_weighted_loop_s_table(count: int, size: int) -> None:
    names = [f"10.2.0.{i}:80" for i in range(count)]
    fast = maglev.build(names, [3] * count, size)
    positions, skips = map(list, zip(*(maglev._permutation(b, size) for b in names), strict=True))
    assert fast == maglev._build_weighted(positions, skips, [3] * count, size)
    assert sorted(set(fast)) == list(range(count))


@pytest.mark.parametrize(("text", "where", "message"), [
    # the fifth service, the third service's backends, the 65th rule
    (intent(5, 1, limits="services: 4"), "t.yaml:35:9: service 's4'", "limits.services"),
    (intent(3, 3, limits="backends: 8"), "t.yaml:32:9: service 's2'", "limits.backends"),
    (intent(1, 1, rules=65, limits="rules: 64"), "t.yaml:76:11: filter rule 'r64'", "limits.rules is 64"),
])
def test_beyond_a_limit_is_refused_at_its_line(text: str, where: str, message: str) -> None:
    loaded = parse_text(text, "t.yaml")
    with pytest.raises(BackendUnavailable) as refused:
        compile_intent(loaded.intent, "ebpf")
    found = [str(p) for p in loaded.problems_at(refused.value.findings)]
    assert any(f.startswith(where) and message in f for f in found), found
