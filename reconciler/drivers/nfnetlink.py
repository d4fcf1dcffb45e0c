"""Raw nf_tables netlink for the two requests libnftables makes slow: the
ruleset generation, and batches that only add or remove elements of address
interval sets.

Why: libnftables loads a whole interval set into its cache before it adds one
element (about 40 ms for a 10,000-element set here), so a one-element change
would cost as much as the set is large. The kernel itself needs only the
element. The batch carries the generation the caller observed
(NFNL_BATCH_GENID): if any nft transaction committed since, the kernel refuses
the whole batch (ERESTART) and nothing changes; so a batch that succeeds and
finds the generation exactly one higher proves that the kernel now holds the
observed state plus these elements, and nothing else changed in between.

Written here: the interval sets of addresses (the sets that grow to thousands
of CIDRs) and the load-balancing maps (`numgen` slot ranges to `address .
port`); everything else goes through libnftables' text transactions in nft.py.
Element encoding follows nft: an interval [low, high] is a start element `low`
(carrying the map value) and, unless `high` is the largest key, an end element
`high + 1` flagged NFT_SET_ELEM_INTERVAL_END; keys are big-endian.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from compiler.errors import KernelError

from ..netns import entered
from .events import NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NLMSG_DONE, NLMSG_ERROR, attributes, netlink_messages

NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 12, 13, 14, 15, 16
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE = 0, 1
NFTA_TABLE_NAME = 1
NLM_F_DUMP = 0x300
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFNL_BATCH_GENID = 1
NFTA_GEN_ID = 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_FLAGS = 1, 2, 3
NFTA_DATA_VALUE = 1
NFT_SET_ELEM_INTERVAL_END = 0x1
NFPROTO_INET = 1
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLA_F_NESTED = 0x8000
ERESTART = 85
LOOKUPS_PER_SET = 64  # touched elements of a set verified by lookups; more: the set is dumped
ELEMENTS_PER_MESSAGE = 200  # set elements (an interval is two kernel elements) per message
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # asm-generic/socket.h; not in Python's socket module
_HDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_NFGEN = struct.Struct("=BBH")
_BE32 = struct.Struct("!I")
_ERR = struct.Struct("=i")
_REPLY_TIMEOUT = 10.0


class SetLayout(NamedTuple):
    """How the elements of one kind of set are encoded: the key's width (4 or 16-byte addresses, or a
    32-bit integer: nft keeps interval keys big-endian even for host-order expressions like numgen)
    and, for maps, the address family of an `address . port` value. A tuple: it is part of the key of
    the encoders' caches, hashed once per element."""

    key_bytes: int
    key_is_address: bool
    value_family: int | None = None


def layout_of(declaration: str) -> SetLayout | None:
    """The layout of a set or map that kernform declares with `declaration`, if it is written raw."""
    if declaration == "type ipv4_addr; flags interval;":
        return SetLayout(4, True)
    if declaration == "type ipv6_addr; flags interval;":
        return SetLayout(16, True)
    for l3, family in (("ip", 4), ("ip6", 6)):
        for proto in ("tcp", "udp"):
            if declaration == f"typeof numgen random mod 1 : {l3} daddr . {proto} dport; flags interval; counter;":
                # The kernel gives every added element the set's counter: the raw batch needs no expression.
                return SetLayout(4, False, family)
    return None


@dataclass(frozen=True)
class ElementChanges:
    """Elements to remove (keys) and to add (key, map value or None) in one set."""

    set: str
    layout: SetLayout
    removed: Sequence[str]
    added: Sequence[tuple[str, str | None]]


class GenerationChanged(KernelError):
    """Another nft transaction committed since the state was observed: nothing was written; observe again."""


def _attr(kind: int, payload: bytes) -> bytes:
    data = _NLATTR.pack(4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _nest(kind: int, *children: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(children))


def _message(kind: int, flags: int, seq: int, family: int, res_id: int, body: bytes) -> bytes:
    payload = _NFGEN.pack(family, 0, socket.htons(res_id)) + body
    return _HDR.pack(_HDR.size + len(payload), kind, flags, seq, 0) + payload


def interval_bounds(layout: SetLayout, text: str) -> tuple[int, int]:
    """[low, high] of one set element in nft's text: `a`, `a/len` or `a-b`."""
    bits = layout.key_bytes * 8
    if layout.key_is_address:
        if "-" in text:
            low_text, high_text = text.split("-", 1)
            low, high = int(ipaddress.ip_address(low_text)), int(ipaddress.ip_address(high_text))
        else:
            network = ipaddress.ip_network(text, strict=True)
            low, high = int(network.network_address), int(network.broadcast_address)
    else:
        low_text, _, high_text = text.partition("-")
        low, high = int(low_text), int(high_text or low_text)
    if low < 0 or high >> bits or low > high:
        raise ValueError(f"{text} is not an interval of {bits}-bit keys")
    return low, high


def interval_keys(layout: SetLayout, text: str) -> list[tuple[bytes, int]]:
    """The kernel elements (key bytes, flags) of one set element in nft's text: `a`, `a/len` or `a-b`."""
    bits = layout.key_bytes * 8
    low, high = interval_bounds(layout, text)
    keys = [(low.to_bytes(layout.key_bytes, "big"), 0)]
    if high != (1 << bits) - 1:
        keys.append(((high + 1).to_bytes(layout.key_bytes, "big"), NFT_SET_ELEM_INTERVAL_END))
    return keys


@functools.lru_cache(maxsize=1 << 16)
def map_value(layout: SetLayout, text: str) -> bytes:
    """`address . port` as nft registers hold it: the address, then the port in network order padded to 4 bytes."""
    address, _, port = (part.strip() for part in text.partition(" . "))
    packed = ipaddress.ip_address(address).packed
    if len(packed) != (4 if layout.value_family == 4 else 16):
        raise ValueError(f"{text}: not an IPv{layout.value_family} address . port")
    return packed + int(port).to_bytes(2, "big") + b"\0\0"


@functools.lru_cache(maxsize=1 << 17)
def _encoded(layout: SetLayout, text: str, value: str | None, with_value: bool) -> bytes:
    """The kernel elements of one element in nft's text, encoded (kept: a daemon sends the same ones again)."""
    data = None if value is None or not with_value else map_value(layout, value)
    return b"".join(_element(key, kflags, data) for key, kflags in interval_keys(layout, text))


_TWO_ATTRS = struct.Struct("=HHHH")  # a nest's header and its one child's header, back to back
_FLAGS_ATTR = struct.Struct("=HHI")  # NFTA_SET_ELEM_FLAGS: header and a big-endian u32 (packed as such)


def _element(key: bytes, flags: int, value: bytes | None = None) -> bytes:
    """One NFTA_LIST_ELEM: {KEY {DATA_VALUE key}}, [FLAGS], [DATA {DATA_VALUE value}]. The same bytes as
    `_nest`/`_attr` would build, written with a few packs: a 1,000-backend re-slice encodes 4,000 of them."""
    key_pad = -len(key) % 4
    body = _TWO_ATTRS.pack(8 + len(key) + key_pad, NFTA_SET_ELEM_KEY | NLA_F_NESTED,
                           4 + len(key), NFTA_DATA_VALUE) + key + b"\0" * key_pad
    if flags:
        body += _FLAGS_ATTR.pack(8, NFTA_SET_ELEM_FLAGS, socket.htonl(flags))
    if value is not None and not flags & NFT_SET_ELEM_INTERVAL_END:
        value_pad = -len(value) % 4
        body += _TWO_ATTRS.pack(8 + len(value) + value_pad, NFTA_SET_ELEM_DATA | NLA_F_NESTED,
                                4 + len(value), NFTA_DATA_VALUE) + value + b"\0" * value_pad
    return _NLATTR.pack(4 + len(body), NFTA_LIST_ELEM | NLA_F_NESTED) + body


class NfTablesSocket:
    """One NETLINK_NETFILTER socket in the target namespace, for generation reads and element batches."""

    def __init__(self, netns: str | None) -> None:
        with entered(netns):
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.settimeout(_REPLY_TIMEOUT)
        self._seq = 1
        self.operations = 0

    def close(self) -> None:
        self._sock.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        return self._seq

    def generation(self) -> int:
        """The namespace's nf_tables generation: it grows by one with every committed transaction."""
        seq = self._next_seq()
        self._sock.send(_message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, NLM_F_REQUEST, seq, 0, 0, b""))
        while True:
            for kind, payload, reply_seq in self._replies():
                if reply_seq != seq:
                    continue
                if kind == NLMSG_ERROR:
                    raise KernelError(f"nft: reading the generation failed: errno {-_ERR.unpack_from(payload)[0]}")
                if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
                    gen = attributes(payload, _NFGEN.size).get(NFTA_GEN_ID)
                    if gen is None:
                        raise KernelError("nft: the generation reply carries no id")
                    return int(_BE32.unpack_from(gen)[0])

    def table_names(self, family: int = NFPROTO_INET) -> list[str]:
        """Names of the namespace's nf_tables tables of `family`: one dump of tables only (`nft list tables`
        through libnftables fills its cache with the whole ruleset first: 33 ms beside a 10,000-element set)."""
        seq = self._next_seq()
        self._sock.send(_message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE, NLM_F_REQUEST | NLM_F_DUMP, seq,
                                 family, 0, b""))
        names: list[str] = []
        while True:
            for kind, payload, reply_seq in self._replies():
                if reply_seq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return names
                if kind == NLMSG_ERROR:
                    raise KernelError(f"nft: listing the tables failed: errno {-_ERR.unpack_from(payload)[0]}")
                if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE:
                    name = attributes(payload, _NFGEN.size).get(NFTA_TABLE_NAME)
                    if name is not None:
                        names.append(bytes(name).split(b"\0", 1)[0].decode())

    def _replies(self) -> Iterable[tuple[int, memoryview, int]]:
        try:
            data = self._sock.recv(1 << 16)
        except TimeoutError:
            raise KernelError("nft: no answer from the kernel within "
                              f"{_REPLY_TIMEOUT:.0f} s") from None
        view = memoryview(data)
        offset = 0
        for kind, _, payload in netlink_messages(view):
            # netlink_messages does not give the sequence number; read it from the header in place.
            seq = _HDR.unpack_from(view, offset)[3]
            offset += (_HDR.size + len(payload) + 3) & ~3
            yield kind, payload, seq

    def _make_room(self, batch_bytes: int, acks: int) -> None:
        """A netlink batch is one datagram and must fit the socket's send buffer whole (else EMSGSIZE),
        and every message's ack must fit the receive buffer; grow both as libnftables does."""
        for force, plain, wanted in ((SO_SNDBUFFORCE, socket.SO_SNDBUF, 2 * batch_bytes + (1 << 16)),
                                     (SO_RCVBUFFORCE, socket.SO_RCVBUF, 256 * acks + (1 << 16))):
            if self._sock.getsockopt(socket.SOL_SOCKET, plain) >= wanted:
                continue
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, force, wanted)  # root/CAP_NET_ADMIN: past the sysctl cap
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, plain, wanted)

    def write_elements(self, table: str, generation: int, sets: Sequence[ElementChanges]) -> int:
        """Remove then add elements of interval sets and maps in one transaction, valid only at `generation`.

        Elements are in nft's text (keys; `address . port` map values). Returns the
        number of element messages sent. Raises
        GenerationChanged when another transaction committed since `generation`
        (nothing written), KernelError when the kernel refused an element
        (nothing written either: the batch is one transaction).
        """
        messages: list[bytes] = []
        element_seqs: dict[int, str] = {}
        table_attr = _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
        for verb, flags in ((NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
                            (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE)):
            for change in sets:
                name, layout = change.set, change.layout
                # One entry per set element (an interval is two kernel elements, encoded together).
                if verb == NFT_MSG_DELSETELEM:
                    elements = [_encoded(layout, text, None, False) for text in change.removed]
                else:
                    elements = [_encoded(layout, text, value, True) for text, value in change.added]
                set_attr = _attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")
                for start in range(0, len(elements), ELEMENTS_PER_MESSAGE):
                    seq = self._next_seq()
                    body = table_attr + set_attr + _nest(NFTA_SET_ELEM_LIST_ELEMENTS,
                                                         *elements[start : start + ELEMENTS_PER_MESSAGE])
                    messages.append(_message((NFNL_SUBSYS_NFTABLES << 8) | verb, flags, seq, NFPROTO_INET, 0, body))
                    element_seqs[seq] = f"{'delete' if verb == NFT_MSG_DELSETELEM else 'add'} elements of {name}"
        if not messages:
            return 0
        begin_seq = self._next_seq()
        begin = _message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin_seq, 0, NFNL_SUBSYS_NFTABLES,
                         _attr(NFNL_BATCH_GENID, _BE32.pack(generation)))
        end = _message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, self._next_seq(), 0, NFNL_SUBSYS_NFTABLES, b"")
        batch = b"".join([begin, *messages, end])
        self._make_room(len(batch), len(messages))
        self._sock.sendall(batch)
        pending = set(element_seqs)
        errors: list[str] = []
        while pending:
            for kind, payload, seq in self._replies():
                if kind == NLMSG_DONE:
                    continue
                if kind != NLMSG_ERROR:
                    continue
                code = -_ERR.unpack_from(payload)[0]
                if seq == begin_seq:
                    # The batch as a whole was refused (stale generation, or the commit failed).
                    if code == ERESTART:
                        raise GenerationChanged(f"nft table {table} changed since it was observed")
                    raise KernelError(f"nft rejected the element batch, nothing was changed: errno {code}")
                if seq in pending:
                    pending.discard(seq)
                    if code:
                        errors.append(f"{element_seqs[seq]}: {_strerror(code)}")
        if errors:
            raise KernelError("nft rejected the element batch, nothing was changed: " + "; ".join(errors))
        self.operations += len(messages)
        return len(messages)


    def read_elements(self, table: str, changes: Sequence[ElementChanges]) -> dict[str, dict[str, bytes]]:
        """What the kernel holds now for every element `changes` names (removed and added alike):
        {set: {element text: the map value's bytes (b"" for a set)}}, an element missing from its set's
        dict when the kernel does not hold exactly that interval.

        Used to verify a raw batch by reading the kernel rather than trusting what was sent. A set with
        few touched elements is asked key by key (NFT_MSG_GETSETELEM without dump); one with many, or one
        whose answers are not conclusive, is dumped whole. Either way the intervals are decoded from the
        kernel's answer and compared with the text parsed afresh, so an encoder that writes the wrong key
        (and would look up that same wrong key) is caught.
        """
        few = [c for c in changes if len(c.removed) + len(c.added) <= LOOKUPS_PER_SET]
        held, unsure = self._looked_up(table, few)
        for change in changes:
            if change.set in unsure or len(change.removed) + len(change.added) > LOOKUPS_PER_SET:
                held[change.set] = self._dumped(table, change.set, change.layout)
        result: dict[str, dict[str, bytes]] = {}
        for change in changes:
            intervals = held.get(change.set, {})
            found = result.setdefault(change.set, {})
            bounds = functools.partial(interval_bounds, change.layout)
            for text in dict.fromkeys([*change.removed, *(text for text, _ in change.added)]):
                value = intervals.get(bounds(text))
                if value is not None:
                    found[text] = value
        return result

    def _looked_up(self, table: str, changes: Sequence[ElementChanges]
                   ) -> tuple[dict[str, dict[tuple[int, int], bytes]], set[str]]:
        """({set: {(low, high): map value bytes (b"" for a set)}} of the touched intervals found by
        looking up their kernel elements, {sets whose answers were not conclusive}).

        An interval set answers the lookup of a start key it lacks with the interval containing the key,
        so only an answer carrying exactly the key and flags asked for counts. A missing start proves an
        element absent. An end key is not reliable on its own: where one interval ends exactly where the
        next begins, the end and the next start share a key and the kernel may answer with another end.
        So an added element whose start is found but whose end answer differs, or a removed element whose
        start is still found, makes its set inconclusive (the caller dumps it).
        """
        requests: dict[int, tuple[str, str, int, bytes, int]] = {}  # seq -> (set, text, part, key, flags)
        expected_parts: dict[tuple[str, str], int] = {}
        messages: list[bytes] = []
        table_attr = _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
        layouts = {change.set: change.layout for change in changes}
        for change in changes:
            set_attr = _attr(NFTA_SET_ELEM_LIST_SET, change.set.encode() + b"\0")
            removed_only = set(change.removed) - {text for text, _ in change.added}
            for text in dict.fromkeys([*change.removed, *(text for text, _ in change.added)]):
                parts = interval_keys(change.layout, text)
                if text in removed_only:
                    parts = parts[:1]  # its absence is proven by its start alone
                expected_parts[(change.set, text)] = len(parts)
                for index, (key, kflags) in enumerate(parts):
                    seq = self._next_seq()
                    requests[seq] = (change.set, text, index, key, kflags)
                    body = table_attr + set_attr + _nest(NFTA_SET_ELEM_LIST_ELEMENTS, _element(key, kflags))
                    messages.append(_message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, NLM_F_REQUEST,
                                             seq, NFPROTO_INET, 0, body))
        held: dict[str, dict[tuple[int, int], bytes]] = {change.set: {} for change in changes}
        unsure: set[str] = set()
        if not messages:
            return held, unsure
        answers: dict[tuple[str, str], list[tuple[bytes, int, bytes] | None]] = {}
        self._make_room(sum(map(len, messages)), len(messages) * 2)
        self._sock.sendall(b"".join(messages))
        pending = set(requests)
        while pending:
            for kind, payload, seq in self._replies():
                if seq not in pending:
                    continue
                pending.discard(seq)
                set_name, text, index, key, kflags = requests[seq]
                if kind == NLMSG_ERROR:
                    code = -_ERR.unpack_from(payload)[0]
                    if code and code != errno.ENOENT:
                        raise KernelError(f"nft: looking up element {text} of {set_name} failed: {_strerror(code)}")
                    continue
                if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM:
                    continue
                for got in _reply_elements(payload):
                    if got[0] == key and (got[1] & NFT_SET_ELEM_INTERVAL_END) == kflags:
                        answers.setdefault((set_name, text), [None] * expected_parts[(set_name, text)])[index] = got
        self.operations += len(messages)
        for (set_name, text), parts_found in answers.items():
            start = parts_found[0]
            if start is None:
                continue  # no exact start: not held
            width = layouts[set_name].key_bytes
            low = int.from_bytes(start[0], "big")
            if expected_parts[(set_name, text)] == 1:
                largest = (1 << (8 * width)) - 1
                if interval_bounds(layouts[set_name], text)[1] != largest:
                    unsure.add(set_name)  # a removed element's start is still there
                    continue
                held[set_name][(low, largest)] = start[2]
                continue
            end = parts_found[1]
            if end is None:
                unsure.add(set_name)
                continue
            held[set_name][(low, int.from_bytes(end[0], "big") - 1)] = start[2]
        return held, unsure

    def _dumped(self, table: str, set_name: str, layout: SetLayout) -> dict[tuple[int, int], bytes]:
        """{(low, high): map value bytes (b"" for a set)} of every interval of one set, from a dump."""
        seq = self._next_seq()
        body = (_attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                + _attr(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0"))
        self._sock.send(_message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_DUMP,
                                 seq, NFPROTO_INET, 0, body))
        elements: list[tuple[int, bool, bytes]] = []
        done = False
        while not done:
            for kind, payload, reply_seq in self._replies():
                if reply_seq != seq:
                    continue
                if kind == NLMSG_DONE:
                    done = True
                elif kind == NLMSG_ERROR:
                    code = -_ERR.unpack_from(payload)[0]
                    raise KernelError(f"nft: listing the elements of {set_name} failed: {_strerror(code)}")
                elif kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM:
                    elements += [(int.from_bytes(key, "big"), bool(flags & NFT_SET_ELEM_INTERVAL_END), data)
                                 for key, flags, data in _reply_elements(payload) if len(key) == layout.key_bytes]
        self.operations += 1
        elements.sort(key=lambda e: (e[0], not e[1]))  # an end before a start at the same key
        largest = (1 << (8 * layout.key_bytes)) - 1
        intervals: dict[tuple[int, int], bytes] = {}
        for position, (key, is_end, data) in enumerate(elements):
            if is_end:
                continue
            after = elements[position + 1] if position + 1 < len(elements) else None
            if after is None:
                intervals[(key, largest)] = data
            elif after[1]:
                intervals[(key, after[0] - 1)] = data
            # a start followed by another start: not an interval kernform writes; it matches no text
        return intervals


def _reply_elements(payload: memoryview) -> Iterator[tuple[bytes, int, bytes]]:
    """(key, flags, data) of each element in a NEWSETELEM message. A dump of a large map carries
    thousands: the nests are walked in place, without a dict per element."""
    elements = attributes(payload, _NFGEN.size).get(NFTA_SET_ELEM_LIST_ELEMENTS)
    if elements is None:
        return
    unpack = _NLATTR.unpack_from
    for kind, element in _each_attribute(elements):
        if kind != NFTA_LIST_ELEM:
            continue
        key: bytes | None = None
        flags = 0
        data = b""
        offset, end = 0, len(element)
        while offset + 4 <= end:
            length, attr = unpack(element, offset)
            if length < 4:
                break
            attr &= 0x3FFF
            if attr in (NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA):
                # A nest holding one NFTA_DATA_VALUE: its payload starts after the inner header.
                inner_length, inner = unpack(element, offset + 4)
                if inner & 0x3FFF == NFTA_DATA_VALUE and inner_length >= 4:
                    value = bytes(element[offset + 8 : offset + 4 + inner_length])
                    if attr == NFTA_SET_ELEM_KEY:
                        key = value
                    else:
                        data = value
            elif attr == NFTA_SET_ELEM_FLAGS:
                flags = _BE32.unpack_from(element, offset + 4)[0]
            offset += (length + 3) & ~3
        if key is not None:
            yield key, flags, data


def _each_attribute(payload: memoryview) -> Iterator[tuple[int, memoryview]]:
    """Every attribute of a nest, repeated types included (`attributes` keeps the first of each)."""
    offset = 0
    while offset + _NLATTR.size <= len(payload):
        length, kind = _NLATTR.unpack_from(payload, offset)
        if length < _NLATTR.size:
            return
        yield kind & 0x3FFF, payload[offset + _NLATTR.size : offset + length]
        offset += (length + 3) & ~3


def map_value_text(layout: SetLayout, value: bytes) -> str:
    """The inverse of map_value: `address . port` from the bytes the kernel holds."""
    width = 4 if layout.value_family == 4 else 16
    address = ipaddress.ip_address(value[:width])
    return f"{address} . {int.from_bytes(value[width : width + 2], 'big')}"


def _strerror(code: int) -> str:
    return f"{os.strerror(code)} (errno {code})"
