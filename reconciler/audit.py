"""The audit trail: who changed which intent's kernel state, why, to what, and how it ended.

Every apply, destroy and repair that changes the kernel (or tries to and fails)
leaves one record: who (uid, user, login uid, sudo user, pid, command line),
the trigger (a CLI command, or the daemon's file/kernel/resync/signal pass),
the intent, its target, the sha256 of the intent file it came from, the actions
and the result. A run that finds nothing to change leaves none: a daemon
resyncing every 30 s would bury the changes in no-ops.

Each record goes to three places, so that it survives whichever one a host
lacks: the `kernform.audit` logger (the daemon's JSON or text log), the systemd
journal (native protocol, fields KERNFORM_*; skipped where there is no
journal), and an append-only JSON-lines file, `/var/log/kernform/audit.jsonl`
by default (KERNFORM_AUDIT_LOG names another; an empty value turns the file
off). An audit record that cannot be written is a warning, never a failed
apply: the kernel change has happened by then and must be reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pwd
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .log import event

log = logging.getLogger("kernform.audit")

DEFAULT_FILE = "/var/log/kernform/audit.jsonl"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
LOGGED_ACTIONS = 100


@dataclass(frozen=True)
class Cause:
    """Why kernform is changing the kernel: the command or daemon trigger, and the intent's source."""

    trigger: str = "api"  # "cli", or the daemon's pass trigger: "file", "kernel", "resync", "signal", "retry", "prune"
    source: str | None = None  # the intent file
    sha256: str | None = None  # of the intent file's text
    command: tuple[str, ...] = field(default_factory=lambda: tuple(sys.argv))

    @classmethod
    def of_text(cls, trigger: str, source: str | None, text: str | None) -> Cause:
        digest = hashlib.sha256(text.encode()).hexdigest() if text is not None else None
        return cls(trigger, source, digest)


def who() -> dict[str, Any]:
    """The identity behind this process, as far as the kernel and the environment tell."""
    uid = os.getuid()
    identity: dict[str, Any] = {"uid": uid, "pid": os.getpid()}
    with contextlib.suppress(KeyError):
        identity["user"] = pwd.getpwuid(uid).pw_name
    with contextlib.suppress(OSError, ValueError):
        login = int(Path("/proc/self/loginuid").read_text().strip())
        if login != 0xFFFFFFFF:  # unset: no login session (a service, a container)
            identity["login_uid"] = login
    if os.environ.get("SUDO_USER"):
        identity["sudo_user"] = os.environ["SUDO_USER"]
    if os.environ.get("SSH_CONNECTION"):
        identity["ssh_connection"] = os.environ["SSH_CONNECTION"]
    return identity


def record(verb: str, intent: str, target: str, cause: Cause | None, actions: list[dict[str, str]],
           result: str, error: str | None = None, operations: int | None = None) -> dict[str, Any]:
    """Write one audit record (see the module docstring) and return it."""
    cause = cause or Cause()
    entry: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "verb": verb,  # apply, destroy or repair
        "intent": intent,
        "target": target,
        "result": result,  # applied, destroyed, repaired or failed
        "trigger": cause.trigger,
        "command": list(cause.command),
        "source": cause.source,
        "intent_sha256": cause.sha256,
        "who": who(),
        "actions": actions,
    }
    if operations is not None:
        entry["operations"] = operations
    if error is not None:
        entry["error"] = error
    summary = (f"audit: {verb} of intent {intent} on {target} {result} "
               f"({len(actions)} actions, trigger {cause.trigger}, uid {entry['who']['uid']})")
    shown = dict(entry, actions=actions[:LOGGED_ACTIONS])
    if len(actions) > LOGGED_ACTIONS:
        shown["actions_not_shown"] = len(actions) - LOGGED_ACTIONS  # the file and the journal hold them all
    event(log, logging.WARNING if result == "failed" else logging.INFO, summary, audit=shown)
    _to_file(entry)
    _to_journal(entry, summary)
    return entry


def _to_file(entry: dict[str, Any]) -> None:
    path = os.environ.get("KERNFORM_AUDIT_LOG", DEFAULT_FILE)
    if not path:
        return
    line = json.dumps(entry, separators=(",", ":"), default=str) + "\n"
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        # O_APPEND: concurrent runs interleave whole lines, never parts of them.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("audit record not written to %s: %s", path, exc)


def _to_journal(entry: dict[str, Any], summary: str) -> None:
    address = os.environ.get("KERNFORM_JOURNAL_SOCKET", JOURNAL_SOCKET)
    if not address or not os.path.exists(address):
        return
    fields = {
        "MESSAGE": summary,
        "PRIORITY": "4" if entry["result"] == "failed" else "6",
        "SYSLOG_IDENTIFIER": "kernform",
        "KERNFORM_AUDIT": json.dumps(entry, separators=(",", ":"), default=str),
        "KERNFORM_VERB": entry["verb"],
        "KERNFORM_INTENT": entry["intent"],
        "KERNFORM_TARGET": entry["target"],
        "KERNFORM_RESULT": entry["result"],
        "KERNFORM_TRIGGER": entry["trigger"],
        "KERNFORM_INTENT_SHA256": entry["intent_sha256"] or "",
    }
    payload = bytearray()
    for key, value in fields.items():
        data = value.encode()
        if b"\n" in data:
            # The native protocol's binary-safe form: name, newline, 64-bit little-endian length, data.
            payload += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            payload += key.encode() + b"=" + data + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(bytes(payload), address)
    except OSError as exc:
        log.warning("audit record not sent to the journal (%s): %s", address, exc)
