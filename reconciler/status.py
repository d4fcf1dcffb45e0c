"""What an applied intent counts, whichever backend carries it, and which backend that is.

The backend is read from the kernel: the intent's nft table with chains is
tproxy's, BPF programs pinned under /sys/fs/bpf/kernform/<intent>/<namespace>
are ebpf's (an ebpf intent's nft table holds no chain, only its ownership
record). Counters are read from the kernel and reported per origin
(`filtering.forward/deny-admin`), so `status` and tests need not know which
backend is in place. Origins are named two ways:

- from the kernel alone (`status` without FILE). tproxy's named nft counters
  say what they count by their names (`f_<direction>_<rule>`, its `_pass`
  twin for rate limits, `fd_<direction>` before a chain's default policy,
  `i_<rule>`, `lb_<service>`) and the rule using each one says whether it
  drops. ebpf's per-CPU counter maps are indexed by the `counter` field of the
  rule descriptor maps (`rules`, `intercept_rules`) and by the service id of
  `services_v4/v6`; these say what an index counts (interface, protocol, ports,
  action, VIP) but not the intent's rule names, so such a row is named by its
  program and index (`filtering@eth0/#2`) and carries a `rule` description.
- with the intent and its compile (`status FILE`, tests): ebpf indexes get
  the intent's names, and a counter the compile wants but the kernel lacks is
  listed as not available.

What a backend does not count is listed under `notAvailable` rather than shown
as zero. Each backend of a service has a row of its own
(`loadBalancing/web -> 10.0.0.2:8080`, field `connections`): tproxy counts in
the elements of the service's map (every element carries a counter; the
elements of one backend add up), ebpf in `lb_be_counters`, keyed by service id and
the backend's position in the service.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import urllib.parse
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compiler import bpf_layout
from compiler.objects import (
    BPF_PIN_ROOT,
    NFT_TABLE_PREFIX,
    BpfMapEntry,
    BpfProgram,
    DesiredState,
    KernelObject,
    NftChain,
    NftCounter,
)

if TYPE_CHECKING:
    from compiler.intent import NetworkIntent

    from .drivers.nft import NftObservation
from . import ownership
from .lock import lock_path
from .observe import ObservedState, Target

SECTIONS = ("interception", "loadBalancing", "filtering", "other")
DIRECTIONS = ("input", "forward", "output")
# The order fields are shown in (others follow in the order they were found).
FIELD_ORDER = ("section", "policy", "newFlows", "connections", "redirected", "bypassed", "noProxy", "packets", "bytes", "dropped",
               "passed", "rule", "notAvailable")
_POLICY = {"accept": "allow", "drop": "deny"}
_DROPS = frozenset({"drop", "reject"})
_PROTO = {0: "any", 1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp"}
# Field names of the per-CPU counter structs (bpf/lib/kf_types.h), for maps the driver returns as u64 words.
_BPF_FIELDS = {
    "counters": ("packets", "bytes", "dropped"),
    "intercept_counters": ("redirected", "bypassed", "no_proxy"),
    "lb_counters": ("new_flows", "packets", "bytes", "dropped"),
    "lb_be_counters": ("connections",),
}
TPROXY_SERVICE = ("packets and bytes (nft counts a service in its nat chains, which see only the first packet "
                  "of a connection: newFlows)")


# ---------------------------------------------------------------- which backend
def applied_backends(observed: ObservedState) -> tuple[str, ...]:
    """The backends whose state the kernel holds for the intent: none, one, or both (an interrupted switch)."""
    found = []
    if any(isinstance(o, NftChain) for o in observed.nft.objects):
        found.append("tproxy")
    if any(isinstance(o, BpfProgram) for o in observed.bpf):
        found.append("ebpf")
    return tuple(found)


def watch_record(run_dir: Path, netns: str | None, intent: str) -> dict[str, Any] | None:
    """What a running `kernform watch` says of `intent` in the target (reconciler.daemon publishes it next to
    the intent's lock), or None when no daemon holds the lock: a record left by a daemon that is gone is stale."""
    lock = lock_path(run_dir, netns, intent)
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            pass  # held: by a daemon, or by a CLI run at this moment
        else:
            return None
        words = os.pread(fd, 64, 0).decode(errors="replace").split()
        if len(words) > 1 and words[1] != "watch":
            return None
        try:
            record = json.loads(lock.with_suffix(".status").read_text())
        except (OSError, ValueError):
            return {"health": "unknown", "reason": "the daemon has not reported yet"}
        return record if isinstance(record, dict) else None
    finally:
        os.close(fd)


def applied_intents(target: Target) -> list[str]:
    """Every intent with state in the target: an nft table of ours, or BPF pins for this namespace."""
    from .drivers.bpf import intent_pin_dir

    names = {t.removeprefix(NFT_TABLE_PREFIX) for t in target.nft.tables()}
    try:
        pinned = [urllib.parse.unquote(e.name) for e in Path(BPF_PIN_ROOT).iterdir() if e.is_dir()]
    except OSError:  # no bpffs, or no kernform pins at all
        pinned = []
    names.update(name for name in pinned if name and intent_pin_dir(name, target.netns).is_dir())
    # And those whose nft table is gone (nft flush ruleset) but whose routes kernform still records.
    names.update(ownership.recorded_intents(target.netns))
    return sorted(names)


# ---------------------------------------------------------------- rows
@dataclass
class Row:
    """One origin's counters; rows of the same origin (a rule on several interfaces) add up."""

    section: str
    origin: str
    values: dict[str, Any] = field(default_factory=dict)

    def add(self, values: Mapping[str, Any]) -> Row:
        for name, value in values.items():
            mine = self.values.get(name)
            if name == "notAvailable" and mine is not None and value not in mine.split("; "):
                self.values[name] = f"{mine}; {value}"
            elif isinstance(value, int) and isinstance(mine, int):
                self.values[name] = mine + value
            elif mine is None:
                self.values[name] = value
        return self


class Rows:
    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def __call__(self, section: str, origin: str) -> Row:
        row = self.rows.get(origin)
        if row is None:
            row = self.rows[origin] = Row(section, origin)
        return row

    def __contains__(self, origin: object) -> bool:
        return origin in self.rows


def ordered(rows: Iterable[Row]) -> dict[str, dict[str, Any]]:
    def rank(row: Row) -> tuple[Any, ...]:
        default = row.origin.endswith("(default)")
        group = row.origin.removesuffix(" (default)").partition("/")[0]
        section = SECTIONS.index(row.section) if row.section in SECTIONS else len(SECTIONS)
        return section, group, default, row.origin

    result: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=rank):
        values = {"section": row.section, **row.values}
        known = [k for k in FIELD_ORDER if k in values]
        result[row.origin] = {k: values[k] for k in [*known, *(k for k in values if k not in FIELD_ORDER)]}
    return result


def counters(target: Target, observed: ObservedState, backends: Iterable[str],
             intent: NetworkIntent | None = None, desired: DesiredState | None = None) -> dict[str, dict[str, Any]]:
    """{origin: {"section": ..., field: value}} for the state of `backends` the kernel holds now.

    With `intent` (and its `desired` compile), ebpf rows get the intent's names and the counters the
    compile wants but the kernel lacks are listed as not available."""
    rows = Rows()
    for backend in backends:
        if backend == "tproxy":
            live = target.nft.counters(observed.nft.table) if observed.nft.exists else {}
            per_backend = target.nft.element_counters(observed.nft.table) if observed.nft.exists else {}
            wanted = [o.name for o in desired.objects if isinstance(o, NftCounter)] \
                if desired is not None and desired.backend == "tproxy" else []
            nft_rows(rows, observed.nft, live, wanted, per_backend)
        elif backend == "ebpf":
            has_programs = any(isinstance(o, BpfProgram) for o in observed.bpf)
            maps = target.bpf.counters(observed.intent) if has_programs else {}
            names = ebpf_names(intent, desired if desired is not None and desired.backend == "ebpf" else None)
            bpf_rows(rows, observed.bpf, maps, names)
    return ordered(rows.rows.values())


def rule_counters(target: Target, desired: DesiredState,
                  intent: NetworkIntent | None = None) -> dict[str, dict[str, Any]]:
    """Counters of `desired`'s backend as the kernel holds them now, by the compile's origins."""
    observed = target.observe(desired.intent, desired.routing_tables, bpf=desired.backend == "ebpf")
    return counters(target, observed, [desired.backend], intent, desired)


# ---------------------------------------------------------------- tproxy: named nft counters
def nft_counter_origin(name: str) -> tuple[str, str, str]:
    """(section, origin, role) of one of kernform's nft counters, from its name alone.

    Names are `f_<direction>_<rule>` (role "rule"), `f_<direction>_<rule>_pass` ("passed": packets a
    rate limit let through), `fd_<direction>` ("default": packets reaching the chain's policy),
    `i_<rule>` ("interception"), `lb_<service>` ("service"); intent names hold no '_', so the parts
    are unambiguous. Any other name is reported as it is (role "other")."""
    if name.startswith("fd_") and name[3:] in DIRECTIONS:
        return "filtering", f"filtering.{name[3:]} (default)", "default"
    if name.startswith("f_"):
        direction, _, rule = name[2:].partition("_")
        if direction in DIRECTIONS and rule:
            if rule.endswith("_pass") and len(rule) > 5:
                return "filtering", f"filtering.{direction}/{rule[:-5]}", "passed"
            return "filtering", f"filtering.{direction}/{rule}", "rule"
    if name.startswith("i_") and len(name) > 2:
        return "interception", f"interception/{name[2:]}", "interception"
    if name.startswith("lb_") and len(name) > 3:
        return "loadBalancing", f"loadBalancing/{name[3:]}", "service"
    return "other", name, "other"


def nft_counter_verdicts(snapshot: Iterable[Mapping[str, Any]] | None) -> dict[str, str]:
    """Counter name -> the verdict of the rule counting with it (nft JSON listing); "" for a rule without one."""
    result: dict[str, str] = {}
    for item in snapshot or ():
        rule = item.get("rule")
        if not isinstance(rule, Mapping):
            continue
        expr = [e for e in rule.get("expr", ()) if isinstance(e, Mapping)]
        verdict = next((k for e in expr for k in e if k in ("accept", "drop", "reject")), "")
        for e in expr:
            if isinstance(e.get("counter"), str):  # a named counter; an anonymous one is a dict
                result.setdefault(e["counter"], verdict)
    return result


def nft_rows(rows: Rows, observed: NftObservation, live: Mapping[str, tuple[int, int]],
             wanted: Sequence[str] = (), per_backend: Mapping[str, Mapping[str, tuple[int, int]]] | None = None) -> None:
    verdicts = nft_counter_verdicts(observed.snapshot)
    policies = {o.name: o.policy for o in observed.objects if isinstance(o, NftChain)}
    for name, (packets, octets) in sorted(live.items()):
        section, origin, role = nft_counter_origin(name)
        row = rows(section, origin)
        if role == "default":
            policy = policies.get(f"filter_{name[3:]}")
            row.add({"policy": _POLICY.get(policy or "", policy or "unknown"), "packets": packets, "bytes": octets})
            if policy is not None:
                row.add({"dropped": packets if policy in _DROPS else 0})
        elif role == "service":
            row.add({"newFlows": packets, "notAvailable": TPROXY_SERVICE})
            # The service's map is named like its counter; its elements count the connections they chose.
            for value, (chosen, _) in sorted((per_backend or {}).get(name, {}).items()):
                address, _, port = value.partition(" . ")
                shown = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
                rows(section, f"{origin} -> {shown}").add({"connections": chosen})
        elif role in ("rule", "passed"):
            values: dict[str, Any] = {"packets": packets, "bytes": octets}
            verdict = verdicts.get(name)
            if verdict:
                values["dropped"] = packets if verdict in _DROPS else 0
            if role == "passed":
                values["passed"] = packets
            row.add(values)
        else:
            row.add({"packets": packets, "bytes": octets})
    # Chains whose default policy has no counter of its own (applied by a kernform without fd_ counters).
    for chain, policy in sorted(policies.items()):
        direction = chain.removeprefix("filter_")
        origin = f"filtering.{direction} (default)"
        if chain.startswith("filter_") and direction in DIRECTIONS and origin not in rows:
            rows("filtering", origin).add({"policy": _POLICY.get(policy, policy),
                                           "notAvailable": f"packets (the table has no fd_{direction} counter)"})
    for name in wanted:
        if name not in live:
            section, origin, _ = nft_counter_origin(name)
            rows(section, origin).add({"notAvailable": f"counter {name} (not in the kernel: apply is pending)"})


# ---------------------------------------------------------------- ebpf: per-CPU counter maps
@dataclass(frozen=True)
class EbpfNames:
    """The intent's names for ebpf counter indexes, from its compile."""

    filters: Mapping[tuple[str, int], str] = field(default_factory=dict)  # (program, counter) -> origin
    intercepts: Mapping[tuple[str, int], str] = field(default_factory=dict)  # (inbound|outbound, counter)
    services: Mapping[tuple[str, str], str] = field(default_factory=dict)  # (services_v4|v6, key hex)


def ebpf_names(intent: NetworkIntent | None, desired: DesiredState | None) -> EbpfNames | None:
    if intent is None and desired is None:
        return None
    filters: dict[tuple[str, int], str] = {}
    services: dict[tuple[str, str], str] = {}
    for entry in desired.objects if desired is not None else ():
        if not isinstance(entry, BpfMapEntry):
            continue
        if entry.map == "rules":
            filters[(entry.program, bpf_layout.RULE.unpack(bytes.fromhex(entry.value_hex))[3])] = entry.origin
        elif entry.map in ("services_v4", "services_v6"):
            services[(entry.map, entry.key_hex)] = entry.origin
    intercepts: dict[tuple[str, int], str] = {}
    if intent is not None:
        # compiler/ebpf.py numbers the interception counters by the rule's position among the rules of
        # its direction (the intercept_rules entries' origin names the direction only).
        for direction in ("inbound", "outbound"):
            rules = [r for r in intent.spec.interception.rules if r.direction == direction]
            intercepts.update(((direction, i), f"interception/{r.name}") for i, r in enumerate(rules))
    return EbpfNames(filters, intercepts, services)


def _fields(stats: Any, map_name: str) -> dict[str, int]:
    """One index of a counters() map as {field: value}: the driver gives dicts for the structs it
    knows and u64 words for the others."""
    if isinstance(stats, Mapping):
        return {k: int(v) for k, v in stats.items()}
    if isinstance(stats, Sequence):
        return {k: int(v) for k, v in zip(_BPF_FIELDS.get(map_name, ()), stats, strict=False)}
    return {}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def _setting(cflags: Sequence[str], name: str) -> int | None:
    for flag in cflags:
        key, _, value = flag.removeprefix("-D").partition("=")
        if key == name and value.isdigit():
            return int(value)
    return None


def _tc_interfaces(program: BpfProgram, prefix: str) -> str:
    names = sorted({point.split(":")[1] for _, point in program.attachments if point.startswith("tc:")})
    return ",".join(names) or program.name.removeprefix(prefix)


def _ports(ranges: Iterable[tuple[int, int]]) -> str:
    ranges = sorted(set(ranges))
    if not ranges or (0, 65535) in ranges:
        return "any port"
    text = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)
    return ("port " if len(ranges) == 1 and ranges[0][0] == ranges[0][1] else "ports ") + text


def _protos(protos: Iterable[int]) -> str:
    return "+".join(_PROTO.get(p, str(p)) for p in sorted(set(protos)))


def describe_filter_rule(descriptors: Sequence[tuple[int, ...]]) -> str:
    """A tc_filter counter's rule from its descriptors (bpf_layout.RULE tuples sharing the counter)."""
    flags = 0
    for d in descriptors:
        flags |= d[0]
    hooks = "+".join(chain for chain, flag in bpf_layout.CHAIN_FLAGS if flags & flag)
    _, _, action, _, _, _, rate, burst, _ = descriptors[0]
    verb = {bpf_layout.ACT_ALLOW: "allow", bpf_layout.ACT_DENY: "deny",
            bpf_layout.ACT_RATE_LIMIT: f"rate-limit {rate}/s burst {burst}"}.get(action, f"action {action}")
    return f"{hooks} {_protos(d[1] for d in descriptors)} {_ports((d[4], d[5]) for d in descriptors)} {verb}"


def describe_intercept_rule(descriptors: Sequence[tuple[int, ...]]) -> str:
    """An interception counter's rule from its descriptors (bpf_layout.INTERCEPT_RULE tuples)."""
    redirects = [d for d in descriptors if d[0] == bpf_layout.ICPT_REDIRECT]
    bypasses = len(descriptors) - len(redirects)
    shown = redirects or descriptors
    proxies = sorted({d[4] for d in redirects})
    text = f"{_protos(d[1] for d in shown)} {_ports((d[2], d[3]) for d in shown)}"
    text += f" -> proxy :{','.join(map(str, proxies))}" if proxies else " bypass"
    return text + (f" ({bypasses} exceptions)" if redirects and bypasses else "")


def _service_label(map_name: str, key: bytes) -> str:
    layout = bpf_layout.SVC_KEY_V4 if map_name.endswith("v4") else bpf_layout.SVC_KEY_V6
    vip, port, proto = layout.unpack(key)
    address = ipaddress.ip_address(vip)
    host = str(address) if address.version == 4 else f"[{address}]"
    return f"{host}:{port}/{_PROTO.get(proto, proto)}"


def bpf_rows(rows: Rows, observed: Iterable[KernelObject], live: Mapping[str, Mapping[str, Any]],
             names: EbpfNames | None) -> None:
    programs = {o.name: o for o in observed if isinstance(o, BpfProgram)}
    entries: dict[tuple[str, str], list[BpfMapEntry]] = {}
    for o in observed:
        if isinstance(o, BpfMapEntry):
            entries.setdefault((o.program, o.map), []).append(o)
    for name, program in sorted(programs.items()):
        maps = live.get(name, {})
        if program.source == "tc_filter.c":
            _filter_rows(rows, program, entries, maps, names)
        elif program.source in ("sk_lookup.c", "sock_connect.c"):
            direction = "inbound" if program.source == "sk_lookup.c" else "outbound"
            by_counter: dict[int, list[tuple[int, ...]]] = {}
            for entry in entries.get((name, "intercept_rules"), []):
                d = bpf_layout.INTERCEPT_RULE.unpack(bytes.fromhex(entry.value_hex))
                by_counter.setdefault(d[6], []).append(d)
            stats = maps.get("intercept_counters", {})
            for counter, descriptors in sorted(by_counter.items()):
                origin = names.intercepts.get((direction, counter)) if names else None
                row = rows("interception", origin or f"interception ({direction})/#{counter}")
                fields = {_camel(k): v for k, v in _fields(stats.get(counter), "intercept_counters").items()}
                row.add({k: fields.get(k, 0) for k in ("redirected", "bypassed", "noProxy")})
                if origin is None:
                    row.add({"rule": describe_intercept_rule(descriptors)})
        if program.source in ("tc_lb.c", "sock_connect.c"):
            _service_rows(rows, program, entries, maps, names)


def _service_rows(rows: Rows, program: BpfProgram, entries: Mapping[tuple[str, str], list[BpfMapEntry]],
                  maps: Mapping[str, Any], names: EbpfNames | None) -> None:
    """Per service (lb_counters) and per backend (lb_be_counters). tc_lb counts forwarded flows and their
    packets, sock_connect the connect()/sendmsg() calls it balanced (no packets); rows of the same
    service add up over programs. A service's backends are the indexes its Maglev row holds."""
    stats = maps.get("lb_counters", {})
    backend_stats = maps.get("lb_be_counters", {})
    chosen_by_id: dict[int, set[int]] = {}  # service id -> the backend positions its Maglev chunks hold
    for entry in entries.get((program.name, "maglev"), []):
        svc_id = bpf_layout.MAGLEV_KEY.unpack(bytes.fromhex(entry.key_hex))[0]
        chosen_by_id.setdefault(svc_id, set()).update(array("I", bytes.fromhex(entry.value_hex)))
    for map_name in ("services_v4", "services_v6"):
        family = 4 if map_name.endswith("v4") else 6
        layout = bpf_layout.BACKEND_V4 if family == 4 else bpf_layout.BACKEND_V6
        addresses: dict[tuple[int, int], bytes] = {}  # (service id, position) -> kf_backend value
        for e in entries.get((program.name, f"backends_v{family}"), []):
            chunk_id, number = bpf_layout.MAGLEV_KEY.unpack(bytes.fromhex(e.key_hex))
            value = bytes.fromhex(e.value_hex)
            for at in range(0, len(value), layout.size):
                addresses[(chunk_id, number * bpf_layout.BACKEND_CHUNK + at // layout.size)] = \
                    value[at : at + layout.size]
        for entry in entries.get((program.name, map_name), []):
            key = bytes.fromhex(entry.key_hex)
            origin = (names.services.get((map_name, entry.key_hex)) if names else None) or \
                f"loadBalancing/{_service_label(map_name, key)}"
            svc_id = bpf_layout.SERVICE.unpack(bytes.fromhex(entry.value_hex))[0]
            fields = {_camel(k): v for k, v in _fields(stats.get(svc_id), "lb_counters").items()}
            wanted = ("newFlows", "packets", "bytes", "dropped") if program.source == "tc_lb.c" \
                else ("newFlows", "dropped")
            rows("loadBalancing", origin).add({k: fields.get(k, 0) for k in wanted})
            for position in sorted(slot - 1 for slot in chosen_by_id.get(svc_id, ()) if slot):
                held = addresses.get((svc_id, position))
                if held is None:
                    continue
                address, port = layout.unpack(held)
                ip = ipaddress.ip_address(address)
                shown = f"{ip}:{port}" if family == 4 else f"[{ip}]:{port}"
                # lb_be_counters is keyed {u32 service id, u32 position}: read as one little-endian number
                chosen = _fields(backend_stats.get(svc_id | position << 32), "lb_be_counters")
                rows("loadBalancing", f"{origin} -> {shown}").add({"connections": chosen.get("connections", 0)})


def _filter_rows(rows: Rows, program: BpfProgram, entries: Mapping[tuple[str, str], list[BpfMapEntry]],
                 maps: Mapping[str, Any], names: EbpfNames | None) -> None:
    where = f"filtering@{_tc_interfaces(program, 'tc-')}"
    by_counter: dict[int, list[tuple[int, ...]]] = {}
    for entry in entries.get((program.name, "rules"), []):
        d = bpf_layout.RULE.unpack(bytes.fromhex(entry.value_hex))
        by_counter.setdefault(d[3], []).append(d)
    stats = maps.get("counters", {})
    for counter, descriptors in sorted(by_counter.items()):
        origin = names.filters.get((program.name, counter)) if names else None
        row = rows("filtering", origin or f"{where}/#{counter}")
        fields = _fields(stats.get(counter), "counters")
        row.add({k: fields.get(k, 0) for k in ("packets", "bytes", "dropped")})
        if origin is None:
            row.add({"rule": describe_filter_rule(descriptors)})
    # counters[KF_MAX_RULES + 0, 1, 2]: packets of input, forward and output that matched no rule, decided
    # by that chain's default; named like tproxy's (the rows of every interface add up).
    max_rules = _setting(program.cflags, "KF_MAX_RULES")
    defaults = [bpf_layout.ACT_ALLOW] * 3
    for entry in entries.get((program.name, "config"), []):
        defaults = [d or bpf_layout.ACT_ALLOW for d in bpf_layout.FILTER_CONFIG.unpack(
            bytes.fromhex(entry.value_hex))[:3]]
    functions = {fn for fn, _ in program.attachments}
    chains = [c for c, fn in (("input", "kf_tc_ingress"), ("forward", "kf_tc_ingress"), ("output", "kf_tc_egress"))
              if fn in functions]
    ruled = 0
    for descriptors in by_counter.values():
        for d in descriptors:
            ruled |= d[0]
    for chain in chains:
        index = ("input", "forward", "output").index(chain)
        fields = _fields(stats.get(max_rules + index), "counters") if max_rules is not None else {}
        flag = dict(bpf_layout.CHAIN_FLAGS)[chain]
        if not (ruled & flag or defaults[index] == bpf_layout.ACT_DENY or fields.get("packets")):
            continue  # a chain this program has nothing of (the hook serves input and forward alike)
        row = rows("filtering", f"filtering.{chain} (default)")
        row.add({"policy": "deny" if defaults[index] == bpf_layout.ACT_DENY else "allow"})
        if max_rules is None:
            row.add({"notAvailable": "packets (the program's KF_MAX_RULES setting is unknown)"})
        else:
            row.add({k: fields.get(k, 0) for k in ("packets", "bytes", "dropped")})


# ---------------------------------------------------------------- text
def format_counters(counters: Mapping[str, Mapping[str, Any]], indent: str = "  ") -> list[str]:
    """Counter rows for people, grouped by section."""
    lines: list[str] = []
    section = None
    for origin, values in counters.items():
        if values.get("section") != section:
            section = values.get("section")
            lines.append(f"{indent}{section}:")
        figures = "  ".join(f"{k}={v}" for k, v in values.items() if k not in ("section", "rule", "notAvailable"))
        line = f"{indent}  {origin:<46} {figures}".rstrip()
        if "rule" in values:
            line += f"  [{values['rule']}]"
        lines.append(line)
        if "notAvailable" in values:
            lines.append(f"{indent}  {'':<46} not available: {values['notAvailable']}")
    return lines
