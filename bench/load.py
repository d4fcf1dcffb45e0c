"""Running the load generator (bench/kfload.c, compiled at start) inside a namespace, and summarising results."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parent / "kfload.c"


def build(workdir: Path) -> Path:
    """Compile kfload into the run's directory (gcc -O2); returns the binary."""
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc is needed to build bench/kfload.c (apt-get install gcc)")
    binary = workdir / "kfload"
    res = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(SOURCE)], capture_output=True, text=True,
                         timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"building kfload failed:\n{res.stderr}")
    return binary


@dataclass(frozen=True)
class Load:
    """Where a load runs and what it hits. `cgroup`: join that cgroup v2 directory before entering `ns`;
    `addresses`: each connection goes to one of that many consecutive addresses from `addr`, at random."""

    ns: str
    addr: str
    port: int
    cgroup: str | None = None
    label: str = ""
    addresses: int = 1


@dataclass(frozen=True)
class LoadSettings:
    conns: int
    seconds: float
    warmup: float


def run(binary: Path, load: Load, settings: LoadSettings, keepalive: bool) -> dict[str, Any]:
    argv: list[str] = ["ip", "netns", "exec", load.ns, str(binary), "-a", load.addr, "-p", str(load.port),
                       "-c", str(settings.conns), "-d", str(settings.seconds), "-w", str(settings.warmup)]
    if keepalive:
        argv.append("-k")
    if load.addresses > 1:
        argv += ["-n", str(load.addresses)]
    if load.cgroup is not None:
        # The process joins the cgroup first (ip netns exec remounts /sys, so the path is written from outside).
        argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', load.cgroup, *argv]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=settings.seconds + settings.warmup + 30)
    if res.returncode != 0:
        raise RuntimeError(f"kfload in {load.ns} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def retransmits(ns: str) -> dict[str, int]:
    """Namespace `ns`'s retransmission counters so far: SYNs sent again (TcpExtTCPSynRetrans: a connection that
    waited ~1 s or more) and all segments sent again (TcpRetransSegs: also requests or handshake ACKs resent)."""
    res = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp", "/proc/net/netstat"],
                         capture_output=True, text=True, timeout=10)
    tables: dict[str, dict[str, int]] = {}
    lines = res.stdout.splitlines()
    for head, values in zip(lines, lines[1:], strict=False):
        h, v = head.split(), values.split()
        if len(h) > 1 and len(v) > 1 and h[0] == v[0] and not h[1].lstrip("-").isdigit() \
                and v[1].lstrip("-").isdigit():
            tables[h[0]] = dict(zip(h[1:], (int(x) for x in v[1:]), strict=False))
    return {"syn_retrans": tables.get("TcpExt:", {}).get("TCPSynRetrans", -1),
            "retrans_segs": tables.get("Tcp:", {}).get("RetransSegs", -1)}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median with min, max and the interquartile range."""
    vals = sorted(values)
    if not vals:
        return {}
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "q1": q1, "q3": q3, "n": len(vals)}


def percentile(values: Sequence[float], p: float) -> float:
    vals = sorted(values)
    if not vals:
        return float("nan")
    k = p * (len(vals) - 1)
    lo = int(k)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def summarise(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """A row's repetitions: rate spread, median of each latency percentile, total errors."""
    errors: dict[str, int] = {}
    for r in reps:
        for kind, count in r["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    return {
        "rate": spread([r["rate"] for r in reps]),
        "latency_us": {p: statistics.median(r["latency_us"][p] for r in reps)
                       for p in ("p50", "p90", "p99", "p999", "max") if all(p in r["latency_us"] for r in reps)},
        "reps": [{"rate": r["rate"], "p50": r["latency_us"]["p50"], "p99": r["latency_us"]["p99"],
                  **{k: r[k] for k in ("syn_retrans", "retrans_segs") if k in r}} for r in reps],
        "requests": sum(r["requests"] for r in reps),
        "errors": {k: v for k, v in errors.items() if v},
    }
