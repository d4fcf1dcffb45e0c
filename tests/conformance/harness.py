"""The conformance suite's world: its namespaces, cgroups, servers, proxy, clients and intents.

Everything here is named after the session's prefix ``kfc<pid % 1000>`` and
removed again; nothing touches the root network namespace (veth peers are born
in their namespaces) or a cgroup the suite did not create.

Two small networks::

    cli  (10.80.1.2) --eth0-- side --eth2-- up (10.80.3.2)     the sidecar namespace: app :8080, :9090,
    cli2 (10.80.2.2) --eth1--/                                 :15020 and the forwarding proxy (uid 1337)

    fc (10.81.1.2-.5) --eth0-- fr --eth1-- fs (10.81.2.2)      client, router (filter, load balancer), server

IPv6 mirrors IPv4 (fd80:N::x, fd81:N::x). Processes of ``side`` run in the
cgroup ``<prefix>/side``, processes of ``fr`` in ``<prefix>/router``: the
intents name these as ``spec.ebpf.cgroup`` for both backends, so every test is
the same for both (the ebpf backend's socket-level programs act only there).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler import compile_intent
from compiler.loader import parse_text
from compiler.objects import DesiredState
from kernform import lab
from reconciler.apply import apply, destroy
from reconciler.observe import Target

ROOT = Path(__file__).resolve().parents[2]
ENDPOINTS = Path(__file__).resolve().with_name("endpoints.py")
BACKENDS = ("tproxy", "ebpf")
PREFIX = f"kfc{os.getpid() % 1000}"
PROXY_UID = 1337
OUTBOUND_PORT, INBOUND_PORT, EXCLUDED_PORT = 15001, 15006, 15020
REFUSED = "# kfc:refused"  # marks the line an ebpf refusal must point at

# ------------------------------------------------------------------ the networks (pure)
SIDE, CLI, CLI2, UP = (f"{PREFIX}-{n}" for n in ("side", "cli", "cli2", "up"))
FC, FR, FS = (f"{PREFIX}-{n}" for n in ("fc", "fr", "fs"))
NAMESPACES = (SIDE, CLI, CLI2, UP, FC, FR, FS)


@dataclass(frozen=True)
class Link:
    """A veth pair: (namespace, interface, addresses) at each end."""

    a: str
    a_if: str
    a_addrs: tuple[str, ...]
    b: str
    b_if: str
    b_addrs: tuple[str, ...]


LINKS = (
    Link(SIDE, "eth0", ("10.80.1.1/24", "fd80:1::1/64"), CLI, "eth0", ("10.80.1.2/24", "fd80:1::2/64")),
    Link(SIDE, "eth1", ("10.80.2.1/24", "fd80:2::1/64"), CLI2, "eth0", ("10.80.2.2/24", "fd80:2::2/64")),
    Link(SIDE, "eth2", ("10.80.3.1/24", "fd80:3::1/64"), UP, "eth0", ("10.80.3.2/24", "fd80:3::2/64")),
    Link(FR, "eth0", ("10.81.1.1/24", "fd81:1::1/64"), FC, "eth0",
         ("10.81.1.2/24", "10.81.1.3/24", "10.81.1.4/24", "10.81.1.5/24",
          "fd81:1::2/64", "fd81:1::3/64", "fd81:1::4/64", "fd81:1::5/64")),
    Link(FR, "eth1", ("10.81.2.1/24", "fd81:2::1/64"), FS, "eth0", ("10.81.2.2/24", "fd81:2::2/64")),
)
ROUTES = {
    CLI: ("default via 10.80.1.1", "default via fd80:1::1"),
    CLI2: ("default via 10.80.2.1", "default via fd80:2::1"),
    FC: ("default via 10.81.1.1", "default via fd81:1::1"),
    # The router has an uplink like any router (the tproxy backend's output DNAT needs a route to a VIP
    # before it rewrites it; the ebpf backend rewrites at connect(), before routing).
    FR: ("default via 10.81.2.2", "default via fd81:2::2"),
    FS: ("default via 10.81.2.1", "default via fd81:2::1"),
}


@dataclass(frozen=True)
class Addr:
    """One address per family: ``a[4]``, ``a[6]``."""

    v4: str
    v6: str

    def __getitem__(self, family: int) -> str:
        return self.v4 if family == 4 else self.v6


SIDE_ETH0, SIDE_ETH1, SIDE_ETH2 = Addr("10.80.1.1", "fd80:1::1"), Addr("10.80.2.1", "fd80:2::1"), Addr("10.80.3.1", "fd80:3::1")
CLI_ADDR, CLI2_ADDR, UP_ADDR = Addr("10.80.1.2", "fd80:1::2"), Addr("10.80.2.2", "fd80:2::2"), Addr("10.80.3.2", "fd80:3::2")
SIDE_OWN = frozenset({a[f] for a in (SIDE_ETH0, SIDE_ETH1, SIDE_ETH2) for f in (4, 6)} | {"127.0.0.1", "::1"})
FC_ADDR, FR_ETH0, FR_ETH1, FS_ADDR = (Addr("10.81.1.2", "fd81:1::2"), Addr("10.81.1.1", "fd81:1::1"),
                                      Addr("10.81.2.1", "fd81:2::1"), Addr("10.81.2.2", "fd81:2::2"))
FR_OWN = frozenset({a[f] for a in (FR_ETH0, FR_ETH1) for f in (4, 6)} | {"127.0.0.1", "::1"})
FAMILIES = (4, 6)


def cgroup2_mount() -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2":
            return Path(fields[4])
    raise RuntimeError("no cgroup2 mount")


SIDE_CGROUP, ROUTER_CGROUP = f"{PREFIX}/side", f"{PREFIX}/router"  # relative to the cgroup2 mount


def cgroup_dir(relative: str) -> str:
    return str(cgroup2_mount() / relative)


# ------------------------------------------------------------------ building and removing
def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def build() -> None:
    """Namespaces, sysctls, veths born in their namespaces, addresses, routes, cgroups."""
    teardown()
    _run(["ip", "-batch", "-"], input="".join(f"netns add {ns}\n" for ns in NAMESPACES))
    for ns in NAMESPACES:
        forwarding = "1" if ns == FR else "0"
        _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
              "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
              "net.ipv6.conf.all.accept_ra=0", "net.ipv6.conf.default.accept_ra=0",
              "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
              f"net.ipv4.ip_forward={forwarding}", f"net.ipv6.conf.all.forwarding={forwarding}"])
    batches: dict[str, list[str]] = {ns: ["link set lo up"] for ns in NAMESPACES}
    for link in LINKS:
        _run(["ip", "-n", link.a, "link", "add", link.a_if, "type", "veth", "peer", "name", link.b_if,
              "netns", link.b])
        for ns, ifname, addrs in ((link.a, link.a_if, link.a_addrs), (link.b, link.b_if, link.b_addrs)):
            # Extra IPv6 addresses are deprecated (preferred_lft 0): bound explicitly only, never a default source.
            batches[ns] += [f"address add {a} dev {ifname}" + (" nodad" if ":" in a else "")
                            + (" preferred_lft 0" if ":" in a and i else "")
                            for i, a in enumerate(a for a in addrs if ":" in a)]
            batches[ns] += [f"address add {a} dev {ifname}" for a in addrs if ":" not in a]
            batches[ns].append(f"link set {ifname} up")
    for ns, routes in ROUTES.items():
        batches[ns] += [f"route add {r}" for r in routes]
    for ns, cmds in batches.items():
        _run(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds) + "\n")
    for relative in (SIDE_CGROUP, ROUTER_CGROUP):
        Path(cgroup_dir(relative)).mkdir(parents=True, exist_ok=True)


def teardown() -> None:
    """Remove whatever of ours exists: veths first (from the side that made them), then namespaces, cgroups."""
    present = {p.name for p in Path("/run/netns").iterdir()} if Path("/run/netns").exists() else set()
    for link in LINKS:
        if link.a in present:
            _run(["ip", "-n", link.a, "link", "del", link.a_if], check=False)
    for ns in NAMESPACES:
        if ns in present:
            _run(["ip", "netns", "del", ns], check=False)
    for relative in (SIDE_CGROUP, ROUTER_CGROUP, PREFIX):
        path = Path(cgroup_dir(relative))
        if path.exists():
            _kill_cgroup(path)
            with contextlib.suppress(OSError):
                path.rmdir()


def _kill_cgroup(path: Path) -> None:
    """Processes left in one of our cgroups (a client that timed out) would keep it from being removed."""
    procs = path / "cgroup.procs"
    for _ in range(50):
        pids = [int(p) for p in procs.read_text().split()] if procs.exists() else []
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        time.sleep(0.02)


def flush_neighbours(*namespaces: str) -> None:
    """Forget every neighbour (ARP, NDP): the next packets need neighbour discovery to get through again."""
    for ns in namespaces:
        _run(["ip", "-n", ns, "neigh", "flush", "all"], check=False)


# ------------------------------------------------------------------ processes
def in_ns(ns: str, argv: Sequence[str], *, cgroup: str | None = None, uid: int | None = None) -> list[str]:
    """argv run inside ``ns``; in ``cgroup`` (relative, joined before `ip netns exec` remounts /sys); as ``uid``."""
    full = list(argv)
    if uid is not None:
        full = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *full]
    full = ["ip", "netns", "exec", ns, *full]
    if cgroup is not None:
        full = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup_dir(cgroup), *full]
    return full


def serve(ns: str, specs: Sequence[str], *, cgroup: str | None = None) -> contextlib.AbstractContextManager[Any]:
    """endpoints.py serve in ``ns`` for the duration of the block (ready when its first TCP port listens)."""
    tcp = [int(s.split(":")[1]) for s in specs if not s.startswith("udp:")]
    argv = [sys.executable, str(ENDPOINTS), "serve", *specs]
    return lab.background(ns, argv, tcp[0] if tcp else None, cgroup=cgroup_dir(cgroup) if cgroup else None)


def get(ns: str, host: str, port: int, *, proto: str = "tcp", count: int = 1, timeout: float = 1.0,
        source: str | None = None, cgroup: str | None = None, uid: int | None = None) -> list[dict[str, Any]]:
    """``count`` requests with kernform.traffic's client from ``ns``; a reply or an error object each."""
    argv = [sys.executable, "-m", "kernform.traffic", "get", host, str(port), "--proto", proto,
            "--timeout", str(timeout), "--count", str(count)]
    if source:
        argv += ["--source", source]
    result = subprocess.run(in_ns(ns, argv, cgroup=cgroup, uid=uid), capture_output=True, text=True,
                            timeout=timeout * count + 30, cwd=ROOT)
    replies = []
    for line in result.stdout.splitlines():
        with contextlib.suppress(ValueError):
            replies.append(json.loads(line))
    assert len(replies) == count, f"client failed: {result.stderr.strip()[-2000:]}"
    return replies


def get1(ns: str, host: str, port: int, **kw: Any) -> dict[str, Any]:
    (reply,) = get(ns, host, port, **kw)
    return reply


def tool(ns: str, *args: str, cgroup: str | None = None) -> dict[str, Any]:
    """One of endpoints.py's client tools (burst, udpburst, upload) in ``ns``: its JSON result."""
    result = subprocess.run(in_ns(ns, [sys.executable, str(ENDPOINTS), *args], cgroup=cgroup),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.splitlines()[-1]))


def answered(reply: dict[str, Any]) -> bool:
    return "error" not in reply


# ------------------------------------------------------------------ the proxy and its log
@dataclass
class ProxyLog:
    """The sidecar proxy's JSON lines; ``mark()`` then ``since(mark)`` gives what one request caused."""

    path: Path

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def since(self, offset: int, settle: float = 0.15) -> list[dict[str, Any]]:
        time.sleep(settle)  # a loop would add its lines within milliseconds
        with self.path.open() as f:
            f.seek(offset)
            return [json.loads(line) for line in f.read().splitlines() if line.strip()]


@contextlib.contextmanager
def sidecar_proxy(log: Path) -> Iterator[ProxyLog]:
    """kernform.sidecar_proxy in the sidecar namespace and cgroup, as uid 1337 (it drops root after binding)."""
    log.touch()
    argv = [sys.executable, "-m", "kernform.sidecar_proxy", "--log", str(log), "--uid", str(PROXY_UID),
            "--gid", str(PROXY_UID), "--outbound-port", str(OUTBOUND_PORT), "--inbound-port", str(INBOUND_PORT)]
    with lab.background(SIDE, argv, INBOUND_PORT, cgroup=cgroup_dir(SIDE_CGROUP)):
        yield ProxyLog(log)


# ------------------------------------------------------------------ intents
HEADER = """apiVersion: kernform/v1
kind: NetworkIntent
metadata:
  name: {name}
spec:
"""


def intent(name: str, spec: str, cgroup: str | None = None) -> str:
    """A whole intent file: ``spec`` is the text under `spec:` (indented two spaces, block style)."""
    ebpf = f"  ebpf:\n    cgroup: {cgroup}\n" if cgroup else ""
    return HEADER.format(name=name) + ebpf + spec


def desired(text: str, backend: str, filename: str = "intent.yaml") -> DesiredState:
    return compile_intent(parse_text(text, filename).intent, backend)


@contextlib.contextmanager
def applied(backend: str, *placements: tuple[str, str]) -> Iterator[None]:
    """Apply each (namespace, intent text) with ``backend`` as test_e2e does; destroy them all at the end,
    whatever happened (a failed apply included)."""
    with contextlib.ExitStack() as stack:
        for ns, text in placements:
            state = desired(text, backend)
            target = stack.enter_context(Target(ns))
            stack.callback(destroy, target, state.intent)
            apply(target, state)
        yield


def validate(text: str, backend: str, path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "kernform", "validate", "--backend", backend, str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def refused_positions(text: str) -> set[tuple[int, int]]:
    """(line, column) pairs an ebpf refusal may name: the key or the value on each line marked REFUSED."""
    positions = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if REFUSED not in line:
            continue
        body = line.split("#", 1)[0]
        stripped = body.lstrip(" -")
        key_col = len(body) - len(stripped) + 1
        positions.add((number, key_col))
        if body.lstrip().startswith("- "):
            positions.add((number, len(body) - len(body.lstrip()) + 1))  # the list item itself
        if ": " in stripped:
            value = stripped.split(": ", 1)[1]
            positions.add((number, key_col + len(stripped) - len(value)))
    assert positions, "the cell marks no refused line"
    return positions


def assert_ebpf_refuses(text: str, tmp_path: Path) -> None:
    """`kernform validate --backend ebpf FILE` exits 1 naming FILE:LINE:COL of a field marked REFUSED."""
    path = tmp_path / "refused.yaml"
    result = validate(text, "ebpf", path)
    assert result.returncode == 1, f"ebpf accepted it (exit {result.returncode}): {result.stdout}{result.stderr}"
    named = {(int(m.group(1)), int(m.group(2)))
             for m in re.finditer(rf"^{re.escape(str(path))}:(\d+):(\d+): ", result.stderr, re.M)}
    wanted = refused_positions(text)
    assert named & wanted, f"refusal names {sorted(named)}, wanted one of {sorted(wanted)}: {result.stderr.strip()}"
    assert validate(text, "tproxy", path).returncode == 0  # the refusal is the backend's, not the file's
