"""Drift seen by content, and ownership that outlives the nft ruleset.

- A rule of kernform's table replaced by hand with a different port but the
  same `kf:` comment is seen by a fresh `plan` and repaired by `apply`, and by a
  running `watch` within a second.
- After `nft flush ruleset` (what firewall reload scripts do) a fresh process
  still finds the intent's protocol-158 rules and routes: `plan` wants to add
  the nft table back, `destroy` removes everything.

Namespace `kfr<pid>` with a veth pair born inside it; nothing in the root namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox import ROOT, kernform, sh, veth_namespace

pytestmark = pytest.mark.kernel
PID = os.getpid() % 100000
NS = f"kfr{PID}"
DEV = "kfr0"


def intent_text(name: str) -> str:
    return f"""apiVersion: kernform/v1
kind: NetworkIntent
metadata: {{name: {name}}}
spec:
  ebpf:
    interfaces: [{DEV}]
  interception:
    routingTable: 7500
    rulePriority: 500
    fwmark: "0x500"
    rules:
      - {{name: web, direction: inbound, protocols: [tcp], interfaces: [{DEV}], destinations: [198.51.100.0/24],
          ports: [80], proxyPort: 15001}}
  routing:
    tables:
      - name: uplink
        id: 250
        routes:
          - {{to: 10.250.0.0/24, dev: {DEV}}}
    rules:
      - {{name: from-lan, priority: 1250, table: uplink, from: 10.51.0.0/16}}
  filtering:
    input:
      rules:
        - {{name: deny-ssh, action: deny, protocol: tcp, ports: [22], interfaces: [{DEV}], sources: [192.0.2.0/24]}}
"""


@pytest.fixture
def namespace() -> Iterator[str]:
    with veth_namespace(NS, DEV, proxy=True) as name:
        yield name


def replace_rule_by_hand(table: str, port_from: str, port_to: str) -> str:
    """Replace the first rule of `table` matching `port_from` with the same rule on `port_to`, comment
    kept (nft replace rule ... handle N); returns the comment."""
    listing = json.loads(sh("ip", "netns", "exec", NS, "nft", "-j", "-a", "list", "table", "inet", table))
    text = sh("ip", "netns", "exec", NS, "nft", "-a", "list", "table", "inet", table)
    for item in listing["nftables"]:
        rule = item.get("rule")
        if not rule or port_from not in json.dumps(rule["expr"]):
            continue
        line = next(line.strip() for line in text.splitlines() if line.strip().endswith(f"# handle {rule['handle']}"))
        body = line.rsplit(" # handle", 1)[0].replace(f"dport {port_from}", f"dport {port_to}")
        assert f"dport {port_to}" in body, body
        sh("ip", "netns", "exec", NS, "nft",
           f"replace rule inet {table} {rule['chain']} handle {rule['handle']} {body}")
        return str(rule["comment"])
    raise AssertionError(f"no rule on {port_from} in {table}:\n{text}")


@pytest.mark.parametrize("backend", ["tproxy"])
def test_a_rule_edited_by_hand_under_the_same_comment_is_drift(namespace: str, backend: str, tmp_path: Path) -> None:
    intent = f"drift-{PID}"
    path = tmp_path / "intent.yaml"
    path.write_text(intent_text(intent))
    table = f"kernform-{intent}"
    try:
        assert kernform("apply", "--quiet", "--netns", NS, "--backend", backend, str(path)).returncode == 0
        plan = ["plan", "--detailed-exitcode", "--netns", NS, "--backend", backend, str(path)]
        assert kernform(*plan).returncode == 0

        comment = replace_rule_by_hand(table, "22", "2222")
        assert comment in sh("ip", "netns", "exec", NS, "nft", "list", "table", "inet", table)
        seen = kernform(*plan)
        assert seen.returncode == 2, seen.stdout  # changes pending
        assert "deny-ssh" in seen.stdout
        assert kernform("apply", "--quiet", "--netns", NS, "--backend", backend, str(path)).returncode == 0
        assert kernform(*plan).returncode == 0
        assert "dport 2222" not in sh("ip", "netns", "exec", NS, "nft", "list", "table", "inet", table)

        # A running daemon repairs the same edit within a second.
        watch = subprocess.Popen([sys.executable, "-m", "kernform.cli", "watch", "--netns", NS, "--backend", backend,
                                  "--log-format", "json", str(path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(2)  # started and in sync
            replace_rule_by_hand(table, "22", "2222")
            edited = time.monotonic()
            while "dport 2222" in sh("ip", "netns", "exec", NS, "nft", "list", "table", "inet", table):
                assert time.monotonic() - edited < 1.0, "the daemon did not repair the edited rule within 1 s"
                time.sleep(0.02)
            # What the warm daemon wrote (rule comments from its memo of the kernel's readings) is what a
            # fresh process expects: its plan is empty.
            time.sleep(0.3)
            assert kernform(*plan).returncode == 0
        finally:
            watch.terminate()
            watch.communicate(timeout=20)
    finally:
        kernform("destroy", "--yes", "--netns", NS, "--intent", intent)


@pytest.mark.parametrize("backend", ["tproxy", "ebpf"])
def test_after_nft_flush_ruleset_destroy_still_finds_the_intents_rules_and_routes(
        namespace: str, backend: str, tmp_path: Path) -> None:
    if backend == "ebpf":
        pytest.importorskip("bcc")
    intent = f"flushed-{backend}-{PID}"
    path = tmp_path / "intent.yaml"
    path.write_text(intent_text(intent))
    try:
        assert kernform("apply", "--quiet", "--netns", NS, "--backend", backend, str(path)).returncode == 0
        assert "proto 158" in sh("ip", "-n", NS, "rule", "show")
        sh("ip", "netns", "exec", NS, "nft", "flush", "ruleset")

        plan = kernform("plan", "--netns", NS, "--backend", backend, str(path))
        assert f"+ table inet kernform-{intent}" in plan.stdout, plan.stdout
        done = kernform("destroy", "--yes", "--netns", NS, "--intent", intent)
        assert done.returncode == 0 and "Nothing to destroy" not in done.stdout, done.stdout
        assert "proto 158" not in sh("ip", "-n", NS, "rule", "show")
        assert sh("ip", "-n", NS, "route", "show", "table", "all", "proto", "158") == ""
        assert kernform("destroy", "--yes", "--netns", NS, "--intent", intent).stdout.startswith("Nothing to destroy")
    finally:
        kernform("destroy", "--yes", "--netns", NS, "--intent", intent)
