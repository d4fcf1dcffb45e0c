"""Growth on the ebpf backend is map updates: programs are built for spec.ebpf.limits, never for the intent's size.

Two namespaces of their own: a client (kfgrc) and a gateway (kfgrw) joined by a veth pair born in the
gateway. tc_lb runs on the gateway's client-facing interface; the backends are addresses of the gateway
itself (a local route), answered by one server that replies with the address a connection reached, so a
connection from the client to a VIP shows which backend took it and that the reply was translated back.

Checked: growing an intent past every size that used to change a program setting (13 backends: a larger
Maglev table; 17 services; 65 filter rules) and up to the declared limits keeps every program id, tc filter
and link, and traffic still flows; one beyond a limit is refused at validate time with FILE:LINE:COL and
the kernel is left alone; an open connection through tc_lb survives adding a service (its flow entry
kept); and 10,000 services of 10 backends apply, the last VIP answering.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox import ADDRESS_SERVER, kernform, sh

from compiler.objects import BPF_PIN_ROOT
from reconciler.drivers import libbpf

pytestmark = pytest.mark.kernel

GW, CLIENT = "kfgrw", "kfgrc"
GW_DEV, CLIENT_DEV = "grw0", "grc0"
GW_ADDR, CLIENT_ADDR = "10.87.0.1", "10.87.0.2"
INTENT = "growth"

# Inside the client namespace: connect to each VIP:80 given, print which backend answered (or the error).
ASK = """
import json, socket, sys
out = {}
for vip in sys.argv[1:]:
    try:
        with socket.create_connection((vip, 80), timeout=2.0) as c:
            out[vip] = c.recv(32).decode().strip()
    except OSError as exc:
        out[vip] = "error: " + type(exc).__name__
print(json.dumps(out))
"""


def vip(i: int) -> str:
    return f"10.96.{i // 256}.{i % 256}"


def backend(i: int, j: int, per: int) -> str:
    """Backend j of service i, services `per` addresses apart: in 10.128.0.0/9, the gateway's own."""
    return str(ipaddress.IPv4Address("10.128.0.1") + i * per + j)


def intent(services: int, backends: int = 1, rules: int = 1, *, first_backends: int | None = None,
           limits: dict[str, int] | None = None, cidrs: int = 1) -> str:
    """`services` services of `backends` backends each (the first one `first_backends`), `rules` allow rules
    on the gateway's input (one descriptor each), the first with `cidrs` source prefixes."""
    lines = ["apiVersion: kernform/v1", "kind: NetworkIntent", f"metadata: {{name: {INTENT}}}", "spec:",
             "  backend: ebpf", "  ebpf:", f"    interfaces: [{GW_DEV}]"]
    if limits:
        lines.append("    limits: {" + ", ".join(f"{k}: {v}" for k, v in limits.items()) + "}")
    lines += ["  filtering:", "    input:", "      rules:"]
    for r in range(rules):
        # prefixes that do not merge when collapsed: each one is an LPM trie entry
        sources = [f"192.{c // 256}.{c % 256}.1/32" for c in range(cidrs)] if r == 0 else ["198.51.100.0/24"]
        lines.append(f"        - {{name: r{r}, action: allow, protocol: tcp, ports: [{20000 + r}], "
                     f"sources: [{', '.join(sources)}]}}")
    lines += ["  loadBalancing:", f"    interfaces: [{GW_DEV}]", "    services:"]
    for i in range(services):
        count = first_backends if (i == 0 and first_backends is not None) else backends
        lines.append(f"      - name: s{i}\n        vip: {vip(i)}\n        port: 80\n        backends:")
        lines += [f"          - {{address: {backend(i, j, max(backends, first_backends or 0))}, port: 8080}}"
                  for j in range(count)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def lab() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    for ns in (GW, CLIENT):
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    server = None
    try:
        sh("ip", "-n", GW, "link", "add", GW_DEV, "type", "veth", "peer", "name", CLIENT_DEV, "netns", CLIENT)
        for ns, dev, addr in ((GW, GW_DEV, GW_ADDR), (CLIENT, CLIENT_DEV, CLIENT_ADDR)):
            sh("ip", "-n", ns, "link", "set", dev, "addrgenmode", "none")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", CLIENT, "route", "add", "10.96.0.0/16", "via", GW_ADDR)
        # every backend address is the gateway's own
        sh("ip", "-n", GW, "route", "add", "local", "10.128.0.0/9", "dev", "lo")
        server = subprocess.Popen(["ip", "netns", "exec", GW, sys.executable, "-c", ADDRESS_SERVER])
        yield
    finally:
        kernform("destroy", "--yes", "--netns", GW, "--intent", INTENT)
        if server is not None:
            server.kill()
            server.wait()
        sh("ip", "-n", GW, "link", "del", GW_DEV, check=False)
        for ns in (GW, CLIENT):
            sh("ip", "netns", "del", ns, check=False)


def apply(tmp_path: Path, text: str, name: str = "growth.yaml") -> subprocess.CompletedProcess[str]:
    path = tmp_path / name
    path.write_text(text)
    result = kernform("apply", str(path), "--netns", GW, "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def ask(*vips: str) -> dict[str, str]:
    out = sh("ip", "netns", "exec", CLIENT, sys.executable, "-c", ASK, *vips)
    return dict(json.loads(out))


def programs() -> dict[str, int]:
    """Every pinned program of the intent (by pin path) with its id, and what runs at the attachments:
    the tc filters on the gateway's interface (by hook and pref) and the pinned links."""
    seen: dict[str, int] = {}
    pins = Path(BPF_PIN_ROOT) / INTENT / f"netns:{GW}"
    for path in sorted(pins.glob("*/prog:*")):
        fd = libbpf.obj_get(str(path))
        try:
            seen[str(path.relative_to(pins))] = libbpf.prog_info(fd).id
        finally:
            os.close(fd)
    for path in sorted(pins.glob("*/link:*")):
        fd = libbpf.obj_get(str(path))
        try:
            info = libbpf.link_info(fd)
            seen[f"link {path.name}"] = info.id * 1_000_000 + info.prog_id
        finally:
            os.close(fd)
    for hook in ("ingress", "egress"):
        for row in json.loads(sh("tc", "-j", "-n", GW, "filter", "show", "dev", GW_DEV, hook) or "[]"):
            options = row.get("options", {})
            if options.get("bpf_name", "").startswith("kf_"):
                seen[f"tc {hook} {row['pref']} {options['bpf_name']}"] = int(options["prog"]["id"])
    return seen


def served_by(answer: str, i: int, backends: int) -> bool:
    return answer in {backend(i, j, backends) for j in range(backends)}


def test_growing_past_the_former_thresholds_keeps_every_program(lab: None, tmp_path: Path) -> None:
    """13 backends (a larger Maglev table), 17 services, 65 filter rules, 300 CIDRs: default limits."""
    apply(tmp_path, intent(1, 1, 1))
    before = programs()
    assert any("lb-" in k for k in before) and any("tc-" in k for k in before) and any("link" in k for k in before)
    assert served_by(ask(vip(0))[vip(0)], 0, 1)

    steps = [
        ("13 backends", intent(1, 13, 1), 1, 13),
        ("17 services", intent(17, 13, 1), 17, 13),
        ("65 filter rules", intent(17, 13, 65), 17, 13),
        ("300 CIDRs", intent(17, 13, 65, cidrs=300), 17, 13),
        ("back to 1 service", intent(1, 13, 65, cidrs=300), 1, 13),
    ]
    for what, text, services, backends in steps:
        apply(tmp_path, text)
        assert programs() == before, f"{what}: a program was reloaded or reattached"
        answers = ask(vip(0), vip(services - 1))
        assert served_by(answers[vip(0)], 0, backends), (what, answers)
        assert served_by(answers[vip(services - 1)], services - 1, backends), (what, answers)
    # the removed services are gone from the data path too
    assert ask(vip(16))[vip(16)].startswith("error")


def test_growing_to_the_limits_keeps_every_program_and_beyond_is_refused(lab: None, tmp_path: Path) -> None:
    limits = {"services": 24, "backends": 64, "rules": 128, "prefixes": 40}
    apply(tmp_path, intent(1, 1, 1, limits=limits))
    before = programs()
    # 23 services of 2 backends and one of 18: 64 backends; 128 rules of one descriptor; 40 source prefixes
    at_limits = intent(24, 2, 128, first_backends=18, limits=limits, cidrs=39)
    apply(tmp_path, at_limits)
    assert programs() == before
    answers = ask(vip(0), vip(23))
    assert served_by(answers[vip(0)], 0, 18) and served_by(answers[vip(23)], 23, 18), answers

    beyond = {
        "services": (intent(25, 2, 128, first_backends=14, limits=limits, cidrs=39), "limits.services"),
        "backends": (intent(24, 2, 128, first_backends=19, limits=limits, cidrs=39), "limits.backends"),
        "rules": (intent(24, 2, 129, first_backends=18, limits=limits, cidrs=39), "limits.rules is 128"),
        "prefixes": (intent(24, 2, 128, first_backends=18, limits=limits, cidrs=40), "limits.prefixes"),
    }
    for what, (text, message) in beyond.items():
        path = tmp_path / f"beyond-{what}.yaml"
        path.write_text(text)
        result = kernform("validate", str(path), "--backend", "ebpf")
        assert result.returncode != 0, what
        assert f"{path}:" in result.stderr + result.stdout and message in result.stderr + result.stdout, \
            (what, result.stderr[-1500:])
        located = [line for line in (result.stderr + result.stdout).splitlines() if message in line]
        assert located and located[0].split(":")[1].isdigit() and located[0].split(":")[2].isdigit(), located
        refused = kernform("apply", str(path), "--netns", GW, "--quiet")
        assert refused.returncode != 0, what
        assert programs() == before, f"{what}: the refused apply changed the kernel"
    answers = ask(vip(23))
    assert served_by(answers[vip(23)], 23, 18), answers


def flow_count() -> int:
    (path,) = (Path(BPF_PIN_ROOT) / INTENT / f"netns:{GW}").glob("lb-*/maps/lb_flows")
    with libbpf.Map.open(str(path)) as flows:
        return sum(1 for _ in flows.items())


def test_an_open_connection_through_tc_lb_survives_adding_a_service(lab: None, tmp_path: Path) -> None:
    apply(tmp_path, intent(2, 3, 1))
    before = programs()
    # the connection is opened from the client namespace and kept open by a child holding it
    holder = subprocess.Popen(
        ["ip", "netns", "exec", CLIENT, sys.executable, "-c", HOLD, vip(1)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdin is not None and holder.stdout is not None
        first = holder.stdout.readline().strip()
        assert served_by(first, 1, 3), first
        flows = flow_count()
        assert flows >= 1
        apply(tmp_path, intent(3, 3, 1))
        assert programs() == before
        holder.stdin.write("again\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "again"  # same connection, same backend, translated back
        assert flow_count() >= flows  # the flow entry is kept
        assert served_by(ask(vip(2))[vip(2)], 2, 3)
    finally:
        holder.kill()
        holder.wait()


# Holds one connection to VIP:80: prints who answered, then echoes each line of stdin through it.
HOLD = """
import socket, sys
c = socket.create_connection((sys.argv[1], 80), timeout=5.0)
print(c.recv(32).decode().strip(), flush=True)
for line in sys.stdin:
    c.sendall(line.strip().encode())
    print(c.recv(64).decode(), flush=True)
"""


def test_ten_thousand_services_of_ten_backends_apply(lab: None, tmp_path: Path) -> None:
    services, backends = 10_000, 10
    apply(tmp_path, intent(services, backends, 1), name="big.yaml")
    last = vip(services - 1)
    answers = ask(vip(0), last)
    assert served_by(answers[last], services - 1, backends), answers
    assert served_by(answers[vip(0)], 0, backends), answers
