"""`kernform watch`: continuous reconciliation of one intent file into one network namespace.

The loop re-reads everything on every pass and remembers nothing it needs to
converge: a file event, a kernel event, a signal or the periodic resync only
marks the state dirty (`watchers.Debouncer`); the worker thread then loads the
file, compiles it, observes the kernel, diffs and applies. A fresh process
with the same file reaches the same state.

What the daemon keeps between passes is only what makes it safe and cheap
(besides the drivers' last observation, see observe.Target.forget):
- the last good desired state: while the file is invalid or missing, the
  kernel keeps exactly what it holds, and drift is repaired towards that
  last good state; nothing is ever removed because a file went bad;
- the compiled desired state keyed by the file's bytes and the backend, so a
  pass woken by the kernel or the resync does not parse and compile again;
- one `Target` (the drivers and their sockets) for its whole life, created in
  the worker thread, the only thread that may use it.

Threads: the main thread handles signals and waits; the worker runs passes;
watchdog's observer thread and the kernel event thread only mark the
debouncer; prometheus-client serves /metrics from its own thread.

One daemon per (namespace, intent): a flock on
/run/kernform/<netns or host>-<intent>.lock, taken as soon as the intent's
name is known (a second daemon is refused and exits 1).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from compiler import compile_intent
from compiler.errors import ApplyError, BackendUnavailable, IntentError, KernelError, KernformError, Problem
from compiler.loader import parse_text
from compiler.objects import DesiredState, count_by_kind, nft_table_name

from .applied import allocate_slots, applied_conflicts
from .apply import apply, make_plan
from .drivers.events import KernelEvents, WatchScope
from .log import event
from .metrics import DaemonMetrics
from .netns import path_of
from .observe import Target
from .plan import Action, Plan
from .watchers import Debouncer, FileWatcher

log = logging.getLogger("kernform.watch")

RUN_DIR = Path(os.environ.get("KERNFORM_RUN_DIR", "/run/kernform"))
ACTIONS_LOGGED = 50
START_QUIET = 0.1  # seconds: a file changed more recently than this at start may still be being written


@dataclass(frozen=True)
class WatchSettings:
    file: Path
    backend: str | None = None
    netns: str | None = None
    resync: float = 30.0  # seconds between full passes without any event
    debounce: float = 0.03  # quiet time after the last event before a pass
    settle: float = 1.0  # longest wait for a writer to close the file
    metrics: str | None = None  # ADDR for the Prometheus endpoint
    run_dir: Path = RUN_DIR
    retry_min: float = 0.5
    retry_max: float = 30.0


class LockHeld(KernformError):
    """Another daemon already manages this intent in this namespace: stop one of them."""


class IntentLock:
    """An exclusive flock on /run/kernform/<target>-<intent>.lock, held for the daemon's life."""

    def __init__(self, run_dir: Path, netns: str | None, intent: str) -> None:
        self.path = run_dir / f"{netns or 'host'}-{intent}.lock"
        self.intent = intent
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockHeld(f"another kernform watch{holder} already manages intent {self.intent} "
                               f"on this target (lock {self.path})") from None
            raise KernelError(f"cannot lock {self.path}: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (unlinking it races with others)
            self._fd = None


def _name_this_thread(name: str) -> None:
    """Set the calling thread's comm: the kernel names it in every nft transaction the thread commits."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def _namespace_identity(netns: str | None) -> tuple[int, int] | None:
    """Which namespace the name stands for now (device and inode of its nsfs file); None for the host or a missing one."""
    if netns is None:
        return None
    try:
        st = os.stat(path_of(netns))
    except (OSError, KernelError):
        return None
    return (st.st_dev, st.st_ino)


@dataclass
class _Loaded:
    """The file as last read: its bytes' digest, and what they compiled to (or the problems found)."""

    digest: str | None
    desired: DesiredState | None = None
    problems: str | None = None


def _trigger(reasons: tuple[str, ...]) -> str:
    kinds = [r.split(" ", 1)[0] for r in reasons]
    for kind in ("signal", "file", "namespace", "start", "retry", "resync"):
        if kind in kinds:
            return kind
    return "kernel" if reasons else "resync"


def action_fields(actions: tuple[Action, ...]) -> dict[str, Any]:
    shown = [{"op": a.op, "kind": a.kind, "key": a.key.name, "origin": a.origin} for a in actions[:ACTIONS_LOGGED]]
    fields: dict[str, Any] = {"actions": shown}
    if len(actions) > ACTIONS_LOGGED:
        fields["actions_not_shown"] = len(actions) - ACTIONS_LOGGED
    return fields


@dataclass
class _State:
    converged: DesiredState | None = None  # the last desired state the kernel was verified to hold
    last_good: DesiredState | None = None  # the last desired state the file compiled to
    loaded: _Loaded = field(default_factory=lambda: _Loaded(None))
    degraded_because: str | None = None
    failures: int = 0
    retry_at: float | None = None


class Daemon:
    def __init__(self, settings: WatchSettings, metrics: DaemonMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or DaemonMetrics()
        self.debouncer = Debouncer(settings.debounce, max_wait=max(1.0, 10 * settings.debounce))
        self.thread_name = f"kfw-{secrets.token_hex(4)}"  # unique: nft events committed under it are ours
        self._stop = threading.Event()
        self._state = _State()
        self._scope = WatchScope()
        self._locks: dict[str, IntentLock] = {}
        self._target: Target | None = None
        self._netlink_ports: frozenset[int] = frozenset()  # read by the event thread
        self._exit_code = 0
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------- lifecycle
    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or a fatal error); returns the exit status. Call from the main thread."""
        settings = self.settings
        if settings.metrics:
            host, port = self.metrics.serve(settings.metrics)
            event(log, logging.INFO, f"metrics endpoint on http://{host}:{port}/metrics", metrics=f"{host}:{port}")
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        watcher = FileWatcher(settings.file, self._on_file_change, self._on_file_writing)
        namespace_watcher = None
        if settings.netns:
            # A deleted or re-created namespace wakes the worker, which then reopens its sockets there.
            namespace_watcher = FileWatcher(path_of(settings.netns), self._on_namespace_change,
                                            lambda: self._on_namespace_change("file created"))
        try:
            watcher.start()
            if namespace_watcher is not None:
                try:
                    namespace_watcher.start()
                except KernelError as exc:
                    log.warning("not watching for the namespace to be re-created: %s", exc)
                    namespace_watcher = None
            self._worker = threading.Thread(target=self._work, name="kernform-worker")
            self._worker.start()
            while self._worker.is_alive():
                self._worker.join(timeout=0.5)
        finally:
            self._stop.set()
            self.debouncer.mark("stop", urgent=True)
            if self._worker is not None:
                self._worker.join()
            watcher.stop()
            if namespace_watcher is not None:
                namespace_watcher.stop()
            self.metrics.close()
            for lock in self._locks.values():
                lock.release()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self._exit_code

    def stop(self) -> None:
        self._stop.set()
        self.debouncer.mark("stop", urgent=True)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.metrics.events.labels("signal").inc()
        if signum == signal.SIGHUP:
            event(log, logging.INFO, "SIGHUP: a pass is forced", signal=name)
            self.debouncer.mark("signal SIGHUP", urgent=True)
            return
        event(log, logging.INFO, f"{name}: stopping; the applied state stays in the kernel", signal=name)
        self.stop()

    def _on_file_change(self, what: str) -> None:
        self.metrics.events.labels("file").inc()
        self.debouncer.release()
        self.debouncer.mark(what)

    def _on_file_writing(self) -> None:
        self.metrics.events.labels("file").inc()
        self.debouncer.hold(self.settings.settle)
        self.debouncer.mark("file written")

    def _on_namespace_change(self, what: str) -> None:
        self.metrics.events.labels("namespace").inc()
        self.debouncer.mark(what.replace("file", f"namespace {self.settings.netns}", 1))

    def _on_kernel_event(self, what: str) -> None:
        self.metrics.events.labels("kernel").inc()
        log.debug("kernel event: %s", what)
        self.debouncer.mark(f"kernel {what}")

    def _own_ports(self) -> frozenset[int]:
        return self._netlink_ports

    # ---------------------------------------------------------------- worker
    def _work(self) -> None:
        _name_this_thread(self.thread_name)
        try:
            # Never a first write from half a file: if it changed a moment ago, a writer may still be
            # at it; its next write or close extends or ends the hold, as for any later write.
            with contextlib.suppress(OSError):
                if time.time() - self.settings.file.stat().st_mtime < START_QUIET:
                    self.debouncer.hold(START_QUIET)
            self.debouncer.mark("start")
            reasons: tuple[str, ...] = self.debouncer.wait()
            while not self._stop.is_set():
                self._session(reasons)
                reasons = ("start after the namespace was re-created",)
        except Exception:
            log.exception("the worker failed; stopping")
            self._exit_code = 1
        finally:
            self._stop.set()

    def _session(self, reasons: tuple[str, ...]) -> None:
        """Passes against one incarnation of the target namespace; returns on stop or when the namespace is gone."""
        identity = _namespace_identity(self.settings.netns)
        target = self._open_target()
        if target is None:
            return
        events: KernelEvents | None = None
        try:
            self._target = target
            self._netlink_ports = frozenset({target.netlink.portid()})
            # Subscribe before the first observation, so nothing changed after it goes unseen.
            events = KernelEvents(self.settings.netns, self._on_kernel_event, lambda: self._scope,
                                  self._own_ports, frozenset({self.thread_name}))
            events.start()
            event(log, logging.INFO, f"watching {self.settings.file} for {target.label}",
                  file=str(self.settings.file), target=target.label, backend=self.settings.backend or "from file",
                  resync_seconds=self.settings.resync, debounce_ms=round(self.settings.debounce * 1000, 1))
            self._loop(target, reasons, identity)
        finally:
            if events is not None:
                events.stop()
            self._target = None
            target.close()

    def _open_target(self) -> Target | None:
        delay = self.settings.retry_min
        while not self._stop.is_set():
            try:
                return Target(self.settings.netns)
            except KernelError as exc:
                self._set_degraded(f"cannot reach the target: {exc}")
                event(log, logging.ERROR, f"cannot reach the target, retrying in {delay:.1f} s: {exc}",
                      retry_seconds=delay)
                self.debouncer.wait(delay)  # or sooner: the namespace appearing marks the debouncer
                delay = min(delay * 2, self.settings.retry_max)
        return None

    def _loop(self, target: Target, reasons: tuple[str, ...], identity: tuple[int, int] | None) -> None:
        while not self._stop.is_set():
            if _namespace_identity(self.settings.netns) != identity:
                # Our sockets would keep reconciling a namespace nobody can reach any more.
                self._set_degraded(f"network namespace {self.settings.netns} was deleted or re-created")
                return
            self._pass(target, reasons)
            if self._stop.is_set():
                return
            now = time.monotonic()
            wake = now + self.settings.resync
            if self._state.retry_at is not None:
                wake = min(wake, self._state.retry_at)
            reasons = self.debouncer.wait(wake - now)
            if self._stop.is_set():
                return
            if not reasons:
                retrying = self._state.retry_at is not None and time.monotonic() >= self._state.retry_at - 0.001
                reasons = ("retry",) if retrying else ("resync",)

    # ------------------------------------------------------------------ pass
    def _pass(self, target: Target, reasons: tuple[str, ...]) -> None:
        trigger = _trigger(reasons)
        self.metrics.passes.labels(trigger).inc()
        started = time.perf_counter()
        try:
            self._reconcile(target, reasons, trigger, started)
        except LockHeld as exc:
            if self._state.converged is None and not self._locks:
                # Refused at start: this daemon never managed anything.
                event(log, logging.ERROR, str(exc), lock="held")
                self._exit_code = 1
                self._stop.set()
                return
            self._failed(str(exc), started)
        except ApplyError as exc:
            residual = exc.residual if isinstance(exc.residual, Plan) else None
            fields = action_fields(residual.actions) if residual is not None else {}
            self._failed(f"apply failed and the previous state was restored: {exc}", started, **fields)
        except KernelError as exc:
            self._failed(f"kernel error, the previous state was kept: {exc}", started)
        except KernformError as exc:
            self._failed(str(exc), started)
        except Exception as exc:  # a bug: keep the daemon alive and the kernel as it is
            log.exception("pass failed with an internal error")
            self._failed(f"internal error: {exc!r}", started)
        finally:
            self.metrics.pass_duration.observe(time.perf_counter() - started)

    def _reconcile(self, target: Target, reasons: tuple[str, ...], trigger: str, started: float) -> None:
        state = self._state
        desired, problem = self._load(target)
        if desired is not None:
            state.last_good = desired
        else:
            desired = state.last_good
        if desired is None:
            # Never a write before the whole desired state is known: with no valid file yet, touch nothing.
            self._set_degraded(problem or "no valid intent yet")
            return
        self._lock(desired.intent)
        self._scope = WatchScope(nft_table_name(desired.intent), desired.routing_tables,
                                 links_and_addresses=desired.backend == "ebpf")
        self.metrics.info.clear()
        self.metrics.info.labels(desired.intent, target.label, desired.backend).set(1)
        self.metrics.desired_objects.set(len(desired.objects))
        if {r.split(" ", 1)[0] for r in reasons} != {"file"}:
            # Drift, a resync, a signal or a retry: read every object again. A pass for a changed
            # file may diff against what the last pass verified (BPF map entries; nft only while
            # the ruleset generation is unchanged), which is what keeps it fast.
            target.forget()
        plan, observed = make_plan(target, desired)
        repair = state.converged is not None and desired == state.converged
        if not plan.empty:
            counts = plan.counts()
            result = apply(target, desired, plan, observed)
            for action in plan.actions:
                self.metrics.applied_actions.labels(action.op, action.kind).inc()
                if repair:
                    self.metrics.drift_repairs.labels(action.kind).inc()
            what = "drift repaired" if repair else "applied"
            event(log, logging.WARNING if repair else logging.INFO,
                  f"{what}: {counts['add']} added, {counts['change']} changed, {counts['remove']} removed "
                  f"on {target.label}",
                  pass_result="repaired" if repair else "applied", intent=desired.intent, trigger=trigger,
                  reasons=list(reasons), operations=result.operations,
                  duration_ms=round((time.perf_counter() - started) * 1000, 1), **counts,
                  **action_fields(plan.actions))
        else:
            event(log, logging.DEBUG if trigger in ("resync", "kernel") else logging.INFO,
                  f"in sync: intent {desired.intent} on {target.label}", pass_result="in-sync",
                  intent=desired.intent, trigger=trigger, reasons=list(reasons),
                  duration_ms=round((time.perf_counter() - started) * 1000, 1))
        state.converged = desired
        state.failures = 0
        state.retry_at = None
        self.metrics.succeeded()
        if problem is None:
            self._set_healthy()
        else:
            self._set_degraded(problem)

    def _load(self, target: Target) -> tuple[DesiredState | None, str | None]:
        """The desired state of the file as it is now, or (None, the problem)."""
        path = self.settings.file
        state = self._state
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            state.loaded = _Loaded(None)
            self.metrics.file_valid.set(0)
            return None, (f"{path} does not exist; the kernel keeps the last applied state "
                          "(only `kernform destroy` removes it)")
        except OSError as exc:
            state.loaded = _Loaded(None)
            self.metrics.file_valid.set(0)
            return None, f"{path}: cannot read the file: {exc.strerror or exc}"
        digest = hashlib.sha256(data + f"\0{self.settings.backend}".encode()).hexdigest()
        if digest != state.loaded.digest:
            state.loaded = self._compile(data, digest, target)
        loaded = state.loaded
        self.metrics.file_valid.set(1 if loaded.desired is not None else 0)
        if loaded.desired is None:
            return None, loaded.problems
        return loaded.desired, None

    def _compile(self, data: bytes, digest: str, target: Target) -> _Loaded:
        name = str(self.settings.file)
        try:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise IntentError([Problem(name, 1, 1, f"the file is not UTF-8 text: {exc.reason}")]) from None
            loaded = parse_text(text, name)
            # Its interception slot: the one recorded in the kernel, or the lowest free one (compiler.allocation).
            slots = allocate_slots(target, [loaded], self.settings.backend)
            try:
                desired = compile_intent(loaded.intent, self.settings.backend, slots.get(loaded.intent.metadata.name, 0))
            except BackendUnavailable as refused:
                # What the backend refuses is the file's to fix: reported like any invalid file, at FILE:LINE:COL.
                raise IntentError(loaded.problems_at(refused.findings)) from None
            # A collision with another intent applied in the target is the file's to fix too: the other
            # intent's objects are never replaced by this one's.
            collisions = applied_conflicts(target, [(loaded, desired)], slots)
            if collisions:
                raise IntentError(collisions)
        except IntentError as exc:
            event(log, logging.ERROR, f"invalid intent file, the kernel keeps the last applied state:\n{exc}",
                  file=name, problems=[str(p) for p in exc.problems])
            return _Loaded(digest, None, f"invalid intent file ({len(exc.problems)} problems)")
        except KernformError as exc:
            event(log, logging.ERROR, f"cannot compile {name}, the kernel keeps the last applied state: {exc}",
                  file=name)
            return _Loaded(digest, None, f"cannot compile: {exc}")
        counts = count_by_kind(desired.objects)
        event(log, logging.INFO, f"loaded {name}: intent {desired.intent}, {len(desired.objects)} kernel objects",
              file=name, intent=desired.intent, backend=desired.backend, objects=dict(counts))
        return _Loaded(digest, desired)

    def _lock(self, intent: str) -> None:
        if intent in self._locks:
            return
        lock = IntentLock(self.settings.run_dir, self.settings.netns, intent)
        lock.acquire()
        if self._locks:
            event(log, logging.WARNING,
                  f"the intent's name changed to {intent}; the state of {', '.join(self._locks)} stays in the "
                  f"kernel until `kernform destroy --intent NAME`", intent=intent)
        self._locks[intent] = lock

    # ----------------------------------------------------------------- health
    def _failed(self, message: str, started: float, **fields: Any) -> None:
        state = self._state
        state.failures += 1
        delay = min(self.settings.retry_min * 2 ** (state.failures - 1), self.settings.retry_max)
        state.retry_at = time.monotonic() + delay
        self.metrics.failed_passes.inc()
        event(log, logging.ERROR, f"pass failed: {message}; retrying in {delay:.1f} s", pass_result="failed",
              retry_seconds=delay, duration_ms=round((time.perf_counter() - started) * 1000, 1), **fields)
        self._set_degraded(message)

    def _set_degraded(self, reason: str) -> None:
        self.metrics.degraded.set(1)
        if self._state.degraded_because != reason:
            self._state.degraded_because = reason
            event(log, logging.WARNING, f"degraded: {reason}", health="degraded", reason=reason)

    def _set_healthy(self) -> None:
        self.metrics.degraded.set(0)
        if self._state.degraded_because is not None:
            self._state.degraded_because = None
            event(log, logging.INFO, "healthy: the kernel holds the current file", health="ok")
