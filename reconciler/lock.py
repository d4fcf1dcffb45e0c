"""One run at a time per (target, intent): `apply`, `destroy` and `watch` serialise on a lock file.

The lock is an exclusive flock on /run/kernform/<netns or host>-<intent>.lock
(KERNFORM_RUN_DIR overrides the directory). The file says who holds it
(`<pid> <kind>`, kind `apply`, `destroy` or `watch`), so a waiting run can say
whom it waits for, and a CLI run refuses at once an intent a `kernform watch`
keeps (the daemon would undo it). A daemon publishes each intent's health
next to its lock (`<lock>.status`, read by `kernform status`).

No file is left behind: the holder unlinks the lock file (and its status)
while it still holds the flock, and whoever acquires a flock checks that the
path still names the file it locked, else it starts over on the new file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compiler.errors import KernelError, KernformError

RUN_DIR = Path(os.environ.get("KERNFORM_RUN_DIR", "/run/kernform"))


class LockHeld(KernformError):
    """Another kernform run holds the intent's lock on this target."""

    def __init__(self, message: str, holder_kind: str) -> None:
        super().__init__(message)
        self.holder_kind = holder_kind


def lock_path(run_dir: Path, netns: str | None, intent: str) -> Path:
    return run_dir / f"{netns or 'host'}-{intent}.lock"


class IntentLock:
    """The exclusive lock of one intent on one target, held by one run (`kind`)."""

    def __init__(self, run_dir: Path, netns: str | None, intent: str, kind: str = "watch") -> None:
        self.path = lock_path(run_dir, netns, intent)
        self.intent = intent
        self.kind = kind
        self._fd: int | None = None
        self._published: dict[str, Any] | None = None

    def acquire(self, wait: Callable[[int | None, str], bool] | None = None) -> None:
        """Take the lock. When it is held, `wait(holder pid, holder kind)` says whether to wait for it (it may
        say so to the user); without `wait`, or when it says no, LockHeld is raised."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise KernelError(f"cannot lock {self.path}: {exc.strerror}") from None
                    pid, kind = _holder(fd)
                    if wait is None or not wait(pid, kind):
                        who = f"kernform {kind}" + (f" (pid {pid})" if pid else "")
                        what = "already manages" if kind == "watch" else "is changing"
                        raise LockHeld(f"another {who} {what} intent {self.intent} on this target "
                                       f"(lock {self.path})", kind) from None
                    fcntl.flock(fd, fcntl.LOCK_EX)
                if not _same_file(fd, self.path):
                    os.close(fd)  # the holder removed it as we waited: lock the current file instead
                    continue
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {self.kind}\n".encode(), 0)
            self._fd = fd
            return

    def publish(self, record: dict[str, Any]) -> None:
        """Write the daemon's view of the intent to <lock>.status when it changed (atomically)."""
        if record == self._published or self._fd is None:
            return
        status = self.path.with_suffix(".status")
        with contextlib.suppress(OSError):
            temporary = status.with_suffix(".status.tmp")
            temporary.write_text(json.dumps({**record, "updated": time.time()}) + "\n")
            os.replace(temporary, status)
            self._published = record

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlinked while still held: a run waiting on this file sees it is gone and locks a new one.
        with contextlib.suppress(OSError):
            self.path.with_suffix(".status").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            if _same_file(self._fd, self.path):
                self.path.unlink()
        os.close(self._fd)
        self._fd = None


def _holder(fd: int) -> tuple[int | None, str]:
    """(pid, kind) the holder wrote in the lock file (an older daemon wrote only its pid); nothing yet when it
    has just taken the lock: a run, waited for like one of the CLI."""
    with contextlib.suppress(OSError, ValueError):
        words = os.pread(fd, 64, 0).decode().split()
        if words:
            return int(words[0]), words[1] if len(words) > 1 else "watch"
    return None, "run"


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
