"""Verification reads the kernel: a fast path that writes the wrong thing is caught, and undone.

The raw nf_tables element batch (hand-written nfnetlink encoding) and the BPF
map writes are the fast paths of a one-element change. Here each is made to
write something other than the plan says (the encoder or the map write is
corrupted in-process), and `apply` must notice it by reading the kernel back,
raise ApplyError and leave the previous state; then the same change applies
cleanly with the real encoder. The lookups the verification uses are tested
against the kernel directly: an interval set answering for a prefix it does not
hold exactly, an LPM trie answering a lookup with a containing prefix.

Namespaces `kfv<pid>-…` with veths born inside them; BPF pins under the
intent's own directory and a cgroup the driver creates; nothing in the root
namespace.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from sandbox import sh, veth_namespace

from compiler import compile_intent
from compiler.errors import ApplyError
from compiler.loader import parse_text
from compiler.objects import DesiredState
from reconciler import apply as apply_module
from reconciler.drivers import libbpf, nfnetlink
from reconciler.drivers.nfnetlink import ElementChanges, NfTablesSocket, SetLayout
from reconciler.observe import Target

pytestmark = pytest.mark.kernel
PID = os.getpid() % 100000


@pytest.fixture
def netns() -> Iterator[str]:
    with veth_namespace(f"kfv{PID}-{os.urandom(2).hex()}", "kfv0") as name:
        yield name


def filter_intent(name: str, cidrs: list[str], backend: str, netns: str) -> DesiredState:
    items = "\n".join(f"            - {c}" for c in cidrs)
    text = f"""apiVersion: kernform/v1
kind: NetworkIntent
metadata: {{name: {name}}}
spec:
  ebpf:
    interfaces: [kfv0]
  filtering:
    input:
      rules:
        - name: deny-list
          action: deny
          protocol: tcp
          interfaces: [kfv0]
          sources:
{items}
"""
    return compile_intent(parse_text(text, f"{name}.yaml").intent, backend, netns=netns)


def kernel_state(netns: str) -> dict[str, Any]:
    state: dict[str, Any] = {"nft": json.loads(sh("ip", "netns", "exec", netns, "nft", "-j", "list", "ruleset"))}
    state["filters"] = sh("tc", "-n", netns, "filter", "show", "dev", "kfv0", "ingress")
    return state


def bpf_map_dump(intent: str, netns: str) -> dict[str, list[Any]]:
    from reconciler.drivers.bpf import intent_pin_dir

    dumps = {}
    for path in sorted(intent_pin_dir(intent, netns).glob("*/maps/*")):
        with libbpf.Map.open(str(path)) as bpf_map:
            if bpf_map.info.type in (libbpf.MAP_SOCKMAP,) or bpf_map.percpu:
                continue
            dumps[str(path.relative_to(path.parents[2]))] = sorted((k.hex(), v.hex()) for k, v in bpf_map.items())
    return dumps


CIDRS = [f"10.{i}.0.0/16" for i in range(40)]


def test_a_raw_element_batch_that_writes_the_wrong_element_is_caught_and_undone(
        netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    intent = f"kfv{PID}-nft"
    with Target(netns) as target:
        apply_module.apply(target, filter_intent(intent, CIDRS, "tproxy", netns))
        before = kernel_state(netns)
        bigger = filter_intent(intent, [*CIDRS, "192.0.2.0/24"], "tproxy", netns)
        plan, _ = apply_module.make_plan(target, bigger)
        assert [a.op for a in plan.actions] == ["add"], plan.actions  # the raw fast path

        real = nfnetlink.interval_keys

        def off_by_one_network(layout: SetLayout, text: str) -> list[tuple[bytes, int]]:
            # The encoder's bug: 192.0.2.0/24 goes out as 192.0.3.0/24.
            return real(layout, "192.0.3.0/24" if text == "192.0.2.0/24" else text)

        monkeypatch.setattr(nfnetlink, "interval_keys", off_by_one_network)
        nfnetlink._encoded.cache_clear()
        with pytest.raises(ApplyError) as raised:
            apply_module.apply(target, bigger)
        assert "192.0.2.0/24" in "\n".join(a.key.name for a in raised.value.residual.actions)
        assert kernel_state(netns) == before  # the previous state, not half of the new one

        monkeypatch.setattr(nfnetlink, "interval_keys", real)
        nfnetlink._encoded.cache_clear()
        target.forget()
        result = apply_module.apply(target, bigger)
        assert result.operations == 1
        assert apply_module.make_plan(target, bigger)[0].empty
        listed = sh("ip", "netns", "exec", netns, "nft", "list", "table", "inet", f"kernform-{intent}")
        assert "192.0.2.0/24" in listed and "192.0.3.0/24" not in listed


def test_element_lookups_answer_for_exact_elements_only(netns: str) -> None:
    sh("ip", "netns", "exec", netns, "nft",
       "add table inet kfv; add set inet kfv s { type ipv4_addr; flags interval; elements = { 10.0.0.0/8, 192.0.2.7 } }")
    layout = SetLayout(4, True)
    sock = NfTablesSocket(netns)
    try:
        held = sock.read_elements("kfv", [ElementChanges(
            "s", layout, removed=["10.1.0.0/16", "198.51.100.0/24"], added=[("10.0.0.0/8", None), ("192.0.2.7", None),
                                                                           ("10.0.0.0/9", None)])])
    finally:
        sock.close()
    # 10.1.0.0/16 and 10.0.0.0/9 lie inside 10.0.0.0/8 but are not elements of the set.
    assert held == {"s": {"10.0.0.0/8": b"", "192.0.2.7": b""}}


def test_a_bpf_map_write_that_stores_the_wrong_value_is_caught_and_undone(
        netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bcc")
    intent = f"kfv{PID}-bpf"
    with Target(netns) as target:
        try:
            apply_module.apply(target, filter_intent(intent, CIDRS, "ebpf", netns))
            before = (kernel_state(netns), bpf_map_dump(intent, netns))
            bigger = filter_intent(intent, [*CIDRS, "192.0.2.0/24"], "ebpf", netns)
            plan, _ = apply_module.make_plan(target, bigger)
            assert [a.kind for a in plan.actions] == ["bpf.entry"], plan.actions  # map updates only

            real_update = libbpf.Map.update

            def flipped_value(self: libbpf.Map, key: bytes, value: bytes, flags: int = 0) -> None:
                # The writer's bug: the value stored under 192.0.2.0/24 has its last byte flipped.
                if key.endswith(bytes([192, 0, 2, 0])):
                    value = value[:-1] + bytes([value[-1] ^ 0xFF])
                real_update(self, key, value, flags)

            monkeypatch.setattr(libbpf.Map, "update", flipped_value)
            with pytest.raises(ApplyError):
                apply_module.apply(target, bigger)
            monkeypatch.setattr(libbpf.Map, "update", real_update)
            assert (kernel_state(netns), bpf_map_dump(intent, netns)) == before

            target.forget()
            apply_module.apply(target, bigger)
            assert apply_module.make_plan(target, bigger)[0].empty
            # A fresh process sees the same: what was verified is what the kernel holds.
            with Target(netns) as fresh:
                assert apply_module.make_plan(fresh, bigger)[0].empty
        finally:
            target.forget()
            apply_module.destroy(target, intent)


def test_an_lpm_trie_answers_held_only_for_exact_prefixes() -> None:
    bcc = pytest.importorskip("bcc")
    if os.geteuid() != 0:
        pytest.skip("BPF needs root")
    fd = libbpf.lib().bpf_map_create(libbpf.MAP_LPM_TRIE, None, 8, 4, 16, _lpm_opts())
    assert fd >= 0, os.strerror(-fd)
    del bcc
    bpf_map = libbpf.Map(fd)
    try:
        def key(prefix: int, *octets: int) -> bytes:
            return prefix.to_bytes(4, "little") + bytes(octets)

        assert bpf_map.held(key(8, 10, 0, 0, 0)) is None  # empty trie
        bpf_map.update(key(8, 10, 0, 0, 0), b"\x01\0\0\0")
        bpf_map.update(key(24, 192, 0, 2, 0), b"\x02\0\0\0")
        assert bpf_map.lookup(key(16, 10, 1, 0, 0)) == b"\x01\0\0\0"  # what a plain lookup says
        assert bpf_map.held(key(16, 10, 1, 0, 0)) is None
        assert bpf_map.held(key(8, 10, 0, 0, 0)) == b"\x01\0\0\0"
        assert bpf_map.held(key(24, 192, 0, 2, 0)) == b"\x02\0\0\0"
        assert bpf_map.held(key(32, 192, 0, 2, 1)) is None
    finally:
        bpf_map.close()


def _lpm_opts() -> Any:
    import ctypes

    class Opts(ctypes.Structure):
        _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                    ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                    ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
                    ("numa_node", ctypes.c_uint32), ("map_ifindex", ctypes.c_uint32)]

    opts = Opts(sz=ctypes.sizeof(Opts), map_flags=1)  # BPF_F_NO_PREALLOC: required for LPM tries
    return ctypes.byref(opts)


@pytest.mark.parametrize("many", [False, True], ids=["looked-up", "dumped"])
def test_element_reads_decode_intervals_and_map_values(netns: str, many: bool) -> None:
    """The two ways a raw batch is read back agree with what nft itself lists."""
    elements = [f"10.{i}.0.0/16" for i in range(100 if many else 3)] + ["192.0.2.7", "255.255.255.0/24"]
    sh("ip", "netns", "exec", netns, "nft",
       "add table inet kfv; add set inet kfv s { type ipv4_addr; flags interval; elements = { "
       + ", ".join(elements) + " } }; "
       "add map inet kfv m { typeof numgen random mod 1 : ip daddr . tcp dport; flags interval; counter; "
       "elements = { 0-4 : 10.0.0.1 . 80, 5-9 : 10.0.0.2 . 8080 } }")
    sock = NfTablesSocket(netns)
    try:
        held = sock.read_elements("kfv", [
            ElementChanges("s", SetLayout(4, True), removed=["10.200.0.0/16"], added=[(e, None) for e in elements]),
            ElementChanges("m", SetLayout(4, False, 4), removed=["0-3"],
                           added=[("0-4", "10.0.0.1 . 80"), ("5-9", "10.0.0.9 . 8080")]),
        ])
    finally:
        sock.close()
    assert held["s"] == dict.fromkeys(elements, b"")
    layout = SetLayout(4, False, 4)
    assert {k: nfnetlink.map_value_text(layout, v) for k, v in held["m"].items()} == {
        "0-4": "10.0.0.1 . 80", "5-9": "10.0.0.2 . 8080"}
