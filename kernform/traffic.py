"""Small real traffic endpoints: a server, a transparent-proxy listener and a client.

This module owns the wire format that the lab, the demo and the end-to-end
tests use to prove where a connection went: every server answers one JSON
object naming itself, the peer it saw and the local address the connection
reached. A backend that reports the client's real address proves there was no
NAT; a transparent proxy that reports the original destination proves the
connection was intercepted; a wan namespace answering by name proves which
uplink carried it.

Stdlib only, so it runs inside any namespace with nothing but the interpreter::

    python -m kernform.traffic serve --name b1 --port 8080
    python -m kernform.traffic tproxy --port 15001
    python -m kernform.traffic get 10.70.2.11 8080 --count 100
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import re
import selectors
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Linux socket options the stdlib does not always name (include/uapi/linux/in.h, in6.h).
SOL_IP = 0
SOL_IPV6 = 41
IP_TRANSPARENT = 19
IP_PKTINFO = 8
IP_RECVORIGDSTADDR = 20  # also the cmsg type IP_ORIGDSTADDR
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50
IPV6_TRANSPARENT = 75
IPV6_RECVORIGDSTADDR = 74  # also the cmsg type IPV6_ORIGDSTADDR

BACKLOG = 4096
MAX_REQUEST = 64 * 1024
IDLE_TIMEOUT = 10.0  # seconds a silent TCP client may hold a connection
_HTTP_REQUEST_LINE = re.compile(rb"^[A-Z]+ \S+ HTTP/\d\.\d\r?$")

# Exit codes of `get`, distinct so scripts can tell a drop from a rejection.
EXIT_OK, EXIT_ERROR, EXIT_REFUSED, EXIT_TIMEOUT = 0, 1, 2, 3


def command(*args: str) -> list[str]:
    """The argv that runs this module with ``args`` under the current interpreter (for ``lab.run_in``)."""
    return [sys.executable, "-m", "kernform.traffic", *args]


# --------------------------------------------------------------------------- addresses


def unmap(ip: str) -> str:
    """``::ffff:10.0.0.1`` -> ``10.0.0.1``: a dual-stack socket reports IPv4 peers as mapped addresses."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def endpoint(sockaddr: tuple[Any, ...]) -> tuple[str, int]:
    """(ip, port) of a socket address, IPv4-mapped addresses unmapped."""
    return unmap(str(sockaddr[0])), int(sockaddr[1])


def hostport(ip: str, port: int) -> str:
    """``10.0.0.1:80`` or ``[fd00::1]:80``."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def split_hostport(text: str) -> tuple[str, int]:
    """Inverse of :func:`hostport`."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _reply(name: str, peer: tuple[str, int], local: tuple[str, int], **extra: Any) -> dict[str, Any]:
    # "client"/"local" are the documented fields; the split forms save every
    # consumer from parsing "[v6]:port".
    return {
        "server": name,
        **extra,
        "client": hostport(*peer),
        "local": hostport(*local),
        "client_ip": peer[0],
        "client_port": peer[1],
        "local_ip": local[0],
        "local_port": local[1],
    }


# --------------------------------------------------------------------------- server loop


# (peer, local address, original destination if SO_ORIGINAL_DST answered) -> reply body
Responder = Callable[[tuple[str, int], tuple[str, int], "tuple[str, int] | None"], dict[str, Any]]
SO_ORIGINAL_DST = 80  # also IP6T_SO_ORIGINAL_DST at SOL_IPV6


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """SO_ORIGINAL_DST: answered by netfilter NAT or by kernform's eBPF getsockopt hook; None when neither applies."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
            port = int.from_bytes(raw[2:4], "big")
            ip = unmap(socket.inet_ntop(socket.AF_INET6, raw[8:24]))
        else:
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
            port = int.from_bytes(raw[2:4], "big")
            ip = socket.inet_ntop(socket.AF_INET, raw[4:8])
    except OSError:
        return None
    return ip, port


@dataclass
class _Conn:
    sock: socket.socket
    peer: tuple[str, int]
    local: tuple[str, int]
    respond: Responder
    original: tuple[str, int] | None = None
    inbuf: bytearray = field(default_factory=bytearray)
    out: bytes = b""
    last: float = field(default_factory=time.monotonic)


def _request_complete(buf: bytes) -> tuple[bool, bool]:
    """(complete, is_http) for what a client has sent so far."""
    nl = buf.find(b"\n")
    if nl < 0:
        return len(buf) >= MAX_REQUEST, False
    if _HTTP_REQUEST_LINE.match(buf[:nl]):
        # Read the headers too, so closing does not reset a connection with unread data.
        return (b"\r\n\r\n" in buf or b"\n\n" in buf or len(buf) >= MAX_REQUEST), True
    return True, False


def _render(body: dict[str, Any], http: bool) -> bytes:
    payload = (json.dumps(body) + "\n").encode()
    if not http:
        return payload
    head = (
        "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + payload


class EndpointLoop:
    """One thread serving many TCP and UDP listeners with a selector.

    A selector rather than a thread per connection: thousands of short
    connections per second must not cost a thread each.
    """

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.conns: dict[socket.socket, _Conn] = {}

    def add_tcp(self, sock: socket.socket, respond: Responder) -> None:
        sock.listen(BACKLOG)
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, ("accept", respond))

    def add_udp(self, sock: socket.socket, handle: Callable[[socket.socket], None]) -> None:
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, ("udp", handle))

    def run(self) -> None:
        next_sweep = time.monotonic() + 1.0
        while True:
            for key, _ in self.sel.select(timeout=1.0):
                kind, arg = key.data
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if kind == "accept":
                    self._accept(sock, arg)
                elif kind == "udp":
                    with contextlib.suppress(BlockingIOError, InterruptedError):
                        arg(sock)
                elif kind == "read":
                    self._read(arg)
                else:
                    self._write(arg)
            if time.monotonic() >= next_sweep:
                self._sweep()
                next_sweep = time.monotonic() + 1.0

    def _accept(self, lsock: socket.socket, respond: Responder) -> None:
        # Drain the accept queue: one wake-up per connection would cap the rate.
        for _ in range(256):
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. EMFILE: leave the rest queued for the next wake-up
                return
            sock.setblocking(False)
            conn = _Conn(sock, endpoint(peer), endpoint(sock.getsockname()), respond, original_destination(sock))
            self.conns[sock] = conn
            self.sel.register(sock, selectors.EVENT_READ, ("read", conn))

    def _read(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c)
            return
        c.last = time.monotonic()
        c.inbuf += data
        complete, http = _request_complete(bytes(c.inbuf))
        if data and not complete:
            return
        # Complete, or the client half-closed: answer what we have.
        c.out = _render(c.respond(c.peer, c.local, c.original), http)
        self.sel.modify(c.sock, selectors.EVENT_WRITE, ("write", c))
        self._write(c)

    def _write(self, c: _Conn) -> None:
        try:
            sent = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c)
            return
        c.out = c.out[sent:]
        if not c.out:
            # Read what is left so close() sends FIN, not RST (a reset can discard the reply).
            with contextlib.suppress(OSError):
                c.sock.recv(65536)
            self._close(c)

    def _close(self, c: _Conn) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(c.sock)
        self.conns.pop(c.sock, None)
        c.sock.close()

    def _sweep(self) -> None:
        cutoff = time.monotonic() - IDLE_TIMEOUT
        for c in [c for c in self.conns.values() if c.last < cutoff]:
            self._close(c)


# --------------------------------------------------------------------------- serve


def _bound(bind: str, port: int, kind: socket.SocketKind) -> socket.socket:
    """A socket on ``bind:port``; on ``::`` it is dual-stack (IPv4 arrives as mapped addresses)."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((bind, port))
    return s


def _cmsg_local(ancdata: list[tuple[int, int, bytes]]) -> str | None:
    """The destination address of a received datagram, from IP(V6)_PKTINFO."""
    for level, ctype, data in ancdata:
        if level == SOL_IPV6 and ctype == IPV6_PKTINFO:
            return socket.inet_ntop(socket.AF_INET6, data[:16])
        if level == SOL_IP and ctype == IP_PKTINFO:
            return socket.inet_ntop(socket.AF_INET, data[8:12])  # ipi_addr: the header destination
    return None


def _udp_responder(name: str) -> Callable[[socket.socket], None]:
    def handle(sock: socket.socket) -> None:
        data, anc, _, peer = sock.recvmsg(MAX_REQUEST, 256)
        local_raw = _cmsg_local(anc) or str(sock.getsockname()[0])
        port = int(sock.getsockname()[1])
        body = (json.dumps(_reply(name, endpoint(peer), (unmap(local_raw), port))) + "\n").encode()
        # A wildcard socket's reply would take the source address the route
        # prefers (e.g. eth0's), not the one asked (198.51.100.10 on lo): a
        # connected client would drop it. Answer from the address asked.
        if sock.family == socket.AF_INET6:
            pkt = socket.inet_pton(socket.AF_INET6, local_raw) + struct.pack("=I", 0)
            anc_out = [(SOL_IPV6, IPV6_PKTINFO, pkt)]
        else:
            pkt = struct.pack("=i4s4s", 0, socket.inet_aton(local_raw), b"\0" * 4)
            anc_out = [(SOL_IP, IP_PKTINFO, pkt)]
        sock.sendmsg([body], anc_out, 0, peer)

    return handle


def serve(name: str, port: int, proto: str = "tcp", bind: str = "::") -> None:
    """Answer every TCP connection or UDP datagram on ``bind:port`` with a JSON reply. Runs forever."""
    loop = EndpointLoop()
    if proto == "tcp":
        loop.add_tcp(_bound(bind, port, socket.SOCK_STREAM), lambda peer, local, _original: _reply(name, peer, local))
    else:
        s = _bound(bind, port, socket.SOCK_DGRAM)
        if s.family == socket.AF_INET6:
            s.setsockopt(SOL_IPV6, IPV6_RECVPKTINFO, 1)
        else:
            s.setsockopt(SOL_IP, IP_PKTINFO, 1)
        loop.add_udp(s, _udp_responder(name))
    loop.run()


# --------------------------------------------------------------------------- tproxy


def _transparent(family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
    """A socket allowed to own foreign addresses, as TPROXY and bpf_sk_assign deliver them."""
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # One socket per family: the v4 one takes IPv4 with plain (unmapped) addresses.
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    else:
        s.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
    return s


def _origdst(anc: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    for level, ctype, data in anc:
        if level == SOL_IP and ctype == IP_RECVORIGDSTADDR:
            port, addr = struct.unpack("!2xH4s", data[:8])
            return socket.inet_ntop(socket.AF_INET, addr), port
        if level == SOL_IPV6 and ctype == IPV6_RECVORIGDSTADDR:
            port, addr = struct.unpack("!2xH4x16s", data[:24])
            return socket.inet_ntop(socket.AF_INET6, addr), port
    return None


def _tproxy_udp_responder(name: str) -> Callable[[socket.socket], None]:
    def handle(sock: socket.socket) -> None:
        data, anc, _, peer = sock.recvmsg(MAX_REQUEST, 256)
        orig = _origdst(anc) or endpoint(sock.getsockname())
        body = _reply(name, endpoint(peer), orig, proxy=True)
        body["original_dst"] = body["local"]
        # The client expects the answer from the address and port it sent to,
        # which are not ours: a transparent socket bound to exactly those sends it.
        with _transparent(sock.family, socket.SOCK_DGRAM) as out:
            out.bind(orig)
            out.sendto((json.dumps(body) + "\n").encode(), peer)

    return handle


def tproxy(port: int, name: str = "proxy", proto: str = "both") -> None:
    """A transparent-proxy listener on ``port`` (v4 and v6) that reports what it intercepted. Runs forever."""
    loop = EndpointLoop()

    def respond(peer: tuple[str, int], local: tuple[str, int], original: tuple[str, int] | None) -> dict[str, Any]:
        body = _reply(name, peer, local, proxy=True)
        if original is not None:  # redirected (eBPF connect hook, NAT): the kernel remembers where it was going
            body["original_dst"], body["original_dst_via"] = hostport(*original), "SO_ORIGINAL_DST"
        else:  # transparently intercepted (TPROXY, sk_lookup): the socket's own address is the original
            body["original_dst"], body["original_dst_via"] = body["local"], "getsockname"
        return body

    for family, wildcard in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        if proto in ("tcp", "both"):
            s = _transparent(family, socket.SOCK_STREAM)
            s.bind((wildcard, port))
            loop.add_tcp(s, respond)
        if proto in ("udp", "both"):
            u = _transparent(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET:
                u.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
            else:
                u.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
            u.bind((wildcard, port))
            loop.add_udp(u, _tproxy_udp_responder(name))
    loop.run()


# --------------------------------------------------------------------------- client


class RequestError(OSError):
    """A reply arrived but was not a JSON object: something else answers on that port."""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _parse_reply(raw: bytes, http: bool) -> dict[str, Any]:
    if http or raw.startswith(b"HTTP/"):
        head, sep, body = raw.partition(b"\r\n\r\n")
        if not sep:
            raise RequestError(f"incomplete HTTP reply: {raw[:200]!r}")
        status = head.split(b"\r\n", 1)[0]
        if b" 200 " not in status + b" ":
            raise RequestError(f"HTTP status {status.decode(errors='replace')}")
        raw = body
    try:
        reply = json.loads(raw.decode().splitlines()[0])
    except (ValueError, IndexError) as e:
        raise RequestError(f"not a JSON reply: {raw[:200]!r}") from e
    if not isinstance(reply, dict):
        raise RequestError(f"not a JSON object: {raw[:200]!r}")
    return reply


def request(
    host: str,
    port: int,
    proto: str = "tcp",
    timeout: float = 2.0,
    *,
    send: str = "ping",
    source: str | None = None,
    http: bool = False,
) -> dict[str, Any]:
    """One request; the server's JSON reply.

    Raises ``TimeoutError``, ``ConnectionRefusedError``, ``RequestError`` or another ``OSError``.
    """
    payload = f"GET / HTTP/1.0\r\nHost: {host}\r\nUser-Agent: kernform-traffic\r\n\r\n" if http else send + "\n"
    with socket.socket(_family(host), socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        if source:
            s.bind((source, 0))
        s.connect((host, port))
        if proto == "udp":
            s.send(payload.encode())
            return _parse_reply(s.recv(65535), False)
        s.sendall(payload.encode())
        chunks, deadline = [], time.monotonic() + timeout
        while True:
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return _parse_reply(b"".join(chunks), http)


def attempt(host: str, port: int, proto: str = "tcp", timeout: float = 2.0, **kw: Any) -> tuple[int, dict[str, Any]]:
    """Like :func:`request` but never raises: (exit code, reply or error object)."""
    try:
        return EXIT_OK, request(host, port, proto, timeout, **kw)
    except TimeoutError as e:
        code, kind, detail = EXIT_TIMEOUT, "timeout", str(e) or "timed out"
    except ConnectionRefusedError as e:
        code, kind, detail = EXIT_REFUSED, "refused", str(e)
    except RequestError as e:
        code, kind, detail = EXIT_ERROR, "bad reply", str(e)
    except OSError as e:
        code, kind, detail = EXIT_ERROR, "error", str(e)
    return code, {"error": kind, "detail": detail, "host": host, "port": port, "proto": proto}


def request_many(
    host: str, port: int, count: int, proto: str = "tcp", timeout: float = 2.0, **kw: Any
) -> list[dict[str, Any]]:
    """``count`` sequential requests, each a new connection; failures appear as error objects."""
    return [attempt(host, port, proto, timeout, **kw)[1] for _ in range(count)]


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kernform.traffic", description=__doc__.split("\n", 1)[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="answer each connection/datagram with JSON naming this server")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    s.add_argument("--bind", default="::", help="default :: (dual-stack)")
    t = sub.add_parser("tproxy", help="transparent-proxy listener reporting the original destination")
    t.add_argument("--port", type=int, required=True)
    t.add_argument("--name", default="proxy")
    t.add_argument("--proto", choices=("tcp", "udp", "both"), default="both")
    g = sub.add_parser("get", help="make requests and print each JSON reply on a line")
    g.add_argument("host")
    g.add_argument("port", type=int)
    g.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    g.add_argument("--timeout", type=float, default=2.0)
    g.add_argument("--send", default="ping", help="the line to send")
    g.add_argument("--http", action="store_true", help="send an HTTP/1.0 GET instead of a line")
    g.add_argument("--count", type=int, default=1, help="sequential connections, one reply line each")
    g.add_argument("--source", help="source address to bind")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "serve":
            serve(args.name, args.port, args.proto, args.bind)
        elif args.cmd == "tproxy":
            tproxy(args.port, args.name, args.proto)
        else:
            # Exit with the first failure's code: a run is as good as its worst request.
            first_failure = EXIT_OK
            out = sys.stdout
            for _ in range(args.count):
                code, body = attempt(
                    args.host,
                    args.port,
                    args.proto,
                    args.timeout,
                    send=args.send,
                    source=args.source,
                    http=args.http,
                )
                out.write(json.dumps(body) + "\n")
                if code != EXIT_OK and first_failure == EXIT_OK:
                    first_failure = code
            out.flush()
            return first_failure
    except KeyboardInterrupt:
        pass
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
