"""The netlink driver: the only code that reads or writes ip rules and routes.

Ownership rule: a route or a rule is kernform's only if BOTH
  - its protocol is RTPROT_KERNFORM (158), which we set on everything we
    create, and
  - its table is one of the routing tables the caller says this intent owns.
Everything else is foreign: `observe` never returns it and `apply` never
touches it. Every delete request carries protocol 158 and the table, and the
kernel compares both, so even a wrong plan cannot delete a foreign object.

What we write is what we read: every route carries an explicit metric
(`priority`), every rule an explicit priority, and observed objects are built
through the canonical constructors of `compiler.objects` (`ip_route`,
`ip_rule`), the ones the compiler uses, so desired and observed compare equal.

Kernel behaviours this module works around (kernel 6.x):
  - IPv4 deletes match `scope` and `type` unless told otherwise: we send
    RT_SCOPE_NOWHERE (any scope) and the exact type.
  - pyroute2 silently ignores `proto=` on rules; the rule attribute is
    `protocol=`.
  - A rule delete matches the FIRST rule for which every selector given in the
    request is equal; unset selectors are wildcards. Deleting `lookup 7100`
    could therefore delete a more specific rule of ours with the same priority
    and table that comes first. `_delete_rule_exactly` predicts this and puts
    any such rule back.
  - A rule add is refused (EEXIST) when a rule with the same priority and
    table exists whose prefixes the new rule leaves unset: `priority 300
    lookup 7100` after `priority 300 from 10.0.0.0/8 lookup 7100`.
    `_add_rule` takes such rules of ours out and puts them back after.
    Rules of protocol 158 with selectors kernform never writes (tos, `not`,
    suppress_prefixlength, goto, ...) are skipped by observe, and whenever
    the kernel would confuse one with ours, apply refuses instead of guessing.
  - IPv6 rebuilds multipath routes from sibling routes; next hops are compared
    in canonical (sorted) order.
  - A route change is one atomic `replace`. The kernel replaces the first
    route with the same (table, destination, metric); only a foreign route
    appended (`ip route append`) next to ours could be hit instead.

A driver is bound to the thread that created it: pyroute2 opens one socket per
thread, and a socket opened by another thread would live in that thread's
namespace (the root one), so other threads are refused outright.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from compiler.errors import InternalError, KernelError, TemporaryError
from compiler.objects import (
    NETLINK_KINDS,
    REJECT_ROUTE_TYPES,
    RTPROT_KERNFORM,
    U32_MAX,
    IpRoute,
    IpRule,
    Nexthop,
    canonical_nexthops,
    ip_route,
    ip_rule,
)
from reconciler.netns import entered
from reconciler.plan import Action

log = logging.getLogger(__name__)

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_FAMILY = {socket.AF_INET: 4, socket.AF_INET6: 6}
_ZERO = {4: "0.0.0.0", 6: "::"}

# rtm_type values (linux/rtnetlink.h). Types kernform never writes are still
# named, so a route of ours that someone turned into one shows up in the diff.
_RTN_NAMES = {
    1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast",
    6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat",
}
_RTN_NUMBERS = {name: number for number, name in _RTN_NAMES.items()}

RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254
RT_SCOPE_NOWHERE = 255  # in a delete request: any scope

FR_ACT_TO_TBL = 1
FIB_RULE_INVERT = 0x2
_UNSET_U32 = U32_MAX  # how the kernel reports "unset" for suppress_prefixlength / suppress_ifgroup

# errnos that say "try the whole pass again", not "the operator must look".
_TRANSIENT = frozenset({errno.EBUSY, errno.EAGAIN, errno.EINTR, errno.ENOBUFS})
_DUMP_ATTEMPTS = 3

_T = TypeVar("_T")


@dataclass
class _RuleEntry:
    """One rule of ours (protocol 158) as the kernel lists it, for predicting what a delete hits."""

    rule: IpRule
    exotic: bool  # carries selectors kernform never writes (tos, goto, not, ...)


@dataclass
class _ApplyContext:
    """State of one apply(): interface indexes and, lazily, the kernel's order of our rules."""

    ifindex: dict[str, int] = field(default_factory=dict)
    rules: dict[int, list[_RuleEntry]] = field(default_factory=dict)  # by family 4/6


# A kernel operation: (verb, object[, previous object]). Each has an inverse used for rollback.
_Op = tuple[str, IpRoute | IpRule, IpRoute | IpRule | None]


class NetlinkDriver:
    """Reads and writes kernform's ip routes and rules in one network namespace.

    Open it (or use it as a context manager) in the thread that will use it;
    the netlink socket stays bound to `netns` for the driver's whole life.
    """

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._where = f"namespace {netns}" if netns else "the current namespace"
        self._thread = threading.get_ident()
        with entered(netns):
            # groups=0: a request/response socket; subscribing to events would
            # only queue messages nobody reads. strict_check lets the kernel
            # filter route dumps by protocol. ext_ack brings the kernel's own
            # error text ("Nexthop has invalid gateway") into our errors.
            self._ipr: IPRoute | None = IPRoute(groups=0, strict_check=True, ext_ack=True)
            try:
                self._routes = _RouteDumpSocket()
            except OSError as exc:
                self._ipr.close()
                raise KernelError(f"cannot open a netlink socket in {self._where}: {exc.strerror}") from exc

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._routes.close()
            self._ipr = None

    def __enter__(self) -> NetlinkDriver:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def portid(self) -> int:
        """The netlink port id the kernel's notifications of our changes carry.

        The daemon's event listener uses it to tell our own changes from
        others'. Call it from the driver's thread (pyroute2 keeps a socket per
        thread); a socket is bound by its first request, so one harmless
        request (loopback is index 1 in every namespace) binds it if needed.
        """
        sock = self._socket
        port = int(sock.getsockname()[0])
        if not port:
            try:
                sock.link("get", index=1)
            except NetlinkError as exc:
                raise _kernel_error(f"cannot query loopback in {self._where}", exc) from exc
            port = int(sock.getsockname()[0])
        return port

    def _check_usable(self) -> None:
        if threading.get_ident() != self._thread:
            raise InternalError(
                "NetlinkDriver used from a thread that did not create it; its requests would reach "
                "that thread's network namespace instead of " + self._where
            )
        if self._ipr is None:
            raise InternalError("NetlinkDriver used after close()")

    @property
    def _socket(self) -> IPRoute:
        self._check_usable()
        assert self._ipr is not None
        return self._ipr

    @property
    def _route_dumps(self) -> _RouteDumpSocket:
        self._check_usable()
        return self._routes

    # -------------------------------------------------------------- observe
    def observe(self, tables: Iterable[int]) -> list[IpRoute | IpRule]:
        """Our routes and rules (protocol 158) in `tables`, both families, in canonical form."""
        owned = frozenset(tables)
        if not owned:
            return []
        result: list[IpRoute | IpRule] = []
        ifnames: dict[int, str] = {}
        dumps = self._route_dumps
        for family in (4, 6):
            for raw in self._retrying("routes", partial(dumps.dump, _AF[family], RTPROT_KERNFORM)):
                # The kernel filters by protocol already (strict dump); the table we filter here.
                if raw.protocol != RTPROT_KERNFORM or raw.table not in owned:
                    continue
                route = _route_from_raw(family, raw, lambda index: self._interface_name(index, ifnames))
                if route is not None:
                    result.append(route)
        for family in (4, 6):
            for entry in self._our_rules(family):
                if entry.rule.table in owned:
                    if entry.exotic:
                        log.warning("%s: ignoring %s: it carries selectors kernform never writes",
                                    self._where, entry.rule.describe())
                        continue
                    result.append(entry.rule)
        return result

    def _retrying(self, what: str, request: Callable[[], Iterable[_T]]) -> list[_T]:
        # A dump is interrupted when the table changes under it; a fresh one is consistent.
        for _ in range(_DUMP_ATTEMPTS):
            try:
                return list(request())
            except NetlinkDumpInterrupted:
                continue
            except NetlinkError as exc:
                raise _kernel_error(f"cannot list {what} in {self._where}", exc) from exc
            except OSError as exc:  # from the bare route socket (ENOBUFS: the kernel dropped a reply)
                error = NetlinkError(exc.errno or errno.EIO, exc.strerror)
                raise _kernel_error(f"cannot list {what} in {self._where}", error) from exc
        raise TemporaryError(f"listing {what} in {self._where} was interrupted {_DUMP_ATTEMPTS} times")

    def interface_towards(self, address: str) -> str | None:
        """The interface the namespace's routing would use to reach `address` (None if it cannot tell)."""
        try:
            routes = self._socket.route("get", dst=address)
            index = routes[0].get_attr("RTA_OIF") if routes else None
            return self._interface_name(index, {}) if index else None
        except Exception:  # noqa: BLE001 - no route, or a family the namespace lacks: unknown
            return None

    def local_addresses(self) -> list[str]:
        """Every address configured in the namespace (what `fib daddr type local` calls local, less the
        loopback ranges the data path knows by itself); the ebpf backend mirrors them into a map."""
        messages = self._retrying("addresses", lambda: self._socket.get_addr())
        return sorted({str(m.get_attr("IFA_ADDRESS") or m.get_attr("IFA_LOCAL")) for m in messages
                       if m.get_attr("IFA_ADDRESS") or m.get_attr("IFA_LOCAL")})

    def _interface_name(self, index: int, cache: dict[int, str]) -> str:
        # One request per distinct device (routes use a handful), not a dump of every link.
        if index not in cache:
            try:
                cache[index] = self._socket.link("get", index=index)[0].get_attr("IFLA_IFNAME")
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise _kernel_error(f"cannot look up interface {index} in {self._where}", exc) from exc
                cache[index] = f"if{index}"  # vanished since the dump; the next pass sees the truth
        return cache[index]

    def _our_rules(self, family: int) -> list[_RuleEntry]:
        """Rules with protocol 158 of one family, in the kernel's evaluation order."""
        messages = self._retrying("rules", lambda: self._socket.rule("dump", family=_AF[family]))
        return [entry for msg in messages if (entry := _rule_entry(family, msg)) is not None]

    # ---------------------------------------------------------------- apply
    def apply(self, actions: Sequence[Action]) -> int:
        """Execute the actions in order, all or (after a failure) none. Returns the number of kernel operations.

        add: route add / rule add; change: route replace (a rule, keyed by its
        whole selector, is removed and added); remove: delete exactly that
        object. On a failure, the operations already done are undone in
        reverse (best effort) and KernelError names the object and the
        kernel's reason.
        """
        ops: list[_Op] = []
        for action in actions:
            if action.kind not in NETLINK_KINDS:
                raise InternalError(f"NetlinkDriver cannot apply {action.key}")
            ops += _operations(action)
        context = _ApplyContext()
        done: list[_Op] = []
        count = 0
        for op in ops:
            try:
                count += self._execute(op, context)
            except KernelError as exc:
                undone = self._roll_back(done, context)
                note = (f"; the {len(done)} operation(s) done before were undone" if undone
                        else "; undoing the operations done before FAILED, the namespace is half-applied")
                raise type(exc)(f"{exc}{note}") from exc
            done.append(op)
        return count

    def _roll_back(self, done: list[_Op], context: _ApplyContext) -> bool:
        complete = True
        for op in reversed(done):
            try:
                self._execute(_inverse(op), context)
            except KernelError as exc:
                complete = False
                log.error("%s: could not undo %s %s: %s", self._where, op[0], op[1].describe(), exc)
        return complete

    def _execute(self, op: _Op, context: _ApplyContext) -> int:
        verb, obj, _ = op
        if isinstance(obj, IpRoute):
            command = {"add": "add", "replace": "replace", "delete": "del"}[verb]
            request = self._route_request(obj, context, deleting=verb == "delete")
            self._request(obj, verb, lambda: self._socket.route(command, **request))
            return 1
        if verb == "add":
            return self._add_rule(obj, context)
        return self._delete_rule_exactly(obj, context)

    def _request(self, obj: IpRoute | IpRule, verb: str, call: Callable[[], object]) -> None:
        try:
            call()
        except NetlinkError as exc:
            hint = ""
            if exc.code == errno.EEXIST:
                hint = " (it already exists, perhaps as an object kernform does not own)"
            elif exc.code in (errno.ESRCH, errno.ENOENT):
                hint = " (it is not in the kernel)"
            raise _kernel_error(f"{verb} {obj.describe()} in {self._where} failed{hint}", exc) from exc

    # ------------------------------------------------------------- routes
    def _route_request(self, route: IpRoute, context: _ApplyContext, *, deleting: bool) -> dict[str, Any]:
        if route.type not in _RTN_NUMBERS:
            raise InternalError(f"unknown route type {route.type!r} in {route.describe()}")
        request: dict[str, Any] = {
            "family": _AF[route.family],
            "dst": route.destination,
            "table": route.table,
            "proto": RTPROT_KERNFORM,
            # Always explicit: what we write is what we read (IPv6 turns 0 into 1024).
            "priority": route.metric,
            "type": _RTN_NUMBERS[route.type],
        }
        if deleting:
            # The key, protocol and type select exactly our route; next hops need not
            # be named (and naming them would delete only one IPv6 multipath sibling).
            if route.family == 4:
                request["scope"] = RT_SCOPE_NOWHERE
            return request
        if route.family == 4:
            # As iproute2 does: the kernel refuses a local route of scope universe,
            # and a route without a gateway reaches its destination on the link.
            if route.type == "local":
                request["scope"] = RT_SCOPE_HOST
            elif route.type == "unicast" and all(hop.gateway is None for hop in route.nexthops):
                request["scope"] = RT_SCOPE_LINK
            else:
                request["scope"] = RT_SCOPE_UNIVERSE
        if route.type in REJECT_ROUTE_TYPES:
            return request
        if len(route.nexthops) == 1:
            hop = route.nexthops[0]
            if hop.gateway is not None:
                request["gateway"] = hop.gateway
            if hop.dev is not None:
                request["oif"] = self._ifindex(hop.dev, route, context)
        elif route.nexthops:
            paths = []
            for hop in route.nexthops:
                path: dict[str, Any] = {"hops": hop.weight - 1}
                if hop.gateway is not None:
                    path["gateway"] = hop.gateway
                if hop.dev is not None:
                    path["oif"] = self._ifindex(hop.dev, route, context)
                paths.append(path)
            request["multipath"] = paths
        return request

    def _ifindex(self, name: str, route: IpRoute, context: _ApplyContext) -> int:
        if name not in context.ifindex:
            try:
                links = self._socket.link("get", ifname=name)
            except NetlinkError as exc:
                if exc.code == errno.ENODEV:
                    raise KernelError(
                        f"{route.describe()} needs interface {name}, which does not exist in {self._where}"
                    ) from exc
                raise _kernel_error(f"cannot look up interface {name} in {self._where}", exc) from exc
            context.ifindex[name] = links[0]["index"]
        return context.ifindex[name]

    # -------------------------------------------------------------- rules
    def _add_rule(self, rule: IpRule, context: _ApplyContext) -> int:
        """Add `rule`; returns the number of kernel operations.

        The kernel refuses (EEXIST) a rule when one with the same priority,
        table and selectors exists, but compares the source and destination
        prefixes only if the NEW rule has them: `priority 300 lookup 7100` is
        "the same" as an existing `priority 300 from 10.0.0.0/8 lookup 7100`.
        When only rules of ours cause that, they are taken out, `rule` goes in
        first, and they are put back after it (same table, so the order
        between them does not change where packets go).
        """
        try:
            self._socket.rule("add", **_rule_request(rule))
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _kernel_error(f"add {rule.describe()} in {self._where} failed", exc) from exc
            blockers = self._add_blockers(rule, context)
            if not blockers:
                raise _kernel_error(f"add {rule.describe()} in {self._where} failed (it already exists, "
                                    "perhaps as an object kernform does not own)", exc) from exc
            if any(entry.exotic for entry in blockers):
                exotic = next(entry for entry in blockers if entry.exotic)
                raise _kernel_error(
                    f"add {rule.describe()} in {self._where} failed: the kernel counts it the same as "
                    f"{exotic.rule.describe()}, which carries selectors kernform cannot recreate", exc) from exc
            count = sum(self._delete_rule_exactly(entry.rule, context) for entry in blockers)
            count += self._add_rule(rule, context)
            count += sum(self._add_rule(entry.rule, context) for entry in blockers)
            return count
        entries = context.rules.get(rule.family)
        if entries is not None:
            # The kernel puts a new rule after the last one whose priority is not higher.
            at = len(entries)
            while at > 0 and entries[at - 1].rule.priority > rule.priority:
                at -= 1
            entries.insert(at, _RuleEntry(rule, exotic=False))
        return 1

    def _add_blockers(self, rule: IpRule, context: _ApplyContext) -> list[_RuleEntry]:
        """Our rules, other than `rule` itself, that make the kernel refuse to add `rule`."""
        if rule.family not in context.rules:
            context.rules[rule.family] = self._our_rules(rule.family)
        entries = context.rules[rule.family]
        if any(not entry.exotic and entry.rule == rule for entry in entries):
            return []  # it really exists
        return [entry for entry in entries if _add_collides(rule, entry.rule)]

    def _delete_rule_exactly(self, rule: IpRule, context: _ApplyContext) -> int:
        """Delete `rule` and nothing else; returns the number of kernel operations.

        The kernel deletes the first rule matching every selector present in
        the request (see the module docstring), so we look at our rules in the
        kernel's order: rules of ours listed before `rule` that the request
        also matches are deleted along the way and then added back.
        """
        if rule.family not in context.rules:
            context.rules[rule.family] = self._our_rules(rule.family)
        entries = context.rules[rule.family]
        hits = [entry for entry in entries if _delete_matches(rule, entry.rule)]
        position = next((i for i, entry in enumerate(hits) if not entry.exotic and entry.rule == rule), None)
        if position is None:
            # Sending the delete anyway could remove a more specific rule of ours.
            raise KernelError(f"delete {rule.describe()} in {self._where} failed (it is not in the kernel)")
        collateral = hits[:position]
        if any(entry.exotic for entry in collateral):
            raise KernelError(
                f"cannot delete {rule.describe()} in {self._where} exactly: the kernel would first delete "
                f"{collateral[0].rule.describe()}, which carries selectors kernform cannot recreate"
            )
        request = _rule_request(rule)
        count = 0
        for entry in hits[: position + 1]:
            self._request(rule, "delete", lambda: self._socket.rule("del", **request))
            del entries[next(i for i, e in enumerate(entries) if e is entry)]
            count += 1
        for entry in collateral:
            count += self._add_rule(entry.rule, context)
        return count


# ------------------------------------------------------------------ helpers
def _operations(action: Action) -> list[_Op]:
    """The kernel operations for one action; each has an inverse (see _inverse)."""
    old, new = action.old, action.new
    if action.op == "add" and isinstance(new, (IpRoute, IpRule)):
        return [("add", new, None)]
    if action.op == "remove" and isinstance(old, (IpRoute, IpRule)):
        return [("delete", old, None)]
    if action.op == "change" and isinstance(old, IpRoute) and isinstance(new, IpRoute):
        return [("replace", new, old)]
    if action.op == "change" and isinstance(old, IpRule) and isinstance(new, IpRule):
        # A rule cannot be replaced in place: its selector is its identity.
        return [("delete", old, None), ("add", new, None)]
    raise InternalError(f"malformed action {action.op} {action.key}")


def _inverse(op: _Op) -> _Op:
    verb, obj, previous = op
    if verb == "add":
        return ("delete", obj, None)
    if verb == "delete":
        return ("add", obj, None)
    if previous is None:
        raise InternalError(f"replace of {obj.describe()} without the previous route")
    return ("replace", previous, obj)


def _kernel_error(context: str, exc: NetlinkError) -> KernelError:
    reason = exc.args[1] if len(exc.args) > 1 and exc.args[1] else errno.errorcode.get(exc.code, str(exc.code))
    cls = TemporaryError if exc.code in _TRANSIENT else KernelError
    return cls(f"{context}: {reason} (errno {exc.code})")


def _route_from_raw(family: int, raw: _RawRoute, name_of: Callable[[int], str]) -> IpRoute | None:
    destination = f"{raw.destination or _ZERO[family]}/{raw.dst_len}"
    if raw.tos or raw.src_len:
        # Source-specific or TOS routes are never written by kernform; their key
        # would collide with ours, so leave them alone and say so.
        log.warning("ignoring route %s table %d with protocol %d: it has a tos or source prefix",
                    destination, raw.table, RTPROT_KERNFORM)
        return None
    type_name = _RTN_NAMES.get(raw.type, str(raw.type))
    hops: list[Nexthop] = []
    if type_name not in REJECT_ROUTE_TYPES:  # IPv6 reports `dev lo` on them: noise
        if raw.multipath:
            hops = [Nexthop(gateway, name_of(oif) if oif else None, weight) for gateway, oif, weight in raw.multipath]
        elif raw.gateway is not None or raw.oif:
            hops = [Nexthop(raw.gateway, name_of(raw.oif) if raw.oif else None, 1)]
    try:
        return ip_route(family, raw.table, destination, metric=raw.metric, type=type_name, nexthops=hops)
    except ValueError:
        # Not a form kernform writes (say, a `throw` route carrying our protocol): keep it
        # as it is, so the diff replaces or removes it.
        return IpRoute(family, raw.table, destination, raw.metric, type_name, canonical_nexthops(hops))


def _span(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    low, _, high = str(text).partition(":")
    return (int(low), int(high or low))


def _rule_entry(family: int, msg: Any) -> _RuleEntry | None:
    if msg.get_attr("FRA_PROTOCOL") != RTPROT_KERNFORM:
        return None
    table = msg.get_attr("FRA_TABLE")
    table = int(table if table is not None else msg["table"])
    # Anything besides "lookup <table>" and the selectors IpRule models.
    exotic = bool(
        msg["action"] != FR_ACT_TO_TBL
        or msg["tos"]
        or msg["flags"] & FIB_RULE_INVERT
        or any(msg.get_attr(a) for a in ("FRA_GOTO", "FRA_L3MDEV", "FRA_TUN_ID", "FRA_FLOW"))
        or any(msg.get_attr(a) not in (None, _UNSET_U32)
               for a in ("FRA_SUPPRESS_PREFIXLEN", "FRA_SUPPRESS_IFGROUP"))
    )
    src = f"{msg.get_attr('FRA_SRC')}/{msg['src_len']}" if msg["src_len"] else None
    dst = f"{msg.get_attr('FRA_DST')}/{msg['dst_len']}" if msg["dst_len"] else None
    fields: dict[str, Any] = {
        "source": src,
        "destination": dst,
        "fwmark": msg.get_attr("FRA_FWMARK"),
        "fwmask": msg.get_attr("FRA_FWMASK"),
        "iif": msg.get_attr("FRA_IIFNAME"),
        "oif": msg.get_attr("FRA_OIFNAME"),
        "ip_proto": msg.get_attr("FRA_IP_PROTO"),
        "sport": _span(msg.get_attr("FRA_SPORT_RANGE")),
        "dport": _span(msg.get_attr("FRA_DPORT_RANGE")),
        "uid_range": _span(msg.get_attr("FRA_UID_RANGE")),
    }
    priority = msg.get_attr("FRA_PRIORITY") or 0
    try:
        rule = ip_rule(family, priority, table, **fields)
    except ValueError:
        # E.g. a source with host bits set: the kernel keeps it verbatim, and so do we,
        # so the diff removes it (the delete request then matches it exactly).
        rule = IpRule(family, priority, table, **fields)
    return _RuleEntry(rule, exotic)


def _rule_request(rule: IpRule) -> dict[str, Any]:
    request: dict[str, Any] = {
        "family": _AF[rule.family],
        "priority": rule.priority,
        "table": rule.table,
        "action": "to_tbl",
        # NOT `proto=`: pyroute2 ignores that for rules without a word.
        "protocol": RTPROT_KERNFORM,
    }
    for attr, prefix in (("src", rule.source), ("dst", rule.destination)):
        if prefix is not None:
            address, _, length = prefix.partition("/")
            request[attr] = address
            request[f"{attr}_len"] = int(length)
    if rule.fwmark is not None:
        request["fwmark"] = rule.fwmark
        request["fwmask"] = rule.fwmask if rule.fwmask is not None else U32_MAX
    if rule.iif is not None:
        request["iifname"] = rule.iif
    if rule.oif is not None:
        request["oifname"] = rule.oif
    if rule.ip_proto is not None:
        request["ip_proto"] = rule.ip_proto
    for attr, span in (("sport_range", rule.sport), ("dport_range", rule.dport), ("uid_range", rule.uid_range)):
        if span is not None:
            request[attr] = f"{span[0]}:{span[1]}"
    return request


_RULE_SELECTORS = ("source", "destination", "fwmask", "iif", "oif", "ip_proto", "sport", "dport", "uid_range")


def _delete_matches(request: IpRule, candidate: IpRule) -> bool:
    """Whether a delete request for `request` would match `candidate` (the kernel's rule_find).

    Priority, table and protocol are always compared (we always send them);
    every other selector only when the request carries it. A zero fwmark is
    not compared, only its mask.
    """
    if (candidate.family, candidate.priority, candidate.table) != (request.family, request.priority, request.table):
        return False
    if request.fwmark and candidate.fwmark != request.fwmark:
        return False
    return all(
        getattr(request, name) is None or getattr(request, name) == getattr(candidate, name)
        for name in _RULE_SELECTORS
    )


# ------------------------------------------------------------- route dumps
# Route dumps are observe's hot path (every reconcile pass, thousands of routes
# possible). Measured with 1,000 routes: pyroute2 needs ~65 ms to dump and read
# the attributes we use, this bare rtnetlink socket with struct ~3.5 ms. Writes,
# rules and links stay with pyroute2, where the volume is small.
AF_NETLINK = 16
NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_GET_STRICT_CHK = 12
RTM_GETROUTE = 26
NLM_F_REQUEST, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_MULTIPATH, RTA_TABLE = 1, 4, 5, 6, 9, 15
_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")
_RTNEXTHOP = struct.Struct("=HBBi")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")


class _RawRoute(NamedTuple):
    dst_len: int
    src_len: int
    tos: int
    table: int
    protocol: int
    type: int
    destination: str | None
    oif: int
    gateway: str | None
    metric: int
    multipath: tuple[tuple[str | None, int, int], ...]  # (gateway, oif, weight)


def _attributes(data: memoryview, offset: int, end: int) -> Iterator[tuple[int, memoryview]]:
    while offset + 4 <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < 4:
            break
        yield kind & 0x3FFF, data[offset + 4 : offset + length]  # without NLA_F_NESTED / BYTEORDER
        offset += (length + 3) & ~3


class _RouteDumpSocket:
    """An rtnetlink socket that only lists routes. Create it inside the namespace to list."""

    def __init__(self) -> None:
        self._sock = socket.socket(AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        # Strict checking makes the kernel honour the protocol filter in the request header.
        self._sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        self._sock.bind((0, 0))
        self._sock.settimeout(10.0)  # the kernel answers at once; never hang a reconcile pass
        self._seq = 0
        self._buffer = bytearray(1 << 20)

    def close(self) -> None:
        self._sock.close()

    def dump(self, family: int, protocol: int) -> list[_RawRoute]:
        self._seq += 1
        request = _RTMSG.pack(family, 0, 0, 0, 0, protocol, 0, 0, 0)
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP,
                                self._seq, 0)
        self._sock.send(header + request)
        routes: list[_RawRoute] = []
        interrupted = False
        view = memoryview(self._buffer)
        while True:
            size = self._sock.recv_into(self._buffer)
            offset = 0
            while offset + _NLMSGHDR.size <= size:
                length, kind, flags, seq, _ = _NLMSGHDR.unpack_from(view, offset)
                if length < _NLMSGHDR.size:
                    raise NetlinkError(errno.EPROTO, "malformed netlink message")
                body = offset + _NLMSGHDR.size
                if seq == self._seq:
                    interrupted |= bool(flags & NLM_F_DUMP_INTR)
                    if kind == NLMSG_DONE:
                        # A dump that failed midway ends with a negative errno in DONE.
                        status = _I32.unpack_from(view, body)[0] if length >= _NLMSGHDR.size + 4 else 0
                        if status < 0:
                            raise NetlinkError(-status)
                        if interrupted:
                            raise NetlinkDumpInterrupted()
                        return routes
                    if kind == NLMSG_ERROR:
                        code = -_I32.unpack_from(view, body)[0]
                        raise NetlinkError(code)
                    routes.append(self._parse(family, view, body, offset + length))
                offset += (length + 3) & ~3

    @staticmethod
    def _parse(family: int, data: memoryview, offset: int, end: int) -> _RawRoute:
        _, dst_len, src_len, tos, table, protocol, _, kind, _ = _RTMSG.unpack_from(data, offset)
        destination = gateway = None
        oif = metric = 0
        multipath: list[tuple[str | None, int, int]] = []
        for attr, value in _attributes(data, offset + _RTMSG.size, end):
            if attr == RTA_TABLE:
                table = _U32.unpack_from(value)[0]
            elif attr == RTA_DST:
                destination = socket.inet_ntop(family, value)
            elif attr == RTA_GATEWAY:
                gateway = socket.inet_ntop(family, value)
            elif attr == RTA_OIF:
                oif = _U32.unpack_from(value)[0]
            elif attr == RTA_PRIORITY:
                metric = _U32.unpack_from(value)[0]
            elif attr == RTA_MULTIPATH:
                at = 0
                while at + _RTNEXTHOP.size <= len(value):
                    length, _, hops, ifindex = _RTNEXTHOP.unpack_from(value, at)
                    if length < _RTNEXTHOP.size:
                        break
                    hop_gateway = None
                    for hop_attr, hop_value in _attributes(value, at + _RTNEXTHOP.size, at + length):
                        if hop_attr == RTA_GATEWAY:
                            hop_gateway = socket.inet_ntop(family, hop_value)
                    multipath.append((hop_gateway, ifindex, hops + 1))
                    at += (length + 3) & ~3
        return _RawRoute(dst_len, src_len, tos, table, protocol, kind, destination, oif, gateway, metric,
                         tuple(multipath))


def _add_collides(new: IpRule, existing: IpRule) -> bool:
    """Whether the kernel would call `new` a duplicate of `existing` (its rule_exists).

    Every selector is compared exactly, except the prefixes: those only when
    `new` has them (fib4/fib6 rule compare treat a zero length as "any").
    """
    if (existing.family, existing.priority, existing.table) != (new.family, new.priority, new.table):
        return False
    exact = ("fwmark", "fwmask", "iif", "oif", "ip_proto", "sport", "dport", "uid_range")
    if any(getattr(new, name) != getattr(existing, name) for name in exact):
        return False
    return all(getattr(new, name) is None or getattr(new, name) == getattr(existing, name)
               for name in ("source", "destination"))
