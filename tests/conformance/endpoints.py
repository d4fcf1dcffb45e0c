"""Traffic endpoints of the conformance suite, run inside its namespaces (stdlib only).

One process serves many ports, so the suite's servers cost a few processes:

    endpoints.py serve tcp:8080:app udp:7054:fs sink:7009:fs ...

- ``tcp:PORT:NAME`` answers the first line of each connection with one JSON
  object in ``kernform.traffic``'s format (server, client_ip/port, local_ip/port),
  so ``python -m kernform.traffic get`` is its client;
- ``udp:PORT:NAME`` answers each datagram the same way;
- ``sink:PORT:NAME`` reads until the client half-closes and answers the byte count.

Every port listens on 0.0.0.0 and on :: (IPv6 only), so IPv4 peers are plain addresses.

Client tools print one JSON object:

    endpoints.py burst HOST PORT N [--source S] [--wait 0.8]     N connects at once: how many completed
    endpoints.py udpburst HOST PORT N [--source S] [--wait 1.0] [--prime]   N datagrams from one socket: replies
    endpoints.py upload HOST PORT BYTES [--source S]             one connection: bytes acknowledged, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import select
import socket
import sys
import threading
import time
from typing import Any


def _plain(ip: str) -> str:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _reply(name: str, peer: Any, local: Any, **extra: Any) -> bytes:
    pip, pport = _plain(peer[0]), int(peer[1])
    lip, lport = _plain(local[0]), int(local[1])
    body = {"server": name, **extra, "client": _hostport(pip, pport), "local": _hostport(lip, lport),
            "client_ip": pip, "client_port": pport, "local_ip": lip, "local_port": lport}
    return (json.dumps(body) + "\n").encode()


def _sockets(kind: socket.SocketKind, port: int) -> list[socket.socket]:
    out = []
    for family, wildcard in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((wildcard, port))
        if kind == socket.SOCK_STREAM:
            s.listen(1024)
        out.append(s)
    return out


def _serve_conn(conn: socket.socket, name: str, sink: bool) -> None:
    with conn:
        conn.settimeout(30)
        peer, local = conn.getpeername(), conn.getsockname()
        total, buf = 0, b""
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                total += len(data)
                if not sink:
                    buf += data
                    if b"\n" in buf:
                        break
            conn.sendall(_reply(name, peer, local, bytes=total) if sink else _reply(name, peer, local))
            conn.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                conn.recv(65536)  # so close() sends FIN, not RST
        except OSError:
            pass


def serve(specs: list[str]) -> None:
    readers: dict[socket.socket, tuple[str, str]] = {}
    for spec in specs:
        kind, port, name = spec.split(":")
        for s in _sockets(socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM, int(port)):
            readers[s] = (kind, name)
    while True:
        ready, _, _ = select.select(list(readers), [], [])
        for s in ready:
            kind, name = readers[s]
            try:
                if kind == "udp":
                    _data, peer = s.recvfrom(65536)
                    s.sendto(_reply(name, peer, s.getsockname()), peer)
                else:
                    conn, _ = s.accept()
                    threading.Thread(target=_serve_conn, args=(conn, name, kind == "sink"), daemon=True).start()
            except OSError:
                continue


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def burst(host: str, port: int, n: int, source: str | None, wait: float) -> dict[str, Any]:
    """N connection attempts at once; the count that completed within `wait` (below the 1 s SYN retry)."""
    socks = []
    for _ in range(n):
        s = socket.socket(_family(host), socket.SOCK_STREAM)
        s.setblocking(False)
        if source:
            s.bind((source, 0))
        s.connect_ex((host, port))
        socks.append(s)
    pending, connected, failed = set(socks), 0, 0
    deadline = time.monotonic() + wait
    while pending and time.monotonic() < deadline:
        _, writable, _ = select.select([], list(pending), [], max(0.0, deadline - time.monotonic()))
        for s in writable:
            pending.discard(s)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                connected += 1
            else:
                failed += 1
    for s in socks:
        s.close()
    return {"attempted": n, "connected": connected, "failed": failed, "pending": len(pending)}


def udpburst(host: str, port: int, n: int, source: str | None, wait: float, prime: bool) -> dict[str, Any]:
    """N datagrams from one socket, as fast as it sends; how many were answered within `wait`.
    With `prime`, one datagram and its answer first, so a stateful firewall has seen the flow's reply."""
    with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
        if source:
            s.bind((source, 0))
        s.connect((host, port))
        if prime:
            s.settimeout(wait)
            s.send(b"ping\n")
            try:
                s.recv(65536)
            except (TimeoutError, ConnectionRefusedError):
                return {"sent": 0, "answered": 0, "primed": False}
        for _ in range(n):
            s.send(b"ping\n")
        answered, deadline = 0, time.monotonic() + wait
        while time.monotonic() < deadline:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                s.recv(65536)
            except (TimeoutError, ConnectionRefusedError):
                continue
            answered += 1
    return {"sent": n, "answered": answered}


def upload(host: str, port: int, size: int, source: str | None, timeout: float) -> dict[str, Any]:
    """One connection carrying `size` bytes; the server's count and the time it took."""
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout,
                                      source_address=(source, 0) if source else None) as s:
            block = b"x" * 65536
            left = size
            while left:
                left -= s.send(block[: min(left, len(block))])
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while True:
                data = s.recv(65536)
                if not data:
                    break
                reply += data
        body = json.loads(reply.decode().splitlines()[0])
        return {"sent": size, "received": body.get("bytes"), "seconds": time.monotonic() - start,
                "client_ip": body.get("client_ip")}
    except (OSError, ValueError, IndexError) as exc:
        return {"sent": size, "error": str(exc) or type(exc).__name__, "seconds": time.monotonic() - start}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve").add_argument("specs", nargs="+")
    for name in ("burst", "udpburst", "upload"):
        c = sub.add_parser(name)
        c.add_argument("host")
        c.add_argument("port", type=int)
        c.add_argument("n", type=int)
        c.add_argument("--source")
        c.add_argument("--wait", type=float, default=1.0)
        c.add_argument("--timeout", type=float, default=10.0)
        c.add_argument("--prime", action="store_true")
    args = p.parse_args()
    if args.cmd == "serve":
        serve(args.specs)
        return 0
    if args.cmd == "burst":
        result = burst(args.host, args.port, args.n, args.source, args.wait)
    elif args.cmd == "udpburst":
        result = udpburst(args.host, args.port, args.n, args.source, args.wait, args.prime)
    else:
        result = upload(args.host, args.port, args.n, args.source, args.timeout)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
