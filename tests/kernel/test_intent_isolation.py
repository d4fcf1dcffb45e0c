"""Three intents in one namespace, applied and destroyed in all six orders on both backends: no apply or destroy
of one changes a single kernel object of another (nft JSON, ip rules and routes, tc filters, BPF pins, cgroups),
and two of them leave their interception settings out, so they take per-intent slots.

Everything happens in a namespace of this test's own (`kfi<pid>`) with a veth pair born inside it; the root
namespace is never changed (the ebpf backend's cgroups are created below kernform/ in the cgroup2 mount).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
PID = os.getpid() % 100000
NS = f"kfi{PID}"
DEV = "kfid0"
PIN_ROOT = Path("/sys/fs/bpf/kernform")
CGROUP_ROOT = Path("/sys/fs/cgroup/kernform")


def intent(name: str, body: str) -> str:
    return f"apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata:\n  name: {name}-{PID}\nspec:\n{body}"


# An edge firewall with an uplink table; a sidecar-like inbound interception; a service with its own
# interception and a filter on the same interface as the edge's. Interception settings are left out.
INTENTS = {
    "edge": intent("edge", f"""  filtering:
    input:
      rules:
        - {{name: no-telnet, action: deny, interfaces: [{DEV}], protocol: tcp, ports: [23]}}
  routing:
    tables:
      - name: uplink
        id: 200
        routes:
          - {{to: 10.200.0.0/24, dev: {DEV}}}
    rules:
      - {{name: from-lan, priority: 1000, table: uplink, from: 10.1.0.0/16}}
"""),
    "mesh": intent("mesh", f"""  interception:
    rules:
      - {{name: web, direction: inbound, interfaces: [{DEV}], destinations: [198.51.100.0/24], ports: [80],
          proxyPort: 15001}}
"""),
    "svc": intent("svc", f"""  interception:
    rules:
      - {{name: tls, direction: inbound, interfaces: [{DEV}], destinations: [203.0.113.0/24], ports: [443],
          proxyPort: 15002}}
  loadBalancing:
    interfaces: [{DEV}]
    services:
      - {{name: api, vip: 10.96.0.10, port: 80, backends: [{{address: 10.0.1.1}}, {{address: 10.0.1.2}}]}}
  filtering:
    input:
      rules:
        - {{name: no-smtp, action: deny, interfaces: [{DEV}], protocol: tcp, ports: [25]}}
"""),
}


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def kernform(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kernform.cli", *args], capture_output=True, text=True, cwd=ROOT)


def full(name: str) -> str:
    return f"{name}-{PID}"


def snapshot(name: str) -> dict[str, Any]:
    """Every kernel object of intent `name` in the namespace, as the kernel lists it."""
    table = f"kernform-{full(name)}"
    listed = subprocess.run(["ip", "netns", "exec", NS, "nft", "-j", "list", "table", "inet", table],
                            capture_output=True, text=True)
    nft = [o for o in json.loads(listed.stdout)["nftables"] if "metainfo" not in o] if listed.returncode == 0 else []
    state: dict[str, Any] = {"nft": nft}
    owned = _owned_tables(state)
    for family in ("-4", "-6"):
        rules = json.loads(sh("ip", "-n", NS, "-j", family, "rule", "show") or "[]")
        state[f"rules{family}"] = [r for r in rules if str(r.get("table")) in owned]
        state[f"routes{family}"] = {t: sh("ip", "-n", NS, family, "route", "show", "table", t, check=False)
                                    for t in sorted(owned)}
    filters = []
    for hook in ("ingress", "egress"):
        for f in json.loads(sh("tc", "-n", NS, "-j", "filter", "show", "dev", DEV, hook) or "[]"):
            if f.get("options", {}).get("bpf_name", "").startswith(f"kf_{full(name)}/"):
                filters.append((hook, f))
    state["tc"] = filters
    pins = PIN_ROOT / full(name) / f"netns:{NS}"
    state["pins"] = sorted((str(p.relative_to(pins)), p.stat().st_ino) for p in pins.rglob("*")) if pins.exists() else []
    cgroup = CGROUP_ROOT / f"{full(name)}@{NS}"  # the default cgroup of an intent applied in a namespace
    state["cgroup"] = (sh("bpftool", "-j", "cgroup", "show", str(cgroup), check=False) if cgroup.exists() else None)
    return state


def _owned_tables(state: dict[str, Any]) -> set[str]:
    return {str(e) for o in state["nft"] if "set" in o and o["set"]["name"] == "owned_routing_tables"
            for e in o["set"].get("elem", [])}


def is_empty(state: dict[str, Any]) -> bool:
    return not any(v for k, v in state.items() if not k.startswith("routes")) and not any(
        text.strip() for k, v in state.items() if k.startswith("routes") for text in v.values())


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    sh("ip", "netns", "del", NS, check=False)
    proxy: subprocess.Popen[str] | None = None
    try:
        sh("ip", "netns", "add", NS)
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        sh("ip", "-n", NS, "link", "add", DEV, "type", "veth", "peer", "name", DEV + "p")
        sh("ip", "-n", NS, "addr", "add", "10.77.0.1/24", "dev", DEV)
        sh("ip", "-n", NS, "link", "set", DEV, "up")
        sh("ip", "-n", NS, "link", "set", DEV + "p", "up")
        # The proxies the interception rules name (the ebpf backend hands connections to their sockets).
        proxy = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", PROXIES],
                                 stdout=subprocess.PIPE, text=True)
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        folder = tmp_path_factory.mktemp("intents")
        files = {}
        for name, text in INTENTS.items():
            files[name] = folder / f"{name}.yaml"
            files[name].write_text(text)
        yield files
    finally:
        for name in INTENTS:
            kernform("destroy", "--yes", "--netns", NS, "--intent", full(name))
        if proxy is not None:
            proxy.kill()
            proxy.wait(5)
        sh("ip", "-n", NS, "link", "del", DEV, check=False)
        sh("ip", "netns", "del", NS, check=False)


PROXIES = """
import socket, sys, time
socks = []
for port in (15001, 15002):
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family)
        s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(16)
        socks.append(s)
print("ready", flush=True)
time.sleep(3600)
"""


def _plan_is_empty(name: str, files: dict[str, Path], backend: str) -> bool:
    result = kernform("plan", "--netns", NS, "--backend", backend, "--detailed-exitcode", str(files[name]))
    assert result.returncode in (0, 2), result.stderr
    return result.returncode == 0


@pytest.mark.parametrize("backend", ["tproxy", "ebpf"])
def test_no_apply_or_destroy_of_one_intent_changes_another_in_any_order(lab: dict[str, Path], backend: str) -> None:
    if backend == "ebpf" and not Path("/sys/fs/bpf").is_dir():
        pytest.skip("no bpffs")
    for order in itertools.permutations(INTENTS):
        for index, name in enumerate(order):
            others = {n: snapshot(n) for n in order[:index]}
            result = kernform("apply", "--netns", NS, "--backend", backend, "--quiet", str(lab[name]))
            assert result.returncode == 0, (order, name, result.stdout, result.stderr)
            assert {n: snapshot(n) for n in others} == others, (order, f"apply of {name}")
            assert not is_empty(snapshot(name))
        # Everything applied: each intent in sync, and the two that left their settings out hold different ones.
        assert all(_plan_is_empty(n, lab, backend) for n in INTENTS), order
        rules = sh("ip", "-n", NS, "-4", "rule", "show")
        priorities = [line.split(":")[0] for line in rules.splitlines() if "proto 158" in line]
        assert len(priorities) == len(set(priorities)) or backend == "ebpf", rules
        tables = [_owned_tables(snapshot(n)) for n in ("mesh", "svc")]
        assert tables[0] and tables[1] and not tables[0] & tables[1], tables
        for index, name in enumerate(order):
            rest = {n: snapshot(n) for n in order[index + 1:]}
            result = kernform("destroy", "--yes", "--netns", NS, "--intent", full(name))
            assert result.returncode == 0, (order, name, result.stdout, result.stderr)
            assert is_empty(snapshot(name)), (order, name, snapshot(name))
            assert {n: snapshot(n) for n in rest} == rest, (order, f"destroy of {name}")
            assert all(_plan_is_empty(n, lab, backend) for n in rest), (order, f"destroy of {name}")
    assert "kernform-" not in sh("ip", "netns", "exec", NS, "nft", "list", "tables")
