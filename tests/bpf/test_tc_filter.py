"""tc_filter.c with real traffic: two namespaces joined by a veth, the filter
on the server side's ingress. A denied source cannot connect and is counted;
an allowed source connects; a rate-limited UDP flow loses what exceeds its
burst."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.bpf

ACT_ALLOW, ACT_DENY, ACT_RATE_LIMIT = 1, 2, 3
RULE_INGRESS, RULE_EGRESS, RULE_INPUT, RULE_FORWARD = 1, 2, 16, 32
TCP, UDP = 6, 17
SERVER = "10.77.0.10"
ALLOWED, DENIED = "10.77.0.1", "10.77.0.2"
DEFAULT_COUNTER = 64  # counters[KF_MAX_RULES + 0] counts the input chain's default action


@pytest.fixture
def pair(netns: Any, kf: Any) -> Iterator[tuple[str, str]]:
    client, server = netns.add("tcc"), netns.add("tcs")
    kf.sh("ip", "-n", client, "link", "add", "kfc0", "type", "veth", "peer", "name", "kfs0", "netns", server)
    kf.sh("ip", "-n", client, "addr", "add", f"{ALLOWED}/24", "dev", "kfc0")
    kf.sh("ip", "-n", client, "addr", "add", f"{DENIED}/24", "dev", "kfc0")
    kf.sh("ip", "-n", server, "addr", "add", f"{SERVER}/24", "dev", "kfs0")
    kf.sh("ip", "-n", client, "link", "set", "kfc0", "up")
    kf.sh("ip", "-n", server, "link", "set", "kfs0", "up")
    yield client, server


def attach_ingress(kf: Any, server: str, fn: Any) -> None:
    from pyroute2 import IPRoute

    with kf.in_netns(server), IPRoute() as ipr:
        idx = ipr.link_lookup(ifname="kfs0")[0]
        ipr.tc("add", "clsact", idx)
        ipr.tc(
            "add-filter",
            "bpf",
            idx,
            ":1",
            fd=fn.fd,
            name=fn.name.decode(),
            parent="ffff:fff2",
            classid=1,
            direct_action=True,
        )


def set_rule(table: Any, idx: int, **fields: int) -> None:
    leaf = table.Leaf()
    leaf.flags = RULE_INGRESS | RULE_INPUT
    leaf.dport_lo, leaf.dport_hi = 0, 65535
    for name, value in fields.items():
        setattr(leaf, name, value)
    table[table.Key(idx)] = leaf


def server_is_local(bpf: Any) -> None:
    """local_addrs as the reconciler fills it: SERVER is the server namespace's own, so its traffic is input."""
    table = bpf[b"local_addrs"]
    key = table.Key()
    key.family = 4
    for i, byte in enumerate(socket.inet_aton(SERVER)):
        key.addr[i] = byte
    table[key] = table.Leaf(1)


def counter(bpf: Any, idx: int) -> dict[str, int]:
    per_cpu = bpf[b"counters"][bpf[b"counters"].Key(idx)]
    return {f: sum(getattr(c, f) for c in per_cpu) for f in ("packets", "bytes", "dropped")}


def tcp_connect(kf: Any, ns: str, src: str, dst: str, port: int) -> bool:
    with kf.in_netns(ns):
        s = socket.socket()
    try:
        s.settimeout(1.5)
        s.bind((src, 0))
        s.connect((dst, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_denied_source_is_dropped_and_counted(kf: Any, pair: tuple[str, str]) -> None:
    client, server = pair
    bpf = kf.load_bpf("tc_filter.c")
    fn = bpf.load_func(b"kf_tc_ingress", kf.PROG_TYPES["SCHED_CLS"])

    # rule 0: deny DENIED/32 -> anything; rule 1: allow 10.77.0.0/24 -> SERVER tcp 8080.
    src = kf.rule_bitmaps({0: [f"{DENIED}/32"], 1: ["10.77.0.0/24"]})
    dst = kf.rule_bitmaps({0: ["0.0.0.0/0", "::/0"], 1: [f"{SERVER}/32"]})
    assert src[f"{DENIED}/32"] == [0b11]  # the /24 covering it is OR-ed in
    kf.fill_lpm(bpf[b"src_v4"], src, 4)
    kf.fill_lpm(bpf[b"dst_v4"], dst, 4)
    set_rule(bpf[b"rules"], 0, action=ACT_DENY, counter=0)
    set_rule(bpf[b"rules"], 1, action=ACT_ALLOW, counter=1, proto=TCP, dport_lo=8080, dport_hi=8080)
    cfg = bpf[b"config"]
    leaf = cfg.Leaf()
    leaf.default_input = ACT_DENY
    cfg[cfg.Key(0)] = leaf
    server_is_local(bpf)
    attach_ingress(kf, server, fn)

    with kf.in_netns(server):
        listener = socket.socket()
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((SERVER, 8080))
        listener.listen(16)

        assert not tcp_connect(kf, client, DENIED, SERVER, 8080)
        assert tcp_connect(kf, client, ALLOWED, SERVER, 8080)
        # another port of an allowed source falls to the default action (deny)
        assert not tcp_connect(kf, client, ALLOWED, SERVER, 8081)

    denied, allowed, default = counter(bpf, 0), counter(bpf, 1), counter(bpf, DEFAULT_COUNTER)
    assert denied["packets"] >= 1 and denied["dropped"] == denied["packets"]
    assert allowed["packets"] >= 2 and allowed["dropped"] == 0  # SYN, ACK, ...
    assert default["dropped"] >= 1


def test_rate_limit_drops_above_burst(kf: Any, pair: tuple[str, str]) -> None:
    client, server = pair
    bpf = kf.load_bpf("tc_filter.c")
    fn = bpf.load_func(b"kf_tc_ingress", kf.PROG_TYPES["SCHED_CLS"])
    kf.fill_lpm(bpf[b"src_v4"], kf.rule_bitmaps({0: ["0.0.0.0/0"]}), 4)
    kf.fill_lpm(bpf[b"dst_v4"], kf.rule_bitmaps({0: ["0.0.0.0/0"]}), 4)
    set_rule(
        bpf[b"rules"],
        0,
        action=ACT_RATE_LIMIT,
        counter=0,
        proto=UDP,
        dport_lo=9999,
        dport_hi=9999,
        rate=1,
        burst=5,
    )
    server_is_local(bpf)
    attach_ingress(kf, server, fn)

    with kf.in_netns(server):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with kf.in_netns(client):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((SERVER, 9999))
        rx.settimeout(0.5)
        for i in range(20):
            tx.sendto(b"x%d" % i, (SERVER, 9999))
        got = 0
        try:
            while True:
                rx.recv(64)
                got += 1
        except TimeoutError:
            pass
    assert 5 <= got <= 7  # burst, plus at most a refill or two
    c = counter(bpf, 0)
    assert c["packets"] == 20 and c["dropped"] == 20 - got
