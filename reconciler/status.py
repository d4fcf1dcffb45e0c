"""Per-rule counters of an applied intent, whichever backend carries it.

tproxy keeps named nft counters (one per filter rule and service); ebpf keeps
per-CPU counter maps indexed by the counter number the compiler gave each
intent rule. Both are reported per intent rule, by the rule's origin
(`filtering.forward/deny-admin`), so `status` and tests need not know which
backend is in place.
"""

from __future__ import annotations

from typing import Any

from compiler import bpf_layout
from compiler.objects import BpfMapEntry, DesiredState, NftCounter, nft_table_name

from .observe import Target


def rule_counters(target: Target, desired: DesiredState) -> dict[str, dict[str, int]]:
    if desired.backend == "ebpf":
        return _bpf_counters(target, desired)
    observed = target.nft.counters(nft_table_name(desired.intent))
    result: dict[str, dict[str, int]] = {}
    for obj in desired.objects:
        if isinstance(obj, NftCounter) and obj.name in observed:
            packets, octets = observed[obj.name]
            entry = result.setdefault(obj.origin, {})
            if obj.name.endswith("_pass"):
                entry["passed"] = packets
            else:
                entry["packets"], entry["bytes"] = packets, octets
    return result


def _bpf_counters(target: Target, desired: DesiredState) -> dict[str, dict[str, int]]:
    """counters() of the BPF driver: {program: {map: {index: {field: value}}}}, mapped to intent rules."""
    live: dict[str, Any] = target.bpf.counters(desired.intent)
    result: dict[str, dict[str, int]] = {}
    seen: set[tuple[str, str, int]] = set()  # several descriptors (ports, protocols) share one counter
    for entry in desired.objects:
        if not isinstance(entry, BpfMapEntry) or entry.map not in ("rules", "intercept_rules"):
            continue
        value = bytes.fromhex(entry.value_hex)
        if entry.map == "rules":
            counter = bpf_layout.RULE.unpack(value)[3]
            stats = live.get(entry.program, {}).get("counters", {}).get(counter, {})
            fields = {"packets": stats.get("packets", 0), "bytes": stats.get("bytes", 0),
                      "dropped": stats.get("dropped", 0)}
        else:
            counter = bpf_layout.INTERCEPT_RULE.unpack(value)[6]
            stats = live.get(entry.program, {}).get("intercept_counters", {}).get(counter, {})
            fields = {k: stats.get(k, 0) for k in ("redirected", "bypassed", "no_proxy")}
        if (entry.program, entry.map, counter) in seen:
            continue
        seen.add((entry.program, entry.map, counter))
        # A rule on several interfaces has a counter in each interface's program: add them up.
        total = result.setdefault(entry.origin, dict.fromkeys(fields, 0))
        for name, value_ in fields.items():
            total[name] = total.get(name, 0) + int(value_)
    return result
