"""Cells the ebpf backend refuses: what tproxy does with them, and ebpf's refusal at validate time.

The ebpf filter has no connection tracking. It may still offer stateful
chains for TCP (a rule then applies to a connection's first packet, the SYN),
but it must refuse what it cannot do statefully: deny and rate-limit rules for
udp, icmp or any protocol in a stateful chain, a stateful chain with default
deny (the replies would be dropped), and filter rules or a default deny on no
named interface (neither on the rule nor in spec.ebpf.interfaces).
For each such cell: tproxy applies it and real traffic shows the stateful
meaning; `kernform validate --backend ebpf FILE` exits 1 with FILE:LINE:COL at
the offending field (the line marked ``# kfc:refused`` in the cell's intent),
while `--backend tproxy` accepts the same file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import harness
import pytest
from harness import FC, FC_ADDR, FR, FS, FS_ADDR, REFUSED

pytestmark = pytest.mark.kernel


@dataclass(frozen=True)
class Cell:
    ns: str  # where the intent goes
    spec: str  # the text under `spec:`
    check: Callable[[int], None]  # tproxy's observable behaviour, per family


def _answered(ns: str, host: str, port: int, proto: str = "tcp") -> None:
    reply = harness.get1(ns, host, port, proto=proto, timeout=2.0)
    assert harness.answered(reply), reply


def _blocked(ns: str, host: str, port: int, proto: str = "tcp") -> None:
    reply = harness.get1(ns, host, port, proto=proto, timeout=0.5)
    assert not harness.answered(reply), reply


def _stateful_default_deny(family: int) -> None:
    _answered(FC, FS_ADDR[family], 7001)  # the replies pass by connection state, no rule allows them
    _blocked(FC, FS_ADDR[family], 7002)
    _blocked(FC, FS_ADDR[family], 7054, "udp")


UDP_SOURCES = {4: ("10.81.1.3", "10.81.1.5"), 6: ("fd81:1::3", "fd81:1::5")}


def _stateful_udp_limit(family: int) -> None:
    one_flow, new_flows = UDP_SOURCES[family]
    # Once a flow has seen its reply, its packets are established: a burst on it is not limited ...
    burst = harness.tool(FC, "udpburst", FS_ADDR[family], "7054", "20", "--source", one_flow, "--prime")
    assert burst["answered"] >= 18, burst
    # ... while new flows (a socket each) are: about the burst of 3.
    replies = harness.get(FC, FS_ADDR[family], 7054, proto="udp", count=8, timeout=0.3, source=new_flows)
    assert 2 <= sum(map(harness.answered, replies)) <= 6, replies


def _stateful_udp_deny(family: int) -> None:
    _blocked(FC, FS_ADDR[family], 7053, "udp")
    _answered(FC, FS_ADDR[family], 7054, "udp")


def _stateful_any_deny(family: int) -> None:
    _answered(FC, FS_ADDR[family], 7001)  # replies from the denied sources pass: they are established
    _answered(FC, FS_ADDR[family], 7054, "udp")
    _blocked(FS, FC_ADDR[family], 7001)  # new connections from them do not


def _stateless_default_deny(family: int) -> None:
    _answered(FC, FS_ADDR[family], 7001)
    _blocked(FC, FS_ADDR[family], 7002)


def _no_interfaces(family: int) -> None:
    _blocked(FC, FS_ADDR[family], 7002)
    _answered(FC, FS_ADDR[family], 7001)


CELLS = {
    "stateful-default-deny": Cell(FR, f"""  filtering:
    forward:
      stateful: true  {REFUSED}
      default: deny  {REFUSED}
      rules:
        - name: allow-7001
          action: allow
          interfaces: [eth0]
          protocol: tcp
          ports: [7001]
""", _stateful_default_deny),
    "stateful-udp-rate-limit": Cell(FR, f"""  filtering:
    forward:
      rules:
        - name: udp-new-flows
          action: rate-limit
          interfaces: [eth0]
          protocol: udp  {REFUSED}
          ports: [7054]
          rateLimit:
            rate: 1
            per: second
            burst: 3
""", _stateful_udp_limit),
    "stateful-udp-deny": Cell(FR, f"""  filtering:
    forward:
      rules:
        - name: deny-udp-7053
          action: deny
          interfaces: [eth0]
          protocol: udp  {REFUSED}
          ports: [7053]
""", _stateful_udp_deny),
    "stateful-any-deny": Cell(FR, f"""  filtering:
    forward:
      rules:
        - name: deny-new-from-server
          action: deny
          interfaces: [eth1]
          protocol: any  {REFUSED}
          sources: [10.81.2.0/24, "fd81:2::/64"]
""", _stateful_any_deny),
    # A default deny covers every interface; the ebpf filter only those named in spec.ebpf.interfaces.
    "default-deny-on-no-interface": Cell(FR, f"""  filtering:
    forward:
      stateful: false
      default: deny  {REFUSED}
      rules:
        - name: allow-7001
          action: allow
          interfaces: [eth0]
          protocol: tcp
          ports: [7001]
        - name: allow-replies
          action: allow
          interfaces: [eth1]
          sources: [10.81.2.0/24, "fd81:2::/64"]
""", _stateless_default_deny),
    "filter-rule-on-no-interface": Cell(FS, f"""  filtering:
    input:
      rules:
        - name: deny-7002  {REFUSED}
          action: deny
          protocol: tcp
          ports: [7002]
""", _no_interfaces),
}


@pytest.mark.parametrize("cell", CELLS)
def test_tproxy_behaviour_or_ebpf_refusal(world: None, backend: str, cell: str, tmp_path: Path) -> None:
    spec = CELLS[cell]
    text = harness.intent(f"kfc-{cell}"[:32].rstrip("-"), spec.spec)
    if backend == "ebpf":
        harness.assert_ebpf_refuses(text, tmp_path)
        return
    with harness.applied(backend, (spec.ns, text)):
        for family in harness.FAMILIES:
            spec.check(family)
