"""What wakes the daemon: the intent file changing, kernel objects changing, and the debouncer in between.

This module owns the daemon's event sources. None of them carries state into
a pass: an event only says "look again" (`Debouncer.mark`), and the pass
re-reads the file and the kernel from scratch. That is why an event may be
lost, doubled or spurious without harm: a lost one is caught by the periodic
resync, a spurious one costs a pass that finds nothing to do.

- `Debouncer`: collects reasons and hands them to the worker once things have
  been quiet for a short delay, so a burst of saves is one pass over the
  newest content. A write in progress holds passes back until the writer
  closes the file, so a pass never reads half a file.
- `FileWatcher`: watchdog (inotify) on the directory that holds the file,
  because files are replaced far more often than written in place: editors
  save by rename, Kubernetes swaps a `..data` symlink, people delete and
  re-create. Events naming the file are taken as they come; any other event in
  the directory counts when what the path resolves to changed (device, inode,
  size, mtime), which is how a symlink swap shows.
- Kernel events come from `drivers/events.py` (`KernelEvents`): sockets on the
  kernel are a driver's business.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from compiler.errors import KernelError

log = logging.getLogger(__name__)


# --------------------------------------------------------------- debouncing
class Debouncer:
    """Reasons to run a pass, handed over once no new one has come for `delay` seconds.

    `max_wait` bounds how long a steady stream of events can put a pass off.
    `urgent` marks (a signal) skip the delay. `hold(seconds)` says a write is
    in progress: no pass until `release()` or until the hold runs out.
    """

    MAX_REASONS = 32

    def __init__(self, delay: float, max_wait: float = 1.0) -> None:
        self.delay = delay
        self.max_wait = max(max_wait, delay)
        self._cond = threading.Condition()
        self._reasons: dict[str, None] = {}
        self._first = 0.0
        self._last = 0.0
        self._urgent = False
        self._hold_until = 0.0

    def mark(self, reason: str, *, urgent: bool = False) -> None:
        with self._cond:
            now = time.monotonic()
            if not self._reasons:
                self._first = now
            if len(self._reasons) < self.MAX_REASONS:
                self._reasons[reason] = None
            self._last = now
            self._urgent |= urgent
            self._cond.notify_all()

    def hold(self, seconds: float) -> None:
        with self._cond:
            self._hold_until = time.monotonic() + seconds
            self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._hold_until = 0.0
            self._cond.notify_all()

    @property
    def pending(self) -> bool:
        with self._cond:
            return bool(self._reasons)

    def _due(self) -> float:
        if self._urgent:
            return 0.0
        return max(min(self._last + self.delay, self._first + self.max_wait), self._hold_until)

    def wait(self, timeout: float | None = None) -> tuple[str, ...]:
        """The reasons collected, once they are due; () when `timeout` passes with none pending."""
        end = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        with self._cond:
            while True:
                now = time.monotonic()
                if self._reasons:
                    due = self._due()
                    if now >= due:
                        reasons = tuple(self._reasons)
                        self._reasons.clear()
                        self._urgent = False
                        return reasons
                    pause: float | None = due - now
                elif end is not None and now >= end:
                    return ()
                else:
                    pause = None if end is None else end - now
                self._cond.wait(pause)


# ------------------------------------------------------------- the file
Fingerprint = tuple[int, int, int, int] | None


def fingerprint(path: Path) -> Fingerprint:
    """What `path` resolves to now (device, inode, size, mtime), or None when it does not resolve."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _DirectoryHandler(FileSystemEventHandler):
    def __init__(self, watcher: FileWatcher | DirectoryWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._watcher.handle(event)
        except Exception:  # never let the observer thread die: the resync would be all that is left
            log.exception("file watcher: error handling %s", event)


class FileWatcher:
    """Calls `on_change(reason)` when the file at `path` may hold something new, `on_writing()` while it is written.

    The file may be missing at start or at any time; its directory must exist.
    """

    EVENTS: list[type[FileSystemEvent]] = [
        FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent,
        DirCreatedEvent, DirDeletedEvent, DirMovedEvent,
    ]

    def __init__(self, path: Path, on_change: Callable[[str], None],
                 on_writing: Callable[[], None] | None = None) -> None:
        self.path = Path(os.path.abspath(path))
        self.directory = self.path.parent
        self.name = self.path.name
        self._on_change = on_change
        self._on_writing = on_writing or (lambda: None)
        self._last = fingerprint(self.path)
        self._target = os.path.realpath(self.path)
        self._lock = threading.Lock()
        self._observer: Observer | None = None  # type: ignore[valid-type]

    def start(self) -> None:
        if not self.directory.is_dir():
            raise KernelError(f"cannot watch {self.path}: the directory {self.directory} does not exist")
        observer = Observer()
        observer.schedule(_DirectoryHandler(self), str(self.directory), recursive=False, event_filter=self.EVENTS)
        # The file may be a symlink into another directory (not the ConfigMap kind, whose
        # target is a sibling directory that changes with every swap): watch there too.
        target_dir = Path(self._target).parent
        if target_dir not in (self.directory, self.directory.parent) and target_dir.parent != self.directory \
                and target_dir.is_dir():
            observer.schedule(_DirectoryHandler(self), str(target_dir), recursive=False, event_filter=self.EVENTS)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            # watchdog logs a harmless race between its reader and stop() as an error.
            logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _names_file(self, path: str | bytes) -> bool:
        text = os.path.abspath(os.fsdecode(path))
        return text == str(self.path) or text == self._target

    def handle(self, event: FileSystemEvent) -> None:
        """One directory event (called from watchdog's thread; public for tests)."""
        with self._lock:
            ours = self._names_file(event.src_path) or (
                isinstance(event, FileMovedEvent | DirMovedEvent) and self._names_file(event.dest_path)
            )
            self._target = os.path.realpath(self.path)
            now = fingerprint(self.path)
            changed = now != self._last
            self._last = now
        if ours and not event.is_directory:
            if isinstance(event, FileModifiedEvent):
                self._on_writing()
                return
            if isinstance(event, FileCreatedEvent) and not os.path.islink(self.path) and now is not None:
                # open(O_CREAT): the content follows, then a close; hold until then.
                self._on_writing()
                return
            what = {FileClosedEvent: "saved", FileCreatedEvent: "created", FileDeletedEvent: "deleted",
                    FileMovedEvent: "replaced"}.get(type(event), event.event_type)
            if isinstance(event, FileMovedEvent) and self._names_file(event.src_path) and now is None:
                what = "moved away"
            self._on_change(f"file {what}")
        elif changed:
            # A symlink swap (Kubernetes ..data), or the directory itself moved under us.
            self._on_change("file replaced" if now is not None else "file deleted")


# -------------------------------------------------------------- the directory
INTENT_SUFFIXES = (".yaml", ".yml")


class DirectoryWatcher:
    """Calls `on_change(reason)` when the intent files of `directory` may hold something new: a file added,
    changed, renamed or removed, or a Kubernetes ConfigMap swap (its hidden `..data` link renamed over), and
    `on_writing()` while a file is being written. Not recursive: only the directory's own entries count."""

    def __init__(self, directory: Path, on_change: Callable[[str], None],
                 on_writing: Callable[[], None] | None = None) -> None:
        self.directory = Path(os.path.abspath(directory))
        self._on_change = on_change
        self._on_writing = on_writing or (lambda: None)
        self._observer: Observer | None = None  # type: ignore[valid-type]

    def start(self) -> None:
        if not self.directory.is_dir():
            raise KernelError(f"cannot watch {self.directory}: it is not a directory")
        observer = Observer()
        observer.schedule(_DirectoryHandler(self), str(self.directory), recursive=False,
                          event_filter=FileWatcher.EVENTS)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _relevant(self, path: str | bytes) -> str | None:
        """The entry's name when it can change what the directory holds: an intent file, or a hidden entry
        (a ConfigMap's `..data` and its timestamped directories)."""
        full = os.path.abspath(os.fsdecode(path))
        if os.path.dirname(full) != str(self.directory):
            return None
        name = os.path.basename(full)
        return name if name.endswith(INTENT_SUFFIXES) or name.startswith(".") else None

    def handle(self, event: FileSystemEvent) -> None:
        """One directory event (called from watchdog's thread; public for tests)."""
        names = [self._relevant(event.src_path)]
        if isinstance(event, FileMovedEvent | DirMovedEvent):
            names.append(self._relevant(event.dest_path))
        name = next((n for n in names if n is not None), None)
        if name is None:
            return
        source = os.fsdecode(event.src_path)
        written = isinstance(event, FileModifiedEvent) or (
            isinstance(event, FileCreatedEvent) and not os.path.islink(source) and os.path.exists(source))
        if written and not event.is_directory and not name.startswith("."):
            self._on_writing()  # the content follows, then a close
            return
        what = {FileClosedEvent: "saved", FileCreatedEvent: "created", FileDeletedEvent: "deleted",
                FileMovedEvent: "renamed", DirMovedEvent: "renamed", DirCreatedEvent: "created",
                DirDeletedEvent: "deleted"}.get(type(event), event.event_type)
        self._on_change(f"file {name} {what}")
