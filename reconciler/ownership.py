"""The second record of which routing tables an intent owns, kept outside nftables.

kernform's ip rules and routes carry its protocol number (158), but a
protocol number says "kernform", not which intent: an intent owns the
protocol-158 objects in the routing tables it records as its own. The first
record is the `owned_routing_tables` set in the intent's nft table. That one
can be lost while the routes stay: `nft flush ruleset` (firewall reload
scripts do it), or a run killed after its first netlink change and before its
nft transaction (routes go first, so that rules never point at a missing
route). This record survives both:

- a file per (target, intent) under /run/kernform/owned/ (KERNFORM_RUN_DIR
  moves /run/kernform), on tmpfs like the kernel state it describes, so a
  reboot clears both;
- it is widened before any netlink change (atomically: written to a temporary
  file, synced, renamed), and narrowed to what the intent wants only after an
  apply was verified, so at every kill point it names a superset of what the
  kernel holds;
- it records the namespace's inode: a namespace deleted and created again
  under the same name does not inherit the old one's record.

Observation reads the union of both records; `destroy` removes the file last.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from .lock import RUN_DIR
from .netns import path_of


def _directory(netns: str | None) -> Path:
    return RUN_DIR / "owned" / (netns or "host")


def _record_path(netns: str | None, intent: str) -> Path:
    return _directory(netns) / f"{intent}.json"


def _namespace_inode(netns: str | None) -> int | None:
    try:
        return os.stat(path_of(netns) if netns else "/proc/self/ns/net").st_ino
    except OSError:
        return None


def recorded_tables(netns: str | None, intent: str) -> frozenset[int]:
    """The routing tables recorded for `intent` in this target (empty when there is no valid record)."""
    try:
        data = json.loads(_record_path(netns, intent).read_text())
    except (OSError, ValueError):
        return frozenset()
    if not isinstance(data, dict) or data.get("netns_inode") != _namespace_inode(netns):
        return frozenset()
    tables = data.get("routing_tables", [])
    return frozenset(t for t in tables if isinstance(t, int)) if isinstance(tables, list) else frozenset()


def recorded_intents(netns: str | None) -> list[str]:
    """The intents with a valid record in this target."""
    names = []
    for path in sorted(_directory(netns).glob("*.json")):
        if recorded_tables(netns, path.stem):
            names.append(path.stem)
    return names


def widen(netns: str | None, intent: str, tables: Iterable[int]) -> None:
    """Record `tables` as the intent's, besides what is recorded already: before they are written to."""
    wanted = frozenset(tables)
    known = recorded_tables(netns, intent)
    if wanted <= known:
        return
    _write(netns, intent, known | wanted)


def settle(netns: str | None, intent: str, tables: Iterable[int]) -> None:
    """The kernel was verified to hold exactly the intent's objects in `tables`: record just those
    (no table: no record)."""
    wanted = frozenset(tables)
    if wanted == recorded_tables(netns, intent) and (wanted or not _record_path(netns, intent).exists()):
        return
    if not wanted:
        with contextlib.suppress(FileNotFoundError):
            _record_path(netns, intent).unlink()
        with contextlib.suppress(OSError):
            _directory(netns).rmdir()
        return
    _write(netns, intent, wanted)


def _write(netns: str | None, intent: str, tables: frozenset[int]) -> None:
    path = _record_path(netns, intent)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"intent": intent, "netns": netns, "netns_inode": _namespace_inode(netns),
                       "routing_tables": sorted(tables)})
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, body.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
