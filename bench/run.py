"""`sudo .venv/bin/python -m bench.run [--quick]`: kernform's benchmark, data path and control plane.

Builds its own network namespaces (kfbench-*), never touches the root
namespace, and removes everything it created at the end, also on Ctrl-C,
SIGTERM or an error. Writes bench/results/<date>.json and PNG plots next to
it, prints every figure and whether the targets of issues #5 and #13 are met.
See the "Performance" section of the README for what is measured and how.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from . import load, report, state
from . import topology as topo
from .controlplane import PARTS as CP_PARTS
from .controlplane import ControlPlane, ControlPlaneSettings
from .dataplane import Dataplane, DataplaneSettings
from .load import LoadSettings

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ("filter", "lb", "interception", "services")
TOOLS = {"nginx": "nginx-light", "haproxy": "haproxy", "iptables-legacy-restore": "iptables", "curl": "curl",
         "gcc": "gcc", "ss": "iproute2", "ip": "iproute2"}


def settings(quick: bool, reps: int | None) -> tuple[DataplaneSettings, ControlPlaneSettings]:
    if quick:
        dp = DataplaneSettings(filter_ns=[0, 10_000], lb_ns=[1, 1_000], icpt_ns=[0], reps=reps or 3,
                               close=LoadSettings(32, 0.8, 0.15), keepalive=LoadSettings(32, 0.4, 0.1),
                               interception=LoadSettings(32, 0.8, 0.15), services_ns=[1, 1_000])
        cp = ControlPlaneSettings(ns=[100, 1_000], reps=reps or 3, watch_saves=6, service_ns=[1_000],
                                  service_reps=reps or 2)
    else:
        dp = DataplaneSettings(filter_ns=[0, 10, 100, 1_000, 10_000], lb_ns=[1, 10, 100, 1_000],
                               icpt_ns=[0, 10_000], reps=reps or 5, close=LoadSettings(32, 1.5, 0.3),
                               keepalive=LoadSettings(32, 1.0, 0.2), interception=LoadSettings(32, 1.5, 0.3),
                               services_ns=[1, 100, 1_000, 10_000])
        # Services rows: 3 repetitions (a 10,000-service intent is ~5 MB of YAML, parsed and compiled three
        # times per repetition: the first apply and the two whole passes).
        cp = ControlPlaneSettings(ns=[10, 100, 1_000, 10_000], reps=reps or 5, watch_saves=50,
                                  service_ns=[1_000, 10_000], service_reps=reps or 3)
    return dp, cp


def host_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (res.stdout + res.stderr).strip().splitlines()[0]
        return "?"

    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(), "nginx": version(["nginx", "-v"]),
            "haproxy": version(["haproxy", "-v"]), "iptables": version(["iptables-legacy", "--version"]),
            "loadavg_start": os.getloadavg()}


def preflight() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root (sudo): the benchmark builds network namespaces")
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        problems.append(f"missing tools; apt-get install {' '.join(missing)} (or run scripts/setup.sh)")
    return problems


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def write_results(data: dict[str, Any], stem: str, say: Any) -> list[Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    written = []
    path = RESULTS / f"{stem}.json"
    path.write_text(_compact_json(data))
    written.append(path)
    try:
        from . import plots
    except Exception:  # pragma: no cover - plots is ours; matplotlib is checked below
        return written
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        say("  (no plots: matplotlib is missing; .venv/bin/pip install -e '.[bench]')")
        return written
    rows = data.get("dataplane", {}).get("rows", [])
    if any(r["scenario"] != "services" for r in rows):
        p = RESULTS / f"{stem}-dataplane.png"
        plots.dataplane(data, p)
        written.append(p)
    if any(r["scenario"] == "services" for r in rows):
        p = RESULTS / f"{stem}-services.png"
        plots.services(data, p)
        written.append(p)
    if data.get("controlplane", {}).get("rows"):
        p = RESULTS / f"{stem}-controlplane.png"
        plots.controlplane(data, p)
        written.append(p)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a ~2-minute smoke run (fewer N, shorter loads)")
    parser.add_argument("--reps", type=int, help="repetitions per figure (default 5; quick 3)")
    parser.add_argument("--skip-dataplane", action="store_true")
    parser.add_argument("--skip-controlplane", action="store_true")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"data-path scenarios to run (comma-separated from {','.join(SCENARIOS)}; default all)")
    parser.add_argument("--controlplane-parts", default=",".join(CP_PARTS),
                        help=f"control-plane parts to run (comma-separated from {','.join(CP_PARTS)}: the rows of "
                        "N CIDRs and the services rows; default both)")
    parser.add_argument("--services-ns", metavar="S,S,...",
                        help="numbers of services for the services scenario and the control plane's services rows "
                        "(default 1,100,1000,10000 and 1000,10000; quick 1,1000 and 1000)")
    parser.add_argument("--name", help="results file stem (default: the date, plus -quick)")
    args = parser.parse_args(argv)
    scenarios = tuple(x.strip() for x in args.scenarios.split(",") if x.strip())
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    cp_parts = tuple(x.strip() for x in args.controlplane_parts.split(",") if x.strip())
    unknown = sorted(set(cp_parts) - set(CP_PARTS))
    if unknown:
        parser.error(f"unknown control-plane part(s) {', '.join(unknown)}; known: {', '.join(CP_PARTS)}")

    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.0f}s] {text}", flush=True)

    problems = preflight()
    if problems:
        for p in problems:
            print(f"bench: {p}", file=sys.stderr)
        return 1
    dp_settings, cp_settings = settings(args.quick, args.reps)
    if args.services_ns:
        try:
            sizes = sorted({int(x) for x in args.services_ns.split(",") if x.strip()})
        except ValueError:
            parser.error("--services-ns takes numbers, e.g. 1,1000")
        if not sizes or not all(1 <= x <= topo.MAX_SERVICES - 1 for x in sizes):
            parser.error(f"--services-ns: each between 1 and {topo.MAX_SERVICES - 1:,}")
        dp_settings.services_ns = cp_settings.service_ns = sizes
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20_000), hard))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="kfbench-"))
    kernform = state.KernformState()
    today = dt.datetime.now().strftime("%Y-%m-%d")
    stem = args.name or (today + ("-quick" if args.quick else ""))
    data: dict[str, Any] = {
        "meta": {"date": today, "command": " ".join(["sudo .venv/bin/python -m bench.run",
                                                     *(sys.argv[1:] if argv is None else argv)]),
                 "quick": args.quick, "host": host_info(),
                 "settings": {"reps": dp_settings.reps, "dataplane": _plain(dp_settings),
                              "controlplane": _plain(cp_settings), "client_ports": list(topo.CLIENT_PORTS)},
                 "notes": [
                     "rates: kfload (bench/kfload.c), one thread, 32 concurrent connections; close mode: a new "
                     "connection per request, latency from connect() to the whole response",
                     "ebpf load balancing balances only processes in the intent's cgroup: its load generator runs "
                     "in the gateway namespace inside that cgroup (compare with tproxy-local and none-local)",
                     "references: none = no rules; iptables = iptables-legacy, hand-written linear rules",
                 ]},
    }
    dp = cp = None
    interrupted = None
    try:
        say(f"kernform benchmark{' (quick)' if args.quick else ''}: namespaces {topo.PREFIX}-*, work dir {workdir}")
        if topo.existing():
            say("removing a previous run's leftovers")
            topo.down()
        state.sweep_leftovers()
        kfload = load.build(workdir)
        if not args.skip_dataplane:
            dp = Dataplane(workdir, kfload, dp_settings, kernform, say)
            dp.run_all(scenarios)
        if not args.skip_controlplane:
            cp = ControlPlane(workdir, cp_settings, kernform, say, parts=cp_parts)
            cp.run()
    except KeyboardInterrupt as exc:
        interrupted = f"interrupted ({exc or 'Ctrl-C'})"
        say(f"!! {interrupted}: cleaning up")
    except Exception as exc:
        interrupted = f"failed: {type(exc).__name__}: {exc}"
        say(f"!! {interrupted}: cleaning up")
        import traceback

        traceback.print_exc()
    finally:
        # Ignore further Ctrl-C while cleaning: a half-removed network helps nobody.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        leftover = kernform.cleanup()
        with contextlib.suppress(Exception):
            topo.down()
        leftover += state.sweep_leftovers()
        for lock in Path("/run/kernform").glob(f"{topo.PREFIX}-*.lock"):
            with contextlib.suppress(OSError):
                lock.unlink()
        shutil.rmtree(workdir, ignore_errors=True)
        if leftover or topo.existing():
            say(f"!! cleanup problems: {leftover} {topo.existing()}")
        else:
            say("cleaned up: no kfbench namespace, pin or cgroup is left")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, previous)

    data["meta"]["host"]["loadavg_end"] = os.getloadavg()
    data["meta"]["seconds"] = round(time.monotonic() - started, 1)
    if interrupted:
        data["meta"]["incomplete"] = interrupted
    skipped = {}
    if dp is not None:
        data["dataplane"] = {"rows": dp.rows, "applies": dp.applies, "checks": dp.checks}
        skipped.update(dp.skipped)
        data["meta"]["notes"] += dp.notes
    if cp is not None:
        data["controlplane"] = {"rows": cp.results, "services": cp.service_results}
        skipped.update({f"controlplane/{k}": v for k, v in cp.skipped.items()})
    if skipped:
        data["meta"]["skipped"] = skipped
    data["ratios"] = report.ratios(data)
    data["targets"] = report.targets(data)
    if not (dp and dp.rows) and not (cp and (cp.results or cp.service_results)):
        say("nothing measured; no results written")
        return 1
    if interrupted:
        stem += "-incomplete"
    written = write_results(data, stem, say)
    print()
    for key, reason in skipped.items():
        print(f"SKIPPED {key}: {reason}")
    services = report.render_services(data)
    if services:
        print(services)
        print()
    print("Targets (issues #5, #13):" + ("  [--quick: 3 short repetitions, a smoke test of the benchmark; quote the "
                                           "full run's figures, not these]" if args.quick else ""))
    print(report.render_targets(data["targets"]))
    print()
    print("Written: " + ", ".join(str(p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p)
                                  for p in written))
    say(f"done in {time.monotonic() - started:.0f} s")
    return 1 if interrupted else 0


def _compact_json(data: dict[str, Any]) -> str:
    """JSON with one line per list item (a row, a target): small, and diffs between runs stay readable."""
    parts = []
    for key, value in data.items():
        if isinstance(value, dict) and any(isinstance(v, list) for v in value.values()):
            inner = []
            for k, v in value.items():
                if isinstance(v, list):
                    items = ",\n   ".join(json.dumps(x, separators=(",", ":")) for x in v)
                    inner.append(f"  {json.dumps(k)}: [\n   {items}\n  ]" if v else f"  {json.dumps(k)}: []")
                else:
                    inner.append(f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}")
            parts.append(f" {json.dumps(key)}: {{\n" + ",\n".join(inner) + "\n }")
        elif isinstance(value, list):
            items = ",\n  ".join(json.dumps(x, separators=(",", ":")) for x in value)
            parts.append(f" {json.dumps(key)}: [\n  {items}\n ]" if value else f" {json.dumps(key)}: []")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value, indent=1)}")
    text = "{\n" + ",\n".join(parts) + "\n}\n"
    json.loads(text)  # stays valid JSON
    return text


def _plain(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _plain(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, list | tuple):
        return [_plain(x) for x in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
