"""Cell 2: interfaces scope interception and filtering; local destinations are never captured.

The sidecar namespace has two client-facing interfaces (eth0 to cli, eth1 to
cli2). One intent, on both backends: inbound rules on eth1 only, outbound
capture of all TCP but the proxy's uid (to :15001), and an input filter rule
on eth0 only (deny tcp/9090). The two inbound rules both match tcp/8080 and
tcp/15020 on eth1; the first sends to :15006 but excludes :15020, the second
sends to :15001: the first matching rule wins (8080 goes to :15006), and an
exclusion only makes its own rule not match (15020 goes on to the second). What counts is the interface a
connection arrives on, not the address it is for: cli2 reaching eth0's address
through eth1 is captured, cli reaching eth1's address through eth0 is not.
"""

from __future__ import annotations

from collections.abc import Iterator

import harness
import pytest
from harness import (
    CLI,
    CLI2,
    CLI2_ADDR,
    CLI_ADDR,
    EXCLUDED_PORT,
    PROXY_UID,
    SIDE,
    SIDE_CGROUP,
    SIDE_ETH0,
    SIDE_ETH1,
    UP_ADDR,
    Addr,
    ProxyLog,
)

from kernform.traffic import hostport

pytestmark = pytest.mark.kernel

SPEC = f"""  interception:
    rules:
      - name: inbound-eth1
        direction: inbound
        interfaces: [eth1]
        protocols: [tcp]
        ports: [8080, {EXCLUDED_PORT}]
        exclude:
          ports: [{EXCLUDED_PORT}]
        proxyPort: {harness.INBOUND_PORT}
      - name: inbound-eth1-second
        direction: inbound
        interfaces: [eth1]
        protocols: [tcp]
        ports: [8080, {EXCLUDED_PORT}]
        proxyPort: {harness.OUTBOUND_PORT}
      - name: outbound
        direction: outbound
        protocols: [tcp]
        exclude:
          uids: [{PROXY_UID}]
        proxyPort: {harness.OUTBOUND_PORT}
  filtering:
    input:
      rules:
        - name: deny-9090-eth0
          action: deny
          interfaces: [eth0]
          protocol: tcp
          ports: [9090]
"""


@pytest.fixture(scope="module", params=harness.BACKENDS)
def scoped(request: pytest.FixtureRequest, proxy: ProxyLog) -> Iterator[str]:
    with harness.applied(request.param, (SIDE, harness.intent("kfc-scoped", SPEC, SIDE_CGROUP))):
        yield request.param


# (client namespace, its address or None for the sidecar's own processes, the sidecar address it asks for)
ROUTES = {
    "cli2-via-eth1-to-eth1": (CLI2, CLI2_ADDR, SIDE_ETH1),
    "cli2-via-eth1-to-eth0": (CLI2, CLI2_ADDR, SIDE_ETH0),
    "cli-via-eth0-to-eth0": (CLI, CLI_ADDR, SIDE_ETH0),
    "cli-via-eth0-to-eth1": (CLI, CLI_ADDR, SIDE_ETH1),
    "local-to-eth1": (SIDE, None, SIDE_ETH1),
    "local-to-eth0": (SIDE, None, SIDE_ETH0),
    "local-to-loopback": (SIDE, None, Addr("127.0.0.1", "::1")),
}
CAPTURED = {"cli2-via-eth1-to-eth1", "cli2-via-eth1-to-eth0"}


@pytest.mark.parametrize("family", harness.FAMILIES)
@pytest.mark.parametrize("route", ROUTES)
def test_inbound_interception_takes_only_connections_arriving_on_its_interface(
    scoped: str, proxy: ProxyLog, route: str, family: int
) -> None:
    ns, client, side = ROUTES[route]
    mark = proxy.mark()
    reply = harness.get1(ns, side[family], 8080, timeout=2.0, cgroup=SIDE_CGROUP if ns == SIDE else None)
    lines = proxy.since(mark)
    evidence = f"reply {reply}; proxy log {lines}"
    assert reply.get("server") == "app", evidence
    if route in CAPTURED:
        assert [line["listener"] for line in lines] == ["inbound"], evidence
        assert client is not None and lines[0]["client_ip"] == client[family], evidence
        assert lines[0]["original_dst"] == hostport(side[family], 8080), evidence
        assert reply["client"] == lines[0]["upstream_local"], evidence
    else:
        assert lines == [], evidence
        if client is not None:
            assert reply["client_ip"] == client[family], evidence


@pytest.mark.parametrize("family", harness.FAMILIES)
def test_outbound_capture_beside_a_scoped_inbound_rule(scoped: str, proxy: ProxyLog, family: int) -> None:
    mark = proxy.mark()
    reply = harness.get1(SIDE, UP_ADDR[family], 8080, timeout=2.0, cgroup=SIDE_CGROUP)
    lines = proxy.since(mark)
    evidence = f"reply {reply}; proxy log {lines}"
    assert reply.get("server") == "up", evidence
    assert [line["listener"] for line in lines] == ["outbound"], evidence
    assert lines[0]["original_dst"] == hostport(UP_ADDR[family], 8080), evidence


# (client namespace, sidecar address, answered?)
FILTERED = {
    "cli-via-eth0-denied": (CLI, SIDE_ETH0, False),
    "cli2-via-eth1-to-eth1": (CLI2, SIDE_ETH1, True),
    "cli2-via-eth1-to-eth0": (CLI2, SIDE_ETH0, True),
    "local-to-eth0": (SIDE, SIDE_ETH0, True),
}


@pytest.mark.parametrize("family", harness.FAMILIES)
@pytest.mark.parametrize("route", FILTERED)
def test_a_filter_rule_applies_on_its_interface_only(scoped: str, route: str, family: int) -> None:
    ns, side, allowed = FILTERED[route]
    reply = harness.get1(ns, side[family], 9090, timeout=2.0 if allowed else 0.5,
                         cgroup=SIDE_CGROUP if ns == SIDE else None)
    if allowed:
        assert reply.get("server") == "app", reply
    else:
        assert not harness.answered(reply), reply


@pytest.mark.parametrize("family", harness.FAMILIES)
@pytest.mark.parametrize(("port", "proxy_port"), [(8080, harness.INBOUND_PORT), (EXCLUDED_PORT, harness.OUTBOUND_PORT)])
def test_the_first_matching_rule_wins_and_an_exclusion_falls_through(scoped: str, proxy: ProxyLog, port: int,
                                                                    proxy_port: int, family: int) -> None:
    mark = proxy.mark()
    reply = harness.get1(CLI2, SIDE_ETH1[family], port, timeout=2.0)
    lines = proxy.since(mark)
    evidence = f"reply {reply}; proxy log {lines}"
    assert reply.get("server") == "app", evidence
    assert [line["listener_port"] for line in lines] == [proxy_port], evidence
    assert lines[0]["original_dst"] == hostport(SIDE_ETH1[family], port), evidence
