"""sock_connect.c with real sockets: processes in a test cgroup, in a test
network namespace, connect to a VIP and reach a backend (random and
affinity); an intercepted destination reaches the proxy, which learns the
original destination with getsockopt(SO_ORIGINAL_DST); an excluded uid is
not intercepted; processes outside the cgroup are untouched."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.bpf

TCP = 6
LB_RANDOM, LB_AFFINITY = 0, 1
ICPT_REDIRECT = 1
MAGLEV_SIZE = 11
CFLAGS = ["-DKF_MAX_SERVICES=4", "-DKF_MAX_BACKENDS=8"]
SO_ORIGINAL_DST = 80
NOBODY = 65534


@pytest.fixture
def attached(kf: Any, cgroup: Any) -> Iterator[Callable[[Any, str, str, str], Any]]:
    """attach(bpf, function, prog type, attach type): loads and attaches to the test cgroup."""
    done: list[tuple[Any, Any, int]] = []

    def attach(bpf: Any, function: str, prog_type: str, attach_type: str) -> Any:
        at = kf.ATTACH_TYPES[attach_type]
        fn = bpf.load_func(function.encode(), kf.PROG_TYPES[prog_type], attach_type=at)
        bpf.attach_func(fn, cgroup.fd, at)
        done.append((bpf, fn, at))
        return fn

    yield attach
    for bpf, fn, at in reversed(done):
        bpf.detach_func(fn, cgroup.fd, at)


def add_service(bpf: Any, kf: Any, vip: str, port: int, svc_id: int, backends: list[int], algorithm: int) -> None:
    """A v4 service whose Maglev table cycles through backend indexes (equal weights)."""
    services = bpf[b"services_v4"]
    key = services.Key()
    kf.set_addr(key.vip, vip)
    key.port, key.proto = port, TCP
    leaf = services.Leaf()
    leaf.id, leaf.backend_count, leaf.algorithm, leaf.maglev_size = svc_id, len(backends), algorithm, MAGLEV_SIZE
    services[key] = leaf
    write_maglev(bpf, svc_id, [backends[slot % len(backends)] + 1 for slot in range(MAGLEV_SIZE)])


def write_maglev(bpf: Any, svc_id: int, slots: list[int]) -> None:
    """A service's Maglev table, one chunk of up to 256 slots: maglev[{id, 0}] (bpf/lib/kf_types.h)."""
    maglev = bpf[b"maglev"]
    key = maglev.Key()
    key.id, key.chunk = svc_id, 0
    leaf = maglev.Leaf()
    for i, value in enumerate(slots):
        leaf.slot[i] = value
    maglev[key] = leaf


def set_backend(bpf: Any, kf: Any, svc_id: int, position: int, addr: str, port: int, v6: bool = False) -> None:
    """Backend `position` of service `svc_id`: backends_v4/v6[{id, 0}].b[position] (chunks of 16)."""
    table = bpf[b"backends_v6" if v6 else b"backends_v4"]
    key = table.Key()
    key.id, key.chunk = svc_id, 0
    leaf = table.get(key) or table.Leaf()
    kf.set_addr(leaf.b[position].addr, addr)
    leaf.b[position].port = port
    table[key] = leaf


def listeners(kf: Any, ns: str, count: int) -> list[socket.socket]:
    out = []
    for _ in range(count):
        with kf.in_netns(ns):
            s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        out.append(s)
    return out


def connect_many(send: Callable[[Any], None], dst: tuple[str, int], count: int) -> None:
    peers = []
    for _ in range(count):
        with socket.socket() as s:
            s.settimeout(2)
            s.connect(dst)
            peers.append(s.getpeername()[1])
    send(peers)


def try_connect(send: Callable[[Any], None], dst: tuple[str, int]) -> None:
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect(dst)
            send({"ok": s.getsockname()})
        except OSError as e:
            send({"errno": e.errno})


def test_connect4_balances_vip_for_cgroup_members_only(kf: Any, netns: Any, cgroup: Any, attached: Any) -> None:
    ns = netns.add("lb")
    bpf = kf.load_bpf("sock_connect.c", CFLAGS)
    backends = listeners(kf, ns, 2)
    ports = [b.getsockname()[1] for b in backends]
    for i, port in enumerate(ports):
        for svc_id in (0, 1):
            set_backend(bpf, kf, svc_id, i, "127.0.0.1", port)
    add_service(bpf, kf, "10.96.0.1", 80, 0, [0, 1], LB_RANDOM)
    add_service(bpf, kf, "10.96.0.2", 80, 1, [0, 1], LB_AFFINITY)
    attached(bpf, "kf_connect4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT")

    try:
        random_child = kf.Child(connect_many, ("10.96.0.1", 80), 40, netns=ns, cgroup=cgroup)
        random_peers = random_child.recv()
        assert random_child.wait() == 0
        assert set(random_peers) == set(ports)  # both backends, chance of failure 2 * 2**-40

        sticky_child = kf.Child(connect_many, ("10.96.0.2", 80), 20, netns=ns, cgroup=cgroup)
        sticky_peers = sticky_child.recv()
        assert sticky_child.wait() == 0
        assert len(set(sticky_peers)) == 1 and sticky_peers[0] in ports  # one netns, one backend

        outsider = kf.Child(try_connect, ("10.96.0.1", 80), netns=ns)  # not in the cgroup
        assert outsider.recv() == {"errno": errno.ENETUNREACH}
        assert outsider.wait() == 0
    finally:
        for b in backends:
            b.close()


def proxy_once(send: Callable[[Any], None], port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(8)
        s.settimeout(5)
        send("ready")
        conn, _ = s.accept()
        with conn:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            family, dport = struct.unpack_from("=HH", raw)
            send({"family": family, "port": socket.ntohs(dport), "addr": socket.inet_ntoa(raw[4:8])})


def test_connect4_intercepts_to_proxy_with_original_destination(
    kf: Any, netns: Any, cgroup: Any, attached: Any
) -> None:
    ns = netns.add("icpt")
    bpf = kf.load_bpf("sock_connect.c", CFLAGS)
    kf.fill_lpm(bpf[b"intercept_v4"], kf.rule_bitmaps({0: ["10.200.0.0/16"]}), 4)
    rules = bpf[b"intercept_rules"]
    leaf = rules.Leaf()
    leaf.action, leaf.proto, leaf.port_lo, leaf.port_hi, leaf.proxy_port = ICPT_REDIRECT, TCP, 80, 80, 15001
    rules[rules.Key(0)] = leaf
    bpf[b"exclude_uid"][bpf[b"exclude_uid"].Key(NOBODY)] = bpf[b"exclude_uid"].Leaf(1)
    attached(bpf, "kf_connect4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT")
    attached(bpf, "kf_sockops", "SOCK_OPS", "CGROUP_SOCK_OPS")
    attached(bpf, "kf_getsockopt", "CGROUP_SOCKOPT", "CGROUP_GETSOCKOPT")

    proxy = kf.Child(proxy_once, 15001, netns=ns, cgroup=cgroup)
    assert proxy.recv() == "ready"
    client = kf.Child(try_connect, ("10.200.1.2", 80), netns=ns, cgroup=cgroup)
    assert "ok" in client.recv()
    assert client.wait() == 0
    assert proxy.recv() == {"family": socket.AF_INET, "port": 80, "addr": "10.200.1.2"}
    assert proxy.wait() == 0

    # the excluded uid goes to the real destination (unroutable in this netns)
    excluded = kf.Child(try_connect, ("10.200.1.2", 80), netns=ns, cgroup=cgroup, uid=NOBODY)
    assert excluded.recv() == {"errno": errno.ENETUNREACH}
    assert excluded.wait() == 0

    counters = bpf[b"intercept_counters"][bpf[b"intercept_counters"].Key(0)]
    assert sum(c.redirected for c in counters) == 1
    assert sum(c.bypassed for c in counters) == 1


UDP = 17


def udp_query(send: Callable[[Any], None], dst: tuple[str, int]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(b"ping", dst)
        data, source = s.recvfrom(64)
        send({"data": data.decode(), "source": list(source)})


def test_sendmsg4_balances_datagrams_and_recvmsg4_restores_the_vip(
    kf: Any, netns: Any, cgroup: Any, attached: Any
) -> None:
    ns = netns.add("udp")
    bpf = kf.load_bpf("sock_connect.c", CFLAGS)
    with kf.in_netns(ns):
        backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with backend:
        backend.bind(("127.0.0.1", 0))
        backend.settimeout(2)
        set_backend(bpf, kf, 2, 0, "127.0.0.1", backend.getsockname()[1])
        services = bpf[b"services_v4"]
        key = services.Key()
        kf.set_addr(key.vip, "10.96.0.53")
        key.port, key.proto = 53, UDP
        leaf = services.Leaf()
        leaf.id, leaf.backend_count, leaf.maglev_size = 2, 1, MAGLEV_SIZE
        services[key] = leaf
        write_maglev(bpf, 2, [1] * MAGLEV_SIZE)
        attached(bpf, "kf_sendmsg4", "CGROUP_SOCK_ADDR", "CGROUP_UDP4_SENDMSG")
        attached(bpf, "kf_recvmsg4", "CGROUP_SOCK_ADDR", "CGROUP_UDP4_RECVMSG")

        client = kf.Child(udp_query, ("10.96.0.53", 53), netns=ns, cgroup=cgroup)
        data, peer = backend.recvfrom(64)
        assert data == b"ping"
        backend.sendto(b"pong", peer)
        assert client.recv() == {"data": "pong", "source": ["10.96.0.53", 53]}
        assert client.wait() == 0


def test_connect6_balances_v6_vip(kf: Any, netns: Any, cgroup: Any, attached: Any) -> None:
    ns = netns.add("lb6")
    bpf = kf.load_bpf("sock_connect.c", CFLAGS)
    with kf.in_netns(ns):
        backend = socket.socket(socket.AF_INET6)
    with backend:
        backend.bind(("::1", 0))
        backend.listen(8)
        set_backend(bpf, kf, 3, 0, "::1", backend.getsockname()[1], v6=True)
        services = bpf[b"services_v6"]
        key = services.Key()
        kf.set_addr(key.vip, "fd00::96")
        key.port, key.proto = 443, TCP
        svc = services.Leaf()
        svc.id, svc.backend_count, svc.maglev_size = 3, 1, MAGLEV_SIZE
        services[key] = svc
        write_maglev(bpf, 3, [1] * MAGLEV_SIZE)
        attached(bpf, "kf_connect6", "CGROUP_SOCK_ADDR", "CGROUP_INET6_CONNECT")

        def connect6(send: Callable[[Any], None]) -> None:
            with socket.socket(socket.AF_INET6) as s:
                s.settimeout(2)
                s.connect(("fd00::96", 443))
                send(list(s.getpeername()[:2]))

        child = kf.Child(connect6, netns=ns, cgroup=cgroup)
        assert child.recv() == ["::1", backend.getsockname()[1]]
        assert child.wait() == 0
