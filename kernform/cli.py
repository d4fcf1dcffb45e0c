"""The `kernform` command line: validate, compile, plan, apply, destroy, status, watch, sandbox, demo.

Exit status: 0 success (with `plan --detailed-exitcode`: no changes); 1 error
(an invalid file, a kernel failure, a stale saved plan); 2 changes pending, only
with `plan --detailed-exitcode` (as Terraform does); 64 a usage error (an unknown
option, a missing argument: sysexits' EX_USAGE); 130 interrupted (Ctrl-C); 141
stdout closed early (`kernform plan --json | head`). Errors are printed as
FILE:LINE:COL: message (intent problems) or one line saying what failed and what
was kept; never a traceback for any of these.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from compiler import BACKENDS, BackendUnavailable, compile_intent
from compiler.allocation import assign_slots
from compiler.conflicts import conflicts
from compiler.conflicts import find as find_conflicts
from compiler.errors import ApplyError, IntentError, KernformError
from compiler.loader import STDIN, LoadedIntent, collect_inputs, load_inputs
from compiler.objects import DesiredState, count_by_kind
from compiler.render import render

from . import saved_plan
from .version import __version__

if TYPE_CHECKING:
    from compiler.management import Connection
    from reconciler.observe import Target
    from reconciler.plan import Plan

# The reconciler (pyroute2, libnftables) is imported by the commands that touch
# the kernel only, so validate and compile stay fast and work anywhere.


def _colour(stream: Any) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ


def _compile(loaded: LoadedIntent, backend: str | None, slots: Mapping[str, int] | None = None,
             netns: str | None = None) -> DesiredState:
    """compile_intent, with what the backend refuses reported like any problem of the file: at FILE:LINE:COL;
    the interception settings it leaves out from its slot (compiler.allocation), slot 0 when none is given."""
    try:
        return compile_intent(loaded.intent, backend, (slots or {}).get(loaded.intent.metadata.name, 0), netns)
    except BackendUnavailable as exc:
        raise IntentError(loaded.problems_at(exc.findings)) from None


def _unique(loaded: Sequence[LoadedIntent]) -> list[LoadedIntent]:
    """The first intent of each name (a later one of the same name is a problem collect_inputs reported)."""
    first: dict[str, LoadedIntent] = {}
    for item in loaded:
        first.setdefault(item.intent.metadata.name, item)
    return list(first.values())


def _slots(loaded: Sequence[LoadedIntent], backend: str | None, target: Target | None = None) -> dict[str, int]:
    """The interception slot of each input intent that needs one: against what `target` holds (an applied
    intent keeps its recorded slot), or among the inputs alone without a target."""
    if target is None:
        intents = [item.intent for item in loaded]
        return assign_slots(intents, [backend or i.spec.backend for i in intents])
    from reconciler.applied import allocate_slots

    return allocate_slots(target, loaded, backend)


def _compile_all(loaded: Sequence[LoadedIntent], backend: str | None,
                 slots: Mapping[str, int] | None = None, netns: str | None = None) -> list[DesiredState]:
    """Every intent compiled; what any backend refuses, in any of them, raised at once."""
    compiled: list[DesiredState] = []
    problems = []
    for item in loaded:
        try:
            compiled.append(_compile(item, backend, slots, netns))
        except IntentError as exc:
            problems += exc.problems
    if problems:
        raise IntentError(problems)
    return compiled


def _checked(args: argparse.Namespace, loaded: list[LoadedIntent],
             target: Target | None = None) -> tuple[list[LoadedIntent], list[DesiredState], dict[str, int]]:
    """The inputs compiled, free of conflicts between them, with their slots allocated against `target`;
    raises IntentError otherwise."""
    slots = _slots(loaded, args.backend, target)
    found = conflicts(loaded, args.backend, slots, args.netns)
    try:
        desired = _compile_all(loaded, args.backend, slots, args.netns)
    except IntentError as exc:
        raise IntentError(exc.problems + found) from None  # every problem at once
    if found:
        raise IntentError(found)
    return loaded, desired, slots


def _refuse_applied_conflicts(target: Target, loaded: Sequence[LoadedIntent], desired: Sequence[DesiredState],
                              slots: Mapping[str, int]) -> None:
    """Collisions with intents already applied in the target (reconciler.applied), before anything changes."""
    from reconciler.applied import applied_conflicts

    found = applied_conflicts(target, list(zip(loaded, desired, strict=True)), slots)
    if found:
        raise IntentError(found)


def _lock_intents(stack: contextlib.ExitStack, args: argparse.Namespace, names: Sequence[str], kind: str) -> None:
    """Take the lock of each intent on the target (reconciler.lock), in name order so two runs over
    overlapping sets cannot deadlock; released when `stack` closes. A run of the CLI waits for another
    (saying so), unless --no-wait; an intent a `kernform watch` keeps is refused: the daemon would undo it."""
    from reconciler.lock import RUN_DIR, IntentLock

    for name in sorted(set(names)):
        def wait(pid: int | None, holder: str, name: str = name) -> bool:
            if holder == "watch" or args.no_wait:
                return False
            who = f"kernform {holder}" + (f" (pid {pid})" if pid else "")
            print(f"kernform: waiting for {who} to finish with intent {name}...", file=sys.stderr)
            return True

        lock = IntentLock(RUN_DIR, args.netns, name, kind)
        lock.acquire(wait)
        stack.callback(lock.release)


def _one_plan_document(args: argparse.Namespace, loaded: Sequence[LoadedIntent]) -> bool:
    """Whether `plan --json` prints a formatVersion 1 plan: one file argument holding one intent, as before
    several inputs existed. A directory, several files, stdin or several documents give formatVersion 2."""
    return (len(args.files) == 1 and args.files[0] != STDIN and not os.path.isdir(args.files[0])
            and len(loaded) == 1)


def cmd_validate(args: argparse.Namespace) -> int:
    loaded, problems = collect_inputs(args.files)
    slots = _slots(_unique(loaded), args.backend)
    compiled: list[tuple[LoadedIntent, DesiredState]] = []
    for item in loaded:
        try:
            compiled.append((item, _compile(item, args.backend, slots)))
        except IntentError as exc:
            problems += exc.problems
    found = find_conflicts(_unique(loaded), args.backend, slots)
    problems += [c.problem() for c in found]
    # "valid" means valid within this set: intents in a conflict or sharing a name are not listed as valid.
    names = [item.intent.metadata.name for item in loaded]
    excluded = {id(c.first) for c in found} | {id(c.second) for c in found}
    valid = []
    for item, desired in compiled:
        name = item.intent.metadata.name
        if id(item) in excluded or names.count(name) > 1:
            continue
        counts = count_by_kind(desired.objects)
        valid.append({"path": item.path, "intent": name, "objects": sum(counts.values())})
        if not args.json:
            print(f"{item.path}: valid (intent {name}, {sum(counts.values())} kernel objects)")
    if args.json:
        print(json.dumps({"valid": valid, "problems": [dataclasses.asdict(p) for p in problems]}, indent=2))
    if problems:
        if not args.json:
            print(IntentError(problems), file=sys.stderr)
        return 1
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    loaded = load_inputs(args.files)
    for index, desired in enumerate(_compile_all(loaded, args.backend, _slots(loaded, args.backend))):
        if index:
            sys.stdout.write("\n")
        sys.stdout.write(render(desired))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from reconciler.apply import make_plan
    from reconciler.observe import Target
    from reconciler.plan import PlanSet, render_set_text, render_text

    loaded = load_inputs(args.files)
    with Target(args.netns) as target:
        loaded, desired, slots = _checked(args, loaded, target)
        _refuse_applied_conflicts(target, loaded, desired, slots)
        plans = PlanSet(target.label, tuple(_readable(make_plan(target, wanted)[0], target) for wanted in desired))
    if args.out:
        _write_atomically(args.out, saved_plan.dumps(args.netns, args.backend, loaded,
                                                     [p.to_dict() for p in plans.plans], __version__))
    if _one_plan_document(args, loaded):
        (plan,) = plans.plans
        if args.json:
            print(plan.to_json())
        else:
            sys.stdout.write(render_text(plan, colour=_colour(sys.stdout), full=args.full))
    elif args.json:
        print(plans.to_json())
    else:
        sys.stdout.write(render_set_text(plans, colour=_colour(sys.stdout), full=args.full))
    if args.out:
        print(f"Saved the plan to {args.out}: `kernform apply {args.out}` applies exactly it, and refuses if the "
              "files or the kernel changed since.", file=sys.stderr if args.json else sys.stdout)
    if args.detailed_exitcode and not plans.empty:
        return 2
    return 0


def _readable(plan: Plan, target: Target) -> Plan:
    """`plan` with the kernel's text of every rule it changes or removes (rules read back carry only their
    digest): the old side of a change is shown as what it says, not as a digest."""
    from compiler.objects import NftRule

    if not any(isinstance(a.old, NftRule) and not a.old.text for a in plan.actions):
        return plan
    from compiler.objects import nft_table_name

    texts = target.nft.rule_texts(nft_table_name(plan.intent))
    actions = tuple(a._replace(old=dataclasses.replace(a.old, text=texts[a.key]))
                    if isinstance(a.old, NftRule) and not a.old.text and a.key in texts else a
                    for a in plan.actions)
    return dataclasses.replace(plan, actions=actions)


def _write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def cmd_apply(args: argparse.Namespace) -> int:
    from reconciler.apply import apply, make_plan
    from reconciler.audit import Cause
    from reconciler.checkpoint import take
    from reconciler.observe import Target
    from reconciler.plan import render_text

    saved = _saved_plan(args)
    loaded = saved.loaded() if saved is not None else load_inputs(args.files)
    several = len(loaded) > 1
    done: list[str] = []
    trials: list[str] = []
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as locks, Target(args.netns) as target:
        _lock_intents(locks, args, [item.intent.metadata.name for item in loaded], "apply")
        loaded, desired, slots = _checked(args, loaded, target)
        # Every refusal before the first intent touches the kernel.
        _refuse_applied_conflicts(target, loaded, desired, slots)
        _refuse_pending_checkpoints(args, loaded)
        if not args.force:
            _refuse_cutting_the_session(args, target, loaded)
        if saved is not None:
            for item, wanted in zip(loaded, desired, strict=True):
                saved.check_plan(item.intent.metadata.name, _readable(make_plan(target, wanted)[0], target).to_dict(),
                                 target.label)
        # Intent by intent, in input order; each apply is atomic and verified on its own.
        for index, (item, wanted) in enumerate(zip(loaded, desired, strict=True)):
            name = item.intent.metadata.name
            try:
                plan, observed = make_plan(target, wanted)
                if saved is not None:  # again, under the lock, as it is applied
                    saved.check_plan(name, _readable(plan, target).to_dict(), target.label)
                if not args.quiet and not args.json:
                    sys.stdout.write(render_text(_readable(plan, target), colour=_colour(sys.stdout),
                                                 full=args.full))
                if plan.empty:
                    if several and args.quiet and not args.json:
                        print(f"intent {name}: no changes.")
                    _record_claims(args, item, wanted)
                    results.append({"intent": name, "result": "no changes"})
                    done.append(name)
                    continue
                if args.confirm_within:
                    take(target, observed, args.confirm_within)
                    trials.append(name)
                _progress(plan)
                result = apply(target, wanted, plan, observed, cause=Cause.of_text("cli", item.path, item.text))
            except KernformError as exc:
                if trials:
                    # A trial is all or nothing: the intents already applied on trial go back too (the
                    # failed one kept its previous state), and no checkpoint is left without its waiter.
                    _roll_back_trials(args, target, trials, name)
                if not several:
                    raise
                _print_error(exc)
                rest = [i.intent.metadata.name for i in loaded[index + 1:]]
                print(f"kernform: stopped at intent {name}, whose apply failed (see above); applied on "
                      f"{target.label}: {', '.join(done) or 'none'}; not applied: {', '.join([name, *rest])}.",
                      file=sys.stderr)
                return 1
            _record_claims(args, item, wanted)
            counts = plan.counts()
            results.append({"intent": name, "result": "applied", **counts, "operations": result.operations,
                            "milliseconds": round(result.seconds * 1000, 1), "verified": True})
            if not args.json:
                print(
                    f"Apply complete{f' (intent {name})' if several else ''}: {counts['add']} added, "
                    f"{counts['change']} changed, {counts['remove']} removed "
                    f"({result.operations} kernel operations, {result.seconds * 1000:.0f} ms); verified."
                )
            done.append(name)
        if trials:
            return _on_trial(args, target, trials)
    if args.json:
        print(json.dumps({"target": target.label, "intents": results}, indent=2))
    elif several:
        print(f"Applied {len(done)} intents on {target.label}: {', '.join(done)}.")
    return 0


def _progress(plan: Plan) -> None:
    """On a terminal, say what takes seconds before it starts: compiling BPF C, or a large transaction."""
    if not sys.stderr.isatty():
        return
    programs = [a.key.name for a in plan.actions if a.kind == "bpf.program" and a.op != "remove"]
    if programs:
        print(f"kernform: compiling and loading {len(programs)} BPF program{'s' if len(programs) > 1 else ''} "
              f"({', '.join(programs)}): a few seconds...", file=sys.stderr, flush=True)
    elif len(plan.actions) > 10_000:
        print(f"kernform: applying {len(plan.actions)} changes...", file=sys.stderr, flush=True)


def _saved_plan(args: argparse.Namespace) -> saved_plan.SavedPlan | None:
    """The saved plan `apply` was given (kernform.saved_plan), its target and backend taken as `args`' own;
    None for intents."""
    if len(args.files) != 1 or not saved_plan.is_saved_plan(args.files[0]):
        return None
    saved = saved_plan.load(args.files[0])
    for option, given, planned in (("--netns", args.netns, saved.netns), ("--backend", args.backend, saved.backend)):
        if given is not None and given != planned:
            raise KernformError(f"{saved.path} was planned with {option} {planned or '(none)'}, not {given}: "
                                "a saved plan is applied where and as it was made")
    args.netns, args.backend = saved.netns, saved.backend
    saved.check_inputs()
    return saved


def _record_claims(args: argparse.Namespace, item: LoadedIntent, wanted: DesiredState) -> None:
    """What the applied intent takes, for later applies of other intents to check (reconciler.applied)."""
    from compiler.allocation import in_target
    from compiler.conflicts import claims_record
    from reconciler import ownership

    ownership.record_claims(args.netns, item.intent.metadata.name,
                            claims_record(in_target(item.intent, args.netns), wanted.backend))


def _refuse_pending_checkpoints(args: argparse.Namespace, loaded: Sequence[LoadedIntent]) -> None:
    from reconciler import checkpoint

    for item in loaded:
        name = item.intent.metadata.name
        held = checkpoint.load(args.netns, name)
        if held is not None and not held.confirmed:
            raise KernformError(f"intent {name} has a change awaiting confirmation ({held.remaining:.0f} s left): "
                                f"`kernform confirm{_netns_flag(args)}` keeps it, `kernform rollback"
                                f"{_netns_flag(args)}` puts the previous state back")


def _netns_flag(args: argparse.Namespace) -> str:
    return f" --netns {args.netns}" if args.netns else ""


def _management_connection(args: argparse.Namespace, target: Target) -> Connection | None:
    """The SSH connection this command runs over, when it arrives in the target (the namespace kernform
    runs in: without --netns)."""
    from compiler.management import Connection

    ssh = os.environ.get("SSH_CONNECTION", "")
    if args.netns or not ssh:
        return None
    connection = Connection.from_ssh(ssh)
    if connection is None:
        return None
    return Connection(connection.client, connection.server, connection.port,
                      target.netlink.interface_towards(connection.client))


def _refuse_cutting_the_session(args: argparse.Namespace, target: Target, loaded: Sequence[LoadedIntent]) -> None:
    """An intent that would drop, divert or rewrite a new connection like the SSH session this command
    runs over is refused (--force applies it anyway), at the places of the file that would do it."""
    from compiler.management import cuts

    connection = _management_connection(args, target)
    if connection is None:
        return
    problems = []
    for item in loaded:
        found = cuts(item.intent, connection)
        problems += item.problems_at([(path, f"{why}; --force applies it anyway") for path, why in found])
    if problems:
        raise IntentError(problems)


def _on_trial(args: argparse.Namespace, target: Target, names: list[str]) -> int:
    """After an apply with --confirm-within: run the probes (a failure rolls back at once), then leave a
    waiter that rolls back unless `kernform confirm` arrives in time."""
    from reconciler import checkpoint
    from reconciler.audit import Cause

    probes = list(args.probe)
    connection = _management_connection(args, target)
    if not probes and connection is not None:
        probes.append(f"{connection.server}:{connection.port}")
    failed = [f"{probe}: {why}" for probe in probes if (why := _probe(args.netns, probe)) is not None]
    if failed:
        for name in names:
            held = checkpoint.load(args.netns, name)
            if held is not None:
                checkpoint.revert(target, held, Cause("probe-failed"))
                checkpoint.discard(args.netns, name)
        print(f"kernform: probe failed ({'; '.join(failed)}): the previous state was put back.", file=sys.stderr)
        return 1
    for name in names:
        waiter = subprocess.Popen(
            [sys.executable, "-m", "kernform.cli", "await-confirm", "--intent", name,
             *(["--netns", args.netns] if args.netns else [])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)  # outlives this command and its SSH session
        held = checkpoint.load(args.netns, name)
        if held is not None:
            checkpoint.save(dataclasses.replace(held, waiter=waiter.pid))
    passed = f" Probes passed: {', '.join(probes)}." if probes else ""
    print(f"Applied on trial:{passed} Run `kernform confirm{_netns_flag(args)}` within "
          f"{args.confirm_within:g} s to keep it; otherwise the previous state is put back "
          f"(`kernform rollback{_netns_flag(args)}` does it now).")
    return 0


def _roll_back_trials(args: argparse.Namespace, target: Target, trials: list[str], failed: str) -> None:
    from reconciler import checkpoint
    from reconciler.audit import Cause

    for name in reversed(trials):
        held = checkpoint.load(args.netns, name)
        if held is not None and name != failed:
            checkpoint.revert(target, held, Cause("trial-failed"))
        checkpoint.discard(args.netns, name)
    if len(trials) > 1 or trials[0] != failed:
        print(f"kernform: the apply on trial failed at intent {failed}: "
              f"{', '.join(n for n in trials if n != failed)} put back as they were.", file=sys.stderr)


def _probe(netns: str | None, probe: str, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to HOST:PORT succeeds from the target, else why not."""
    from reconciler.netns import entered

    host, _, port = probe.rpartition(":")
    host = host.strip("[]")
    try:
        with entered(netns):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(timeout)
            sock.connect((host, int(port)))
    except (OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    return None


def _checkpoint_names(args: argparse.Namespace) -> list[str]:
    from reconciler import checkpoint

    return args.intent or [c.intent for c in checkpoint.pending(args.netns)]


def cmd_confirm(args: argparse.Namespace) -> int:
    from reconciler import checkpoint

    names = _checkpoint_names(args)
    confirmed = [name for name in names if checkpoint.confirm(args.netns, name)]
    if not confirmed:
        print(f"kernform: no change awaits confirmation on {args.netns or 'the host'}.", file=sys.stderr)
        return 1
    print(f"Confirmed: {', '.join(confirmed)} keep the applied state.")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from reconciler import checkpoint
    from reconciler.audit import Cause
    from reconciler.observe import Target

    names = _checkpoint_names(args)
    done = []
    with contextlib.ExitStack() as locks, Target(args.netns) as target:
        _lock_intents(locks, args, names, "apply")
        for name in names:
            held = checkpoint.load(args.netns, name)
            if held is None or held.confirmed:
                continue
            checkpoint.revert(target, held, Cause("cli"))
            checkpoint.discard(args.netns, name)
            done.append(name)
    if not done:
        print(f"kernform: no change awaits confirmation on {args.netns or 'the host'}.", file=sys.stderr)
        return 1
    print(f"Rolled back: {', '.join(done)} hold their previous state again.")
    return 0


def cmd_await_confirm(args: argparse.Namespace) -> int:
    """The waiter left by `apply --confirm-within`: rolls back at the deadline unless confirmed."""
    from reconciler import checkpoint
    from reconciler.audit import Cause
    from reconciler.observe import Target

    args.no_wait = False
    while True:
        held = checkpoint.load(args.netns, args.intent)
        if held is None:
            return 0  # rolled back by hand, or discarded
        if held.confirmed:
            checkpoint.discard(args.netns, args.intent)
            return 0
        if held.remaining <= 0:
            break
        time.sleep(min(0.2, held.remaining))
    with contextlib.ExitStack() as locks, Target(args.netns) as target:
        _lock_intents(locks, args, [args.intent], "apply")
        held = checkpoint.load(args.netns, args.intent)
        if held is not None and not held.confirmed:
            checkpoint.revert(target, held, Cause("confirm-timeout"))
        checkpoint.discard(args.netns, args.intent)
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    from reconciler.apply import destroy, make_plan
    from reconciler.audit import Cause
    from reconciler.observe import Target
    from reconciler.plan import render_text

    # The reverse of apply's order; intents named with --intent after those of the files.
    names = [item.intent.metadata.name for item in reversed(load_inputs(args.files))] if args.files else []
    names += [name for name in args.intent or [] if name not in names]
    done: list[str] = []
    removed: list[dict[str, Any]] = []
    with contextlib.ExitStack() as locks, Target(args.netns) as target:
        _lock_intents(locks, args, names, "destroy")
        # What will go, shown and agreed to before anything does (as `terraform destroy`).
        plans = {name: make_plan(target, DesiredState(intent=name, backend="none", objects=()))[0] for name in names}
        doomed = [name for name in names if not plans[name].empty]
        if doomed:
            if not args.quiet and not args.json:
                for name in doomed:
                    sys.stdout.write(render_text(_readable(plans[name], target), colour=_colour(sys.stdout),
                                                 full=args.full, title=f"kernform destroy: intent {name} on "
                                                                       f"{target.label}, everything it owns"))
            if not args.yes and not _confirmed(
                    f"Destroy {sum(len(plans[n].actions) for n in doomed)} objects of intent"
                    f"{'s' if len(doomed) > 1 else ''} {', '.join(doomed)} on {target.label}?"):
                return 1
        for index, name in enumerate(names):
            try:
                result = destroy(target, name, cause=Cause("cli"))
            except KernformError:
                if len(names) > 1:
                    print(f"kernform: stopped at intent {name}, whose destroy failed; destroyed on {target.label}: "
                          f"{', '.join(done) or 'none'}; not destroyed: {', '.join(names[index:])}.", file=sys.stderr)
                raise
            done.append(name)
            removed.append({"intent": name, "removed": len(result.plan.actions)})
            if args.json:
                continue
            if result.plan.empty:
                print(f"Nothing to destroy: intent {name} owns no objects on {target.label}.")
            else:
                print(f"Destroy complete: {len(result.plan.actions)} objects of intent {name} removed from "
                      f"{target.label}.")
    if args.json:
        print(json.dumps({"target": target.label, "intents": removed}, indent=2))
    return 0


def _confirmed(question: str) -> bool:
    """Ask on the terminal; anything but `yes` cancels. Without a terminal there is no one to ask: refuse."""
    if not sys.stdin.isatty():
        print("kernform destroy: not confirmed: stdin is not a terminal to ask on; add --yes to destroy "
              "without asking. Nothing was changed.", file=sys.stderr)
        return False
    try:
        answer = input(f"{question}\n  Only 'yes' will be accepted: ")
    except EOFError:
        answer = ""
    if answer.strip() != "yes":
        print("Destroy cancelled. Nothing was changed.", file=sys.stderr)
        return False
    return True


def _counter_origin(name: str) -> str:
    """The origin an nft counter of kernform counts for, from its name (`f_forward_deny-admin` ->
    `filtering.forward/deny-admin`); see reconciler.status.nft_counter_origin."""
    from reconciler.status import nft_counter_origin

    return nft_counter_origin(name)[1]


def cmd_status(args: argparse.Namespace) -> int:
    from reconciler import checkpoint
    from reconciler.apply import make_plan
    from reconciler.lock import RUN_DIR
    from reconciler.observe import Target
    from reconciler.status import applied_backends, applied_intents, counters, format_counters, watch_record

    report: list[dict[str, Any]] = []
    with Target(args.netns) as target:
        inputs: list[tuple[str, LoadedIntent | None]]
        if args.files:
            inputs = [(item.intent.metadata.name, item) for item in load_inputs(args.files)]
        else:
            inputs = [(name, None) for name in applied_intents(target)]
        for name, loaded in inputs:
            observed = target.observe(name)
            found = applied_backends(observed)
            # The backend is what the kernel holds; --backend overrides; the file decides only when the
            # kernel cannot (nothing applied, or both backends' state after an interrupted switch).
            if args.backend:
                backend, source = args.backend, "--backend"
            elif len(found) == 1:
                backend, source = found[0], "kernel"
            elif loaded is not None:
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
            if loaded is not None:
                entry["specBackend"] = loaded.intent.spec.backend
                desired = _compile(loaded, backend, _slots([loaded], backend, target), args.netns)
                plan, _ = make_plan(target, desired)
                entry["inSync"] = plan.empty
                entry["pendingChanges"] = plan.counts()
            shown = [args.backend] if args.backend else list(found)
            entry["counters"] = counters(target, observed, shown, loaded.intent if loaded else None, desired)
            entry["watch"] = watch_record(RUN_DIR, args.netns, name)
            trial = checkpoint.load(args.netns, name)
            entry["trial"] = (None if trial is None or trial.confirmed
                              else {"secondsLeft": round(max(0.0, trial.remaining), 1), "waiter": trial.waiter})
            report.append(entry)
    if args.json:
        print(json.dumps({"target": target.label, "intents": report}, indent=2))
        return 0
    if not report:
        print(f"No kernform intents are applied on {target.label}.")
    for entry in report:
        state = "applied" if entry["applied"] else "not applied"
        if entry["backend"] is None:
            held = " and ".join(entry["appliedBackends"])
            which = f"backend unknown ({held})" if held else "no backend state (no chains, no BPF programs)"
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
        watch = entry["watch"]
        if watch is None:
            print("  watch: none (no `kernform watch` keeps it applied)")
        else:
            health = "healthy" if watch.get("health") == "ok" else f"{watch.get('health')}: {watch.get('reason')}"
            print(f"  watch: kernform watch pid {watch.get('pid', '?')} of {watch.get('file', '?')}, {health}")
        if entry.get("trial"):
            print(f"  on trial: applied with --confirm-within, rolled back in {entry['trial']['secondsLeft']:g} s "
                  f"unless `kernform confirm{_netns_flag(args)}`")
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
        bpf_check=args.bpf_check,
        debounce=args.debounce_ms / 1000,
        metrics=args.metrics,
        prune=args.prune,
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


EX_USAGE = 64


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on their own exit status (EX_USAGE), apart from 2, which
    `plan --detailed-exitcode` gives "changes pending"."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="kernform", description=__doc__.splitlines()[0] if __doc__ else None)
    top.add_argument("--version", action="version", version=f"kernform {__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    def with_backend(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backend", choices=BACKENDS, help="override spec.backend")

    def with_netns(p: argparse.ArgumentParser) -> None:
        p.add_argument("--netns", metavar="NS", help="target this network namespace (default: the host's)")

    inputs_help = ("intent files, directories (their *.yaml and *.yml files, sorted) or - for stdin; a file may "
                   "hold several intents separated by ---")

    def with_inputs(p: argparse.ArgumentParser, nargs: str = "+") -> None:
        p.add_argument("files", nargs=nargs, metavar="INPUT", help=inputs_help)

    p = sub.add_parser("validate", help="check intents, and conflicts between them; every problem as FILE:LINE:COL")
    with_inputs(p)
    with_backend(p)
    p.add_argument("--json", action="store_true", help="the valid intents and every problem, for machines")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("compile", help="print the lowered artifacts (nft ruleset, ip rules and routes)")
    with_inputs(p)
    with_backend(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("plan", help="dry run: what apply would change in the kernel, per intent")
    with_inputs(p)
    with_backend(p)
    with_netns(p)
    p.add_argument("--json", action="store_true", help="machine-readable plan (schemas/plan.schema.json)")
    p.add_argument("--detailed-exitcode", action="store_true", help="exit 0: no changes, 2: changes, 1: error")
    p.add_argument("--full", action="store_true", help="list every set element instead of a summary per set")
    p.add_argument("--out", metavar="PLANFILE",
                   help="also save the plan: `kernform apply PLANFILE` applies exactly it, or refuses")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", help="make the kernel hold the intents, one by one in input order (each atomic, "
                                     "verified); or apply exactly a plan saved with `plan --out`")
    p.add_argument("files", nargs="+", metavar="INPUT", help=inputs_help + "; or one PLANFILE")
    with_backend(p)
    with_netns(p)
    p.add_argument("--quiet", "-q", action="store_true", help="do not print the plan")
    p.add_argument("--json", action="store_true", help="what was applied, per intent, for machines (no plan text)")
    p.add_argument("--full", action="store_true", help="list every set element in the plan")
    p.add_argument("--no-wait", action="store_true",
                   help="fail instead of waiting while another kernform run changes one of the intents")
    p.add_argument("--confirm-within", type=_positive, metavar="SECONDS",
                   help="keep the change only if `kernform confirm` arrives within SECONDS (and the probes "
                        "pass); otherwise the previous state is put back")
    p.add_argument("--probe", action="append", default=[], metavar="HOST:PORT",
                   help="with --confirm-within: a TCP connect that must succeed from the target after the "
                        "apply (default when run over SSH: the SSH server's address and port); may be repeated")
    p.add_argument("--force", action="store_true",
                   help="apply even an intent that would cut the SSH connection this command runs over")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("confirm", help="keep the changes applied with --confirm-within")
    p.add_argument("--intent", metavar="NAME", action="append",
                   help="only this intent (default: every change awaiting confirmation in the target)")
    with_netns(p)
    p.set_defaults(func=cmd_confirm)

    p = sub.add_parser("rollback", help="put back now the state from before an apply with --confirm-within")
    p.add_argument("--intent", metavar="NAME", action="append",
                   help="only this intent (default: every change awaiting confirmation in the target)")
    with_netns(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("await-confirm", help=argparse.SUPPRESS)
    p.add_argument("--intent", required=True)
    with_netns(p)
    p.set_defaults(func=cmd_await_confirm)

    p = sub.add_parser("destroy", help="remove every object the intents own (in reverse input order)")
    with_inputs(p, "*")
    p.add_argument("--intent", metavar="NAME", action="append",
                   help="an intent's metadata.name, instead of (or besides) files; may be repeated")
    p.add_argument("--yes", "-y", action="store_true",
                   help="do not ask (needed without a terminal): what the intents own is removed at once")
    p.add_argument("--quiet", "-q", action="store_true", help="do not print what will be removed")
    p.add_argument("--json", action="store_true", help="what was removed, per intent, for machines")
    p.add_argument("--full", action="store_true", help="list every set element in what will be removed")
    with_netns(p)
    p.add_argument("--no-wait", action="store_true",
                   help="fail instead of waiting while another kernform run changes one of the intents")
    p.set_defaults(func=cmd_destroy)

    p = sub.add_parser("status", help="what is applied, with per-rule counters")
    with_inputs(p, "*")
    with_backend(p)
    with_netns(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("watch", help="keep the kernel holding FILE, or every intent of DIRECTORY: reconcile on "
                       "every change (foreground daemon)")
    p.add_argument("file", metavar="FILE|DIRECTORY")
    p.add_argument("--prune", action="store_true",
                   help="with a directory: destroy an intent whose file or document is gone (default: leave it)")
    with_backend(p)
    with_netns(p)
    p.add_argument("--resync", type=_positive, default=30.0, metavar="SECONDS",
                   help="full pass at least this often, events or not (default 30)")
    p.add_argument("--bpf-check", type=float, default=0.5, metavar="SECONDS",
                   help="read the ebpf intents' BPF state this often to find drift no kernel event announces "
                        "(a detached link, a replaced program, a map entry written by hand); 0: only at passes")
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

    p = sub.add_parser("completion", help="print the shell completion script: "
                                          "`source <(kernform completion bash)`")
    p.add_argument("shell", choices=("bash", "zsh", "fish"))
    p.set_defaults(func=cmd_completion)

    p = sub.add_parser("demo", help="lab up, apply an example, show real traffic, destroy, lab down")
    with_backend(p)
    p.add_argument("--prefix", default="kf")
    p.add_argument("--keep", action="store_true", help="leave the lab and the applied intent in place")
    p.set_defaults(func=cmd_demo)
    return top


def cmd_completion(args: argparse.Namespace) -> int:
    import argcomplete

    sys.stdout.write(argcomplete.shellcode(["kernform"], shell=args.shell))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    top = parser()
    if "_ARGCOMPLETE" in os.environ:  # a completing shell is asking (see `kernform completion`)
        import argcomplete

        argcomplete.autocomplete(top)
    try:
        code = _run(top, argv)
        sys.stdout.flush()  # here, not at exit: a write the pipe took only part of fails now, where it is caught
        return code
    except BrokenPipeError:
        # The reader went away (`kernform plan --json | head`): say nothing more, and let the interpreter's
        # final flush of stdout find /dev/null instead of the closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _run(top: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = top.parse_args(argv)
    if getattr(args, "command", None) == "destroy" and not (args.files or args.intent):
        top.print_usage(sys.stderr)
        print("kernform destroy: give INPUT or --intent NAME", file=sys.stderr)
        return EX_USAGE
    from reconciler import collector

    # A one-shot command is one pass (reconciler.collector); the daemons hold the collector off per pass.
    long_lived = getattr(args, "command", None) in ("watch", "await-confirm")
    try:
        with contextlib.nullcontext() if long_lived else collector.paused():
            return int(args.func(args))
    except KernformError as exc:
        return _print_error(exc)
    except KeyboardInterrupt:
        return 130


def _print_error(exc: KernformError) -> int:
    """Report an error on stderr as the CLI does (intent problems as FILE:LINE:COL); returns the exit status."""
    if isinstance(exc, IntentError):
        print(exc, file=sys.stderr)
    elif isinstance(exc, ApplyError):
        print(f"kernform: apply failed: {exc}", file=sys.stderr)
        residual = getattr(exc, "residual", None)
        if residual is not None:
            from reconciler.plan import render_text

            sys.stderr.write(render_text(residual))
    else:
        print(f"kernform: {exc}", file=sys.stderr)
    return 1



if __name__ == "__main__":
    raise SystemExit(main())
