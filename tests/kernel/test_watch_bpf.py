"""`kernform watch` on the ebpf backend repairs BPF drift within a second, for each kind of it.

Four kinds of drift no nft or route event announces: a tc filter detached, a
filter replaced by another program, a bpf_link detached, a map entry written
by hand (as bpftool would). Each is made while a daemon watches; the daemon's
JSON log must report the repair (written after verification) within 1 s, and
the kernel must hold the intent again.

Namespace `kfb<pid>` with a veth pair born inside it and a listening proxy;
pins under the intent's own directory; nothing in the root namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sandbox import ROOT, kernform, sh, veth_namespace

pytestmark = pytest.mark.kernel
PID = os.getpid() % 100000
NS = f"kfb{PID}"
DEV = "kfb0"
INTENT = f"bpfdrift-{PID}"
TEXT = f"""apiVersion: kernform/v1
kind: NetworkIntent
metadata: {{name: {INTENT}}}
spec:
  ebpf:
    interfaces: [{DEV}]
  interception:
    rules:
      - {{name: web, direction: inbound, protocols: [tcp], interfaces: [{DEV}], destinations: [198.51.100.0/24],
          ports: [80], proxyPort: 15001}}
  loadBalancing:
    services:
      - name: web
        vip: 10.76.0.10
        port: 80
        protocol: tcp
        backends:
          - {{address: 10.76.1.1, port: 8080}}
          - {{address: 10.76.1.2, port: 8080}}
  filtering:
    input:
      rules:
        - {{name: deny-list, action: deny, protocol: tcp, interfaces: [{DEV}], sources: [192.0.2.0/24]}}
"""


class Daemon:
    """`kernform watch` with its JSON log lines read as they come, each with the moment it was read."""

    def __init__(self, file: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kernform.cli", "watch", str(file), "--netns", NS, "--backend", "ebpf",
             "--log-format", "json"], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, dict[str, Any]]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.lines.append((time.monotonic(), json.loads(line)))
            except ValueError:
                self.lines.append((time.monotonic(), {"message": line}))

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], after: int, timeout: float) -> float:
        """When (monotonic) the first line after position `after` that satisfies `predicate` was read."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, line in self.lines[after:]:
                if predicate(line):
                    return when
            assert self.proc.poll() is None, self.lines
            time.sleep(0.01)
        raise AssertionError("no such log line; log:\n" + "\n".join(json.dumps(x) for _, x in self.lines[-20:]))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    pytest.importorskip("bcc")
    with veth_namespace(NS, DEV, proxy=True):
        file = tmp_path_factory.mktemp("bpfdrift") / "intent.yaml"
        file.write_text(TEXT)
        watch = Daemon(file)
        try:
            watch.wait_for(lambda x: x.get("pass_result") == "applied", 0, 60)
            yield watch
        finally:
            watch.stop()
            kernform("destroy", "--yes", "--netns", NS, "--intent", INTENT)


def pins() -> Path:
    return Path("/sys/fs/bpf/kernform") / INTENT / f"netns:{NS}"


def tc_filters(direction: str = "ingress") -> list[dict[str, Any]]:
    return [f for f in json.loads(sh("tc", "-n", NS, "-j", "filter", "show", "dev", DEV, direction) or "[]")
            if "options" in f]


def repaired_within_a_second(daemon: Daemon, make_drift: Callable[[], None]) -> float:
    mark = len(daemon.lines)
    started = time.monotonic()
    make_drift()
    when = daemon.wait_for(lambda x: x.get("pass_result") == "repaired", mark, timeout=10)
    took = when - started
    assert took < 1.0, f"repaired after {took:.2f} s"
    return took


def test_a_detached_tc_filter_is_repaired(daemon: Daemon) -> None:
    before = {f["options"]["handle"] for f in tc_filters()}
    assert before
    repaired_within_a_second(daemon, lambda: sh("tc", "-n", NS, "filter", "del", "dev", DEV, "ingress"))
    assert {f["options"]["handle"] for f in tc_filters()} == before


def test_a_filter_replaced_by_another_program_is_repaired(daemon: Daemon) -> None:
    filters = tc_filters()
    ours = {f["options"]["prog"]["id"] for f in filters}
    victim = filters[0]
    other = next(f for f in filters if f["options"]["prog"]["id"] != victim["options"]["prog"]["id"])
    # Replace the victim's filter, in place, with the other filter's program (pinned in its directory).
    other_pin = next(p for d in pins().iterdir() if d.is_dir() for p in d.glob("prog:*")
                     if _prog_id(p) == other["options"]["prog"]["id"])

    def replace() -> None:
        sh("nsenter", f"--net=/run/netns/{NS}", "tc", "filter", "replace", "dev", DEV, "ingress",
           "pref", str(victim["pref"]), "handle", victim["options"]["handle"], "bpf", "object-pinned",
           str(other_pin), "direct-action")

    repaired_within_a_second(daemon, replace)
    assert {f["options"]["prog"]["id"] for f in tc_filters()} == ours


def _prog_id(pin: Path) -> int:
    return int(json.loads(sh("bpftool", "prog", "show", "pinned", str(pin), "--json"))["id"])


def test_a_detached_link_is_repaired(daemon: Daemon) -> None:
    link_pin = sorted(pins().glob("*/link:*"))[0]

    def detach() -> None:
        sh("bpftool", "link", "detach", "pinned", str(link_pin))

    repaired_within_a_second(daemon, detach)
    info = json.loads(sh("bpftool", "link", "show", "pinned", str(next(pins().glob("*/link:*"))), "--json"))
    assert info.get("prog_id"), info


def test_a_map_entry_written_by_hand_is_repaired(daemon: Daemon) -> None:
    maps = [m for m in pins().glob("*/maps/*") if m.name in ("src_v4", "dst_v4")]
    lpm = next(m for m in maps if json.loads(sh("bpftool", "map", "dump", "pinned", str(m), "--json")))
    (entry,) = json.loads(sh("bpftool", "map", "dump", "pinned", str(lpm), "--json"))[:1]
    key = [str(int(b, 16)) for b in entry["key"]]
    value = [str(int(b, 16)) for b in entry["value"]]
    changed = value[:-1] + [str(int(value[-1]) ^ 0xFF)]

    def write() -> None:
        sh("bpftool", "map", "update", "pinned", str(lpm), "key", *key, "value", *changed)

    repaired_within_a_second(daemon, write)
    (now,) = json.loads(sh("bpftool", "map", "dump", "pinned", str(lpm), "--json"))[:1]
    assert now["value"] == entry["value"]
