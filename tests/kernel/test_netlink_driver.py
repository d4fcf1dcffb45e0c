"""The netlink driver and namespace entry against the real kernel, in namespaces of the tests' own.

Every namespace is named `kfn-...`, every veth is born inside its namespaces,
and everything is deleted afterwards (veths first). The root namespace is
only ever read.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace

import pytest

from compiler.errors import InternalError, KernelError
from compiler.objects import (
    IpRoute,
    IpRule,
    KernelObject,
    Nexthop,
    index_by_key,
    ip_route,
    ip_rule,
)
from reconciler import netns as netns_mod
from reconciler.drivers.netlink import NetlinkDriver
from reconciler.plan import Action, diff

pytestmark = pytest.mark.kernel

TABLE = 7100
OTHER_TABLE = 7200


# ------------------------------------------------------------------ plumbing
def ip(*args: str, check: bool = True) -> str:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True).stdout


def batch(ns: str, commands: Iterable[str]) -> None:
    """Run `ip` commands inside `ns` in one process (ip -n NS -batch -; no -4/-6 in batch lines)."""
    text = "\n".join(commands) + "\n"
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input=text, check=True, text=True, capture_output=True)


def new_ns(tag: str) -> str:
    name = f"kfn-{tag}-{uuid.uuid4().hex[:6]}"
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")
    return name


def drop_ns(names: Sequence[str], veths: Sequence[tuple[str, str]] = ()) -> None:
    """Delete veths (in their namespaces) first, then the namespaces."""
    for ns, dev in veths:
        ip("-n", ns, "link", "del", dev, check=False)
    for name in names:
        ip("netns", "del", name, check=False)


def kernel_state(ns: str) -> dict[str, object]:
    """Everything routing-related in `ns`, as iproute2 prints it: the before/after of rollback tests."""
    return {
        f"{family} {what}": json.loads(ip("-n", ns, "-j", family, *what.split()) or "[]")
        for family in ("-4", "-6")
        for what in ("route show table all", "rule show")
    }


@pytest.fixture
def ns() -> Iterator[str]:
    """A namespace with two uplinks, gw-a and gw-b (veths whose peers stay in the same namespace)."""
    name = new_ns("nl")
    veths = [(name, "gw-a"), (name, "gw-b")]
    try:
        batch(name, [
            "link add gw-a type veth peer name gw-a-p",
            "link add gw-b type veth peer name gw-b-p",
            *[f"link set {dev} up" for dev in ("gw-a", "gw-a-p", "gw-b", "gw-b-p")],
            "addr add 192.0.2.1/25 dev gw-a",
            "addr add 192.0.2.129/25 dev gw-b",
            "addr add fd10:a::1/64 dev gw-a nodad",
            "addr add fd10:b::1/64 dev gw-b nodad",
        ])
        yield name
    finally:
        drop_ns([name], veths)


@pytest.fixture
def driver(ns: str) -> Iterator[NetlinkDriver]:
    with NetlinkDriver(ns) as drv:
        yield drv


def plan_actions(desired: Iterable[KernelObject], observed: Iterable[KernelObject]) -> tuple[Action, ...]:
    return diff("t", "tproxy", "t", index_by_key(desired), index_by_key(observed)).actions


def converge(driver: NetlinkDriver, desired: Sequence[KernelObject], tables: Iterable[int] = (TABLE,)) -> int:
    return driver.apply(plan_actions(desired, driver.observe(tables)))


def adds(objects: Iterable[KernelObject]) -> list[Action]:
    return [Action("add", o.key, None, o) for o in objects]


# ------------------------------------------------------------------ the objects
def hop(gateway: str | None, dev: str | None, weight: int = 1) -> Nexthop:
    return Nexthop(gateway, dev, weight)


ROUTES: dict[str, IpRoute] = {
    "v4-via": ip_route(4, TABLE, "10.1.0.0/16", metric=10, nexthops=[hop("192.0.2.2", "gw-a")]),
    "v4-dev-only": ip_route(4, TABLE, "10.2.0.0/16", nexthops=[hop(None, "gw-b")]),
    "v4-default": ip_route(4, TABLE, "0.0.0.0/0", metric=100, nexthops=[hop("192.0.2.130", "gw-b")]),
    "v4-multipath": ip_route(4, TABLE, "10.3.0.0/16", nexthops=[
        hop("192.0.2.130", "gw-b", 3), hop("192.0.2.2", "gw-a", 1), hop("192.0.2.3", "gw-a", 2)]),
    "v4-local-default": ip_route(4, TABLE, "0.0.0.0/0", type="local", nexthops=[hop(None, "lo")]),
    "v4-blackhole": ip_route(4, TABLE, "10.4.0.0/16", type="blackhole"),
    "v4-prohibit": ip_route(4, TABLE, "10.5.0.0/16", metric=7, type="prohibit"),
    "v4-unreachable": ip_route(4, TABLE, "10.6.0.0/24", type="unreachable"),
    "v6-via-metric0": ip_route(6, TABLE, "fd70:1::/64", nexthops=[hop("fd10:a::2", "gw-a")]),
    "v6-default": ip_route(6, TABLE, "::/0", metric=5, nexthops=[hop("fd10:b:0::2", "gw-b")]),
    "v6-multipath": ip_route(6, TABLE, "fd70:2::/64", metric=20, nexthops=[
        hop("fd10:b::2", "gw-b", 2), hop("fd10:a::2", "gw-a", 5)]),
    "v6-local-default": ip_route(6, TABLE, "::/0", type="local", nexthops=[hop(None, "lo")]),
    "v6-blackhole": ip_route(6, TABLE, "fd70:3::/48", type="blackhole"),
    "v6-unreachable": ip_route(6, TABLE, "fd70:4::/48", metric=9, type="unreachable"),
    "v6-prohibit": ip_route(6, TABLE, "fd70:5::/48", type="prohibit"),
}

RULES: dict[str, IpRule] = {
    "v4-all-selectors": ip_rule(
        4, 100, TABLE, source="10.1.0.0/16", destination="10.2.0.0/24", fwmark=0x1, fwmask=0xFF,
        iif="gw-a", oif="gw-b", ip_proto=6, sport=(1000, 2000), dport=(443, 443), uid_range=(1000, 1999)),
    "v6-all-selectors": ip_rule(
        6, 100, TABLE, source="fd00:1::/64", destination="fd00:2::/48", fwmark=0x10, fwmask=0xF0,
        iif="gw-b", oif="gw-a", ip_proto=17, sport=(53, 53), dport=(5000, 6000), uid_range=(0, 0)),
    "v4-fwmark-only": ip_rule(4, 101, TABLE, fwmark=0x1),
    "v4-mask-only": ip_rule(4, 102, TABLE, fwmask=0xFF00),
    "v4-lookup-only": ip_rule(4, 103, TABLE),
    "v6-tproxy": ip_rule(6, 101, TABLE, fwmark=0x1, fwmask=0x1),
    "v4-high-table": ip_rule(4, 104, 100_000, destination="198.51.100.0/24"),
}


# ------------------------------------------------------------------ canonical forms
def test_canonical_forms() -> None:
    assert ROUTES["v6-via-metric0"].metric == 1024  # IPv6 has no metric 0
    assert ROUTES["v4-multipath"].nexthops == (
        hop("192.0.2.130", "gw-b", 3), hop("192.0.2.2", "gw-a", 1), hop("192.0.2.3", "gw-a", 2))
    assert ROUTES["v6-default"].nexthops == (hop("fd10:b::2", "gw-b"),)
    assert ip_route(4, 1, "10.0.0.0/8", nexthops=[hop("10.9.9.9", "x", 7)]).nexthops == (hop("10.9.9.9", "x"),)
    assert RULES["v4-fwmark-only"].fwmask == 0xFFFFFFFF
    assert RULES["v4-mask-only"].fwmark == 0
    assert RULES["v6-all-selectors"].uid_range == (0, 0)
    assert ip_rule(4, 1, 2, source="0.0.0.0/0", uid_range=(0, 0xFFFFFFFF), sport=(0, 0)) == ip_rule(4, 1, 2)
    for bad in (
        lambda: ip_route(4, 1, "10.0.0.1/8", nexthops=[hop(None, "x")]),  # host bits
        lambda: ip_route(4, 1, "10.0.0.0/8", nexthops=[hop("10.1.1.1", None)]),  # no dev
        lambda: ip_route(4, 1, "10.0.0.0/8", type="blackhole", nexthops=[hop(None, "lo")]),
        lambda: ip_route(6, 1, "10.0.0.0/8", type="blackhole"),  # wrong family
        lambda: ip_route(4, 254, "10.0.0.0/8", type="blackhole"),  # main is not ours to own
    ):
        with pytest.raises(ValueError):
            bad()


# ------------------------------------------------------------------ round trips
CASES: dict[str, list[IpRoute | IpRule]] = {
    **{f"route-{name}": [route] for name, route in ROUTES.items()},
    **{f"rule-{name}": [rule] for name, rule in RULES.items()},
    "everything": [*ROUTES.values(), *RULES.values()],
}


@pytest.mark.parametrize("objects", list(CASES.values()), ids=list(CASES))
def test_round_trip(driver: NetlinkDriver, objects: list[IpRoute | IpRule]) -> None:
    tables = {o.table for o in objects} | {TABLE}
    count = driver.apply(plan_actions(objects, driver.observe(tables)))
    assert count == len(objects)
    observed = driver.observe(tables)
    assert sorted(observed, key=str) == sorted(objects, key=str)
    assert plan_actions(objects, observed) == ()
    assert converge(driver, objects, tables) == 0


CHANGES: dict[str, tuple[IpRoute, IpRoute]] = {
    "v4-gateway": (ROUTES["v4-via"], replace(ROUTES["v4-via"], nexthops=(hop("192.0.2.3", "gw-a"),))),
    "v4-single-to-multipath": (ROUTES["v4-default"], replace(ROUTES["v4-default"], nexthops=(
        hop("192.0.2.130", "gw-b", 2), hop("192.0.2.2", "gw-a", 1)))),
    "v4-unicast-to-blackhole": (ROUTES["v4-via"], replace(ROUTES["v4-via"], type="blackhole", nexthops=())),
    "v6-single-to-multipath": (ROUTES["v6-default"], replace(ROUTES["v6-default"], nexthops=(
        hop("fd10:a::2", "gw-a", 1), hop("fd10:b::2", "gw-b", 3)))),
    "v6-multipath-to-single": (ROUTES["v6-multipath"], replace(ROUTES["v6-multipath"], nexthops=(
        hop("fd10:a::3", "gw-a"),))),
    "v6-multipath-weights": (ROUTES["v6-multipath"], replace(ROUTES["v6-multipath"], nexthops=(
        hop("fd10:a::2", "gw-a", 1), hop("fd10:b::2", "gw-b", 1)))),
    "v6-blackhole-to-unicast": (ROUTES["v6-blackhole"], ip_route(
        6, TABLE, "fd70:3::/48", nexthops=[hop("fd10:b::2", "gw-b")])),
}


@pytest.mark.parametrize(("old", "new"), list(CHANGES.values()), ids=list(CHANGES))
def test_route_change_is_one_replace(driver: NetlinkDriver, old: IpRoute, new: IpRoute) -> None:
    assert converge(driver, [old]) == 1
    actions = plan_actions([new], driver.observe([TABLE]))
    assert [a.op for a in actions] == ["change"]
    assert driver.apply(actions) == 1
    assert driver.observe([TABLE]) == [new]


def test_removal_leaves_nothing_of_ours(ns: str, driver: NetlinkDriver) -> None:
    everything = CASES["everything"]
    tables = {TABLE, 100_000}
    converge(driver, everything, tables)
    assert converge(driver, [], tables) == len(everything)
    assert driver.observe(tables) == []
    assert "proto 158" not in ip("-n", ns, "route", "show", "table", "all")
    assert "proto 158" not in ip("-n", ns, "-6", "route", "show", "table", "all")
    assert "proto 158" not in ip("-n", ns, "rule") + ip("-n", ns, "-6", "rule")


# ------------------------------------------------------------------ ownership
def test_foreign_routes_and_rules_are_invisible_and_survive(ns: str, driver: NetlinkDriver) -> None:
    batch(ns, [
        # same table, another protocol
        f"route add 10.99.0.0/16 via 192.0.2.2 dev gw-a table {TABLE} proto static",
        f"route add blackhole 10.4.0.0/16 table {TABLE} metric 50 proto boot",
        f"route add fd99::/64 via fd10:a::2 dev gw-a table {TABLE} proto static",
        # our protocol, but a table this intent does not own
        f"route add 10.98.0.0/16 via 192.0.2.2 dev gw-a table {OTHER_TABLE} proto 158",
        f"rule add priority 100 lookup {OTHER_TABLE} proto 158",
        # same priority and table as ours, no protocol of ours: a delete of ours must not hit it
        f"rule add priority 103 lookup {TABLE}",
        f"rule add priority 100 from 10.1.0.0/16 lookup {TABLE}",
    ])
    ip("-n", ns, "-6", "rule", "add", "priority", "101", "fwmark", "0x1/0x1", "lookup", str(TABLE), "proto", "static")
    foreign_before = kernel_state(ns)
    assert driver.observe([TABLE]) == []
    everything = CASES["everything"]
    converge(driver, everything, {TABLE, 100_000})
    observed = driver.observe({TABLE, 100_000})
    assert sorted(observed, key=str) == sorted(everything, key=str)
    converge(driver, [], {TABLE, 100_000})
    assert kernel_state(ns) == foreign_before


def test_rule_delete_never_takes_a_more_specific_rule_of_ours(driver: NetlinkDriver) -> None:
    # Both have priority 300 and table TABLE; the specific one is listed first. A plain
    # kernel delete of the general one would match (and delete) the specific one.
    specific = ip_rule(4, 300, TABLE, source="10.1.0.0/16", fwmark=0x2)
    general = ip_rule(4, 300, TABLE)
    converge(driver, [specific, general])
    assert driver.apply([Action("remove", general.key, general, None)]) == 3  # 2 deletes + 1 re-add
    assert driver.observe([TABLE]) == [specific]


def test_general_rule_after_a_specific_one_of_ours_is_added(driver: NetlinkDriver) -> None:
    # The kernel calls `priority 300 lookup T` a duplicate of an existing
    # `priority 300 from 10.1.0.0/16 lookup T` (it compares prefixes only when the new rule has them).
    specific = ip_rule(4, 300, TABLE, source="10.1.0.0/16")
    general = ip_rule(4, 300, TABLE)
    assert converge(driver, [specific]) == 1
    assert converge(driver, [specific, general]) == 3  # take specific out, add general, put specific back
    assert sorted(driver.observe([TABLE]), key=str) == sorted([specific, general], key=str)
    assert converge(driver, [specific]) == 1
    assert driver.observe([TABLE]) == [specific]


def test_rules_of_our_protocol_with_unknown_selectors_are_left_alone(ns: str, driver: NetlinkDriver) -> None:
    # Someone else used protocol 158 for rules kernform could never write: observe
    # skips them, and where the kernel would confuse them with ours we refuse to act.
    ip("-n", ns, "rule", "add", "priority", "300", "lookup", str(TABLE), "suppress_prefixlength", "0",
       "proto", "158")
    ip("-n", ns, "rule", "add", "priority", "301", "not", "from", "10.0.0.0/8", "lookup", str(TABLE),
       "proto", "158")
    assert driver.observe([TABLE]) == []
    general = ip_rule(4, 300, TABLE)  # the kernel adds it, but a delete would hit the exotic rule first
    converge(driver, [general])
    assert driver.observe([TABLE]) == [general]
    before = kernel_state(ns)
    with pytest.raises(KernelError, match="cannot delete .* exactly"):
        driver.apply([Action("remove", general.key, general, None)])
    assert kernel_state(ns) == before
    blocked = ip_rule(4, 301, TABLE)  # the kernel calls it a duplicate of `not from 10.0.0.0/8`
    with pytest.raises(KernelError, match="counts it the same as"):
        converge(driver, [general, blocked])
    assert kernel_state(ns) == before


# ------------------------------------------------------------------ failure and rollback
def test_failed_apply_leaves_the_namespace_as_it_was(ns: str, driver: NetlinkDriver) -> None:
    base: list[KernelObject] = [ROUTES["v4-via"], ROUTES["v6-multipath"], ROUTES["v4-blackhole"], RULES["v4-lookup-only"]]
    converge(driver, base)
    before = kernel_state(ns)
    changed = replace(ROUTES["v6-multipath"], nexthops=(hop("fd10:a::9", "gw-a"),))
    missing = ip_route(4, TABLE, "10.77.0.0/16", nexthops=[hop("192.0.2.2", "gw-missing")])
    actions = [
        Action("change", changed.key, ROUTES["v6-multipath"], changed),
        Action("remove", ROUTES["v4-blackhole"].key, ROUTES["v4-blackhole"], None),
        Action("remove", RULES["v4-lookup-only"].key, RULES["v4-lookup-only"], None),
        *adds([RULES["v4-all-selectors"], ROUTES["v4-default"]]),
        *adds([missing]),
        *adds([ROUTES["v4-local-default"]]),
    ]
    with pytest.raises(KernelError) as failure:
        driver.apply(actions)
    message = str(failure.value)
    assert "route 10.77.0.0/16 via 192.0.2.2 dev gw-missing" in message
    assert f"needs interface gw-missing, which does not exist in namespace {ns}" in message
    assert "undone" in message
    assert kernel_state(ns) == before


def test_kernel_refusal_is_rolled_back_and_named(ns: str, driver: NetlinkDriver) -> None:
    before = kernel_state(ns)
    unreachable_gateway = ip_route(4, TABLE, "10.78.0.0/16", nexthops=[hop("203.0.113.1", "gw-a")])
    with pytest.raises(KernelError) as failure:
        driver.apply(adds([ROUTES["v4-via"], RULES["v6-tproxy"], unreachable_gateway]))
    assert "add route 10.78.0.0/16 via 203.0.113.1 dev gw-a" in str(failure.value)
    assert "errno" in str(failure.value)
    assert kernel_state(ns) == before


def test_removing_what_is_not_there_fails_cleanly(ns: str, driver: NetlinkDriver) -> None:
    for obj in (ROUTES["v4-via"], RULES["v4-all-selectors"]):
        with pytest.raises(KernelError, match="not in the kernel"):
            driver.apply([Action("remove", obj.key, obj, None)])


def test_driver_refuses_other_threads(driver: NetlinkDriver) -> None:
    errors: list[BaseException] = []

    def use() -> None:
        try:
            driver.observe([TABLE])
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    worker = threading.Thread(target=use)
    worker.start()
    worker.join()
    assert len(errors) == 1 and isinstance(errors[0], InternalError)


# ------------------------------------------------------------------ namespaces
def own_netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def test_entered_switches_and_restores(ns: str) -> None:
    home = own_netns_inode()
    assert netns_mod.exists(ns) and netns_mod.exists(None)
    assert not netns_mod.exists("kfn-does-not-exist")
    with pytest.raises(RuntimeError), netns_mod.entered(ns):
        assert own_netns_inode() == os.stat(f"/run/netns/{ns}").st_ino
        # a socket created here lives in `ns`: after leaving, it still binds to ns's address
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raise RuntimeError("leaving by an exception still restores")
    assert own_netns_inode() == home
    with listener:
        listener.bind(("192.0.2.1", 0))  # exists only inside ns
    with pytest.raises(KernelError, match="kfn-does-not-exist does not exist"), \
            netns_mod.entered("kfn-does-not-exist"):
        pass
    assert own_netns_inode() == home


# ------------------------------------------------------------------ real traffic
SERVER = textwrap.dedent("""
    import socket, sys
    name = sys.argv[1]
    with socket.create_server(("0.0.0.0", 8080), reuse_port=False) as server:
        print("ready", flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                conn.sendall(name.encode())
""")

CLIENT = textwrap.dedent("""
    import socket
    with socket.create_connection(("198.51.100.10", 8080), timeout=3) as conn:
        print(conn.recv(100).decode())
""")


@pytest.fixture
def wan() -> Iterator[tuple[str, str, str]]:
    """client --(cl-a)-- wan-a, client --(cl-b)-- wan-b; both wans hold 198.51.100.10 and serve on :8080."""
    client, wan_a, wan_b = new_ns("cl"), new_ns("wa"), new_ns("wb")
    servers: list[subprocess.Popen[str]] = []
    try:
        ip("-n", client, "link", "add", "cl-a", "type", "veth", "peer", "name", "wa-cl", "netns", wan_a)
        ip("-n", client, "link", "add", "cl-b", "type", "veth", "peer", "name", "wb-cl", "netns", wan_b)
        batch(client, ["link set cl-a up", "link set cl-b up",
                       "addr add 10.20.1.1/24 dev cl-a", "addr add 10.20.2.1/24 dev cl-b",
                       "route add default via 10.20.1.2 dev cl-a"])  # the main table says: wan-a
        for wan_ns, dev, address in ((wan_a, "wa-cl", "10.20.1.2/24"), (wan_b, "wb-cl", "10.20.2.2/24")):
            batch(wan_ns, [f"link set {dev} up", f"addr add {address} dev {dev}",
                           "addr add 198.51.100.10/32 dev lo"])
        for wan_ns, label in ((wan_a, "wan-a"), (wan_b, "wan-b")):
            server = subprocess.Popen(["ip", "netns", "exec", wan_ns, sys.executable, "-c", SERVER, label],
                                      stdout=subprocess.PIPE, text=True)
            servers.append(server)
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield client, wan_a, wan_b
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=5)
        drop_ns([client, wan_a, wan_b], [(client, "cl-a"), (client, "cl-b")])


def answered_by(client: str) -> str:
    result = subprocess.run(["ip", "netns", "exec", client, sys.executable, "-c", CLIENT],
                            capture_output=True, text=True, timeout=10, check=True)
    return result.stdout.strip()


def test_policy_rule_steers_real_traffic(wan: tuple[str, str, str]) -> None:
    client, _, _ = wan
    policy: list[KernelObject] = [
        ip_route(4, TABLE, "0.0.0.0/0", nexthops=[hop("10.20.2.2", "cl-b")]),
        ip_rule(4, 100, TABLE, destination="198.51.100.10/32", ip_proto=6, dport=(8080, 8080)),
    ]
    assert answered_by(client) == "wan-a"
    with NetlinkDriver(client) as driver:
        assert converge(driver, policy) == 2
        assert answered_by(client) == "wan-b"
        assert converge(driver, policy) == 0
        assert converge(driver, []) == 2
    assert answered_by(client) == "wan-a"


# ------------------------------------------------------------------ timings
def test_observe_of_a_thousand_routes_is_fast(ns: str, driver: NetlinkDriver) -> None:
    routes = [ip_route(4, TABLE, f"10.{i // 256}.{i % 256}.0/24", nexthops=[hop("192.0.2.2", "gw-a")])
              for i in range(1000)]
    started = time.perf_counter()
    assert driver.apply(adds(routes)) == 1000
    apply_1000 = time.perf_counter() - started
    # noise the driver must skip cheaply: foreign routes in the same table
    batch(ns, [f"route add 172.16.{i // 256}.{i % 256}/32 dev gw-b table {TABLE}" for i in range(1000)])
    started = time.perf_counter()
    observed = driver.observe([TABLE])
    observe = time.perf_counter() - started
    assert len(observed) == 1000
    one = ip_route(4, TABLE, "192.168.0.0/24", nexthops=[hop("192.0.2.2", "gw-a")])
    started = time.perf_counter()
    driver.apply(adds([one]))
    apply_one = time.perf_counter() - started
    started = time.perf_counter()
    with NetlinkDriver(ns):
        pass
    open_close = time.perf_counter() - started
    print(f"\napply 1000 routes {apply_1000 * 1000:.1f} ms; observe 1000 of 2000 {observe * 1000:.1f} ms; "
          f"apply one {apply_one * 1000:.2f} ms; open+close {open_close * 1000:.2f} ms")
    assert observe < 1.0
    assert apply_one < 0.1
