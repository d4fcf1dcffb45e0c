"""`kernform watch`: continuous reconciliation of an intent file, or of every intent of a directory, into one
network namespace.

A directory (GitOps, a mounted ConfigMap) is read as the CLI reads one
(compiler.loader.expand_inputs: `*.yaml`/`*.yml`, sorted, hidden entries
skipped, several documents per file): every intent in it is kept applied,
intent by intent, each apply atomic and verified. A file that turns invalid
keeps its intents at their last good state; an intent that conflicts with
another (compiler.conflicts, reconciler.applied) is not applied and keeps its
last good state; an intent whose file or document is gone is left in place,
or destroyed with `--prune` (the intents the daemon manages are recorded in
/run/kernform/<target>-dir-<hash>.intents, so a restart still knows them). A
ConfigMap's `..data` swap is one event, hence one pass.

The loop re-reads everything on every pass and remembers nothing it needs to
converge: a file event, a kernel event, a signal or the periodic resync only
marks the state dirty (`watchers.Debouncer`); the worker thread then loads the
file, compiles it, observes the kernel, diffs and applies. A fresh process
with the same file reaches the same state.

What the daemon keeps between passes is only what makes it safe and cheap
(besides the drivers' last observation, see observe.Target.forget):
- per intent, the last good desired state: while the file is invalid or missing, the
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
name is known (a second daemon is refused and exits 1); and one per
(namespace, directory), a flock taken at start.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from compiler import compile_intent
from compiler.allocation import in_target
from compiler.conflicts import claims_record
from compiler.conflicts import find as find_conflicts
from compiler.errors import ApplyError, BackendUnavailable, IntentError, KernelError, KernformError, Problem
from compiler.loader import MAX_FILE_BYTES, LoadedIntent, parse_text, read_intent_bytes, split_documents
from compiler.objects import (
    BPF_KINDS,
    BpfMapEntry,
    DesiredState,
    KernelObject,
    ObjectKey,
    count_by_kind,
    nft_table_name,
)

from . import collector, ownership
from .applied import allocate_slots, applied_conflicts
from .apply import apply, complete, destroy, make_plan
from .audit import Cause
from .drivers.events import KernelEvents, WatchScope
from .lock import RUN_DIR, IntentLock, LockHeld
from .log import event
from .metrics import DaemonMetrics
from .netns import path_of
from .observe import Target
from .plan import Action, Plan, diff
from .watchers import INTENT_SUFFIXES, Debouncer, DirectoryWatcher, FileWatcher

log = logging.getLogger("kernform.watch")

ACTIONS_LOGGED = 50
START_QUIET = 0.1  # seconds: a file changed more recently than this at start may still be being written
ENTRY_CHECK_SHARE = 20  # the BPF map-entry check waits 20x its own duration: at most 5% of a CPU


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
    prune: bool = False  # a directory's intent whose file or document is gone is destroyed (else left in place)
    bpf_check: float = 0.5  # seconds between reads of the ebpf intents' BPF state (0: only at passes)


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
class _Source:
    """One input file as last read: its bytes' digest and the intents it holds, or why it holds none now."""

    digest: str | None
    intents: tuple[LoadedIntent, ...] = ()
    problems: str | None = None  # the file is missing, unreadable or invalid: its intents keep their last good state


@dataclass
class _Intent:
    """What the daemon knows of one intent of its inputs."""

    file: str  # the file it comes from
    last_good: DesiredState | None = None  # the last desired state it compiled to
    converged: DesiredState | None = None  # the last desired state the kernel was verified to hold
    problem: str | None = None  # why its file's current version is not applied (invalid, refused, conflicting)


@dataclass
class _Checked:
    """The inputs' intents checked together (slots, conflicts, compiled), for one version of every file."""

    signature: tuple[tuple[str, str | None], ...]
    desired: dict[str, DesiredState]
    problems: dict[str, str]  # intent -> why it is not applied as its file says


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
        self._next_entry_check = 0.0  # when the BPF drift check next reads map entries (monotonic)
        self._directory = settings.file.is_dir()
        self._sources: dict[str, _Source] = {}
        self._intents: dict[str, _Intent] = {}
        self._checked: _Checked | None = None
        self._left_in_place: set[str] = set()  # gone intents already reported as left in place
        self._announced: dict[tuple[str, str], object] = {}  # what was last logged per intent (see _announce)
        self._scope = WatchScope()
        self._locks: dict[str, IntentLock] = {}
        self._managed_path = settings.run_dir / (
            f"{settings.netns or 'host'}-dir-{hashlib.sha256(str(settings.file).encode()).hexdigest()[:16]}.intents")
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
        if self._directory:
            # One daemon per (directory, namespace); each intent's own lock is taken as it is found.
            directory_lock = IntentLock(settings.run_dir, settings.netns,
                                        f"dir-{hashlib.sha256(str(settings.file).encode()).hexdigest()[:16]}")
            try:
                directory_lock.acquire()
            except LockHeld:
                event(log, logging.ERROR, f"another kernform watch already manages {settings.file} on this target",
                      lock="held")
                self.metrics.close()
                return 1
            self._locks["(directory)"] = directory_lock
            self._intents = {name: _Intent(file) for name, file in self._read_managed().items()}
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        watcher: FileWatcher | DirectoryWatcher = (
            DirectoryWatcher(settings.file, self._on_file_change, self._on_file_writing) if self._directory
            else FileWatcher(settings.file, self._on_file_change, self._on_file_writing))
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
            wake = time.monotonic() + self.settings.resync
            if self._state.retry_at is not None:
                wake = min(wake, self._state.retry_at)
            reasons = self._wait(target, wake)
            if self._stop.is_set():
                return
            if not reasons:
                retrying = self._state.retry_at is not None and time.monotonic() >= self._state.retry_at - 0.001
                reasons = ("retry",) if retrying else ("resync",)

    def _wait(self, target: Target, wake: float) -> tuple[str, ...]:
        """Events until `wake`; meanwhile, the BPF state of the ebpf intents is read every `bpf_check`
        seconds: nothing in the kernel announces a detached link, a replaced program or a map entry written
        by hand (tc filters do announce themselves), so drift there is found by looking."""
        while True:
            now = time.monotonic()
            checking = self.settings.bpf_check > 0 and any(
                i.converged is not None and i.converged.backend == "ebpf" for i in self._intents.values())
            until = min(wake, now + self.settings.bpf_check) if checking else wake
            reasons = self.debouncer.wait(max(0.0, until - now))
            if reasons or self._stop.is_set() or time.monotonic() >= wake - 0.001:
                return reasons
            # Programs and attachments at every check (a few syscalls each); map entries when their last
            # read is paid for: reading a map costs what it holds (a 10,000-prefix LPM trie: 60-90 ms
            # here), and the entry check may use at most 1/ENTRY_CHECK_SHARE of a CPU.
            entries = time.monotonic() >= self._next_entry_check
            started = time.monotonic()
            drift = self._bpf_drift(target, entries)
            if entries:
                cost = time.monotonic() - started
                self._next_entry_check = time.monotonic() + max(self.settings.bpf_check, cost * ENTRY_CHECK_SHARE)
            if drift:
                self.metrics.events.labels("kernel").inc()
                return (f"kernel bpf drift: {drift}",)

    def _bpf_drift(self, target: Target, entries: bool) -> str | None:
        """The first BPF object of a converged ebpf intent that the kernel no longer holds as verified
        (programs, attachments and leftovers; map entries too when `entries`)."""
        for name, known in self._intents.items():
            desired = known.converged
            if desired is None or desired.backend != "ebpf":
                continue
            try:
                wanted = {k: o for k, o in complete(target, desired).by_key().items() if k.kind in BPF_KINDS}
                if entries:
                    target.bpf.forget()
                    found: dict[ObjectKey, KernelObject] = dict(target.bpf.observe_index(name))
                else:
                    found = dict(target.bpf.observe_programs(name))
                    wanted = {k: o for k, o in wanted.items() if k.kind != BpfMapEntry.kind}
            except KernformError as exc:
                return f"intent {name}: {exc}"
            plan = diff(name, "ebpf", target.label, wanted, found)
            if not plan.empty:
                action = plan.actions[0]
                return f"intent {name}: {action.op} {action.key.kind} {action.key.name}" + (
                    f" and {len(plan.actions) - 1} more" if len(plan.actions) > 1 else "")
        return None

    # ------------------------------------------------------------------ pass
    def _pass(self, target: Target, reasons: tuple[str, ...]) -> None:
        trigger = _trigger(reasons)
        self.metrics.passes.labels(trigger).inc()
        started = time.perf_counter()
        try:
            with collector.paused():
                self._reconcile(target, reasons, trigger, started)
        except LockHeld as exc:
            if not any(i.converged for i in self._intents.values()) and not self._locks:
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
        held, gone, problems = self._load(target)
        if not held and not gone:
            # Never a write before the whole desired state is known: with no valid file yet, touch nothing.
            self._set_degraded("; ".join(problems) or "no valid intent yet")
            return
        for desired in held:
            self._lock(desired.intent)
        self._scope = WatchScope(frozenset(nft_table_name(d.intent) for d in held),
                                 frozenset().union(*(d.routing_tables for d in held)),
                                 links_and_addresses=any(d.backend == "ebpf" for d in held))
        self.metrics.info.clear()
        for desired in held:
            self.metrics.info.labels(desired.intent, target.label, desired.backend).set(1)
        self.metrics.desired_objects.set(sum(len(d.objects) for d in held))
        if {r.split(" ", 1)[0] for r in reasons} != {"file"}:
            # Drift, a resync, a signal or a retry: read every object again. A pass for a changed
            # file may diff against what the last pass verified (BPF map entries; nft only while
            # the ruleset generation is unchanged), which is what keeps it fast.
            target.forget()
        failed: list[str] = []
        for desired in held:
            # Intent by intent, each atomic and verified: one failing leaves the others converging.
            try:
                self._converge(target, desired, reasons, trigger, started)
            except KernformError as exc:
                self._intents[desired.intent].converged = None
                self.metrics.intent_in_sync.labels(desired.intent).set(0)
                if len(held) == 1 and not self._directory:
                    raise
                residual = exc.residual if isinstance(exc, ApplyError) and isinstance(exc.residual, Plan) else None
                event(log, logging.ERROR, f"intent {desired.intent}: apply failed, its previous state was kept: {exc}",
                      intent=desired.intent, pass_result="failed",
                      **(action_fields(residual.actions) if residual is not None else {}))
                failed.append(f"intent {desired.intent}: {exc}")
        for name in gone:
            self._gone(target, name)
        self._write_managed()
        if failed:
            raise KernformError(f"{len(failed)} of {len(held)} intents failed: " + "; ".join(failed))
        self._state.failures = 0
        self._state.retry_at = None
        self.metrics.succeeded()
        if problems:
            self._set_degraded("; ".join(problems))
        else:
            self._set_healthy()

    def _converge(self, target: Target, desired: DesiredState, reasons: tuple[str, ...], trigger: str,
                  started: float) -> None:
        """One intent's pass: plan against the kernel, apply the difference, verified."""
        known = self._intents[desired.intent]
        plan, observed = make_plan(target, desired)
        repair = known.converged is not None and desired == known.converged
        if not plan.empty:
            counts = plan.counts()
            result = apply(target, desired, plan, observed, cause=self._cause(desired.intent, trigger),
                           verb="repair" if repair else "apply")
            for action in plan.actions:
                self.metrics.applied_actions.labels(action.op, action.kind).inc()
                if repair:
                    self.metrics.drift_repairs.labels(action.kind).inc()
            what = "drift repaired" if repair else "applied"
            event(log, logging.WARNING if repair else logging.INFO,
                  f"{what}: {counts['add']} added, {counts['change']} changed, {counts['remove']} removed "
                  f"on {target.label}" + (f" (intent {desired.intent})" if self._directory else ""),
                  pass_result="repaired" if repair else "applied", intent=desired.intent, trigger=trigger,
                  reasons=list(reasons), operations=result.operations,
                  duration_ms=round((time.perf_counter() - started) * 1000, 1), **counts,
                  **action_fields(plan.actions))
        else:
            event(log, logging.DEBUG if trigger in ("resync", "kernel") else logging.INFO,
                  f"in sync: intent {desired.intent} on {target.label}", pass_result="in-sync",
                  intent=desired.intent, trigger=trigger, reasons=list(reasons),
                  duration_ms=round((time.perf_counter() - started) * 1000, 1))
        known.converged = desired
        self._record_claims(desired)
        self.metrics.intent_in_sync.labels(desired.intent).set(1)

    def _item(self, name: str) -> LoadedIntent | None:
        known = self._intents.get(name)
        source = self._sources.get(known.file) if known is not None else None
        return next((i for i in source.intents if i.intent.metadata.name == name), None) if source else None

    def _record_claims(self, desired: DesiredState) -> None:
        """What the applied intent takes, for other intents' applies to check (reconciler.applied)."""
        item = self._item(desired.intent)
        if item is not None:
            ownership.record_claims(self.settings.netns, desired.intent,
                                    claims_record(in_target(item.intent, self.settings.netns), desired.backend))

    def _cause(self, name: str, trigger: str) -> Cause:
        """The audit cause of a pass over intent `name`: the trigger, its file and the sha256 of its text."""
        known = self._intents.get(name)
        item = self._item(name)
        return Cause.of_text(trigger, known.file if known else None, item.text if item is not None else None)

    def _gone(self, target: Target, name: str) -> None:
        """An intent of the directory whose file or document is gone: destroyed with --prune, else left."""
        if not self.settings.prune:
            if name not in self._left_in_place:
                self._left_in_place.add(name)
                event(log, logging.WARNING,
                      f"intent {name} is no longer in {self.settings.file}: its state is left in place on "
                      f"{target.label} (--prune destroys it; `kernform destroy --intent {name}` does now)",
                      intent=name, pruned=False)
            return
        result = destroy(target, name, cause=Cause("prune", self._intents[name].file))
        event(log, logging.INFO, f"intent {name} is no longer in {self.settings.file}: destroyed, "
              f"{len(result.plan.actions)} objects removed from {target.label}", intent=name, pruned=True)
        del self._intents[name]
        lock = self._locks.pop(name, None)
        if lock is not None:
            lock.release()
        for gauge in (self.metrics.intent_valid, self.metrics.intent_desired_objects, self.metrics.intent_in_sync):
            with contextlib.suppress(KeyError):
                gauge.remove(name)

    # ------------------------------------------------------------------ load
    def _files(self) -> list[str]:
        """The input files now: the file itself, or the directory's intent files (as compiler.loader lists them:
        sorted, not recursive, hidden entries skipped, symlinks followed)."""
        if not self._directory:
            return [str(self.settings.file)]
        try:
            entries = sorted(os.scandir(self.settings.file), key=lambda e: e.name)
        except OSError as exc:
            raise KernelError(f"cannot list {self.settings.file}: {exc.strerror or exc}") from None
        return [e.path for e in entries if not e.name.startswith(".") and e.name.endswith(INTENT_SUFFIXES)
                and e.is_file()]

    def _load(self, target: Target) -> tuple[list[DesiredState], list[str], list[str]]:
        """(the desired state of every intent to hold, in input order; the intents gone from the inputs;
        the problems of the inputs now). An intent whose file is invalid, or whose new version is refused,
        is held at its last good state."""
        files = self._files()
        problems: list[str] = []
        for path in files:
            source = self._read(path)
            if source.problems:
                problems.append(source.problems)
        for path in set(self._sources) - set(files):
            del self._sources[path]
        signature = tuple((path, self._sources[path].digest) for path in files)
        if self._checked is None or self._checked.signature != signature:
            self._checked = self._check(target, signature)
        checked = self._checked
        present: set[str] = set()
        valid_files = {path for path in files if self._sources[path].problems is None}
        for path in files:
            source = self._sources[path]
            for loaded in source.intents:
                name = loaded.intent.metadata.name
                present.add(name)
                known = self._intents.setdefault(name, _Intent(path))
                known.file = path
                if name in checked.desired:
                    known.last_good = checked.desired[name]
                known.problem = source.problems or checked.problems.get(name)
        problems += list(dict.fromkeys(checked.problems.values()))
        held: list[DesiredState] = []
        gone: list[str] = []
        for name, known in self._intents.items():
            # An intent of an invalid file is still in the inputs (a restart knows it from the managed record).
            if name in present or (known.file in files and known.file not in valid_files):
                self._left_in_place.discard(name)
                if known.last_good is not None:
                    held.append(known.last_good)
            elif self._directory:
                gone.append(name)
            # One file whose intent was renamed: the old one is left as it is (see _lock), never "gone".
        order = {name: index for index, name in enumerate(
            [i.intent.metadata.name for path in files for i in self._sources[path].intents])}
        held.sort(key=lambda d: order.get(d.intent, len(order)))
        self.metrics.file_valid.set(0 if problems else 1)
        for name, known in self._intents.items():
            self.metrics.intent_valid.labels(name).set(0 if known.problem else 1)
            if known.last_good is not None:
                self.metrics.intent_desired_objects.labels(name).set(len(known.last_good.objects))
        return held, gone, problems

    def _read(self, path: str) -> _Source:
        """The file as it is now, parsed again only when its bytes changed."""
        previous = self._sources.get(path)
        try:
            data = read_intent_bytes(path)  # bounded: a link to /dev/zero is not read forever
        except FileNotFoundError:
            source = _Source(None, previous.intents if previous else (), (
                f"{path} does not exist; the kernel keeps the last applied state "
                "(only `kernform destroy` removes it)"))
            self._sources[path] = source
            return source
        except OSError as exc:
            source = _Source(None, previous.intents if previous else (),
                             f"{path}: cannot read the file: {exc.strerror or exc}")
            self._sources[path] = source
            return source
        digest = hashlib.sha256(data + f"\0{self.settings.backend}".encode()).hexdigest()
        if previous is not None and previous.digest == digest:
            return previous
        try:
            if len(data) > MAX_FILE_BYTES:
                raise IntentError([Problem(path, 1, 1, f"the file is larger than {MAX_FILE_BYTES} bytes: refused "
                                                       "unread")])
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise IntentError([Problem(path, 1, 1, f"the file is not UTF-8 text: {exc.reason}")]) from None
            documents = split_documents(text) if self._directory else [text]
            if not documents:
                raise IntentError([Problem(path, 1, 1, "the file is empty: expected a NetworkIntent document")])
            intents: list[LoadedIntent] = []
            found: list[Problem] = []
            for document in documents:
                try:
                    intents.append(parse_text(document, path))
                except IntentError as exc:
                    found += exc.problems
            if found:
                raise IntentError(found)
        except IntentError as exc:
            event(log, logging.ERROR, f"invalid intent file, the kernel keeps the last applied state:\n{exc}",
                  file=path, problems=[str(p) for p in exc.problems])
            # What it held before keeps its last good state.
            source = _Source(digest, previous.intents if previous else (),
                             f"invalid intent file ({len(exc.problems)} problems)"
                             + (f": {path}" if self._directory else ""))
            self._sources[path] = source
            return source
        source = _Source(digest, tuple(intents))
        self._sources[path] = source
        return source

    def _check(self, target: Target, signature: tuple[tuple[str, str | None], ...]) -> _Checked:
        """The valid files' intents together: unique names, slots, conflicts between them and with the intents
        applied in the target, each compiled. An intent with a problem is left out (its last good state stays)."""
        loaded: list[LoadedIntent] = []
        first: dict[str, LoadedIntent] = {}
        duplicates: dict[str, str] = {}
        for path, _ in signature:
            source = self._sources[path]
            if source.problems is not None:
                continue
            for item in source.intents:
                name = item.intent.metadata.name
                if name in first:
                    message = (f"{item.where(('metadata', 'name'))}: intent {name!r} is also defined at "
                               f"{first[name].where(('metadata', 'name'))}: names must be unique")
                    event(log, logging.ERROR, message, intent=name, file=path)
                    duplicates[f"{name} in {path}"] = message
                    continue
                first[name] = item
                loaded.append(item)
        backend = self.settings.backend
        slots = allocate_slots(target, loaded, backend)
        refused: dict[str, list[Problem]] = {}
        for conflict in find_conflicts(loaded, backend, slots, self.settings.netns):
            refused.setdefault(conflict.second.intent.metadata.name, []).append(conflict.problem())
        desired: dict[str, DesiredState] = {}
        for item in loaded:
            name = item.intent.metadata.name
            if name in refused:
                continue
            try:
                compiled = compile_intent(item.intent, backend, slots.get(name, 0), self.settings.netns)
            except BackendUnavailable as exc:
                # What the backend refuses is the file's to fix: reported like any invalid file, at FILE:LINE:COL.
                refused[name] = item.problems_at(exc.findings)
                continue
            except KernformError as exc:
                refused[name] = [Problem(item.path, 1, 1, f"cannot compile: {exc}")]
                continue
            # A collision with another intent applied in the target is the file's to fix too: the other
            # intent's objects are never replaced by this one's.
            collisions = applied_conflicts(target, [(item, compiled)], slots)
            if collisions:
                refused[name] = collisions
                continue
            desired[name] = compiled
            if self._announce(("loaded", name, compiled)):
                counts = count_by_kind(compiled.objects)
                event(log, logging.INFO, f"loaded {item.path}: intent {name}, {len(compiled.objects)} kernel objects",
                      file=item.path, intent=name, backend=compiled.backend, objects=dict(counts))
        for name, found in refused.items():
            error = IntentError(found)
            if self._announce(("refused", name, str(error))):
                event(log, logging.ERROR, f"invalid intent file, the kernel keeps the last applied state:\n{error}",
                      intent=name, file=found[0].file, problems=[str(p) for p in found])
        problems = {name: f"invalid intent file ({len(found)} problems)" + (
            f": intent {name}" if self._directory else "") for name, found in refused.items()}
        return _Checked(signature, desired, {**problems, **duplicates})

    def _announce(self, what: tuple[Any, ...]) -> bool:
        """Whether `what` (an intent loaded as a desired state, or refused with a text) is new since the last
        check: a change to one file of a directory logs that file's intents, not every intent again."""
        key = (what[0], what[1])
        if self._announced.get(key) == what[2]:
            return False
        self._announced[key] = what[2]
        return True

    def _read_managed(self) -> dict[str, str]:
        """The intents this directory's daemon managed before (name -> file), so a restart can prune them."""
        try:
            data = json.loads(self._managed_path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _write_managed(self) -> None:
        if not self._directory:
            return
        record = {name: known.file for name, known in sorted(self._intents.items())}
        if record == self._read_managed():
            return
        temporary = self._managed_path.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            self._managed_path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(record, indent=1) + "\n")
            os.replace(temporary, self._managed_path)

    def _lock(self, intent: str) -> None:
        if intent in self._locks:
            return
        lock = IntentLock(self.settings.run_dir, self.settings.netns, intent, "watch")

        def wait(pid: int | None, kind: str) -> bool:
            # A CLI run is short: wait for it. Another daemon is not: refuse (LockHeld).
            if kind != "watch":
                who = f"kernform {kind}" + (f" (pid {pid})" if pid else "")
                event(log, logging.INFO, f"waiting for {who} to finish with intent {intent}",
                      intent=intent, lock="waiting")
            return kind != "watch"

        lock.acquire(wait)
        if self._locks and not self._directory:
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
        self._publish()

    def _set_healthy(self) -> None:
        self.metrics.degraded.set(0)
        if self._state.degraded_because is not None:
            self._state.degraded_because = None
            event(log, logging.INFO, "healthy: the kernel holds the current file"
                  + ("s" if self._directory else ""), health="ok")
        self._publish()

    def _publish(self) -> None:
        """Each intent's health, next to its lock, for `kernform status` (reconciler.status.watch_record)."""
        for name, lock in self._locks.items():
            known = self._intents.get(name)
            if known is None:
                continue
            reason = known.problem or (None if known.converged is not None else self._state.degraded_because
                                       or "not applied yet")
            record = {"pid": os.getpid(), "intent": name, "file": known.file, "health": "degraded" if reason else "ok",
                      "reason": reason, "inSync": known.converged is not None}
            lock.publish(record)
