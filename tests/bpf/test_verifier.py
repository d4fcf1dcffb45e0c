"""Every program of every bpf/*.c entry file compiles with bcc and passes the
kernel verifier, with the default settings and with representative -D
settings the compiler may emit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.bpf

# (entry file, function, program type, expected attach type)
PROGRAMS = [
    ("tc_filter.c", "kf_tc_ingress", "SCHED_CLS", "NONE"),
    ("tc_filter.c", "kf_tc_egress", "SCHED_CLS", "NONE"),
    ("sk_lookup.c", "kf_sk_lookup", "SK_LOOKUP", "SK_LOOKUP"),
    ("sock_connect.c", "kf_connect4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT"),
    ("sock_connect.c", "kf_connect6", "CGROUP_SOCK_ADDR", "CGROUP_INET6_CONNECT"),
    ("sock_connect.c", "kf_sendmsg4", "CGROUP_SOCK_ADDR", "CGROUP_UDP4_SENDMSG"),
    ("sock_connect.c", "kf_sendmsg6", "CGROUP_SOCK_ADDR", "CGROUP_UDP6_SENDMSG"),
    ("sock_connect.c", "kf_recvmsg4", "CGROUP_SOCK_ADDR", "CGROUP_UDP4_RECVMSG"),
    ("sock_connect.c", "kf_recvmsg6", "CGROUP_SOCK_ADDR", "CGROUP_UDP6_RECVMSG"),
    ("sock_connect.c", "kf_sockops", "SOCK_OPS", "CGROUP_SOCK_OPS"),
    ("sock_connect.c", "kf_getsockopt", "CGROUP_SOCKOPT", "CGROUP_GETSOCKOPT"),
    ("tc_lb.c", "kf_lb_ingress", "SCHED_CLS", "NONE"),
    ("tc_lb.c", "kf_lb_egress", "SCHED_CLS", "NONE"),
]

# Settings the compiler emits, per entry file: name -> cflags.
SETTINGS: dict[str, dict[str, list[str]]] = {
    "tc_filter.c": {
        "defaults": [],
        "small": ["-DKF_MAX_RULES=8", "-DKF_MAX_PREFIXES=64", "-DKF_RL_ENTRIES=128"],
        "256-rules-l3-device": ["-DKF_MAX_RULES=256", "-DKF_L2_HLEN=0", "-DKF_IPV6_MAX_EXT=6"],
    },
    "sk_lookup.c": {
        "defaults": [],
        "small": ["-DKF_MAX_RULES=4", "-DKF_MAX_PREFIXES=16", "-DKF_MAX_PROXIES=2"],
        "256-rules": ["-DKF_MAX_RULES=256", "-DKF_MAX_PROXIES=1024"],
    },
    "sock_connect.c": {
        "defaults": [],
        "small-cgroup-affinity": [
            "-DKF_MAX_RULES=4",
            "-DKF_MAX_SERVICES=4",
            "-DKF_MAX_BACKENDS=16",
            "-DKF_MAGLEV_CHUNKS=8",
            "-DKF_AFFINITY_KEY=1",
            "-DKF_PROXY_V4=0x7f000002",
        ],
        "large": [
            "-DKF_MAX_RULES=256",
            "-DKF_MAX_PREFIXES=1048576",
            "-DKF_MAX_SERVICES=1048576",
            "-DKF_MAX_BACKENDS=1048576",
        ],
    },
    "tc_lb.c": {
        "defaults": [],
        "small": ["-DKF_MAX_SERVICES=4", "-DKF_MAX_BACKENDS=16", "-DKF_MAGLEV_CHUNKS=8", "-DKF_LB_FLOWS=128"],
        "large-l3-device": [
            "-DKF_MAX_SERVICES=1048576",
            "-DKF_MAX_BACKENDS=1048576",
            "-DKF_LB_FLOWS=262144",
            "-DKF_L2_HLEN=0",
            "-DKF_IPV6_MAX_EXT=8",
        ],
    },
}

CASES = [
    pytest.param(src, fn, ptype, atype, flags, id=f"{src}:{fn}:{setting}")
    for src, fn, ptype, atype in PROGRAMS
    for setting, flags in SETTINGS[src].items()
]


BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"


def test_every_entry_file_is_covered() -> None:
    entry_files = {p.name for p in BPF_DIR.glob("*.c")}
    assert entry_files == {src for src, *_ in PROGRAMS}
    assert entry_files == set(SETTINGS)


def test_every_file_has_spdx_header() -> None:
    for path in [*BPF_DIR.glob("*.c"), *BPF_DIR.glob("lib/*.h")]:
        first = path.read_text().splitlines()[0]
        assert first == "// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)", path


@pytest.mark.parametrize(("source", "function", "prog_type", "attach_type", "cflags"), CASES)
def test_program_passes_verifier(
    kf: Any, source: str, function: str, prog_type: str, attach_type: str, cflags: list[str]
) -> None:
    bpf = kf.load_bpf(source, cflags)
    fn = bpf.load_func(function.encode(), kf.PROG_TYPES[prog_type], attach_type=kf.ATTACH_TYPES[attach_type])
    assert fn.fd >= 0


def test_maps_are_pinned_and_reused_with_kf_pin_dir(kf: Any) -> None:
    """With KF_PIN_DIR a second load reuses the first load's maps (contents kept)."""
    pin_dir = Path(f"/sys/fs/bpf/kfb-test-{os.getpid()}")
    if not Path("/sys/fs/bpf").is_mount():
        pytest.skip("bpffs not mounted at /sys/fs/bpf")
    pin_dir.mkdir()
    try:
        flags = [f'-DKF_PIN_DIR="{pin_dir}"']
        first = kf.load_bpf("tc_filter.c", flags)
        first.load_func(b"kf_tc_ingress", kf.PROG_TYPES["SCHED_CLS"])
        rules = first[b"rules"]
        leaf = rules.Leaf()
        leaf.action = 2
        leaf.dport_hi = 65535
        rules[rules.Key(3)] = leaf
        assert {p.name for p in pin_dir.iterdir()} >= {"rules", "src_v4", "counters", "config"}

        second = kf.load_bpf("tc_filter.c", flags)
        second.load_func(b"kf_tc_ingress", kf.PROG_TYPES["SCHED_CLS"])
        again = second[b"rules"]
        assert again[again.Key(3)].action == 2
    finally:
        for p in pin_dir.iterdir():
            p.unlink()
        pin_dir.rmdir()


def test_tc_lb_maps_are_pinned_and_reused_with_kf_pin_dir(kf: Any) -> None:
    """Every tc_lb map is pinned, and both functions of a second load share the first load's maps."""
    pin_dir = Path(f"/sys/fs/bpf/kfb-test-lb-{os.getpid()}")
    if not Path("/sys/fs/bpf").is_mount():
        pytest.skip("bpffs not mounted at /sys/fs/bpf")
    pin_dir.mkdir()
    try:
        flags = [f'-DKF_PIN_DIR="{pin_dir}"', "-DKF_MAX_SERVICES=4"]
        first = kf.load_bpf("tc_lb.c", flags)
        first.load_func(b"kf_lb_ingress", kf.PROG_TYPES["SCHED_CLS"])
        maglev = first[b"maglev"]
        key = maglev.Key()
        key.id, key.chunk = 3, 1
        leaf = maglev.Leaf()
        leaf.slot[7] = 5
        maglev[key] = leaf
        assert {p.name for p in pin_dir.iterdir()} == {
            "services_v4",
            "services_v6",
            "maglev",
            "backends_v4",
            "backends_v6",
            "lb_flows",
            "lb_rev",
            "lb_counters",
            "lb_be_counters",
        }

        second = kf.load_bpf("tc_lb.c", flags)
        second.load_func(b"kf_lb_ingress", kf.PROG_TYPES["SCHED_CLS"])
        second.load_func(b"kf_lb_egress", kf.PROG_TYPES["SCHED_CLS"])
        again = second[b"maglev"]
        assert again[key].slot[7] == 5
    finally:
        for p in pin_dir.iterdir():
            p.unlink()
        pin_dir.rmdir()


def test_lb_tables_are_declared_once_for_sock_connect_and_tc_lb() -> None:
    """The compiler writes the same services / maglev / backends contents into both
    objects: both take the declarations and their settings' defaults from one header."""
    tables = ("services_v4", "services_v6", "maglev", "backends_v4", "backends_v6")
    header = (BPF_DIR / "lib" / "kf_lb_tables.h").read_text()
    assert all(f", {m}," in header for m in tables)
    for name in ("tc_lb.c", "sock_connect.c"):
        text = (BPF_DIR / name).read_text()
        assert '#include "lib/kf_lb_tables.h"' in text, name
        own = [line for line in text.splitlines() if line.startswith("KF_MAP")
               and any(f", {m}," in line for m in tables)]
        assert own == [], f"{name} declares LB tables itself: {own}"


def test_interception_matcher_is_identical_in_both_entry_files() -> None:
    """sk_lookup.c and sock_connect.c carry the same interception maps, counters and rule walk
    (bcc rewrites map calls only in the main file, so it cannot be a header); sk_lookup's walk
    also masks the candidates with the rules allowed on the ingress interface."""
    pieces = [
        ("KF_LPM(struct kf_lpm_v4, struct kf_rule_set, intercept_v4", "intercept_counters, KF_MAX_RULES);\n"),
        ("KF_ALWAYS_INLINE void kf_intercept_count(struct kf_intercept_rule *r, int what)\n{", "c->no_proxy++;\n}\n"),
        ("\t\t\tr = intercept_rules.lookup(&idx);", "\t\t\treturn r;\n"),
    ]

    def block(name: str, start: str, end: str) -> str:
        text = (BPF_DIR / name).read_text()
        at = text.index(start)
        return text[at : text.index(end, at) + len(end)]

    for start, end in pieces:
        assert block("sk_lookup.c", start, end) == block("sock_connect.c", start, end)
