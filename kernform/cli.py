"""The `kernform` command line: validate, compile, plan, apply, destroy, status, watch, sandbox, demo.

Exit status: 0 success; 1 error (an invalid file, a kernel failure); with
`plan --detailed-exitcode`, 2 when changes are pending (as Terraform does).
Errors are printed as FILE:LINE:COL: message (intent problems) or one line
saying what failed and what was kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from compiler import BACKENDS, BackendUnavailable, compile_intent
from compiler.errors import ApplyError, IntentError, KernformError
from compiler.loader import LoadedIntent, load_file
from compiler.objects import DesiredState, count_by_kind
from compiler.render import render

# The reconciler (pyroute2, libnftables) is imported by the commands that touch
# the kernel only, so validate and compile stay fast and work anywhere.


def _colour(stream: Any) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ


def _compile(loaded: LoadedIntent, backend: str | None) -> DesiredState:
    """compile_intent, with what the backend refuses reported like any problem of the file: at FILE:LINE:COL."""
    try:
        return compile_intent(loaded.intent, backend)
    except BackendUnavailable as exc:
        raise IntentError(loaded.problems_at(exc.findings)) from None


def cmd_validate(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            loaded = load_file(path)
        except IntentError as exc:
            print(exc, file=sys.stderr)
            status = 1
            continue
        try:
            desired = _compile(loaded, args.backend)
        except IntentError as exc:
            print(exc, file=sys.stderr)
            status = 1
            continue
        counts = count_by_kind(desired.objects)
        print(f"{path}: valid (intent {loaded.intent.metadata.name}, {sum(counts.values())} kernel objects)")
    return status


def cmd_compile(args: argparse.Namespace) -> int:
    loaded = load_file(args.file)
    desired = _compile(loaded, args.backend)
    sys.stdout.write(render(desired))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from reconciler.apply import make_plan
    from reconciler.observe import Target
    from reconciler.plan import render_text

    loaded = load_file(args.file)
    desired = _compile(loaded, args.backend)
    with Target(args.netns) as target:
        plan, _ = make_plan(target, desired)
    if args.json:
        print(plan.to_json())
    else:
        sys.stdout.write(render_text(plan, colour=_colour(sys.stdout), full=args.full))
    if args.detailed_exitcode and not plan.empty:
        return 2
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from reconciler.apply import apply, make_plan
    from reconciler.observe import Target
    from reconciler.plan import render_text

    loaded = load_file(args.file)
    desired = _compile(loaded, args.backend)
    with Target(args.netns) as target:
        plan, observed = make_plan(target, desired)
        if not args.quiet:
            sys.stdout.write(render_text(plan, colour=_colour(sys.stdout), full=args.full))
        if plan.empty:
            return 0
        result = apply(target, desired, plan, observed)
    counts = plan.counts()
    print(
        f"Apply complete: {counts['add']} added, {counts['change']} changed, {counts['remove']} removed "
        f"({result.operations} kernel operations, {result.seconds * 1000:.0f} ms); verified."
    )
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    from reconciler.apply import destroy
    from reconciler.observe import Target

    name = args.intent or load_file(args.file).intent.metadata.name
    with Target(args.netns) as target:
        result = destroy(target, name)
    if result.plan.empty:
        print(f"Nothing to destroy: intent {name} owns no objects on {target.label}.")
    else:
        print(f"Destroy complete: {len(result.plan.actions)} objects of intent {name} removed from {target.label}.")
    return 0


def _counter_origin(name: str) -> str:
    """The origin an nft counter of kernform counts for, from its name (`f_forward_deny-admin` ->
    `filtering.forward/deny-admin`); see reconciler.status.nft_counter_origin."""
    from reconciler.status import nft_counter_origin

    return nft_counter_origin(name)[1]


def cmd_status(args: argparse.Namespace) -> int:
    from reconciler.apply import make_plan
    from reconciler.observe import Target
    from reconciler.status import applied_backends, applied_intents, counters, format_counters

    report: list[dict[str, Any]] = []
    with Target(args.netns) as target:
        if args.file:
            loaded = load_file(args.file)
            names = [loaded.intent.metadata.name]
        else:
            names = applied_intents(target)
        for name in names:
            observed = target.observe(name)
            found = applied_backends(observed)
            # The backend is what the kernel holds; --backend overrides; the file decides only when the
            # kernel cannot (nothing applied, or both backends' state after an interrupted switch).
            if args.backend:
                backend, source = args.backend, "--backend"
            elif len(found) == 1:
                backend, source = found[0], "kernel"
            elif args.file:
                backend, source = loaded.intent.spec.backend, "file"
            else:
                backend, source = None, "kernel"
            entry: dict[str, Any] = {
                "intent": name,
                "applied": observed.nft.exists or bool(observed.bpf),
                "backend": backend,
                "backendFrom": source,
                "appliedBackends": list(found),
                "objects": dict(count_by_kind(observed.objects)),
            }
            desired = None
            if args.file:
                entry["specBackend"] = loaded.intent.spec.backend
                desired = _compile(loaded, backend)
                plan, _ = make_plan(target, desired)
                entry["inSync"] = plan.empty
                entry["pendingChanges"] = plan.counts()
            shown = [args.backend] if args.backend else list(found)
            entry["counters"] = counters(target, observed, shown, loaded.intent if args.file else None, desired)
            report.append(entry)
    if args.json:
        print(json.dumps({"target": target.label, "intents": report}, indent=2))
        return 0
    if not report:
        print(f"No kernform intents are applied on {target.label}.")
    for entry in report:
        state = "applied" if entry["applied"] else "not applied"
        if entry["backend"] is None:
            held = " and ".join(entry["appliedBackends"]) or "no chains, no BPF programs"
            which = f"backend unknown ({held})"
        else:
            why = {"kernel": "read from the kernel", "--backend": "from --backend", "file": "the file's spec.backend"}
            which = f"backend {entry['backend']} ({why[entry['backendFrom']]}"
            if entry.get("specBackend") not in (None, entry["backend"]):
                which += f"; the file says {entry['specBackend']}"
            if len(entry["appliedBackends"]) > 1:
                which += "; the kernel holds state of both backends"
            which += ")"
        sync = ""
        if "inSync" in entry:
            sync = ", in sync with the file" if entry["inSync"] else f", drifted/pending: {entry['pendingChanges']}"
        print(f"intent {entry['intent']} on {target.label}: {state}, {which}{sync}")
        objects = ", ".join(f"{n} {k}" for k, n in sorted(entry["objects"].items()))
        if objects:
            print(f"  objects: {objects}")
        for line in format_counters(entry["counters"]):
            print(line)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from reconciler.daemon import Daemon, WatchSettings
    from reconciler.log import setup

    setup(args.log_format, args.log_level)
    settings = WatchSettings(
        file=Path(os.path.abspath(args.file)),
        backend=args.backend,
        netns=args.netns,
        resync=args.resync,
        debounce=args.debounce_ms / 1000,
        metrics=args.metrics,
    )
    return Daemon(settings).run()


def cmd_sandbox(args: argparse.Namespace) -> int:
    from . import lab

    if args.action == "up":
        lab_map = lab.up(args.prefix)
        print(lab_map.render())
    else:
        lab.down(args.prefix)
        print(f"sandbox {args.prefix} removed")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(backend=args.backend, prefix=args.prefix, keep=args.keep)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kernform", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = top.add_subparsers(dest="command", required=True)

    def with_backend(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backend", choices=BACKENDS, help="override spec.backend")

    def with_netns(p: argparse.ArgumentParser) -> None:
        p.add_argument("--netns", metavar="NS", help="target this network namespace (default: the host's)")

    p = sub.add_parser("validate", help="check intent files and report every problem as FILE:LINE:COL")
    p.add_argument("files", nargs="+", metavar="FILE")
    with_backend(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("compile", help="print the lowered artifacts (nft ruleset, ip rules and routes)")
    p.add_argument("file", metavar="FILE")
    with_backend(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("plan", help="dry run: what apply would change in the kernel")
    p.add_argument("file", metavar="FILE")
    with_backend(p)
    with_netns(p)
    p.add_argument("--json", action="store_true", help="machine-readable plan (schemas/plan.schema.json)")
    p.add_argument("--detailed-exitcode", action="store_true", help="exit 0: no changes, 2: changes, 1: error")
    p.add_argument("--full", action="store_true", help="list every set element instead of a summary per set")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", help="make the kernel hold the intent (atomic, verified)")
    p.add_argument("file", metavar="FILE")
    with_backend(p)
    with_netns(p)
    p.add_argument("--quiet", "-q", action="store_true", help="do not print the plan")
    p.add_argument("--full", action="store_true", help="list every set element in the plan")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("destroy", help="remove every object the intent owns")
    p.add_argument("file", metavar="FILE", nargs="?")
    p.add_argument("--intent", metavar="NAME", help="the intent's metadata.name, instead of a file")
    with_netns(p)
    p.set_defaults(func=cmd_destroy)

    p = sub.add_parser("status", help="what is applied, with per-rule counters")
    p.add_argument("file", metavar="FILE", nargs="?")
    with_backend(p)
    with_netns(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("watch", help="keep the kernel holding FILE: reconcile on every change (foreground daemon)")
    p.add_argument("file", metavar="FILE")
    with_backend(p)
    with_netns(p)
    p.add_argument("--resync", type=_positive, default=30.0, metavar="SECONDS",
                   help="full pass at least this often, events or not (default 30)")
    p.add_argument("--metrics", metavar="ADDR", help="serve Prometheus metrics on [HOST:]PORT")
    p.add_argument("--debounce-ms", type=_positive, default=30.0, metavar="MS",
                   help="quiet time after the last event before a pass (default 30)")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="json: one object per line")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("sandbox", help="the isolated lab of network namespaces")
    p.add_argument("action", choices=("up", "down"))
    p.add_argument("--prefix", default="kf", help="namespace name prefix (default kf)")
    p.set_defaults(func=cmd_sandbox)

    p = sub.add_parser("demo", help="lab up, apply an example, show real traffic, destroy, lab down")
    with_backend(p)
    p.add_argument("--prefix", default="kf")
    p.add_argument("--keep", action="store_true", help="leave the lab and the applied intent in place")
    p.set_defaults(func=cmd_demo)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "command", None) == "destroy" and not (args.file or args.intent):
        print("kernform destroy: give FILE or --intent NAME", file=sys.stderr)
        return 1
    try:
        return int(args.func(args))
    except IntentError as exc:
        print(exc, file=sys.stderr)
        return 1
    except ApplyError as exc:
        print(f"kernform: apply failed: {exc}", file=sys.stderr)
        residual = getattr(exc, "residual", None)
        if residual is not None:
            from reconciler.plan import render_text

            sys.stderr.write(render_text(residual))
        return 1
    except KernformError as exc:
        print(f"kernform: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

