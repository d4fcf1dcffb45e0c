"""`status` without a kernel: naming counters from what the kernel holds, and which backend holds the intent.

The kernel's side is built here from the same values the drivers return: an
NftObservation parsed from nft's JSON listing, the BPF objects a compile
produces (observe returns the same programs and entries, without origins) and
counter maps as BpfDriver.counters() shapes them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from compiler import compile_intent
from compiler.loader import parse_text
from compiler.objects import BpfMapEntry, BpfProgram, KernelObject, NftChain, NftTable
from kernform.cli import _counter_origin
from reconciler.drivers.nft import NftObservation
from reconciler.observe import ObservedState
from reconciler.status import (
    Rows,
    applied_backends,
    bpf_rows,
    ebpf_names,
    format_counters,
    nft_counter_origin,
    nft_counter_verdicts,
    nft_rows,
    ordered,
)

INTENT = """apiVersion: kernform/v1
kind: NetworkIntent
metadata: {name: t}
spec:
  backend: tproxy
  ebpf: {interfaces: [eth0]}
  interception:
    rules:
      - {name: web-in, direction: inbound, interfaces: [eth0], destinations: [203.0.113.0/24], ports: [80, 443],
         proxyPort: 15001}
      - {name: api-in, direction: inbound, interfaces: [eth0], destinations: [198.51.100.0/24], proxyPort: 15002}
  loadBalancing:
    services:
      - {name: web, vip: 10.0.0.10, port: 80, backends: [{address: 10.0.1.1}, {address: 10.0.1.2}]}
  filtering:
    input:
      default: deny
      stateful: false
      rules:
        - {name: deny-ssh, action: deny, protocol: tcp, ports: [22]}
        - {name: dns, action: rate-limit, protocol: udp, ports: [53], rateLimit: {rate: 5, per: second, burst: 5}}
"""


@pytest.mark.parametrize(("name", "expected"), [
    ("f_forward_deny-admin", ("filtering", "filtering.forward/deny-admin", "rule")),
    ("f_input_limit-dns_pass", ("filtering", "filtering.input/limit-dns", "passed")),
    ("f_output_pass", ("filtering", "filtering.output/pass", "rule")),  # a rule named "pass"
    ("fd_forward", ("filtering", "filtering.forward (default)", "default")),
    ("i_web-inbound", ("interception", "interception/web-inbound", "interception")),
    ("lb_web6", ("loadBalancing", "loadBalancing/web6", "service")),
    ("fd_sideways", ("other", "fd_sideways", "other")),
    ("f_sideways_x", ("other", "f_sideways_x", "other")),
    ("someone-elses", ("other", "someone-elses", "other")),
])
def test_nft_counter_names_say_what_they_count(name: str, expected: tuple[str, str, str]) -> None:
    assert nft_counter_origin(name) == expected
    assert _counter_origin(name) == expected[1]


def _rule(chain: str, counter: str, verdict: str | None) -> dict[str, Any]:
    expr: list[dict[str, Any]] = [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                                             "right": 22}},
                                  {"counter": {"packets": 9, "bytes": 9}},  # an anonymous counter: not ours
                                  {"counter": counter}]
    if verdict:
        expr.append({verdict: None})
    return {"rule": {"family": "inet", "table": "kernform-t", "chain": chain, "expr": expr}}


def test_nft_rows_take_drops_from_the_verdicts_and_defaults_from_the_chain_policy() -> None:
    snapshot = (
        _rule("filter_input", "f_input_deny-ssh", "drop"),
        _rule("filter_input", "f_input_dns", "drop"),
        _rule("filter_input", "f_input_dns_pass", "accept"),
        _rule("filter_input", "fd_input", None),
        _rule("filter_forward", "f_forward_ok", "accept"),
    )
    assert nft_counter_verdicts(snapshot)["fd_input"] == "" and nft_counter_verdicts(snapshot)["f_input_dns"] == "drop"
    objects = (NftTable("kernform-t"), NftChain("kernform-t", "filter_input", "filter", "input", 0, "drop"),
               NftChain("kernform-t", "filter_forward", "filter", "forward", 0, "accept"))
    observed = NftObservation("kernform-t", objects, snapshot)
    live = {"f_input_deny-ssh": (4, 240), "f_input_dns": (3, 180), "f_input_dns_pass": (5, 300),
            "fd_input": (7, 420), "f_forward_ok": (2, 100), "i_web-in": (1, 60), "lb_web": (6, 360)}
    rows = Rows()
    per_backend = {"lb_web": {"10.0.1.1 . 80": (4, 240), "10.0.1.2 . 80": (2, 120)}}
    nft_rows(rows, observed, live, wanted=[*live, "i_api-in"], per_backend=per_backend)
    counters = ordered(rows.rows.values())
    assert counters["filtering.input/deny-ssh"] == {"section": "filtering", "packets": 4, "bytes": 240, "dropped": 4}
    # A rate limit's two counters are one rule: what it matched, what it dropped and what it let through.
    assert counters["filtering.input/dns"] == {"section": "filtering", "packets": 8, "bytes": 480, "dropped": 3,
                                               "passed": 5}
    assert counters["filtering.input (default)"] == {"section": "filtering", "policy": "deny", "packets": 7,
                                                     "bytes": 420, "dropped": 7}
    assert counters["filtering.forward/ok"]["dropped"] == 0
    # filter_forward has no fd_ counter (applied by an older kernform): its policy, and what is missing.
    assert counters["filtering.forward (default)"]["policy"] == "allow"
    assert "fd_forward" in counters["filtering.forward (default)"]["notAvailable"]
    assert counters["interception/web-in"] == {"section": "interception", "packets": 1, "bytes": 60}
    assert counters["loadBalancing/web"]["newFlows"] == 6 and "packets" not in counters["loadBalancing/web"]
    assert counters["loadBalancing/web -> 10.0.1.1:80"] == {"section": "loadBalancing", "connections": 4}
    assert counters["loadBalancing/web -> 10.0.1.2:80"]["connections"] == 2
    assert "apply is pending" in counters["interception/api-in"]["notAvailable"]
    assert [v["section"] for v in counters.values()] == sorted(
        (v["section"] for v in counters.values()), key=["interception", "loadBalancing", "filtering"].index)
    # Within a chain, its rules first, then its default.
    keys = list(counters)
    assert keys.index("filtering.input/dns") < keys.index("filtering.input (default)")


def _ebpf() -> tuple[Any, Any]:
    loaded = parse_text(INTENT, "t.yaml")
    return loaded.intent, compile_intent(loaded.intent, "ebpf")


def _as_observed(desired: Any) -> tuple[KernelObject, ...]:
    """What observe returns for an applied compile: the same objects, without origins."""
    return tuple(dataclasses.replace(o, origin="") for o in desired.objects if isinstance(o, (BpfProgram, BpfMapEntry)))


def _live(desired: Any) -> dict[str, dict[str, Any]]:
    """BpfDriver.counters() after some traffic: every index counted, lb_counters as u64 words (no field names)."""
    live: dict[str, dict[str, Any]] = {}
    for program in (o for o in desired.objects if isinstance(o, BpfProgram)):
        if program.source == "tc_filter.c":
            max_rules = int(next(f for f in program.cflags if "KF_MAX_RULES" in f).split("=")[1])
            counters = {i: {"packets": 10 + i, "bytes": 100, "dropped": i} for i in range(4)}
            counters[max_rules] = {"packets": 50, "bytes": 5000, "dropped": 50}
            live[program.name] = {"counters": counters}
        elif program.source in ("sk_lookup.c", "sock_connect.c"):
            live[program.name] = {"intercept_counters": {0: {"redirected": 3, "bypassed": 1, "no_proxy": 0}}}
        elif program.source == "tc_lb.c":
            # service ids are the compiler's (compiler.ebpf.allocate_slots)
            mine = [o for o in desired.objects if isinstance(o, BpfMapEntry) and o.program == program.name]
            svc_id = next(int.from_bytes(bytes.fromhex(o.value_hex)[:4], "little") for o in mine
                          if o.map == "services_v4")
            # lb_be_counters: {service id, backend position} read as one number
            live[program.name] = {"lb_counters": {svc_id: [2, 20, 2000, 1]},
                                  "lb_be_counters": {svc_id: [1], svc_id | 1 << 32: [1]}}
    return live


def test_ebpf_rows_without_the_intent_are_named_by_program_and_index_and_describe_their_rule() -> None:
    _, desired = _ebpf()
    rows = Rows()
    bpf_rows(rows, _as_observed(desired), _live(desired), None)
    counters = ordered(rows.rows.values())
    assert counters["filtering@eth0/#0"] == {"section": "filtering", "packets": 10, "bytes": 100, "dropped": 0,
                                            "rule": "input tcp port 22 deny"}
    assert counters["filtering@eth0/#1"]["rule"] == "input udp port 53 rate-limit 5/s burst 5"
    assert counters["filtering.input (default)"] == {"section": "filtering", "policy": "deny", "packets": 50,
                                                   "bytes": 5000, "dropped": 50}
    assert counters["interception (inbound)/#0"] == {"section": "interception", "redirected": 3, "bypassed": 1,
                                                    "noProxy": 0, "rule": "tcp ports 80, 443 -> proxy :15001"}
    assert counters["interception (inbound)/#1"]["redirected"] == 0  # no traffic: zero, still listed
    service = counters["loadBalancing/10.0.0.10:80/tcp"]
    assert {k: service[k] for k in ("newFlows", "packets", "bytes", "dropped")} == \
        {"newFlows": 2, "packets": 20, "bytes": 2000, "dropped": 1}
    assert counters["loadBalancing/10.0.0.10:80/tcp -> 10.0.1.1:80"] == {"section": "loadBalancing", "connections": 1}
    assert counters["loadBalancing/10.0.0.10:80/tcp -> 10.0.1.2:80"]["connections"] == 1


def test_ebpf_rows_with_the_intent_carry_its_names() -> None:
    intent, desired = _ebpf()
    rows = Rows()
    bpf_rows(rows, _as_observed(desired), _live(desired), ebpf_names(intent, desired))
    counters = ordered(rows.rows.values())
    assert set(counters) == {"interception/web-in", "interception/api-in", "loadBalancing/web",
                             "loadBalancing/web -> 10.0.1.1:80", "loadBalancing/web -> 10.0.1.2:80",
                             "filtering.input/deny-ssh", "filtering.input/dns", "filtering.input (default)"}
    assert counters["filtering.input/deny-ssh"]["packets"] == 10 and "rule" not in counters["filtering.input/deny-ssh"]
    assert counters["interception/web-in"]["redirected"] == 3
    assert counters["loadBalancing/web"]["newFlows"] == 2
    text = "\n".join(format_counters(counters))
    assert text.index("interception:") < text.index("loadBalancing:") < text.index("filtering:")
    assert "loadBalancing/web -> 10.0.1.1:80" in text and "connections=" in text


def test_the_backend_is_what_the_kernel_holds() -> None:
    intent, ebpf = _ebpf()
    tproxy = compile_intent(intent, "tproxy")
    table = NftObservation("kernform-t", (NftTable("kernform-t"),), ())
    chains = NftObservation("kernform-t", tuple(o for o in tproxy.objects if isinstance(o, (NftTable, NftChain))), ())

    def observed(nft: NftObservation, bpf: tuple[KernelObject, ...] = ()) -> ObservedState:
        return ObservedState("t", nft, (), frozenset(), bpf)

    programs = _as_observed(ebpf)
    assert applied_backends(observed(chains)) == ("tproxy",)
    # An ebpf intent's nft table is only its ownership record: no chain.
    assert applied_backends(observed(table, programs)) == ("ebpf",)
    assert applied_backends(observed(chains, programs)) == ("tproxy", "ebpf")
    assert applied_backends(observed(NftObservation("kernform-t", (), None))) == ()
