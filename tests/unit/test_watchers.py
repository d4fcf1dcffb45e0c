"""The daemon's event sources without a kernel: the debouncer, the file watcher (inotify in tmp_path), and the
parsing of netlink notifications from hand-made messages."""

from __future__ import annotations

import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compiler.objects import RTPROT_KERNFORM
from reconciler.drivers.events import (
    NFNL_SUBSYS_NFTABLES,
    NFT_MSG_NEWGEN,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_NEWLINK,
    NftBatchReader,
    WatchScope,
    netlink_messages,
    route_event,
)
from reconciler.metrics import MetricsError, parse_address
from reconciler.watchers import Debouncer, FileWatcher

TIMEOUT = 5.0


# ---------------------------------------------------------------- debouncer
def test_a_burst_of_marks_is_one_hand_over_after_the_quiet_delay() -> None:
    debouncer = Debouncer(delay=0.05)
    for n in range(5):
        debouncer.mark(f"file saved {n % 2}")
    last = time.monotonic()
    reasons = debouncer.wait(timeout=TIMEOUT)
    assert reasons == ("file saved 0", "file saved 1")
    assert time.monotonic() - last >= 0.05
    assert not debouncer.pending


def test_nothing_pending_returns_nothing_at_the_timeout() -> None:
    assert Debouncer(delay=0.01).wait(timeout=0.02) == ()


def test_an_urgent_mark_skips_the_delay() -> None:
    debouncer = Debouncer(delay=10.0)
    debouncer.mark("signal SIGHUP", urgent=True)
    started = time.monotonic()
    assert debouncer.wait(timeout=TIMEOUT) == ("signal SIGHUP",)
    assert time.monotonic() - started < 1.0


def test_a_write_in_progress_holds_the_pass_until_released() -> None:
    debouncer = Debouncer(delay=0.01)
    debouncer.hold(30.0)
    debouncer.mark("file written")
    released = threading.Event()

    def release() -> None:
        released.set()
        debouncer.release()
        debouncer.mark("file saved")

    threading.Timer(0.05, release).start()
    assert debouncer.wait(timeout=TIMEOUT) == ("file written", "file saved")
    assert released.is_set()


def test_a_steady_stream_of_events_cannot_put_a_pass_off_beyond_max_wait() -> None:
    debouncer = Debouncer(delay=0.05, max_wait=0.2)
    stop = threading.Event()

    def chatter() -> None:
        while not stop.wait(0.01):
            debouncer.mark("kernel link changed")

    thread = threading.Thread(target=chatter)
    started = time.monotonic()
    debouncer.mark("kernel link changed")
    thread.start()
    try:
        assert debouncer.wait(timeout=TIMEOUT) == ("kernel link changed",)
        assert time.monotonic() - started < 1.0
    finally:
        stop.set()
        thread.join()


# ------------------------------------------------------------- file watcher
class Recorder:
    def __init__(self) -> None:
        self.events: queue.Queue[str] = queue.Queue()

    def change(self, what: str) -> None:
        self.events.put(what)

    def writing(self) -> None:
        self.events.put("writing")

    def next(self, skip_writing: bool = True) -> str:
        deadline = time.monotonic() + TIMEOUT
        while True:
            what = self.events.get(timeout=max(deadline - time.monotonic(), 0.001))
            if not (skip_writing and what == "writing"):
                return what


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, Recorder]]:
    path = tmp_path / "intent.yaml"
    path.write_text("v1\n")
    recorder = Recorder()
    watcher = FileWatcher(path, recorder.change, recorder.writing)
    watcher.start()
    try:
        yield path, recorder
    finally:
        watcher.stop()


def test_an_in_place_save_is_writing_then_saved(watched: tuple[Path, Recorder]) -> None:
    path, recorder = watched
    with open(path, "w") as f:
        f.write("v2 first half, ")
        f.flush()
        assert recorder.next(skip_writing=False) == "writing"
        f.write("second half\n")
    assert recorder.next() == "file saved"


def test_a_save_by_rename_is_seen(watched: tuple[Path, Recorder]) -> None:
    path, recorder = watched
    temporary = path.with_name(".intent.yaml.tmp")
    temporary.write_text("v2\n")
    os.replace(temporary, path)
    assert recorder.next() == "file replaced"


def test_other_files_in_the_directory_are_ignored(watched: tuple[Path, Recorder]) -> None:
    path, recorder = watched
    (path.parent / "unrelated.txt").write_text("x")
    (path.parent / "unrelated.txt").unlink()
    path.unlink()
    assert recorder.next() == "file deleted"  # the first event is the one about our file


def test_deletion_and_re_creation_are_seen(watched: tuple[Path, Recorder]) -> None:
    path, recorder = watched
    path.unlink()
    assert recorder.next() == "file deleted"
    path.write_text("v3\n")
    assert recorder.next() == "file saved"


def test_a_kubernetes_configmap_swap_is_seen(tmp_path: Path) -> None:
    def publish(version: str, text: str) -> None:
        data = tmp_path / f"..{version}"
        data.mkdir()
        (data / "intent.yaml").write_text(text)
        (tmp_path / "..data_tmp").symlink_to(data.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")

    publish("2024_01_01_00_00_00.1", "v1\n")
    path = tmp_path / "intent.yaml"
    path.symlink_to("..data/intent.yaml")
    recorder = Recorder()
    watcher = FileWatcher(path, recorder.change, recorder.writing)
    watcher.start()
    try:
        publish("2024_01_01_00_00_01.2", "v2\n")
        assert recorder.next() == "file replaced"
        assert path.read_text() == "v2\n"
    finally:
        watcher.stop()


# ------------------------------------------------------- netlink parsing
def message(kind: int, payload: bytes, pid: int = 0) -> bytes:
    length = 16 + len(payload)
    return struct.pack("=IHHII", length, kind, 0, 0, pid) + payload + b"\0" * (-length % 4)


def attribute(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def rtmsg(family: int, dst_len: int, table: int, protocol: int, *attrs: bytes) -> bytes:
    return struct.pack("=BBBBBBBBI", family, dst_len, 0, 0, min(table, 252), protocol, 0, 1, 0) + b"".join(attrs)


SCOPE = WatchScope(frozenset({"kernform-edge"}), frozenset({202}))


def parsed_route_event(data: bytes, own: frozenset[int] = frozenset()) -> str | None:
    ((kind, pid, payload),) = list(netlink_messages(data))
    return route_event(kind, pid, payload, SCOPE, own)


def test_a_route_deleted_in_an_owned_table_is_reported_unless_we_deleted_it() -> None:
    data = message(RTM_DELROUTE, rtmsg(socket.AF_INET, 24, 202, RTPROT_KERNFORM,
                                       attribute(15, struct.pack("=I", 202)),
                                       attribute(1, socket.inet_aton("192.0.2.0"))), pid=4242)
    assert parsed_route_event(data) == "ipv4 route 192.0.2.0/24 table 202 deleted (protocol 158)"
    assert parsed_route_event(data, own=frozenset({4242})) is None


def test_routes_of_other_tables_and_foreign_rules_are_ignored() -> None:
    other_table = message(RTM_DELROUTE, rtmsg(socket.AF_INET, 0, 254, 4, attribute(15, struct.pack("=I", 254))))
    assert parsed_route_event(other_table) is None
    foreign_rule = message(RTM_DELRULE, rtmsg(socket.AF_INET6, 0, 100, 0, attribute(21, b"\x04")))
    assert parsed_route_event(foreign_rule) is None
    our_rule = message(RTM_DELRULE, rtmsg(socket.AF_INET6, 0, 7100, 0, attribute(6, struct.pack("=I", 300)),
                                          attribute(21, bytes([RTPROT_KERNFORM]))))
    assert parsed_route_event(our_rule) == "ipv6 rule priority 300 table 252 deleted (protocol 158)"


def test_link_changes_matter_only_when_the_intent_owns_routing_tables() -> None:
    ((kind, pid, payload),) = list(netlink_messages(message(RTM_NEWLINK, b"\0" * 16)))
    assert route_event(kind, pid, payload, SCOPE, frozenset()) == "link changed"
    assert route_event(kind, pid, payload, WatchScope(frozenset({"kernform-edge"})), frozenset()) is None


def nft_message(nft_kind: int, *attrs: bytes) -> bytes:
    return message((NFNL_SUBSYS_NFTABLES << 8) | nft_kind, struct.pack("=BBH", 1, 0, 0) + b"".join(attrs))


def newgen(name: str, pid: int) -> bytes:
    return nft_message(NFT_MSG_NEWGEN, attribute(1, struct.pack("!I", 7)), attribute(2, struct.pack("!I", pid)),
                       attribute(3, name.encode() + b"\0"))


@pytest.mark.parametrize(("batch", "expected"), [
    ([nft_message(14, attribute(1, b"kernform-edge\0")), newgen("nft", 99)],
     "nft table kernform-edge changed (set element) by nft (pid 99)"),
    ([nft_message(2, attribute(1, b"kernform-edge\0")), nft_message(8, attribute(1, b"kernform-edge\0")),
      newgen("iptables-nft", 7)],
     "nft table kernform-edge changed (rule, table) by iptables-nft (pid 7)"),
    ([nft_message(6, attribute(1, b"firewalld\0")), newgen("nft", 99)], None),
    ([nft_message(14, attribute(1, b"kernform-edge\0")), newgen("kfw-0123abcd", 1)], None),  # our own commit
])
def test_nft_transactions_by_others_touching_our_table_are_reported(batch: list[bytes], expected: str | None) -> None:
    reader = NftBatchReader()
    results = [reader.feed(kind, payload, SCOPE, frozenset({"kfw-0123abcd"}))
               for data in batch for kind, _, payload in netlink_messages(data)]
    assert results[:-1] == [None] * (len(results) - 1)
    assert results[-1] == expected
    assert reader.touched == {}


@pytest.mark.parametrize(("text", "expected"), [
    ("9108", ("0.0.0.0", 9108)), (":9108", ("0.0.0.0", 9108)), ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("[::1]:9108", ("::1", 9108)),
])
def test_metrics_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["localhost", "1.2.3.4:http", "70000"])
def test_bad_metrics_addresses_are_refused(text: str) -> None:
    with pytest.raises(MetricsError):
        parse_address(text)
