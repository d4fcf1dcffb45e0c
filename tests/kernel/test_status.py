"""`kernform status` against the real kernel, on both backends, without --backend.

The intent file says `backend: tproxy`; each test applies it with the backend
under test, sends real traffic through every section, and asks `kernform
status` (with and without FILE, text and JSON). Status must find the backend
in the kernel (an ebpf apply of a tproxy file is in sync, not 30,000 changes
away) and show counters for each interception rule, service, filter rule and
default policy. Everything lives in two namespaces of this test's own
(`kfs<pid>-c`, a client, and `kfs<pid>-g`, where the intent is applied),
linked by a veth born inside them; the root namespace is never changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compiler import compile_intent
from compiler.loader import load_file
from kernform import lab, traffic
from reconciler.apply import apply, destroy
from reconciler.observe import Target
from reconciler.status import rule_counters

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
PID = os.getpid() % 100000
CLIENT, GW = f"kfs{PID}-c", f"kfs{PID}-g"
GW_IF, CLIENT_IF = "kfsg0", "kfsc0"
GW_ADDR, CLIENT_ADDR = "10.199.0.1", "10.199.0.2"
VIP, INTERCEPTED = "10.199.100.10", "203.0.113.5"
SERVER_PORT, PROXY_PORT = 8080, 15001
INTENT = f"kfs-status-{PID}"

INTENT_TEXT = f"""apiVersion: kernform/v1
kind: NetworkIntent
metadata: {{name: {INTENT}}}
spec:
  backend: tproxy
  ebpf: {{interfaces: [{GW_IF}]}}
  interception:
    rules:
      - {{name: web-in, direction: inbound, protocols: [tcp], interfaces: [{GW_IF}],
          destinations: [203.0.113.0/24], ports: [80], proxyPort: {PROXY_PORT}}}
  loadBalancing:
    interfaces: [{GW_IF}]
    services:
      - {{name: web, vip: {VIP}, port: 80, backends: [{{address: {GW_ADDR}, port: {SERVER_PORT}}}]}}
  filtering:
    input:
      default: allow
      rules:
        - {{name: deny-probe, action: deny, interfaces: [{GW_IF}], protocol: tcp, ports: [9]}}
        - {{name: allow-web, action: allow, interfaces: [{GW_IF}], protocol: tcp, ports: [{SERVER_PORT}]}}
"""


def sh(*args: str, check: bool = True) -> None:
    subprocess.run(args, check=check, capture_output=True, text=True)


def drop_namespaces() -> None:
    sh("ip", "-n", GW, "link", "del", GW_IF, check=False)  # veths before their namespaces
    for ns in (CLIENT, GW):
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def pair() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    drop_namespaces()
    try:
        for ns in (CLIENT, GW):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", GW, "link", "add", GW_IF, "type", "veth", "peer", "name", CLIENT_IF, "netns", CLIENT)
        sh("ip", "-n", GW, "addr", "add", f"{GW_ADDR}/24", "dev", GW_IF)
        sh("ip", "-n", CLIENT, "addr", "add", f"{CLIENT_ADDR}/24", "dev", CLIENT_IF)
        sh("ip", "-n", GW, "link", "set", GW_IF, "up")
        sh("ip", "-n", CLIENT, "link", "set", CLIENT_IF, "up")
        for prefix in ("203.0.113.0/24", f"{VIP}/32"):
            sh("ip", "-n", CLIENT, "route", "add", prefix, "via", GW_ADDR)
        yield
    finally:
        drop_namespaces()


@pytest.fixture(scope="module")
def intent_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("status") / "status.yaml"
    path.write_text(INTENT_TEXT)
    return path


@pytest.fixture(scope="module", params=["tproxy", "ebpf"])
def applied(request: pytest.FixtureRequest, pair: None, intent_file: Path) -> Iterator[str]:
    """The intent applied with the backend under test, its server and proxy running, traffic sent."""
    backend = str(request.param)
    if backend == "ebpf":
        pytest.importorskip("bcc")
    server = traffic.command("serve", "--name", "server", "--port", str(SERVER_PORT))
    proxy = traffic.command("tproxy", "--port", str(PROXY_PORT), "--name", "proxy", "--proto", "tcp")
    with lab.background(GW, server, SERVER_PORT), lab.background(GW, proxy, PROXY_PORT), Target(GW) as target:
        try:
            apply(target, compile_intent(load_file(intent_file).intent, backend, netns=GW))  # as the CLI compiles
            send_traffic()
            yield backend
        finally:
            destroy(target, INTENT)
    # Nothing of the intent is left for status to find (no nft table, no pins for this namespace).
    left = kernform("status", "--netns", GW).stdout
    assert left.startswith("No kernform intents are applied"), left


def get(host: str, port: int, timeout: float = 2.0, count: int = 1) -> list[dict[str, Any]]:
    argv = traffic.command("get", host, str(port), "--timeout", str(timeout), "--count", str(count))
    result = lab.run_in(CLIENT, argv, check=False, timeout=timeout * count + 30)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def send_traffic() -> None:
    (denied,) = get(GW_ADDR, 9, timeout=0.5)
    assert denied.get("error") == "timeout", denied
    assert all(r.get("server") == "server" for r in get(GW_ADDR, SERVER_PORT, count=2))
    (refused,) = get(GW_ADDR, 8081)  # no rule: the default policy (allow) lets it in to a closed port
    assert refused.get("error") == "refused", refused
    (intercepted,) = get(INTERCEPTED, 80)
    assert intercepted.get("proxy") is True, intercepted
    assert all(r.get("server") == "server" for r in get(VIP, 80, count=3))


def kernform(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "kernform", *args], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result


def status_json(*args: str) -> dict[str, Any]:
    (report,) = json.loads(kernform("status", "--netns", GW, "--json", *args).stdout)["intents"]
    assert report["intent"] == INTENT
    return dict(report)


def test_status_with_file_finds_the_backend_and_counts_every_section(applied: str, intent_file: Path) -> None:
    report = status_json(str(intent_file))
    assert report["backend"] == applied and report["backendFrom"] == "kernel", report
    assert report["appliedBackends"] == [applied] and report["specBackend"] == "tproxy"
    assert report["inSync"] is True, report["pendingChanges"]
    counters = report["counters"]

    deny = counters["filtering.input/deny-probe"]
    assert deny["section"] == "filtering" and deny["packets"] > 0 and deny["dropped"] == deny["packets"], deny
    allow = counters["filtering.input/allow-web"]
    assert allow["packets"] > 0 and allow["dropped"] == 0, allow

    default = next(v for k, v in counters.items() if k.startswith("filtering") and k.endswith("(default)"))
    assert default["policy"] == "allow" and default["packets"] > 0 and default["dropped"] == 0, counters

    intercepted = counters["interception/web-in"]
    assert intercepted["section"] == "interception"
    assert (intercepted["packets"] if applied == "tproxy" else intercepted["redirected"]) > 0, intercepted

    service = counters["loadBalancing/web"]
    assert service["section"] == "loadBalancing" and service["newFlows"] >= 3, service
    # Each backend has its own row: the one backend took every connection.
    backend = counters[f"loadBalancing/web -> {GW_ADDR}:{SERVER_PORT}"]
    assert backend["section"] == "loadBalancing" and backend["connections"] >= 3, counters


def test_status_without_file_names_counters_from_the_kernel(applied: str) -> None:
    report = status_json()
    assert report["backend"] == applied and report["appliedBackends"] == [applied], report
    assert "inSync" not in report
    counters = report["counters"]
    if applied == "tproxy":
        # nft counter names carry the intent's names.
        assert counters["filtering.input/deny-probe"]["dropped"] > 0, counters
        assert counters["filtering.input (default)"]["packets"] > 0, counters
        assert counters["interception/web-in"]["packets"] > 0, counters
        assert counters["loadBalancing/web"]["newFlows"] >= 3, counters
    else:
        # BPF maps hold indexes, not names: rows are named by program and index and say what they match.
        deny = next(v for v in counters.values() if "tcp port 9 deny" in v.get("rule", ""))
        assert deny["packets"] > 0 and deny["dropped"] == deny["packets"], counters
        assert counters["filtering.input (default)"]["packets"] > 0, counters
        intercept = next(v for k, v in counters.items() if k.startswith("interception (inbound)/#"))
        assert intercept["redirected"] > 0 and "port 80" in intercept["rule"], counters
        assert counters[f"loadBalancing/{VIP}:80/tcp"]["newFlows"] >= 3, counters
        assert counters[f"loadBalancing/{VIP}:80/tcp -> {GW_ADDR}:{SERVER_PORT}"]["connections"] >= 3, counters
    sections = {v["section"] for v in counters.values()}
    assert sections == {"interception", "loadBalancing", "filtering"}, counters


def test_status_text_shows_backend_sync_and_counters(applied: str, intent_file: Path) -> None:
    text = kernform("status", "--netns", GW, str(intent_file)).stdout
    assert f"backend {applied} (read from the kernel" in text and "in sync with the file" in text, text
    assert "deny-probe" in text and f"loadBalancing/web -> {GW_ADDR}:{SERVER_PORT}" in text, text
    bare = kernform("status", "--netns", GW).stdout
    assert f"intent {INTENT} on netns {GW}: applied, backend {applied}" in bare, bare
    assert "interception:" in bare and "loadBalancing:" in bare and "filtering:" in bare, bare


def test_backend_flag_still_overrides(applied: str, intent_file: Path) -> None:
    other = "ebpf" if applied == "tproxy" else "tproxy"
    report = status_json(str(intent_file), "--backend", other)
    assert report["backend"] == other and report["backendFrom"] == "--backend"
    assert report["inSync"] is False


def test_rule_counters_of_a_compile(applied: str, intent_file: Path) -> None:
    """The API tests use: counters of `desired`'s backend, named by the compile."""
    loaded = load_file(intent_file)
    with Target(GW) as target:
        counted = rule_counters(target, compile_intent(loaded.intent, applied, netns=GW), loaded.intent)
    assert counted["filtering.input/deny-probe"]["dropped"] > 0, counted
    assert "interception/web-in" in counted and "loadBalancing/web" in counted, counted
