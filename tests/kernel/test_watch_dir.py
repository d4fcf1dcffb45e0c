"""`kernform watch DIR`: one daemon keeps every intent of a directory applied in one namespace.

Proved against the kernel, with a real daemon process: every intent of the
directory's `*.yaml`/`*.yml` files is applied (hidden files and
subdirectories are not read); added and changed files are applied; an invalid
file keeps its intents' last good state while the other files are still
reconciled; a removed file's intents stay in the kernel with a warning, or are
destroyed with `--prune` and nothing else is touched; a ConfigMap `..data`
swap is applied; two conflicting intents leave the later one unapplied, with
both positions logged; drift of one intent is repaired without touching
another; a second daemon for the directory and namespace exits 1; metrics
report each intent's validity.

Everything happens in a namespace of this test's own (`kfwd<pid>`) holding a
veth pair born inside it; the root namespace is never changed. Every wait is a
condition polled against a deadline: the kernel, the daemon's JSON log or its
metrics endpoint.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 15.0
PID = os.getpid() % 100000
NS = f"kfwd{PID}"
DEV = "kfwd0"
SHORT_NAMES = ("a", "b", "c", "d", "e")  # every intent this module may apply: destroyed after each test


def name(short: str) -> str:
    return f"{short}-{PID}"


def intent(short: str, table: int, prefix: str) -> str:
    """A routing table with one route through the veth, and a forward filter: an nft table of its own."""
    return f"""apiVersion: kernform/v1
kind: NetworkIntent
metadata: {{name: {name(short)}}}
spec:
  routing:
    tables:
      - name: t
        id: {table}
        routes:
          - {{to: {prefix}, dev: {DEV}}}
  filtering:
    forward:
      rules:
        - {{name: deny, action: deny, destinations: [203.0.113.0/24], protocol: tcp, ports: [9999]}}
"""


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def kernform(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kernform.cli", *args], capture_output=True, text=True, cwd=ROOT)


def nft_tables() -> list[str]:
    return sh("ip", "netns", "exec", NS, "nft", "list", "tables").split()


def has_table(short: str) -> bool:
    return f"kernform-{name(short)}" in nft_tables()


def has_route(table: int, prefix: str) -> bool:
    routes = sh("ip", "-n", NS, "route", "show", "table", str(table), check=False)
    return any(line.startswith(f"{prefix} ") for line in routes.splitlines())


def holds(short: str, table: int, prefix: str) -> bool:
    """The kernel holds the intent made by `intent(short, table, prefix)`."""
    return has_table(short) and has_route(table, prefix)


def nft_json(short: str) -> list[Any]:
    """The intent's nft table as `nft -j` lists it, handles included, without the metainfo object."""
    document = json.loads(sh("ip", "netns", "exec", NS, "nft", "-j", "list", "table", "inet", f"kernform-{name(short)}"))
    return [item for item in document["nftables"] if "metainfo" not in item]


def plan_exit(file: Path) -> subprocess.CompletedProcess[str]:
    return kernform("plan", "--netns", NS, "--detailed-exitcode", str(file))


def wait_until(condition: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def left_in_place(short: str) -> Callable[[dict[str, Any]], bool]:
    """A warning naming the intent and saying its state is left in place."""
    return lambda line: (line.get("level") == "warning" and name(short) in json.dumps(line)
                         and "left in place" in json.dumps(line).lower())


def positions(*patterns: str) -> Callable[[dict[str, Any]], bool]:
    """A log line holding every pattern (FILE:LINE:COL regular expressions)."""
    return lambda line: all(re.search(pattern, json.dumps(line)) for pattern in patterns)


class Watch:
    """A `kernform watch DIR` process in the test's namespace, and its JSON log lines."""

    def __init__(self, directory: Path, run_dir: Path, *extra: str) -> None:
        self.directory = directory
        # Beside the directory, not in it: the daemon must not watch its own log.
        self.log_path = directory.parent / f"watch-{time.monotonic_ns()}.log"
        argv = [sys.executable, "-m", "kernform.cli", "watch", str(directory), "--netns", NS, "--log-format", "json",
                "--debounce-ms", "20", "--resync", "3600", *extra]  # a long resync: repairs come from events
        env = {**os.environ, "KERNFORM_RUN_DIR": str(run_dir)}  # locks of this test's own
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._log)

    def lines(self) -> list[dict[str, Any]]:
        result = []
        for line in self.log_path.read_text().splitlines():
            try:
                result.append(json.loads(line))
            except ValueError:
                result.append({"message": line, "level": "raw"})
        return result

    def mark(self) -> int:
        """A position in the log; `wait_log(..., after=mark)` looks only at lines written since."""
        return len(self.lines())

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
        """Poll `condition` (the kernel, the log) while the daemon runs; a dead daemon fails at once, with its log."""
        def checked() -> Any:
            value = condition()
            if not value and self.proc.poll() is not None:
                raise AssertionError(f"kernform watch exited {self.proc.returncode} before {what}")
            return value

        try:
            return wait_until(checked, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{self.log_path.read_text()[-4000:]}") from None

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool], after: int = 0,
                 what: str = "a log line") -> dict[str, Any]:
        return self.wait(lambda: next((x for x in self.lines()[after:] if predicate(x)), None), what)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=TIMEOUT)
        self._log.close()
        return self.proc.returncode


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def ns() -> Iterator[str]:
    """The test's namespace with a veth pair born inside it; intents destroyed and all deleted by name."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    sh("ip", "netns", "del", NS, check=False)
    try:
        sh("ip", "netns", "add", NS)
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        sh("ip", "-n", NS, "link", "add", DEV, "type", "veth", "peer", "name", DEV + "p")
        for dev in (DEV, DEV + "p"):
            sh("ip", "-n", NS, "link", "set", dev, "up")
        yield NS
    finally:
        kernform("destroy", "--yes", "--netns", NS, *[arg for short in SHORT_NAMES for arg in ("--intent", name(short))])
        sh("ip", "-n", NS, "link", "del", DEV, check=False)  # veths before their namespace
        sh("ip", "netns", "del", NS, check=False)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    directory = tmp_path / "intents"
    directory.mkdir()
    return directory


@pytest.fixture
def start(ns: str, repo: Path, tmp_path: Path) -> Iterator[Callable[..., Watch]]:
    """Starts daemons on `repo`; stops them (before `ns` destroys the intents) at the end."""
    started: list[Watch] = []

    def run(*extra: str) -> Watch:
        watch = Watch(repo, tmp_path / "run", *extra)
        started.append(watch)
        return watch

    yield run
    for watch in started:
        watch.stop()


# --------------------------------------------------------------------- tests
def test_every_intent_of_the_directory_is_applied_and_each_file_plans_clean(
        repo: Path, start: Callable[..., Watch]) -> None:
    (repo / "a.yaml").write_text(intent("a", 201, "10.201.0.0/24"))
    (repo / "b.yml").write_text(intent("b", 202, "10.202.0.0/24") + "---\n" + intent("c", 203, "10.203.0.0/24"))
    (repo / "README.md").write_text("not an intent")
    (repo / ".hidden.yaml").write_text(intent("d", 204, "10.204.0.0/24"))  # hidden: not read
    (repo / "sub").mkdir()
    (repo / "sub" / "e.yaml").write_text(intent("e", 205, "10.205.0.0/24"))  # not recursive
    watch = start()
    watch.wait(lambda: holds("a", 201, "10.201.0.0/24") and holds("b", 202, "10.202.0.0/24")
               and holds("c", 203, "10.203.0.0/24"), "the three intents applied")
    watch.wait(lambda: {name("a"), name("b"), name("c")} <= {x.get("intent") for x in watch.lines()},
               "a log line with the intent field for each intent")
    for file in (repo / "a.yaml", repo / "b.yml"):
        result = plan_exit(file)
        assert result.returncode == 0, result.stdout + result.stderr
    assert not has_table("d") and not has_route(204, "10.204.0.0/24")
    assert not has_table("e") and not has_route(205, "10.205.0.0/24")


def test_added_changed_and_invalid_files(repo: Path, start: Callable[..., Watch]) -> None:
    a, b = repo / "a.yaml", repo / "b.yaml"
    a.write_text(intent("a", 211, "10.211.0.0/24"))
    watch = start()
    watch.wait(lambda: holds("a", 211, "10.211.0.0/24"), "the first intent")

    b.write_text(intent("b", 212, "10.212.0.0/24"))
    watch.wait(lambda: holds("b", 212, "10.212.0.0/24"), "the added file applied")
    a.write_text(intent("a", 211, "10.211.1.0/24"))
    watch.wait(lambda: has_route(211, "10.211.1.0/24") and not has_route(211, "10.211.0.0/24"), "the changed route")

    good_b = b.read_text()
    bad_yaml = good_b.replace("spec:\n", "spec: [unclosed\n", 1)
    bad_schema = good_b.replace("id: 212", "id: twelve")
    row = next(n for n, text in enumerate(bad_schema.splitlines(), 1) if "id: twelve" in text)
    for n, (bad, position) in enumerate(((bad_yaml, r"b\.yaml:\d+:\d+"), (bad_schema, rf"b\.yaml:{row}:\d+")), 2):
        mark = watch.mark()
        b.write_text(bad)
        problem = watch.wait_log(positions(position), mark, "the invalid file's problems logged")
        assert problem.get("level") == "error", problem
        # Another file's change is still applied, and the invalid file's intent keeps its last good state.
        prefix = f"10.211.{n}.0/24"
        a.write_text(intent("a", 211, prefix))
        watch.wait(functools.partial(has_route, 211, prefix), "a change of another file while b.yaml is invalid")
        assert holds("b", 212, "10.212.0.0/24")

    b.write_text(intent("b", 212, "10.212.9.0/24"))
    watch.wait(lambda: has_route(212, "10.212.9.0/24") and not has_route(212, "10.212.0.0/24"),
               "the next valid version of b.yaml")


def test_removed_intents_stay_unless_pruned(repo: Path, start: Callable[..., Watch]) -> None:
    a, b = repo / "a.yaml", repo / "b.yaml"
    both = intent("a", 221, "10.221.0.0/24") + "---\n" + intent("c", 223, "10.223.0.0/24")
    a.write_text(both)
    b.write_text(intent("b", 222, "10.222.0.0/24"))
    watch = start()
    watch.wait(lambda: holds("a", 221, "10.221.0.0/24") and holds("b", 222, "10.222.0.0/24")
               and holds("c", 223, "10.223.0.0/24"), "the three intents applied")

    mark = watch.mark()
    a.write_text(intent("a", 221, "10.221.0.0/24"))  # c's document removed from the file
    watch.wait_log(left_in_place("c"), mark, "c left in place")
    mark = watch.mark()
    b.unlink()
    watch.wait_log(left_in_place("b"), mark, "b left in place")
    a.write_text(intent("a", 221, "10.221.1.0/24"))  # a later pass leaves them too
    watch.wait(lambda: has_route(221, "10.221.1.0/24"), "a change after the removals")
    assert holds("b", 222, "10.222.0.0/24") and holds("c", 223, "10.223.0.0/24")
    assert watch.stop() == 0

    # With --prune: the directory holds all three again (in sync), then b.yaml goes and b with it.
    a.write_text(both)
    b.write_text(intent("b", 222, "10.222.0.0/24"))
    pruning = start("--prune")
    pruning.wait(lambda: holds("a", 221, "10.221.0.0/24") and all(plan_exit(f).returncode == 0 for f in (a, b)),
                 "the directory in sync")
    before = {short: nft_json(short) for short in ("a", "c")}
    b.unlink()
    pruning.wait(lambda: not has_table("b") and not has_route(222, "10.222.0.0/24"), "b destroyed")
    assert {short: nft_json(short) for short in ("a", "c")} == before
    assert has_route(221, "10.221.0.0/24") and has_route(223, "10.223.0.0/24")


def test_a_configmap_data_swap_changing_two_files_is_applied(repo: Path, start: Callable[..., Watch]) -> None:
    """kubelet's layout: a.yaml -> ..data/a.yaml, ..data -> ..<timestamp>, swapped by a rename."""

    def publish(version: str, tables: dict[str, tuple[int, str]]) -> Path:
        data = repo / f"..{version}"
        data.mkdir()
        for short, (table, prefix) in tables.items():
            (data / f"{short}.yaml").write_text(intent(short, table, prefix))
        link = repo / "..data_tmp"
        link.symlink_to(data.name)
        os.rename(link, repo / "..data")
        return data

    old = publish("2026_01_01_00_00_00.1", {"a": (231, "10.231.0.0/24"), "b": (232, "10.232.0.0/24")})
    for short in ("a", "b"):
        (repo / f"{short}.yaml").symlink_to(f"..data/{short}.yaml")
    watch = start()
    watch.wait(lambda: holds("a", 231, "10.231.0.0/24") and holds("b", 232, "10.232.0.0/24"), "the first version")

    mark = watch.mark()
    publish("2026_01_01_00_01_00.2", {"a": (231, "10.231.1.0/24"), "b": (232, "10.232.1.0/24")})
    shutil.rmtree(old)  # as kubelet does once ..data points to the new version
    watch.wait(lambda: has_route(231, "10.231.1.0/24") and has_route(232, "10.232.1.0/24")
               and not has_route(231, "10.231.0.0/24") and not has_route(232, "10.232.0.0/24"), "the swapped ..data")
    errors = [x for x in watch.lines()[mark:] if x.get("level") == "error"]
    assert not errors, errors


def test_the_later_of_two_conflicting_intents_is_not_applied(repo: Path, start: Callable[..., Watch]) -> None:
    (repo / "a.yaml").write_text(intent("a", 241, "10.241.0.0/24"))
    (repo / "b.yaml").write_text(intent("b", 241, "10.242.0.0/24"))  # the same routing table id
    watch = start()
    watch.wait(lambda: holds("a", 241, "10.241.0.0/24"), "the first intent")
    line = watch.wait_log(positions(r"a\.yaml:\d+:\d+", r"b\.yaml:\d+:\d+"), what="the conflict with both positions")
    assert line.get("level") in ("error", "warning"), line
    assert not has_table("b") and not has_route(241, "10.242.0.0/24")
    assert plan_exit(repo / "a.yaml").returncode == 0


def test_drift_of_one_intent_is_repaired_without_touching_another(repo: Path, start: Callable[..., Watch]) -> None:
    (repo / "a.yaml").write_text(intent("a", 251, "10.251.0.0/24"))
    (repo / "b.yaml").write_text(intent("b", 252, "10.252.0.0/24"))
    watch = start()
    watch.wait(lambda: holds("a", 251, "10.251.0.0/24") and holds("b", 252, "10.252.0.0/24")
               and plan_exit(repo / "b.yaml").returncode == 0, "both intents applied")
    before = nft_json("b")
    mark = watch.mark()
    sh("ip", "netns", "exec", NS, "nft", "delete", "table", "inet", f"kernform-{name('a')}")
    watch.wait(lambda: has_table("a") and plan_exit(repo / "a.yaml").returncode == 0, "a's nft table repaired")
    watch.wait_log(lambda x: x.get("intent") == name("a") and x.get("pass_result") == "repaired", mark,
                   "the repair logged for intent a")
    assert nft_json("b") == before


def test_a_second_daemon_for_the_directory_and_namespace_exits_1(repo: Path, start: Callable[..., Watch]) -> None:
    (repo / "a.yaml").write_text(intent("a", 261, "10.61.0.0/24"))
    first = start()
    first.wait(lambda: holds("a", 261, "10.61.0.0/24"), "the first daemon's apply")
    second = start()
    try:
        assert second.proc.wait(timeout=TIMEOUT) == 1, second.log_path.read_text()
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the second daemon still runs; log:\n{second.log_path.read_text()}") from None
    assert any("already manages" in x.get("message", "") for x in second.lines()), second.log_path.read_text()
    assert first.proc.poll() is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics(port: int) -> dict[str, float]:
    """The samples served on the port (the daemon runs in the root namespace; --netns moves only its worker)."""
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}  # not serving yet
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def test_metrics_report_each_intents_validity(repo: Path, start: Callable[..., Watch]) -> None:
    (repo / "a.yaml").write_text(intent("a", 71, "10.71.0.0/24"))
    (repo / "b.yaml").write_text(intent("b", 72, "10.72.0.0/24"))
    port = free_port()
    watch = start("--metrics", f"127.0.0.1:{port}")
    watch.wait(lambda: holds("a", 71, "10.71.0.0/24") and holds("b", 72, "10.72.0.0/24"), "both intents applied")

    def valid(short: str) -> str:
        return f'kernform_intent_valid{{intent="{name(short)}"}}'

    samples = watch.wait(lambda: (m := metrics(port)).get(valid("a")) == 1.0 and m.get(valid("b")) == 1.0 and m,
                         "both intents valid in the metrics")
    for short in ("a", "b"):
        assert samples[f'kernform_intent_desired_objects{{intent="{name(short)}"}}'] > 0, samples
    (repo / "b.yaml").write_text(intent("b", 72, "10.72.0.0/24").replace("id: 72", "id: nope"))
    watch.wait(lambda: (m := metrics(port)).get(valid("b")) == 0.0 and m.get(valid("a")) == 1.0,
               "b invalid in the metrics")
    assert holds("b", 72, "10.72.0.0/24")
