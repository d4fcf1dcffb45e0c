"""Putting the state under test into a gateway: kernform for its backends, iptables-legacy for the reference.

kernform state goes in exactly the way users get it: the intent as YAML text,
`compiler.loader.parse_text`, `compiler.compile_intent`, then
`reconciler.apply.apply` on a `Target` kept open per namespace. The ebpf
backend's BPF state lives on the host-wide bpffs (pinned below
/sys/fs/bpf/kernform/<intent>/netns:<ns>) and in a cgroup below
<cgroup2>/kernform/, which deleting a namespace does not remove: `cleanup()`
destroys every intent it applied, and removes leftovers of the benchmark's own
intents (names starting with `kfbench-`) from bpffs and cgroup2 as a last
resort.

iptables-legacy takes a machine-wide lock unless XTABLES_LOCKFILE points
elsewhere, so every call gets a lock file in the run's directory.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from compiler import compile_intent
from compiler.loader import parse_text
from compiler.objects import BPF_PIN_ROOT, DesiredState

from . import intents
from . import topology as topo

INTENT_PREFIX = "kfbench-"


def desired_of(doc: dict[str, Any]) -> DesiredState:
    return desired_of_text(intents.dump(doc), doc["metadata"]["name"], doc["spec"]["backend"])


def desired_of_text(text: str, name: str, backend: str) -> DesiredState:
    loaded = parse_text(text, f"<{name}>")
    return compile_intent(loaded.intent, backend)


class TimeLimit(Exception):
    """A step of the benchmark ran past its time limit (raised from SIGALRM in the main thread)."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise TimeLimit inside the block after `seconds`, so that a step that never ends cannot hang the run.

    The exception lands wherever Python code runs at that moment, possibly inside kernform: afterwards the
    caller closes the namespace's Target and destroys the intent with a fresh one."""
    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeLimit(f"{what}: no result after {seconds:.0f} s (the benchmark's time limit)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Applied:
    seconds: float
    operations: int
    compile_s: float | None = None  # parse and compile, when measured


@dataclass
class KernformState:
    """Kept-open Targets per namespace and the record of what was applied, for cleanup."""

    targets: dict[str, Any] = field(default_factory=dict)
    applied: set[tuple[str, str]] = field(default_factory=set)  # (netns, intent)
    ebpf_problem: str | None = None
    ebpf_traceback: str = ""

    def target(self, ns: str) -> Any:
        from reconciler.observe import Target

        if ns not in self.targets:
            self.targets[ns] = Target(ns)
        return self.targets[ns]

    def apply_desired(self, ns: str, desired: DesiredState) -> Applied:
        from reconciler.apply import apply

        self.applied.add((ns, desired.intent))
        result = apply(self.target(ns), desired)
        return Applied(result.seconds, result.operations)

    def apply(self, ns: str, doc: dict[str, Any]) -> Applied | None:
        """Apply `doc` in `ns`; for the ebpf backend a failure disables ebpf rows (returns None) instead of raising."""
        backend = doc["spec"]["backend"]
        if backend == "ebpf" and self.ebpf_problem:
            return None
        try:
            return self.apply_desired(ns, desired_of(doc))
        except Exception as exc:
            if backend != "ebpf":
                raise
            self.ebpf_problem = f"{type(exc).__name__}: {exc}".strip()[:600]
            print(f"  !! ebpf backend not usable, its rows are skipped: {self.ebpf_problem}", flush=True)
            self.ebpf_traceback = traceback.format_exc()
            with contextlib.suppress(Exception):
                self.destroy(ns, doc["metadata"]["name"])
            return None

    def try_apply_text(self, ns: str, text: str, name: str, backend: str, limit_s: float) -> Applied | str:
        """Parse, compile and apply within `limit_s` seconds; on any failure (either backend) the error's text,
        with the intent destroyed (through a fresh Target) and ebpf left usable for other steps."""
        try:
            with time_limit(limit_s, f"{backend} apply of {name} in {ns}"):
                started = time.perf_counter()
                desired = desired_of_text(text, name, backend)
                compiled = time.perf_counter() - started
                self.applied.add((ns, name))
                result = self.apply_desired(ns, desired)
                return Applied(result.seconds, result.operations, compiled)
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}".strip()[:600]
            if isinstance(exc, TimeLimit):
                self.close_namespace(ns)
            try:
                with time_limit(limit_s, f"destroy of {name} in {ns}"):
                    self.destroy(ns, name)
            except Exception as again:
                problem += f" (and destroying it: {type(again).__name__}: {again})"[:300]
            return problem

    def destroy(self, ns: str, intent: str) -> None:
        from reconciler.apply import destroy

        destroy(self.target(ns), intent)
        self.applied.discard((ns, intent))

    def close_namespace(self, ns: str) -> None:
        target = self.targets.pop(ns, None)
        if target is not None:
            with contextlib.suppress(Exception):
                target.close()

    def cleanup(self) -> list[str]:
        """Destroy everything applied, close every Target; returns problems (never raises)."""
        problems = []
        for ns, intent in sorted(self.applied):
            try:
                self.destroy(ns, intent)
            except Exception as exc:
                problems.append(f"destroy {intent} in {ns}: {exc}")
        for ns in list(self.targets):
            self.close_namespace(ns)
        problems += sweep_leftovers()
        return problems


def sweep_leftovers() -> list[str]:
    """Remove BPF pins and cgroups of the benchmark's own intents that a crashed run left behind."""
    problems = []
    root = Path(BPF_PIN_ROOT)
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(INTENT_PREFIX):
                try:
                    shutil.rmtree(d)
                except OSError as exc:
                    problems.append(f"rm {d}: {exc}")
    try:
        from reconciler.drivers.bpf import cgroup2_root

        cg = cgroup2_root() / "kernform"
    except Exception:
        return problems
    if cg.is_dir():
        for d in cg.iterdir():
            if d.is_dir() and d.name.startswith(INTENT_PREFIX):
                try:
                    d.rmdir()
                except OSError as exc:
                    problems.append(f"rmdir {d}: {exc}")
    return problems


def cgroup_of(intent: str) -> str:
    """The cgroup v2 directory whose processes the ebpf backend balances (the intent's default)."""
    from reconciler.drivers.bpf import cgroup2_root

    return str(cgroup2_root() / "kernform" / intent)


# ---------------------------------------------------------------- iptables-legacy
def iptables_restore(ns: str, rules: str, lockfile: Path) -> float:
    started = time.perf_counter()
    topo.run_in(ns, ["iptables-legacy-restore"], input=rules, env={"XTABLES_LOCKFILE": str(lockfile)}, timeout=120)
    return time.perf_counter() - started


def tproxy_routing(ns: str, add: bool) -> None:
    """The policy routing the documented TPROXY setup needs (inside the gateway namespace only)."""
    op = "add" if add else "del"
    topo.ip_batch(ns, [f"rule {op} fwmark 1 lookup 100 priority 100",
                       f"route {op} local 0.0.0.0/0 dev lo table 100"], force=not add, check=add)
