"""The sandbox lab: a small network made of network namespaces only.

This module owns the namespaces named ``<prefix>-client``, ``<prefix>-gw``,
``<prefix>-b1..b3`` and ``<prefix>-wan-a/b`` and everything inside them. It
exists so that kernform can be demonstrated and tested against a real kernel
with real traffic without touching the host: every link is created directly
inside a namespace (a veth's peer is born in its target namespace), so the root
namespace never holds an address, route, rule or link of ours, even for a
moment.

The lab is described by a pure value, :class:`LabMap`, from which both the
build commands and the completeness check are derived, so the picture that
``kernform sandbox up`` prints is the one that was built.

The topology::

    client --- gw --- br-back --- b1, b2, b3        (backends behind the gateway)
                |---- wan-a     (default uplink, "internet" 198.51.100.10)
                |---- wan-b     (second uplink, the SAME internet address)

Both uplinks host the same internet address, so which uplink carried a
connection is observable by which wan namespace answered.

Kernel I/O goes through the ``ip`` command (batched: one process per
namespace), because the lab must also work before any kernform state exists
and must be easy to reproduce by hand.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from compiler.errors import KernelError

NETNS_DIR = Path("/run/netns")
DEFAULT_PREFIX = "kf"

# Namespace names become file names under /run/netns and parts of commands:
# keep them to a safe alphabet. Interface names do not depend on the prefix.
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")


class LabError(KernelError):
    """The lab could not be built, inspected or torn down: the operator must look
    (are we root? is iproute2 installed? is a namespace of that name held by someone else?)."""


# --------------------------------------------------------------------------- the map (pure)


class Backend(NamedTuple):
    """A backend server namespace behind the gateway's bridge."""

    ns: str
    v4: str
    v6: str


class Uplink(NamedTuple):
    """One of the gateway's two uplinks and the wan namespace at its other end."""

    name: str  # "a" or "b"
    ns: str  # the wan namespace
    gw_if: str  # the gateway's interface towards it
    gw_v4: str
    gw_v6: str
    v4: str  # the wan namespace's address (the next hop seen from the gateway)
    v6: str


@dataclass(frozen=True)
class LabInterface:
    """One interface of the lab, with the addresses (CIDR) it carries.

    ``peer`` is the (namespace, interface) at the other end of a veth; the end
    whose ``peer`` is set creates the pair. ``master`` names the bridge a port
    is enslaved to.
    """

    ns: str
    name: str
    kind: str  # "veth", "bridge" or "loopback"
    v4: str | None = None
    v6: str | None = None
    peer: tuple[str, str] | None = None
    master: str | None = None
    note: str = ""

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(a for a in (self.v4, self.v6) if a)


@dataclass(frozen=True)
class LabRoute:
    """A static route in one namespace's main table."""

    ns: str
    dst: str  # "default" or a CIDR
    via: str
    family: int  # 4 or 6


@dataclass(frozen=True)
class LabMap:
    """Every namespace, interface, address and route of the lab, for one prefix."""

    prefix: str
    client_ns: str
    gw_ns: str
    backend_ns: tuple[str, ...]
    wan_ns: tuple[str, ...]
    client_if: str
    client_v4: str
    client_v6: str
    gw_client_if: str
    gw_client_v4: str
    gw_client_v6: str
    gw_bridge: str
    gw_bridge_v4: str
    gw_bridge_v6: str
    gw_backend_ports: tuple[str, ...]
    backends: tuple[Backend, ...]
    uplinks: tuple[Uplink, ...]
    default_uplink: str
    internet_v4: str
    internet_v6: str
    interfaces: tuple[LabInterface, ...]
    routes: tuple[LabRoute, ...]

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.client_ns, self.gw_ns, *self.backend_ns, *self.wan_ns)

    @property
    def gw_wan_ifs(self) -> tuple[str, ...]:
        return tuple(u.gw_if for u in self.uplinks)

    def uplink(self, name: str) -> Uplink:
        for u in self.uplinks:
            if name in (u.name, u.ns, u.gw_if):
                return u
        raise KeyError(name)

    def interfaces_in(self, ns: str) -> tuple[LabInterface, ...]:
        return tuple(i for i in self.interfaces if i.ns == ns)

    def routes_in(self, ns: str) -> tuple[LabRoute, ...]:
        return tuple(r for r in self.routes if r.ns == ns)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "namespaces": list(self.namespaces),
            "client": {"ns": self.client_ns, "if": self.client_if, "v4": self.client_v4, "v6": self.client_v6},
            "gateway": {
                "ns": self.gw_ns,
                "client_if": self.gw_client_if,
                "client_v4": self.gw_client_v4,
                "client_v6": self.gw_client_v6,
                "bridge": self.gw_bridge,
                "bridge_v4": self.gw_bridge_v4,
                "bridge_v6": self.gw_bridge_v6,
                "backend_ports": list(self.gw_backend_ports),
                "wan_ifs": list(self.gw_wan_ifs),
                "default_uplink": self.default_uplink,
            },
            "backends": [b._asdict() for b in self.backends],
            "uplinks": [u._asdict() for u in self.uplinks],
            "internet": {"v4": self.internet_v4, "v6": self.internet_v6},
            "interfaces": [
                {
                    "ns": i.ns,
                    "name": i.name,
                    "kind": i.kind,
                    "addresses": list(i.addresses),
                    "peer": list(i.peer) if i.peer else None,
                    "master": i.master,
                }
                for i in self.interfaces
            ],
            "routes": [{"ns": r.ns, "dst": r.dst, "via": r.via} for r in self.routes],
        }

    def render(self) -> str:
        """A map for people: a diagram of the wiring, then every address."""
        p = self
        head = f"  [{p.client_ns}] {p.client_if} ---- {p.gw_client_if} [{p.gw_ns}] "
        # The gateway's other links hang from a stem drawn under its name.
        stem_col = len(head) - len(p.gw_ns) // 2 - 3
        stem = " " * stem_col + "|"
        bridge_pad = " " * (len(head) + len(p.gw_bridge) - len(stem))
        lines = [
            f"kernform sandbox lab '{p.prefix}': {len(p.namespaces)} network namespaces, nothing in the root namespace",
            "",
        ]
        for i, (port, b) in enumerate(zip(p.gw_backend_ports, p.backends, strict=True)):
            lead = f"{head}{p.gw_bridge} --+-- " if i == 0 else f"{stem}{bridge_pad}   +-- "
            lines.append(f"{lead}{port} ---- eth0 [{b.ns}]  {b.v4}  {b.v6}")
        for u in p.uplinks:
            mark = " (default route)" if u.name == p.default_uplink else ""
            lines.append(f"{stem[:-1]}+-- {u.gw_if} ---- eth0 [{u.ns}]  lo {p.internet_v4} {p.internet_v6}{mark}")
        lines.append("")
        rows = [("namespace", "interface", "IPv4", "IPv6", "notes")]
        for itf in p.interfaces:
            if itf.kind == "loopback" and not itf.addresses:
                continue
            note = itf.note
            if itf.peer:
                note = f"veth peer {itf.peer[1]}@{itf.peer[0]}" + (f"; {note}" if note else "")
            if itf.master:
                note = f"port of {itf.master}" + (f"; {note}" if note else "")
            rows.append((itf.ns, itf.name, itf.v4 or "-", itf.v6 or "-", note))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        for n, r in enumerate(rows):
            lines.append(("  " + "  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4]).rstrip())
            if n == 0:
                lines.append("  " + "  ".join("-" * w for w in widths) + "  -----")
        lines.append("")
        lines.append("  routes:")
        for ns in p.namespaces:
            rs = self.routes_in(ns)
            if rs:
                lines.append(f"    {ns}: " + ", ".join(f"{r.dst} via {r.via}" for r in rs))
        lines.append(f"    {p.gw_ns}: forwarding on (v4, v6), rp_filter 0 (policy routing is asymmetric)")
        return "\n".join(lines)


def _plain(cidr: str) -> str:
    return cidr.split("/", 1)[0]


def lab_map(prefix: str = DEFAULT_PREFIX) -> LabMap:
    """The lab for ``prefix``. Pure. Addresses never depend on the prefix: labs are isolated."""
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"lab prefix {prefix!r} must match {_PREFIX_RE.pattern}")
    ns_client, ns_gw = f"{prefix}-client", f"{prefix}-gw"
    interfaces: list[LabInterface] = []
    routes: list[LabRoute] = []

    client = LabInterface(ns_client, "eth0", "veth", "10.70.1.2/24", "fd70:1::2/64")
    gw_client = LabInterface(ns_gw, "gw-client", "veth", "10.70.1.1/24", "fd70:1::1/64", peer=(ns_client, "eth0"))
    bridge = LabInterface(ns_gw, "br-back", "bridge", "10.70.2.1/24", "fd70:2::1/64", note="backend LAN")
    interfaces += [client, gw_client, bridge]
    routes += [
        LabRoute(ns_client, "default", "10.70.1.1", 4),
        LabRoute(ns_client, "default", "fd70:1::1", 6),
    ]

    backends: list[Backend] = []
    ports: list[str] = []
    for n in (1, 2, 3):
        ns, port = f"{prefix}-b{n}", f"gw-b{n}"
        v4, v6 = f"10.70.2.{10 + n}", f"fd70:2::{10 + n}"
        interfaces.append(LabInterface(ns_gw, port, "veth", peer=(ns, "eth0"), master=bridge.name))
        interfaces.append(LabInterface(ns, "eth0", "veth", f"{v4}/24", f"{v6}/64", note="backend"))
        routes += [LabRoute(ns, "default", "10.70.2.1", 4), LabRoute(ns, "default", "fd70:2::1", 6)]
        backends.append(Backend(ns, v4, v6))
        ports.append(port)

    internet_v4, internet_v6 = "198.51.100.10", "2001:db8:100::10"
    uplinks: list[Uplink] = []
    for name, net in (("a", 3), ("b", 4)):
        ns, gw_if = f"{prefix}-wan-{name}", f"gw-wan-{name}"
        u = Uplink(name, ns, gw_if, f"10.70.{net}.1", f"fd70:{net}::1", f"10.70.{net}.2", f"fd70:{net}::2")
        interfaces.append(LabInterface(ns_gw, gw_if, "veth", f"{u.gw_v4}/24", f"{u.gw_v6}/64", peer=(ns, "eth0")))
        interfaces.append(LabInterface(ns, "eth0", "veth", f"{u.v4}/24", f"{u.v6}/64", note=f"uplink {name}"))
        interfaces.append(
            LabInterface(ns, "lo", "loopback", f"{internet_v4}/32", f"{internet_v6}/128", note="internet host")
        )
        # The wan side only needs to find its way back into the lab.
        routes += [LabRoute(ns, "10.70.0.0/16", u.gw_v4, 4), LabRoute(ns, "fd70::/16", u.gw_v6, 6)]
        uplinks.append(u)

    default = uplinks[0]
    routes += [LabRoute(ns_gw, "default", default.v4, 4), LabRoute(ns_gw, "default", default.v6, 6)]

    return LabMap(
        prefix=prefix,
        client_ns=ns_client,
        gw_ns=ns_gw,
        backend_ns=tuple(b.ns for b in backends),
        wan_ns=tuple(u.ns for u in uplinks),
        client_if=client.name,
        client_v4=_plain(client.v4 or ""),
        client_v6=_plain(client.v6 or ""),
        gw_client_if=gw_client.name,
        gw_client_v4=_plain(gw_client.v4 or ""),
        gw_client_v6=_plain(gw_client.v6 or ""),
        gw_bridge=bridge.name,
        gw_bridge_v4=_plain(bridge.v4 or ""),
        gw_bridge_v6=_plain(bridge.v6 or ""),
        gw_backend_ports=tuple(ports),
        backends=tuple(backends),
        uplinks=tuple(uplinks),
        default_uplink=default.name,
        internet_v4=internet_v4,
        internet_v6=internet_v6,
        interfaces=tuple(interfaces),
        routes=tuple(routes),
    )


# --------------------------------------------------------------------------- build commands (pure)


def _sysctls(m: LabMap, ns: str) -> list[str]:
    # Addresses are added with nodad and accept_dad is off (set before any
    # interface exists, so "default" reaches them) so IPv6 works at once; no
    # router solicitations, nobody sends advertisements here.
    s = [
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
        "net.ipv6.conf.all.accept_ra=0",
        "net.ipv6.conf.default.accept_ra=0",
        "net.ipv6.conf.default.router_solicitations=0",
        # IPv4 settings of a new namespace are copied from the root namespace:
        # pin rp_filter so the lab behaves the same on every host. On the
        # gateway it must be 0: policy routing makes paths asymmetric.
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ]
    fwd = "1" if ns == m.gw_ns else "0"
    s += [f"net.ipv4.ip_forward={fwd}", f"net.ipv6.conf.all.forwarding={fwd}"]
    return s


def _links_batch(m: LabMap) -> list[str]:
    """Commands, run in the gateway namespace, creating every link (veth peers are born in their namespace)."""
    cmds: list[str] = []
    for itf in m.interfaces_in(m.gw_ns):
        if itf.kind == "bridge":
            # No STP: ports forward at once; the lab has no loops.
            cmds.append(f"link add {itf.name} type bridge stp_state 0 forward_delay 0")
    for itf in m.interfaces_in(m.gw_ns):
        if itf.kind == "veth" and itf.peer:
            peer_ns, peer_name = itf.peer
            cmds.append(f"link add {itf.name} type veth peer name {peer_name} netns {peer_ns}")
            if itf.master:
                cmds.append(f"link set {itf.name} master {itf.master}")
    return cmds


def _config_batch(m: LabMap, ns: str) -> list[str]:
    """Commands, run inside ``ns``, putting its addresses, links and routes in place."""
    cmds = ["link set lo up"]
    for itf in m.interfaces_in(ns):
        if itf.v4:
            cmds.append(f"address add {itf.v4} dev {itf.name}")
        if itf.v6:
            cmds.append(f"address add {itf.v6} dev {itf.name} nodad")
        if itf.kind != "loopback":
            cmds.append(f"link set {itf.name} up")
    for r in m.routes_in(ns):
        # Batch lines take no family option: the addresses say which family.
        cmds.append(f"route add {r.dst} via {r.via}")
    return cmds


# --------------------------------------------------------------------------- running commands


def _stdin_with(text: str) -> int:
    """A pipe already holding ``text`` and closed for writing, to hand to a child as stdin.

    Lets many ``ip -batch`` children run in parallel and be collected with
    ``communicate()``; batches here are far below the pipe's 64 KiB buffer.
    """
    r, w = os.pipe()
    try:
        os.write(w, text.encode())
    finally:
        os.close(w)
    return r


def _popen(argv: Sequence[str], stdin_text: str | None = None) -> subprocess.Popen[str]:
    fd = _stdin_with(stdin_text) if stdin_text is not None else None
    try:
        return subprocess.Popen(
            argv,
            stdin=fd if fd is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        if fd is not None:
            os.close(fd)


def _ip_batch(
    cmds: Sequence[str], ns: str | None = None, *, force: bool = False, json_out: bool = False
) -> subprocess.Popen[str]:
    argv = ["ip"] + (["-j"] if json_out else []) + (["-n", ns] if ns else [])
    argv += (["-force"] if force else []) + ["-batch", "-"]
    return _popen(argv, "\n".join(cmds) + "\n")


def _wait_all(procs: dict[str, subprocess.Popen[str]], what: str, *, timeout: float = 15.0) -> list[str]:
    """Wait for every process, raise LabError naming each failure; return stdouts in order."""
    failures, outs = [], []
    for key, p in procs.items():
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            failures.append(f"{key}: timed out")
            continue
        outs.append(out)
        if p.returncode != 0:
            failures.append(f"{key}: {err.strip() or f'exit {p.returncode}'}")
    if failures:
        raise LabError(f"{what} failed: " + "; ".join(failures))
    return outs


def _existing_namespaces() -> set[str]:
    try:
        return {p.name for p in NETNS_DIR.iterdir()}
    except FileNotFoundError:
        return set()


def leftovers(prefix: str = DEFAULT_PREFIX) -> tuple[str, ...]:
    """The namespaces of this lab that exist now, complete or not."""
    present = _existing_namespaces()
    return tuple(ns for ns in lab_map(prefix).namespaces if ns in present)


def _is_complete(m: LabMap) -> bool:
    """Every address is on an interface that is up and every route is there, in every namespace.

    Addresses and routes are the last step of :func:`up`, so when they are all
    there the namespaces, sysctls, links and bridge ports before them are too.
    """
    if len(leftovers(m.prefix)) != len(m.namespaces):
        return False
    # "table all" because a batch line cannot ask for IPv6 and "table main" alone lists IPv4 only.
    procs = {ns: _ip_batch(["address show", "route show table all"], ns, json_out=True) for ns in m.namespaces}
    try:
        outs = _wait_all(procs, "observing the lab")
    except LabError:
        return False
    for ns, out in zip(procs, outs, strict=True):
        docs = [json.loads(line) for line in out.splitlines() if line.strip()]
        if len(docs) != 2:
            return False
        links, routes = docs
        have_addr = {
            (link["ifname"], f"{a['local']}/{a['prefixlen']}")
            for link in links
            if "UP" in link.get("flags", [])
            for a in link.get("addr_info", [])
        }
        up = {link["ifname"] for link in links if "UP" in link.get("flags", [])}
        for itf in m.interfaces_in(ns):
            if itf.name not in up:
                return False
            for cidr in itf.addresses:
                if (itf.name, str(ipaddress.ip_interface(cidr))) not in have_addr:
                    return False
        have_routes = {(r.get("dst"), r.get("gateway")) for r in routes if r.get("table", "main") == "main"}
        for r in m.routes_in(ns):
            if (r.dst, r.via) not in have_routes:
                return False
    return True


def exists(prefix: str = DEFAULT_PREFIX) -> bool:
    """True when the lab is there and complete (see :func:`leftovers` for partial state)."""
    return _is_complete(lab_map(prefix))


def up(prefix: str = DEFAULT_PREFIX) -> LabMap:
    """Build the lab, or leave it if it is already complete. A partial lab is torn down and rebuilt."""
    m = lab_map(prefix)
    if leftovers(prefix):
        if _is_complete(m):
            return m
        down(prefix)
    try:
        _wait_all({"netns add": _ip_batch([f"netns add {ns}" for ns in m.namespaces])}, "creating namespaces")
        # Sysctls first: "default" settings only reach interfaces created afterwards.
        _wait_all(
            {ns: _popen(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *_sysctls(m, ns)]) for ns in m.namespaces},
            "setting sysctls",
        )
        _wait_all({m.gw_ns: _ip_batch(_links_batch(m), m.gw_ns)}, "creating links")
        _wait_all({ns: _ip_batch(_config_batch(m, ns), ns) for ns in m.namespaces}, "configuring namespaces")
    except BaseException:
        # Never leave half a lab behind, whatever interrupted us; the first error is the one to report.
        with contextlib.suppress(LabError, OSError, subprocess.SubprocessError):
            down(prefix)
        raise
    return m


def down(prefix: str = DEFAULT_PREFIX) -> None:
    """Remove the lab. Tolerates any partial state; does nothing if nothing is there."""
    m = lab_map(prefix)
    present = set(leftovers(prefix))
    if not present:
        return
    if m.gw_ns in present:
        # Veths first, so no link outlives its namespace in a process that still holds it.
        # Deleting the gateway's end of a veth deletes its peer too.
        links = [i.name for i in m.interfaces_in(m.gw_ns) if i.kind in ("veth", "bridge")]
        p = _ip_batch([f"link del {name}" for name in links], m.gw_ns, force=True)
        p.communicate(timeout=15)  # failures are links already gone
    p = _ip_batch([f"netns del {ns}" for ns in m.namespaces if ns in present], force=True)
    _, err = p.communicate(timeout=15)
    still = leftovers(prefix)
    if still:
        raise LabError(f"could not delete namespaces {', '.join(still)}: {err.strip()}")


# --------------------------------------------------------------------------- processes in the lab


def run_in(
    ns: str,
    argv: Sequence[str],
    *,
    timeout: float = 30.0,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside namespace ``ns`` and capture its output (text)."""
    full = ["ip", "netns", "exec", ns, *argv]
    try:
        res = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise LabError(f"{' '.join(full)} timed out after {timeout}s") from e
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(full)} exited {res.returncode}: {res.stderr.strip()}")
    return res


def spawn_in(ns: str, argv: Sequence[str], cgroup: str | None = None, **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` inside ``ns`` in its own process group (so it and its children can be killed).

    With ``cgroup`` (an absolute cgroup v2 directory) the process joins it first:
    `ip netns exec` remounts /sys, so joining from inside the namespace may not work.
    """
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    popen_kwargs.setdefault("stdout", subprocess.DEVNULL)
    full = ["ip", "netns", "exec", ns, *argv]
    if cgroup is not None:
        full = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup, *full]
    return subprocess.Popen(full, start_new_session=True, **popen_kwargs)


def _listening(ns: str, port: int, addr: str | None, proto: str) -> bool:
    flag = "-Hlnt" if proto == "tcp" else "-Hlnu"
    res = run_in(ns, ["ss", flag], check=False, timeout=5)
    wildcard = {"*", "0.0.0.0", "::"}
    for line in res.stdout.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        host, _, p = fields[3].rpartition(":")
        host = host.strip("[]").split("%", 1)[0]
        if p == str(port) and (addr is None or host in wildcard or host == addr):
            return True
    return False


def stop(proc: subprocess.Popen[Any], *, grace: float = 2.0) -> None:
    """Stop a process started by :func:`spawn_in` and everything in its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
    # Children that outlived the leader still hold the group id.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def background(
    ns: str,
    argv: Sequence[str],
    ready_port: int | tuple[str, int] | None = None,
    *,
    proto: str = "tcp",
    timeout: float = 5.0,
    cgroup: str | None = None,
) -> Iterator[subprocess.Popen[Any]]:
    """Run a server inside ``ns`` for the duration of the block.

    With ``ready_port`` (a port, or (address, port)), wait until something in
    ``ns`` listens there before entering the block (we cannot connect from
    here: the port lives in another namespace, so ``ss`` inside it is asked).
    """
    addr, port = (None, ready_port) if isinstance(ready_port, int) else (ready_port or (None, None))
    with tempfile.TemporaryFile(mode="w+") as errf:
        proc = spawn_in(ns, argv, cgroup=cgroup, stderr=errf)
        try:
            if port is not None:
                deadline = time.monotonic() + timeout
                while not _listening(ns, port, addr, proto):
                    if proc.poll() is not None:
                        errf.seek(0)
                        raise LabError(f"{' '.join(argv)} in {ns} exited {proc.returncode}: {errf.read().strip()}")
                    if time.monotonic() > deadline:
                        raise LabError(f"{' '.join(argv)} in {ns} did not listen on {proto} {port} in {timeout}s")
                    time.sleep(0.02)
            yield proc
        finally:
            stop(proc)


# --------------------------------------------------------------------------- the lab's servers
# Ports the lab's servers listen on. Backends serve the load-balanced service;
# both uplinks serve the "internet" ports, answering with their own name; the
# gateway runs the transparent proxy that interception hands connections to.
BACKEND_PORT = 8080
INTERNET_PORTS = (80, 443, 8080, 8081, 8443)
PROXY_PORT = 15001


@contextlib.contextmanager
def servers(m: LabMap, *, proxy_ns: str | None = None, proxy_port: int = PROXY_PORT) -> Iterator[None]:
    """Run every lab server for the duration of the block (real sockets, see kernform.traffic)."""
    from . import traffic

    with contextlib.ExitStack() as stack:
        for backend in m.backends:
            name = backend.ns.rsplit("-", 1)[-1]
            for proto in ("tcp", "udp"):
                argv = traffic.command("serve", "--name", name, "--port", str(BACKEND_PORT), "--proto", proto)
                stack.enter_context(background(backend.ns, argv, BACKEND_PORT, proto=proto))
        for uplink in m.uplinks:
            for port in INTERNET_PORTS:
                stack.enter_context(background(uplink.ns, traffic.command("serve", "--name", f"wan-{uplink.name}",
                                                                          "--port", str(port)), port))
        stack.enter_context(background(proxy_ns or m.gw_ns, traffic.command("tproxy", "--port", str(proxy_port),
                                                                            "--name", "proxy"), proxy_port))
        yield


def client_get(m: LabMap, host: str, port: int, *, count: int = 1, proto: str = "tcp", timeout: float = 2.0,
               ns: str | None = None, uid: int | None = None, cgroup: str | None = None) -> list[dict[str, Any]]:
    """Requests from the client namespace (or `ns`); one reply or error per request.

    `uid`: run as that user (setpriv). `cgroup`: run inside that cgroup v2
    directory (an absolute path): the process joins it before entering the
    namespace, because `ip netns exec` remounts /sys.
    """
    from . import traffic

    argv = traffic.command("get", host, str(port), "--proto", proto, "--timeout", str(timeout), "--count", str(count))
    if uid is not None:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    full = ["ip", "netns", "exec", ns or m.client_ns, *argv]
    if cgroup is not None:
        full = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup, *full]
    result = subprocess.run(full, capture_output=True, text=True, timeout=timeout * count + 30)
    replies = []
    for line in result.stdout.splitlines():
        with contextlib.suppress(ValueError):
            replies.append(json.loads(line))
    return replies
