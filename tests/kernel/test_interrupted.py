"""Interrupted runs: a SIGKILL at a kernel-changing call of apply or destroy, then a run that converges.

strace's fault injection kills `kernform apply` or `kernform destroy` as it
enters the Nth call of one syscall (`-e inject=bpf:signal=KILL:when=N`): every
netlink send (nftables, rtnetlink, tc), every bpf() call (loads, map writes,
links, pins), every mkdir/rmdir/unlink/rename (pins, cgroups, markers, the
ownership record). The points are sampled per syscall from a traced run of the
same command: the first ones, the last ones, the middle and a seeded random
few. After each kill, the next run must converge: either `destroy` finds and
removes everything of the intent (nft table, protocol-158 rules and routes,
tc filters and clsact of ours, pins, cgroup, ownership record, lock file), or
`apply` completes and a `plan` afterwards is empty.

Both backends; one namespace `kfk<pid>` with a veth pair born inside it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox import kernform as run_kernform
from sandbox import sh, veth_namespace

pytestmark = pytest.mark.kernel
PID = os.getpid() % 100000
NS = f"kfk{PID}"
DEV = "kfk0"
SYSCALLS = ("bpf", "sendmsg", "sendto", "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename")
POINTS_PER_PHASE = {"tproxy": 20, "ebpf": 10}


def intent_text(name: str) -> str:
    return f"""apiVersion: kernform/v1
kind: NetworkIntent
metadata: {{name: {name}}}
spec:
  ebpf:
    interfaces: [{DEV}]
  interception:
    routingTable: 7400
    rulePriority: 400
    fwmark: "0x400"
    rules:
      - {{name: web, direction: inbound, protocols: [tcp], interfaces: [{DEV}], destinations: [198.51.100.0/24],
          ports: [80], proxyPort: 15001}}
  loadBalancing:
    services:
      - name: web
        vip: 10.74.0.10
        port: 80
        protocol: tcp
        backends:
          - {{address: 10.74.1.1, port: 8080, weight: 2}}
          - {{address: 10.74.1.2, port: 8080, weight: 1}}
  routing:
    tables:
      - name: uplink
        id: 240
        routes:
          - {{to: 10.240.0.0/24, dev: {DEV}}}
    rules:
      - {{name: from-lan, priority: 1240, table: uplink, from: 10.41.0.0/16}}
  filtering:
    input:
      rules:
        - {{name: deny-list, action: deny, protocol: tcp, interfaces: [{DEV}],
            sources: [192.0.2.0/24, 203.0.113.0/24, 198.18.0.0/15]}}
"""


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    if shutil.which("strace") is None:
        pytest.skip("strace is needed to inject kills (scripts/setup.sh installs it)")
    with veth_namespace(NS, DEV, proxy=True) as name:
        try:
            yield name
        finally:
            for backend in ("tproxy", "ebpf"):  # a test cut short leaves nothing behind either
                kernform("destroy", "--yes", "--netns", NS, "--intent", f"killed-{backend}-{PID}")


def kernform(*args: str, strace: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_kernform(*args, prefix=tuple(strace or ()))


def syscall_counts(args: list[str], tmp: Path) -> dict[str, int]:
    """Calls of each traced syscall made by one run of `kernform *args`."""
    out = tmp / "counts.txt"
    run = kernform(*args, strace=["strace", "-f", "-qq", "-c", "-o", str(out), "-e", "trace=" + ",".join(SYSCALLS)])
    assert run.returncode == 0, run.stderr
    counts = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        if parts and parts[-1] in SYSCALLS and len(parts) >= 5:
            counts[parts[-1]] = int(parts[3])
    return counts


def sampled(counts: dict[str, int], budget: int, seed: int) -> list[tuple[str, int]]:
    """Kill points: per syscall its first two calls, the last two and the middle, then seeded random ones."""
    rng = random.Random(seed)
    points: list[tuple[str, int]] = []
    for name, total in sorted(counts.items()):
        for when in (1, 2, total // 2, total - 1, total):
            if 1 <= when <= total and (name, when) not in points:
                points.append((name, when))
    every = [(name, when) for name, total in counts.items() for when in range(1, total + 1)]
    rng.shuffle(every)
    extra = [p for p in every if p not in points]
    if len(points) > budget:
        points = rng.sample(points, budget)
    return points + extra[: max(0, budget - len(points))]


def killed_at(point: tuple[str, int], *args: str) -> subprocess.CompletedProcess[str]:
    name, when = point
    return kernform(*args, strace=["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={name}",
                                   "-e", f"inject={name}:signal=KILL:when={when}"])


def what_is_left(intent: str) -> list[str]:
    """Everything of `intent` (or of kernform in the namespace) that a complete destroy removes."""
    left = []
    ruleset = json.loads(sh("ip", "netns", "exec", NS, "nft", "-j", "list", "ruleset"))
    left += [f"nft table {i['table']['name']}" for i in ruleset["nftables"] if "table" in i]
    for family in ("-4", "-6"):
        left += [f"rule {line}" for line in sh("ip", "-n", NS, family, "rule", "show").splitlines() if "proto 158" in line]
        left += [f"route {line}" for line in sh("ip", "-n", NS, family, "route", "show", "table", "all",
                                                "proto", "158").splitlines()]
    for direction in ("ingress", "egress"):
        left += [f"tc {direction} {line}" for line in
                 sh("tc", "-n", NS, "filter", "show", "dev", DEV, direction).splitlines() if line.strip()]
    if "clsact" in sh("tc", "-n", NS, "qdisc", "show", "dev", DEV):
        left.append("clsact qdisc")
    pins = Path("/sys/fs/bpf/kernform") / intent
    if pins.exists():
        left += [f"pin {p}" for p in sorted(pins.rglob("*"))] or [f"pin {pins}"]
    from reconciler.drivers.bpf import cgroup2_root

    cgroup = cgroup2_root() / "kernform" / f"{intent}@{NS}"
    if cgroup.exists():
        left.append(f"cgroup {cgroup}")
    run_dir = Path(os.environ.get("KERNFORM_RUN_DIR", "/run/kernform"))
    left += [f"run file {p}" for p in [run_dir / "owned" / NS / f"{intent}.json", run_dir / f"{NS}-{intent}.lock",
                                       *(run_dir / "owned" / NS).glob(f".{intent}.json.*")] if p.exists()]
    return left


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("backend", ["tproxy", "ebpf"])
def test_a_kill_at_any_point_of_apply_or_destroy_is_followed_by_a_run_that_converges(
        namespace: str, backend: str, tmp_path: Path) -> None:
    if backend == "ebpf":
        pytest.importorskip("bcc")
    intent = f"killed-{backend}-{PID}"
    path = tmp_path / "intent.yaml"
    path.write_text(intent_text(intent))
    apply_args = ["apply", "--quiet", "--netns", NS, "--backend", backend, str(path)]
    destroy_args = ["destroy", "--yes", "--netns", NS, "--intent", intent]
    plan_args = ["plan", "--detailed-exitcode", "--netns", NS, "--backend", backend, str(path)]

    apply_counts = syscall_counts(apply_args, tmp_path)
    destroy_counts = syscall_counts(destroy_args, tmp_path)
    assert what_is_left(intent) == []
    failures: list[str] = []
    tried = 0
    started = time.monotonic()
    for phase, counts in (("apply", apply_counts), ("destroy", destroy_counts)):
        for number, point in enumerate(sampled(counts, POINTS_PER_PHASE[backend], seed=PID)):
            if phase == "destroy":
                assert kernform(*apply_args).returncode == 0
            run = killed_at(point, *(apply_args if phase == "apply" else destroy_args))
            if run.returncode != -9 and run.returncode != 137:
                continue  # this run made fewer such calls: not a kill point
            tried += 1
            where = f"{phase} killed at {point[0]} #{point[1]}"
            print(f"{where} ({time.monotonic() - started:.0f} s)", flush=True)
            if phase == "apply" and number % 2:
                # The next apply converges, and a plan afterwards has nothing to do.
                again = kernform(*apply_args)
                if again.returncode != 0:
                    failures.append(f"{where}: the next apply failed: {again.stderr.strip()[-400:]}")
                elif (plan := kernform(*plan_args)).returncode != 0:
                    failures.append(f"{where}: after the next apply, plan still wants: {plan.stdout[-400:]}")
            done = kernform(*destroy_args)
            if done.returncode != 0:
                failures.append(f"{where}: destroy failed: {done.stderr.strip()[-400:]}")
            left = what_is_left(intent)
            if left:
                failures.append(f"{where}: destroy left {left}")
                kernform(*destroy_args)
    assert tried >= 10, (apply_counts, destroy_counts)
    assert not failures, "\n".join(failures)
