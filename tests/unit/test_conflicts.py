"""Conflicts between intents: every kind refused at the later intent's FILE:LINE:COL, naming the earlier one's."""

from __future__ import annotations

from pathlib import Path

import pytest

from compiler import BackendUnavailable, compile_intent
from compiler.conflicts import claims, conflicts
from compiler.loader import LoadedIntent, load_file, parse_text
from compiler.objects import BpfProgram, IpRule

EXAMPLES = sorted(Path(__file__).resolve().parents[2].joinpath("examples").glob("*.yaml"))


def intent(name: str, body: str, backend: str = "tproxy") -> str:
    return f"apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata:\n  name: {name}\nspec:\n  backend: {backend}\n{body}"


def found(*texts: str, backend: str | None = None) -> list[str]:
    loaded = [parse_text(text, f"{chr(ord('a') + i)}.yaml") for i, text in enumerate(texts)]
    return [str(p) for p in conflicts(loaded, backend)]


ROUTES_200 = "  routing:\n    tables:\n      - {name: t, id: 200}\n"
RULE_1000 = ("  routing:\n    tables:\n      - {name: t, id: %d}\n"
             "    rules:\n      - {name: r, priority: 1000, table: t}\n")


def inbound(port: int, extra: str = "", destinations: str = "[198.51.100.0/24]", ports: str = "[80]",
            interfaces: str = "[eth0]", settings: str = "") -> str:
    return ("  interception:\n" + settings + "    rules:\n"
            f"      - {{name: r{port}, direction: inbound, interfaces: {interfaces}, destinations: {destinations}, "
            f"ports: {ports}, proxyPort: {port}{extra}}}\n")


def own(n: int) -> str:
    """Interception settings of its own, so that only the rules themselves can conflict."""
    return f"    routingTable: {7100 + n}\n    rulePriority: {100 + n}\n    fwmark: {hex(0x100 + n)}\n"


# (case id, text of a.yaml, text of b.yaml, backend override, expected problem at b.yaml, expected position in a.yaml)
CONFLICTS = [
    ("vip",
     intent("a", "  loadBalancing:\n    services:\n      - {name: w, vip: 10.0.0.1, port: 80, backends: [{address: 10.0.1.1}]}\n"),
     intent("b", "  loadBalancing:\n    services:\n      - {name: v, vip: 10.0.0.1, port: 80, backends: [{address: 10.0.1.2}]}\n"),
     None, "b.yaml:9:19: VIP 10.0.0.1:80/tcp of service 'v' conflicts with VIP 10.0.0.1:80/tcp of service 'w'",
     "a.yaml:9:19"),
    ("routing table",
     intent("a", ROUTES_200), intent("b", ROUTES_200),
     None, "b.yaml:9:19: routing table 200 (routing.tables 't') conflicts with routing table 200", "a.yaml:9:19"),
    ("routing table = another's interception table",
     intent("a", inbound(15001, settings="    routingTable: 7300\n")),
     intent("b", "  routing:\n    tables:\n      - {name: t, id: 7300}\n"),
     None, "b.yaml:9:19: routing table 7300 (routing.tables 't') conflicts with routing table 7300 "
     "(interception.routingTable)", "a.yaml:8:5"),
    ("ebpf inbound rules take routingTable + index",
     intent("a", inbound(15001, settings=own(1)) + "      - {name: second, direction: inbound, interfaces: [eth1], "
            "destinations: [192.0.2.0/24], proxyPort: 15001}\n", "ebpf"),
     intent("b", "  routing:\n    tables:\n      - {name: t, id: 7102}\n", "ebpf"),
     None, "b.yaml:9:19: routing table 7102 (routing.tables 't') conflicts with routing table 7102 "
     "(interception.routingTable + 1, inbound rule 'second' on the ebpf backend)", "a.yaml:8:5"),
    ("rule priority",
     intent("a", RULE_1000 % 200), intent("b", RULE_1000 % 201),
     None, "b.yaml:11:19: ip rule priority 1000 (routing.rules 'r') conflicts with ip rule priority 1000",
     "a.yaml:11:19"),
    ("overlapping fwmark masks",
     intent("a", inbound(15001, settings="    routingTable: 7101\n    rulePriority: 101\n    fwmark: '0x10/0xf0'\n")),
     intent("b", inbound(15001, settings="    routingTable: 7102\n    rulePriority: 102\n    fwmark: '0x11/0x1f'\n")),
     None, "b.yaml:10:5: fwmark 0x11/0x1f (interception.fwmark) conflicts with fwmark 0x10/0xf0", "a.yaml:10:5"),
    ("interception overlap, different proxies",
     intent("a", inbound(15001, settings=own(1))),
     intent("b", inbound(15002, settings=own(2), destinations="[198.51.100.128/25, 10.0.0.0/8]",
                         ports="['70-90']", interfaces="['eth*']")),
     None, "b.yaml:12:9: inbound interception rule 'r15002' (to proxy port 15002) conflicts with rule 'r15001' "
     "(to proxy port 15001) of intent 'a' at a.yaml:12:9: both match tcp connections to 198.51.100.128/25 port 80 "
     "arriving on eth0", "a.yaml:12:9"),
    ("outbound ebpf rules in one cgroup",
     intent("a", "  ebpf: {cgroup: apps}\n" + own(1).replace("    ", "  interception:\n    ", 1)
            + "    rules:\n      - {name: o, direction: outbound, ports: [443], exclude: {uids: [1]}, proxyPort: 15001}\n",
            "ebpf"),
     intent("b", "  ebpf: {cgroup: apps/web}\n" + own(2).replace("    ", "  interception:\n    ", 1)
            + "    rules:\n      - {name: p, direction: outbound, exclude: {uids: [1]}, proxyPort: 15002}\n", "ebpf"),
     None, "b.yaml:13:9: outbound interception rule 'p' (to proxy port 15002) conflicts with rule 'o' (to proxy port "
     "15001) of intent 'a' at a.yaml:13:9: both match tcp connections to any address port 443 from processes of "
     "cgroup apps/web", "a.yaml:13:9"),
    ("explicit shared cgroup",
     intent("a", "  ebpf: {cgroup: apps}\n  loadBalancing:\n    services:\n"
            "      - {name: w, vip: 10.0.0.1, port: 80, backends: [{address: 10.0.1.1}]}\n", "ebpf"),
     intent("b", "  ebpf: {cgroup: apps}\n  loadBalancing:\n    services:\n"
            "      - {name: v, vip: 10.0.0.2, port: 80, backends: [{address: 10.0.1.2}]}\n", "ebpf"),
     None, "b.yaml:7:10: cgroup apps (spec.ebpf.cgroup) conflicts with cgroup apps (spec.ebpf.cgroup)", "a.yaml:7:10"),
    ("a cgroup that is another intent's default",
     intent("a", "  loadBalancing:\n    services:\n"
            "      - {name: w, vip: 10.0.0.1, port: 80, backends: [{address: 10.0.1.1}]}\n", "ebpf"),
     intent("b", "  ebpf: {cgroup: kernform/a}\n  loadBalancing:\n    services:\n"
            "      - {name: v, vip: 10.0.0.2, port: 80, backends: [{address: 10.0.1.2}]}\n", "ebpf"),
     None, "b.yaml:7:10: cgroup kernform/a (spec.ebpf.cgroup) conflicts with cgroup kernform/a "
     "(spec.ebpf.cgroup, the default)", "a.yaml:5:1"),
]


@pytest.mark.parametrize(("first", "second", "backend", "expected", "other"),
                         [c[1:] for c in CONFLICTS], ids=[c[0] for c in CONFLICTS])
def test_conflict_names_both_positions(first: str, second: str, backend: str | None, expected: str,
                                       other: str) -> None:
    problems = found(first, second, backend=backend)
    match = [p for p in problems if expected in p]
    assert match, problems
    assert all(p.startswith("b.yaml:") for p in problems), problems
    assert f"of intent 'a' at {other}" in match[0], match[0]


SHARED = "    routingTable: 7100\n    rulePriority: 100\n    fwmark: 0x4b460001\n"


def test_declared_interception_settings_conflict_three_ways() -> None:
    problems = found(intent("a", inbound(15001, settings=SHARED)),
                     intent("b", inbound(15001, settings=SHARED, destinations="[203.0.113.0/24]")))
    kinds = sorted(p.split(": ", 1)[1].split(" (")[0] for p in problems)
    assert kinds == ["fwmark 0x4b460001/0xffffffff", "ip rule priority 100", "routing table 7100"], problems


# Pairs that share no resource: no conflict may be reported.
DISJOINT = [
    ("different VIP port or protocol",
     intent("a", "  loadBalancing:\n    services:\n      - {name: w, vip: 10.0.0.1, port: 80, backends: [{address: 10.0.1.1}]}\n"),
     intent("b", "  loadBalancing:\n    services:\n"
            "      - {name: v, vip: 10.0.0.1, port: 81, backends: [{address: 10.0.1.2}]}\n"
            "      - {name: u, vip: 10.0.0.1, port: 80, protocol: udp, backends: [{address: 10.0.1.2}]}\n"), None),
    ("different tables and priorities", intent("a", RULE_1000.replace("1000", "1001") % 200), intent("b", RULE_1000 % 201),
     None),
    ("interception rules with their own settings, disjoint destinations",
     intent("a", inbound(15001, settings=own(1))),
     intent("b", inbound(15002, settings=own(2), destinations="[198.51.101.0/24, '2001:db8::/32']")), None),
    ("disjoint ports", intent("a", inbound(15001, settings=own(1))),
     intent("b", inbound(15002, settings=own(2), ports="['81-90', 443]")), None),
    ("disjoint interfaces", intent("a", inbound(15001, settings=own(1), interfaces="['eth*']")),
     intent("b", inbound(15002, settings=own(2), interfaces="[wlan0]")), None),
    ("other protocol", intent("a", inbound(15001, settings=own(1))),
     intent("b", inbound(15002, settings=own(2), extra=", protocols: [udp]")), None),
    ("other direction", intent("a", inbound(15001, settings=own(1))),
     intent("b", "  interception:\n" + own(2) + "    rules:\n      - {name: o, direction: outbound, "
            "destinations: [198.51.100.0/24], exclude: {uids: [0]}, proxyPort: 15002}\n"), None),
    ("same proxy port: the connection ends where both want it", intent("a", inbound(15001, settings=own(1))),
     intent("b", inbound(15001, settings=own(2))), None),
    ("marks that differ under both masks",
     intent("a", inbound(15001, settings="    routingTable: 7101\n    rulePriority: 101\n    fwmark: '0x10/0xf0'\n")),
     intent("b", inbound(15001, settings="    routingTable: 7102\n    rulePriority: 102\n    fwmark: '0x20/0xf0'\n")),
     None),
    ("interception settings without rules claim nothing", intent("a", "  interception: {rules: []}\n"),
     intent("b", inbound(15001)), None),
    ("ebpf outbound-only interception takes no routing", intent("a", inbound(15001)),
     intent("b", "  interception:\n    rules:\n      - {name: o, direction: outbound, destinations: [192.0.2.0/24], "
            "exclude: {uids: [0]}, proxyPort: 15002}\n", "ebpf"), None),
    ("ebpf outbound rules in unrelated cgroups",
     intent("a", "  interception:\n    rules:\n      - {name: o, direction: outbound, exclude: {uids: [0]}, "
            "proxyPort: 15001}\n", "ebpf"),
     intent("b", "  interception:\n    rules:\n      - {name: o, direction: outbound, exclude: {uids: [0]}, "
            "proxyPort: 15002}\n", "ebpf"), None),
    ("interception settings left out: each intent gets its own slot",
     intent("a", inbound(15001)), intent("b", inbound(15002, destinations="[203.0.113.0/24]")), None),
    ("a slot never lands on a value another intent declares",
     intent("a", inbound(15001)), intent("b", "  routing:\n    tables:\n      - {name: t, id: 7100}\n"
                                       "    rules:\n      - {name: r, priority: 100, table: t}\n"), None),
    ("ebpf filters on one interface and hook: each has its own tc filter",
     intent("a", "  filtering:\n    input:\n      rules:\n"
            "        - {name: d, action: deny, interfaces: [eth0], protocol: tcp, ports: [22]}\n", "ebpf"),
     intent("b", "  ebpf: {interfaces: [eth1, eth0]}\n  filtering:\n    forward:\n      rules:\n"
            "        - {name: e, action: deny, protocol: tcp, ports: [23]}\n"), "ebpf"),
    ("ebpf filters on one interface, other hooks",
     intent("a", "  filtering:\n    input:\n      rules:\n"
            "        - {name: d, action: deny, interfaces: [eth0], protocol: tcp, ports: [22]}\n", "ebpf"),
     intent("b", "  filtering:\n    output:\n      rules:\n"
            "        - {name: d, action: deny, interfaces: [eth0], protocol: tcp, ports: [22]}\n", "ebpf"), None),
    ("tproxy filters on one interface", intent("a", "  filtering:\n    input:\n      rules:\n"
                                               "        - {name: d, action: deny, interfaces: [eth0]}\n"),
     intent("b", "  filtering:\n    input:\n      rules:\n        - {name: d, action: deny, interfaces: [eth0]}\n"),
     None),
    ("the examples", *[p.read_text() for p in EXAMPLES[:2]], None),
]


@pytest.mark.parametrize(("first", "second", "backend"), [c[1:] for c in DISJOINT], ids=[c[0] for c in DISJOINT])
def test_no_conflict_between_disjoint_intents(first: str, second: str, backend: str | None) -> None:
    assert found(first, second, backend=backend) == []


def test_all_examples_together_are_disjoint() -> None:
    loaded = [load_file(path) for path in EXAMPLES]
    assert conflicts(loaded) == []


def test_an_intent_never_conflicts_with_itself() -> None:
    text = intent("a", inbound(15001) + "      - {name: again, direction: inbound, interfaces: [eth0], proxyPort: 15002}\n"
                  + "  routing:\n    tables:\n      - {name: t, id: 200}\n"
                  "    rules:\n      - {name: r, priority: 1000, table: t}\n      - {name: s, priority: 1000, table: t, iif: eth1}\n")
    assert found(text, intent("z", "")) == []


def test_every_later_intent_is_reported_against_the_first() -> None:
    problems = found(intent("a", ROUTES_200), intent("b", ROUTES_200), intent("c", ROUTES_200))
    assert [p.split(":")[0] for p in problems] == ["b.yaml", "c.yaml"], problems
    assert all("of intent 'a' at a.yaml:9:19" in p for p in problems), problems


def test_the_backend_override_decides_the_claims() -> None:
    # Outbound interception on tproxy takes the routing table, priority and mark; on ebpf none of them.
    a = intent("a", "  interception:\n    rules:\n      - {name: o, direction: outbound, destinations: [192.0.2.0/24], "
               "exclude: {uids: [0]}, proxyPort: 15001}\n")
    b = intent("b", "  interception:\n    rules:\n      - {name: o, direction: outbound, destinations: [192.0.3.0/24], "
               "exclude: {uids: [0]}, proxyPort: 15002}\n")
    a, b = (text.replace("  interception:\n", "  interception:\n" + SHARED) for text in (a, b))
    assert len(found(a, b)) == 3
    assert found(a, b, backend="ebpf") == []


# ------------------------------------------------- claims mirror what the backends lower
def _compiled(loaded: LoadedIntent, backend: str):  # type: ignore[no-untyped-def]
    try:
        return compile_intent(loaded.intent, backend)
    except BackendUnavailable:
        pytest.skip(f"{loaded.path} is refused by the {backend} backend")


INTERCEPTING = intent("x", "  ebpf: {interfaces: [eth1]}\n" + inbound(15001) + (
    "      - {name: b, direction: inbound, interfaces: [eth2], ports: [443], proxyPort: 15002}\n"
    "      - {name: o, direction: outbound, destinations: [192.0.2.0/24], exclude: {uids: [0]}, proxyPort: 15003}\n"
    "  loadBalancing:\n    services:\n      - {name: w, vip: 10.0.0.1, port: 80, backends: [{address: 10.0.1.1}]}\n"
    "  routing:\n    tables: [{name: t, id: 300}]\n    rules:\n      - {name: r, priority: 900, table: t}\n"
    "  filtering:\n    input:\n      default: deny\n      stateful: false\n      rules:\n"
    "        - {name: d, action: allow, interfaces: [eth3], protocol: tcp, ports: [22]}\n"
    "    output:\n      default: deny\n      stateful: false\n      rules: []\n"))


@pytest.mark.parametrize("backend", ["tproxy", "ebpf"])
@pytest.mark.parametrize("source", [*EXAMPLES, "intercepting"], ids=lambda p: getattr(p, "name", str(p)))
def test_claims_match_the_compiled_objects(source: Path | str, backend: str) -> None:
    loaded = parse_text(INTERCEPTING, "x.yaml") if source == "intercepting" else load_file(source)
    desired = _compiled(loaded, backend)
    mine = claims(loaded.intent, backend)
    assert {c.value for c in mine if c.resource == "routing-table"} == desired.routing_tables
    assert {c.value for c in mine if c.resource == "rule-priority"} == {
        o.priority for o in desired.objects if isinstance(o, IpRule)}
    programs = [o for o in desired.objects if isinstance(o, BpfProgram)]
    cgroups = {point.split(":")[1] for p in programs for _, point in p.attachments if point.startswith("cgroup:")}
    assert {c.value for c in mine if c.resource == "cgroup"} == cgroups
    marks = {(o.fwmark, o.fwmask) for o in desired.objects if isinstance(o, IpRule) and o.origin.startswith("interception")
             and o.fwmark is not None}
    assert {c.value for c in mine if c.resource == "fwmark"} == marks
