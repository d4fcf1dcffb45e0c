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
  under the same name does not inherit the old one's record (which is
  dropped when read). A process running inside the namespace it manages
  (no --netns) keys its records by that namespace's inode.

Observation reads the union of both records; `destroy` removes the file last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .lock import RUN_DIR
from .netns import path_of

log = logging.getLogger("kernform.ownership")


def _directory(netns: str | None) -> Path:
    if netns:
        return RUN_DIR / "owned" / netns
    # The namespace this process runs in (the host's, or a pod's when kernform runs inside one): several
    # of those share no name, so their inode tells them apart.
    return RUN_DIR / "owned" / f"self-{_namespace_inode(None)}"


def _record_path(netns: str | None, intent: str) -> Path:
    return _directory(netns) / f"{intent}.json"


def _namespace_inode(netns: str | None) -> int | None:
    try:
        return os.stat(path_of(netns) if netns else "/proc/self/ns/net").st_ino
    except OSError:
        return None


def _read(netns: str | None, intent: str) -> dict[str, Any] | None:
    """The intent's record in this target, None when there is no valid one."""
    try:
        data = json.loads(_record_path(netns, intent).read_text())
    except (OSError, ValueError):
        return None
    current = _namespace_inode(netns)
    if not isinstance(data, dict) or data.get("netns_inode") != current:
        if current is not None:
            # The record of a namespace that is gone (this name now stands for another one): drop it.
            with contextlib.suppress(OSError):
                _record_path(netns, intent).unlink()
        return None
    return data


def recorded_tables(netns: str | None, intent: str) -> frozenset[int]:
    """The routing tables recorded for `intent` in this target (empty when there is no valid record)."""
    tables = (_read(netns, intent) or {}).get("routing_tables", [])
    return frozenset(t for t in tables if isinstance(t, int)) if isinstance(tables, list) else frozenset()


def recorded_claims(netns: str | None, intent: str) -> dict[str, Any]:
    """What the intent declared it takes when it was applied (reconciler.applied reads it), {} if unknown."""
    claims = (_read(netns, intent) or {}).get("claims")
    return claims if isinstance(claims, dict) else {}


def recorded_intents(netns: str | None) -> list[str]:
    """The intents with a valid record in this target."""
    return [path.stem for path in sorted(_directory(netns).glob("*.json")) if _read(netns, path.stem) is not None]


def widen(netns: str | None, intent: str, tables: Iterable[int]) -> None:
    """Record `tables` as the intent's, besides what is recorded already: before they are written to."""
    wanted = frozenset(tables)
    known = recorded_tables(netns, intent)
    if wanted <= known:
        return
    _write(netns, intent, known | wanted)


def record_claims(netns: str | None, intent: str, claims: dict[str, Any]) -> None:
    """Keep what the applied intent takes (its interception rules, its cgroup) for later applies of
    other intents to check against; written after a verified apply."""
    record = _read(netns, intent)
    if record is not None and record.get("claims") == claims:
        return
    _write(netns, intent, recorded_tables(netns, intent), claims)


def settle(netns: str | None, intent: str, tables: Iterable[int], destroyed: bool = False) -> None:
    """The kernel was verified to hold exactly the intent's objects in `tables`: record just those. After
    a destroy (`destroyed`) the record goes altogether."""
    wanted = frozenset(tables)
    path = _record_path(netns, intent)
    if not path.parent.is_dir():
        if wanted:
            _write(netns, intent, wanted)
        return
    if destroyed or (not wanted and not recorded_claims(netns, intent)):
        # The record and any temporary file of an earlier run killed before its rename.
        for stale in [path, *path.parent.glob(f".{path.name}.*")]:
            with contextlib.suppress(OSError):
                stale.unlink()
        with contextlib.suppress(OSError):
            path.parent.rmdir()
        return
    if wanted != recorded_tables(netns, intent):
        _write(netns, intent, wanted)


def _write(netns: str | None, intent: str, tables: frozenset[int], claims: dict[str, Any] | None = None) -> None:
    """Write the record (atomically); without `claims`, the recorded ones are kept."""
    if claims is None:
        claims = recorded_claims(netns, intent)
    try:
        _write_record(netns, intent, tables, claims)
    except OSError as exc:
        # The nft table keeps the first record; without this one, only a flushed ruleset or a run killed
        # before its nft transaction can hide the intent's routes from a fresh process.
        log.warning("ownership record of intent %s not written under %s: %s", intent, RUN_DIR / "owned", exc)


def _write_record(netns: str | None, intent: str, tables: frozenset[int], claims: dict[str, Any]) -> None:
    path = _record_path(netns, intent)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary file of an earlier run killed before its rename (runs of one intent are serialised by
    # its lock, so none of these is being written now).
    for stale in path.parent.glob(f".{path.name}.*"):
        with contextlib.suppress(OSError):
            stale.unlink()
    body = json.dumps({"intent": intent, "netns": netns, "netns_inode": _namespace_inode(netns),
                       "routing_tables": sorted(tables), **({"claims": claims} if claims else {})})
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, body.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
