"""Plumbing shared by the kernel tests that run the `kernform` command against a namespace of their own.

A namespace with a veth pair born inside it (never in the root namespace),
IPv6 link-local addresses off (they arrive after DAD, at any time, and would
change what the ebpf backend mirrors between two observations), optionally
an address and a listening proxy for interception. Deleted with its veth
first, as DESIGN.md asks.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A listening TCP socket on :15001 with IP_TRANSPARENT: the interception's proxy (the ebpf backend hands
# its socket to the kernel, so the intent cannot be applied without one).
PROXY = """
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
s.bind(("0.0.0.0", 15001))
s.listen(64)
time.sleep(3600)
"""


# One server for every backend address: answers each connection to :8080 with the address it reached,
# then echoes whatever comes (an open connection can be used again later).
ADDRESS_SERVER = """
import socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(1024)
def answer(c):
    with c:
        c.sendall(c.getsockname()[0].encode().ljust(32))
        while True:
            data = c.recv(64)
            if not data:
                return
            c.sendall(data)
while True:
    c, _ = s.accept()
    threading.Thread(target=answer, args=(c,), daemon=True).start()
"""


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def kernform(*args: str, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
    """`kernform ARGS` as a fresh process (after `prefix`: strace, `ip netns exec NS`...)."""
    return subprocess.run([*prefix, sys.executable, "-m", "kernform.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@contextlib.contextmanager
def veth_namespace(name: str, dev: str, address: str | None = None, proxy: bool = False) -> Iterator[str]:
    """Namespace `name` holding veth `dev` (peer `dev`p), both up; `address` on `dev`; with `proxy`, PROXY
    running inside it."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    sh("ip", "netns", "del", name, check=False)
    sh("ip", "netns", "add", name)
    listener = None
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", name, "link", "add", dev, "type", "veth", "peer", "name", dev + "p")
        for link in (dev, dev + "p"):
            sh("ip", "-n", name, "link", "set", link, "addrgenmode", "none")
            sh("ip", "-n", name, "link", "set", link, "up")
        if address:
            sh("ip", "-n", name, "addr", "add", address, "dev", dev)
        if proxy:
            listener = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", PROXY])
        yield name
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        sh("ip", "-n", name, "link", "del", dev, check=False)
        sh("ip", "netns", "del", name, check=False)
