"""Kernel change notifications for the daemon: the only code that listens to the kernel.

`KernelEvents` is one thread reading two netlink sockets opened inside the
target namespace: rtnetlink (routes, rules, links, addresses) and nfnetlink's
NFNLGRP_NFTABLES (every committed nft transaction). Only events touching what
the intent owns wake the daemon, and not those the daemon caused itself:
rtnetlink notifications carry the port id of the socket that made the change,
nft transactions end with a NEWGEN message naming the committing thread. An
event carries no state into a pass; it only says "look again".
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from compiler.errors import KernelError
from compiler.objects import RTPROT_KERNFORM

from ..netns import entered

log = logging.getLogger(__name__)

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

    nft_tables: frozenset[str] = frozenset()
    routing_tables: frozenset[int] = frozenset()
    # The desired state depends on the namespace's links and addresses (interface names resolved to
    # ifindexes, the mirror of local addresses): any change of them calls for a pass.
    links_and_addresses: bool = False


def route_event(kind: int, pid: int, payload: memoryview, scope: WatchScope,
                own_ports: frozenset[int]) -> str | None:
    """A description of an rtnetlink event that concerns `scope` and was not our own doing, else None."""
    if kind in (RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR):
        # Routes vanish silently with their device or address: recheck whenever links or addresses change.
        if not scope.routing_tables and not scope.links_and_addresses:
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
            ours = sorted(scope.nft_tables.intersection(touched))
            if not ours or committer in own_names:
                return None
            what = ", ".join(sorted(set().union(*(touched[t] for t in ours))))
            return f"nft table {', '.join(ours)} changed ({what}) by {committer or '?'} (pid {pid})"
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
