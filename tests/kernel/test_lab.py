"""The sandbox lab, proven with real traffic: routing without NAT, the default uplink,
idempotent up, complete down, and not a trace in the root namespace."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from kernform import lab as lab_mod
from kernform import traffic
from kernform.lab import LabMap

pytestmark = pytest.mark.kernel

TCP_PORT, UDP_PORT = 8080, 8053


def get(m: LabMap, host: str, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """`traffic get` run from the client namespace."""
    return lab_mod.run_in(m.client_ns, traffic.command("get", host, str(port), *args), check=False)


def reply(m: LabMap, host: str, port: int, *args: str) -> dict[str, object]:
    res = get(m, host, port, *args)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def servers(lab: LabMap) -> Iterator[LabMap]:
    """A TCP and a UDP `serve` in every backend and wan namespace, named after the namespace."""
    with contextlib.ExitStack() as stack:
        for ns in (*lab.backend_ns, *lab.wan_ns):
            for proto, port in (("tcp", TCP_PORT), ("udp", UDP_PORT)):
                argv = traffic.command("serve", "--name", ns, "--port", str(port), "--proto", proto)
                stack.enter_context(lab_mod.background(ns, argv, ready_port=port, proto=proto))
        yield lab


@pytest.fixture
def scratch_prefix() -> Iterator[str]:
    """A prefix for a test that builds and breaks a lab of its own."""
    prefix = f"kfu{os.getpid() % 1000}"  # not the session lab's kft prefix
    lab_mod.down(prefix)
    yield prefix
    lab_mod.down(prefix)


# --------------------------------------------------------------------------- the map


def test_map_names_follow_prefix_and_addresses_do_not() -> None:
    a, b = lab_mod.lab_map("kf"), lab_mod.lab_map("kft7")
    assert a.namespaces == ("kf-client", "kf-gw", "kf-b1", "kf-b2", "kf-b3", "kf-wan-a", "kf-wan-b")
    assert all(ns.startswith("kft7-") for ns in b.namespaces)
    assert (a.client_v4, a.client_v6, a.internet_v4) == (b.client_v4, b.client_v6, b.internet_v4)
    assert [x.v4 for x in a.backends] == ["10.70.2.11", "10.70.2.12", "10.70.2.13"]
    assert a.uplink("a").v4 == "10.70.3.2" and a.uplink("gw-wan-b").ns == "kf-wan-b"
    assert all(len(i.name) <= 15 for i in a.interfaces)
    rendered = a.render()
    assert "kf-wan-b" in rendered and "198.51.100.10" in rendered and "fd70:2::13" in rendered
    assert a.to_dict()["backends"][0] == {"ns": "kf-b1", "v4": "10.70.2.11", "v6": "fd70:2::11"}


@pytest.mark.parametrize("prefix", ["", "KF", "kf-x", "a/b", "x" * 13])
def test_map_rejects_unsafe_prefix(prefix: str) -> None:
    with pytest.raises(ValueError):
        lab_mod.lab_map(prefix)


# --------------------------------------------------------------------------- traffic


@pytest.mark.parametrize("family", ["v4", "v6"])
@pytest.mark.parametrize("backend", [0, 1, 2])
def test_client_reaches_backend_without_nat(servers: LabMap, backend: int, family: str) -> None:
    m = servers
    b = m.backends[backend]
    dst = b.v4 if family == "v4" else b.v6
    r = reply(m, dst, TCP_PORT)
    assert r["server"] == b.ns
    # The backend sees the client's own address: the gateway routes, it does not translate.
    assert r["client_ip"] == (m.client_v4 if family == "v4" else m.client_v6)
    assert r["local_ip"] == dst


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_udp_reaches_backend(servers: LabMap, family: str) -> None:
    m = servers
    dst = m.backends[1].v4 if family == "v4" else m.backends[1].v6
    r = reply(m, dst, UDP_PORT, "--proto", "udp")
    assert r["server"] == m.backends[1].ns
    assert r["client_ip"] == (m.client_v4 if family == "v4" else m.client_v6)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("family", ["v4", "v6"])
def test_internet_goes_out_via_wan_a_by_default(servers: LabMap, family: str, proto: str) -> None:
    m = servers
    dst = m.internet_v4 if family == "v4" else m.internet_v6
    port = TCP_PORT if proto == "tcp" else UDP_PORT
    r = reply(m, dst, port, "--proto", proto)
    # Both wan namespaces own the internet address; the answer names the one that carried it.
    assert r["server"] == m.uplink(m.default_uplink).ns == m.wan_ns[0]
    assert r["local_ip"] == dst
    assert r["client_ip"] == (m.client_v4 if family == "v4" else m.client_v6)


def test_many_sequential_connections_all_answered(servers: LabMap) -> None:
    m = servers
    res = get(m, m.backends[0].v4, TCP_PORT, "--count", "300")
    assert res.returncode == 0, res.stdout[-500:] + res.stderr
    replies = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(replies) == 300
    assert {r["server"] for r in replies} == {m.backends[0].ns}
    assert len({r["client_port"] for r in replies}) == 300


def test_get_exit_codes(servers: LabMap) -> None:
    m = servers
    ns = m.backends[2].ns
    closed = get(m, m.backends[2].v4, 9999)
    assert closed.returncode == traffic.EXIT_REFUSED and '"refused"' in closed.stdout
    # A listener that never answers: the connection is accepted by the kernel, the reply never comes.
    mute = [
        sys.executable,
        "-c",
        "import socket,time;s=socket.socket();s.bind(('0.0.0.0',9998));s.listen();time.sleep(60)",
    ]
    with lab_mod.background(ns, mute, ready_port=9998):
        silent = get(m, m.backends[2].v4, 9998, "--timeout", "0.3")
    assert silent.returncode == traffic.EXIT_TIMEOUT and '"timeout"' in silent.stdout


# --------------------------------------------------------------------------- lifecycle


def test_up_twice_is_idempotent(lab: LabMap) -> None:
    before = lab_mod.run_in(lab.gw_ns, ["ip", "-o", "link"]).stdout
    t = time.monotonic()
    again = lab_mod.up(lab.prefix)
    assert time.monotonic() - t < 1.0
    assert again == lab
    assert lab_mod.exists(lab.prefix)
    # Same links with the same indexes: nothing was rebuilt.
    assert lab_mod.run_in(lab.gw_ns, ["ip", "-o", "link"]).stdout == before


def test_partial_lab_is_rebuilt_and_down_leaves_nothing(scratch_prefix: str) -> None:
    t = time.monotonic()
    m = lab_mod.up(scratch_prefix)
    assert time.monotonic() - t < 2.0
    assert lab_mod.exists(scratch_prefix)
    lab_mod.run_in(m.gw_ns, ["ip", "link", "del", m.uplink("b").gw_if])
    assert not lab_mod.exists(scratch_prefix)
    lab_mod.up(scratch_prefix)
    assert lab_mod.exists(scratch_prefix)

    lab_mod.down(scratch_prefix)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [ln for ln in listed.splitlines() if ln.split()[0] in m.namespaces]
    assert lab_mod.leftovers(scratch_prefix) == ()
    assert not lab_mod.exists(scratch_prefix)
    lab_mod.down(scratch_prefix)  # nothing there: still fine


def _root_snapshot() -> dict[str, str]:
    """The root namespace's links, addresses, rules and routes (read-only commands)."""
    cmds = {
        "link": ["ip", "-o", "link"],
        "addr": ["ip", "-o", "addr"],
        "rule": ["ip", "rule"],
        "rule6": ["ip", "-6", "rule"],
        "route": ["ip", "route", "show", "table", "all"],
        "route6": ["ip", "-6", "route", "show", "table", "all"],
    }
    snap = {k: subprocess.run(v, capture_output=True, text=True, check=True).stdout for k, v in cmds.items()}
    # Lifetimes of dynamic addresses and routes count down by themselves.
    return {k: re.sub(r"(valid_lft|preferred_lft|expires) \S+", r"\1 _", v) for k, v in snap.items()}


def test_lab_leaves_root_namespace_untouched(scratch_prefix: str) -> None:
    before = _root_snapshot()
    lab_mod.up(scratch_prefix)
    during = _root_snapshot()
    lab_mod.down(scratch_prefix)
    after = _root_snapshot()
    assert during == before
    assert after == before


TPROXY_RULES = """
table inet kfltest {
  chain pre {
    type filter hook prerouting priority mangle; policy accept;
    iifname "gw-client" ip daddr 198.51.100.10 meta l4proto { tcp, udp } th dport 80 tproxy ip to :15001 meta mark set 1
    iifname "gw-client" ip6 daddr 2001:db8:100::10 meta l4proto { tcp, udp } th dport 80 tproxy ip6 to :15001 meta mark set 1
  }
}
"""


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft")
def test_tproxy_listener_sees_client_and_original_destination(scratch_prefix: str) -> None:
    # A lab of its own: this test writes nft rules and policy routes into the gateway.
    m = lab_mod.up(scratch_prefix)
    lab_mod.run_in(m.gw_ns, ["nft", "-f", "-"], input=TPROXY_RULES)
    for fam in ("-4", "-6"):
        lab_mod.run_in(m.gw_ns, ["ip", fam, "rule", "add", "fwmark", "1", "lookup", "100"])
    lab_mod.run_in(m.gw_ns, ["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"])
    lab_mod.run_in(m.gw_ns, ["ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100"])
    with lab_mod.background(m.gw_ns, traffic.command("tproxy", "--port", "15001"), ready_port=15001):
        for dst, src in ((m.internet_v4, m.client_v4), (m.internet_v6, m.client_v6)):
            for proto in ("tcp", "udp"):
                r = reply(m, dst, 80, "--proto", proto)
                assert r["proxy"] is True and r["server"] == "proxy"
                assert r["client_ip"] == src
                assert r["original_dst"] == traffic.hostport(dst, 80)
