"""Cell 5, stateful chains: forward, input and output filtering with default allow, IPv4 and IPv6.

fc (client) -- fr (router) -- fs (server). Three intents applied at once, one
per namespace, on both backends; every chain is stateful (the default), so a
deny rule stops new connections while the packets of accepted ones, replies
included, pass:

- fr, forward: deny tcp/7002 arriving on eth0; deny tcp from the server's
  network arriving on eth1 (new connections from the server; the replies of
  the client's connections to it pass);
- fs, input: deny tcp/7003 on eth0 (its own loopback connections are not on eth0);
- fc, input: deny tcp from the router's address on eth0 (its replies pass);
  fc, output: deny tcp/7004 on eth0.
"""

from __future__ import annotations

from collections.abc import Iterator

import harness
import pytest
from harness import FC, FC_ADDR, FR, FR_ETH0, FR_ETH1, FS, FS_ADDR, Addr

pytestmark = pytest.mark.kernel

FORWARD = """  filtering:
    forward:
      rules:
        - name: deny-7002
          action: deny
          interfaces: [eth0]
          protocol: tcp
          ports: [7002]
        - name: deny-new-from-server
          action: deny
          interfaces: [eth1]
          protocol: tcp
          sources: [10.81.2.0/24, "fd81:2::/64"]
"""
SERVER = """  filtering:
    input:
      rules:
        - name: deny-7003
          action: deny
          interfaces: [eth0]
          protocol: tcp
          ports: [7003]
"""
CLIENT = """  filtering:
    input:
      rules:
        - name: deny-new-from-router
          action: deny
          interfaces: [eth0]
          protocol: tcp
          sources: [10.81.1.1/32, "fd81:1::1/128"]
    output:
      rules:
        - name: deny-7004
          action: deny
          interfaces: [eth0]
          protocol: tcp
          ports: [7004]
"""


@pytest.fixture(scope="module", params=harness.BACKENDS)
def stateful(request: pytest.FixtureRequest, world: None) -> Iterator[str]:
    with harness.applied(request.param, (FR, harness.intent("kfc-fwd", FORWARD)),
                         (FS, harness.intent("kfc-in", SERVER)), (FC, harness.intent("kfc-out", CLIENT))):
        yield request.param


# name: (client namespace, its address, destination, port, answered?)
CELLS: dict[str, tuple[str, Addr, Addr, int, bool]] = {
    "forward-allowed-port": (FC, FC_ADDR, FS_ADDR, 7001, True),
    "forward-denied-port": (FC, FC_ADDR, FS_ADDR, 7002, False),
    "forward-new-from-server-denied": (FS, FS_ADDR, FC_ADDR, 7001, False),
    "forward-rules-leave-the-router-alone": (FS, FS_ADDR, FR_ETH1, 7001, True),
    "input-denied-port": (FC, FC_ADDR, FS_ADDR, 7003, False),
    "input-rule-not-on-loopback": (FS, FS_ADDR, FS_ADDR, 7003, True),
    "input-replies-of-accepted-connections-pass": (FC, FC_ADDR, FR_ETH0, 7001, True),
    "input-new-from-router-denied": (FR, FR_ETH0, FC_ADDR, 7001, False),
    "output-denied-port": (FC, FC_ADDR, FS_ADDR, 7004, False),
}


@pytest.mark.parametrize("family", harness.FAMILIES)
@pytest.mark.parametrize("cell", CELLS)
def test_stateful_filtering(stateful: str, cell: str, family: int) -> None:
    ns, source, destination, port, allowed = CELLS[cell]
    reply = harness.get1(ns, destination[family], port, timeout=2.0 if allowed else 0.5)
    if allowed:
        assert harness.answered(reply), reply
        assert reply["client_ip"] == source[family], reply  # no address translation on the way
    else:
        assert not harness.answered(reply), reply
