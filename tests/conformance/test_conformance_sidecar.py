"""Cells 1 and 3 (and the local half of cell 2): the sidecar namespace under one intent, on both backends.

The intent captures every outbound TCP connection except the proxy's own
(uid 1337) into :15001, and every inbound TCP connection except to :15020 into
:15006. The app (:8080, :15020) and the forwarding proxy
(kernform.sidecar_proxy) run in the sidecar namespace and cgroup; clients come
from other namespaces (cli on eth0, cli2 on eth1) and the upstream server is
``up`` behind eth2.

The module is parametrised by backend, by the inbound rule's interfaces and by
rule order, and every test must hold for every combination:

- ``any``: no interfaces named, which means any interface but lo (refused by
  the ebpf backend, at the rule);
- ``named``: ``interfaces: [eth0, eth1]``, the two client-facing interfaces;
- cell 3, rule order: the outbound rule listed first, or the inbound rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    SIDE_OWN,
    UP_ADDR,
    Addr,
    ProxyLog,
)

from kernform.traffic import hostport

pytestmark = pytest.mark.kernel

RULES = {
    "outbound": f"""      - name: outbound
        direction: outbound
        protocols: [tcp]
        exclude:
          uids: [{PROXY_UID}]
        proxyPort: {harness.OUTBOUND_PORT}
""",
    "inbound": f"""      - name: inbound
        direction: inbound
        protocols: [tcp]{{interfaces}}
        exclude:
          ports: [{EXCLUDED_PORT}]
        proxyPort: {harness.INBOUND_PORT}
""",
}
INTERFACES = {"any": "", "named": "\n        interfaces: [eth0, eth1]"}
ORDERS = ("outbound-first", "inbound-first")


def sidecar_intent(interfaces: str, order: str) -> str:
    first = order.split("-")[0]
    second = "inbound" if first == "outbound" else "outbound"
    rules = (RULES[first] + RULES[second]).replace("{interfaces}", INTERFACES[interfaces])
    return harness.intent("kfc-sidecar", "  interception:\n    rules:\n" + rules, SIDE_CGROUP)


# The ebpf backend intercepts inbound connections on named interfaces only (sk_lookup matches the
# ingress interface, and policy routing for "any interface but lo" would need rules it cannot own):
# the `any` variant is a refused cell there, proven below.
COMBINATIONS = [(b, i, o) for b in harness.BACKENDS for i in INTERFACES for o in ORDERS
                if (b, i) != ("ebpf", "any")]


@pytest.mark.parametrize("order", ORDERS)
def test_ebpf_refuses_inbound_interception_on_any_interface(order: str, tmp_path: Path) -> None:
    text = sidecar_intent("any", order).replace("      - name: inbound\n", f"      - name: inbound  {harness.REFUSED}\n")
    harness.assert_ebpf_refuses(text, tmp_path)


@pytest.fixture(scope="module", params=COMBINATIONS, ids="-".join)
def sidecar(request: pytest.FixtureRequest, proxy: ProxyLog) -> Iterator[str]:
    backend, interfaces, order = request.param
    with harness.applied(backend, (SIDE, sidecar_intent(interfaces, order))):
        yield backend


def through(proxy: ProxyLog, ns: str, host: str, port: int, **kw: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One request, and the proxy log lines it caused."""
    mark = proxy.mark()
    reply = harness.get1(ns, host, port, timeout=2.0, **kw)
    return reply, proxy.since(mark)


CLIENTS = {"cli-eth0": (CLI, CLI_ADDR, SIDE_ETH0), "cli2-eth1": (CLI2, CLI2_ADDR, SIDE_ETH1)}


@pytest.mark.parametrize("family", harness.FAMILIES)
@pytest.mark.parametrize("client", CLIENTS)
def test_inbound_connection_reaches_the_app_through_the_proxy(sidecar: str, proxy: ProxyLog, client: str,
                                                              family: int) -> None:
    ns, client_addr, side_addr = CLIENTS[client]
    reply, lines = through(proxy, ns, side_addr[family], 8080)
    evidence = f"reply {reply}; proxy log {lines}"
    assert reply.get("server") == "app", evidence
    # Exactly one proxy line, inbound: the proxy's passthrough connection is not captured again.
    assert [line["listener"] for line in lines] == ["inbound"], evidence
    (line,) = lines
    assert line["client_ip"] == client_addr[family], evidence
    assert line["original_dst"] == hostport(side_addr[family], 8080) and line["upstream"] == "ok", evidence
    # The app sees the proxy's passthrough connection: from 127.0.0.6 (IPv6: a local default source).
    assert reply["client"] == line["upstream_local"], evidence
    assert reply["client_ip"] == ("127.0.0.6" if family == 4 else side_addr[6]), evidence


@pytest.mark.parametrize("family", harness.FAMILIES)
def test_outbound_connection_goes_through_the_proxy_to_its_destination(sidecar: str, proxy: ProxyLog,
                                                                       family: int) -> None:
    reply, lines = through(proxy, SIDE, UP_ADDR[family], 8080, cgroup=SIDE_CGROUP)
    evidence = f"reply {reply}; proxy log {lines}"
    assert reply.get("server") == "up", evidence
    # One outbound line and no inbound one: the proxy's upstream connection (uid 1337) and its replies
    # are captured by neither rule.
    assert [line["listener"] for line in lines] == ["outbound"], evidence
    (line,) = lines
    assert line["original_dst"] == hostport(UP_ADDR[family], 8080) and line["upstream"] == "ok", evidence
    assert reply["client"] == line["upstream_local"], evidence  # the upstream answered the proxy's connection


@pytest.mark.parametrize("family", harness.FAMILIES)
def test_the_excluded_uid_bypasses_the_proxy(sidecar: str, proxy: ProxyLog, family: int) -> None:
    reply, lines = through(proxy, SIDE, UP_ADDR[family], 8080, cgroup=SIDE_CGROUP, uid=PROXY_UID)
    assert reply.get("server") == "up" and lines == [], f"reply {reply}; proxy log {lines}"
    assert reply["client_ip"] == harness.SIDE_ETH2[family], reply


@pytest.mark.parametrize("family", harness.FAMILIES)
def test_the_excluded_port_is_not_captured_and_accepted_connections_keep_answering(sidecar: str, proxy: ProxyLog,
                                                                                   family: int) -> None:
    # The app answers a client of another namespace directly while outbound capture is on: the replies
    # of a connection the namespace accepted are not outbound connections.
    reply, lines = through(proxy, CLI, SIDE_ETH0[family], EXCLUDED_PORT)
    assert reply.get("server") == "app" and lines == [], f"reply {reply}; proxy log {lines}"
    assert reply["client_ip"] == CLI_ADDR[family], reply


LOCAL = {"loopback": Addr("127.0.0.1", "::1"), "own-eth0": SIDE_ETH0, "own-eth1": SIDE_ETH1}


@pytest.mark.parametrize("family", harness.FAMILIES)
@pytest.mark.parametrize("destination", LOCAL)
def test_local_destinations_are_never_captured(sidecar: str, proxy: ProxyLog, destination: str, family: int) -> None:
    # An app in the cgroup, not the excluded uid: neither the outbound nor the inbound rule may take it.
    reply, lines = through(proxy, SIDE, LOCAL[destination][family], 8080, cgroup=SIDE_CGROUP)
    assert reply.get("server") == "app" and lines == [], f"reply {reply}; proxy log {lines}"
    assert reply["client_ip"] in SIDE_OWN, reply
