"""tc_lb.c with real traffic between three namespaces:

    client (kfl0) <-> (kfl1) gw (kfl2) <-> (kfl3) backends

The gateway forwards (ip_forward=1 inside it only); tc_lb sits on its
client-facing interface kfl1, ingress and egress. The client routes the VIP
prefixes via the gateway, the backends' default route is the gateway. Three
backends (one namespace, three addresses) answer every TCP connection and
UDP datagram with their name and the peer address they saw.

Checksums are checked for real: the gateway computes checksums of CHECKSUM_PARTIAL
packets in software when it sends them (tx checksum offload off), the receivers
verify them in software (rx checksum offload off) and count failures in
InCsumErrors, and captures at the client and the backends recompute every IPv4
header and TCP/UDP checksum. The `offload` parameter selects whether senders
hand the gateway CHECKSUM_PARTIAL packets ("partial", the veth default) or
complete checksums ("complete")."""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import ipaddress
import json
import selectors
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

pytestmark = pytest.mark.bpf

TCP, UDP = 6, 17
LB_RANDOM, LB_AFFINITY = 0, 1
MAGLEV_SIZE = 251
MAX_SERVICES = 8
CFLAGS = [
    f"-DKF_MAX_SERVICES={MAX_SERVICES}",
    "-DKF_MAX_BACKENDS=16",
    "-DKF_LB_FLOWS=4096",
]

CLIENT4, CLIENT4_B, GW4_CLIENT_SIDE, GW4_BACKEND_SIDE = "10.78.0.2", "10.78.0.3", "10.78.0.1", "10.78.1.254"
CLIENT6, GW6_CLIENT_SIDE, GW6_BACKEND_SIDE = "fd00:78::2", "fd00:78::1", "fd00:78:1::ff"
NAMES = ["b0", "b1", "b2"]
BACKENDS4 = ["10.78.1.1", "10.78.1.2", "10.78.1.3"]
BACKENDS6 = ["fd00:78:1::1", "fd00:78:1::2", "fd00:78:1::3"]
TCP_PORT, UDP_PORT = 8080, 5353
WEIGHTS = [1, 2, 1]
# An IPv6 destination options header: next header (filled in by the kernel), length 0
# (8 bytes), a PadN option of 4 bytes.
DSTOPTS = bytes([0, 0, 1, 4, 0, 0, 0, 0])


@dataclass(frozen=True)
class Service:
    id: int
    vip: str
    port: int
    proto: int
    algorithm: int = LB_RANDOM
    weights: tuple[int, ...] = tuple(WEIGHTS)


SVC_TCP4 = Service(0, "10.96.0.10", 80, TCP)
SVC_AFFINITY4 = Service(1, "10.96.0.11", 80, TCP, LB_AFFINITY, (1, 1, 1))
SVC_UDP4 = Service(2, "10.96.0.53", 53, UDP)
SVC_EMPTY4 = Service(3, "10.96.0.99", 80, TCP, weights=())
SVC_TCP6 = Service(4, "fd00:96::10", 80, TCP)
SVC_UDP6 = Service(5, "fd00:96::53", 53, UDP)
SERVICES = [SVC_TCP4, SVC_AFFINITY4, SVC_UDP4, SVC_EMPTY4, SVC_TCP6, SVC_UDP6]


# ---- map contents -------------------------------------------------------------------


def maglev_table(names: list[str], weights: tuple[int, ...], size: int) -> list[int]:
    """Weighted Maglev: in every round backend i claims its next `weights[i]` preferred
    free slots (its permutation of the table), until every slot is taken."""
    perms = []
    for name in names:
        h = hashlib.sha256(name.encode()).digest()
        perms.append((int.from_bytes(h[:8]) % size, int.from_bytes(h[8:16]) % (size - 1) + 1))
    table, taken, nxt = [-1] * size, 0, [0] * len(names)
    while True:
        for i, (offset, skip) in enumerate(perms):
            for _ in range(weights[i]):
                while table[c := (offset + nxt[i] * skip) % size] >= 0:
                    nxt[i] += 1
                table[c] = i
                taken += 1
                if taken == size:
                    return table


def add_service(bpf: Any, kf: Any, svc: Service) -> list[int]:
    """Writes the service, its backends (the three addresses, on TCP_PORT or UDP_PORT by protocol) and its
    Maglev table. Returns the slot counts per backend."""
    v6 = ipaddress.ip_address(svc.vip).version == 6
    services = bpf[b"services_v6" if v6 else b"services_v4"]
    key = services.Key()
    kf.set_addr(key.vip, svc.vip)
    key.port, key.proto = svc.port, svc.proto
    leaf = services.Leaf()
    leaf.id, leaf.backend_count, leaf.algorithm = svc.id, len(svc.weights), svc.algorithm
    leaf.maglev_size = MAGLEV_SIZE if svc.weights else 0
    services[key] = leaf
    if not svc.weights:
        return []
    write_backends(bpf, kf, svc.id, v6, [(a, UDP_PORT if svc.proto == UDP else TCP_PORT)
                                         for a in (BACKENDS6 if v6 else BACKENDS4)])
    table = maglev_table(NAMES, svc.weights, MAGLEV_SIZE)
    write_maglev(bpf, svc.id, [backend + 1 for backend in table])
    return [table.count(i) for i in range(len(NAMES))]


def write_backends(bpf: Any, kf: Any, svc_id: int, v6: bool, backends: list[tuple[str, int]]) -> None:
    """A service's backends in order, one chunk of up to 16: backends_v4/v6[{id, 0}] (bpf/lib/kf_types.h)."""
    table = bpf[b"backends_v6" if v6 else b"backends_v4"]
    key = table.Key()
    key.id, key.chunk = svc_id, 0
    leaf = table.Leaf()
    for i, (addr, port) in enumerate(backends):
        kf.set_addr(leaf.b[i].addr, addr)
        leaf.b[i].port = port
    table[key] = leaf


def write_maglev(bpf: Any, svc_id: int, slots: list[int]) -> None:
    """The service's Maglev table as chunks of 256 slots: maglev[{id, chunk}] (bpf/lib/kf_types.h)."""
    maglev = bpf[b"maglev"]
    for chunk in range(0, len(slots), 256):
        key = maglev.Key()
        key.id, key.chunk = svc_id, chunk // 256
        leaf = maglev.Leaf()
        for i, value in enumerate(slots[chunk : chunk + 256]):
            leaf.slot[i] = value
        maglev[key] = leaf


def fill_maps(bpf: Any, kf: Any) -> dict[int, list[int]]:
    return {svc.id: add_service(bpf, kf, svc) for svc in SERVICES}


def lb_counter(bpf: Any, svc: Service) -> dict[str, int]:
    # a per-CPU hash: a service's entry appears with its first packet
    per_cpu = bpf[b"lb_counters"].get(bpf[b"lb_counters"].Key(svc.id)) or []
    return {f: sum(getattr(c, f) for c in per_cpu) for f in ("new_flows", "packets", "bytes", "dropped")}


def addr_of(raw: Any, version: int) -> str:
    return str(ipaddress.ip_address(bytes(raw)[: 4 if version == 4 else 16]))


# ---- namespaces, offloads, attachment -------------------------------------------


SIOCETHTOOL, ETHTOOL_SRXCSUM, ETHTOOL_STXCSUM = 0x8946, 0x15, 0x17


def set_csum_offload(kf: Any, ns: str, ifname: str, *, tx: bool | None = None, rx: bool | None = None) -> None:
    """ethtool -K <ifname> tx/rx on|off through the legacy ioctl (no ethtool binary here)."""
    with kf.in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        for cmd, value in ((ETHTOOL_STXCSUM, tx), (ETHTOOL_SRXCSUM, rx)):
            if value is None:
                continue
            buf = ctypes.create_string_buffer(struct.pack("=II", cmd, int(value)))
            ifreq = struct.pack("@16sP", ifname.encode(), ctypes.addressof(buf)).ljust(40, b"\0")
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)


@dataclass
class Lab:
    client: str
    gw: str
    backends: str


@pytest.fixture
def offload() -> str:
    return "partial"


@pytest.fixture
def lab(netns: Any, kf: Any, offload: str) -> Lab:
    client, gw, backends = netns.add("lbc"), netns.add("lbg"), netns.add("lbb")
    kf.sh("ip", "-n", client, "link", "add", "kfl0", "type", "veth", "peer", "name", "kfl1", "netns", gw)
    kf.sh("ip", "-n", gw, "link", "add", "kfl2", "type", "veth", "peer", "name", "kfl3", "netns", backends)
    for ns, dev, addrs in (
        (client, "kfl0", [f"{CLIENT4}/24", f"{CLIENT4_B}/24", f"{CLIENT6}/64"]),
        (gw, "kfl1", [f"{GW4_CLIENT_SIDE}/24", f"{GW6_CLIENT_SIDE}/64"]),
        (gw, "kfl2", [f"{GW4_BACKEND_SIDE}/24", f"{GW6_BACKEND_SIDE}/64"]),
        (backends, "kfl3", [f"{a}/24" for a in BACKENDS4] + [f"{a}/64" for a in BACKENDS6]),
    ):
        for addr in addrs:
            extra = ["nodad"] if ":" in addr else []
            kf.sh("ip", "-n", ns, "addr", "add", addr, "dev", dev, *extra)
        kf.sh("ip", "-n", ns, "link", "set", dev, "up")
    kf.sh("ip", "-n", client, "route", "add", "10.96.0.0/24", "via", GW4_CLIENT_SIDE)
    kf.sh("ip", "-n", client, "-6", "route", "add", "fd00:96::/64", "via", GW6_CLIENT_SIDE)
    kf.sh("ip", "-n", client, "route", "add", "10.78.1.0/24", "via", GW4_CLIENT_SIDE)
    kf.sh("ip", "-n", client, "-6", "route", "add", "fd00:78:1::/64", "via", GW6_CLIENT_SIDE)
    kf.sh("ip", "-n", backends, "route", "add", "default", "via", GW4_BACKEND_SIDE)
    kf.sh("ip", "-n", backends, "-6", "route", "add", "default", "via", GW6_BACKEND_SIDE)
    kf.sh("ip", "netns", "exec", gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    kf.sh("ip", "netns", "exec", gw, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    # The gateway completes CHECKSUM_PARTIAL packets when sending them, the
    # receivers verify every checksum in software.
    set_csum_offload(kf, gw, "kfl1", tx=False)
    set_csum_offload(kf, gw, "kfl2", tx=False)
    set_csum_offload(kf, client, "kfl0", rx=False, tx=offload == "partial")
    set_csum_offload(kf, backends, "kfl3", rx=False, tx=offload == "partial")
    return Lab(client, gw, backends)


def attach(kf: Any, ns: str, ifname: str, fn: Any, parent: str, pref: int) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with kf.in_netns(ns), IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as e:
            if e.code != 17:  # EEXIST: the first attach added it
                raise
        ipr.tc(
            "add-filter",
            "bpf",
            idx,
            ":1",
            fd=fn.fd,
            name=fn.name.decode(),
            parent=parent,
            classid=1,
            direct_action=True,
            prio=pref,
        )


INGRESS, EGRESS = "ffff:fff2", "ffff:fff3"
LB_PREF, FILTER_PREF = 1, 2


@dataclass
class LB:
    bpf: Any
    lab: Lab
    slots: dict[int, list[int]]


@pytest.fixture
def lb(kf: Any, lab: Lab) -> LB:
    bpf = kf.load_bpf("tc_lb.c", CFLAGS)
    ingress = bpf.load_func(b"kf_lb_ingress", kf.PROG_TYPES["SCHED_CLS"])
    egress = bpf.load_func(b"kf_lb_egress", kf.PROG_TYPES["SCHED_CLS"])
    slots = fill_maps(bpf, kf)
    attach(kf, lab.gw, "kfl1", ingress, INGRESS, LB_PREF)
    attach(kf, lab.gw, "kfl1", egress, EGRESS, LB_PREF)
    return LB(bpf, lab, slots)


# ---- backends -------------------------------------------------------------------------


class Backends:
    """TCP and UDP servers on every backend address (v4 and v6), served by one thread.

    A TCP connection gets one JSON line {name, peer, local} and is closed; a UDP
    datagram is answered with the same JSON from the port it came to, with
    the UDP checksum left out (SO_NO_CHECK) if the datagram says "nocheck", and
    behind an IPv6 destination options header if it says "dstopts".
    """

    SO_NO_CHECK = 11

    def __init__(self, kf: Any, ns: str) -> None:
        self.sel = selectors.DefaultSelector()
        self.stop = threading.Event()
        for name, a4, a6 in zip(NAMES, BACKENDS4, BACKENDS6, strict=True):
            for family, addr in ((socket.AF_INET, a4), (socket.AF_INET6, a6)):
                with kf.in_netns(ns):
                    t = socket.socket(family, socket.SOCK_STREAM)
                    u = socket.socket(family, socket.SOCK_DGRAM)
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                t.bind((addr, TCP_PORT))
                t.listen(512)
                u.bind((addr, UDP_PORT))
                self.sel.register(t, selectors.EVENT_READ, ("tcp", name))
                self.sel.register(u, selectors.EVENT_READ, ("udp", name))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.sel.select(timeout=0.1):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                kind, name = key.data
                if kind == "tcp":
                    conn, peer = sock.accept()
                    with conn:
                        conn.settimeout(2)
                        reply = {"name": name, "peer": list(peer[:2]), "local": list(conn.getsockname()[:2])}
                        conn.sendall(json.dumps(reply).encode() + b"\n")
                else:
                    data, peer = sock.recvfrom(256)
                    sock.setsockopt(socket.SOL_SOCKET, self.SO_NO_CHECK, int(data == b"nocheck"))
                    if data == b"dstopts":
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, DSTOPTS)
                    reply = {"name": name, "peer": list(peer[:2]), "local": list(sock.getsockname()[:2])}
                    sock.sendto(json.dumps(reply).encode(), peer)
                    if data == b"dstopts":
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, b"")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()


@pytest.fixture
def servers(kf: Any, lab: Lab) -> Iterator[Backends]:
    b = Backends(kf, lab.backends)
    try:
        yield b
    finally:
        b.close()


# ---- client side ----------------------------------------------------------------------


def family_of(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def tcp_ask(kf: Any, ns: str, dst: tuple[str, int], src: str | None = None, timeout: float = 2.0) -> dict[str, Any]:
    """Connects from ns, returns the backend's JSON plus the peer/local the client saw."""
    with kf.in_netns(ns):
        s = socket.socket(family_of(dst[0]), socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout)
        if src:
            s.bind((src, 0))
        s.connect(dst)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        reply = json.loads(data)
        reply["client_peer"] = list(s.getpeername()[:2])
        reply["client_local"] = list(s.getsockname()[:2])
        return reply


def udp_ask(
    kf: Any, ns: str, dst: tuple[str, int], payload: bytes = b"hello", sock: socket.socket | None = None
) -> dict[str, Any]:
    """Sends payload from ns ("nocheck": without UDP checksum, "dstopts": behind an IPv6
    destination options header), returns the backend's JSON plus the reply's source."""
    s = sock
    if s is None:
        with kf.in_netns(ns):
            s = socket.socket(family_of(dst[0]), socket.SOCK_DGRAM)
    try:
        s.settimeout(2)
        if payload == b"nocheck":
            s.setsockopt(socket.SOL_SOCKET, Backends.SO_NO_CHECK, 1)
        if payload == b"dstopts":
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, DSTOPTS)
        s.sendto(payload, dst)
        data, source = s.recvfrom(4096)
        reply = json.loads(data)
        reply["source"] = list(source[:2])
        reply["client_local"] = list(s.getsockname()[:2])
        return reply
    finally:
        if sock is None:
            s.close()


def csum_errors(kf: Any, ns: str) -> dict[str, int]:
    """InCsumErrors of Tcp and Udp (IPv4 and IPv6) in a namespace."""
    out: dict[str, int] = {}
    snmp = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], capture_output=True, text=True).stdout
    lines = [line.split() for line in snmp.splitlines()]
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names[0] in ("Tcp:", "Udp:") and "InCsumErrors" in names:
            out[names[0][:-1]] = int(values[names.index("InCsumErrors")])
    snmp6 = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp6"], capture_output=True, text=True).stdout
    for line in snmp6.splitlines():
        name, value = line.split()
        if name == "Udp6InCsumErrors":
            out["Udp6"] = int(value)
    return out


# ---- captures and checksum verification ---------------------------------------------


@dataclass
class Packet:
    version: int
    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    l4_csum: int
    ip_ok: bool
    l4_ok: bool
    ext_headers: int = 0


def _fold(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def parse_frame(frame: bytes) -> Packet | None:
    """An Ethernet frame with IPv4/IPv6 (+ hop-by-hop / routing / destination options
    headers) + TCP/UDP, checksums recomputed."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    ip = frame[14:]
    if ethertype == 0x0800:
        ihl = (ip[0] & 0x0F) * 4
        total, proto = struct.unpack_from("!H", ip, 2)[0], ip[9]
        if struct.unpack_from("!H", ip, 6)[0] & 0x3FFF:
            return None  # fragments: not ours
        src, dst, l4 = ip[12:16], ip[16:20], ip[ihl:total]
        pseudo = src + dst + struct.pack("!BBH", 0, proto, len(l4))
        ip_ok, version = _fold(ip[:ihl]) == 0xFFFF, 4
    elif ethertype == 0x86DD:
        plen, proto = struct.unpack_from("!HB", ip, 4)
        src, dst, off, ext = ip[8:24], ip[24:40], 40, 0
        while proto in (0, 43, 60):
            proto, off, ext = ip[off], off + (ip[off + 1] + 1) * 8, ext + 1
        l4 = ip[off : 40 + plen]
        pseudo = src + dst + struct.pack("!IxxxB", len(l4), proto)
        ip_ok, version = True, 6
    else:
        return None
    if proto not in (TCP, UDP):
        return None
    sport, dport = struct.unpack_from("!HH", l4)
    l4_csum = struct.unpack_from("!H", l4, 16 if proto == TCP else 6)[0]
    l4_ok = (proto == UDP and version == 4 and l4_csum == 0) or _fold(pseudo + l4) == 0xFFFF
    return Packet(
        version,
        proto,
        str(ipaddress.ip_address(src)),
        str(ipaddress.ip_address(dst)),
        sport,
        dport,
        l4_csum,
        ip_ok,
        l4_ok,
        ext if version == 6 else 0,
    )


@dataclass
class Capture:
    """Frames received (not sent) on one interface, read by a thread until stop()."""

    sock: socket.socket
    frames: list[bytes] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    PACKET_OUTGOING = 4

    @classmethod
    def start(cls, kf: Any, ns: str, ifname: str) -> Capture:
        with kf.in_netns(ns):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        s.bind((ifname, 0))
        s.settimeout(0.1)
        cap = cls(s)
        cap.thread = threading.Thread(target=cap._run, daemon=True)
        cap.thread.start()
        return cap

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                frame, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            if addr[2] != self.PACKET_OUTGOING:
                self.frames.append(frame)

    def stop(self) -> list[Packet]:
        time.sleep(0.2)  # the last frames of a closing connection
        self.done.set()
        assert self.thread is not None
        self.thread.join(timeout=5)
        self.sock.close()
        return [p for p in map(parse_frame, self.frames) if p is not None]


@pytest.fixture
def captures(kf: Any, lab: Lab) -> Iterator[dict[str, Capture]]:
    caps = {"client": Capture.start(kf, lab.client, "kfl0"), "backends": Capture.start(kf, lab.backends, "kfl3")}
    try:
        yield caps
    finally:
        for cap in caps.values():
            if not cap.done.is_set():
                cap.stop()


def assert_checksums_ok(packets: list[Packet]) -> None:
    bad = [p for p in packets if not (p.ip_ok and p.l4_ok)]
    assert not bad, bad


# ---- tests ------------------------------------------------------------------------------


def test_map_layouts(kf: Any) -> None:
    """The layouts bpf/README.md documents for the Python side, and maglev is mmap-able."""
    bpf = kf.load_bpf("tc_lb.c", CFLAGS)

    def layout(t: Any) -> list[tuple[str, int, int]]:
        return [(name, getattr(t, name).offset, getattr(t, name).size) for name, *_ in t._fields_]

    assert layout(bpf[b"lb_flows"].Key) == [
        ("family", 0, 1),
        ("proto", 1, 1),
        ("client_port", 2, 2),
        ("vip_port", 4, 2),
        ("pad", 6, 2),
        ("client_addr", 8, 16),
        ("vip_addr", 24, 16),
    ]
    assert layout(bpf[b"lb_flows"].Leaf) == [
        ("backend_addr", 0, 16),
        ("backend_port", 16, 2),
        ("pad", 18, 2),
        ("service_id", 20, 4),
    ]
    assert layout(bpf[b"lb_rev"].Key) == [
        ("family", 0, 1),
        ("proto", 1, 1),
        ("backend_port", 2, 2),
        ("client_port", 4, 2),
        ("pad", 6, 2),
        ("backend_addr", 8, 16),
        ("client_addr", 24, 16),
    ]
    assert layout(bpf[b"lb_rev"].Leaf) == [("vip_addr", 0, 16), ("vip_port", 16, 2), ("pad", 18, 2)]
    assert layout(bpf[b"lb_counters"].sLeaf) == [
        ("new_flows", 0, 8),
        ("packets", 8, 8),
        ("bytes", 16, 8),
        ("dropped", 24, 8),
    ]
    assert [ctypes.sizeof(bpf[n].Key) for n in (b"services_v4", b"services_v6")] == [8, 20]
    # backends: {u32 id, u32 chunk} -> 16 kf_backend_v4 (8 B) / kf_backend_v6 (20 B)
    assert [ctypes.sizeof(bpf[n].Leaf) for n in (b"services_v4", b"backends_v4", b"backends_v6")] == [12, 128, 320]
    assert layout(bpf[b"backends_v4"].Key) == [("id", 0, 4), ("chunk", 4, 4)]
    assert layout(bpf[b"services_v4"].Leaf) == [
        ("id", 0, 4),
        ("backend_count", 4, 2),
        ("algorithm", 6, 1),
        ("flags", 7, 1),
        ("maglev_size", 8, 4),
    ]
    # maglev: {u32 id, u32 chunk} -> 256 u32 slots
    assert layout(bpf[b"maglev"].Key) == [("id", 0, 4), ("chunk", 4, 4)]
    assert ctypes.sizeof(bpf[b"maglev"].Leaf) == 1024


@pytest.mark.parametrize("offload", ["partial", "complete"])
def test_tcp_v4_vip_is_balanced_by_weight_with_client_address_kept(
    kf: Any, lb: LB, servers: Backends, captures: dict[str, Capture], offload: str
) -> None:
    count = 400
    replies = [tcp_ask(kf, lb.lab.client, (SVC_TCP4.vip, SVC_TCP4.port)) for _ in range(count)]
    client_pkts, backend_pkts = captures["client"].stop(), captures["backends"].stop()

    assert all(r["peer"][0] == CLIENT4 for r in replies)  # the client address is preserved
    assert all(r["client_peer"] == [SVC_TCP4.vip, SVC_TCP4.port] for r in replies)  # replies come from the VIP
    by_name = {n: BACKENDS4[i] for i, n in enumerate(NAMES)}
    assert all(r["local"] == [by_name[r["name"]], TCP_PORT] for r in replies)
    # every backend saw the client port the client used
    assert sorted(r["peer"][1] for r in replies) == sorted(r["client_local"][1] for r in replies)

    seen = Counter(r["name"] for r in replies)
    slots = lb.slots[SVC_TCP4.id]
    for i, name in enumerate(NAMES):
        expected = count * slots[i] / MAGLEV_SIZE
        assert abs(seen[name] - expected) <= 0.35 * expected, (seen, slots)
    assert seen["b1"] > seen["b0"] and seen["b1"] > seen["b2"]

    c = lb_counter(lb.bpf, SVC_TCP4)
    assert c["new_flows"] == len({r["client_local"][1] for r in replies})
    assert c["packets"] >= 3 * count and c["bytes"] > c["packets"] * 54 and c["dropped"] == 0

    # What crossed the wire: backends only see client -> backend, the client only VIP -> client,
    # every checksum verified, and the receiving stacks counted no checksum error.
    assert {(p.src, p.dst, p.dport) for p in backend_pkts if p.proto == TCP} <= {
        (CLIENT4, a, TCP_PORT) for a in BACKENDS4
    }
    assert {(p.src, p.sport, p.dst) for p in client_pkts if p.proto == TCP} == {(SVC_TCP4.vip, SVC_TCP4.port, CLIENT4)}
    assert len(backend_pkts) >= 3 * count and len(client_pkts) >= 3 * count
    assert_checksums_ok(client_pkts + backend_pkts)
    assert csum_errors(kf, lb.lab.backends)["Tcp"] == 0
    assert csum_errors(kf, lb.lab.client)["Tcp"] == 0


@pytest.mark.parametrize("offload", ["partial", "complete"])
def test_tcp_v6_vip_is_balanced_with_client_address_kept(
    kf: Any, lb: LB, servers: Backends, captures: dict[str, Capture], offload: str
) -> None:
    count = 200
    replies = [tcp_ask(kf, lb.lab.client, (SVC_TCP6.vip, SVC_TCP6.port)) for _ in range(count)]
    packets = captures["client"].stop() + captures["backends"].stop()

    assert all(r["peer"][0] == CLIENT6 for r in replies)
    assert all(r["client_peer"] == [SVC_TCP6.vip, SVC_TCP6.port] for r in replies)
    assert all(r["local"] == [BACKENDS6[NAMES.index(r["name"])], TCP_PORT] for r in replies)
    seen = Counter(r["name"] for r in replies)
    slots = lb.slots[SVC_TCP6.id]
    for i, name in enumerate(NAMES):
        expected = count * slots[i] / MAGLEV_SIZE
        assert abs(seen[name] - expected) <= 0.5 * expected, (seen, slots)
    assert lb_counter(lb.bpf, SVC_TCP6)["new_flows"] == len({r["client_local"][1] for r in replies})

    assert len(packets) >= 6 * count
    assert all(p.version == 6 for p in packets if p.proto == TCP)
    assert_checksums_ok(packets)
    assert csum_errors(kf, lb.lab.backends)["Tcp"] == 0
    assert csum_errors(kf, lb.lab.client)["Tcp"] == 0


def test_affinity_keeps_each_client_address_on_one_backend(kf: Any, lb: LB, servers: Backends) -> None:
    for src in (CLIENT4, CLIENT4_B):
        replies = [tcp_ask(kf, lb.lab.client, (SVC_AFFINITY4.vip, SVC_AFFINITY4.port), src=src) for _ in range(40)]
        assert len({r["name"] for r in replies}) == 1, Counter(r["name"] for r in replies)
        assert {r["peer"][0] for r in replies} == {src}
    assert lb_counter(lb.bpf, SVC_AFFINITY4)["new_flows"] >= 2


@pytest.mark.parametrize(
    ("svc", "client", "payload"),
    [
        pytest.param(SVC_UDP4, CLIENT4, b"hello", id="v4"),
        pytest.param(SVC_UDP4, CLIENT4, b"nocheck", id="v4-checksum-0"),
        pytest.param(SVC_UDP6, CLIENT6, b"hello", id="v6"),
        pytest.param(SVC_UDP6, CLIENT6, b"dstopts", id="v6-extension-header"),
    ],
)
def test_udp_reply_comes_from_the_vip(
    kf: Any, lb: LB, servers: Backends, captures: dict[str, Capture], svc: Service, client: str, payload: bytes
) -> None:
    reply = udp_ask(kf, lb.lab.client, (svc.vip, svc.port), payload)
    client_pkts, backend_pkts = captures["client"].stop(), captures["backends"].stop()

    assert reply["source"] == [svc.vip, svc.port]  # recvfrom sees the VIP
    assert reply["peer"] == [client, reply["client_local"][1]]  # the backend saw the client
    backends = BACKENDS4 if svc.vip.count(".") == 3 else BACKENDS6
    assert reply["local"] == [backends[NAMES.index(reply["name"])], UDP_PORT]

    # the flow and its reverse entry, read back through the documented layouts
    version = ipaddress.ip_address(svc.vip).version
    flows = [(k, v) for k, v in lb.bpf[b"lb_flows"].items() if k.proto == UDP]
    assert len(flows) == 1
    k, v = flows[0]
    assert (k.family, addr_of(k.client_addr, version), k.client_port) == (version, client, reply["peer"][1])
    assert (addr_of(k.vip_addr, version), k.vip_port, v.service_id) == (svc.vip, svc.port, svc.id)
    assert [addr_of(v.backend_addr, version), v.backend_port] == reply["local"]
    revs = [(k, v) for k, v in lb.bpf[b"lb_rev"].items() if k.proto == UDP]
    assert len(revs) == 1
    rk, rv = revs[0]
    assert [addr_of(rk.backend_addr, version), rk.backend_port] == reply["local"]
    assert [addr_of(rk.client_addr, version), rk.client_port] == reply["peer"]
    assert [addr_of(rv.vip_addr, version), rv.vip_port] == [svc.vip, svc.port]
    assert lb_counter(lb.bpf, svc) | {"bytes": 0} == {"new_flows": 1, "packets": 1, "bytes": 0, "dropped": 0}

    request = [p for p in backend_pkts if p.proto == UDP and p.dport == UDP_PORT]
    response = [p for p in client_pkts if p.proto == UDP and p.sport == svc.port]
    assert len(request) == 1 and len(response) == 1
    assert (request[0].src, request[0].dst) == (client, reply["local"][0])
    assert (response[0].src, response[0].dst) == (svc.vip, client)
    if payload == b"nocheck":  # a zero UDP checksum (IPv4: "none") stays zero in both directions
        assert request[0].l4_csum == 0 and response[0].l4_csum == 0
    else:
        assert request[0].l4_csum != 0 and response[0].l4_csum != 0
    if payload == b"dstopts":  # translated behind the extension header, both ways
        assert request[0].ext_headers == 1 and response[0].ext_headers == 1
    assert_checksums_ok(client_pkts + backend_pkts)
    assert csum_errors(kf, lb.lab.backends) == {"Tcp": 0, "Udp": 0, "Udp6": 0}
    assert csum_errors(kf, lb.lab.client) == {"Tcp": 0, "Udp": 0, "Udp6": 0}


def test_random_choice_is_a_function_of_the_flow(kf: Any, lb: LB, servers: Backends) -> None:
    """KF_LB_RANDOM hashes the 5-tuple: a flow whose map entries are gone (LRU eviction)
    comes back to the same backend while the Maglev table is unchanged."""
    chosen = []
    for _ in range(20):
        with kf.in_netns(lb.lab.client):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:  # one socket: one 5-tuple
            names = set()
            for _ in range(3):
                names.add(udp_ask(kf, lb.lab.client, (SVC_UDP4.vip, SVC_UDP4.port), sock=s)["name"])
                lb.bpf[b"lb_flows"].clear()
                lb.bpf[b"lb_rev"].clear()
            assert len(names) == 1
            chosen.append(names.pop())
    assert len(set(chosen)) > 1  # ... and different flows are spread (all equal: p < 1e-5)
    assert lb_counter(lb.bpf, SVC_UDP4)["new_flows"] == 3 * 20


def test_service_without_backends_drops_and_counts(
    kf: Any, lb: LB, servers: Backends, captures: dict[str, Capture]
) -> None:
    with pytest.raises(TimeoutError):
        tcp_ask(kf, lb.lab.client, (SVC_EMPTY4.vip, SVC_EMPTY4.port), timeout=1.5)
    backend_pkts = captures["backends"].stop()

    c = lb_counter(lb.bpf, SVC_EMPTY4)
    assert c["dropped"] >= 1 and c["dropped"] == c["packets"] and c["new_flows"] == 0
    assert not [p for p in backend_pkts if p.src == CLIENT4]  # nothing reached a backend
    assert not list(lb.bpf[b"lb_flows"].keys())


def test_non_service_traffic_passes_untouched(kf: Any, lb: LB, servers: Backends) -> None:
    # straight to a backend address through the gateway: neither direction is rewritten
    reply = tcp_ask(kf, lb.lab.client, (BACKENDS4[0], TCP_PORT))
    assert reply["name"] == "b0" and reply["peer"][0] == CLIENT4
    assert reply["client_peer"] == [BACKENDS4[0], TCP_PORT]
    udp = udp_ask(kf, lb.lab.client, (BACKENDS6[2], UDP_PORT))
    assert udp["name"] == "b2" and udp["source"] == [BACKENDS6[2], UDP_PORT]
    # a VIP on a port that is no service is not translated: the gateway has no route for it
    with pytest.raises(OSError):
        tcp_ask(kf, lb.lab.client, (SVC_TCP4.vip, 81), timeout=1.5)

    assert not list(lb.bpf[b"lb_flows"].keys()) and not list(lb.bpf[b"lb_rev"].keys())
    for svc in SERVICES:
        assert lb_counter(lb.bpf, svc)["packets"] == 0


ACT_ALLOW, RULE_INGRESS, RULE_EGRESS = 1, 1, 2
RULE_FORWARD, RULE_OUTPUT = 32, 64


def test_tc_filter_at_a_higher_pref_still_runs_after_it(kf: Any, lb: LB, servers: Backends) -> None:
    """TC_ACT_UNSPEC chaining: tc_filter (pref 2) sees every packet after tc_lb (pref 1), i.e.
    the backend as destination at ingress (forward rules). At egress the replies leaving are forwarded,
    not the gateway's own: no output rule sees them (as nft's output chain does not)."""
    flt = kf.load_bpf("tc_filter.c")
    # 0: ingress to a backend, 1: ingress to a VIP, 2: egress from a VIP, 3: egress from a backend
    src = {0: ["0.0.0.0/0"], 1: ["0.0.0.0/0"], 2: ["10.96.0.0/24"], 3: ["10.78.1.0/24"]}
    dst = {0: ["10.78.1.0/24"], 1: ["10.96.0.0/24"], 2: ["0.0.0.0/0"], 3: ["0.0.0.0/0"]}
    kf.fill_lpm(flt[b"src_v4"], kf.rule_bitmaps(src), 4)
    kf.fill_lpm(flt[b"dst_v4"], kf.rule_bitmaps(dst), 4)
    rules = flt[b"rules"]
    for idx, direction in enumerate((RULE_INGRESS | RULE_FORWARD, RULE_INGRESS | RULE_FORWARD,
                                     RULE_EGRESS | RULE_OUTPUT, RULE_EGRESS | RULE_OUTPUT)):
        leaf = rules.Leaf()
        leaf.flags, leaf.action, leaf.counter, leaf.dport_hi = direction, ACT_ALLOW, idx, 65535
        rules[rules.Key(idx)] = leaf
    attach(kf, lb.lab.gw, "kfl1", flt.load_func(b"kf_tc_ingress", kf.PROG_TYPES["SCHED_CLS"]), INGRESS, FILTER_PREF)
    attach(kf, lb.lab.gw, "kfl1", flt.load_func(b"kf_tc_egress", kf.PROG_TYPES["SCHED_CLS"]), EGRESS, FILTER_PREF)

    count = 20
    for _ in range(count):
        assert tcp_ask(kf, lb.lab.client, (SVC_TCP4.vip, SVC_TCP4.port))["peer"][0] == CLIENT4

    def packets(idx: int) -> int:
        per_cpu = flt[b"counters"][flt[b"counters"].Key(idx)]
        return sum(c.packets for c in per_cpu)

    lb_packets = lb_counter(lb.bpf, SVC_TCP4)["packets"]
    assert packets(0) == lb_packets >= 3 * count  # every translated packet reached tc_filter
    assert packets(1) == 0
    assert packets(2) == 0 and packets(3) == 0
