"""`kernform watch` as a real process against the lab's gateway: file changes, drift, signals, locks, metrics.

One daemon serves most tests of this module (it starts in about a second);
each test leaves its file valid and the kernel in sync with it. Every wait is
a condition polled against a deadline: the daemon's JSON log or the kernel.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from compiler import compile_intent
from compiler.loader import parse_text
from kernform import lab as lab_mod
from kernform import traffic
from kernform.lab import LabMap
from reconciler.apply import destroy, make_plan
from reconciler.daemon import RUN_DIR
from reconciler.netns import entered
from reconciler.observe import Target

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0

# Table 202 and a fwmark rule: nothing the traffic test below depends on.
INTENT = """apiVersion: kernform/v1
kind: NetworkIntent
metadata: {{name: {name}}}
spec:
  routing:
    tables:
      - name: marked
        id: 202
        routes:
          - {{ to: default, via: 10.70.4.2, dev: gw-wan-b }}
          - {{ to: 192.0.2.0/24, type: blackhole }}
    rules:
      - {{ name: marked-via-b, priority: 1150, table: marked, fwmark: "0x40/0xff" }}
  filtering:
    forward:
      default: allow
      rules:
        - {{ name: deny-docs, action: deny, destinations: [{elements}], protocol: tcp, ports: [9999] }}
"""


def intent(*elements: str, name: str = "watchtest") -> str:
    return INTENT.format(name=name, elements=", ".join(elements or ("203.0.113.0/24",)))


def wait_until(condition: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Watch:
    """A `kernform watch` process and its JSON log lines."""

    def __init__(self, file: Path, netns: str, *extra: str, inside: bool = False) -> None:
        self.file = file
        self.log_path = file.parent / f"watch-{file.stem}-{time.monotonic_ns()}.log"
        argv = [sys.executable, "-m", "kernform", "watch", str(file), "--log-format", "json", "--debounce-ms", "30",
                *extra]
        if inside:
            # As a hostNetwork pod: the process itself in the namespace (its metrics socket too), no
            # --netns, and CAP_NET_ADMIN as its only capability.
            argv = ["ip", "netns", "exec", netns, "setpriv", "--bounding-set=-all,+net_admin", "--inh-caps=-all",
                    "--", *argv]
        else:
            argv += ["--netns", netns]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
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

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool], after: int = 0, timeout: float = TIMEOUT,
                 what: str = "a log line") -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            if self.proc.poll() is not None and not any(predicate(x) for x in self.lines()[after:]):
                raise AssertionError(f"kernform watch exited {self.proc.returncode}:\n{self.log_path.read_text()}")
            return next((line for line in self.lines()[after:] if predicate(line)), None)

        try:
            return wait_until(found, timeout, what)  # type: ignore[no-any-return]
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{self.log_path.read_text()[-4000:]}") from None

    def passes(self, after: int, result: str) -> list[dict[str, Any]]:
        return [x for x in self.lines()[after:] if x.get("pass_result") == result]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=TIMEOUT)
        self._log.close()
        return self.proc.returncode


def in_sync(target: Target, text: str) -> bool:
    desired = compile_intent(parse_text(text, "test").intent)
    plan, _ = make_plan(target, desired)
    return plan.empty


def save(path: Path, text: str) -> None:
    """An in-place save: truncate and write, as most programs do."""
    with open(path, "w") as f:
        f.write(text)


def nft(ns: str, *args: str) -> str:
    return lab_mod.run_in(ns, ["nft", *args]).stdout


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True)


def cleanup(ns: str, *intents: str) -> None:
    with Target(ns) as target:
        for name in intents:
            destroy(target, name)
    for name in intents:
        (RUN_DIR / f"{ns}-{name}.lock").unlink(missing_ok=True)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def gw(lab: LabMap) -> Iterator[Target]:
    with Target(lab.gw_ns) as target:
        yield target


@pytest.fixture(scope="module")
def daemon(lab: LabMap, gw: Target, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watch]:
    directory = tmp_path_factory.mktemp("watch")
    file = directory / "intent.yaml"
    file.write_text(intent())
    # A long resync: repairs must come from events. 50 ms of debounce: margin for the burst test on a busy machine.
    watch = Watch(file, lab.gw_ns, "--resync", "120", "--debounce-ms", "50")
    try:
        watch.wait_log(lambda x: x.get("pass_result") == "applied", what="the first apply")
        wait_until(lambda: in_sync(gw, intent()), what="the first apply")
        yield watch
    finally:
        watch.stop()
        cleanup(lab.gw_ns, "watchtest")


# ------------------------------------------------------------- file changes
def test_a_change_to_the_file_is_applied(daemon: Watch, gw: Target) -> None:
    text = intent("203.0.113.0/24", "192.0.2.77/32")
    save(daemon.file, text)
    wait_until(lambda: in_sync(gw, text), what="the new element")
    assert "192.0.2.77" in nft(gw.netns or "", "list", "set", "inet", "kernform-watchtest", "f_forward_deny-docs_dst4")


def test_a_burst_of_saves_leads_to_one_pass_over_the_newest(daemon: Watch, gw: Target) -> None:
    start = daemon.mark()
    versions = [intent("203.0.113.0/24", f"192.0.2.{n}/32") for n in range(1, 11)]
    for text in versions:
        save(daemon.file, text)
    wait_until(lambda: in_sync(gw, versions[-1]), what="the newest version")
    # The kernel holds it before the daemon logs the pass (the line follows verification); then give a
    # second pass, if the burst caused one, the time to show.
    wait_until(lambda: bool(daemon.passes(start, "applied")), what="the daemon's applied line")
    time.sleep(0.5)
    applied = daemon.passes(start, "applied")
    assert len(applied) == 1, [x["reasons"] for x in applied]
    assert {a["key"] for a in applied[0]["actions"] if a["op"] == "add"} == {"f_forward_deny-docs_dst4 192.0.2.10"}


def test_a_save_by_rename_is_seen(daemon: Watch, gw: Target) -> None:
    text = intent("203.0.113.0/24", "198.18.0.0/15")
    temporary = daemon.file.with_name(".intent.yaml.swp")
    temporary.write_text(text)
    os.replace(temporary, daemon.file)
    wait_until(lambda: in_sync(gw, text), what="the renamed-in version")


def test_a_kubernetes_configmap_symlink_swap_is_seen(daemon: Watch, gw: Target) -> None:
    """kubelet's layout: intent.yaml -> ..data/intent.yaml, ..data -> ..<timestamp>, swapped by a rename."""
    directory = daemon.file.parent

    def publish(version: str, text: str) -> None:
        data = directory / f"..{version}"
        data.mkdir()
        (data / "intent.yaml").write_text(text)
        link = directory / "..data_tmp"
        link.symlink_to(data.name)
        os.replace(link, directory / "..data")

    first = intent("203.0.113.0/24", "198.51.100.128/25")
    publish("2024_01_01_00_00_00.1", first)
    link = directory / "intent.yaml.new"
    link.symlink_to("..data/intent.yaml")
    os.replace(link, daemon.file)  # the file becomes the ConfigMap's symlink
    wait_until(lambda: in_sync(gw, first), what="the ConfigMap's first version")

    second = intent("203.0.113.0/24", "198.51.100.64/26")
    publish("2024_01_01_00_00_01.2", second)
    wait_until(lambda: in_sync(gw, second), what="the swapped ..data")
    # Back to a plain file for the tests that follow.
    plain = directory / "intent.yaml.plain"
    plain.write_text(intent())
    os.replace(plain, daemon.file)
    wait_until(lambda: in_sync(gw, intent()), what="the plain file again")


def test_an_invalid_save_keeps_the_state_and_the_next_valid_one_is_applied(daemon: Watch, gw: Target) -> None:
    good = intent("203.0.113.0/24", "192.0.2.200/32")
    before = daemon.mark()
    save(daemon.file, good)
    wait_until(lambda: in_sync(gw, good), what="the valid version")
    # The kernel holds it a moment before the daemon logs it: wait for that line, or it lands after `start`.
    daemon.wait_log(lambda x: x.get("pass_result") == "applied", before, what="the valid version's pass")
    start = daemon.mark()
    bad = good.replace("priority: 1150", "priority: high")
    save(daemon.file, bad)
    line = daemon.wait_log(lambda x: "problems" in x, start, what="the invalid file report")
    row = next(n for n, text in enumerate(bad.splitlines(), 1) if "priority: high" in text)
    assert any(p.startswith(f"{daemon.file}:{row}:") for p in line["problems"]), line["problems"]
    daemon.wait_log(lambda x: x.get("health") == "degraded", start, what="degraded")
    assert in_sync(gw, good)  # nothing was touched
    assert not daemon.passes(start, "applied")

    fixed = intent("203.0.113.0/24", "192.0.2.201/32")
    save(daemon.file, fixed)
    wait_until(lambda: in_sync(gw, fixed), what="the next valid version")
    daemon.wait_log(lambda x: x.get("health") == "ok", start, what="healthy again")


def test_a_deleted_file_leaves_the_state_and_a_recreated_one_is_applied(daemon: Watch, gw: Target) -> None:
    current = daemon.file.read_text()
    start = daemon.mark()
    daemon.file.unlink()
    daemon.wait_log(lambda x: x.get("health") == "degraded" and "does not exist" in x.get("reason", ""), start,
                    what="the deleted file report")
    assert in_sync(gw, current)
    text = intent()
    save(daemon.file, text)
    wait_until(lambda: in_sync(gw, text), what="the re-created file")


# -------------------------------------------------------------------- drift
DRIFT: dict[str, Callable[[str], None]] = {
    "nft element": lambda ns: nft(ns, "delete", "element", "inet", "kernform-watchtest", "f_forward_deny-docs_dst4",
                                  "{ 203.0.113.0/24 }"),
    "nft rule": lambda ns: nft(ns, "delete", "rule", "inet", "kernform-watchtest", "filter_forward", "handle",
                               re.findall(r"deny-docs.* # handle (\d+)",
                                          nft(ns, "-a", "list", "chain", "inet", "kernform-watchtest",
                                              "filter_forward"))[0]),
    "nft table": lambda ns: nft(ns, "delete", "table", "inet", "kernform-watchtest"),
    "ip rule": lambda ns: ip(ns, "rule", "del", "priority", "1150"),
    "ip route": lambda ns: ip(ns, "route", "del", "blackhole", "192.0.2.0/24", "table", "202"),
}


@pytest.mark.parametrize("kind", list(DRIFT))
def test_an_externally_deleted_object_is_restored(daemon: Watch, gw: Target, kind: str) -> None:
    text = daemon.file.read_text()
    assert in_sync(gw, text)
    start = daemon.mark()
    DRIFT[kind](gw.netns or "")
    repaired = daemon.wait_log(lambda x: x.get("pass_result") == "repaired", start, what=f"the {kind} repair")
    wait_until(lambda: in_sync(gw, text), what=f"the {kind} restored")
    assert repaired["actions"] and all(a["op"] in ("add", "change") for a in repaired["actions"])
    assert any(r.startswith("kernel ") for r in repaired["reasons"]), repaired["reasons"]


def test_a_second_daemon_for_the_same_intent_is_refused(daemon: Watch, lab: LabMap) -> None:
    second = Watch(daemon.file, lab.gw_ns)
    try:
        assert second.proc.wait(timeout=TIMEOUT) == 1
        assert any("already manages intent watchtest" in x.get("message", "") for x in second.lines())
    finally:
        second.stop()
    assert daemon.proc.poll() is None


def test_sighup_forces_a_pass(daemon: Watch) -> None:
    start = daemon.mark()
    daemon.proc.send_signal(signal.SIGHUP)
    line = daemon.wait_log(lambda x: x.get("trigger") == "signal", start, what="the forced pass")
    assert line["pass_result"] == "in-sync"


FILTER_ONLY = """apiVersion: kernform/v1
kind: NetworkIntent
metadata: {name: watchstart}
spec:
  filtering:
    input:
      rules:
        - { name: deny, action: deny, destinations: [203.0.113.0/24], protocol: tcp, ports: [9999] }
"""


@pytest.fixture
def own_ns() -> Iterator[str]:
    name = f"kfw-watch{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
        (RUN_DIR / f"{name}-watchstart.lock").unlink(missing_ok=True)


def test_an_invalid_file_at_start_writes_nothing_and_a_re_created_namespace_is_filled(
        own_ns: str, tmp_path: Path) -> None:
    file = tmp_path / "start.yaml"
    file.write_text(FILTER_ONLY.replace("action: deny", "action: maybe"))
    watch = Watch(file, own_ns)
    try:
        watch.wait_log(lambda x: x.get("health") == "degraded", what="the invalid file report")
        assert nft(own_ns, "list", "tables") == ""  # nothing written before the desired state is known
        save(file, FILTER_ONLY)
        with Target(own_ns) as target:
            wait_until(lambda: in_sync(target, FILTER_ONLY), what="the first valid version")

        start = watch.mark()
        subprocess.run(["ip", "netns", "del", own_ns], check=True)
        subprocess.run(["ip", "netns", "add", own_ns], check=True)
        watch.wait_log(lambda x: x.get("pass_result") == "repaired", start, what="the re-created namespace filled")
        with Target(own_ns) as target:
            assert in_sync(target, FILTER_ONLY)
    finally:
        assert watch.stop() == 0


# ------------------------------------------------- signals, metrics, restart
TRAFFIC_INTENT = """apiVersion: kernform/v1
kind: NetworkIntent
metadata: {name: watchtraffic}
spec:
  routing:
    tables:
      - { name: via-b, id: 203, routes: [{ to: default, via: 10.70.4.2, dev: gw-wan-b }] }
    rules:
      - { name: clients-via-b, priority: 1250, table: via-b, from: 10.70.1.0/24 }
  filtering:
    forward:
      rules:
        - { name: deny-admin, action: deny, destinations: [198.51.100.10/32], protocol: tcp, ports: [8081] }
"""


def metrics_of(ns: str, address: str) -> dict[str, float]:
    with entered(ns):  # the endpoint listens in the namespace the daemon runs in
        body = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_net_admin_only_sigterm_leaves_traffic_flowing_and_a_restart_finds_nothing_to_do(
        lab: LabMap, gw: Target, tmp_path: Path) -> None:
    file = tmp_path / "traffic.yaml"
    file.write_text(TRAFFIC_INTENT)
    wan_b = lab.uplink("b")
    watch = Watch(file, lab.gw_ns, "--metrics", "127.0.0.1:0", inside=True)
    try:
        with lab_mod.background(wan_b.ns, traffic.command("serve", "--name", "wan-b", "--port", "8080"), 8080):
            address = watch.wait_log(lambda x: "metrics" in x, what="the metrics address")["metrics"]
            status = Path(f"/proc/{watch.proc.pid}/status").read_text()  # ip netns exec and setpriv exec()
            assert re.search(r"^CapEff:\s*0*1000$", status, re.M), status  # CAP_NET_ADMIN (12) alone
            watch.wait_log(lambda x: x.get("pass_result") == "applied", what="the first apply")
            start = watch.mark()
            nft(lab.gw_ns, "delete", "element", "inet", "kernform-watchtraffic", "f_forward_deny-admin_dst4",
                "{ 198.51.100.10 }")
            watch.wait_log(lambda x: x.get("pass_result") == "repaired", start, what="a repair")
            save(file, TRAFFIC_INTENT.replace("priority: 1250", "priority: nope"))
            watch.wait_log(lambda x: x.get("health") == "degraded", start, what="the invalid file report")
            invalid = metrics_of(lab.gw_ns, address)
            save(file, TRAFFIC_INTENT)
            watch.wait_log(lambda x: x.get("health") == "ok", start, what="healthy again")
            valid = metrics_of(lab.gw_ns, address)

            assert invalid["kernform_file_valid"] == 0 and invalid["kernform_degraded"] == 1
            assert valid["kernform_file_valid"] == 1 and valid["kernform_degraded"] == 0
            assert valid['kernform_passes_total{trigger="start"}'] == 1
            assert valid['kernform_passes_total{trigger="kernel"}'] >= 1
            assert valid['kernform_applied_actions_total{kind="ip.rule",op="add"}'] == 1
            assert valid['kernform_drift_repairs_total{kind="nft.element"}'] == 1
            assert valid["kernform_failed_passes_total"] == 0
            assert 0 <= valid["kernform_seconds_since_last_success"] < 30
            assert valid["kernform_pass_duration_seconds_count"] >= 3
            assert valid['kernform_pass_duration_seconds_bucket{le="+Inf"}'] == valid[
                "kernform_pass_duration_seconds_count"]

            assert watch.stop(signal.SIGTERM) == 0
            (reply,) = lab_mod.client_get(lab, lab.internet_v4, 8080)
            assert reply.get("server") == "wan-b", reply  # the policy route outlived the daemon
            (denied,) = lab_mod.client_get(lab, lab.internet_v4, 8081, timeout=0.5)
            assert denied.get("error") == "timeout", denied  # and so did the filter
            assert in_sync(gw, TRAFFIC_INTENT)

        again = Watch(file, lab.gw_ns)
        try:
            first = again.wait_log(lambda x: "pass_result" in x, what="the restarted daemon's first pass")
            assert first["pass_result"] == "in-sync", first
        finally:
            assert again.stop(signal.SIGINT) == 0
    finally:
        watch.stop()
        cleanup(lab.gw_ns, "watchtraffic")
        (RUN_DIR / "host-watchtraffic.lock").unlink(missing_ok=True)
