"""Intents (and the hand-written iptables references) generated for a size N.

Everything is deterministic: the same N gives the same CIDRs in every run, so
runs can be compared. Filter CIDRs never match the benchmark's traffic
(10.x, 198.18.x): they are drawn from 20.0.0.0-99.255.255.255, one per /24
with an even third octet, either the whole /24 or one /32 inside it, so that
no two of them overlap or merge when collapsed (kernform collapses lists):
N CIDRs in the file are N elements in the kernel.
"""

from __future__ import annotations

import random
from typing import Any

import yaml

from . import topology as topo

SEED = 0x4B46_5EED


def blocklist(n: int, salt: int = 0) -> list[str]:
    """N distinct CIDRs that neither overlap nor can be merged, none matching benchmark traffic."""
    rng = random.Random(SEED + salt)
    seen: set[tuple[int, int, int]] = set()
    out: list[str] = []
    while len(out) < n:
        key = (rng.randrange(20, 100), rng.randrange(256), rng.randrange(0, 256, 2))
        if key in seen:
            continue
        seen.add(key)
        a, b, c = key
        out.append(f"{a}.{b}.{c}.0/24" if rng.random() < 0.4 else f"{a}.{b}.{c}.{rng.randrange(1, 255)}/32")
    return out


def extra_cidr(i: int) -> str:
    """CIDRs for one-element changes: in 100.64.0.0/10, outside every blocklist."""
    return f"100.{64 + i // 65536 % 64}.{i // 256 % 256}.{i % 256}/32"


def _doc(name: str, backend: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kernform/v1", "kind": "NetworkIntent", "metadata": {"name": name},
            "spec": {"backend": backend, **spec}}


def dump(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=200)


def filter_doc(name: str, backend: str, cidrs: list[str], interface: str) -> dict[str, Any]:
    """Forwarded traffic allowed by default; one deny rule holding every CIDR (N = 0: the chain, no rule)."""
    rules = []
    if cidrs:
        rules.append({"name": "blocklist", "action": "deny", "protocol": "tcp", "interfaces": [interface],
                      "destinations": cidrs})
    return _doc(name, backend, {"filtering": {"forward": {"default": "allow", "rules": rules}}})


def lb_doc(name: str, backend: str, vip: str, count: int, weights: dict[int, int] | None = None,
           interfaces: list[str] | None = None) -> dict[str, Any]:
    """One service, VIP:80 spread over `count` backends (10.90.x.y:8080, all served by the server namespace);
    `interfaces`: where forwarded connections to the VIP arrive (loadBalancing.interfaces)."""
    weights = weights or {}
    backends = [{"address": topo.backend_address(i), "port": 8080, "weight": weights.get(i, 1)} for i in range(count)]
    section: dict[str, Any] = {"services": [{"name": "web", "vip": vip, "port": 80, "backends": backends}]}
    if interfaces:
        section["interfaces"] = interfaces
    return _doc(name, backend, {"loadBalancing": section})


def interception_doc(name: str, backend: str, destination: str, extra: list[str], interface: str) -> dict[str, Any]:
    """Inbound interception of tcp/80 to `destination` (plus `extra` CIDRs no traffic goes to) into :15001."""
    rule = {"name": "web", "direction": "inbound", "protocols": ["tcp"], "interfaces": [interface],
            "destinations": [destination, *extra], "ports": [80], "proxyPort": topo.PROXY_PORT}
    return _doc(name, backend, {"interception": {"rules": [rule]}})


def services_doc(name: str, backend: str, vips: list[str], interfaces: list[str] | None = None,
                 skip: int | None = None) -> dict[str, Any]:
    """One service per VIP (`svc-<i>`, VIP:80), each over SERVICE_BACKENDS backends drawn from the pool
    (bench.topology.service_backend); `skip`: leave service i out (a removed service)."""
    services = [{"name": f"svc-{i}", "vip": vip, "port": 80,
                 "backends": [{"address": topo.service_backend(i, j), "port": 8080}
                              for j in range(topo.SERVICE_BACKENDS)]}
                for i, vip in enumerate(vips) if i != skip]
    section: dict[str, Any] = {"services": services}
    if interfaces:
        section["interfaces"] = interfaces
    return _doc(name, backend, {"loadBalancing": section})


def services_text(name: str, backend: str, vips: list[str], interfaces: list[str] | None = None,
                  skip: int | None = None) -> str:
    """`dump(services_doc(...))`, written directly: PyYAML's emitter takes 10-20 s for 10,000 services of 10
    backends, which would make the harness, not kernform, the slow part. Same text (services_text_matches)."""
    lines = ["apiVersion: kernform/v1", "kind: NetworkIntent", f"metadata: {{name: {name}}}", "spec:",
             f"  backend: {backend}", "  loadBalancing:", "    services:"]
    for i, vip in enumerate(vips):
        if i == skip:
            continue
        lines += [f"    - name: svc-{i}", f"      vip: {vip}", "      port: 80", "      backends:"]
        lines += [f"      - {{address: {topo.service_backend(i, j)}, port: 8080}}"
                  for j in range(topo.SERVICE_BACKENDS)]
    if interfaces:
        lines.append(f"    interfaces: [{', '.join(interfaces)}]")
    return "\n".join(lines) + "\n"


def services_text_matches() -> bool:
    """The hand-written emitter gives the same text as PyYAML's (checked on a small intent before use)."""
    vips = [topo.service_vip(0, k) for k in range(3)]
    return all(services_text("kfbench-x", backend, vips, interfaces, skip) ==
               dump(services_doc("kfbench-x", backend, vips, interfaces, skip))
               for backend in ("tproxy", "ebpf") for interfaces in (None, ["gw-c"]) for skip in (None, 1))


def control_plane_doc(name: str, backend: str, n: int, extra: int = 0,
                      weights: dict[int, int] | None = None) -> dict[str, Any]:
    """The control-plane intent of size N: a deny rule of N CIDRs and a service of min(N, 1000) backends."""
    cidrs = blocklist(n) + [extra_cidr(i) for i in range(extra)]
    doc = filter_doc(name, backend, cidrs, topo.CP_IF)
    doc["spec"].update(lb_doc(name, backend, "10.99.9.10", min(n, 1000), weights)["spec"])
    doc["spec"]["backend"] = backend
    return doc


# ---------------------------------------------------------------- iptables (the classic, linear references)
def iptables_filter(cidrs: list[str]) -> str:
    """A FORWARD chain of one DROP rule per CIDR: every packet walks the whole list."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f"-A FORWARD -d {c} -j DROP" for c in cidrs]
    return "\n".join([*lines, "COMMIT", ""])


def iptables_lb(vip: str, count: int) -> str:
    """kube-proxy's iptables mode in miniature: a chain of DNAT rules, each taken with probability 1/(remaining)."""
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":POSTROUTING ACCEPT [0:0]", ":KFB-SVC - [0:0]",
             f"-A PREROUTING -d {vip}/32 -p tcp --dport 80 -j KFB-SVC",
             f"-A OUTPUT -d {vip}/32 -p tcp --dport 80 -j KFB-SVC"]
    for i in range(count):
        left = count - i
        chance = "" if left == 1 else f"-m statistic --mode random --probability {1 / left:.11f} "
        lines.append(f"-A KFB-SVC -p tcp {chance}-j DNAT --to-destination {topo.backend_address(i)}:8080")
    return "\n".join([*lines, "COMMIT", ""])


def iptables_services(vips: list[str]) -> str:
    """kube-proxy's iptables mode: a KUBE-SERVICES-like chain with one rule per service (walked in order by
    every new connection), jumping to the service's own chain of probability DNAT rules to its backends."""
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":POSTROUTING ACCEPT [0:0]", ":KFB-SERVICES - [0:0]"]
    lines += [f":KFB-SVC-{i} - [0:0]" for i in range(len(vips))]
    lines += ["-A PREROUTING -j KFB-SERVICES", "-A OUTPUT -j KFB-SERVICES"]
    lines += [f"-A KFB-SERVICES -d {vip}/32 -p tcp --dport 80 -j KFB-SVC-{i}" for i, vip in enumerate(vips)]
    count = topo.SERVICE_BACKENDS
    for i in range(len(vips)):
        for j in range(count):
            left = count - j
            chance = "" if left == 1 else f"-m statistic --mode random --probability {1 / left:.11f} "
            lines.append(f"-A KFB-SVC-{i} -p tcp {chance}-j DNAT --to-destination {topo.service_backend(i, j)}:8080")
    return "\n".join([*lines, "COMMIT", ""])


def iptables_interception(destination: str, extra: list[str]) -> str:
    """The documented TPROXY setup (-m socket divert, then one TPROXY rule per destination, linear)."""
    tproxy = f"-p tcp --dport 80 -j TPROXY --on-port {topo.PROXY_PORT} --tproxy-mark 0x1/0x1"
    lines = ["*mangle", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
             ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]", ":DIVERT - [0:0]",
             "-A PREROUTING -p tcp -m socket -j DIVERT"]
    lines += [f"-A PREROUTING -d {c} {tproxy}" for c in extra]
    lines += [f"-A PREROUTING -d {destination} {tproxy}", "-A DIVERT -j MARK --set-mark 1", "-A DIVERT -j ACCEPT"]
    return "\n".join([*lines, "COMMIT", ""])

