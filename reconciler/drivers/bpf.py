"""The BPF driver: the only code that loads, pins, attaches, fills or removes kernform's BPF objects.

Ownership (how a fresh process knows what is ours, with no memory of earlier runs):
  - everything pinned under /sys/fs/bpf/kernform/<intent>/ (bpffs is mounted
    at /sys/fs/bpf if it is missing), one directory per target namespace
    below it: bpffs is host-wide, and the same intent applied in two network
    namespaces must not share (or sweep) each other's pins;
  - tc filters on a clsact qdisc at kernform's own priorities (TC_PREF
    0x4b46 = "KF" for tc_filter, TC_PREF_LB 0x4b45 for tc_lb) whose bpf name
    starts with `kf_<intent>/`: each intent has its own handle there, the
    lowest free one above TC_HANDLE_BASE when it first attaches, found again
    by that name (see _tc_slot); filters at other priorities, or without our
    name, are foreign and never touched;
  - cgroup and network-namespace attachments made through bpf_links pinned in
    our directory (the link pin IS the attachment; programs attached by others
    to the same cgroup are never touched, links are multi-attach);
  - cgroup directories below <cgroup2 mount>/kernform/: created when an
    attachment needs them, removed (rmdir) when our last attachment there is
    gone and the kernel agrees (no process, no child, no program of anyone).
A clsact qdisc is added when missing, and then remembered as ours by an empty
directory `clsact:<ifname>` in the intent's pin directory. One we added is
deleted again when no filter (ours or anyone's) is left on it; a clsact we
did not add is never deleted, and one of ours that carries foreign filters
when the intent goes is left to them (the marker goes with the intent).

Pin layout, one directory per program, so observe reads everything it needs
from names (bpffs refuses '.' in names; name parts are %-escaped, see _esc):

    /sys/fs/bpf/kernform/<intent>/<netns:NAME | host>/
      clsact:<ifname>               empty directory: we added that interface's clsact
      <name>@<digest>/
        maps/<map>                  the maps (bcc pins them: -DKF_PIN_DIR=".../maps")
        prog:<function>@<point>     the loaded program, pinned once per attachment:
                                    the set of these pins is the attachments the
                                    program wants
        link:<function>@<point>     the bpf_link of a cgroup / sk_lookup attachment
        cflags/<n>:<flag>           empty directories: the settings, in order
        source:<file>               empty directory made last: the load is complete,
                                    and which bpf/<file> it came from

Compile once: a program directory that is complete for its (name, digest) is
reused as it is; a restarted kernform with the same intent compiles nothing.
A (re)loaded program gets a new directory, so its maps are fresh and get every
desired entry; programs that stay loaded only get map updates, so their
program ids and attachments never change for a configuration change.

Attachment mechanics:
  - "tc:<ifname>:ingress|egress": a cls_bpf filter, direct-action, at the
    intent's handle on clsact of <ifname> in the driver's namespace; a new
    program replaces the old one in place (RTM_NEWTFILTER without NLM_F_EXCL on
    the same handle: atomic, no packet unfiltered). Live = the filter is there
    and runs the pinned program's id.
  - "netns:sk_lookup": bpf_link_create(prog, netns fd, BPF_SK_LOOKUP), pinned.
  - "cgroup:<path>:<type>": bpf_link_create(prog, cgroup fd, attach type), pinned.
    Link attachments of a changed program are swapped with bpf_link_update
    (atomic) and the link is re-pinned in the new directory. Live = the link
    pin exists and the link still points at the right cgroup / namespace and
    runs the pinned program.

Map entries: only the configuration maps (compiler.bpf_layout.CONFIG_MAPS).
Array maps have no "absent" entry: an all-zero value means none, removing
writes zeros. Reads are whole-map: one mmap for arrays declared
BPF_F_MMAPABLE, one batch lookup for other arrays and hashes, get_next_key
for LPM tries (no batch ops there); writes are batched where the map type
allows, in chunks the kernel and memory bear (libbpf.Map.update_many).
Within a program, entries are written in dependency order
(compiler.bpf_layout.WRITE_ORDER: backends, then Maglev chunks, then
services) and removed in the reverse order, so a lookup never finds a
service whose chunks or backends are not there yet.

`proxy_socks` (a sockmap) is desired as (port, protocol): apply finds the
listening socket on that port in the namespace (inet_diag), takes a copy of
its fd from the owning process (pidfd_getfd) and stores it; observe reads the
socket cookie back and maps it to the listener's port. A missing listener is
the one failure that does not undo the apply: everything else is applied,
then TemporaryError says which proxy is not listening (the daemon retries;
the sk_lookup program fails open meanwhile).

Failures: every step of apply is journaled with its inverse (tc replace back,
link update back, entries rewritten, new pins removed); on an error the
journal runs backwards and KernelError names what failed and whether undoing
worked. Unpinning old program directories happens only after everything else
succeeded. bcc's and the verifier's output (fd 2) is captured during a
compile and its tail is part of the error.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler import bpf_layout
from compiler.allocation import default_cgroup
from compiler.errors import InternalError, KernelError, TemporaryError
from compiler.objects import BPF_KINDS, BPF_PIN_ROOT, BpfLeftover, BpfMapEntry, BpfProgram, KernelObject, ObjectKey

from ..netns import entered, path_of
from ..plan import Action
from . import libbpf

log = logging.getLogger(__name__)

BPF_SOURCE_DIR = Path(__file__).resolve().parents[2] / "bpf"
BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = Path(BPF_PIN_ROOT)
BTF_VMLINUX = Path("/sys/kernel/btf/vmlinux")

TC_PREF = 0x4B46
# tc_lb runs before tc_filter on the same hook (as nft's prerouting DNAT runs before the forward
# filter): its filter sits one priority earlier. Both pass what they allow on with TC_ACT_UNSPEC, so
# the filters of every intent on an interface run, in turn: a packet passes when each intent's filter
# lets it (as with nft base chains of several tables at one hook), and foreign filters after ours run.
TC_PREF_LB = 0x4B45
_LB_FUNCTIONS = frozenset({"kf_lb_ingress", "kf_lb_egress"})


def tc_pref(function: str) -> int:
    """The tc priority of a function's cls_bpf filter; every intent's filter of that kind shares it."""
    return TC_PREF_LB if function in _LB_FUNCTIONS else TC_PREF


# Handles at kernform's priorities are allocated per intent: the lowest free one above this base. The
# kernel keeps the allocation (the filter's name says whose it is), so a fresh process finds it.
TC_HANDLE_BASE = 0x4B460000
PROGRAM_PREFIX = "kf_"

# enum bpf_prog_type / bpf_attach_type values (uapi/linux/bpf.h); bcc lacks several.
PROG_SCHED_CLS, PROG_SOCK_OPS, PROG_CGROUP_SOCK_ADDR, PROG_CGROUP_SOCKOPT, PROG_SK_LOOKUP = 3, 13, 18, 25, 30
ATTACH_SK_LOOKUP = 36
CGROUP_ATTACH_TYPES: dict[str, int] = {
    "sock_ops": 3,
    "connect4": 10,
    "connect6": 11,
    "sendmsg4": 14,
    "sendmsg6": 15,
    "recvmsg4": 19,
    "recvmsg6": 20,
    "getsockopt": 21,
}
PROG_TYPE_NAMES = {3: "sched_cls", 13: "sock_ops", 18: "cgroup_sock_addr", 25: "cgroup_sockopt", 30: "sk_lookup"}

# Helper ids (enum bpf_func_id) a function needs beyond map access; probed before the first load.
H_KTIME_GET_NS, H_GET_PRANDOM_U32, H_GET_CURRENT_UID_GID, H_SKB_PULL_DATA = 5, 7, 15, 39
H_GET_SOCKET_COOKIE, H_GET_CURRENT_CGROUP_ID, H_SK_RELEASE, H_GET_NETNS_COOKIE, H_SK_ASSIGN = 46, 80, 86, 122, 124
H_SKB_STORE_BYTES, H_L3_CSUM_REPLACE, H_L4_CSUM_REPLACE, H_CSUM_DIFF = 9, 10, 11, 28
HELPER_NAMES = {5: "ktime_get_ns", 7: "get_prandom_u32", 9: "skb_store_bytes", 10: "l3_csum_replace",
                11: "l4_csum_replace", 15: "get_current_uid_gid", 28: "csum_diff", 39: "skb_pull_data",
                46: "get_socket_cookie", 80: "get_current_cgroup_id", 86: "sk_release",
                122: "get_netns_cookie", 124: "sk_assign"}


@dataclass(frozen=True)
class Function:
    """A function of a bpf/*.c entry file: how to load it and what it needs from the kernel."""

    prog_type: int
    expected_attach: int  # -1: none (tc)
    helpers: tuple[int, ...]


_LB = (H_GET_PRANDOM_U32, H_GET_SOCKET_COOKIE)  # + the affinity helper, chosen by KF_AFFINITY_KEY
FUNCTIONS: dict[str, Function] = {
    "kf_tc_ingress": Function(PROG_SCHED_CLS, -1, (H_KTIME_GET_NS, H_SKB_PULL_DATA)),
    "kf_tc_egress": Function(PROG_SCHED_CLS, -1, (H_KTIME_GET_NS, H_SKB_PULL_DATA)),
    "kf_lb_ingress": Function(PROG_SCHED_CLS, -1, (H_SKB_PULL_DATA, H_SKB_STORE_BYTES, H_L3_CSUM_REPLACE,
                                                   H_L4_CSUM_REPLACE, H_CSUM_DIFF)),
    "kf_lb_egress": Function(PROG_SCHED_CLS, -1, (H_SKB_PULL_DATA, H_SKB_STORE_BYTES, H_L3_CSUM_REPLACE,
                                                  H_L4_CSUM_REPLACE, H_CSUM_DIFF)),
    "kf_sk_lookup": Function(PROG_SK_LOOKUP, ATTACH_SK_LOOKUP, (H_SK_ASSIGN, H_SK_RELEASE)),
    "kf_connect4": Function(PROG_CGROUP_SOCK_ADDR, 10, (H_GET_CURRENT_UID_GID, *_LB)),
    "kf_connect6": Function(PROG_CGROUP_SOCK_ADDR, 11, (H_GET_CURRENT_UID_GID, *_LB)),
    "kf_sendmsg4": Function(PROG_CGROUP_SOCK_ADDR, 14, _LB),
    "kf_sendmsg6": Function(PROG_CGROUP_SOCK_ADDR, 15, _LB),
    "kf_recvmsg4": Function(PROG_CGROUP_SOCK_ADDR, 19, (H_GET_SOCKET_COOKIE,)),
    "kf_recvmsg6": Function(PROG_CGROUP_SOCK_ADDR, 20, (H_GET_SOCKET_COOKIE,)),
    "kf_sockops": Function(PROG_SOCK_OPS, 3, (H_GET_SOCKET_COOKIE,)),
    "kf_getsockopt": Function(PROG_CGROUP_SOCKOPT, 21, ()),
}
_AFFINITY_FUNCTIONS = frozenset({"kf_connect4", "kf_connect6", "kf_sendmsg4", "kf_sendmsg6"})

# Field names of the per-CPU counter structs, for counters(); other per-CPU maps are listed as u64 words.
COUNTER_FIELDS: dict[str, tuple[str, ...]] = {
    "counters": ("packets", "bytes", "dropped"),
    "intercept_counters": ("redirected", "bypassed", "no_proxy"),
    "lb_counters": ("new_flows", "packets", "bytes", "dropped"),
    "lb_be_counters": ("connections",),
}
NOT_COUNTERS = frozenset({"scratch"})
# Sockmaps of proxy sockets and the address family each slot's socket must accept (bpf/sk_lookup.c).
PROXY_FAMILIES = {"proxy_socks": 4, "proxy_socks6": 6}

IPPROTO_TCP, IPPROTO_UDP = 6, 17
_PROTO_NAMES = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}


# ------------------------------------------------------------------ names
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-+=,~")


def _esc(text: str) -> str:
    """A name part bpffs accepts and C string literals and bcc's pin syntax survive: %XX for the rest."""
    return "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


def _unesc(text: str) -> str:
    return urllib.parse.unquote(text)


def _prog_pin_name(function: str, point: str) -> str:
    return f"prog:{_esc(function)}@{_esc(point)}"


def _link_pin_name(function: str, point: str) -> str:
    return f"link:{_esc(function)}@{_esc(point)}"


def _parse_pin_name(name: str, prefix: str) -> tuple[str, str] | None:
    if not name.startswith(prefix) or "@" not in name:
        return None
    function, _, point = name[len(prefix) :].partition("@")
    return _unesc(function), _unesc(point)


@dataclass(frozen=True)
class Point:
    """A parsed attach point."""

    text: str
    kind: str  # tc | netns | cgroup
    ifname: str = ""
    direction: str = ""  # ingress | egress
    cgroup: str = ""  # relative to the cgroup2 mount
    attach_type: int = -1

    @property
    def uses_link(self) -> bool:
        return self.kind in ("netns", "cgroup")


def parse_point(text: str) -> Point:
    parts = text.split(":")
    if parts[0] == "tc" and len(parts) == 3 and parts[1] and parts[2] in ("ingress", "egress"):
        return Point(text, "tc", ifname=parts[1], direction=parts[2])
    if text == "netns:sk_lookup":
        return Point(text, "netns", attach_type=ATTACH_SK_LOOKUP)
    if parts[0] == "cgroup" and len(parts) >= 3 and parts[-1] in CGROUP_ATTACH_TYPES:
        path = ":".join(parts[1:-1]).strip("/")
        if not path or any(p in ("", ".", "..") for p in path.split("/")):
            raise InternalError(f"attach point {text!r}: {path!r} is not a path below the cgroup2 mount")
        return Point(text, "cgroup", cgroup=path, attach_type=CGROUP_ATTACH_TYPES[parts[-1]])
    raise InternalError(f"unknown attach point {text!r}")


# ------------------------------------------------------------------ pin directories
def intent_pin_dir(intent: str, netns: str | None = None) -> Path:
    """/sys/fs/bpf/kernform/<intent>/<namespace>: the intent's BPF state for one target namespace.

    bpffs is one for the whole host while an intent is applied per network
    namespace: the same intent in two namespaces must not share pins.
    """
    if not intent:
        raise InternalError("empty intent name")
    return PIN_ROOT / _esc(intent) / (f"netns:{_esc(netns)}" if netns else "host")


@dataclass
class _PinDir:
    """One program directory as found on bpffs."""

    path: Path
    name: str
    digest: str

    @property
    def maps(self) -> Path:
        return self.path / "maps"

    def source(self) -> str | None:
        for entry in _listdir(self.path):
            if entry.startswith("source:"):
                return _unesc(entry[len("source:") :])
        return None

    def cflags(self) -> tuple[str, ...]:
        """The settings the program was compiled with, kept as names of empty directories `cflags/<n>:<flag>`."""
        names = [e.partition(":") for e in _listdir(self.path / "cflags")]
        return tuple(_unesc(flag) for _, _, flag in sorted((int(n), s, f) for n, s, f in names if n.isdigit()))

    def prog_pins(self) -> list[tuple[str, str]]:
        """(function, point) of every program pin: the attachments this program wants."""
        return sorted(p for entry in _listdir(self.path) if (p := _parse_pin_name(entry, "prog:")) is not None)

    def prog_pin(self, function: str, point: str) -> Path:
        return self.path / _prog_pin_name(function, point)

    def link_pin(self, function: str, point: str) -> Path:
        return self.path / _link_pin_name(function, point)


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _fd_of_pin(path: Path) -> int | None:
    try:
        return libbpf.obj_get(str(path))
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int | None]:
    fd = _fd_of_pin(path)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


# ------------------------------------------------------------------ mounts
def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) from /proc/self/mountinfo."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and right:
                point = fields[4].encode().decode("unicode_escape")
                result.append((point, right.split()[0]))
    return result


def cgroup2_root() -> Path:
    """Where cgroup v2 is mounted (/sys/fs/cgroup/unified on hybrid hosts, /sys/fs/cgroup on unified ones)."""
    points = [p for p, fstype in _mounts() if fstype == "cgroup2"]
    if not points:
        raise KernelError("cgroup v2 is not mounted (no cgroup2 in /proc/self/mountinfo): cgroup attachments need it")
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in points:
            return Path(preferred)
    return Path(points[0])


def ensure_bpffs() -> None:
    """bpffs at /sys/fs/bpf, mounted if missing (pins need it)."""
    if any(p == str(BPFFS) and t == "bpf" for p, t in _mounts()):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    BPFFS.mkdir(parents=True, exist_ok=True)
    if libc.mount(b"bpf", str(BPFFS).encode(), b"bpf", 0, None) != 0:
        code = ctypes.get_errno()
        raise KernelError(f"bpffs is not mounted at {BPFFS} and mounting it failed: {os.strerror(code)}")


# ------------------------------------------------------------------ the journal
@dataclass
class _Journal:
    """What apply did, newest last, each with how to undo it (and what to let go of if it stays done)."""

    undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    release: list[Callable[[], None]] = field(default_factory=list)

    def did(self, what: str, undo: Callable[[], None], release: Callable[[], None] | None = None) -> None:
        """`undo` reverts the step (and frees what it holds); `release` only frees it, once the apply stands."""
        self.undo.append((what, undo))
        if release is not None:
            self.release.append(release)

    def commit(self) -> None:
        for fn in self.release:
            with contextlib.suppress(OSError):
                fn()
        self.undo.clear()
        self.release.clear()

    def roll_back(self) -> list[str]:
        failures = []
        for what, fn in reversed(self.undo):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - undo as much as possible, report the rest
                failures.append(f"{what}: {exc}")
                log.error("could not undo %s: %s", what, exc)
        self.undo.clear()
        self.release.clear()
        return failures


@dataclass
class _Loaded:
    """A desired program whose directory is ready: prog fds by function (owned; closed after apply)."""

    program: BpfProgram
    pdir: _PinDir
    fds: dict[str, int]
    ids: dict[str, int]
    fresh_entries: bool  # its maps were not the observed ones: sync every desired entry

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


class BpfDriver:
    """Reads and writes kernform's BPF objects for intents whose network side lives in `netns`.

    The sockets it needs in that namespace (rtnetlink for tc, sock_diag for
    proxy sockets, an ioctl socket for interface indexes) are opened once, in
    the namespace, so the driver may be used from any thread.
    """

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._where = f"namespace {netns}" if netns else "the current namespace"
        self.compilations = 0  # bcc compiles done by this driver (a restart with the same intent: 0)
        self.operations = 0  # kernel operations done by this driver, see apply()
        ns_path = str(path_of(netns)) if netns else "/proc/thread-self/ns/net"
        try:
            self._netns_fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise KernelError(f"cannot open network namespace {netns or '(current)'} ({ns_path}): {exc.strerror}") \
                from None
        self._netns_ino = os.fstat(self._netns_fd).st_ino
        try:
            with entered(netns):
                self._tc = _RtnlSocket()
                self._diag = _DiagSocket()
                self._ioctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except OSError as exc:
            os.close(self._netns_fd)
            raise KernelError(f"cannot open sockets in {self._where}: {exc.strerror}") from exc
        self._cgroup_root: Path | None = None
        self._probed: set[tuple[str, str]] = set()
        self._missing_proxies: list[str] = []
        self._open_maps: list[libbpf.Map] = []
        # Configuration entries read or written last, per (program, pin directory digest), by key.
        # BPF maps have no generation or change notification to validate a kept copy with, so it is
        # used only until forget() (the daemon forgets before every resync and kernel-triggered pass);
        # the sockmaps, whose entries vanish when a proxy closes its socket, are read every time.
        self._known_entries: dict[tuple[str, str], dict[str, dict[ObjectKey, BpfMapEntry]]] = {}
        self._adopted: set[tuple[str, str]] = set()  # kept entries that are the desired objects themselves

    def forget(self) -> None:
        """Read every map again on the next observe."""
        self._known_entries.clear()
        self._adopted.clear()

    def adopt(self, desired: Mapping[ObjectKey, KernelObject]) -> None:
        """The kernel was verified to hold `desired`: keep the desired entries themselves (see NftDriver.adopt)."""
        for program, maps in self._known_entries.items():
            if program in self._adopted:
                continue
            for kept in maps.values():
                keys = list(kept)
                kept.update(zip(keys, map(desired.get, keys, kept.values()), strict=True))  # type: ignore[arg-type]
            self._adopted.add(program)

    def close(self) -> None:
        if self._netns_fd >= 0:
            self._tc.close()
            self._diag.close()
            self._ioctl.close()
            os.close(self._netns_fd)
            self._netns_fd = -1

    def __enter__(self) -> BpfDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ================================================================ probe
    def probe(self, programs: Iterable[BpfProgram]) -> None:
        """Checks the kernel and host offer what `programs` need; KernelError names the first missing thing.

        BTF, bpffs (mounted if missing), libbpf, the program type of every
        function and the helpers it calls (tiny test programs through the
        verifier, see libbpf.probe_helper), a cgroup2 mount for cgroup
        attachments, and, for programs not already compiled and pinned by an
        earlier run, bcc and kernel headers. Results are remembered per driver.
        """
        programs = list(programs)
        if not BTF_VMLINUX.exists():
            raise KernelError(f"the kernel has no BTF ({BTF_VMLINUX} is missing): kernform's BPF programs need it")
        ensure_bpffs()
        try:
            libbpf.lib()
        except OSError as exc:
            raise KernelError(f"libbpf.so.1 cannot be loaded ({exc}): install libbpf1") from exc
        need_compiler = False
        for program in programs:
            if not (BPF_SOURCE_DIR / program.source).is_file():
                raise InternalError(f"program {program.name}: bpf/{program.source} does not exist")
            for function, text in program.attachments:
                spec = FUNCTIONS.get(function)
                if spec is None:
                    raise InternalError(f"program {program.name}: unknown function {function}")
                point = parse_point(text)
                if point.kind == "cgroup":
                    self._cgroup()
                    if spec.expected_attach != point.attach_type:
                        raise InternalError(f"program {program.name}: {function} cannot attach at {text}")
                helpers = spec.helpers
                if function in _AFFINITY_FUNCTIONS:
                    by_cgroup = "-DKF_AFFINITY_KEY=1" in program.cflags
                    helpers += (H_GET_CURRENT_CGROUP_ID if by_cgroup else H_GET_NETNS_COOKIE,)
                self._probe_function(function, spec.prog_type, helpers, spec.expected_attach)
            if not self._compiled_anywhere(program):
                need_compiler = True
        if need_compiler:
            self._probe_compiler()

    def _probe_function(self, function: str, prog_type: int, helpers: tuple[int, ...],
                        expected_attach: int = -1) -> None:
        type_name = PROG_TYPE_NAMES.get(prog_type, str(prog_type))
        if ("type", type_name) not in self._probed:
            if not libbpf.probe_prog_type(prog_type):
                raise KernelError(f"the kernel cannot load BPF programs of type {type_name} (needed by {function})")
            self._probed.add(("type", type_name))
        for helper in helpers:
            key = (type_name, str(helper))
            if key in self._probed:
                continue
            if not libbpf.probe_helper(prog_type, helper, expected_attach):
                raise KernelError(f"the kernel lacks the BPF helper bpf_{HELPER_NAMES.get(helper, helper)} for "
                                  f"{type_name} programs (needed by {function})")
            self._probed.add(key)

    def _compiled_anywhere(self, program: BpfProgram) -> bool:
        dirname = f"{_esc(program.name)}@{program.digest}"
        return any(_PinDir(PIN_ROOT / intent / target / dirname, program.name, program.digest).source()
                   for intent in _listdir(PIN_ROOT) for target in _listdir(PIN_ROOT / intent))

    def _probe_compiler(self) -> None:
        if ("compiler", "") in self._probed:
            return
        try:
            import bcc  # noqa: F401
        except ImportError as exc:
            raise KernelError(f"bcc's Python module cannot be imported ({exc}): install python3-bpfcc") from exc
        release = os.uname().release
        for sub in ("build", "source"):
            if not Path(f"/lib/modules/{release}/{sub}").exists():
                raise KernelError(f"kernel headers are missing (/lib/modules/{release}/{sub}): bcc needs them "
                                  "to compile kernform's programs")
        self._probed.add(("compiler", ""))

    # ================================================================ observe
    def observe(self, intent: str) -> list[BpfProgram | BpfMapEntry | BpfLeftover]:
        """Our programs of `intent` (attachments: the ones live now) and their configuration entries."""
        return list(self.observe_index(intent).values())

    def observe_index(self, intent: str) -> dict[ObjectKey, BpfProgram | BpfMapEntry | BpfLeftover]:
        """`observe`, by key. Programs and attachments are always read; entries may be the kept ones."""
        return self._observe(intent, with_entries=True)

    def observe_programs(self, intent: str) -> dict[ObjectKey, BpfProgram | BpfLeftover]:
        """The programs with their live attachments, and leftovers, without reading any map (cheap: a few
        syscalls per program); kept entries are left as they are."""
        return {k: o for k, o in self._observe(intent, with_entries=False).items() if not isinstance(o, BpfMapEntry)}

    def _observe(self, intent: str, with_entries: bool) -> dict[ObjectKey, BpfProgram | BpfMapEntry | BpfLeftover]:
        result: dict[ObjectKey, BpfProgram | BpfMapEntry | BpfLeftover] = {}
        known = self._known_entries
        if with_entries:
            self._known_entries = {}
        for name, dirs in sorted(self._program_dirs(intent).items()):
            ranked = []
            for pdir in dirs:
                live = self._live_attachments(intent, pdir)
                source = pdir.source()
                ranked.append((len(live), source is not None, pdir.path.stat().st_mtime_ns, pdir, live, source))
            _, _, _, primary, live, source = max(ranked, key=lambda r: r[:3])
            if len(dirs) > 1:
                # Leftovers of an interrupted apply: a digest that never equals a desired one,
                # so the plan changes the program and apply sweeps the extra directories.
                digest = "+".join(sorted(d.digest for d in dirs))
            elif source is None:
                digest = primary.digest + "+incomplete"
            else:
                digest = primary.digest
            program = BpfProgram(name, source or "", tuple(sorted(live)), primary.cflags(), digest)
            result[program.key] = program
            if source is None or not with_entries:
                continue
            kept = known.get((name, digest))
            fresh = self._read_entries(name, source, primary, None if kept is None else PROXY_FAMILIES)
            maps: dict[str, dict[ObjectKey, BpfMapEntry]] = (
                {} if kept is None else {m: entries for m, entries in kept.items() if m not in PROXY_FAMILIES})
            for entry in fresh:
                maps.setdefault(entry.map, {})[entry.key] = entry
            if kept is None or any(m in PROXY_FAMILIES for m in maps):
                self._adopted.discard((name, digest))
            self._known_entries[(name, digest)] = maps
            for entries in maps.values():
                result.update(entries)
        if with_entries:
            self._adopted &= set(self._known_entries)
        for leftover in self._leftovers(intent, [o for o in result.values() if isinstance(o, BpfProgram)]):
            result[leftover.key] = leftover
        return result

    def _leftovers(self, intent: str, programs: list[BpfProgram]) -> list[BpfLeftover]:
        """What an interrupted run left of the intent here that no program accounts for: the pin
        directory and its clsact markers once no program directory is in it, and the intent's default
        cgroup once no program is attached there."""
        found: list[BpfLeftover] = []
        root = self._intent_dir(intent)
        if not programs and root.is_dir():
            found += [BpfLeftover("clsact marker", str(root / entry))
                      for entry in _listdir(root) if entry.startswith("clsact:")]
            found.append(BpfLeftover("pin directory", str(root)))
        cgroup = default_cgroup(intent, self.netns)
        used = {parse_point(point).cgroup for program in programs for _, point in program.attachments
                if point.startswith("cgroup:")}
        if cgroup not in used:
            with contextlib.suppress(KernelError):
                if (self._cgroup() / cgroup).is_dir():
                    found.append(BpfLeftover("cgroup", cgroup))
        return found

    def _remove_leftover(self, leftover: BpfLeftover) -> int:
        path = Path(leftover.path)
        if leftover.what == "clsact marker":
            ifindex = self._ifindex(_unesc(path.name[len("clsact:") :]))
            if ifindex is None:
                _rmdir_quiet(path)  # the interface is gone, and its qdisc with it
                return 1
            if not self._drop_clsact(ifindex, path):
                _rmdir_quiet(path)  # the qdisc stays for whoever's filters are on it
            return 1
        if leftover.what == "pin directory":
            for entry in _listdir(path):
                if not entry.startswith("clsact:"):
                    _rmdir_quiet(path / entry)  # an empty directory an interrupted apply made
            _rmdir_empty(path, path.parent)
            return 1
        if leftover.what == "cgroup":
            self._remove_our_cgroup(leftover.path)
            return 1
        raise InternalError(f"unknown leftover {leftover.what} at {leftover.path}")

    def pin_dir(self, intent: str) -> Path:
        """Where this driver pins `intent`'s programs (see intent_pin_dir)."""
        return intent_pin_dir(intent, self.netns)

    def _intent_dir(self, intent: str) -> Path:
        return self.pin_dir(intent)

    def _program_dirs(self, intent: str) -> dict[str, list[_PinDir]]:
        groups: dict[str, list[_PinDir]] = {}
        root = self._intent_dir(intent)
        for entry in _listdir(root):
            escaped, sep, digest = entry.rpartition("@")
            if not sep or not escaped or not (root / entry).is_dir():
                continue  # not a directory we make: leave it alone
            name = _unesc(escaped)
            groups.setdefault(name, []).append(_PinDir(root / entry, name, digest))
        return groups

    def _live_attachments(self, intent: str, pdir: _PinDir) -> list[tuple[str, str]]:
        live = []
        for function, text in pdir.prog_pins():
            try:
                point = parse_point(text)
            except InternalError:
                continue
            with _opened(pdir.prog_pin(function, text)) as fd:
                if fd is None:
                    continue
                prog_id = libbpf.prog_info(fd).id
            if point.uses_link:
                if self._link_state(pdir.link_pin(function, text), point, prog_id) == "live":
                    live.append((function, text))
            else:
                slot = self._tc_slot(function, intent, point, create=False)
                current = self._tc_filter(point, slot) if slot is not None else None
                if current is not None and current.prog_id == prog_id:
                    live.append((function, text))
        return live

    # ---------------------------------------------------------------- entries
    def _read_entries(self, name: str, source: str, pdir: _PinDir,
                      only: Container[str] | None = None) -> list[BpfMapEntry]:
        entries: list[BpfMapEntry] = []
        for map_name in bpf_layout.CONFIG_MAPS.get(source, ()):
            if only is not None and map_name not in only:
                continue
            path = pdir.maps / map_name
            try:
                bpf_map = libbpf.Map.open(str(path))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise KernelError(f"cannot open map {path}: {exc.strerror}") from exc
            with bpf_map:
                try:
                    pairs = self._config_pairs(bpf_map)
                except OSError as exc:
                    raise KernelError(f"cannot read map {path}: {exc.strerror}") from exc
            entries += [
                # No label here: observing tens of thousands of entries must stay cheap; describe() decodes
                # the bytes only for the entries a plan or status actually prints.
                BpfMapEntry(name, map_name, key.hex(), value.hex())
                for key, value in pairs
            ]
        return entries

    def _config_pairs(self, bpf_map: libbpf.Map) -> list[tuple[bytes, bytes]]:
        """(key, value) of every configuration entry."""
        info = bpf_map.info
        if info.type == libbpf.MAP_SOCKMAP:
            return self._proxy_pairs(bpf_map)
        if info.type in libbpf.PERCPU_MAP_TYPES or info.type in (libbpf.MAP_LRU_HASH, libbpf.MAP_LRU_PERCPU_HASH):
            raise InternalError(f"map {info.name} is runtime state, not configuration")
        if info.type == libbpf.MAP_ARRAY:
            return _nonzero_array_entries(bpf_map.array_values(), info.value_size)
        if info.name in bpf_layout.IFINDEX_KEYED_MAPS:
            return sorted((self._ifname_key(key), value) for key, value in bpf_map.items())
        return sorted(bpf_map.items())

    def _ifname_key(self, key: bytes) -> bytes:
        """An ifindex-keyed entry as the compiler writes it: by interface name; an index no interface has
        any more becomes `#<index>`, which no desired entry equals (so it is removed)."""
        ifindex = struct.unpack("=I", key)[0]
        name = self._ifname(ifindex)
        return bpf_layout.ifname_key(name if name is not None else f"#{ifindex}")

    def _ifindex_key(self, key: bytes) -> bytes | None:
        """The kernel key of an entry keyed by interface name; None when the interface does not exist."""
        name = key.rstrip(b"\0").decode()
        ifindex = int(name[1:]) if name.startswith("#") else self._ifindex(name)
        return None if ifindex is None else struct.pack("=I", ifindex)

    def _proxy_pairs(self, bpf_map: libbpf.Map) -> list[tuple[bytes, bytes]]:
        slots = list(bpf_map.items())
        if not slots:
            return []
        known = {row.cookie: row for row in self._proxy_candidates()}
        pairs = []
        for key, value in slots:
            cookie = struct.unpack("=Q", value[:8])[0]
            row = known.get(cookie)
            # A socket we cannot name (not a listener here any more): its cookie, which no desired value equals.
            pairs.append((key, bpf_layout.PROXY_SOCKET.pack(row.port, row.proto) if row else value[:8]))
        return pairs

    # ================================================================ counters
    def counters(self, intent: str) -> dict[str, dict[str, Any]]:
        """Per program: {map: {index: {field: value summed over CPUs}}} for its per-CPU counter maps (non-zero only)."""
        result: dict[str, dict[str, Any]] = {}
        for name, dirs in sorted(self._program_dirs(intent).items()):
            pdir = max(dirs, key=lambda d: (d.source() is not None, d.path.stat().st_mtime_ns))
            maps: dict[str, Any] = {}
            for map_name in _listdir(pdir.maps):
                if map_name in NOT_COUNTERS:
                    continue
                try:
                    bpf_map = libbpf.Map.open(str(pdir.maps / map_name))
                except OSError:
                    continue
                with bpf_map:
                    if bpf_map.info.type not in (libbpf.MAP_PERCPU_ARRAY, libbpf.MAP_PERCPU_HASH):
                        continue
                    fields = COUNTER_FIELDS.get(map_name)
                    maps[map_name] = _sum_percpu(bpf_map, fields)
            result[name] = maps
        return result

    # ================================================================ apply
    def apply(self, intent: str, actions: Sequence[Action], desired: Iterable[KernelObject]) -> int:
        """Carries out the bpf actions of a plan; returns the number of kernel operations.

        Operations counted: a function loaded, a program attached / swapped /
        detached, a map entry written or removed, a program directory removed,
        a clsact qdisc of ours deleted.
        Order: load new and changed programs (or reuse their complete pin
        directory), write entries (all desired ones into fresh maps, the entry
        actions into kept maps), attach, then detach and unpin what is gone. On
        a failure everything done is undone and KernelError says what failed;
        a proxy that is not listening is reported (TemporaryError) after the
        rest has been applied, without undoing it.
        """
        actions = [a for a in actions if a.kind in BPF_KINDS]
        if not actions:
            return 0
        desired = tuple(desired)
        programs = {o.name: o for o in desired if isinstance(o, BpfProgram)}
        ensure_bpffs()
        journal = _Journal()
        self._missing_proxies = []
        self._open_maps = []
        loaded: dict[str, _Loaded] = {}
        count = 0
        try:
            root = self._intent_dir(intent)
            if not root.is_dir():
                root.mkdir(parents=True)
                journal.did(f"create {root}", lambda: _rmdir_empty(root, root.parent))
            existing = self._program_dirs(intent)

            # 1. programs: reuse complete pin directories, compile only what is missing
            for action in actions:
                if isinstance(action.new, BpfProgram):
                    old_digest = action.old.digest if isinstance(action.old, BpfProgram) else None
                    item, ops = self._load(intent, root, action.new, old_digest, journal)
                    loaded[item.program.name] = item
                    count += ops

            # 2. entries
            wanted_entries: dict[str, list[BpfMapEntry]] = {}
            if any(item.fresh_entries for item in loaded.values()):
                for obj in desired:
                    if isinstance(obj, BpfMapEntry):
                        wanted_entries.setdefault(obj.program, []).append(obj)
            for item in loaded.values():
                if item.fresh_entries:
                    count += self._sync_entries(item, wanted_entries.get(item.program.name, []), journal)
            entry_changes: dict[str, list[tuple[BpfMapEntry | None, BpfMapEntry | None]]] = {}
            for action in actions:
                if action.kind != BpfMapEntry.kind:
                    continue
                entry = action.new or action.old
                assert isinstance(entry, BpfMapEntry)
                if entry.program in loaded and loaded[entry.program].fresh_entries:
                    continue  # synced as a whole above
                if entry.program not in programs:
                    continue  # its program goes away with its maps
                entry_changes.setdefault(entry.program, []).append(
                    (action.old if isinstance(action.old, BpfMapEntry) else None,
                     action.new if isinstance(action.new, BpfMapEntry) else None))
            for name, changes in sorted(entry_changes.items()):
                program = programs[name]
                pdir = self._dir_for(root, program)
                if pdir.source() is None:
                    raise KernelError(f"program {name}: {pdir.path} is missing or incomplete; cannot write entries")
                count += self._write_entries(program, pdir, changes, journal)

            # 3. attachments
            for item in loaded.values():
                count += self._attach(intent, item, existing.get(item.program.name, []), journal)

            # 4. detach and unpin what is no longer wanted
            removals: list[_PinDir] = []
            for action in actions:
                if action.kind != BpfProgram.kind:
                    continue
                name = action.key.name
                keep = loaded[name].pdir.path if name in loaded else None
                removals += [d for d in existing.get(name, []) if d.path != keep]
            kept_links = self._link_ids([item.pdir for item in loaded.values()])
            for pdir in removals:
                count += self._detach_dir(intent, pdir, kept_links, journal)

            # 5. what interrupted runs left (nothing to undo: none of it is in use)
            for action in actions:
                if isinstance(action.old, BpfLeftover) and action.op == "remove":
                    count += self._remove_leftover(action.old)
        except BaseException as exc:
            self._known_entries.clear()
            failures = journal.roll_back()
            self._release(loaded)
            note = ("; what was done before was undone" if not failures
                    else "; undoing FAILED for: " + "; ".join(failures))
            if isinstance(exc, KernelError):
                raise type(exc)(f"{exc}{note}") from exc
            if isinstance(exc, OSError):
                raise KernelError(f"bpf: {exc}{note}") from exc
            raise
        journal.commit()
        self._release(loaded)
        self._remember(root, loaded, programs, entry_changes)
        # Past the point of no return: nothing above needs the old pins any more.
        for pdir in removals:
            count += self._remove_dir(pdir)
        count += self._sweep_clsacts(intent)
        _rmdir_empty(root, root.parent)
        self.operations += count
        if self._missing_proxies:
            raise TemporaryError("; ".join(self._missing_proxies) + " (everything else was applied)")
        return count

    def _remember(self, root: Path, loaded: dict[str, _Loaded], programs: dict[str, BpfProgram],
                  entry_changes: dict[str, list[tuple[BpfMapEntry | None, BpfMapEntry | None]]]) -> None:
        """Update the kept entries with what the kernel holds now under each key this apply wrote, read
        back key by key (verification compares with the kernel, never with what was written). Programs
        loaded by this apply are dropped from the kept entries: their maps are read whole next time."""
        for key in [k for k in self._known_entries if k[0] in loaded]:
            del self._known_entries[key]
        for name, changes in entry_changes.items():
            program = programs[name]
            kept = self._known_entries.get((name, program.digest))
            if kept is None:
                continue
            try:
                held = self._read_back(root, program, changes)
            except (OSError, KernelError):
                del self._known_entries[(name, program.digest)]  # read it whole on the next observe
                continue
            for map_name, entries in held.items():
                for key, entry in entries.items():
                    if entry is None:
                        kept.get(map_name, {}).pop(key, None)
                    else:
                        kept.setdefault(map_name, {})[key] = entry
            self._adopted.discard((name, program.digest))

    def _read_back(self, root: Path, program: BpfProgram, changes: list[tuple[BpfMapEntry | None, BpfMapEntry | None]]
                   ) -> dict[str, dict[ObjectKey, BpfMapEntry | None]]:
        """{map: {entry key: the entry as the kernel holds it now, None when absent}} for the keys of
        `changes` (sockmaps excluded: they are read whole at every observe)."""
        pdir = self._dir_for(root, program)
        by_map: dict[str, list[BpfMapEntry]] = {}
        for old, new in changes:
            entry = new or old
            assert entry is not None
            if entry.map not in PROXY_FAMILIES:
                by_map.setdefault(entry.map, []).append(entry)
        result: dict[str, dict[ObjectKey, BpfMapEntry | None]] = {}
        for map_name, entries in by_map.items():
            found = result.setdefault(map_name, {})
            with libbpf.Map.open(str(pdir.maps / map_name)) as bpf_map:
                info = bpf_map.info
                if info.type == libbpf.MAP_ARRAY:
                    size = info.value_size
                    values = bpf_map.array_values() if len(entries) > 64 else None
                    for entry in entries:
                        raw_key = bytes.fromhex(entry.key_hex)
                        if values is None:
                            value = bpf_map.lookup(raw_key) or bytes(size)
                        else:
                            first = struct.unpack("<I", raw_key)[0] * size
                            value = values[first : first + size]
                        found[entry.key] = (None if value == bytes(size) else
                                            BpfMapEntry(program.name, map_name, entry.key_hex, value.hex()))
                    continue
                # many keys of a hash: one batch read of the whole map beats a lookup per key
                whole = dict(bpf_map.items()) if info.type == libbpf.MAP_HASH and len(entries) > 256 else None
                for entry in entries:
                    raw_key = bytes.fromhex(entry.key_hex)
                    kernel_key = (self._ifindex_key(raw_key) if info.name in bpf_layout.IFINDEX_KEYED_MAPS
                                  else raw_key)
                    if whole is not None and kernel_key is not None:
                        stored = whole.get(kernel_key)
                    else:
                        stored = bpf_map.held(kernel_key) if kernel_key is not None else None
                    found[entry.key] = (None if stored is None else
                                        BpfMapEntry(program.name, map_name, entry.key_hex, stored.hex()))
        return result

    def _release(self, loaded: dict[str, _Loaded]) -> None:
        for item in loaded.values():
            item.close()
        for bpf_map in self._open_maps:
            bpf_map.close()
        self._open_maps = []

    def _dir_for(self, root: Path, program: BpfProgram) -> _PinDir:
        return _PinDir(root / f"{_esc(program.name)}@{program.digest}", program.name, program.digest)

    # ---------------------------------------------------------------- loading
    def _load(self, intent: str, root: Path, program: BpfProgram, old_digest: str | None,
              journal: _Journal) -> tuple[_Loaded, int]:
        """The program's pin directory, complete: reused if it is, loaded (bcc) as far as it is not."""
        pdir = self._dir_for(root, program)
        functions = sorted({fn for fn, _ in program.attachments})
        for fn, text in program.attachments:
            if fn not in FUNCTIONS:
                raise InternalError(f"program {program.name}: unknown function {fn}")
            parse_point(text)
        created = False
        if not pdir.path.is_dir():
            pdir.maps.mkdir(parents=True)
            created = True
            journal.did(f"create {pdir.path}", lambda: shutil.rmtree(pdir.path, ignore_errors=True))
        else:
            pdir.maps.mkdir(exist_ok=True)
        fds: dict[str, int] = {}
        ops = 0
        item = _Loaded(program, pdir, fds, {}, fresh_entries=old_digest != program.digest)
        try:
            # Programs already pinned (any attachment of the function will do).
            for fn, text in pdir.prog_pins():
                if fn in functions and fn not in fds:
                    fd = _fd_of_pin(pdir.prog_pin(fn, text))
                    if fd is not None:
                        fds[fn] = fd
            missing = [fn for fn in functions if fn not in fds]
            if missing:
                fds.update(self._compile(program, pdir, missing))
                ops += len(missing)
            for fn, fd in fds.items():
                item.ids[fn] = libbpf.prog_info(fd).id
            for fn, text in program.attachments:
                pin = pdir.prog_pin(fn, text)
                if not pin.exists():
                    libbpf.obj_pin(fds[fn], str(pin))
                    if not created:
                        journal.did(f"pin {pin}", _unlinker(pin))
            if pdir.source() is None:
                settings = pdir.path / "cflags"
                shutil.rmtree(settings, ignore_errors=True)
                for index, flag in enumerate(program.cflags):
                    (settings / f"{index}:{_esc(flag)}").mkdir(parents=True)
                if not created:
                    journal.did(f"create {settings}", lambda: shutil.rmtree(settings, ignore_errors=True))
                marker = pdir.path / f"source:{_esc(program.source)}"
                marker.mkdir()
                if not created:
                    journal.did(f"create {marker}", lambda: _rmdir_quiet(marker))
        except BaseException:
            item.close()
            raise
        return item, ops

    def _compile(self, program: BpfProgram, pdir: _PinDir, functions: list[str]) -> dict[str, int]:
        """Compiles bpf/<source> once with bcc (maps pinned in pdir/maps) and loads `functions`; owned fds."""
        self._probe_compiler()
        from bcc import BPF  # imported here: a run that compiles nothing never needs bcc

        source = BPF_SOURCE_DIR / program.source
        if "/" in program.source or not source.is_file():
            raise InternalError(f"program {program.name}: bpf/{program.source} does not exist")
        cflags = [f"-I{BPF_SOURCE_DIR}", *program.cflags, f'-DKF_PIN_DIR="{pdir.maps}"']
        fds: dict[str, int] = {}
        with _captured_stderr() as stderr:
            try:
                self.compilations += 1
                bpf = BPF(src_file=str(source).encode(), cflags=cflags)
            except Exception as exc:
                raise KernelError(f"program {program.name}: bcc could not compile bpf/{program.source}: "
                                  f"{exc}{_tail(stderr)}") from exc
            try:
                for fn in functions:
                    spec = FUNCTIONS[fn]
                    try:
                        handle = bpf.load_func(fn.encode(), spec.prog_type, attach_type=spec.expected_attach)
                    except Exception as exc:
                        raise KernelError(f"program {program.name}: the kernel refused {fn} from "
                                          f"bpf/{program.source}: {exc}{_tail(stderr)}") from exc
                    fds[fn] = os.dup(handle.fd)
            except BaseException:
                for fd in fds.values():
                    os.close(fd)
                raise
            finally:
                bpf.cleanup()  # closes bcc's fds; the pinned maps and our dup'ed program fds stay
        return fds

    # ---------------------------------------------------------------- entries
    def _sync_entries(self, item: _Loaded, wanted: list[BpfMapEntry], journal: _Journal) -> int:
        """Makes the configuration maps of a (re)loaded program hold exactly `wanted`."""
        program, pdir = item.program, item.pdir
        have = {e.key: e for e in self._read_entries(program.name, program.source, pdir)}
        want = {e.key: e for e in wanted}
        changes: list[tuple[BpfMapEntry | None, BpfMapEntry | None]] = []
        for key, entry in want.items():
            old = have.get(key)
            if old != entry:
                changes.append((old, entry))
        changes += [(old, None) for key, old in have.items() if key not in want]
        return self._write_entries(program, pdir, changes, journal)

    def _write_entries(self, program: BpfProgram, pdir: _PinDir,
                       changes: list[tuple[BpfMapEntry | None, BpfMapEntry | None]], journal: _Journal) -> int:
        by_map: dict[str, list[tuple[BpfMapEntry | None, BpfMapEntry | None]]] = {}
        config = set(bpf_layout.CONFIG_MAPS.get(program.source, ()))
        for old, new in changes:
            entry = new or old
            assert entry is not None
            if program.source and entry.map not in config:
                raise InternalError(f"{entry.map} is not a configuration map of bpf/{program.source}")
            by_map.setdefault(entry.map, []).append((old, new))
        # What an entry refers to is there before it and goes after it (bpf_layout.WRITE_ORDER): a new
        # backend before the Maglev chunk naming it, a chunk before its service; removals the other way.
        order = sorted(by_map, key=lambda m: (bpf_layout.WRITE_ORDER.get(m, 1), m))
        phases = [(m, [i for i in by_map[m] if i[1] is not None]) for m in order]
        phases += [(m, [i for i in by_map[m] if i[1] is None]) for m in reversed(order)]
        count = 0
        opened: dict[str, libbpf.Map] = {}
        for map_name, items in phases:
            if not items:
                continue
            bpf_map = opened.get(map_name)
            if bpf_map is None:
                path = pdir.maps / map_name
                try:
                    bpf_map = opened[map_name] = libbpf.Map.open(str(path))
                except OSError as exc:
                    raise KernelError(f"program {program.name}: cannot open map {path}: {exc.strerror}") from exc
                # The journal's undo closures use the fd: it stays open until the apply is over.
                self._open_maps.append(bpf_map)
            count += self._write_map(program, bpf_map, items, journal)
        return count

    def _write_map(self, program: BpfProgram, bpf_map: libbpf.Map,
                   items: list[tuple[BpfMapEntry | None, BpfMapEntry | None]], journal: _Journal) -> int:
        info = bpf_map.info
        where = f"map {program.name}/{info.name}"
        value_size = info.value_size

        def raw(entry: BpfMapEntry) -> tuple[bytes, bytes]:
            key, value = bytes.fromhex(entry.key_hex), bytes.fromhex(entry.value_hex)
            if len(key) != info.key_size:
                raise InternalError(f"{where}: key {entry.key_hex} is {len(key)} bytes, the map's are {info.key_size}")
            if info.type != libbpf.MAP_SOCKMAP and len(value) != value_size:
                raise InternalError(f"{where}: value of {entry.key_hex} is {len(value)} bytes, "
                                    f"the map's are {value_size}")
            return key, value

        try:
            if info.type == libbpf.MAP_ARRAY:
                zero = bytes(info.value_size)
                forward = []
                backward = []
                for old, new in items:
                    entry = new or old
                    assert entry is not None
                    key, _ = raw(entry)
                    forward.append((key, raw(new)[1] if new else zero))
                    backward.append((key, raw(old)[1] if old else zero))
                bpf_map.update_many(forward)
                journal.did(f"{where}: {len(forward)} entries", lambda: bpf_map.update_many(backward))
                return len(forward)
            if info.type == libbpf.MAP_SOCKMAP:
                return self._write_proxies(program, bpf_map, items, journal, raw)
            if info.name in bpf_layout.IFINDEX_KEYED_MAPS:
                return self._write_ifindex_keyed(bpf_map, items, journal, where)
            if info.type in (libbpf.MAP_HASH, libbpf.MAP_LPM_TRIE):
                updates = [raw(new) for old, new in items if new is not None]
                deletes = [raw(old)[0] for old, new in items if new is None and old is not None]
                if info.type == libbpf.MAP_HASH:
                    bpf_map.update_many(updates)
                    bpf_map.delete_many(deletes)
                else:
                    for key, value in updates:
                        bpf_map.update(key, value)
                    for key in deletes:
                        bpf_map.delete(key)
                restore = [raw(old) for old, _ in items if old is not None]
                drop = [raw(new)[0] for old, new in items if old is None and new is not None]

                def undo() -> None:
                    for key in drop:
                        bpf_map.delete(key)
                    for key, value in restore:
                        bpf_map.update(key, value)

                journal.did(f"{where}: {len(items)} entries", undo)
                return len(items)
        except OSError as exc:
            raise KernelError(f"{where}: {exc.strerror or exc}") from exc
        raise InternalError(f"{where}: kernform does not write maps of type {info.type}")

    def _write_ifindex_keyed(self, bpf_map: libbpf.Map, items: list[tuple[BpfMapEntry | None, BpfMapEntry | None]],
                             journal: _Journal, where: str) -> int:
        """Entries keyed by interface name in the desired state, by ifindex in the kernel. An interface
        that does not exist yet cannot receive traffic: its entry waits (TemporaryError after the rest)."""
        count = 0
        for old, new in items:
            entry = new or old
            assert entry is not None
            key = self._ifindex_key(bytes.fromhex(entry.key_hex))
            if key is None:
                if new is not None:
                    name = bytes.fromhex(entry.key_hex).rstrip(b"\0").decode()
                    self._missing_proxies.append(f"interface {name} does not exist in {self._where}")
                continue
            if new is None:
                bpf_map.delete(key)
            else:
                bpf_map.update(key, bytes.fromhex(new.value_hex))
            previous = bytes.fromhex(old.value_hex) if old is not None else None

            def undo(key: bytes = key, previous: bytes | None = previous) -> None:
                if previous is None:
                    bpf_map.delete(key)
                else:
                    bpf_map.update(key, previous)

            journal.did(f"{where}: {entry.key_hex}", undo)
            count += 1
        return count

    def _write_proxies(self, program: BpfProgram, bpf_map: libbpf.Map,
                       items: list[tuple[BpfMapEntry | None, BpfMapEntry | None]], journal: _Journal,
                       raw: Callable[[BpfMapEntry], tuple[bytes, bytes]]) -> int:
        count = 0
        for old, new in items:
            if new is None:
                assert old is not None
                key = raw(old)[0]
                bpf_map.delete(key)
                journal.did(f"proxy slot {key.hex()}", self._proxy_restorer(bpf_map, *raw(old)))
                count += 1
                continue
            key, value = raw(new)
            try:
                self._put_proxy(bpf_map, key, value)
            except _NoListener as missing:
                self._missing_proxies.append(str(missing))
                continue
            if old is None:
                journal.did(f"proxy slot {key.hex()}", self._proxy_restorer(bpf_map, key, None))
            else:
                journal.did(f"proxy slot {key.hex()}", self._proxy_restorer(bpf_map, *raw(old)))
            count += 1
        return count

    def _proxy_restorer(self, bpf_map: libbpf.Map, key: bytes, value: bytes | None) -> Callable[[], None]:
        def undo() -> None:
            if value is None:
                bpf_map.delete(key)
            else:
                self._put_proxy(bpf_map, key, value)

        return undo

    def _put_proxy(self, bpf_map: libbpf.Map, key: bytes, value: bytes) -> None:
        port, proto = bpf_layout.PROXY_SOCKET.unpack(value)
        family = PROXY_FAMILIES.get(bpf_map.info.name)
        if family is None:
            raise InternalError(f"sockmap {bpf_map.info.name} is not one kernform knows how to fill")
        row = self._listener(port, proto, family)
        fd = _socket_fd_of(row.inode)
        if fd is None:
            raise _NoListener(f"the {_PROTO_NAMES.get(proto, proto)} socket on port {port} in {self._where} "
                              "belongs to no process kernform can reach")
        try:
            bpf_map.update(key, struct.pack("=Q", fd))
        finally:
            os.close(fd)

    def _proxy_candidates(self) -> list[_SockRow]:
        try:
            rows = []
            for family in (socket.AF_INET, socket.AF_INET6):
                rows += self._diag.sockets(family, IPPROTO_TCP, 1 << _TCP_LISTEN)
                rows += self._diag.sockets(family, IPPROTO_UDP, 1 << _TCP_CLOSE)
            return rows
        except OSError as exc:
            raise KernelError(f"cannot list sockets in {self._where} (sock_diag): {exc.strerror}") from exc

    def _listener(self, port: int, proto: int, family: int) -> _SockRow:
        """The socket to hand connections of `family` to: for IPv4 an AF_INET socket, else a dual-stack
        AF_INET6 one; for IPv6 an AF_INET6 socket."""
        rows = [r for r in self._proxy_candidates() if r.port == port and r.proto == proto]
        if family == 4:
            usable = [r for r in rows if r.family == socket.AF_INET or not r.v6only]
        else:
            usable = [r for r in rows if r.family == socket.AF_INET6]
        if not usable:
            what = f"{_PROTO_NAMES.get(proto, proto)} port {port}" + (" for IPv6" if family == 6 else "")
            raise _NoListener(f"no proxy listening on {what} in {self._where}")
        return min(usable, key=lambda r: (r.family != socket.AF_INET, r.cookie))

    # ---------------------------------------------------------------- attaching
    def _attach(self, intent: str, item: _Loaded, old_dirs: list[_PinDir], journal: _Journal) -> int:
        count = 0
        for fn, text in item.program.attachments:
            point = parse_point(text)
            if point.uses_link:
                count += self._attach_link(item, fn, point, old_dirs, journal)
            else:
                count += self._attach_tc(intent, item, fn, point, journal)
        return count

    def _tc_filter_name(self, intent: str, program: BpfProgram, fn: str) -> str:
        return f"{PROGRAM_PREFIX}{intent}/{program.name}:{fn}"

    def _attach_tc(self, intent: str, item: _Loaded, fn: str, point: Point, journal: _Journal) -> int:
        ifindex = self._ifindex(point.ifname)
        if ifindex is None:
            raise KernelError(f"{point.text}: there is no interface {point.ifname} in {self._where}")
        parent = _TC_PARENT[point.direction]
        prog_fd, prog_id = item.fds[fn], item.ids[fn]
        slot = self._tc_slot(fn, intent, point, create=True)
        assert slot is not None
        current = self._tc_filter(point, slot)
        name = self._tc_filter_name(intent, item.program, fn)
        where = f"tc filter {point.direction} pref {slot[0]:#x} handle {slot[1]:#x} on {point.ifname} in {self._where}"
        try:
            if current is None:
                if self._tc.add_clsact(ifindex):
                    log.info("added a clsact qdisc to %s in %s", point.ifname, self._where)
                    marker = self._clsact_marker(intent, point.ifname)
                    marker.mkdir(exist_ok=True)
                    journal.did(f"add clsact to {point.ifname}", self._clsact_dropper(ifindex, marker))
                self._tc.set_filter(ifindex, parent, slot, prog_fd, name, replace=False)
                journal.did(f"add {where}", lambda: self._tc.delete_filter(ifindex, parent, slot))
                return 1
            if current.prog_id == prog_id:
                return 0
            if not current.name.startswith(f"{PROGRAM_PREFIX}{intent}/"):
                owner = "kernform intent " + current.name[3:].split("/")[0] if current.name.startswith(
                    PROGRAM_PREFIX) else f"someone else ({current.name or 'no name'})"
                raise KernelError(f"{where} is taken by {owner}; kernform does not overwrite it")
            old_fd = libbpf_prog_fd_by_id(current.prog_id)
            self._tc.set_filter(ifindex, parent, slot, prog_fd, name, replace=True)

            def undo() -> None:
                try:
                    self._tc.set_filter(ifindex, parent, slot, old_fd, current.name, replace=True)
                finally:
                    os.close(old_fd)

            journal.did(f"replace {where}", undo, lambda: os.close(old_fd))
            return 1
        except OSError as exc:
            raise KernelError(f"{where}: {exc.strerror or exc}") from exc

    def _clsact_marker(self, intent: str, ifname: str) -> Path:
        """`clsact:<ifname>`, an empty directory: kernform added the clsact qdisc of that interface."""
        return self._intent_dir(intent) / f"clsact:{_esc(ifname)}"

    def _drop_clsact(self, ifindex: int, marker: Path) -> bool:
        """Deletes a clsact qdisc we added, if no filter (ours or anyone's) is left on it; True if deleted."""
        deleted = False
        if not self._tc.has_filters(ifindex):
            with contextlib.suppress(OSError):  # already gone with its interface
                self._tc.delete_clsact(ifindex)
                deleted = True
        if deleted or not self._tc.has_clsact(ifindex):
            _rmdir_quiet(marker)
        return deleted

    def _clsact_dropper(self, ifindex: int, marker: Path) -> Callable[[], None]:
        def undo() -> None:
            self._drop_clsact(ifindex, marker)

        return undo

    def _sweep_clsacts(self, intent: str) -> int:
        """After an apply: the clsact qdiscs we added and no longer use go; markers of the others are
        dropped once the intent has no program left (the qdisc stays for whoever's filters are on it)."""
        root = self._intent_dir(intent)
        markers = [entry for entry in _listdir(root) if entry.startswith("clsact:")]
        if not markers:
            return 0
        programs_left = bool(self._program_dirs(intent))
        count = 0
        for entry in markers:
            marker = root / entry
            ifindex = self._ifindex(_unesc(entry[len("clsact:") :]))
            if ifindex is None:
                _rmdir_quiet(marker)  # the interface is gone, and its qdisc with it
                continue
            try:
                if self._drop_clsact(ifindex, marker):
                    count += 1
                elif not programs_left:
                    _rmdir_quiet(marker)
            except OSError as exc:
                log.warning("could not check or delete the clsact qdisc of %s in %s: %s",
                            entry[len("clsact:") :], self._where, exc)
        return count

    def _link_target(self, point: Point, create: bool) -> tuple[int, int]:
        """(an fd of the link target, the id the kernel reports for it): netns inode or cgroup id. Caller closes."""
        if point.kind == "netns":
            return os.dup(self._netns_fd), self._netns_ino
        path = self._cgroup() / point.cgroup
        if create and not path.is_dir():
            try:
                path.mkdir(parents=True)
            except OSError as exc:
                raise KernelError(f"{point.text}: cannot create cgroup {path}: {exc.strerror}") from exc
            log.info("created cgroup %s", path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return fd, os.fstat(fd).st_ino

    def _link_state(self, pin: Path, point: Point, prog_id: int | None) -> str:
        """"live" (attached at point, running prog_id), "other-prog" (attached at point), "stale" or "none"."""
        with _opened(pin) as fd:
            if fd is None:
                return "none"
            info = libbpf.link_info(fd)
        if point.kind == "netns":
            target = self._netns_ino
        else:
            try:
                target = os.stat(self._cgroup() / point.cgroup).st_ino
            except (FileNotFoundError, KernelError):
                return "stale"
        if info.target != target or info.attach_type != point.attach_type:
            return "stale"
        return "live" if prog_id is None or info.prog_id == prog_id else "other-prog"

    def _attach_link(self, item: _Loaded, fn: str, point: Point, old_dirs: list[_PinDir],
                     journal: _Journal) -> int:
        pdir = item.pdir
        pin = pdir.link_pin(fn, point.text)
        prog_fd, prog_id = item.fds[fn], item.ids[fn]
        where = f"{fn} at {point.text}" + (f" ({self._where})" if point.kind == "netns" else "")
        try:
            state = self._link_state(pin, point, prog_id)
            if state == "live":
                return 0
            if state == "other-prog":  # our link, someone swapped its program: swap back
                return self._update_link(pin, None, prog_fd, journal, where)
            if state == "stale":
                self._drop_link_pin(pin, journal)
            # A changed program: take over the old directory's live link atomically.
            for old in old_dirs:
                if old.path == pdir.path:
                    continue
                old_pin = old.link_pin(fn, point.text)
                if self._link_state(old_pin, point, None) == "live":
                    return self._update_link(old_pin, pin, prog_fd, journal, where)
            target_fd, _ = self._link_target(point, create=True)
            try:
                link_fd = libbpf.link_create(prog_fd, target_fd, point.attach_type)
            finally:
                os.close(target_fd)
            try:
                libbpf.obj_pin(link_fd, str(pin))
            except BaseException:
                libbpf.link_detach(link_fd)
                os.close(link_fd)
                raise

            def undo() -> None:
                try:
                    libbpf.link_detach(link_fd)
                finally:
                    os.close(link_fd)
                    pin.unlink(missing_ok=True)

            # Our fd would keep the link alive after its pin is gone: let go of it once the apply stands.
            journal.did(f"attach {where}", undo, lambda: os.close(link_fd))
            return 1
        except OSError as exc:
            raise KernelError(f"cannot attach {where}: {exc.strerror or exc}") from exc

    def _update_link(self, pin: Path, new_pin: Path | None, prog_fd: int, journal: _Journal, where: str) -> int:
        link_fd = libbpf.obj_get(str(pin))
        try:
            old_id = libbpf.link_info(link_fd).prog_id
            old_fd = libbpf_prog_fd_by_id(old_id)
        except BaseException:
            os.close(link_fd)
            raise
        try:
            libbpf.link_update(link_fd, prog_fd, old_prog_fd=old_fd)
            if new_pin is not None:
                libbpf.obj_pin(link_fd, str(new_pin))
        except BaseException:
            with contextlib.suppress(OSError):
                libbpf.link_update(link_fd, old_fd)
            os.close(link_fd)
            os.close(old_fd)
            raise

        def undo() -> None:
            try:
                libbpf.link_update(link_fd, old_fd)
                if new_pin is not None:
                    new_pin.unlink(missing_ok=True)
            finally:
                os.close(link_fd)
                os.close(old_fd)

        def release() -> None:
            os.close(link_fd)
            os.close(old_fd)

        journal.did(f"swap {where}", undo, release)
        return 1

    def _drop_link_pin(self, pin: Path, journal: _Journal) -> None:
        """A link whose cgroup or namespace is gone: unpin it (nothing runs through it any more)."""
        link_fd = libbpf.obj_get(str(pin))
        pin.unlink()

        def undo() -> None:
            try:
                libbpf.obj_pin(link_fd, str(pin))
            finally:
                os.close(link_fd)

        journal.did(f"unpin stale {pin}", undo, lambda: os.close(link_fd))

    # ---------------------------------------------------------------- removal
    def _link_ids(self, dirs: Iterable[_PinDir]) -> set[int]:
        ids = set()
        for pdir in dirs:
            for entry in _listdir(pdir.path):
                if entry.startswith("link:"):
                    with _opened(pdir.path / entry) as fd:
                        if fd is not None:
                            ids.add(libbpf.link_info(fd).id)
        return ids

    def _detach_dir(self, intent: str, pdir: _PinDir, kept_links: set[int], journal: _Journal) -> int:
        """Detaches everything of an unwanted program directory (reversibly); its pins stay until _remove_dir."""
        count = 0
        for fn, text in pdir.prog_pins():
            try:
                point = parse_point(text)
            except InternalError:
                continue
            if point.uses_link:
                pin = pdir.link_pin(fn, text)
                with _opened(pin) as fd:
                    if fd is None:
                        continue
                    info = libbpf.link_info(fd)
                if info.id in kept_links:
                    continue  # handed over to the program's new directory
                if self._link_state(pin, point, None) == "live":
                    count += self._detach_link(pin, point, pdir, fn, journal)
                continue
            with _opened(pdir.prog_pin(fn, text)) as fd:
                if fd is None:
                    continue
                prog_id = libbpf.prog_info(fd).id
            found = self._tc_slot(fn, intent, point, create=False)
            if found is None:
                continue  # not attached
            slot = found
            current = self._tc_filter(point, slot)
            if current is None or current.prog_id != prog_id:
                continue  # not attached, or already running the new program
            ifindex = self._ifindex(point.ifname)
            assert ifindex is not None
            parent = _TC_PARENT[point.direction]
            prog_pin = pdir.prog_pin(fn, text)
            try:
                self._tc.delete_filter(ifindex, parent, slot)
            except OSError as exc:
                raise KernelError(f"cannot remove tc filter {point.direction} from {point.ifname} in "
                                  f"{self._where}: {exc.strerror}") from exc

            def undo(ifindex: int = ifindex, parent: int = parent, prog_pin: Path = prog_pin,
                     name: str = current.name, slot: tuple[int, int] = slot) -> None:
                with _opened(prog_pin) as fd:
                    if fd is not None:
                        self._tc.set_filter(ifindex, parent, slot, fd, name, replace=False)

            journal.did(f"remove tc filter on {point.ifname}", undo)
            count += 1
        return count

    def _detach_link(self, pin: Path, point: Point, pdir: _PinDir, fn: str, journal: _Journal) -> int:
        link_fd = libbpf.obj_get(str(pin))
        try:
            libbpf.link_detach(link_fd)
        except OSError as exc:
            os.close(link_fd)
            raise KernelError(f"cannot detach {fn} from {point.text}: {exc.strerror}") from exc
        os.close(link_fd)
        prog_pin = pdir.prog_pin(fn, point.text)

        def undo() -> None:
            # A detached link cannot be revived: attach the old program with a new link.
            pin.unlink(missing_ok=True)
            with _opened(prog_pin) as fd:
                if fd is None:
                    raise KernelError(f"{prog_pin} is gone")
                target_fd, _ = self._link_target(point, create=True)
                try:
                    new_fd = libbpf.link_create(fd, target_fd, point.attach_type)
                finally:
                    os.close(target_fd)
                try:
                    libbpf.obj_pin(new_fd, str(pin))
                finally:
                    os.close(new_fd)

        journal.did(f"detach {fn} from {point.text}", undo)
        return 1

    def _remove_dir(self, pdir: _PinDir) -> int:
        """Unpins a program directory (programs and maps go once nothing else holds them)."""
        cgroups = {parse_point(t).cgroup for _, t in pdir.prog_pins() if t.startswith("cgroup:")}
        try:
            shutil.rmtree(pdir.path)
        except OSError as exc:
            log.error("could not remove %s: %s", pdir.path, exc)
            return 0
        for path in sorted(cgroups, reverse=True):
            self._remove_our_cgroup(path)
        return 1

    def _remove_our_cgroup(self, relative: str) -> None:
        """rmdir a cgroup below <cgroup2>/kernform/ if nothing uses it any more (the kernel refuses if busy)."""
        if not relative.startswith("kernform/"):
            return
        root = self._cgroup()
        path = root / relative
        while path != root:  # up to and including <cgroup2>/kernform itself
            if not path.is_dir():
                path = path.parent
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                return
            try:
                if any(libbpf.prog_query(fd, t) for t in CGROUP_ATTACH_TYPES.values()):
                    return  # someone's program is still attached there
            except OSError:
                return
            finally:
                os.close(fd)
            try:
                path.rmdir()
            except OSError:
                return  # processes or child cgroups in it: not ours to decide
            log.info("removed cgroup %s", path)
            path = path.parent

    # ---------------------------------------------------------------- small kernel helpers
    def _cgroup(self) -> Path:
        if self._cgroup_root is None:
            self._cgroup_root = cgroup2_root()
        return self._cgroup_root

    def _ifindex(self, ifname: str) -> int | None:
        request = struct.pack("16si12x", ifname.encode()[:15], 0)
        try:
            reply = fcntl.ioctl(self._ioctl.fileno(), _SIOCGIFINDEX, request)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise KernelError(f"cannot look up interface {ifname} in {self._where}: {exc.strerror}") from exc
        return int(struct.unpack_from("i", reply, 16)[0])

    def _ifname(self, ifindex: int) -> str | None:
        request = struct.pack("16si12x", b"", ifindex)
        try:
            reply = fcntl.ioctl(self._ioctl.fileno(), _SIOCGIFNAME, request)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise KernelError(f"cannot look up interface {ifindex} in {self._where}: {exc.strerror}") from exc
        return reply[:16].rstrip(b"\0").decode()

    def _tc_slot(self, function: str, intent: str, point: Point, *, create: bool) -> tuple[int, int] | None:
        """(pref, handle) of the intent's filter for `function` at `point`, found by its name; with `create`,
        when it has none, the lowest handle free at that priority (intents never share a filter)."""
        pref = tc_pref(function)
        ifindex = self._ifindex(point.ifname)
        filters: dict[int, str] = {}
        if ifindex is not None:
            try:
                filters = self._tc.list_filters(ifindex, _TC_PARENT[point.direction], pref)
            except OSError as exc:
                raise KernelError(f"cannot read tc filters of {point.ifname} in {self._where}: "
                                  f"{exc.strerror}") from exc
        owner = f"{PROGRAM_PREFIX}{intent}/"
        for handle, name in sorted(filters.items()):
            if name.startswith(owner):
                return pref, handle
        if not create:
            return None
        handle = TC_HANDLE_BASE + 1
        while handle in filters:
            handle += 1
        return pref, handle

    def _tc_filter(self, point: Point, slot: tuple[int, int]) -> _TcFilter | None:
        ifindex = self._ifindex(point.ifname)
        if ifindex is None:
            return None
        try:
            return self._tc.get_filter(ifindex, _TC_PARENT[point.direction], slot)
        except OSError as exc:
            raise KernelError(f"cannot read tc filters of {point.ifname} in {self._where}: {exc.strerror}") from exc


class _NoListener(Exception):
    pass


def _unlinker(path: Path) -> Callable[[], None]:
    return lambda: path.unlink(missing_ok=True)


def _rmdir_empty(*paths: Path) -> None:
    """rmdir each path in turn while they are empty (directories of ours that nothing is left in)."""
    for path in paths:
        if not path.is_dir() or _listdir(path):
            return
        _rmdir_quiet(path)


def _rmdir_quiet(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def libbpf_prog_fd_by_id(prog_id: int) -> int:
    rc = libbpf.lib().bpf_prog_get_fd_by_id(prog_id)
    if rc < 0:
        raise OSError(-rc, f"program id {prog_id}: {os.strerror(-rc)}")
    return int(rc)


def _nonzero_array_entries(values: bytes, size: int) -> list[tuple[bytes, bytes]]:
    """(u32 key, value) of every array slot whose value is not all zeros; zero runs are skipped at C speed."""
    result = []
    block = size * 256
    zero_block = bytes(block)
    zero = bytes(size)
    pack = struct.Struct("<I").pack
    for start in range(0, len(values), block):
        chunk = values[start : start + block]
        if chunk == zero_block[: len(chunk)]:
            continue
        for offset in range(0, len(chunk), size):
            value = chunk[offset : offset + size]
            if value != zero:
                result.append((pack((start + offset) // size), value))
    return result


def _sum_percpu(bpf_map: libbpf.Map, fields: tuple[str, ...] | None) -> dict[int, dict[str, int] | list[int]]:
    """{index: totals over CPUs} of a per-CPU array (index), or hash (its u32 key), non-zero only."""
    slot, ncpus, size = bpf_map.slot_size, bpf_map.ncpus, bpf_map.read_size
    words = bpf_map.info.value_size // 8
    if bpf_map.info.type == libbpf.MAP_PERCPU_ARRAY:
        values = bpf_map.array_values()
        pairs: Iterable[tuple[int, bytes]] = (
            (index, values[index * size : (index + 1) * size]) for index in range(bpf_map.info.max_entries))
    else:
        # a hash's key read as one little-endian number (lb_be_counters: service id | position << 32)
        pairs = ((int.from_bytes(key, "little"), value) for key, value in bpf_map.items())
    result: dict[int, Any] = {}
    fmt = struct.Struct(f"={words}Q")
    for index, value in pairs:
        if not any(value):
            continue
        totals = [0] * words
        for cpu in range(ncpus):
            for i, v in enumerate(fmt.unpack_from(value, cpu * slot)):
                totals[i] += v
        result[index] = dict(zip(fields, totals, strict=False)) if fields else totals
    return result


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Callable[[], str]]:
    """bcc and the verifier write their diagnostics to fd 2; keep them for the error message."""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)

        def text() -> str:
            tmp.seek(0)
            return tmp.read().decode(errors="replace")

        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            leftover = tmp.read()
            if leftover:
                log.debug("bcc said: %s", leftover.decode(errors="replace")[-4000:])


def _tail(stderr: Callable[[], str], lines: int = 25) -> str:
    text = stderr().strip()
    return "\n" + "\n".join(text.splitlines()[-lines:]) if text else ""


# ------------------------------------------------------------------ sockets of other processes
_SYS_PIDFD_GETFD = 438
_libc: ctypes.CDLL | None = None


def _socket_fd_of(inode: int) -> int | None:
    """A new fd (ours) for the socket with this inode, taken from whichever process holds it."""
    global _libc
    target = f"socket:[{inode}]"
    pids = [os.getpid()] + [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd_name in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd_name}") != target:
                    continue
            except OSError:
                continue
            if pid == os.getpid():
                return os.dup(int(fd_name))
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if _libc is None:
                    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(fd_name), 0)
                if fd >= 0:
                    return int(fd)
            finally:
                os.close(pidfd)
    return None


# ------------------------------------------------------------------ netlink: tc and sock_diag
_SIOCGIFINDEX = 0x8933
_SIOCGIFNAME = 0x8910
NETLINK_ROUTE, NETLINK_SOCK_DIAG = 0, 4
SOL_NETLINK, NETLINK_EXT_ACK = 270, 11
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x100, 0x300
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWQDISC, RTM_DELQDISC, RTM_GETQDISC = 36, 37, 38
RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 44, 45, 46
SOCK_DIAG_BY_FAMILY = 20
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS, TCA_BPF_ID = 6, 7, 8, 11
TCA_BPF_FLAG_ACT_DIRECT = 1
NLA_F_NESTED = 0x8000
ETH_P_ALL = 0x0003
TC_H_CLSACT = 0xFFFFFFF1
_TC_PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
_TCP_LISTEN, _TCP_CLOSE = 10, 7
INET_DIAG_SKV6ONLY = 11

_NLMSGHDR = struct.Struct("=IHHII")
_TCMSG = struct.Struct("=BxxxiIII")
_NLA = struct.Struct("=HH")


def _nla(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + bytes((4 - length % 4) % 4)


def _attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    result = {}
    while offset + 4 <= len(data):
        length, kind = _NLA.unpack_from(data, offset)
        if length < 4:
            break
        result[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return result


class _Netlink:
    def __init__(self, protocol: int) -> None:
        self._sock = socket.socket(16, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        with contextlib.suppress(OSError):
            self._sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        self._sock.bind((0, 0))
        self._sock.settimeout(10.0)
        self._seq = 0
        self._lock = threading.Lock()  # one request at a time: replies are matched by sequence number

    def close(self) -> None:
        self._sock.close()

    def transact(self, msg_type: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        """Sends one request; returns the (type, payload) replies. OSError(errno, kernel's message) on NLMSG_ERROR."""
        with self._lock:
            return self._transact(msg_type, flags, body)

    def _transact(self, msg_type: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        self._seq += 1
        seq = self._seq
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags | NLM_F_REQUEST, seq, 0) + body)
        replies: list[tuple[int, bytes]] = []
        while True:
            data = self._sock.recv(1 << 20)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, mflags, mseq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise OSError(errno.EPROTO, "malformed netlink message")
                payload = data[offset + _NLMSGHDR.size : offset + length]
                offset += (length + 3) & ~3
                if mseq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return replies
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code == 0:
                        return replies
                    message = ""
                    if mflags & NLM_F_ACK_TLVS:
                        orig_len = _NLMSGHDR.unpack_from(payload, 4)[0]
                        skip = 4 + (_NLMSGHDR.size if mflags & NLM_F_CAPPED else orig_len)
                        text = _attrs(payload, (skip + 3) & ~3).get(1)
                        message = text.rstrip(b"\0").decode(errors="replace") if text else ""
                    raise OSError(code, f"{os.strerror(code)}" + (f" ({message})" if message else ""))
                replies.append((kind, payload))


@dataclass(frozen=True)
class _TcFilter:
    prog_id: int
    name: str


class _RtnlSocket(_Netlink):
    """clsact qdiscs and kernform's one cls_bpf filter per (interface, direction)."""

    def __init__(self) -> None:
        super().__init__(NETLINK_ROUTE)

    @staticmethod
    def _tcmsg(ifindex: int, handle: int, parent: int, info: int) -> bytes:
        return _TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, parent, info)

    @staticmethod
    def _info(pref: int) -> int:
        return (pref << 16) | socket.htons(ETH_P_ALL)

    def add_clsact(self, ifindex: int) -> bool:
        """Adds clsact if missing; True if it was added."""
        body = self._tcmsg(ifindex, 0xFFFF0000, TC_H_CLSACT, 0) + _nla(TCA_KIND, b"clsact\0")
        try:
            self.transact(RTM_NEWQDISC, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                return False
            raise
        return True

    def get_filter(self, ifindex: int, parent: int, slot: tuple[int, int]) -> _TcFilter | None:
        pref, handle = slot
        body = self._tcmsg(ifindex, handle, parent, self._info(pref)) + _nla(TCA_KIND, b"bpf\0")
        try:
            replies = self.transact(RTM_GETTFILTER, NLM_F_ACK, body)
        except OSError as exc:
            # ENOENT: no such filter; EINVAL: no clsact, or another kind of filter at our priority.
            if exc.errno in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                return None
            raise
        for kind, payload in replies:
            if kind != RTM_NEWTFILTER:
                continue
            _, _, reply_handle, _, _ = _TCMSG.unpack_from(payload)
            attrs = _attrs(payload, _TCMSG.size)
            if reply_handle != handle or attrs.get(TCA_KIND, b"").rstrip(b"\0") != b"bpf":
                continue
            options = _attrs(attrs.get(TCA_OPTIONS, b""))
            prog_id = struct.unpack("=I", options[TCA_BPF_ID][:4])[0] if TCA_BPF_ID in options else 0
            name = options.get(TCA_BPF_NAME, b"").rstrip(b"\0").decode(errors="replace")
            return _TcFilter(prog_id, name)
        return None

    def set_filter(self, ifindex: int, parent: int, slot: tuple[int, int], prog_fd: int, name: str, *,
                   replace: bool) -> None:
        pref, handle = slot
        options = (_nla(TCA_BPF_FD, struct.pack("=I", prog_fd)) + _nla(TCA_BPF_NAME, name.encode() + b"\0")
                   + _nla(TCA_BPF_FLAGS, struct.pack("=I", TCA_BPF_FLAG_ACT_DIRECT)))
        body = (self._tcmsg(ifindex, handle, parent, self._info(pref)) + _nla(TCA_KIND, b"bpf\0")
                + _nla(TCA_OPTIONS | NLA_F_NESTED, options))
        flags = NLM_F_ACK | NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL)
        self.transact(RTM_NEWTFILTER, flags, body)

    def list_filters(self, ifindex: int, parent: int, pref: int) -> dict[int, str]:
        """{handle: bpf name} of the filters at `pref` on a hook ({} without clsact)."""
        try:
            replies = self.transact(RTM_GETTFILTER, NLM_F_DUMP, self._tcmsg(ifindex, 0, parent, pref << 16))
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                return {}
            raise
        result: dict[int, str] = {}
        for kind, payload in replies:
            if kind != RTM_NEWTFILTER:
                continue
            _, _, handle, _, info = _TCMSG.unpack_from(payload)
            if handle == 0 or info >> 16 != pref:
                continue  # the classifier itself, not one of its filters
            attrs = _attrs(payload, _TCMSG.size)
            options = _attrs(attrs.get(TCA_OPTIONS, b""))
            result[handle] = options.get(TCA_BPF_NAME, b"").rstrip(b"\0").decode(errors="replace")
        return result

    def delete_filter(self, ifindex: int, parent: int, slot: tuple[int, int]) -> None:
        pref, handle = slot
        body = self._tcmsg(ifindex, handle, parent, self._info(pref)) + _nla(TCA_KIND, b"bpf\0")
        self.transact(RTM_DELTFILTER, NLM_F_ACK, body)

    def has_clsact(self, ifindex: int) -> bool:
        body = self._tcmsg(ifindex, 0, 0, 0)
        for kind, payload in self.transact(RTM_GETQDISC, NLM_F_DUMP, body):
            _, index, _, parent, _ = _TCMSG.unpack_from(payload)
            if kind == RTM_NEWQDISC and index == ifindex and parent == TC_H_CLSACT:
                return _attrs(payload, _TCMSG.size).get(TCA_KIND, b"").rstrip(b"\0") == b"clsact"
        return False

    def has_filters(self, ifindex: int) -> bool:
        """Whether any filter (of anyone) is on the clsact ingress or egress hook of the interface."""
        for parent in _TC_PARENT.values():
            try:
                replies = self.transact(RTM_GETTFILTER, NLM_F_DUMP, self._tcmsg(ifindex, 0, parent, 0))
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                    continue  # no clsact (or no such hook)
                raise
            if any(kind == RTM_NEWTFILTER for kind, _ in replies):
                return True
        return False

    def delete_clsact(self, ifindex: int) -> None:
        body = self._tcmsg(ifindex, 0xFFFF0000, TC_H_CLSACT, 0) + _nla(TCA_KIND, b"clsact\0")
        self.transact(RTM_DELQDISC, NLM_F_ACK, body)


@dataclass(frozen=True)
class _SockRow:
    family: int
    proto: int
    port: int
    inode: int
    cookie: int
    v6only: bool


class _DiagSocket(_Netlink):
    """inet_diag: the sockets of the namespace, with their cookies (what a sockmap holds)."""

    _REQ = struct.Struct("=BBBxI")  # inet_diag_req_v2 head; the 48-byte sockid follows (zeros: all)
    _MSG = struct.Struct("=BBBB")

    def __init__(self) -> None:
        super().__init__(NETLINK_SOCK_DIAG)

    def sockets(self, family: int, proto: int, states: int) -> list[_SockRow]:
        body = self._REQ.pack(family, proto, 0, states) + bytes(48)
        rows = []
        for kind, payload in self.transact(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, body):
            if kind != SOCK_DIAG_BY_FAMILY or len(payload) < 72:
                continue
            fam = payload[0]
            sport = struct.unpack_from("!H", payload, 4)[0]
            c0, c1 = struct.unpack_from("=II", payload, 44)
            inode = struct.unpack_from("=I", payload, 68)[0]
            attrs = _attrs(payload, 72)
            v6only = bool(attrs.get(INET_DIAG_SKV6ONLY, b"\0")[0]) if fam == socket.AF_INET6 else False
            rows.append(_SockRow(fam, proto, sport, inode, c0 | (c1 << 32), v6only))
        return rows
