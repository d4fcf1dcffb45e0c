"""Control-plane measurements: what kernform itself costs as an intent grows.

The intent of size N holds a deny rule of N CIDRs and a load-balanced service
of min(N, 1000) backends (bench.intents.control_plane_doc), applied to the
namespace kfbench-cp. Per N, each repetition runs both backends (interleaved,
order alternating), and measures, with one `Target` kept open for the whole
phase the way the daemon keeps one (interpreter start and imports excluded):

- compile: YAML text -> parse_text -> compile_intent (no kernel);
- first apply: from nothing (for ebpf this includes compiling the BPF C);
- no-op plan (make_plan) and no-op apply (apply on a kernel already in sync);
- one-element changes, each applied by the running reconciler: add a CIDR,
  change one backend's weight. Reported as `apply` (observe, diff, apply,
  verify: the desired state given) and `pass` (the daemon's whole pass for a
  changed file: parse, compile, observe, diff, apply, verify), with the kernel
  operations the apply needed;
- `kernform apply FILE --netns NS` as a command for a one-element change: its
  wall time (interpreter start included) and its peak RSS (VmHWM at exit,
  through bench.peak);

then, per backend, `kernform watch` as a subprocess with JSON logs: for each of
many saves (a one-element change written to a temporary file and renamed over
the intent, as editors save), the time from the rename to the daemon's log line
saying the change is applied (it logs after apply and verification, so the
kernel holds the change by then), and the daemon's peak RSS (VmHWM).

The services rows (issue #13) grow the number of services instead: an intent
of S services (VIP:80, 10 backends each; bench.intents.services_text), in the
same namespace, same style (interleaved backends, one Target kept open):
compile, first apply (the apply step, the desired state given), no-op plan,
then adding one service and removing one (an original one from the middle of
the list), each as the apply step and the whole pass with its kernel
operations. Every repetition runs under a time limit; a backend that fails or
runs out of time at some S gets its error recorded in that row and the run
goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler import compile_intent
from compiler.loader import parse_text

from . import intents, state
from . import topology as topo
from .load import percentile, spread

INTENT = "kfbench-cp"
SVC_INTENT = "kfbench-cpsvc"
# The control-plane namespace's services take VIPs from the range of a gateway index no gateway has.
SVC_VIP_INDEX = 9
PARTS = ("cidrs", "services")


@dataclass
class ControlPlaneSettings:
    ns: list[int]
    reps: int
    watch_saves: int
    service_ns: list[int] = field(default_factory=lambda: [1_000, 10_000])
    service_reps: int = 3
    service_limit_s: float = 900.0  # one repetition of one backend at one S (a generous bound: no hang)
    service_slow_s: float = 120.0  # a repetition longer than this is the last of its backend at that S


def _kernform_argv() -> list[str]:
    script = Path(sys.executable).parent / "kernform"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kernform"]


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


@dataclass
class ControlPlane:
    workdir: Path
    settings: ControlPlaneSettings
    kernform: state.KernformState
    say: Callable[[str], None]
    backends: tuple[str, ...] = ("tproxy", "ebpf")
    parts: tuple[str, ...] = PARTS
    results: list[dict[str, Any]] = field(default_factory=list)
    service_results: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def run(self) -> None:
        started = time.monotonic()
        self.say("== control plane")
        topo.up()
        try:
            target = self.kernform.target(topo.CP_NS)
            if "ebpf" in self.backends:
                try:
                    target.bpf  # noqa: B018 - import bcc and open the driver before anything is timed
                except Exception as exc:
                    self.skipped["ebpf"] = f"{type(exc).__name__}: {exc}"
            for n in self.settings.ns if "cidrs" in self.parts else ():
                samples: dict[str, list[dict[str, Any]]] = {b: [] for b in self.backends}
                for rep in range(self.settings.reps):
                    for backend in self.backends if rep % 2 == 0 else tuple(reversed(self.backends)):
                        if backend in self.skipped:
                            continue
                        try:
                            samples[backend].append(self.one_rep(backend, n))
                        except Exception as exc:
                            if backend != "ebpf":
                                raise
                            self.skipped["ebpf"] = f"{type(exc).__name__}: {exc}"[:600]
                            self.say(f"  !! ebpf backend not usable, its control-plane rows are skipped: "
                                     f"{self.skipped['ebpf']}")
                            with contextlib.suppress(Exception):
                                self.kernform.destroy(topo.CP_NS, INTENT)
                for backend in self.backends:
                    if backend in self.skipped or not samples[backend]:
                        continue
                    row = self.summarise(backend, n, samples[backend])
                    if self.settings.watch_saves:
                        row["watch"] = self.watch(backend, n)
                    self.results.append(row)
                    self.print_row(row)
            if "services" in self.parts:
                self.services()
        finally:
            with contextlib.suppress(Exception):
                self.kernform.destroy(topo.CP_NS, INTENT)
            with contextlib.suppress(Exception):
                self.kernform.destroy(topo.CP_NS, SVC_INTENT)
            self.kernform.close_namespace(topo.CP_NS)
            topo.down()
            self.say(f"   (control plane: {time.monotonic() - started:.0f} s)")

    # ------------------------------------------------------------ one repetition
    def one_rep(self, backend: str, n: int) -> dict[str, Any]:
        from reconciler import collector
        from reconciler.apply import apply, make_plan

        target = self.kernform.target(topo.CP_NS)
        ns = topo.CP_NS
        texts = [
            intents.dump(intents.control_plane_doc(INTENT, backend, n)),
            intents.dump(intents.control_plane_doc(INTENT, backend, n, extra=1)),  # + one CIDR
            intents.dump(intents.control_plane_doc(INTENT, backend, n, extra=1, weights={0: 2})),  # one weight
            intents.dump(intents.control_plane_doc(INTENT, backend, n, extra=2, weights={0: 2})),  # + one CIDR
        ]

        def compiled(text: str) -> Any:
            return compile_intent(parse_text(text, "intent.yaml").intent, backend)

        self.kernform.destroy(ns, INTENT)
        out: dict[str, Any] = {}
        out["compile_s"], desired = _timed(lambda: compiled(texts[0]))
        out["objects"] = len(desired.objects)
        self.kernform.applied.add((ns, INTENT))
        out["first_apply_s"], result = _timed(lambda: apply(target, desired))
        out["first_apply_ops"] = result.operations
        out["noop_plan_s"], (plan, _) = _timed(lambda: make_plan(target, desired))
        if not plan.empty:
            raise RuntimeError(f"{backend} N={n}: the plan after apply is not empty ({len(plan.actions)} actions)")
        out["noop_apply_s"], result = _timed(lambda: apply(target, desired))
        out["noop_apply_ops"] = result.operations
        for key, text in (("change_cidr", texts[1]), ("change_weight", texts[2])):
            # The whole pass as the daemon runs it for a saved file: one collector pause around it.
            with collector.paused():
                started = time.perf_counter()
                changed = compiled(text)
                compiled_at = time.perf_counter()
                result = apply(target, changed)
                done = time.perf_counter()
            out[key] = {"pass_s": done - started, "apply_s": done - compiled_at, "compile_s": compiled_at - started,
                        "operations": result.operations, "actions": len(result.plan.actions)}
        out["cli"] = self.cli_apply(texts[3])
        out["destroy_s"], _ = _timed(lambda: self.kernform.destroy(ns, INTENT))
        return out

    def cli_apply(self, text: str) -> dict[str, Any]:
        """`kernform apply FILE --netns NS --quiet` for a one-element change: wall time and peak RSS (see bench.peak)."""
        path = self.workdir / "cp-cli.yaml"
        path.write_text(text)
        peak = self.workdir / "cp-cli.peak"
        peak.unlink(missing_ok=True)
        repo = Path(__file__).resolve().parent.parent
        env = {**os.environ, "KFBENCH_PEAK_FILE": str(peak),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
        started = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "bench.peak", "apply", str(path), "--netns", topo.CP_NS, "--quiet"],
                             capture_output=True, text=True, timeout=300, env=env, cwd=repo)
        wall = time.perf_counter() - started
        if res.returncode != 0:
            raise RuntimeError(f"kernform apply exited {res.returncode}: {res.stderr.strip()[-800:]}")
        return {"wall_s": wall, "peak_rss_mb": int(peak.read_text()) / 1024,
                "output": res.stdout.strip().splitlines()[-1:]}

    # ------------------------------------------------------------ services (issue #13)
    def services(self) -> None:
        """Per S: interleaved repetitions of both backends; a backend's failure at S ends its repetitions there."""
        self.say(f"   services rows: S services of {topo.SERVICE_BACKENDS} backends each, "
                 f"{self.settings.service_reps} repetitions, at most {self.settings.service_limit_s:.0f} s each")
        for s in self.settings.service_ns:
            texts = {b: self.service_texts(b, s) for b in self.backends}
            samples: dict[str, list[dict[str, Any]]] = {b: [] for b in self.backends}
            errors: dict[str, str] = {}
            notes: dict[str, str] = {}
            for rep in range(self.settings.service_reps):
                for backend in self.backends if rep % 2 == 0 else tuple(reversed(self.backends)):
                    if backend in self.skipped or backend in errors or backend in notes:
                        continue
                    try:
                        started = time.monotonic()
                        with state.time_limit(self.settings.service_limit_s, f"{backend} services S={s}"):
                            samples[backend].append(self.one_service_rep(backend, s, texts[backend]))
                        took = time.monotonic() - started
                        if took > self.settings.service_slow_s and rep + 1 < self.settings.service_reps:
                            notes[backend] = (f"a repetition took {took:.0f} s (more than "
                                              f"{self.settings.service_slow_s:.0f} s): no more repetitions at this S")
                            self.say(f"   ({backend} S={s:,}: {notes[backend]})")
                    except Exception as exc:
                        errors[backend] = f"{type(exc).__name__}: {exc}".strip()[:600]
                        self.skipped[f"services/{backend}/S={s}"] = errors[backend]
                        self.say(f"  !! services S={s:,} {backend}: {errors[backend]}; its repetitions at this S stop")
                        if isinstance(exc, state.TimeLimit):
                            self.kernform.close_namespace(topo.CP_NS)
                        try:
                            with state.time_limit(self.settings.service_limit_s, f"destroy {SVC_INTENT}"):
                                self.kernform.destroy(topo.CP_NS, SVC_INTENT)
                        except Exception as again:
                            self.say(f"  !! destroying {SVC_INTENT} after that: {type(again).__name__}: {again}")
                            self.kernform.close_namespace(topo.CP_NS)
            for backend in self.backends:
                if backend in self.skipped and backend not in errors:
                    continue
                row = self.summarise_services(backend, s, samples[backend], errors.get(backend))
                if backend in notes:
                    row["note"] = notes[backend]
                self.service_results.append(row)
                self.print_service_row(row)

    @staticmethod
    def service_texts(backend: str, s: int) -> dict[str, str]:
        vips = [topo.service_vip(SVC_VIP_INDEX, k) for k in range(s + 1)]
        interfaces = [topo.CP_IF]
        return {"base": intents.services_text(SVC_INTENT, backend, vips[:s], interfaces),
                # one more service, then one of the original ones (from the middle of the list) removed
                "add_service": intents.services_text(SVC_INTENT, backend, vips, interfaces),
                "remove_service": intents.services_text(SVC_INTENT, backend, vips, interfaces, skip=s // 2)}

    def one_service_rep(self, backend: str, s: int, texts: dict[str, str]) -> dict[str, Any]:
        from reconciler import collector
        from reconciler.apply import apply, make_plan

        target = self.kernform.target(topo.CP_NS)

        def compiled(text: str) -> Any:
            return compile_intent(parse_text(text, "intent.yaml").intent, backend)

        self.kernform.destroy(topo.CP_NS, SVC_INTENT)
        out: dict[str, Any] = {}
        out["compile_s"], desired = _timed(lambda: compiled(texts["base"]))
        out["objects"] = len(desired.objects)
        self.kernform.applied.add((topo.CP_NS, SVC_INTENT))
        out["first_apply_s"], result = _timed(lambda: apply(target, desired))
        out["first_apply_ops"] = result.operations
        out["noop_plan_s"], (plan, _) = _timed(lambda: make_plan(target, desired))
        if not plan.empty:
            raise RuntimeError(f"{backend} S={s}: the plan after apply is not empty ({len(plan.actions)} actions)")
        for key in ("add_service", "remove_service"):
            with collector.paused():
                started = time.perf_counter()
                changed = compiled(texts[key])
                compiled_at = time.perf_counter()
                result = apply(target, changed)
                done = time.perf_counter()
            out[key] = {"pass_s": done - started, "apply_s": done - compiled_at, "compile_s": compiled_at - started,
                        "operations": result.operations, "actions": len(result.plan.actions)}
        out["destroy_s"], _ = _timed(lambda: self.kernform.destroy(topo.CP_NS, SVC_INTENT))
        return out

    def summarise_services(self, backend: str, s: int, reps: list[dict[str, Any]], error: str | None) -> dict[str, Any]:
        row: dict[str, Any] = {"backend": backend, "services": s, "backends_per_service": topo.SERVICE_BACKENDS,
                               "reps": len(reps), "error": error}
        if not reps:
            return row
        row["objects"] = reps[0]["objects"]
        for key in ("compile_s", "first_apply_s", "noop_plan_s", "destroy_s"):
            row[key] = spread([r[key] for r in reps])
        row["first_apply_ops"] = int(statistics.median(r["first_apply_ops"] for r in reps))
        for change in ("add_service", "remove_service"):
            row[change] = {k: spread([r[change][k] for r in reps]) for k in ("apply_s", "pass_s", "compile_s")}
            row[change]["operations"] = int(statistics.median(r[change]["operations"] for r in reps))
            row[change]["actions"] = int(statistics.median(r[change]["actions"] for r in reps))
        return row

    def print_service_row(self, row: dict[str, Any]) -> None:
        def ms(x: dict[str, float]) -> str:
            return f"{x['median'] * 1000:.1f}"

        head = f"   {row['backend']:<7} S={row['services']:<6}"
        if row["reps"]:
            a, r = row["add_service"], row["remove_service"]
            self.say(f"{head} compile {ms(row['compile_s'])} ms, first apply {ms(row['first_apply_s'])} ms "
                     f"({row['first_apply_ops']:,} ops), no-op plan {ms(row['noop_plan_s'])} ms; +1 service: apply "
                     f"{ms(a['apply_s'])} ms ({a['operations']} ops), pass {ms(a['pass_s'])} ms; -1 service: apply "
                     f"{ms(r['apply_s'])} ms ({r['operations']} ops), pass {ms(r['pass_s'])} ms "
                     f"[{row['reps']} reps]")
        if row["error"]:
            self.say(f"{head} FAILED: {row['error']}")

    # ------------------------------------------------------------ watch
    def watch(self, backend: str, n: int) -> dict[str, Any]:
        base = intents.dump(intents.control_plane_doc(INTENT, backend, n))
        changed = intents.dump(intents.control_plane_doc(INTENT, backend, n, extra=1))
        path = self.workdir / "cp-watch.yaml"
        path.write_text(base)
        self.kernform.apply(topo.CP_NS, intents.control_plane_doc(INTENT, backend, n))
        argv = [*_kernform_argv(), "watch", str(path), "--netns", topo.CP_NS, "--log-format", "json",
                "--resync", "3600"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        lines: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()

        def reader() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                arrived = time.monotonic()
                with contextlib.suppress(ValueError):
                    lines.put((arrived, json.loads(line)))

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()

        def next_pass(timeout: float) -> tuple[float, dict[str, Any]]:
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"kernform watch ({backend}, N={n}) reported no pass within {timeout} s")
                try:
                    arrived, record = lines.get(timeout=left)
                except queue.Empty:
                    continue
                if "pass_result" in record:
                    return arrived, record

        latencies: list[float] = []
        durations: list[float] = []
        failed = 0
        try:
            next_pass(120)  # the start pass: in sync already
            for i in range(self.settings.watch_saves):
                tmp = path.with_suffix(".tmp")
                tmp.write_text(changed if i % 2 == 0 else base)
                os.replace(tmp, path)
                saved = time.monotonic()
                arrived, record = next_pass(60)
                if record["pass_result"] != "applied":
                    failed += 1
                    continue
                latencies.append(arrived - saved)
                durations.append(float(record.get("duration_ms", "nan")) / 1000)
                time.sleep(0.05)
            hwm = _vm_hwm_mb(proc.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        return {"saves": len(latencies), "failed": failed,
                "median_s": statistics.median(latencies) if latencies else None,
                "p95_s": percentile(latencies, 0.95) if latencies else None,
                "max_s": max(latencies) if latencies else None,
                "pass_median_s": statistics.median(durations) if durations else None,
                "peak_rss_mb": hwm}

    # ------------------------------------------------------------ summaries
    def summarise(self, backend: str, n: int, reps: list[dict[str, Any]]) -> dict[str, Any]:
        def col(*path: str) -> list[float]:
            values = []
            for r in reps:
                v: Any = r
                for p in path:
                    v = v[p]
                values.append(float(v))
            return values

        row: dict[str, Any] = {"backend": backend, "n": n, "backends_in_service": min(n, 1000),
                               "objects": reps[0]["objects"], "reps": len(reps)}
        for key in ("compile_s", "first_apply_s", "noop_plan_s", "noop_apply_s", "destroy_s"):
            row[key] = spread(col(key))
        row["first_apply_ops"] = int(statistics.median(col("first_apply_ops")))
        row["noop_apply_ops"] = int(max(col("noop_apply_ops")))
        for change in ("change_cidr", "change_weight"):
            row[change] = {k: spread(col(change, k)) for k in ("apply_s", "pass_s", "compile_s")}
            row[change]["operations"] = int(statistics.median(col(change, "operations")))
            row[change]["actions"] = int(statistics.median(col(change, "actions")))
        row["cli_apply"] = {"wall_s": spread(col("cli", "wall_s")), "peak_rss_mb": max(col("cli", "peak_rss_mb"))}
        return row

    def print_row(self, row: dict[str, Any]) -> None:
        def ms(x: dict[str, float]) -> str:
            return f"{x['median'] * 1000:.1f}"

        w = row.get("watch") or {}
        watch = (f" watch {w['median_s'] * 1000:.0f}/{w['p95_s'] * 1000:.0f} ms (median/p95, {w['saves']} saves)"
                 if w.get("median_s") is not None else "")
        self.say(f"   {row['backend']:<7} N={row['n']:<6} compile {ms(row['compile_s'])} ms, first apply "
                 f"{ms(row['first_apply_s'])} ms ({row['first_apply_ops']} ops), no-op plan {ms(row['noop_plan_s'])}"
                 f" ms, no-op apply {ms(row['noop_apply_s'])} ms")
        cc, cw = row["change_cidr"], row["change_weight"]
        self.say(f"   {'':<7} {'':<8} +1 CIDR: apply {ms(cc['apply_s'])} ms ({cc['operations']} ops), pass "
                 f"{ms(cc['pass_s'])} ms; weight: apply {ms(cw['apply_s'])} ms ({cw['operations']} ops), pass "
                 f"{ms(cw['pass_s'])} ms; `kernform apply` {ms(row['cli_apply']['wall_s'])} ms, "
                 f"{row['cli_apply']['peak_rss_mb']:.0f} MB;{watch}")


def _vm_hwm_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None
