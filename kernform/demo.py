"""`kernform demo`: the whole tool on real traffic, in the sandbox lab.

Brings the lab up, applies examples/edge-gateway.yaml to the gateway
namespace, and sends real connections from the client namespace that show
each section at work: interception (the proxy sees the client and the
original destination), load balancing (hits spread by weight, client address
kept), filtering (denied traffic dropped and counted) and routing (the policy
picks the uplink). Then `plan` shows no changes, the intent is destroyed and
the lab taken down. Nothing touches the host's own network namespace.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path
from typing import Any

from compiler import compile_intent
from compiler.loader import load_file

from . import lab

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "edge-gateway.yaml"


def _say(text: str) -> None:
    print(text, flush=True)


def _kernform(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, so the demo shows real command output."""
    result = subprocess.run([sys.executable, "-m", "kernform", *args], capture_output=True, text=True, env=None)
    return result


def _show(title: str, result: subprocess.CompletedProcess[str], limit: int = 60) -> None:
    _say(f"\n$ kernform {title}")
    lines = (result.stdout + result.stderr).rstrip().splitlines()
    for line in lines[:limit]:
        _say("  " + line)
    if len(lines) > limit:
        _say(f"  ... ({len(lines) - limit} more lines)")


def _check(ok: bool, what: str, failures: list[str]) -> None:
    _say(f"  {'ok ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)


def run(backend: str | None = None, prefix: str = "kf", keep: bool = False) -> int:
    failures: list[str] = []
    _say(f"== kernform demo: sandbox lab '{prefix}' (network namespaces only)")
    m = lab.up(prefix)
    _say(m.render())
    backend_args = ["--backend", backend] if backend else []
    target = ["--netns", m.gw_ns]
    example = str(EXAMPLE)
    compile_intent(load_file(example).intent, backend)  # fail early, before anything is applied
    try:
        with lab.servers(m):
            _show(f"plan {EXAMPLE.name} --netns {m.gw_ns}", _kernform("plan", example, *target, *backend_args), 40)
            applied = _kernform("apply", "--quiet", example, *target, *backend_args)
            _show(f"apply --quiet {EXAMPLE.name} --netns {m.gw_ns}", applied)
            if applied.returncode != 0:
                return 1
            _traffic(m, failures, compile_intent(load_file(example).intent, backend).backend)
            again = _kernform("plan", example, *target, *backend_args, "--detailed-exitcode")
            _show(f"plan {EXAMPLE.name} --detailed-exitcode   (exit {again.returncode})", again)
            _check(again.returncode == 0, "a second plan finds nothing to change", failures)
            _show(f"status {EXAMPLE.name} --netns {m.gw_ns}", _kernform("status", example, *target, *backend_args))
            if not keep:
                _show(f"destroy {EXAMPLE.name}", _kernform("destroy", "--yes", example, *target))
                leftovers = _kernform("status", *target)
                _check("No kernform intents" in leftovers.stdout, "destroy leaves nothing of kernform's", failures)
    finally:
        if not keep:
            lab.down(prefix)
            _say(f"\nlab '{prefix}' removed")
    if failures:
        _say(f"\nDEMO FAILED: {len(failures)} checks failed: {', '.join(failures)}")
        return 1
    _say("\nDemo complete: every check passed.")
    return 0


def _ok(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in replies if "error" not in r]


def _balanced(m: lab.LabMap, backend: str, host: str, port: int, count: int) -> list[dict[str, Any]]:
    """tproxy balances traffic forwarded through the gateway; ebpf balances at connect() for processes in
    the intent's cgroup, so with ebpf the demo's clients run on the gateway, inside that cgroup."""
    if backend == "ebpf":
        from compiler.allocation import default_cgroup
        from reconciler.drivers.bpf import cgroup2_root

        cgroup = str(cgroup2_root() / default_cgroup("edge-gateway", m.gw_ns))
        return _ok(lab.client_get(m, host, port, count=count, ns=m.gw_ns, cgroup=cgroup))
    return _ok(lab.client_get(m, host, port, count=count))


def _traffic(m: lab.LabMap, failures: list[str], backend: str) -> None:
    _say("\n== interception: client -> 198.51.100.10:80 is handed to the gateway's transparent proxy")
    for host in (m.internet_v4, m.internet_v6):
        replies = lab.client_get(m, host, 80)
        reply = replies[0] if replies else {}
        _say(f"  reply: {reply}")
        _check(reply.get("proxy") is True and reply.get("client_ip") in (m.client_v4, m.client_v6)
               and str(reply.get("original_dst", "")).endswith(":80") and host in str(reply.get("original_dst")),
               f"proxy saw client {reply.get('client_ip')} and original destination {reply.get('original_dst')}",
               failures)

    where = "the gateway, in the intent's cgroup" if backend == "ebpf" else "the client, through the gateway"
    _say(f"\n== load balancing: 200 connections to VIP 10.70.100.10:80 (weights b1:1 b2:2 b3:1) from {where}")
    replies = _balanced(m, backend, "10.70.100.10", 80, 200)
    spread = collections.Counter(r["server"] for r in replies)
    _say(f"  hits per backend: {dict(sorted(spread.items()))}")
    _check(len(replies) == 200 and spread["b2"] > spread["b1"] and spread["b2"] > spread["b3"] and min(spread.values()) > 20,
           "hits follow the weights", failures)
    own = m.gw_bridge_v4.split("/")[0] if backend == "ebpf" else m.client_v4
    _check(all(r["client_ip"] == own for r in replies), f"backends saw the client's own address {own}", failures)
    replies6 = _balanced(m, backend, "fd70:100::10", 80, 20)
    sticky = {r["server"] for r in replies6}
    _say(f"  IPv6 VIP with source-hash: 20 connections went to {sorted(sticky)}")
    _check(len(replies6) == 20 and len(sticky) == 1, "source-hash keeps a client on one backend", failures)

    _say("\n== filtering: tcp/8081 to the internet host is denied and counted; tcp/8080 is allowed")
    denied = lab.client_get(m, m.internet_v4, 8081, timeout=1.0)
    allowed = lab.client_get(m, m.internet_v4, 8080)
    _say(f"  8081: {denied[0] if denied else None}")
    _say(f"  8080: {allowed[0] if allowed else None}")
    _check(bool(denied) and denied[0].get("error") == "timeout", "denied connection is dropped", failures)
    _check(bool(allowed) and allowed[0].get("server") == "wan-a", "allowed connection passes", failures)

    _say("\n== routing: tcp/8443 from clients leaves through uplink b (policy rule), everything else through a")
    via_b = lab.client_get(m, m.internet_v4, 8443)
    via_a = lab.client_get(m, m.internet_v4, 8080)
    _say(f"  8443 answered by {via_b[0].get('server') if via_b else None}; 8080 answered by "
         f"{via_a[0].get('server') if via_a else None}")
    _check(bool(via_b) and via_b[0].get("server") == "wan-b", "policy-selected uplink carries tcp/8443", failures)
    _check(bool(via_a) and via_a[0].get("server") == "wan-a", "main table still carries the rest", failures)
