"""Cell 5, stateless chains: default deny with explicit allows (TCP and UDP), and a deny that meets replies.

Two intents applied at once, on both backends, with `stateful: false`:

- fr, forward, default deny: allow tcp/7001 and udp/7054 arriving on eth0,
  and everything from the server's network arriving on eth1 (the replies:
  nothing remembers connections here). The default covers every interface;
  the ebpf backend is told which they are (`spec.ebpf.interfaces`, ignored by
  tproxy; without it ebpf refuses, see test_conformance_refused.py);
- fc, input, default allow: deny tcp from the router's address on eth0. In a
  stateless chain that also drops the replies of fc's own connections to the
  router (the stateful module shows the same rule letting them pass).

Neighbour caches are flushed before each test, so every exchange needs
neighbour discovery to pass the forward chain's default deny, as it must after
any cache expiry (neighbour discovery is the router's own input and output,
not forwarded traffic; IPv4's ARP is not IP at all).
"""

from __future__ import annotations

from collections.abc import Iterator

import harness
import pytest
from harness import FC, FC_ADDR, FR, FR_ETH0, FS, FS_ADDR, Addr

pytestmark = pytest.mark.kernel

FORWARD = """  ebpf:
    interfaces: [eth0, eth1]
  filtering:
    forward:
      stateful: false
      default: deny
      rules:
        - name: allow-7001
          action: allow
          interfaces: [eth0]
          protocol: tcp
          ports: [7001]
        - name: allow-7054
          action: allow
          interfaces: [eth0]
          protocol: udp
          ports: [7054]
        - name: allow-replies
          action: allow
          interfaces: [eth1]
          sources: [10.81.2.0/24, "fd81:2::/64"]
"""
CLIENT = """  filtering:
    input:
      stateful: false
      rules:
        - name: deny-from-router
          action: deny
          interfaces: [eth0]
          protocol: tcp
          sources: [10.81.1.1/32, "fd81:1::1/128"]
"""


@pytest.fixture(scope="module", params=harness.BACKENDS)
def stateless(request: pytest.FixtureRequest, world: None) -> Iterator[str]:
    with harness.applied(request.param, (FR, harness.intent("kfc-sl", FORWARD)),
                         (FC, harness.intent("kfc-sl-in", CLIENT))):
        yield request.param


@pytest.fixture(autouse=True)
def cold_neighbour_caches() -> None:
    harness.flush_neighbours(FC, FR, FS)


# name: (destination, port, protocol, answered?)
CELLS: dict[str, tuple[Addr, int, str, bool]] = {
    "allowed-tcp": (FS_ADDR, 7001, "tcp", True),
    "default-deny-tcp": (FS_ADDR, 7002, "tcp", False),
    "allowed-udp": (FS_ADDR, 7054, "udp", True),
    "default-deny-udp": (FS_ADDR, 7053, "udp", False),
    "deny-drops-replies": (FR_ETH0, 7001, "tcp", False),
}


@pytest.mark.parametrize("family", harness.FAMILIES)
@pytest.mark.parametrize("cell", CELLS)
def test_stateless_filtering(stateless: str, cell: str, family: int) -> None:
    destination, port, proto, allowed = CELLS[cell]
    reply = harness.get1(FC, destination[family], port, proto=proto, timeout=2.0 if allowed else 0.5)
    if allowed:
        assert harness.answered(reply), reply
        assert reply["client_ip"] == FC_ADDR[family], reply
    else:
        assert not harness.answered(reply), reply
