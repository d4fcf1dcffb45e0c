"""A safe apply for remote hosts: `apply --confirm-within`, `confirm`, `rollback`, probes, and the refusal
of an intent that would cut the SSH session the command runs over.

Namespace `kfc<pid>` with a veth pair born inside it; the "SSH session" of the
guard tests is an SSH_CONNECTION given to a kernform run inside that namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox import kernform as run_kernform
from sandbox import sh, veth_namespace

pytestmark = pytest.mark.kernel
PID = os.getpid() % 100000
NS = f"kfc{PID}"
DEV = "kfc0"


def version(name: str, cidr: str, route: str) -> str:
    return f"""apiVersion: kernform/v1
kind: NetworkIntent
metadata: {{name: {name}}}
spec:
  ebpf:
    interfaces: [{DEV}]
  routing:
    tables:
      - name: uplink
        id: 260
        routes:
          - {{to: {route}, dev: {DEV}}}
  filtering:
    input:
      rules:
        - {{name: deny-list, action: deny, protocol: tcp, interfaces: [{DEV}], sources: [{cidr}]}}
"""


def kernform(*args: str, inside: bool = False, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_kernform(*args, prefix=("ip", "netns", "exec", NS) if inside else (), env=env)


@pytest.fixture
def namespace() -> Iterator[str]:
    with veth_namespace(NS, DEV, address="10.9.0.1/24") as name:
        yield name


def in_sync(path: Path, backend: str) -> bool:
    return kernform("plan", "--detailed-exitcode", "--netns", NS, "--backend", backend, str(path)).returncode == 0


def checkpoint_file(intent: str) -> Path:
    return Path(os.environ.get("KERNFORM_RUN_DIR", "/run/kernform")) / "checkpoints" / f"{NS}-{intent}.json"


def wait_for(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("backend", ["tproxy", "ebpf"])
def test_an_unconfirmed_change_is_rolled_back_at_the_deadline(namespace: str, backend: str, tmp_path: Path) -> None:
    if backend == "ebpf":
        pytest.importorskip("bcc")
    intent = f"trial-{backend}-{PID}"
    v1, v2 = tmp_path / "v1.yaml", tmp_path / "v2.yaml"
    v1.write_text(version(intent, "192.0.2.0/24", "10.61.0.0/24"))
    v2.write_text(version(intent, "198.51.100.0/24", "10.62.0.0/24"))
    try:
        assert kernform("apply", "-q", "--netns", NS, "--backend", backend, str(v1)).returncode == 0
        trial = kernform("apply", "-q", "--netns", NS, "--backend", backend, "--confirm-within", "3", str(v2))
        assert trial.returncode == 0, trial.stderr
        assert "confirm" in trial.stdout
        assert in_sync(v2, backend)
        refused = kernform("apply", "-q", "--netns", NS, "--backend", backend, str(v1))
        assert refused.returncode == 1 and "awaiting confirmation" in refused.stderr
        # Nobody confirms: the waiter puts v1 back.
        assert wait_for(lambda: not checkpoint_file(intent).exists(), 30)
        assert in_sync(v1, backend)
        records = [json.loads(line) for line in Path(os.environ["KERNFORM_AUDIT_LOG"]).read_text().splitlines()]
        assert any(r["verb"] == "rollback" and r["intent"] == intent and r["trigger"] == "confirm-timeout"
                   for r in records)
    finally:
        kernform("destroy", "--yes", "--netns", NS, "--intent", intent)


def test_confirm_keeps_rollback_reverts_and_a_failed_probe_reverts_at_once(namespace: str, tmp_path: Path) -> None:
    intent = f"trial-{PID}"
    v1, v2 = tmp_path / "v1.yaml", tmp_path / "v2.yaml"
    v1.write_text(version(intent, "192.0.2.0/24", "10.61.0.0/24"))
    v2.write_text(version(intent, "198.51.100.0/24", "10.62.0.0/24"))
    apply = ["apply", "-q", "--netns", NS, "--backend", "tproxy"]
    try:
        assert kernform(*apply, str(v1)).returncode == 0
        assert kernform(*apply, "--confirm-within", "2", str(v2)).returncode == 0
        assert kernform("confirm", "--netns", NS).returncode == 0
        time.sleep(3)  # past the deadline: confirmed, so it stays
        assert in_sync(v2, "tproxy") and not checkpoint_file(intent).exists()
        assert kernform("confirm", "--netns", NS).returncode == 1  # nothing awaits confirmation

        assert kernform(*apply, "--confirm-within", "60", str(v1)).returncode == 0
        assert in_sync(v1, "tproxy")
        status = kernform("status", "--netns", NS, "--json")
        (entry,) = [e for e in json.loads(status.stdout)["intents"] if e["intent"] == intent]
        assert entry["trial"] is not None and 0 < entry["trial"]["secondsLeft"] <= 60
        assert "on trial" in kernform("status", "--netns", NS).stdout
        rolled = kernform("rollback", "--netns", NS)
        assert rolled.returncode == 0, rolled.stderr
        assert in_sync(v2, "tproxy") and not checkpoint_file(intent).exists()

        probed = kernform(*apply, "--confirm-within", "60", "--probe", "127.0.0.1:9", str(v1))
        assert probed.returncode == 1 and "probe failed" in probed.stderr
        assert in_sync(v2, "tproxy") and not checkpoint_file(intent).exists()
    finally:
        kernform("destroy", "--yes", "--netns", NS, "--intent", intent)


def test_a_trial_from_nothing_leaves_nothing_when_it_times_out(namespace: str, tmp_path: Path) -> None:
    intent = f"fresh-{PID}"
    path = tmp_path / "v1.yaml"
    path.write_text(version(intent, "192.0.2.0/24", "10.61.0.0/24"))
    assert kernform("apply", "-q", "--netns", NS, "--backend", "tproxy", "--confirm-within", "1",
                    str(path)).returncode == 0
    assert wait_for(lambda: not checkpoint_file(intent).exists(), 30)
    assert "proto 158" not in sh("ip", "-n", NS, "route", "show", "table", "all")
    assert f"kernform-{intent}" not in sh("ip", "netns", "exec", NS, "nft", "list", "tables")
    run_dir = Path(os.environ.get("KERNFORM_RUN_DIR", "/run/kernform"))
    assert not (run_dir / "owned" / NS / f"{intent}.json").exists()


def test_an_intent_that_would_cut_the_ssh_session_is_refused_unless_forced(namespace: str, tmp_path: Path) -> None:
    intent = f"guard-{PID}"
    ssh = {"SSH_CONNECTION": "10.9.0.2 50022 10.9.0.1 22"}
    cutting, harmless = tmp_path / "cutting.yaml", tmp_path / "harmless.yaml"
    cutting.write_text(version(intent, "10.9.0.0/24", "10.61.0.0/24").replace(
        "protocol: tcp,", "protocol: tcp, ports: [22],"))
    harmless.write_text(version(intent, "10.9.0.0/24", "10.61.0.0/24").replace(
        "protocol: tcp,", "protocol: tcp, ports: [80],"))
    try:
        refused = kernform("apply", "-q", "--backend", "tproxy", str(cutting), inside=True, env=ssh)
        assert refused.returncode == 1
        assert f"{cutting}:" in refused.stderr and "deny-list" in refused.stderr and "--force" in refused.stderr
        assert "10.9.0.2 -> 10.9.0.1:22 on kfc0" in refused.stderr
        assert f"kernform-{intent}" not in sh("ip", "netns", "exec", NS, "nft", "list", "tables")

        assert kernform("apply", "-q", "--backend", "tproxy", str(harmless), inside=True, env=ssh).returncode == 0
        forced = kernform("apply", "-q", "--backend", "tproxy", "--force", str(cutting), inside=True, env=ssh)
        assert forced.returncode == 0, forced.stderr
    finally:
        kernform("destroy", "--yes", "--intent", intent, inside=True)
