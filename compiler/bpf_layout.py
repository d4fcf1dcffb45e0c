"""Byte layouts of kernform's BPF maps, in Python: encode for the compiler, decode for people.

The C side is bpf/lib/kf_types.h (documented in bpf/README.md); this module
mirrors it with `struct` formats. Conventions from the C side: addresses are
network-order bytes, every other integer is host order (little-endian on the
machines kernform supports), structs are explicitly padded.

CONFIG_MAPS names, per source file, the maps that hold configuration: the
compiler writes them and the reconciler reads them back to diff. Every other
map (per-CPU counters, LRU runtime state, scratch space) is the data path's own.
"""

from __future__ import annotations

import ipaddress
import struct
from array import array
from collections import Counter
from collections.abc import Sequence

from .cidr import Prefix

# kf_rule.action / flags (tc_filter)
ACT_ALLOW, ACT_DENY, ACT_RATE_LIMIT = 1, 2, 3
RULE_INGRESS, RULE_EGRESS = 1 << 0, 1 << 1
RULE_INPUT, RULE_FORWARD, RULE_OUTPUT = 1 << 4, 1 << 5, 1 << 6
# kf_intercept_rule.action
ICPT_REDIRECT, ICPT_BYPASS = 1, 2
# kf_service.algorithm
LB_RANDOM, LB_AFFINITY = 0, 1

CONFIG_MAPS: dict[str, tuple[str, ...]] = {
    "tc_filter.c": ("src_v4", "dst_v4", "src_v6", "dst_v6", "rules", "config", "local_addrs"),
    "sk_lookup.c": ("intercept_v4", "intercept_v6", "intercept_rules", "intercept_ifs", "proxy_socks",
                    "proxy_socks6", "local_addrs"),
    "tc_lb.c": ("services_v4", "services_v6", "maglev", "backends_v4", "backends_v6"),
    "sock_connect.c": (
        "services_v4", "services_v6", "maglev", "backends_v4", "backends_v6",
        "intercept_v4", "intercept_v6", "intercept_rules", "exclude_uid", "exclude_gid", "local_addrs",
    ),
}
ARRAY_MAPS = frozenset({"rules", "config", "intercept_rules"})
# Write order within a program: what an entry refers to is written before the entry (a Maglev chunk
# names backends, a service its chunks), and removed after it; other maps in between, by name.
WRITE_ORDER = {"backends_v4": 0, "backends_v6": 0, "maglev": 1, "services_v4": 2, "services_v6": 2}

# maglev: a hash of chunks of a service's table, {u32 id, u32 chunk} -> u32 slot[MAGLEV_CHUNK]
# (bpf/lib/kf_types.h). A service's table has its own size (compiler.maglev.table_size of its backends).
MAGLEV_CHUNK = 256
# backends_v4/v6: a hash of chunks of a service's backends in the intent's order, {u32 id, u32 chunk} ->
# BACKEND_CHUNK backends; Maglev slots hold a backend's position in its service + 1.
BACKEND_CHUNK = 16

U32 = struct.Struct("<I")
LPM_V4 = struct.Struct("<I4s")
LPM_V6 = struct.Struct("<I16s")
RULE = struct.Struct("<IBBHHHIII")  # flags proto action counter dport_lo dport_hi rate burst pad
FILTER_CONFIG = struct.Struct("<BBBB4x")  # default_input default_forward default_output stateful (chains)
CHAIN_FLAGS = (("input", RULE_INPUT), ("forward", RULE_FORWARD), ("output", RULE_OUTPUT))
INTERCEPT_RULE = struct.Struct("<BBHHHII")  # action proto port_lo port_hi proxy_port proxy_slot counter
SVC_KEY_V4 = struct.Struct("<4sHBx")
SVC_KEY_V6 = struct.Struct("<16sHBx")
SERVICE = struct.Struct("<IHBBI")  # id backend_count algorithm flags maglev_size
MAGLEV_KEY = struct.Struct("<II")  # service id, chunk
BACKEND_V4 = struct.Struct("<4sHxx")
BACKEND_V6 = struct.Struct("<16sHxx")
EXCLUDE = struct.Struct("<B")
# proxy_socks / proxy_socks6 (IPv4 / IPv6 listener): the desired value names the listener,
# the driver puts its socket there.
PROXY_SOCKET = struct.Struct("<HBx")  # port protocol

# intercept_ifs: keyed by u32 ifindex in the kernel; desired (and observed) by interface name,
# IFNAMSIZ bytes, which the reconciler resolves in the target namespace (see IFINDEX_KEYED_MAPS).
IFNAME = struct.Struct("16s")
IFINDEX_KEYED_MAPS = frozenset({"intercept_ifs"})
# local_addrs: the target namespace's own addresses, mirrored by the reconciler (see local_address_key).
ADDR_KEY = struct.Struct("<B3x16s")  # family address
LOCAL_ADDRESS_MAPS = {"sock_connect.c": "local_addrs", "tc_filter.c": "local_addrs", "sk_lookup.c": "local_addrs"}

_PROTO = {0: "any", 1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp"}


def ifname_key(name: str) -> bytes:
    return IFNAME.pack(name.encode())


def local_address_key(address: str) -> bytes:
    ip = ipaddress.ip_address(address)
    return ADDR_KEY.pack(ip.version, ip.packed)


def lpm_key(network: ipaddress.IPv4Network | ipaddress.IPv6Network | Prefix) -> bytes:
    layout = LPM_V4 if network.version == 4 else LPM_V6
    packed = network.packed if isinstance(network, Prefix) else network.network_address.packed
    return layout.pack(network.prefixlen, packed)


def maglev_chunks(svc_id: int, slots: Sequence[int]) -> list[tuple[bytes, bytes]]:
    """(key, value) of each chunk of a service's Maglev table (slot -> backend position + 1); the last chunk
    is padded with empty slots."""
    packed = array("I", slots).tobytes()
    width = 4 * MAGLEV_CHUNK
    chunks = []
    for number, start in enumerate(range(0, len(packed), width)):
        chunk = packed[start : start + width]
        if len(chunk) < width:
            chunk += bytes(width - len(chunk))
        chunks.append((MAGLEV_KEY.pack(svc_id, number), chunk))
    return chunks


def backend_chunks(svc_id: int, backends: Sequence[bytes], size: int) -> list[tuple[bytes, bytes]]:
    """(key, value) of each chunk of a service's backends (packed BACKEND_V4/V6 values of `size` bytes)."""
    chunks = []
    for number, start in enumerate(range(0, len(backends), BACKEND_CHUNK)):
        part = backends[start : start + BACKEND_CHUNK]
        chunks.append((MAGLEV_KEY.pack(svc_id, number),
                       b"".join(part) + bytes(size * (BACKEND_CHUNK - len(part)))))
    return chunks


def maglev_chunk_count(size: int) -> int:
    return -(-size // MAGLEV_CHUNK)


def bitmap(bits: int, words: int) -> bytes:
    return bits.to_bytes(8 * words, "little")


def rule_bits(value: bytes) -> list[int]:
    number = int.from_bytes(value, "little")
    return [i for i in range(len(value) * 8) if number >> i & 1]


def _network(key: bytes) -> str:
    prefixlen = U32.unpack_from(key)[0]
    address = ipaddress.ip_address(key[4:])
    return str(ipaddress.ip_network(f"{address}/{prefixlen}", strict=False))


def _ports(low: int, high: int) -> str:
    if (low, high) == (0, 65535):
        return "any port"
    return f"port {low}" if low == high else f"ports {low}-{high}"


def label(source: str, map_name: str, key: bytes, value: bytes) -> str:
    """Readable `key -> value` of one entry, for plans and status."""
    try:
        return _label(map_name, key, value)
    except (struct.error, ValueError):
        return f"{key.hex()} -> {value.hex()}"


def _label(map_name: str, key: bytes, value: bytes) -> str:
    if map_name in ("src_v4", "dst_v4", "src_v6", "dst_v6", "intercept_v4", "intercept_v6"):
        return f"{_network(key)} -> rules {rule_bits(value)}"
    index = U32.unpack(key)[0] if len(key) == 4 else None
    if map_name == "rules":
        flags, proto, action, counter, low, high, rate, burst, _ = RULE.unpack(value)
        direction = "+".join(d for d, f in CHAIN_FLAGS if flags & f)
        verb = {ACT_ALLOW: "allow", ACT_DENY: "deny", ACT_RATE_LIMIT: f"rate-limit {rate}/s burst {burst}"}.get(action, "?")
        return f"[{index}] {direction} {_PROTO.get(proto, proto)} {_ports(low, high)} {verb} (counter {counter})"
    if map_name == "config":
        *defaults, stateful = FILTER_CONFIG.unpack(value)
        return ", ".join(f"{chain} {'deny' if default == ACT_DENY else 'allow'}"
                         + (" stateful" if stateful & flag else "")
                         for (chain, flag), default in zip(CHAIN_FLAGS, defaults, strict=True))
    if map_name == "intercept_ifs":
        name = IFNAME.unpack(key)[0].rstrip(b"\0").decode(errors="replace")
        return f"interface {name} -> rules {rule_bits(value)}"
    if map_name == "local_addrs":
        family, packed = ADDR_KEY.unpack(key)
        return f"local address {ipaddress.ip_address(packed[:4] if family == 4 else packed)}"
    if map_name == "intercept_rules":
        action, proto, low, high, proxy_port, slot, counter = INTERCEPT_RULE.unpack(value)
        verb = f"redirect to :{proxy_port} (slot {slot})" if action == ICPT_REDIRECT else "bypass"
        return f"[{index}] {_PROTO.get(proto, proto)} {_ports(low, high)} {verb} (counter {counter})"
    if map_name in ("proxy_socks", "proxy_socks6"):
        port, proto = PROXY_SOCKET.unpack(value)
        family = "IPv6" if map_name.endswith("6") else "IPv4"
        return f"slot {index} -> the {family} {_PROTO.get(proto, proto)} listener on port {port}"
    if map_name in ("services_v4", "services_v6"):
        layout = SVC_KEY_V4 if map_name.endswith("v4") else SVC_KEY_V6
        vip, port, proto = layout.unpack(key)
        svc_id, count, algorithm, _, size = SERVICE.unpack(value)
        algo = "source affinity" if algorithm == LB_AFFINITY else "weighted random"
        return (f"{ipaddress.ip_address(vip)}:{port}/{_PROTO.get(proto, proto)} -> service {svc_id}, "
                f"{count} backends, {algo}, {size} Maglev slots")
    if map_name in ("backends_v4", "backends_v6"):
        svc_id, number = MAGLEV_KEY.unpack(key)
        layout = BACKEND_V4 if map_name.endswith("v4") else BACKEND_V6
        shown = []
        for at in range(0, len(value), layout.size):
            addr, port = layout.unpack(value[at : at + layout.size])
            if addr == bytes(len(addr)) and not port:
                continue
            ip = ipaddress.ip_address(addr)
            where = f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"
            shown.append(f"[{number * BACKEND_CHUNK + at // layout.size}] {where}")
        return f"service {svc_id}: " + ", ".join(shown)
    if map_name == "maglev":
        svc_id, number = MAGLEV_KEY.unpack(key)
        shares = Counter(array("I", value))
        listed = ", ".join(f"backend [{b - 1}] x{n}" for b, n in sorted(shares.items())[:8] if b)
        more = ", ..." if len(shares) > 8 else ""
        empty = f", {shares[0]} empty" if shares.get(0) else ""
        first = number * MAGLEV_CHUNK
        return f"service {svc_id}: slots {first}-{first + MAGLEV_CHUNK - 1}: {listed}{more}{empty}"
    if map_name in ("exclude_uid", "exclude_gid"):
        return f"{map_name[8:]} {index} excluded"
    return f"{key.hex()} -> {value.hex()}"
