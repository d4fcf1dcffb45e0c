"""Cell 6: load balancing, IPv4 and IPv6, TCP and UDP, the client's address kept, on both backends.

The router fr balances four services over two backends on fs (b1 = :8081
weight 1, b2 = :8082 weight 3), with `loadBalancing.interfaces: [eth0]`:
connections from the client namespace fc arrive there; the router's own
processes (in the intent's cgroup) are balanced too.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import harness
import pytest
from harness import FC, FC_ADDR, FR, FR_OWN, ROUTER_CGROUP, Addr

pytestmark = pytest.mark.kernel

VIPS = {"tcp": Addr("10.81.100.10", "fd81:100::10"), "udp": Addr("10.81.100.53", "fd81:100::53")}
PORTS = {"tcp": 80, "udp": 53}


def _service(name: str, vip: str, port: int, proto: str, backend: str) -> str:
    return f"""      - name: {name}
        vip: "{vip}"
        port: {port}
        protocol: {proto}
        backends:
          - address: "{backend}"
            port: 8081
            weight: 1
          - address: "{backend}"
            port: 8082
            weight: 3
"""


SPEC = "  loadBalancing:\n    interfaces: [eth0]\n    services:\n" + "".join(
    _service(f"{proto}{family}", VIPS[proto][family], PORTS[proto], proto, harness.FS_ADDR[family])
    for proto in ("tcp", "udp") for family in harness.FAMILIES
)


@pytest.fixture(scope="module", params=harness.BACKENDS)
def balanced(request: pytest.FixtureRequest, world: None) -> Iterator[str]:
    with harness.applied(request.param, (FR, harness.intent("kfc-lb", SPEC, ROUTER_CGROUP))):
        yield request.param


@pytest.mark.parametrize("family", harness.FAMILIES)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_client_of_another_namespace_is_balanced_by_weight_with_its_address_kept(
    balanced: str, proto: str, family: int
) -> None:
    replies = harness.get(FC, VIPS[proto][family], PORTS[proto], proto=proto, count=80, timeout=1.0)
    failures = [r for r in replies if not harness.answered(r)]
    assert not failures, (len(failures), failures[:3])
    hits = collections.Counter(r["server"] for r in replies)
    # weights 1:3 -> 20/60 expected; the bounds are about 4 standard deviations wide
    assert 44 <= hits["b2"] <= 76 and hits["b1"] >= 4 and set(hits) == {"b1", "b2"}, hits
    assert {r["client_ip"] for r in replies} == {FC_ADDR[family]}


@pytest.mark.parametrize("family", harness.FAMILIES)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_the_namespaces_own_processes_are_balanced(balanced: str, proto: str, family: int) -> None:
    replies = harness.get(FR, VIPS[proto][family], PORTS[proto], proto=proto, count=60, timeout=1.0,
                          cgroup=ROUTER_CGROUP)
    failures = [r for r in replies if not harness.answered(r)]
    assert not failures, (len(failures), failures[:3])
    hits = collections.Counter(r["server"] for r in replies)
    assert set(hits) == {"b1", "b2"} and hits["b2"] > hits["b1"], hits
    assert {r["client_ip"] for r in replies} <= FR_OWN, {r["client_ip"] for r in replies}
