"""Fixtures of the conformance suite: its networks with their servers (session), the sidecar proxy, the backend.

The suite runs every cell on both backends. Its namespaces and cgroups
(``kfc<pid % 1000>-...``, see harness.py) are built once per session and
removed at the end; intents are applied per module and destroyed by the
module that applied them, so modules never see each other's kernel state.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import harness
import pytest

# Every port a server of the suite listens on, by namespace. Names say who answered.
SERVERS = {
    harness.SIDE: ("tcp:8080:app", "tcp:9090:app", f"tcp:{harness.EXCLUDED_PORT}:app"),
    harness.UP: ("tcp:8080:up",),
    harness.FS: ("tcp:7001:fs", "tcp:7002:fs", "tcp:7003:fs", "tcp:7004:fs", "sink:7009:fs",
                 "udp:7053:fs", "udp:7054:fs", "tcp:8081:b1", "tcp:8082:b2", "udp:8081:b1", "udp:8082:b2"),
    harness.FC: ("tcp:7001:fc",),
    harness.FR: ("tcp:7001:fr",),
}
CGROUPS = {harness.SIDE: harness.SIDE_CGROUP, harness.FR: harness.ROUTER_CGROUP}


@pytest.fixture(scope="session")
def world() -> Iterator[None]:
    """Both networks with their servers running, for the whole session."""
    if os.geteuid() != 0:
        pytest.skip("the conformance suite needs root (network namespaces, cgroups)")
    if shutil.which("ip") is None or shutil.which("setpriv") is None:
        pytest.skip("the conformance suite needs iproute2 and setpriv")
    harness.build()
    try:
        with ExitStack() as stack:
            for ns, specs in SERVERS.items():
                stack.enter_context(harness.serve(ns, specs, cgroup=CGROUPS.get(ns)))
            yield
    finally:
        harness.teardown()


@pytest.fixture(scope="session")
def proxy(world: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.ProxyLog]:
    """The forwarding sidecar proxy in the sidecar namespace, listening before any intent is applied
    (the ebpf backend finds its listeners when it applies)."""
    log: Path = tmp_path_factory.mktemp("proxy") / "proxy.jsonl"
    log.parent.chmod(0o755)
    with harness.sidecar_proxy(log) as proxy_log:
        yield proxy_log


@pytest.fixture(params=harness.BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
