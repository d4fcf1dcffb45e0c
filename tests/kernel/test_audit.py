"""The audit trail: every apply, destroy and repair that changes the kernel leaves one record.

Records are read back from the JSON-lines file and from a stand-in for the
journal (a datagram socket of the test's own, in the journal's native
protocol). Namespace `kfa<pid>` only.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
PID = os.getpid() % 100000
NS = f"kfa{PID}"
INTENT = f"audited-{PID}"
GOOD = f"""apiVersion: kernform/v1
kind: NetworkIntent
metadata: {{name: {INTENT}}}
spec:
  routing:
    tables:
      - name: uplink
        id: 230
        routes:
          - {{to: 10.230.0.0/24, dev: lo}}
"""
BROKEN = GOOD.replace("dev: lo", "dev: kfanodev0")  # valid, refused by the kernel: no such interface


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[tuple[Path, socket.socket, dict[str, str]]]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    sh("ip", "netns", "del", NS, check=False)
    sh("ip", "netns", "add", NS)
    sh("ip", "-n", NS, "link", "set", "lo", "up")
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal.sock"))
    journal.settimeout(5)
    env = dict(os.environ, KERNFORM_AUDIT_LOG=str(tmp_path / "audit.jsonl"),
               KERNFORM_JOURNAL_SOCKET=str(tmp_path / "journal.sock"))
    try:
        yield tmp_path / "audit.jsonl", journal, env
    finally:
        journal.close()
        subprocess.run([sys.executable, "-m", "kernform.cli", "destroy", "--yes", "--netns", NS, "--intent", INTENT],
                       cwd=ROOT, capture_output=True, env=env)
        sh("ip", "netns", "del", NS, check=False)


def kernform(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kernform.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def journal_fields(journal: socket.socket) -> dict[str, str]:
    data = journal.recv(1 << 20)
    fields: dict[str, str] = {}
    rest = data
    while rest:
        line, _, rest = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
        else:  # binary-safe form: NAME\n<u64 length><data>\n
            length = int.from_bytes(rest[:8], "little")
            fields[line.decode()] = rest[8 : 8 + length].decode()
            rest = rest[8 + length + 1 :]
    return fields


def test_apply_destroy_and_a_failed_apply_are_recorded_with_who_what_and_the_result(
        audit: tuple[Path, socket.socket, dict[str, str]], tmp_path: Path) -> None:
    log, journal, env = audit
    good, broken = tmp_path / "good.yaml", tmp_path / "broken.yaml"
    good.write_text(GOOD)
    broken.write_text(BROKEN)

    assert kernform(env, "apply", "--netns", NS, "--backend", "tproxy", str(good)).returncode == 0
    (applied,) = records(log)
    assert applied["verb"] == "apply" and applied["result"] == "applied"
    assert applied["intent"] == INTENT and applied["target"] == f"netns {NS}"
    assert applied["intent_sha256"] == hashlib.sha256(GOOD.encode()).hexdigest()
    assert applied["trigger"] == "cli" and "apply" in applied["command"]
    assert applied["who"]["uid"] == os.getuid() and applied["who"]["pid"] > 0
    assert {"op": "add", "kind": "ip.route"} in [{k: a[k] for k in ("op", "kind")} for a in applied["actions"]]
    fields = journal_fields(journal)
    assert fields["SYSLOG_IDENTIFIER"] == "kernform" and fields["KERNFORM_RESULT"] == "applied"
    assert json.loads(fields["KERNFORM_AUDIT"])["intent_sha256"] == applied["intent_sha256"]

    # Nothing to change: no record.
    assert kernform(env, "apply", "--netns", NS, "--backend", "tproxy", str(good)).returncode == 0
    assert len(records(log)) == 1

    # A failed apply is recorded as failed, with the kernel's reason; the previous state stays.
    assert kernform(env, "apply", "--netns", NS, "--backend", "tproxy", str(broken)).returncode == 1
    failed = records(log)[-1]
    assert failed["result"] == "failed" and failed["error"]
    assert failed["intent_sha256"] == hashlib.sha256(BROKEN.encode()).hexdigest()
    assert journal_fields(journal)["PRIORITY"] == "4"

    assert kernform(env, "destroy", "--yes", "--netns", NS, "--intent", INTENT).returncode == 0
    destroyed = records(log)[-1]
    assert destroyed["verb"] == "destroy" and destroyed["result"] == "destroyed"
    assert all(a["op"] == "remove" for a in destroyed["actions"]) and destroyed["actions"]


def test_a_repair_by_the_daemon_is_recorded_with_its_trigger(
        audit: tuple[Path, socket.socket, dict[str, str]], tmp_path: Path) -> None:
    log, _, env = audit
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    watch = subprocess.Popen([sys.executable, "-m", "kernform.cli", "watch", "--netns", NS, "--backend", "tproxy",
                              "--log-format", "json", str(good)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not records(log) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert records(log)[0]["verb"] == "apply"
        sh("ip", "-n", NS, "route", "del", "10.230.0.0/24", "table", "230")
        while len(records(log)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        repaired = records(log)[-1]
        assert repaired["verb"] == "repair" and repaired["result"] == "repaired"
        assert repaired["trigger"] == "kernel" and repaired["source"] == str(good)
        assert repaired["intent_sha256"] == hashlib.sha256(GOOD.encode()).hexdigest()
        assert [(a["op"], a["kind"]) for a in repaired["actions"]] == [("add", "ip.route")]
    finally:
        watch.terminate()
        _, stderr = watch.communicate(timeout=20)
    # The daemon's own JSON log carries the same records.
    assert any(json.loads(line).get("audit", {}).get("verb") == "repair"
               for line in stderr.splitlines() if line.startswith("{"))
