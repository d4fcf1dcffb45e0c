"""Conflicts with intents applied from elsewhere that the kernel alone cannot tell: overlapping
interception to another proxy, and one cgroup for two ebpf intents' socket programs.

Each apply records what its intent takes (reconciler.ownership); an apply of
another intent, from another file this command never saw, is refused at its
FILE:LINE:COL naming the applied intent, with the kernel left byte for byte as
it was. Namespace `kfq<pid>` with a veth pair born inside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sandbox import kernform, sh, veth_namespace

pytestmark = pytest.mark.kernel
PID = os.getpid() % 100000
NS = f"kfq{PID}"
DEV = "kfq0"


def intercepting(name: str, destinations: str, proxy: int, table: int) -> str:
    return f"""apiVersion: kernform/v1
kind: NetworkIntent
metadata: {{name: {name}}}
spec:
  interception:
    routingTable: {table}
    rulePriority: {table - 7000}
    fwmark: "{hex(table)}"
    rules:
      - {{name: web, direction: inbound, protocols: [tcp], interfaces: [{DEV}], destinations: [{destinations}],
          ports: [80], proxyPort: {proxy}}}
"""


def balancing(name: str, cgroup: str, vip: str) -> str:
    return f"""apiVersion: kernform/v1
kind: NetworkIntent
metadata: {{name: {name}}}
spec:
  ebpf:
    cgroup: {cgroup}
  loadBalancing:
    services:
      - {{name: web, vip: {vip}, port: 80, backends: [{{address: 10.77.1.1, port: 8080}}]}}
"""


def kernel_state() -> dict[str, Any]:
    return {"nft": json.loads(sh("ip", "netns", "exec", NS, "nft", "-j", "list", "ruleset")),
            "rules": sh("ip", "-n", NS, "rule", "show"), "routes": sh("ip", "-n", NS, "route", "show", "table", "all"),
            "pins": sorted(str(p) for p in Path("/sys/fs/bpf/kernform").rglob("*") if NS in str(p))}


@pytest.fixture
def namespace() -> Iterator[str]:
    with veth_namespace(NS, DEV) as name:
        yield name


def test_overlapping_interception_of_an_applied_intent_is_refused(namespace: str, tmp_path: Path) -> None:
    first, second, disjoint = (f"{n}-{PID}" for n in ("ic-a", "ic-b", "ic-c"))
    a, b, c = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    a.write_text(intercepting(first, "198.51.100.0/24", 15001, 7601))
    b.write_text(intercepting(second, "198.51.100.128/25", 15002, 7602))
    c.write_text(intercepting(disjoint, "203.0.113.0/24", 15002, 7603))
    try:
        assert kernform("apply", "-q", "--netns", NS, "--backend", "tproxy", str(a)).returncode == 0
        before = kernel_state()
        refused = kernform("apply", "-q", "--netns", NS, "--backend", "tproxy", str(b))
        assert refused.returncode == 1
        assert f"{b}:" in refused.stderr and f"intent '{first}' applied in netns {NS}" in refused.stderr
        assert "198.51.100.128/25" in refused.stderr and "proxy port 15001" in refused.stderr
        assert kernel_state() == before
        # Validated on its own, the same file is fine: only the applied intent makes it a conflict.
        assert kernform("validate", str(b)).returncode == 0
        assert kernform("apply", "-q", "--netns", NS, "--backend", "tproxy", str(c)).returncode == 0
        # Once the first is destroyed, its record goes with it and the second applies.
        assert kernform("destroy", "--yes", "--netns", NS, "--intent", first).returncode == 0
        assert kernform("apply", "-q", "--netns", NS, "--backend", "tproxy", str(b)).returncode == 0
    finally:
        for name in (first, second, disjoint):
            kernform("destroy", "--yes", "--netns", NS, "--intent", name)


def test_one_explicit_cgroup_for_two_applied_ebpf_intents_is_refused(namespace: str, tmp_path: Path) -> None:
    pytest.importorskip("bcc")
    first, second = f"cg-a-{PID}", f"cg-b-{PID}"
    cgroup = f"kernform/shared-{PID}"
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(balancing(first, cgroup, "10.77.0.1"))
    b.write_text(balancing(second, cgroup, "10.77.0.2"))
    try:
        applied = kernform("apply", "-q", "--netns", NS, "--backend", "ebpf", str(a))
        assert applied.returncode == 0, applied.stderr
        before = kernel_state()
        refused = kernform("apply", "-q", "--netns", NS, "--backend", "ebpf", str(b))
        assert refused.returncode == 1
        assert f"{b}:" in refused.stderr and f"cgroup {cgroup}" in refused.stderr and first in refused.stderr
        assert kernel_state() == before
    finally:
        for name in (first, second):
            kernform("destroy", "--yes", "--netns", NS, "--intent", name)
        from reconciler.drivers.bpf import cgroup2_root

        with __import__("contextlib").suppress(OSError):
            (cgroup2_root() / cgroup).rmdir()
