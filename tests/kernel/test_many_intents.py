"""Many intents in one namespace: a directory planned and applied intent by intent, conflicts refused untouched.

Everything happens in one namespace of this test's own (`kfm<pid>`) holding a
veth pair born inside it; the root namespace is never changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
PID = os.getpid() % 100000
NS = f"kfm{PID}"
DEV = "kfmd0"


def intent(name: str, body: str) -> str:
    return f"apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata:\n  name: {name}-{PID}\nspec:\n{body}"


A = intent("a", f"""  routing:
    tables:
      - name: uplink
        id: 200
        routes:
          - {{to: 10.200.0.0/24, dev: {DEV}}}
    rules:
      - {{name: from-lan, priority: 1000, table: uplink, from: 10.1.0.0/16}}
""")
B = intent("b", f"""  interception:
    routingTable: 7201
    rulePriority: 201
    fwmark: "0x201"
    rules:
      - {{name: web, direction: inbound, interfaces: [{DEV}], destinations: [198.51.100.0/24], ports: [80],
          proxyPort: 15001}}
  routing:
    tables:
      - name: backup
        id: 201
        routes:
          - {{to: 10.201.0.0/24, dev: {DEV}}}
    rules:
      - {{name: to-backup, priority: 1001, table: backup, to: 10.201.0.0/24}}
""")
# Conflicts with both: a's routing table 200, b's rule priority 1001 and b's interception mark.
C = intent("c", f"""  interception:
    routingTable: 7301
    rulePriority: 301
    fwmark: "0x201"
    rules:
      - {{name: other, direction: inbound, interfaces: [{DEV}], destinations: [203.0.113.0/24], proxyPort: 15002}}
  routing:
    tables:
      - name: mine
        id: 200
        routes:
          - {{to: 10.202.0.0/24, dev: {DEV}}}
    rules:
      - {{name: late, priority: 1001, table: mine}}
""")
# Valid, but the kernel refuses it: its route leaves through an interface the namespace lacks.
BROKEN = intent("z", """  routing:
    tables:
      - name: nowhere
        id: 209
        routes:
          - {to: 10.209.0.0/24, dev: kfmnodev0}
""")


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def kernform(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kernform.cli", *args], capture_output=True, text=True, cwd=ROOT)


def kernel_state() -> dict[str, Any]:
    """Everything apply could change in the namespace, as the kernel lists it."""
    state: dict[str, Any] = {"nft": json.loads(sh("ip", "netns", "exec", NS, "nft", "-j", "list", "ruleset"))}
    for family in ("-4", "-6"):
        state[f"rules{family}"] = sh("ip", "-n", NS, family, "rule", "show")
        state[f"routes{family}"] = sh("ip", "-n", NS, family, "route", "show", "table", "all")
    return state


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    sh("ip", "netns", "del", NS, check=False)
    try:
        sh("ip", "netns", "add", NS)
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        sh("ip", "-n", NS, "link", "add", DEV, "type", "veth", "peer", "name", DEV + "p")
        # No IPv6 link-local addresses: they arrive after DAD, at any time, and are not what the test compares.
        for dev in (DEV, DEV + "p"):
            sh("ip", "-n", NS, "link", "set", dev, "addrgenmode", "none")
            sh("ip", "-n", NS, "link", "set", dev, "up")
        yield NS
    finally:
        for name in ("a", "b", "c", "z"):
            kernform("destroy", "--yes", "--netns", NS, "--intent", f"{name}-{PID}")
        sh("ip", "-n", NS, "link", "del", DEV, check=False)  # veths before their namespace
        sh("ip", "netns", "del", NS, check=False)


def test_a_directory_is_planned_applied_and_a_conflicting_third_intent_changes_nothing(
        namespace: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.yaml").write_text(A)
    (repo / "b.yml").write_text(B)
    (repo / "README.md").write_text("not an intent")

    # plan --json over the directory: formatVersion 2, one whole plan per intent, totals.
    result = kernform("plan", "--netns", namespace, "--json", "--detailed-exitcode", str(repo))
    assert result.returncode == 2, result.stderr
    document = json.loads(result.stdout)
    jsonschema.validate(document, json.loads((ROOT / "schemas" / "plan.schema.json").read_text()))
    assert document["formatVersion"] == 2
    assert [p["intent"] for p in document["plans"]] == [f"a-{PID}", f"b-{PID}"]
    assert document["summary"]["intentsWithChanges"] == 2
    assert document["summary"]["add"] == sum(p["summary"]["add"] for p in document["plans"]) > 0

    result = kernform("apply", "--netns", namespace, "--quiet", str(repo))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"Applied 2 intents on netns {namespace}: a-{PID}, b-{PID}."
    tables = sh("ip", "netns", "exec", namespace, "nft", "list", "tables")
    assert f"kernform-a-{PID}" in tables and f"kernform-b-{PID}" in tables
    rules = sh("ip", "-n", namespace, "-4", "rule", "show")
    assert "1000:\tfrom 10.1.0.0/16 lookup 200 proto 158" in rules, rules
    assert "1001:\tfrom all to 10.201.0.0/24 lookup 201 proto 158" in rules, rules
    assert "201:\tfrom all fwmark 0x201 lookup 7201 proto 158" in rules, rules

    result = kernform("plan", "--netns", namespace, "--detailed-exitcode", str(repo))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == f"No changes in any of the 2 intents on netns {namespace}."

    before = kernel_state()
    third = tmp_path / "c.yaml"
    third.write_text(C)
    # Alone: refused against what the kernel holds for the applied intents.
    result = kernform("apply", "--netns", namespace, str(third))
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert any(line.startswith(f"{third}:15:9: routing table 200 (routing.tables 'mine') conflicts with intent "
                               f"'a-{PID}' applied in netns {namespace}, which owns routing table 200") for line in errors), errors
    assert any(line.startswith(f"{third}:19:22: ip rule priority 1001 (routing.rules 'late') conflicts with intent "
                               f"'b-{PID}' applied in netns {namespace}") for line in errors), errors
    assert any(line.startswith(f"{third}:9:5: fwmark 0x201/0xffffffff (interception.fwmark) conflicts with intent "
                               f"'b-{PID}' applied") for line in errors), errors
    assert kernel_state() == before
    # With the directory: refused between the files, both positions named.
    (repo / "c.yaml").write_text(C)
    result = kernform("apply", "--netns", namespace, str(repo))
    assert result.returncode == 1
    assert (f"{repo}/c.yaml:15:9: routing table 200 (routing.tables 'mine') conflicts with routing table 200 "
            f"(routing.tables 'uplink') of intent 'a-{PID}' at {repo}/a.yaml:9:9: ") in result.stderr, result.stderr
    assert f"of intent 'b-{PID}' at {repo}/b.yml:20:27" in result.stderr, result.stderr
    assert result.stdout == ""
    assert kernel_state() == before
    (repo / "c.yaml").unlink()

    # A kernel failure stops the set and says which intents were applied and which were not.
    (repo / "z.yaml").write_text(BROKEN)
    result = kernform("apply", "--netns", namespace, "--quiet", str(repo))
    assert result.returncode == 1
    assert (f"kernform: stopped at intent z-{PID}, whose apply failed (see above); applied on netns {namespace}: "
            f"a-{PID}, b-{PID}; not applied: z-{PID}.") in result.stderr, result.stderr
    assert f"kernform-z-{PID}" not in sh("ip", "netns", "exec", namespace, "nft", "list", "tables")

    # destroy takes the directory too, in reverse order.
    (repo / "z.yaml").unlink()
    result = kernform("destroy", "--yes", "--quiet", "--netns", namespace, str(repo))
    assert result.returncode == 0, result.stderr
    assert [line.split(" objects of intent ")[1].split()[0] for line in result.stdout.splitlines()] == [
        f"b-{PID}", f"a-{PID}"]
    assert "kernform-" not in sh("ip", "netns", "exec", namespace, "nft", "list", "tables")
    assert "proto 158" not in sh("ip", "-n", namespace, "-4", "rule", "show")


def service(name: str, vip: str) -> str:
    return intent(name, f"""  loadBalancing:
    services:
      - {{name: web, vip: "{vip}", port: 80, backends: [{{address: "fd09::1:1"}}]}}
""")


@pytest.mark.parametrize("backend", ["tproxy", "ebpf"])
def test_a_vip_another_applied_intent_balances_is_refused_before_the_kernel(
        namespace: str, tmp_path: Path, backend: str) -> None:
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(service("v1", "fd09::10"))
    second.write_text(service("v2", "fd09:0::10"))  # the same address, written differently
    try:
        result = kernform("apply", "--netns", namespace, "--backend", backend, "--quiet", str(first))
        assert result.returncode == 0, result.stderr
        before = kernel_state()
        result = kernform("apply", "--netns", namespace, "--backend", backend, str(second))
        assert result.returncode == 1
        assert result.stderr.startswith(
            f"{second}:8:21: VIP [fd09::10]:80/tcp of service 'web' conflicts with intent 'v1-{PID}' applied in "
            f"netns {namespace}, which balances that VIP (recorded in nft table kernform-v1-{PID})"), result.stderr
        assert kernel_state() == before
    finally:
        kernform("destroy", "--yes", "--netns", namespace, "--intent", f"v1-{PID}")
