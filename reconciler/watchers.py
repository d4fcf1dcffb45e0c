"""What wakes the daemon: the intent file changing, kernel objects changing, and the debouncer in between.

This module owns the daemon's event sources. None of them carries state into
a pass: an event only says "look again" (`Debouncer.mark`), and the pass
re-reads the file and the kernel from scratch. That is why an event may be
lost, doubled or spurious without harm: a lost one is caught by the periodic
resync, a spurious one costs a pass that finds nothing to do.

- `Debouncer`: collects reasons and hands them to the worker once things have
  been quiet for a short delay, so a burst of saves is one pass over the
  newest content. A write in progress holds passes back until the writer
  closes the file, so a pass never reads half a file.
- `FileWatcher`: watchdog (inotify) on the directory that holds the file,
  because files are replaced far more often than written in place: editors
  save by rename, Kubernetes swaps a `..data` symlink, people delete and
  re-create. Events naming the file are taken as they come; any other event in
  the directory counts when what the path resolves to changed (device, inode,
  size, mtime), which is how a symlink swap shows.
- `KernelEvents`: one thread reading two netlink sockets opened inside the
  target namespace: rtnetlink (routes, rules, links, addresses) and
  nfnetlink's NFNLGRP_NFTABLES (every committed nft transaction). Only events
  touching what the intent owns wake the daemon, and not those the daemon
  caused itself: rtnetlink notifications carry the port id of the socket that
  made the change, nft transactions end with a NEWGEN message naming the
  committing thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from compiler.errors import KernelError
from compiler.objects import RTPROT_KERNFORM

from .netns import entered

log = logging.getLogger(__name__)


# --------------------------------------------------------------- debouncing
class Debouncer:
    """Reasons to run a pass, handed over once no new one has come for `delay` seconds.

    `max_wait` bounds how long a steady stream of events can put a pass off.
    `urgent` marks (a signal) skip the delay. `hold(seconds)` says a write is
    in progress: no pass until `release()` or until the hold runs out.
    """

    MAX_REASONS = 32

    def __init__(self, delay: float, max_wait: float = 1.0) -> None:
        self.delay = delay
        self.max_wait = max(max_wait, delay)
        self._cond = threading.Condition()
        self._reasons: dict[str, None] = {}
        self._first = 0.0
        self._last = 0.0
        self._urgent = False
        self._hold_until = 0.0

    def mark(self, reason: str, *, urgent: bool = False) -> None:
        with self._cond:
            now = time.monotonic()
            if not self._reasons:
                self._first = now
            if len(self._reasons) < self.MAX_REASONS:
                self._reasons[reason] = None
            self._last = now
            self._urgent |= urgent
            self._cond.notify_all()

    def hold(self, seconds: float) -> None:
        with self._cond:
            self._hold_until = time.monotonic() + seconds
            self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._hold_until = 0.0
            self._cond.notify_all()

    @property
    def pending(self) -> bool:
        with self._cond:
            return bool(self._reasons)

    def _due(self) -> float:
        if self._urgent:
            return 0.0
        return max(min(self._last + self.delay, self._first + self.max_wait), self._hold_until)

    def wait(self, timeout: float | None = None) -> tuple[str, ...]:
        """The reasons collected, once they are due; () when `timeout` passes with none pending."""
        end = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        with self._cond:
            while True:
                now = time.monotonic()
                if self._reasons:
                    due = self._due()
                    if now >= due:
                        reasons = tuple(self._reasons)
                        self._reasons.clear()
                        self._urgent = False
                        return reasons
                    pause: float | None = due - now
                elif end is not None and now >= end:
                    return ()
                else:
                    pause = None if end is None else end - now
                self._cond.wait(pause)


# ------------------------------------------------------------- the file
Fingerprint = tuple[int, int, int, int] | None


def fingerprint(path: Path) -> Fingerprint:
    """What `path` resolves to now (device, inode, size, mtime), or None when it does not resolve."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _DirectoryHandler(FileSystemEventHandler):
    def __init__(self, watcher: FileWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._watcher.handle(event)
        except Exception:  # never let the observer thread die: the resync would be all that is left
            log.exception("file watcher: error handling %s", event)


class FileWatcher:
    """Calls `on_change(reason)` when the file at `path` may hold something new, `on_writing()` while it is written.

    The file may be missing at start or at any time; its directory must exist.
    """

    EVENTS: list[type[FileSystemEvent]] = [
        FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent,
        DirCreatedEvent, DirDeletedEvent, DirMovedEvent,
    ]

    def __init__(self, path: Path, on_change: Callable[[str], None],
                 on_writing: Callable[[], None] | None = None) -> None:
        self.path = Path(os.path.abspath(path))
        self.directory = self.path.parent
        self.name = self.path.name
        self._on_change = on_change
        self._on_writing = on_writing or (lambda: None)
        self._last = fingerprint(self.path)
        self._target = os.path.realpath(self.path)
        self._lock = threading.Lock()
        self._observer: Observer | None = None  # type: ignore[valid-type]

    def start(self) -> None:
        if not self.directory.is_dir():
            raise KernelError(f"cannot watch {self.path}: the directory {self.directory} does not exist")
        observer = Observer()
        observer.schedule(_DirectoryHandler(self), str(self.directory), recursive=False, event_filter=self.EVENTS)
        # The file may be a symlink into another directory (not the ConfigMap kind, whose
        # target is a sibling directory that changes with every swap): watch there too.
        target_dir = Path(self._target).parent
        if target_dir not in (self.directory, self.directory.parent) and target_dir.parent != self.directory \
                and target_dir.is_dir():
            observer.schedule(_DirectoryHandler(self), str(target_dir), recursive=False, event_filter=self.EVENTS)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            # watchdog logs a harmless race between its reader and stop() as an error.
            logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _names_file(self, path: str | bytes) -> bool:
        text = os.path.abspath(os.fsdecode(path))
        return text == str(self.path) or text == self._target

    def handle(self, event: FileSystemEvent) -> None:
        """One directory event (called from watchdog's thread; public for tests)."""
        with self._lock:
            ours = self._names_file(event.src_path) or (
                isinstance(event, FileMovedEvent | DirMovedEvent) and self._names_file(event.dest_path)
            )
            self._target = os.path.realpath(self.path)
            now = fingerprint(self.path)
            changed = now != self._last
            self._last = now
        if ours and not event.is_directory:
            if isinstance(event, FileModifiedEvent):
                self._on_writing()
                return
            if isinstance(event, FileCreatedEvent) and not os.path.islink(self.path) and now is not None:
                # open(O_CREAT): the content follows, then a close; hold until then.
                self._on_writing()
                return
            what = {FileClosedEvent: "saved", FileCreatedEvent: "created", FileDeletedEvent: "deleted",
                    FileMovedEvent: "replaced"}.get(type(event), event.event_type)
            if isinstance(event, FileMovedEvent) and self._names_file(event.src_path) and now is None:
                what = "moved away"
            self._on_change(f"file {what}")
        elif changed:
            # A symlink swap (Kubernetes ..data), or the directory itself moved under us.
            self._on_change("file replaced" if now is not None else "file deleted")


# ------------------------------------------------------------ netlink plumbing
_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_BE32 = struct.Struct("!I")
NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 2, 3, 4
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_ROUTE, NETLINK_NETFILTER = 0, 12
_RCVBUF = 16 << 20


def netlink_messages(data: bytes | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(type, sender port id, payload) of each message in one datagram."""
    view = memoryview(data)
    offset = 0
    while offset + _NLMSGHDR.size <= len(view):
        length, kind, _, _, pid = _NLMSGHDR.unpack_from(view, offset)
        if length < _NLMSGHDR.size or offset + length > len(view):
            return
        yield kind, pid, view[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3


def attributes(payload: memoryview, offset: int) -> dict[int, memoryview]:
    """Top-level attributes after a fixed header of `offset` bytes (first occurrence of each type)."""
    found: dict[int, memoryview] = {}
    while offset + _NLATTR.size <= len(payload):
        length, kind = _NLATTR.unpack_from(payload, offset)
        if length < _NLATTR.size:
            break
        found.setdefault(kind & 0x3FFF, payload[offset + _NLATTR.size : offset + length])
        offset += (length + 3) & ~3
    return found


def _string(value: memoryview | None) -> str:
    return bytes(value).split(b"\0", 1)[0].decode(errors="replace") if value is not None else ""


def _u32(value: memoryview | None, default: int = 0) -> int:
    return int(_U32.unpack_from(value)[0]) if value is not None and len(value) >= 4 else default


# ---------------------------------------------------------------- rtnetlink
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_RULE = 8, 19
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 20, 21
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE = 24, 25, 32, 33
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg and fib_rule_hdr share this layout
RTA_DST, RTA_TABLE = 1, 15
FRA_PRIORITY, FRA_TABLE, FRA_PROTOCOL = 6, 15, 21
_AF_NAMES = {socket.AF_INET: 4, socket.AF_INET6: 6}


@dataclass(frozen=True)
class WatchScope:
    """What the daemon owns now: kernel events about anything else are ignored."""

    nft_table: str | None = None
    routing_tables: frozenset[int] = frozenset()


def route_event(kind: int, pid: int, payload: memoryview, scope: WatchScope,
                own_ports: frozenset[int]) -> str | None:
    """A description of an rtnetlink event that concerns `scope` and was not our own doing, else None."""
    if kind in (RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR):
        # Routes vanish silently with their device or address: recheck whenever links or addresses change.
        if not scope.routing_tables:
            return None
        return {RTM_NEWLINK: "link changed", RTM_DELLINK: "link removed",
                RTM_NEWADDR: "address added", RTM_DELADDR: "address removed"}[kind]
    if kind not in (RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE) or len(payload) < _RTMSG.size:
        return None
    if pid and pid in own_ports:
        return None
    family, dst_len, _, _, table, protocol, _, _, _ = _RTMSG.unpack_from(payload)
    attrs = attributes(payload, _RTMSG.size)
    table = _u32(attrs.get(RTA_TABLE), table)  # RTA_TABLE == FRA_TABLE
    verb = "added/changed" if kind in (RTM_NEWROUTE, RTM_NEWRULE) else "deleted"
    version = _AF_NAMES.get(family, family)
    if kind in (RTM_NEWROUTE, RTM_DELROUTE):
        if table not in scope.routing_tables:
            return None
        dst = attrs.get(RTA_DST)
        prefix = f"{socket.inet_ntop(family, bytes(dst))}/{dst_len}" if dst is not None and family in _AF_NAMES \
            else "default"
        return f"ipv{version} route {prefix} table {table} {verb} (protocol {protocol})"
    protocol = attrs[FRA_PROTOCOL][0] if FRA_PROTOCOL in attrs and len(attrs[FRA_PROTOCOL]) else 0
    if table not in scope.routing_tables and protocol != RTPROT_KERNFORM:
        return None
    return f"ipv{version} rule priority {_u32(attrs.get(FRA_PRIORITY))} table {table} {verb} (protocol {protocol})"


# ----------------------------------------------------------------- nftables
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN, NFT_MSG_TRACE = 15, 17
NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 2, 3
_NFGENMSG_SIZE = 4
_NFT_OBJECTS = {0: "table", 2: "table", 3: "chain", 5: "chain", 6: "rule", 8: "rule", 9: "set", 11: "set",
                12: "set element", 14: "set element", 18: "object", 20: "object"}


@dataclass
class NftBatchReader:
    """Follows nft transactions message by message; each ends with NEWGEN naming who committed it."""

    touched: dict[str, set[str]] = field(default_factory=dict)  # table -> kinds of objects changed

    def feed(self, kind: int, payload: memoryview, scope: WatchScope, own_names: frozenset[str]) -> str | None:
        """A description when a transaction by someone else touched our table has just ended, else None."""
        if kind >> 8 != NFNL_SUBSYS_NFTABLES:
            return None
        message = kind & 0xFF
        if message == NFT_MSG_NEWGEN:
            attrs = attributes(payload, _NFGENMSG_SIZE)
            committer = _string(attrs.get(NFTA_GEN_PROC_NAME))
            pid = int(_BE32.unpack_from(attrs[NFTA_GEN_PROC_PID])[0]) if NFTA_GEN_PROC_PID in attrs else 0
            touched, self.touched = self.touched, {}
            if scope.nft_table is None or scope.nft_table not in touched or committer in own_names:
                return None
            what = ", ".join(sorted(touched[scope.nft_table]))
            return f"nft table {scope.nft_table} changed ({what}) by {committer or '?'} (pid {pid})"
        if message == NFT_MSG_TRACE:
            return None
        table = _string(attributes(payload, _NFGENMSG_SIZE).get(1))  # NFTA_*_TABLE is attribute 1 in every kind
        self.touched.setdefault(table, set()).add(_NFT_OBJECTS.get(message, f"message {message}"))
        return None


# ----------------------------------------------------------- the listener
class KernelEvents:
    """Reads kernel notifications in the target namespace and calls `on_event(description)` for relevant ones.

    `scope()` says what the daemon owns now; `own_ports()` the rtnetlink port
    ids its changes carry; `own_names` the thread names (comm) nft
    transactions of the daemon are committed under.
    """

    def __init__(self, netns: str | None, on_event: Callable[[str], None], scope: Callable[[], WatchScope],
                 own_ports: Callable[[], frozenset[int]], own_names: frozenset[str]) -> None:
        self.netns = netns
        self._on_event = on_event
        self._scope = scope
        self._own_ports = own_ports
        self._own_names = frozenset(name[:15] for name in own_names)  # TASK_COMM_LEN
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._sockets: list[socket.socket] = []

    def start(self) -> None:
        """Subscribe (inside the namespace) before returning, so no change after this call goes unseen."""
        with entered(self.netns):
            try:
                route = self._socket(NETLINK_ROUTE, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE
                                     | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE)
                for group in (RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_RULE):
                    route.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
                nft = self._socket(NETLINK_NETFILTER, 0)
                nft.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            except OSError as exc:
                self.close()
                raise KernelError(f"cannot subscribe to kernel events: {exc.strerror}") from exc
        self._thread = threading.Thread(target=self._run, args=(route, nft), name="kernform-events", daemon=True)
        self._thread.start()

    def _socket(self, protocol: int, groups: int) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        self._sockets.append(sock)
        try:
            # A big initial apply sends one notification per set element: make room (root may force it).
            sock.setsockopt(socket.SOL_SOCKET, 33, _RCVBUF)  # SO_RCVBUFFORCE
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        sock.bind((0, groups))
        sock.setblocking(False)
        return sock

    def stop(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            self._thread.join(timeout=5)
            self._thread = None
        self.close()

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _run(self, route: socket.socket, nft: socket.socket) -> None:
        nft_batches = NftBatchReader()
        buffer = bytearray(1 << 18)
        with selectors.DefaultSelector() as selector:
            selector.register(route, selectors.EVENT_READ, "route")
            selector.register(nft, selectors.EVENT_READ, "nft")
            selector.register(self._wake_r, selectors.EVENT_READ, "stop")
            while True:
                for key, _ in selector.select():
                    if key.data == "stop":
                        return
                    sock = route if key.data == "route" else nft
                    try:
                        self._drain(key.data, sock, buffer, nft_batches)
                    except Exception:  # keep listening; the resync is the safety net
                        log.exception("kernel events: error reading %s notifications", key.data)
                        self._on_event(f"{key.data} notifications unreadable")

    def _drain(self, source: str, sock: socket.socket, buffer: bytearray, nft_batches: NftBatchReader) -> None:
        view = memoryview(buffer)
        while True:
            try:
                size = sock.recv_into(buffer)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # Notifications were dropped: we cannot know what changed, so look at everything.
                    nft_batches.touched.clear()
                    self._on_event(f"{source} notifications overflowed")
                    continue
                raise
            scope = self._scope()
            for kind, pid, payload in netlink_messages(view[:size]):
                if kind in (NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN):
                    continue
                if source == "route":
                    what = route_event(kind, pid, payload, scope, self._own_ports())
                else:
                    what = nft_batches.feed(kind, payload, scope, self._own_names)
                if what is not None:
                    self._on_event(what)
