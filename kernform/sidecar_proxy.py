"""A real forwarding transparent proxy, Istio-sidecar style, for proving interception end to end.

`kernform.traffic tproxy` answers intercepted connections itself; this proxy
forwards them, which is what a sidecar does and what can go wrong: a proxy
whose own upstream connections are intercepted again loops, a passthrough
connection that inbound rules catch again loops, a missing original
destination sends traffic nowhere. It owns nothing but its sockets and its log.

It listens on an outbound port (15001) and an inbound port (15006), IPv4 and
IPv6 on separate sockets (IP_TRANSPARENT where permitted), learns each
accepted connection's original destination (SO_ORIGINAL_DST first, as the ebpf
backend's outbound path answers it; else getsockname(), which is the original
destination for TPROXY and sk_lookup deliveries), connects onward and relays
bytes both ways. Inbound passthrough connections leave from 127.0.0.6 (Istio's
convention, so the application sees them as local; IPv6 takes the default
source, ::6 is not on lo). Started as root, it binds and then runs as
``--uid``/``--gid`` (1337 by default: the uid an intent excludes from outbound
capture).

Each connection writes one JSON line to ``--log`` once its upstream result is
known: listener (name and port), client, original destination (and how it was learnt),
upstream result (``ok``, ``loop`` or ``error: ...``) and the upstream socket's
local address. ``loop`` means the connection came from one of the proxy's own
upstream sockets: it is refused rather than followed, so a looping rule shows
as a log line instead of exhausting the namespace's ports::

    python -m kernform.sidecar_proxy --log /tmp/proxy.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

from .traffic import IP_TRANSPARENT, IPV6_TRANSPARENT, SOL_IP, SOL_IPV6, endpoint, hostport, original_destination

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
PROXY_UID = 1337
INBOUND_SOURCE_V4 = "127.0.0.6"
BACKLOG = 1024
CHUNK = 65536


def listener(family: socket.AddressFamily, port: int) -> socket.socket:
    """A listening TCP socket on the wildcard address of ``family``, transparent when we may."""
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # One socket per family: IPv4 arrives on the IPv4 socket with plain addresses.
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    with contextlib.suppress(PermissionError):
        if family == socket.AF_INET6:
            s.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        else:
            s.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    s.listen(BACKLOG)
    return s


def drop_privileges(uid: int, gid: int) -> None:
    """Become uid/gid for good (after binding): the intent's exclusion must see the proxy's real owner."""
    if os.getuid() != 0:
        return
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


class SidecarProxy:
    """Accepts on the listeners, forwards each connection to its original destination, logs one line each."""

    def __init__(self, listeners: dict[socket.socket, str], log: TextIO, *, inbound_source: str | None,
                 connect_timeout: float) -> None:
        self.listeners = listeners
        self.log = log
        self.inbound_source = inbound_source
        self.connect_timeout = connect_timeout
        self.lock = threading.Lock()
        # (family, port) of our own upstream sockets: a connection coming from one of them is a loop.
        self.upstream_ports: set[tuple[int, int]] = set()
        self.listener_ports = {name: s.getsockname()[1] for s, name in listeners.items()}
        self.own_ports = set(self.listener_ports.values())

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        for s in self.listeners:
            sel.register(s, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                lsock = key.fileobj
                assert isinstance(lsock, socket.socket)
                try:
                    conn, _peer = lsock.accept()
                except OSError:
                    continue
                threading.Thread(target=self._handle, args=(conn, self.listeners[lsock]), daemon=True).start()

    def _write(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()

    def _handle(self, conn: socket.socket, name: str) -> None:
        with conn:
            peer = endpoint(conn.getpeername())
            local = endpoint(conn.getsockname())
            learnt = original_destination(conn)
            original, via = (learnt, "SO_ORIGINAL_DST") if learnt is not None else (local, "getsockname")
            record: dict[str, Any] = {
                "listener": name,
                "listener_port": self.listener_ports[name],
                "family": 6 if conn.family == socket.AF_INET6 else 4,
                "client": hostport(*peer),
                "client_ip": peer[0],
                "client_port": peer[1],
                "local": hostport(*local),
                "original_dst": hostport(*original),
                "original_dst_via": via,
                "uid": os.getuid(),
                "time": time.time(),
            }
            family = conn.family
            with self.lock:
                looped = (family, peer[1]) in self.upstream_ports
            if looped or (original[1] in self.own_ports and original == local):
                record["upstream"] = "loop"
                self._write(record)
                return
            source = self.inbound_source if name == "inbound" and family == socket.AF_INET else None
            with socket.socket(family, socket.SOCK_STREAM) as upstream:
                key: tuple[int, int] | None = None
                try:
                    # Bind first so the port is known before the SYN leaves: a looping rule can bring
                    # the connection back to us before connect() returns.
                    upstream.bind((source or ("::" if family == socket.AF_INET6 else "0.0.0.0"), 0))
                    key = (family, upstream.getsockname()[1])
                    with self.lock:
                        self.upstream_ports.add(key)
                    upstream.settimeout(self.connect_timeout)
                    upstream.connect(original)
                    upstream.settimeout(None)
                except OSError as exc:
                    record["upstream"] = f"error: {exc.strerror or exc}"
                    self._write(record)
                    self._forget(key)
                    return
                record["upstream"] = "ok"
                record["upstream_local"] = hostport(*endpoint(upstream.getsockname()))
                self._write(record)
                try:
                    _relay(conn, upstream)
                finally:
                    self._forget(key)

    def _forget(self, key: tuple[int, int] | None) -> None:
        if key is not None:
            with self.lock:
                self.upstream_ports.discard(key)


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until both directions are closed; half-closes are passed on."""
    sel = selectors.DefaultSelector()
    peers = {a: b, b: a}
    for s in peers:
        sel.register(s, selectors.EVENT_READ)
    open_reads = 2
    while open_reads:
        events = sel.select(timeout=30.0)
        if not events:
            return  # idle for 30 s: give up
        for key, _ in events:
            src = key.fileobj
            assert isinstance(src, socket.socket)
            try:
                data = src.recv(CHUNK)
            except OSError:
                data = b""
            dst = peers[src]
            if data:
                try:
                    dst.sendall(data)
                except OSError:
                    return
                continue
            sel.unregister(src)
            open_reads -= 1
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kernform.sidecar_proxy", description=__doc__.split("\n", 1)[0])
    p.add_argument("--outbound-port", type=int, default=OUTBOUND_PORT)
    p.add_argument("--inbound-port", type=int, default=INBOUND_PORT)
    p.add_argument("--log", required=True, help="append one JSON line per connection here")
    p.add_argument("--uid", type=int, default=PROXY_UID, help="run as this uid after binding (when root)")
    p.add_argument("--gid", type=int, default=PROXY_UID)
    p.add_argument("--inbound-source", default=INBOUND_SOURCE_V4,
                   help="IPv4 source of inbound passthrough connections ('' for the default)")
    p.add_argument("--connect-timeout", type=float, default=3.0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    listeners: dict[socket.socket, str] = {}
    for name, port in (("outbound", args.outbound_port), ("inbound", args.inbound_port)):
        for family in (socket.AF_INET, socket.AF_INET6):
            listeners[listener(family, port)] = name
    log = open(args.log, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    drop_privileges(args.uid, args.gid)
    proxy = SidecarProxy(listeners, log, inbound_source=args.inbound_source or None,
                         connect_timeout=args.connect_timeout)
    with contextlib.suppress(KeyboardInterrupt):
        proxy.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
