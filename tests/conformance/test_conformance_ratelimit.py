"""Cell 4: rate limits per source address, stateful (new connections) and stateless (packets).

Two intents applied at once, on both backends:

- fr, forward (stateful, the default): rate-limit tcp/7001 and tcp/7009
  arriving on eth0 to 1 per second, burst 5. A burst of new connections gets
  about 5 through per source; an upload on an established connection is not
  slowed at all (it would crawl at one packet per second if packets counted);
- fs, input, `stateful: false`: rate-limit udp/7054 on eth0 to 5 packets per
  second, burst 5 (a burst of datagrams on ONE flow is cut to about 5), and
  deny udp/7053.

Each test uses source addresses no other test of the module uses, so buckets
start full. (The ebpf refusal of a udp limit in a stateful chain is in
test_conformance_refused.py, with what tproxy does with it.)
"""

from __future__ import annotations

from collections.abc import Iterator

import harness
import pytest
from harness import FC, FR, FS, FS_ADDR

pytestmark = pytest.mark.kernel

BURST = 5
FORWARD = f"""  filtering:
    forward:
      rules:
        - name: new-tcp
          action: rate-limit
          interfaces: [eth0]
          protocol: tcp
          ports: [7001, 7009]
          rateLimit:
            rate: 1
            per: second
            burst: {BURST}
"""
SERVER = f"""  filtering:
    input:
      stateful: false
      rules:
        - name: udp-packets
          action: rate-limit
          interfaces: [eth0]
          protocol: udp
          ports: [7054]
          rateLimit:
            rate: 5
            per: second
            burst: {BURST}
        - name: deny-7053
          action: deny
          interfaces: [eth0]
          protocol: udp
          ports: [7053]
"""
SOURCES: dict[str, dict[int, tuple[str, ...]]] = {  # fc's extra addresses, per test and family
    "tcp-burst": {4: ("10.81.1.3", "10.81.1.5"), 6: ("fd81:1::3", "fd81:1::5")},
    "upload": {4: ("10.81.1.4",), 6: ("fd81:1::4",)},
    "udp-burst": {4: ("10.81.1.3", "10.81.1.5"), 6: ("fd81:1::3", "fd81:1::5")},
}


@pytest.fixture(scope="module", params=harness.BACKENDS)
def limited(request: pytest.FixtureRequest, world: None) -> Iterator[str]:
    with harness.applied(request.param, (FR, harness.intent("kfc-rl", FORWARD)),
                         (FS, harness.intent("kfc-rl-in", SERVER))):
        yield request.param


@pytest.mark.parametrize("family", harness.FAMILIES)
def test_stateful_limit_admits_about_a_burst_of_new_connections_per_source(limited: str, family: int) -> None:
    results = [harness.tool(FC, "burst", FS_ADDR[family], "7001", "20", "--source", source, "--wait", "0.8")
               for source in SOURCES["tcp-burst"][family]]
    # Each source has its own bucket: the second gets its burst even though the first just emptied its own.
    for result in results:
        assert BURST - 1 <= result["connected"] <= BURST + 2, results


@pytest.mark.parametrize("family", harness.FAMILIES)
def test_stateful_limit_does_not_slow_an_established_upload(limited: str, family: int) -> None:
    (source,) = SOURCES["upload"][family]
    size = 8 * 1024 * 1024
    result = harness.tool(FC, "upload", FS_ADDR[family], "7009", str(size), "--source", source, "--timeout", "8")
    assert result.get("received") == size, result
    assert result["seconds"] < 4.0, result  # about 6,000 packets: at 1 packet/s this would take hours
    assert result["client_ip"] == source, result


@pytest.mark.parametrize("family", harness.FAMILIES)
def test_stateless_limit_counts_packets_per_source(limited: str, family: int) -> None:
    results = [harness.tool(FC, "udpburst", FS_ADDR[family], "7054", "40", "--source", source, "--wait", "0.8")
               for source in SOURCES["udp-burst"][family]]
    # 40 datagrams of one flow at once: only the burst is answered, for each source.
    for result in results:
        assert BURST - 1 <= result["answered"] <= BURST + 3, results


@pytest.mark.parametrize("family", harness.FAMILIES)
def test_stateless_udp_deny(limited: str, family: int) -> None:
    denied = harness.get1(FC, FS_ADDR[family], 7053, proto="udp", timeout=0.5)
    allowed = harness.get1(FC, FS_ADDR[family], 7054, proto="udp", timeout=2.0)  # within its burst
    assert not harness.answered(denied) and allowed.get("server") == "fs", (denied, allowed)
