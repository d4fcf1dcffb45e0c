"""Interception slots: intents that leave out fwmark, routingTable and rulePriority never share them."""

from __future__ import annotations

import pytest

from compiler import compile_intent
from compiler.allocation import SLOT_SET, Taken, assign_slots, choose_slot, default_cgroup, slot_values, with_slot
from compiler.loader import parse_text
from compiler.objects import BpfProgram, IpRoute, IpRule, NftElement
from compiler.routing import parse_mark

INBOUND = ("      - {name: in%d, direction: inbound, interfaces: [eth0], destinations: [198.51.100.%d/32], "
           "proxyPort: 15006}\n")


def intent(name: str, settings: str = "", inbound: int = 1, extra: str = ""):  # type: ignore[no-untyped-def]
    rules = "".join(INBOUND % (i, i) for i in range(inbound))
    text = (f"apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata:\n  name: {name}\nspec:\n"
            f"  interception:\n{settings}    rules:\n{rules}{extra}")
    return parse_text(text, f"{name}.yaml").intent


def interception_routing(desired) -> tuple[set, set, set]:  # type: ignore[no-untyped-def]
    rules = [o for o in desired.objects if isinstance(o, IpRule)]
    tables = {o.table for o in desired.objects if isinstance(o, IpRoute) and o.type == "local"}
    return tables, {r.priority for r in rules}, {r.fwmark for r in rules if r.fwmark is not None}


def test_slot_zero_is_the_documented_default() -> None:
    assert slot_values(0) == ("0x4b460001/0xffffffff", 7100, 100)
    plain = intent("a")
    assert with_slot(plain, 0).spec.interception.routing_table == 7100


@pytest.mark.parametrize("backend", ["tproxy", "ebpf"])
def test_two_intents_leaving_the_settings_out_get_disjoint_ones(backend: str) -> None:
    a, b = intent("a", inbound=3), intent("b", inbound=2)
    slots = assign_slots([a, b], [backend, backend])
    assert slots == {"a": 0, "b": 1}
    ta, pa, ma = interception_routing(compile_intent(a, backend, slots["a"]))
    tb, pb, mb = interception_routing(compile_intent(b, backend, slots["b"]))
    assert not ta & tb and not pa & pb and not ma & mb
    if backend == "ebpf":  # one table per inbound rule, from the slot's table on
        assert ta == {7100, 7101, 7102} and tb == {7164, 7165}
    else:
        assert ma == {0x4B460001} and mb == {0x4B460002}


def test_the_slot_is_recorded_in_the_intents_nft_table() -> None:
    desired = compile_intent(intent("a"), "tproxy", 5)
    assert [o.element for o in desired.objects if isinstance(o, NftElement) and o.set == SLOT_SET] == ["5"]
    declared = intent("a", "    routingTable: 300\n    rulePriority: 30\n    fwmark: 0x30\n")
    assert not [o for o in compile_intent(declared, "tproxy", 5).objects
                if isinstance(o, NftElement) and o.set == SLOT_SET]


def test_declared_settings_stay_and_only_the_rest_comes_from_the_slot() -> None:
    partial = intent("a", "    fwmark: 0x30\n")
    resolved = with_slot(partial, 2).spec.interception
    assert (parse_mark(resolved.fwmark), resolved.routing_table, resolved.rule_priority) == ((0x30, 0xFFFFFFFF), 7228, 102)
    assert with_slot(with_slot(partial, 2), 7) == with_slot(partial, 2)


def test_a_slot_skips_what_other_intents_declare_and_the_intents_own_routing() -> None:
    declares = intent("x", "    routingTable: 7100\n    rulePriority: 500\n    fwmark: 0x900\n")
    # slot 0's table is x's, slot 1's priority is the intent's own routing rule
    own_rule = ("  routing:\n    tables: [{name: t, id: 50}]\n    rules:\n      - {name: r, priority: 101, table: t}\n")
    b = intent("b", extra=own_rule)
    assert assign_slots([declares, b], ["tproxy", "tproxy"]) == {"b": 2}


def test_a_recorded_slot_is_kept_while_free_and_taken_slots_are_skipped() -> None:
    a = intent("a")
    assert choose_slot(a, "tproxy", Taken(slots={0, 1}), recorded=4) == 4
    assert choose_slot(a, "tproxy", Taken(slots={0, 1}), recorded=None) == 2
    assert choose_slot(a, "tproxy", Taken(slots={4}), recorded=4) == 0
    taken = Taken(marks=[(0x4B460000, 0xFFFF0000)])  # a foreign mark range covering every slot's mark
    assert choose_slot(a, "ebpf", taken) == 0  # the ebpf backend uses no mark


def test_the_default_cgroup_is_per_target_and_a_written_one_is_kept() -> None:
    text = ("apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata:\n  name: lb\nspec:\n  loadBalancing:\n"
            "    services:\n      - {name: w, vip: 10.0.0.1, port: 80, backends: [{address: 10.0.1.1}]}\n")
    lb = parse_text(text, "lb.yaml").intent

    def cgroups(intent, netns):  # type: ignore[no-untyped-def]
        programs = [o for o in compile_intent(intent, "ebpf", 0, netns).objects if isinstance(o, BpfProgram)]
        return {point.split(":")[1] for p in programs for _, point in p.attachments if point.startswith("cgroup:")}

    assert cgroups(lb, None) == {"kernform/lb"}
    assert cgroups(lb, "pod-a") == {"kernform/lb@pod-a"} and cgroups(lb, "pod-b") == {"kernform/lb@pod-b"}
    written = parse_text(text.replace("spec:\n", "spec:\n  ebpf: {cgroup: apps}\n"), "lb.yaml").intent
    assert cgroups(written, "pod-a") == {"apps"}
    assert default_cgroup("lb", "pod-a") == "kernform/lb@pod-a"
