"""Service dispatch at scale on the tproxy backend: one verdict map lookup whatever the number of services.

Hundreds of services applied in a namespace of their own, real connections from a process in it to the
first, a middle and the last VIP (the nat output path), each answered by one of its service's backends;
the dispatch chains hold one rule per family however many services there are; adding or removing a service
rewrites no rule of any other service (their kernel handles are unchanged) and the change takes effect.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox import ADDRESS_SERVER, kernform, sh, veth_namespace

NS = "kfsvcd"
DEV = "svc0"
SERVICES = 300
BACKENDS = 2
TABLE = "kernform-svcdispatch"

# Run inside the namespace: connect to each VIP:80 given and print what answered (or the error).
CLIENT = """
import json, socket, sys
out = {}
for vip in sys.argv[1:]:
    try:
        with socket.create_connection((vip, 80), timeout=1.0) as c:
            out[vip] = c.recv(64).decode().strip()
    except OSError as exc:
        out[vip] = "error: " + type(exc).__name__
print(json.dumps(out))
"""


def vip(i: int) -> str:
    return f"10.100.{i // 256}.{i % 256}"


def backend(i: int, j: int) -> str:
    n = i * BACKENDS + j
    return f"10.90.{n // 256}.{n % 256}"


def intent(services: range) -> str:
    lines = ["apiVersion: kernform/v1", "kind: NetworkIntent", "metadata: {name: svcdispatch}", "spec:",
             "  backend: tproxy", "  loadBalancing:", "    services:"]
    for i in services:
        lines.append(f"      - name: s{i}\n        vip: {vip(i)}\n        port: 80\n        backends:")
        lines += [f"          - {{address: {backend(i, j)}, port: 8080}}" for j in range(BACKENDS)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def lab() -> Iterator[str]:
    with veth_namespace(NS, DEV, "10.77.0.1/24") as ns:
        sh("ip", "-n", ns, "route", "add", "default", "dev", DEV)
        batch = "".join(f"address add {backend(i, j)}/32 dev lo\n"
                        for i in range(SERVICES + 1) for j in range(BACKENDS))
        subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch, text=True, check=True)
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", ADDRESS_SERVER])
        try:
            yield ns
        finally:
            server.kill()
            server.wait()
            kernform("destroy", "--yes", "--intent", "svcdispatch", "--netns", ns, "--quiet")


def answers(ns: str, indexes: list[int]) -> dict[int, str]:
    res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, *map(vip, indexes)],
                         capture_output=True, text=True, timeout=120, check=True)
    by_vip = json.loads(res.stdout)
    return {i: by_vip[vip(i)] for i in indexes}


def rule_handles(ns: str) -> dict[tuple[str, str], int]:
    """(chain, comment) -> handle of every rule of the intent's table, as the kernel holds them."""
    listing = json.loads(sh("ip", "netns", "exec", ns, "nft", "-j", "-a", "list", "table", "inet", TABLE))
    return {(r["rule"]["chain"], r["rule"].get("comment", "")): r["rule"]["handle"]
            for r in listing["nftables"] if "rule" in r}


def apply(tmp: Path, ns: str, services: range) -> None:
    path = tmp / "intent.yaml"
    path.write_text(intent(services))
    res = kernform("apply", str(path), "--netns", ns, "--quiet")
    assert res.returncode == 0, res.stderr


def wait_for(ns: str, indexes: list[int], good: bool) -> dict[int, str]:
    deadline = time.monotonic() + 10
    while True:
        got = answers(ns, indexes)
        if all(not v.startswith("error") for v in got.values()) == good or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_many_services_are_dispatched_by_one_lookup_and_change_one_at_a_time(lab: str, tmp_path: Path) -> None:
    apply(tmp_path, lab, range(SERVICES))
    handles = rule_handles(lab)
    dispatch = {chain: [c for (ch, c) in handles if ch == chain] for chain in ("lb_pre", "lb_out")}
    assert all(len(rules) == 1 for rules in dispatch.values()), dispatch  # IPv4 only: one rule each
    assert sum(1 for (chain, _) in handles if chain.startswith("lbs_")) == SERVICES

    probe = [0, SERVICES // 2, SERVICES - 1]
    got = wait_for(lab, probe, good=True)
    for i, answer in got.items():
        assert answer in {backend(i, j) for j in range(BACKENDS)}, (i, answer)

    # One more service: its own chain, map and element; nothing else rewritten.
    apply(tmp_path, lab, range(SERVICES + 1))
    after = rule_handles(lab)
    assert {k: after[k] for k in handles} == handles
    assert len(after) == len(handles) + 1
    new = wait_for(lab, [SERVICES], good=True)[SERVICES]
    assert new in {backend(SERVICES, j) for j in range(BACKENDS)}, new

    # The first one gone: its chain with it, every other rule untouched, its VIP no longer balanced.
    apply(tmp_path, lab, range(1, SERVICES + 1))
    final = rule_handles(lab)
    assert {k: v for k, v in after.items() if k[0] != "lbs_s0"} == final
    assert wait_for(lab, [0], good=False)[0].startswith("error")
    assert wait_for(lab, [1, SERVICES], good=True)


def test_the_plan_of_a_fresh_process_is_empty_after_the_changes(lab: str, tmp_path: Path) -> None:
    """The verdict map's elements read back as the compiler writes them (`vip . tcp . 80 : goto lbs_x`)."""
    path = tmp_path / "intent.yaml"
    path.write_text(intent(range(1, SERVICES + 1)))
    res = kernform("plan", str(path), "--netns", lab, "--detailed-exitcode")
    assert res.returncode == 0, res.stdout + res.stderr



def test_the_last_services_go_with_their_dispatch(lab: str, tmp_path: Path) -> None:
    """Every service removed at once: the verdict map, the chains it jumps to and the dispatch rules go in
    one transaction (the map before the chains it names), the rest of the intent stays."""
    path = tmp_path / "intent.yaml"
    path.write_text(intent(range(3)) + "  filtering:\n    forward:\n      rules:\n"
                    "        - {name: deny-docs, action: deny, destinations: [192.0.2.0/24]}\n")
    assert kernform("apply", str(path), "--netns", lab, "--quiet").returncode == 0
    path.write_text(path.read_text().replace("  loadBalancing:\n    services:\n", "  loadBalancing:\n    services: []\n")
                    .split("      - name: s0")[0] + "  filtering:\n    forward:\n      rules:\n"
                    "        - {name: deny-docs, action: deny, destinations: [192.0.2.0/24]}\n")
    res = kernform("apply", str(path), "--netns", lab, "--quiet")
    assert res.returncode == 0, res.stderr
    handles = rule_handles(lab)
    assert not [chain for chain, _ in handles if chain.startswith("lb")], handles
    assert [chain for chain, _ in handles if chain == "filter_forward"]
