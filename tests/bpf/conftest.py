"""Shared glue for the BPF tests: loading kernform's C programs with bcc,
the kernel's numeric program / attach types, throw-away network namespaces
and cgroups, child processes placed in them, and libbpf calls that bcc does
not wrap (link creation, sockmap updates).

Everything these fixtures create is named ``kfb-...`` and removed again;
nothing here touches the root network namespace or an existing cgroup.

Test modules reach these helpers through the ``kf`` fixture (a conftest
cannot be imported by name: ``tests/conftest.py`` is also ``conftest``), and
name program / attach types by their kernel enum names (PROG_TYPES,
ATTACH_TYPES) in parametrize tables.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BPF_DIR = REPO / "bpf"
CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")

# enum bpf_prog_type (uapi/linux/bpf.h); bcc lacks several of them.
PROG_TYPES = {
    "SCHED_CLS": 3,
    "SOCK_OPS": 13,
    "CGROUP_SOCK_ADDR": 18,
    "CGROUP_SOCKOPT": 25,
    "SK_LOOKUP": 30,
}

# enum bpf_attach_type; "NONE" lets bcc load without an expected attach type.
ATTACH_TYPES = {
    "NONE": -1,
    "CGROUP_SOCK_OPS": 3,
    "CGROUP_INET4_CONNECT": 10,
    "CGROUP_INET6_CONNECT": 11,
    "CGROUP_UDP4_SENDMSG": 14,
    "CGROUP_UDP6_SENDMSG": 15,
    "CGROUP_UDP4_RECVMSG": 19,
    "CGROUP_UDP6_RECVMSG": 20,
    "CGROUP_GETSOCKOPT": 21,
    "SK_LOOKUP": 36,
}

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("BPF tests need root")


def load_bpf(source: str, cflags: Sequence[str] = ()) -> Any:
    """Compiles bpf/<source> with bcc; returns the bcc BPF object."""
    _require_root()
    bcc = pytest.importorskip("bcc")
    return bcc.BPF(src_file=str(BPF_DIR / source), cflags=[f"-I{BPF_DIR}", *cflags])


def table_fd(bpf: Any, name: str) -> int:
    """File descriptor of a map, also for map types bcc's Python lacks (sockmap)."""
    from bcc.libbcc import lib

    fd = lib.bpf_table_fd(bpf.module, name.encode())
    if fd < 0:
        raise KeyError(name)
    return int(fd)


# ---- libbpf (Debian's libbpf1) -------------------------------------------------

_libbpf: ctypes.CDLL | None = None


def libbpf() -> ctypes.CDLL:
    global _libbpf
    if _libbpf is None:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        lib.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        lib.bpf_link_create.restype = ctypes.c_int
        lib.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
        lib.bpf_map_update_elem.restype = ctypes.c_int
        _libbpf = lib
    return _libbpf


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    fd = libbpf().bpf_link_create(prog_fd, target_fd, attach_type, None)
    if fd < 0:
        raise OSError(-fd, f"bpf_link_create: {os.strerror(-fd)}")
    return int(fd)


def sockmap_set(map_fd: int, slot: int, sock_fd: int) -> None:
    key = ctypes.c_uint32(slot)
    value = ctypes.c_uint32(sock_fd)
    err = libbpf().bpf_map_update_elem(map_fd, ctypes.byref(key), ctypes.byref(value), 0)
    if err:
        raise OSError(-err, f"sockmap update: {os.strerror(-err)}")


# ---- map contents as the compiler must write them ----------------------------------


def rule_bitmaps(rules: dict[int, Sequence[str]], words: int = 1) -> dict[str, list[int]]:
    """Prefix -> rule bitmap words, with the covering-prefix closure.

    An LPM lookup returns only the longest matching prefix, so every prefix
    carries the bits of all rules listing it or any prefix that contains it.
    This is the reference for what the compiler has to produce.
    """
    nets = {ipaddress.ip_network(p) for ps in rules.values() for p in ps}
    out: dict[str, list[int]] = {}
    for net in nets:
        w = [0] * words
        for idx, prefixes in rules.items():
            for p in prefixes:
                other = ipaddress.ip_network(p)
                if other.version == net.version and net.subnet_of(other):  # type: ignore[arg-type]
                    w[idx // 64] |= 1 << (idx % 64)
        out[str(net)] = w
    return out


def fill_lpm(table: Any, bitmaps: dict[str, list[int]], version: int) -> None:
    for prefix, words in bitmaps.items():
        net = ipaddress.ip_network(prefix)
        if net.version != version:
            continue
        key = table.Key()
        key.prefixlen = net.prefixlen
        for i, b in enumerate(net.network_address.packed):
            key.addr[i] = b
        leaf = table.Leaf()
        for i, w in enumerate(words):
            leaf.w[i] = w
        table[key] = leaf


def set_addr(field: Any, address: str) -> None:
    for i, b in enumerate(ipaddress.ip_address(address).packed):
        field[i] = b


# ---- namespaces, cgroups, children ------------------------------------------------------


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Runs the block with this thread in netns `name`; sockets made there stay there."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


class Netns:
    """Creates kfb- network namespaces and deletes them (veths first) at teardown."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add(self, tag: str) -> str:
        name = f"kfb-{tag}-{os.getpid()}"
        sh("ip", "netns", "add", name)
        self.names.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def cleanup(self) -> None:
        for name in reversed(self.names):
            out = subprocess.run(
                ["ip", "-n", name, "-o", "link", "show", "type", "veth"], capture_output=True, text=True
            ).stdout
            for line in out.splitlines():
                dev = line.split(":")[1].strip().split("@")[0]
                subprocess.run(["ip", "-n", name, "link", "del", dev], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def netns() -> Iterator[Netns]:
    _require_root()
    ns = Netns()
    try:
        yield ns
    finally:
        ns.cleanup()


@dataclass
class Cgroup:
    path: Path
    fd: int


@pytest.fixture
def cgroup() -> Iterator[Cgroup]:
    """A fresh cgroup v2 directory of our own (never a system one)."""
    _require_root()
    if not (CGROUP2_ROOT / "cgroup.procs").exists():
        pytest.skip("no cgroup2 mount at /sys/fs/cgroup/unified")
    path = CGROUP2_ROOT / f"kfb-test-{os.getpid()}"
    path.mkdir()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield Cgroup(path, fd)
    finally:
        os.close(fd)
        for pid in (path / "cgroup.procs").read_text().split():
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        for _ in range(100):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)


class Child:
    """A forked process running fn(send) in a netns (and a cgroup, as a uid).

    fn talks back with send(obj) (one JSON line per call); the parent reads
    them in order with recv().
    """

    def __init__(
        self,
        fn: Callable[..., None],
        *args: Any,
        netns: str | None = None,
        cgroup: Cgroup | None = None,
        uid: int | None = None,
    ) -> None:
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # child
            os.close(r)
            out = os.fdopen(w, "w", buffering=1)

            def send(obj: Any) -> None:
                out.write(json.dumps(obj) + "\n")

            code = 0
            try:
                if cgroup is not None:
                    (cgroup.path / "cgroup.procs").write_text(str(os.getpid()))
                if netns is not None:
                    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                if uid is not None:
                    os.setgid(uid)
                    os.setuid(uid)
                fn(send, *args)
            except BaseException:  # noqa: BLE001 - report everything to the parent
                send({"error": traceback.format_exc()})
                code = 1
            finally:
                out.flush()
                os._exit(code)
        os.close(w)
        self._in = os.fdopen(r, "r")

    def recv(self) -> Any:
        line = self._in.readline()
        if not line:
            raise EOFError("child exited without answering")
        obj = json.loads(line)
        if isinstance(obj, dict) and "error" in obj:
            raise AssertionError("child failed:\n" + obj["error"])
        return obj

    def wait(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._in.close()
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self._in.close()
        raise TimeoutError("child did not exit")


_THIS_MODULE = sys.modules[__name__]


@pytest.fixture(scope="session")
def kf() -> Any:
    """This module: the helpers and constants above, for the test modules."""
    return _THIS_MODULE
