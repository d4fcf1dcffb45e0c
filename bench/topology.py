"""The benchmark's own network: namespaces named ``kfbench-*`` and nothing outside them.

This module owns every namespace, link, address, route and sysctl of the
benchmark, and their removal. The root network namespace is never changed:
veth pairs are created inside a gateway namespace with their peer born in the
client or server namespace, and every command runs with ``ip -n NS`` or
``ip netns exec NS``.

Why one gateway per variant, side by side, rather than one gateway whose state
is swapped: every variant (no rules, hand-written iptables, kernform tproxy,
kernform ebpf) keeps its state applied for a whole step of N, so the
repetitions can interleave the variants (A, B, C, D, D, C, B, A, ...) by
choosing a destination address, with no re-apply (and no BPF compile) between
two measurements. The paths are identical: client -> veth -> gateway -> veth ->
server, one forwarding hop.

    kfbench-cli  c-<v> ---- gw-c [kfbench-gw-<v>] gw-s ---- s-<v>  kfbench-srv
                 10.80.i.2       10.80.i.1   10.81.i.1       10.81.i.2
                                                             lo: 198.18.i.10 (the "internet" host)
                                                             local 10.90.0.0/16 (load-balanced backends)

Variant i = 0 none, 1 iptables, 2 tproxy, 3 ebpf, 4 tproxy-synfix. The client reaches
198.18.i.0/24, the VIP range 10.99.i.0/24 and the services' VIP range
10.(100+i).0.0/16 through gateway i; each gateway's default route points at
the server. ``kfbench-cp`` is an empty namespace with
a veth pair (cp0, cp1), where the control-plane measurements apply their intents.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernform import lab

PREFIX = "kfbench"
NETNS_DIR = Path("/run/netns")
# tproxy-synfix: kernform's tproxy state with one rule changed by hand (interception only; see dataplane.py).
VARIANTS = ("none", "iptables", "tproxy", "ebpf", "tproxy-synfix")
SHORT = {"none": "none", "iptables": "ipt", "tproxy": "tproxy", "ebpf": "ebpf", "tproxy-synfix": "tpfix"}
CLIENT_NS = f"{PREFIX}-cli"
SERVER_NS = f"{PREFIX}-srv"
CP_NS = f"{PREFIX}-cp"
CP_IF = "cp0"
GW_CLIENT_IF = "gw-c"
GW_SERVER_IF = "gw-s"
BACKEND_POOL = "10.90.0.0/16"
PROXY_PORT = 15001
# The client's ephemeral ports: a small range, so that at thousands of new
# connections per second every 4-tuple comes back within a second, while a
# gateway that closed it still holds its TIME_WAIT entry (60 s).
CLIENT_PORTS = (40000, 41023)


class TopologyError(RuntimeError):
    """The benchmark network could not be built or removed: the operator must look (root? iproute2?)."""


@dataclass(frozen=True)
class Gateway:
    variant: str
    index: int

    @property
    def ns(self) -> str:
        return f"{PREFIX}-gw-{SHORT[self.variant]}"

    @property
    def client_peer(self) -> str:
        return f"c-{SHORT[self.variant]}"

    @property
    def server_peer(self) -> str:
        return f"s-{SHORT[self.variant]}"

    @property
    def client_addr(self) -> str:
        return f"10.80.{self.index}.2"

    @property
    def gw_client_addr(self) -> str:
        return f"10.80.{self.index}.1"

    @property
    def gw_server_addr(self) -> str:
        return f"10.81.{self.index}.1"

    @property
    def server_addr(self) -> str:
        return f"10.81.{self.index}.2"

    @property
    def internet(self) -> str:
        """The server's address the client reaches through this gateway only."""
        return f"198.18.{self.index}.10"

    @property
    def internet_net(self) -> str:
        return f"198.18.{self.index}.0/24"

    @property
    def vip(self) -> str:
        return f"10.99.{self.index}.10"

    @property
    def service_net(self) -> str:
        """The VIPs of the services scenario (one per service, consecutive addresses from service_vip(0))."""
        return f"10.{100 + self.index}.0.0/16"

    def service_vip(self, k: int) -> str:
        return service_vip(self.index, k)


GATEWAYS = {v: Gateway(v, i) for i, v in enumerate(VARIANTS)}
NAMESPACES = (CLIENT_NS, SERVER_NS, *(g.ns for g in GATEWAYS.values()), CP_NS)


def backend_address(i: int) -> str:
    """The i-th load-balanced backend address (all live on the server, 10.90.0.0/16 is local there)."""
    return f"10.90.{i // 250}.{i % 250 + 1}"


# The services scenario: every service has SERVICE_BACKENDS backends drawn from a pool of SERVICE_POOL
# consecutive addresses in BACKEND_POOL (local to the server, which cannot hold one address per backend of
# 10,000 services): backend j of service i is pool[(i * SERVICE_BACKENDS + j) % SERVICE_POOL].
SERVICE_BACKENDS = 10
SERVICE_POOL = 1000
SERVICE_POOL_FIRST = ipaddress.IPv4Address("10.90.128.1")
MAX_SERVICES = 65_000


_POOL = tuple(str(SERVICE_POOL_FIRST + j) for j in range(SERVICE_POOL))


def service_pool_address(j: int) -> str:
    return _POOL[j % SERVICE_POOL]


def service_backend(i: int, j: int) -> str:
    return service_pool_address(i * SERVICE_BACKENDS + j)


def service_vip(index: int, k: int) -> str:
    """VIP of service k in the range of gateway `index` (10.(100+index).0.0/16): consecutive addresses, so a
    load generator can pick one at random from the first and a count (kfload -n)."""
    if not 0 <= k < MAX_SERVICES:
        raise ValueError(f"service index {k} out of range")
    return str(ipaddress.IPv4Address(f"10.{100 + index}.0.1") + k)


# ------------------------------------------------------------------ commands
def run(argv: Sequence[str], *, timeout: float = 60, check: bool = True, input: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, **env} if env else None)
    except subprocess.TimeoutExpired as exc:
        raise TopologyError(f"{' '.join(argv)} timed out after {timeout} s") from exc
    if check and res.returncode != 0:
        raise TopologyError(f"{' '.join(argv[:8])} exited {res.returncode}: {res.stderr.strip()[-2000:]}")
    return res


def run_in(ns: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return run(["ip", "netns", "exec", ns, *argv], **kw)


def ip_batch(ns: str | None, cmds: Sequence[str], *, force: bool = False, check: bool = True) -> None:
    argv = ["ip"] + (["-n", ns] if ns else []) + (["-force"] if force else []) + ["-batch", "-"]
    run(argv, input="\n".join(cmds) + "\n", check=check)


def spawn_in(ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
    """A process in `ns`, in its own session (the lab's helper), with its output discarded unless redirected."""
    kw.setdefault("stderr", subprocess.DEVNULL)
    return lab.spawn_in(ns, argv, **kw)


# The lab's: stops the whole process group, children included.
stop = lab.stop


def listening(ns: str, port: int) -> bool:
    out = run_in(ns, ["ss", "-Hltn", f"sport = :{port}"], check=False, timeout=10).stdout
    return bool(out.strip())


def wait_listening(ns: str, port: int, proc: subprocess.Popen[Any], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not listening(ns, port):
        if proc.poll() is not None:
            raise TopologyError(f"{what} in {ns} exited {proc.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise TopologyError(f"{what} in {ns} is not listening on {port} after {timeout} s")
        time.sleep(0.05)


# ------------------------------------------------------------------ build
def _sysctls(ns: str) -> list[str]:
    s = [
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
        "net.core.somaxconn=4096",
        "net.ipv4.tcp_max_syn_backlog=4096",
    ]
    if ns.startswith(f"{PREFIX}-gw-"):
        s.append("net.ipv4.ip_forward=1")
    if ns == CLIENT_NS:
        s += [f"net.ipv4.ip_local_port_range={CLIENT_PORTS[0]} {CLIENT_PORTS[1]}", "net.ipv4.tcp_tw_reuse=1"]
    return s


def existing() -> list[str]:
    try:
        present = {p.name for p in NETNS_DIR.iterdir()}
    except FileNotFoundError:
        return []
    return [ns for ns in NAMESPACES if ns in present]


def up() -> None:
    """Build the benchmark network (after removing any leftover of an interrupted run)."""
    if existing():
        down()
    try:
        ip_batch(None, [f"netns add {ns}" for ns in NAMESPACES])
        for ns in NAMESPACES:
            run_in(ns, ["sysctl", "-q", "-w", *_sysctls(ns)])
        for g in GATEWAYS.values():
            ip_batch(g.ns, [
                f"link add {GW_CLIENT_IF} type veth peer name {g.client_peer} netns {CLIENT_NS}",
                f"link add {GW_SERVER_IF} type veth peer name {g.server_peer} netns {SERVER_NS}",
                "link set lo up",
                f"address add {g.gw_client_addr}/24 dev {GW_CLIENT_IF}",
                f"address add {g.gw_server_addr}/24 dev {GW_SERVER_IF}",
                f"link set {GW_CLIENT_IF} up",
                f"link set {GW_SERVER_IF} up",
                f"route add default via {g.server_addr}",
            ])
        client = ["link set lo up"]
        server = ["link set lo up", f"route add local {BACKEND_POOL} dev lo"]
        for g in GATEWAYS.values():
            client += [f"address add {g.client_addr}/24 dev {g.client_peer}", f"link set {g.client_peer} up",
                       f"route add {g.internet_net} via {g.gw_client_addr}",
                       f"route add 10.99.{g.index}.0/24 via {g.gw_client_addr}",
                       f"route add {g.service_net} via {g.gw_client_addr}"]
            server += [f"address add {g.internet}/32 dev lo", f"address add {g.server_addr}/24 dev {g.server_peer}",
                       f"link set {g.server_peer} up", f"route add 10.80.{g.index}.0/24 via {g.gw_server_addr}"]
        # Backends straight through the no-rules gateway: the load-balancing reference.
        client.append(f"route add {BACKEND_POOL} via {GATEWAYS['none'].gw_client_addr}")
        ip_batch(CLIENT_NS, client)
        ip_batch(SERVER_NS, server)
        ip_batch(CP_NS, ["link set lo up", f"link add {CP_IF} type veth peer name cp1", "link set cp1 up", f"address add 10.77.0.1/24 dev {CP_IF}",
                         f"link set {CP_IF} up"])
    except BaseException:
        with contextlib.suppress(Exception):
            down()
        raise


def down() -> None:
    """Remove every benchmark namespace; veths first (deleting one end deletes its peer)."""
    present = existing()
    for g in GATEWAYS.values():
        if g.ns in present:
            ip_batch(g.ns, [f"link del {GW_CLIENT_IF}", f"link del {GW_SERVER_IF}"], force=True, check=False)
    if CP_NS in present:
        ip_batch(CP_NS, [f"link del {CP_IF}"], force=True, check=False)
    if present:
        ip_batch(None, [f"netns del {ns}" for ns in present], force=True, check=False)
    still = existing()
    if still:
        raise TopologyError(f"could not delete namespaces {', '.join(still)}")


def check_paths() -> list[str]:
    """Problems with plain reachability (before any state is applied): one ping per gateway."""
    problems = []
    for g in GATEWAYS.values():
        res = run_in(CLIENT_NS, ["ping", "-c1", "-W1", g.internet], check=False)
        if res.returncode != 0:
            problems.append(f"{g.internet} via {g.ns}: {res.stdout.strip()[-200:]}")
    return problems
