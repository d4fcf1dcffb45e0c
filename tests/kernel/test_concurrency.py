"""Concurrent runs of one intent serialise on its lock: two applies of two versions at once end in one of them,
a second run waits (or fails with --no-wait), an intent a `kernform watch` keeps is refused, and no lock file is
left behind.

Everything happens in a namespace of this test's own (`kfl<pid>`) with a veth pair born inside it, and the locks
in a run directory of the test's own (KERNFORM_RUN_DIR).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
PID = os.getpid() % 100000
NS = f"kfl{PID}"
DEV = "kfld0"
NAME = f"lk-{PID}"


def version(table: int, backend: str) -> str:
    return (f"apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata:\n  name: {NAME}\nspec:\n  backend: {backend}\n"
            f"  ebpf: {{interfaces: [{DEV}]}}\n"
            f"  filtering:\n    input:\n      rules:\n        - {{name: d{table}, action: deny, interfaces: [{DEV}], "
            f"protocol: tcp, ports: [{table}]}}\n"
            f"  routing:\n    tables:\n      - {{name: t, id: {table}, routes: [{{to: 10.{table - 200}.0.0/24, "
            f"dev: {DEV}}}]}}\n")


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    env = {**os.environ, "KERNFORM_RUN_DIR": str(tmp_path / "run")}
    sh("ip", "netns", "del", NS, check=False)
    try:
        sh("ip", "netns", "add", NS)
        sh("ip", "-n", NS, "link", "add", DEV, "type", "veth", "peer", "name", DEV + "p")
        sh("ip", "-n", NS, "link", "set", DEV, "up")
        sh("ip", "-n", NS, "link", "set", DEV + "p", "up")
        yield env
    finally:
        subprocess.run([sys.executable, "-m", "kernform", "destroy", "--yes", "--netns", NS, "--intent", NAME],
                       capture_output=True, env=env, cwd=ROOT)
        sh("ip", "-n", NS, "link", "del", DEV, check=False)
        sh("ip", "netns", "del", NS, check=False)


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kernform", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def plan_is_empty(env: dict[str, str], path: Path) -> bool:
    result = subprocess.run([sys.executable, "-m", "kernform", "plan", "--netns", NS, "--detailed-exitcode",
                             str(path)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode in (0, 2), result.stderr
    return result.returncode == 0


@pytest.mark.parametrize(("backend", "rounds"), [("tproxy", 8), ("ebpf", 2)])
def test_two_applies_of_two_versions_at_once_end_in_one_of_them(
        lab: dict[str, str], tmp_path: Path, backend: str, rounds: int) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(version(201, backend))
    b.write_text(version(202, backend))
    for _ in range(rounds):
        runs = [start(lab, "apply", "--netns", NS, "--quiet", str(path)) for path in (a, b)]
        outputs = [run.communicate(timeout=300) for run in runs]
        assert [run.returncode for run in runs] == [0, 0], outputs
        assert plan_is_empty(lab, a) != plan_is_empty(lab, b), outputs  # exactly one version holds
        assert not list(Path(lab["KERNFORM_RUN_DIR"]).glob("*.lock")), "a lock file was left behind"


def test_a_second_run_waits_or_fails_with_no_wait_and_a_watched_intent_is_refused(
        lab: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(version(201, "tproxy"))
    run_dir = Path(lab["KERNFORM_RUN_DIR"])
    watch = start(lab, "watch", str(path), "--netns", NS, "--log-format", "json")
    try:
        deadline = time.monotonic() + 20
        while not plan_is_empty(lab, path):
            assert time.monotonic() < deadline and watch.poll() is None, "the daemon did not apply the file"
            time.sleep(0.2)
        for command in ("apply", "destroy"):
            target = [str(path)]
            refused = subprocess.run([sys.executable, "-m", "kernform", command, "--netns", NS, *target],
                                     capture_output=True, text=True, env=lab, cwd=ROOT)
            assert refused.returncode == 1, refused
            assert f"another kernform watch (pid {watch.pid}) already manages intent {NAME}" in refused.stderr
        assert plan_is_empty(lab, path)
    finally:
        watch.send_signal(signal.SIGTERM)
        watch.communicate(timeout=20)
    assert not list(run_dir.glob("*.lock")) and not list(run_dir.glob("*.status")), list(run_dir.iterdir())

    # A CLI run holding the lock: another waits for it (and says so), or fails at once with --no-wait.
    # The holder keeps the lock until the test says so, so no timing decides who waits.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from reconciler.lock import IntentLock, RUN_DIR; "
         f"lock = IntentLock(RUN_DIR, {NS!r}, {NAME!r}, 'apply'); lock.acquire(); print('held', flush=True); "
         "sys.stdin.readline(); lock.release()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=lab, cwd=ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        failed = subprocess.run([sys.executable, "-m", "kernform", "apply", "--no-wait", "--netns", NS, str(path)],
                                capture_output=True, text=True, env=lab, cwd=ROOT)
        assert failed.returncode == 1 and f"another kernform apply (pid {holder.pid}) is changing" in failed.stderr
        waiting = subprocess.Popen([sys.executable, "-m", "kernform", "apply", "--quiet", "--netns", NS, str(path)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=lab, cwd=ROOT)
        assert waiting.stderr is not None
        said = waiting.stderr.readline()
        assert f"waiting for kernform apply (pid {holder.pid}) to finish with intent {NAME}" in said, said
        assert holder.stdin is not None
        holder.stdin.write("release\n")
        holder.stdin.flush()
        _, rest = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, said + rest
    finally:
        if holder.stdin is not None and not holder.stdin.closed:
            holder.stdin.close()
        holder.wait(10)
    assert not list(run_dir.glob("*.lock"))
