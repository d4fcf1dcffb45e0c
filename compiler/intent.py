"""The intent language (kernform/v1): frozen pydantic models of a NetworkIntent.

These models are the single source of truth for the file format: the JSON
schema in schemas/ is generated from them, the loader validates against that
schema for positions, then parses into these models for values. Field names
are camelCase in YAML (aliases) and snake_case in Python.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidatorFunctionWrapHandler, WrapValidator

from . import cidr

API_VERSION = "kernform/v1"
KIND = "NetworkIntent"

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$"
IFNAME_PATTERN = r"^[A-Za-z0-9_.:@-]{1,15}\*?$"


def _to_camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


class _Model(BaseModel):
    # strict: a value has the type it is written with (YAML 1.2, see compiler.yaml12): no bool where a number
    # is meant (`port: true` is not port 1), no number or string where a bool is (`stateful: "yes"`), no
    # string where a number is, except where the language defines one (port ranges, marks, id ranges).
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, alias_generator=_to_camel,
                              strict=True)


def _check_cidr(value: str) -> str:
    """Canonical CIDR text; a bare address means a single host. Host bits set is a mistake, not a hint."""
    try:
        return cidr.canonical(value)
    except ValueError as exc:
        raise ValueError(f"invalid CIDR {value!r}: {exc}") from None


def _check_address(value: str) -> str:
    known = _ADDRESSES.get(value)
    if known is not None:
        return known
    try:
        canonical = str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"invalid IP address {value!r}") from None
    if len(_ADDRESSES) > 100_000:
        _ADDRESSES.clear()
    _ADDRESSES[value] = canonical
    return canonical


# Canonical text by input text: a daemon validates the same 1,000 backend addresses on every pass.
_ADDRESSES: dict[str, str] = {}


# ASCII digits only (\d would take other scripts' digits), at most 10 of them, nothing around.
_PORT_RANGE = re.compile(r"([0-9]{1,10})(?:-([0-9]{1,10}))?")


def parse_port_range(value: int | str) -> tuple[int, int]:
    """`80` or `"8000-8100"` to an inclusive (low, high) pair, checked to lie in 1..65535."""
    match = _PORT_RANGE.fullmatch(str(value))
    if not match:
        raise ValueError(f'invalid port or port range {value!r} (expected 80 or "8000-8100")')
    low = int(match.group(1))
    high = int(match.group(2) or low)
    for port in (low, high):
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range 1-65535")
    if low > high:
        raise ValueError(f"port range {value!r} is reversed")
    return low, high


def _check_port_spec(value: int | str) -> int | str:
    low, high = parse_port_range(value)
    return low if low == high else f"{low}-{high}"


# A mark or mask: hexadecimal, or decimal without leading zeros; no sign, spaces or '_'.
_MARK_NUMBER = r"(0x[0-9a-fA-F]{1,8}|0|[1-9][0-9]{0,9})"
_MARK = re.compile(rf"{_MARK_NUMBER}(?:/{_MARK_NUMBER})?")


def _check_mark(value: int | str) -> str:
    """A firewall mark, optionally masked: 0x10, 16, "0x10/0xff". Canonical "0xVALUE/0xMASK"."""
    match = _MARK.fullmatch(str(value))
    if match is None:
        raise ValueError(f'invalid mark {value!r} (expected 0x10 or "0x10/0xff")')
    mark = int(match[1], 0)
    mask = int(match[2], 0) if match[2] else 0xFFFFFFFF
    if not (0 < mark <= 0xFFFFFFFF and 0 < mask <= 0xFFFFFFFF):
        raise ValueError(f"mark {value!r} must be 1..0xffffffff")
    if mark & ~mask:
        raise ValueError(f"mark {value!r} has bits outside its mask")
    return f"{mark:#x}/{mask:#x}"


_ID_RANGE = re.compile(r"([0-9]{1,10})(?:-([0-9]{1,10}))?")


def _check_id_range(value: int | str) -> str:
    match = _ID_RANGE.fullmatch(str(value))
    if match is None:
        raise ValueError(f'invalid id range {value!r} (expected 1000 or "1000-1999")')
    lo, hi = int(match[1]), int(match[2] or match[1])
    if hi < lo or hi > 0xFFFFFFFE:
        raise ValueError(f"invalid id range {value!r}")
    return f"{lo}-{hi}"


Name = Annotated[
    str, Field(pattern=NAME_PATTERN, description="lowercase letters, digits and '-', 1-32 chars")
]
Cidr = Annotated[
    str, AfterValidator(_check_cidr), Field(description="IPv4 or IPv6 CIDR, or a single address")
]


def _check_cidr_list(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A list of CIDRs at dict-lookup speed for texts seen before (a daemon re-reading a 10,000-CIDR
    blocklist); anything unusual goes item by item through pydantic, which says where it is wrong."""
    if type(value) is list:
        try:
            return cidr.canonical_list(value)
        except (TypeError, ValueError):
            pass
    return handler(value)


CidrList = Annotated[list[Cidr], WrapValidator(_check_cidr_list)]
Address = Annotated[str, AfterValidator(_check_address), Field(description="IPv4 or IPv6 address")]
Port = Annotated[int, Field(ge=1, le=65535)]
PortSpec = Annotated[
    int | str,
    AfterValidator(_check_port_spec),
    Field(description='a port (80) or an inclusive range ("8000-8100")'),
]
Mark = Annotated[int | str, AfterValidator(_check_mark), Field(description='0x10 or "0x10/0xff"')]
IdRange = Annotated[int | str, AfterValidator(_check_id_range), Field(description='1000 or "1000-1999"')]
Interface = Annotated[
    str, Field(pattern=IFNAME_PATTERN, description="interface name; a trailing * matches a prefix")
]
Protocol = Literal["tcp", "udp"]


# ---------------------------------------------------------------- interception
class InterceptionExclusions(_Model):
    """Traffic that a rule must leave alone, most importantly the proxy's own connections (uids/gids/marks)."""

    sources: CidrList = []
    destinations: CidrList = []
    ports: list[PortSpec] = []
    uids: list[IdRange] = Field(default=[], description="outbound only: process owner uids not intercepted")
    gids: list[IdRange] = Field(default=[], description="outbound only: process group ids not intercepted")
    marks: list[Mark] = Field(default=[], description="packets carrying this mark are not intercepted")


class InterceptionRule(_Model):
    """Hand matching connections to a local transparent proxy on `proxyPort`.

    inbound: connections arriving from other hosts on `interfaces` (any interface
    but lo when empty: the host's own connections arrive on lo and are never
    inbound unless lo is named), to any destination including the host's own
    addresses (gateway and sidecar-inbound style); the proxy sees the client
    address and, with getsockname(), the original destination.
    outbound: connections originated by this host's processes to destinations
    that are not local (loopback and the host's own addresses are never
    captured; replies of connections the host accepted are never touched).
    Rules of one direction are tried in the file's order and the first match
    wins; a rule's `exclude` makes only that rule not match. The two directions
    never see each other's connections, so their relative order does not matter.
    """

    name: Name
    direction: Literal["inbound", "outbound"]
    protocols: list[Protocol] = Field(default=["tcp"], min_length=1)
    interfaces: list[Interface] = Field(
        default=[], description="inbound: input interfaces (empty: any but lo); outbound rules take none"
    )
    sources: CidrList = []
    destinations: CidrList = []
    ports: list[PortSpec] = Field(default=[], description="destination ports (empty: any)")
    exclude: InterceptionExclusions = InterceptionExclusions()
    proxy_port: Port | None = Field(default=None, description="the local proxy's listening port")


class Interception(_Model):
    # Left out, these three come from the intent's slot (compiler/allocation.py): slot 0 gives the
    # defaults below, and a host's other intents get other slots.
    fwmark: Mark = Field(
        default="0x4b460001/0xffffffff",
        description="mark that routes intercepted packets to the local proxy (policy routing); "
        "left out: 0x4b460001 + the intent's slot",
    )
    routing_table: int = Field(
        default=7100, ge=1, le=0xFFFFFFF0,
        description="table holding 'local default dev lo'; left out: 7100 + 64 x the intent's slot",
    )
    rule_priority: int = Field(default=100, ge=1, le=32765,
                               description="priority of the fwmark ip rule; left out: 100 + the intent's slot")
    rules: list[InterceptionRule] = []


# ------------------------------------------------------------- load balancing
class Backend(_Model):
    address: Address
    port: Port | None = Field(default=None, description="defaults to the service port")
    weight: int = Field(default=1, ge=1, le=10000)


class Service(_Model):
    """A virtual IP:port spread over weighted backends; the client's source address is preserved."""

    name: Name
    vip: Address
    port: Port
    protocol: Protocol = "tcp"
    algorithm: Literal["weighted-random", "source-hash"] = Field(
        default="weighted-random",
        description="weighted-random: per connection; source-hash: a client keeps its backend (Maglev table)",
    )
    backends: list[Backend] = Field(min_length=1)


class LoadBalancing(_Model):
    services: list[Service] = []
    interfaces: list[Interface] = Field(
        default=[],
        description="interfaces where connections from other hosts to the VIPs arrive (empty: tproxy balances "
        "forwarded traffic from any interface; ebpf uses spec.ebpf.interfaces and, with none there either, "
        "balances only processes in its cgroup). ebpf: tc ingress balances them, tc egress translates the "
        "replies back, so the replies must leave through the same interface",
    )


# ---------------------------------------------------------------------- routing
class Nexthop(_Model):
    via: Address | None = None
    dev: Interface | None = None
    weight: int = Field(default=1, ge=1, le=256)


class Route(_Model):
    to: Cidr | Literal["default", "default6"] = Field(
        description="destination CIDR; 'default' (v4) or 'default6'"
    )
    type: Literal["unicast", "local", "blackhole", "unreachable", "prohibit"] = "unicast"
    via: Address | None = None
    dev: Interface | None = None
    metric: int = Field(default=0, ge=0, le=0xFFFFFFFF)
    nexthops: list[Nexthop] = Field(default=[], description="multipath: several weighted next hops")


class RoutingTable(_Model):
    name: Name
    id: int = Field(ge=1, le=0xFFFFFFF0, description="kernel table number; 253-255 are the system's")
    routes: list[Route] = []


class PolicyRule(_Model):
    """An ip rule: traffic matching all given selectors looks up `table`."""

    name: Name
    priority: int = Field(ge=1, le=32765)
    table: Name = Field(description="name of a table in routing.tables")
    from_: Cidr | None = Field(default=None, alias="from")
    to: Cidr | None = None
    protocol: Protocol | None = None
    ports: PortSpec | None = Field(default=None, description="destination port or range (needs protocol)")
    source_ports: PortSpec | None = None
    iif: Interface | None = None
    oif: Interface | None = None
    fwmark: Mark | None = None
    uid_range: IdRange | None = None
    family: Literal["ipv4", "ipv6", "both"] | None = Field(
        default=None, description="defaults to the family of from/to, else both"
    )


class Routing(_Model):
    tables: list[RoutingTable] = []
    rules: list[PolicyRule] = []


# -------------------------------------------------------------------- filtering
# Both backends hold rate and burst in 32 bits (nft's burst, the ebpf rule descriptor).
U32_MAX = 0xFFFFFFFF


class RateLimit(_Model):
    rate: int = Field(
        ge=1,
        le=U32_MAX,
        description="what each source address may send per `per`: new connections in a stateful chain "
        "(packets of established connections pass before the rules), packets in a stateless one",
    )
    per: Literal["second", "minute"] = "second"
    burst: int = Field(default=5, ge=1, le=U32_MAX)


class FilterRule(_Model):
    name: Name
    action: Literal["allow", "deny", "rate-limit"]
    interfaces: list[Interface] = Field(
        default=[], description="input/forward: in-interface; output: out-interface"
    )
    sources: CidrList = []
    destinations: CidrList = []
    protocol: Literal["tcp", "udp", "icmp", "any"] = "any"
    ports: list[PortSpec] = Field(default=[], description="destination ports (tcp/udp)")
    rate_limit: RateLimit | None = Field(
        default=None, description="required for action rate-limit: per source"
    )


class FilterChain(_Model):
    default: Literal["allow", "deny"] = "allow"
    stateful: bool = Field(
        default=True, description="replies and related packets of accepted connections pass before the rules"
    )
    rules: list[FilterRule] = []


class Filtering(_Model):
    input: FilterChain | None = None
    forward: FilterChain | None = None
    output: FilterChain | None = None


# ------------------------------------------------------------------------ ebpf
class EbpfLimits(_Model):
    """What the ebpf backend's programs are built to hold. Programs are compiled for these limits, never for
    the intent's size, so an intent grows up to them by map updates alone (program ids and attachments stay,
    and so do flow tables); an intent beyond them is refused at validate time. Changing a limit rebuilds the
    programs that use it."""

    services: int = Field(
        default=65536, ge=1, le=16_777_216,
        description="load-balanced services (both address families together): entries of the service maps",
    )
    backends: int = Field(
        default=262144, ge=1, le=16_777_216,
        description="backends of all services, per address family (a backend listed by two services counts twice)",
    )
    rules: int = Field(
        default=256, ge=64, le=256, multiple_of=64,
        description="rule descriptors per program (64, 128, 192 or 256): one per protocol and port range of each "
        "filter rule on an interface, or of the interception rules of a direction; more costs the verifier time "
        "when a program loads (about 1 s for a filter program at 256)",
    )
    prefixes: int = Field(
        default=1_048_576, ge=1, le=16_777_216,
        description="prefixes per LPM trie (the distinct source or destination CIDRs of the filter rules on an "
        "interface, per address family; the destinations of interception rules); tries allocate per entry held",
    )
    proxies: int = Field(
        default=64, ge=1, le=65536,
        description="proxy listeners (port and protocol) of inbound interception",
    )


class EbpfOptions(_Model):
    """Settings only the ebpf backend needs."""

    interfaces: list[Interface] = Field(
        default=[], description="where kernform's tc programs attach (clsact): filter rules that name no "
        "interface, and load balancing when loadBalancing.interfaces is empty"
    )
    cgroup: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$",
        description="cgroup v2 path (below the cgroup2 mount) whose processes get socket-level load balancing "
        "and outbound interception; default kernform/<intent name>",
    )
    limits: EbpfLimits = Field(
        default=EbpfLimits(), description="what the programs hold; growing up to these is map updates only"
    )


# ------------------------------------------------------------------------ intent
class Spec(_Model):
    backend: Literal["tproxy", "ebpf"] = "tproxy"
    ebpf: EbpfOptions = EbpfOptions()
    interception: Interception = Interception()
    load_balancing: LoadBalancing = LoadBalancing()
    routing: Routing = Routing()
    filtering: Filtering = Filtering()


class Metadata(_Model):
    name: Name


class NetworkIntent(_Model):
    """A host's (or a network namespace's) whole network intent."""

    schema_: str | None = Field(default=None, alias="$schema")
    api_version: Literal["kernform/v1"] = Field(alias="apiVersion")
    kind: Literal["NetworkIntent"]
    metadata: Metadata
    spec: Spec = Spec()
