"""The bpf(2) calls kernform makes itself, through Debian's libbpf.so.1 and ctypes.

bcc compiles and loads programs; everything after that (pinning, opening
pins, reading and writing maps in batches, links, object info, feature
probes) goes through libbpf's thin syscall wrappers here, as the design
asks, rather than hand-built bpf_attr unions. Every function raises OSError
with the kernel's errno; the driver turns those into KernelError with
context. Nothing here knows about kernform's layout: see drivers/bpf.py.

libbpf's low-level API returns a negative errno (libbpf 1.x, LIBBPF_STRICT
by default), so errors are read from the return value, not from errno.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

# enum bpf_map_type values kernform meets (uapi/linux/bpf.h).
MAP_HASH = 1
MAP_ARRAY = 2
MAP_PERCPU_HASH = 5
MAP_PERCPU_ARRAY = 6
MAP_LRU_HASH = 9
MAP_LRU_PERCPU_HASH = 10
MAP_LPM_TRIE = 11
MAP_SOCKMAP = 15
MAP_SOCKHASH = 18
PERCPU_MAP_TYPES = frozenset({MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_PERCPU_HASH})
ARRAY_MAP_TYPES = frozenset({MAP_ARRAY, MAP_PERCPU_ARRAY})

# enum bpf_link_type
LINK_TYPE_CGROUP = 3
LINK_TYPE_NETNS = 5

BPF_F_REPLACE = 1 << 2  # bpf_link_update: only if the link still runs old_prog_fd
BPF_F_MMAPABLE = 1 << 10  # map_flags: an array userspace may mmap
ENOTSUPP = 524  # kernel-internal "operation not supported" (batch ops on LPM tries)
# Batch writes are cut in chunks of at most this many entries and about this many bytes.
BATCH_ENTRIES = 16384
BATCH_BYTES = 4 << 20

_lib: ctypes.CDLL | None = None

_c_int, _c_uint, _vp = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p


class LinkUpdateOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("old_prog_fd", ctypes.c_uint32),
                ("old_map_fd", ctypes.c_uint32)]


def lib() -> ctypes.CDLL:
    """libbpf.so.1 with the prototypes used here (loaded once)."""
    global _lib
    if _lib is None:
        so = ctypes.CDLL("libbpf.so.1", use_errno=True)
        protos: dict[str, tuple[list[type], type]] = {
            "bpf_obj_get": ([ctypes.c_char_p], _c_int),
            "bpf_obj_pin": ([_c_int, ctypes.c_char_p], _c_int),
            "bpf_obj_get_info_by_fd": ([_c_int, _vp, ctypes.POINTER(ctypes.c_uint32)], _c_int),
            "bpf_map_lookup_elem": ([_c_int, _vp, _vp], _c_int),
            "bpf_map_update_elem": ([_c_int, _vp, _vp, ctypes.c_uint64], _c_int),
            "bpf_map_delete_elem": ([_c_int, _vp], _c_int),
            "bpf_map_get_next_key": ([_c_int, _vp, _vp], _c_int),
            "bpf_map_lookup_batch": ([_c_int, _vp, _vp, _vp, _vp, ctypes.POINTER(ctypes.c_uint32), _vp], _c_int),
            "bpf_map_update_batch": ([_c_int, _vp, _vp, ctypes.POINTER(ctypes.c_uint32), _vp], _c_int),
            "bpf_map_delete_batch": ([_c_int, _vp, ctypes.POINTER(ctypes.c_uint32), _vp], _c_int),
            "bpf_link_create": ([_c_int, _c_int, _c_int, _vp], _c_int),
            "bpf_link_update": ([_c_int, _c_int, _vp], _c_int),
            "bpf_link_detach": ([_c_int], _c_int),
            "bpf_prog_get_fd_by_id": ([ctypes.c_uint32], _c_int),
            "libbpf_probe_bpf_prog_type": ([_c_int, _vp], _c_int),
            "libbpf_probe_bpf_helper": ([_c_int, _c_int, _vp], _c_int),
            "libbpf_num_possible_cpus": ([], _c_int),
        }
        for name, (argtypes, restype) in protos.items():
            fn = getattr(so, name)
            fn.argtypes = argtypes
            fn.restype = restype
        _lib = so
    return _lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        code = -rc
        raise OSError(code, f"{what}: {os.strerror(code) if code != ENOTSUPP else 'not supported'}")
    return rc


def possible_cpus() -> int:
    return _check(lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


# ------------------------------------------------------------------ objects
def obj_get(path: str) -> int:
    """An fd for the object pinned at `path` (FileNotFoundError if there is none)."""
    return _check(lib().bpf_obj_get(path.encode()), f"bpf_obj_get {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin {path}")


def _info(fd: int, size: int = 256) -> bytes:
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    _check(lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(length)), "bpf_obj_get_info_by_fd")
    return buf.raw[: length.value]


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


@dataclass(frozen=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int
    target: int  # cgroup id (cgroup links) or netns inode (netns links); 0 once the target is gone
    attach_type: int


def prog_info(fd: int) -> ProgInfo:
    raw = _info(fd)
    # struct bpf_prog_info: type @0, id @4, ..., name[16] @64
    ptype, pid = struct.unpack_from("=II", raw, 0)
    return ProgInfo(pid, ptype, raw[64:80].split(b"\0", 1)[0].decode(errors="replace"))


def map_info(fd: int) -> MapInfo:
    raw = _info(fd)
    # struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, name[16]
    mtype, mid, ksize, vsize, entries, flags = struct.unpack_from("=IIIIII", raw, 0)
    return MapInfo(mid, mtype, ksize, vsize, entries, flags, raw[24:40].split(b"\0", 1)[0].decode(errors="replace"))


def link_info(fd: int) -> LinkInfo:
    raw = _info(fd)
    # struct bpf_link_info: type @0, id @4, prog_id @8, union @16 (8-aligned):
    #   cgroup { u64 cgroup_id; u32 attach_type }, netns { u32 netns_ino; u32 attach_type }
    ltype, lid, prog_id = struct.unpack_from("=III", raw, 0)
    if ltype == LINK_TYPE_CGROUP:
        target, attach = struct.unpack_from("=QI", raw, 16)
    elif ltype == LINK_TYPE_NETNS:
        target, attach = struct.unpack_from("=II", raw, 16)
    else:
        target, attach = 0, -1
    return LinkInfo(lid, ltype, prog_id, target, attach)


# ------------------------------------------------------------------ links
def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return _check(lib().bpf_link_create(prog_fd, target_fd, attach_type, None), "bpf_link_create")


def link_update(link_fd: int, new_prog_fd: int, old_prog_fd: int | None = None) -> None:
    """Swap the program of a live link atomically (with old_prog_fd: only if it still runs that one)."""
    opts = LinkUpdateOpts(ctypes.sizeof(LinkUpdateOpts), 0, 0, 0)
    if old_prog_fd is not None:
        opts.flags, opts.old_prog_fd = BPF_F_REPLACE, old_prog_fd
    _check(lib().bpf_link_update(link_fd, new_prog_fd, ctypes.byref(opts)), "bpf_link_update")


def link_detach(link_fd: int) -> None:
    _check(lib().bpf_link_detach(link_fd), "bpf_link_detach")


# ------------------------------------------------------------------ maps
class Map:
    """A map opened from its pin (or an fd), with its geometry. Close it (or use `with`)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.info = map_info(fd)
        self.percpu = self.info.type in PERCPU_MAP_TYPES
        self.ncpus = possible_cpus() if self.percpu else 1
        # Per-CPU values are copied as one 8-byte-aligned slot per possible CPU.
        self.slot_size = (self.info.value_size + 7) & ~7 if self.percpu else self.info.value_size
        self.read_size = self.slot_size * self.ncpus

    @classmethod
    def open(cls, path: str) -> Map:
        fd = obj_get(path)
        try:
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading
    def lookup(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(max(self.read_size, 8))
        rc = lib().bpf_map_lookup_elem(self.fd, key, value)
        if rc == -errno.ENOENT:
            return None
        _check(rc, f"lookup in map {self.info.name}")
        return value.raw[: self.read_size]

    def next_key(self, key: bytes | None) -> bytes | None:
        """The key after `key` in the map's own order (the first with None); None past the last."""
        ksize = self.info.key_size
        nxt = ctypes.create_string_buffer(ksize)
        rc = lib().bpf_map_get_next_key(self.fd, key, nxt)
        if rc == -errno.ENOENT:
            return None
        _check(rc, f"next key in map {self.info.name}")
        return nxt.raw[:ksize]

    def held(self, key: bytes) -> bytes | None:
        """The value stored under exactly `key`, None when there is none. An LPM trie answers a lookup
        with the longest prefix containing the key, so there the key's presence is checked first:
        get_next_key of a key the trie does not hold exactly returns the trie's first key, and of a key it
        holds, the key after it (or ENOENT for the last)."""
        if self.info.type == MAP_LPM_TRIE:
            first = self.next_key(None)
            if first is None or (first != key and self.next_key(key) == first):
                return None
        return self.lookup(key)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) pair; batched where the map type allows it, else key by key."""
        try:
            yield from self._items_batched()
        except _NoBatch:
            yield from self._items_by_key()

    def _items_batched(self, chunk: int = 65536) -> Iterator[tuple[bytes, bytes]]:
        ksize, vsize = self.info.key_size, self.read_size
        # buffers of a few MB whatever the map's limit (maglev: 1 KiB values, 100,000s of entries allowed)
        count_max = max(1, min(chunk, self.info.max_entries, BATCH_BYTES // (ksize + vsize)))
        keys = ctypes.create_string_buffer(ksize * count_max)
        values = ctypes.create_string_buffer(vsize * count_max)
        # The batch token is opaque (a bucket index for hashes, a key for arrays).
        token_size = max(ksize, 8)
        tokens = [ctypes.create_string_buffer(token_size), ctypes.create_string_buffer(token_size)]
        first = True
        turn = 0
        while True:
            count = ctypes.c_uint32(count_max)
            in_batch = None if first else tokens[turn]
            out_batch = tokens[1 - turn]
            rc = lib().bpf_map_lookup_batch(self.fd, in_batch, out_batch, keys, values, ctypes.byref(count), None)
            if rc < 0 and -rc in (errno.EINVAL, errno.ENOTSUP, ENOTSUPP) and first:
                raise _NoBatch()
            done = rc == -errno.ENOENT
            if rc < 0 and not done:
                _check(rc, f"batch lookup in map {self.info.name}")
            n = count.value
            if n:
                kraw, vraw = keys.raw[: n * ksize], values.raw[: n * vsize]
                for i in range(n):
                    yield kraw[i * ksize : (i + 1) * ksize], vraw[i * vsize : (i + 1) * vsize]
            if done:
                return
            first = False
            turn = 1 - turn

    def _items_by_key(self) -> Iterator[tuple[bytes, bytes]]:
        ksize = self.info.key_size
        key = ctypes.create_string_buffer(ksize)
        nxt = ctypes.create_string_buffer(ksize)
        value = ctypes.create_string_buffer(max(self.read_size, 8))
        current: ctypes.Array[ctypes.c_char] | None = None
        while True:
            rc = lib().bpf_map_get_next_key(self.fd, current, nxt)
            if rc == -errno.ENOENT:
                return
            _check(rc, f"next key in map {self.info.name}")
            ctypes.memmove(key, nxt, ksize)
            current = key
            rc = lib().bpf_map_lookup_elem(self.fd, key, value)
            if rc == -errno.ENOENT:
                continue  # deleted between the two calls
            if rc == -errno.ENOSPC and self.info.type in (MAP_SOCKMAP, MAP_SOCKHASH):
                raise OSError(errno.ENOSPC, f"map {self.info.name}: a sockmap with 4-byte values cannot be read")
            _check(rc, f"lookup in map {self.info.name}")
            yield key.raw[:ksize], value.raw[: self.read_size]

    def array_values(self) -> bytes:
        """All values of an array map, concatenated in index order: one mmap where the map allows, else one batch."""
        if self.info.type not in ARRAY_MAP_TYPES:
            raise ValueError(f"map {self.info.name} is not an array")
        if self.info.flags & BPF_F_MMAPABLE and not self.percpu:
            return self._mapped_values()
        out = bytearray()
        ksize, vsize = self.info.key_size, self.read_size
        count_max = self.info.max_entries
        keys = ctypes.create_string_buffer(ksize * count_max)
        values = ctypes.create_string_buffer(vsize * count_max)
        token = ctypes.create_string_buffer(8)
        count = ctypes.c_uint32(count_max)
        rc = lib().bpf_map_lookup_batch(self.fd, None, token, keys, values, ctypes.byref(count), None)
        if rc < 0 and rc != -errno.ENOENT:
            _check(rc, f"batch lookup in map {self.info.name}")
        out += values.raw[: count.value * vsize]
        if count.value != count_max:
            raise OSError(errno.EIO, f"map {self.info.name}: batch read {count.value} of {count_max} entries")
        return bytes(out)

    def _mapped_values(self) -> bytes:
        # Array elements are 8-byte aligned in the kernel's memory: pick the values out of their slots.
        size, count = self.info.value_size, self.info.max_entries
        elem = (size + 7) & ~7
        length = (elem * count + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
        with mmap.mmap(self.fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mapped:
            view = memoryview(mapped)
            try:
                if elem == size:
                    return view[: elem * count].tobytes()
                if size == 4:
                    return view[: elem * count].cast("I")[:: elem // 4].tobytes()
                data = view[: elem * count].tobytes()
                return b"".join(data[i : i + size] for i in range(0, elem * count, elem))
            finally:
                view.release()

    # ---- writing
    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        _check(lib().bpf_map_update_elem(self.fd, key, value, flags), f"update in map {self.info.name}")

    def delete(self, key: bytes) -> bool:
        """Deletes `key`; False if it was not there."""
        rc = lib().bpf_map_delete_elem(self.fd, key)
        if rc == -errno.ENOENT:
            return False
        _check(rc, f"delete in map {self.info.name}")
        return True

    def update_many(self, pairs: list[tuple[bytes, bytes]]) -> None:
        """Writes all pairs, in batch calls where the map type allows it: chunks of at most BATCH_ENTRIES
        entries and about BATCH_BYTES of keys and values (the kernel copies a batch in one go; 10,000
        services make 100,000 backends and 10 MB of Maglev chunks)."""
        if not pairs:
            return
        if self.info.type in (MAP_ARRAY, MAP_HASH) and len(pairs) > 1:
            step = max(1, min(BATCH_ENTRIES, BATCH_BYTES // (self.info.key_size + self.info.value_size)))
            for start in range(0, len(pairs), step):
                chunk = pairs[start : start + step]
                keys = b"".join(k for k, _ in chunk)
                values = b"".join(v for _, v in chunk)
                count = ctypes.c_uint32(len(chunk))
                rc = lib().bpf_map_update_batch(self.fd, keys, values, ctypes.byref(count), None)
                if rc >= 0:
                    continue
                if -rc not in (errno.EINVAL, errno.ENOTSUP, ENOTSUPP):
                    _check(rc, f"batch update in map {self.info.name}")
                for key, value in pairs[start + count.value :]:
                    self.update(key, value)
                return
            return
        for key, value in pairs:
            self.update(key, value)

    def delete_many(self, keys: list[bytes]) -> None:
        """Deletes every key (present or not), in batch calls for hashes."""
        if self.info.type != MAP_HASH or len(keys) < 2:
            for key in keys:
                self.delete(key)
            return
        step = max(1, min(BATCH_ENTRIES, BATCH_BYTES // self.info.key_size))
        for start in range(0, len(keys), step):
            chunk = keys[start : start + step]
            count = ctypes.c_uint32(len(chunk))
            rc = lib().bpf_map_delete_batch(self.fd, b"".join(chunk), ctypes.byref(count), None)
            if rc >= 0:
                continue
            # a key that is not there stops the batch (ENOENT): the rest one by one
            if -rc not in (errno.ENOENT, errno.EINVAL, errno.ENOTSUP, ENOTSUPP):
                _check(rc, f"batch delete in map {self.info.name}")
            for key in chunk[count.value :]:
                self.delete(key)


class _NoBatch(Exception):
    pass


# ------------------------------------------------------------------ probes
def probe_prog_type(prog_type: int) -> bool:
    return lib().libbpf_probe_bpf_prog_type(prog_type, None) == 1


class ProgLoadOpts(ctypes.Structure):
    """struct bpf_prog_load_opts as of libbpf 1.1 (sz says which fields we know)."""

    _fields_ = [
        ("sz", ctypes.c_size_t), ("attempts", ctypes.c_int), ("expected_attach_type", ctypes.c_int),
        ("prog_btf_fd", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32), ("prog_ifindex", ctypes.c_uint32),
        ("kern_version", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32), ("attach_prog_fd", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32), ("fd_array", ctypes.c_void_p), ("func_info", ctypes.c_void_p),
        ("func_info_cnt", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_void_p),
        ("line_info_cnt", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32), ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32), ("log_buf", ctypes.c_void_p),
    ]


# The verifier's ways of saying "this program type may not call that helper", old and new kernels.
_HELPER_REFUSED = ("unknown func ", "invalid func ", "cannot use helper ")


def probe_helper(prog_type: int, helper: int, expected_attach_type: int = 0) -> bool:
    """Whether programs of `prog_type` may call helper `helper`.

    Loads `call helper; exit` and reads the verifier log: a refusal of the
    helper itself means no; success or any complaint about the (missing)
    arguments means yes. libbpf 1.1's libbpf_probe_bpf_helper() does the same
    but misses the wording of kernels since 6.x ("program of this type cannot
    use helper"), so it would answer yes to everything.
    """
    so = lib()
    fn = so.bpf_prog_load
    fn.argtypes = [_c_int, ctypes.c_char_p, ctypes.c_char_p, _vp, ctypes.c_size_t, ctypes.POINTER(ProgLoadOpts)]
    fn.restype = _c_int
    insns = struct.pack("=BBhi", 0x85, 0, 0, helper) + struct.pack("=BBhi", 0x95, 0, 0, 0)  # call; exit
    log_buf = ctypes.create_string_buffer(8192)
    opts = ProgLoadOpts(sz=ctypes.sizeof(ProgLoadOpts), expected_attach_type=max(expected_attach_type, 0),
                        log_level=1, log_size=len(log_buf), log_buf=ctypes.addressof(log_buf))
    fd = fn(prog_type, b"kf_probe", b"GPL", insns, 2, ctypes.byref(opts))
    if fd >= 0:
        os.close(fd)
        return True
    text = log_buf.value.decode(errors="replace")
    return not any(marker in text for marker in _HELPER_REFUSED)


def prog_query(target_fd: int, attach_type: int, capacity: int = 64) -> list[int]:
    """Ids of the programs attached to a cgroup (or netns) at `attach_type`, ours or not."""
    so = lib()
    fn = so.bpf_prog_query
    fn.argtypes = [_c_int, _c_int, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32), _vp,
                   ctypes.POINTER(ctypes.c_uint32)]
    fn.restype = _c_int
    ids = (ctypes.c_uint32 * capacity)()
    count = ctypes.c_uint32(capacity)
    flags = ctypes.c_uint32(0)
    _check(fn(target_fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(count)), "bpf_prog_query")
    return list(ids[: count.value])
