"""The command line's habits: --version, exit statuses kept apart, completion, no traceback on a closed pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernform.version import __version__

ROOT = Path(__file__).resolve().parents[2]


def kernform(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kernform", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, **kwargs)  # type: ignore[call-overload]


def test_version_names_the_distribution_version() -> None:
    res = kernform("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"kernform {__version__}"
    assert __version__ != "unknown"


@pytest.mark.parametrize("argv", [["plan"], ["apply", "--no-such-option", "x.yaml"], ["frobnicate"],
                                  ["destroy"], ["watch", "f.yaml", "--resync", "-1"]])
def test_a_usage_error_exits_64_not_2_which_means_changes_pending(argv: list[str]) -> None:
    res = kernform(*argv)
    assert res.returncode == 64, (res.returncode, res.stderr)
    assert "usage: kernform" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_complete_commands_and_options(shell: str) -> None:
    res = kernform("completion", shell)
    assert res.returncode == 0 and "kernform" in res.stdout and "_ARGCOMPLETE" in res.stdout
    # What the script asks the program, answered as a shell would be.
    line = "kernform plan --detailed"
    asked = subprocess.run(
        [sys.executable, "-m", "kernform"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "COMP_LINE": line, "COMP_POINT": str(len(line)), "_ARGCOMPLETE": "1",
             "_ARGCOMPLETE_STDOUT_FILENAME": "/dev/stdout"})
    assert "--detailed-exitcode" in asked.stdout, asked


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path: Path) -> None:
    """`kernform compile BIG | head -c 100`: the output (a chain per service) outgrows the pipe, the reader
    closes it."""
    services = "".join(f"      - {{name: s{i}, vip: 10.100.{i // 256}.{i % 256}, port: 80, "
                       f"backends: [{{address: 10.90.0.1, port: 8080}}]}}\n" for i in range(3000))
    intent = tmp_path / "big.yaml"
    intent.write_text("apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata: {name: big}\nspec:\n"
                      "  backend: tproxy\n  loadBalancing:\n    services:\n" + services)
    proc = subprocess.Popen([sys.executable, "-m", "kernform", "compile", str(intent)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(100)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    # 141 when a write failed on the closed pipe; Python's buffered stdout may also drop the rest silently.
    assert proc.wait(timeout=120) in (0, 141), stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_a_write_to_a_closed_pipe_exits_141_without_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from kernform import cli

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    with open(write_end, "w") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        assert cli.main(["compile", str(ROOT / "examples" / "service-lb.yaml")]) == 141
    assert "Traceback" not in capsys.readouterr().err


def test_progress_is_said_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from compiler.objects import ObjectKey
    from kernform import cli
    from reconciler.plan import Action, Plan

    plan = Plan("i", "ebpf", "host", (Action("add", ObjectKey("bpf.program", "tc_filter"), None, None),))

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, said in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        cli._progress(plan)
        assert ("compiling and loading 1 BPF program (tc_filter)" in stream.getvalue()) is said


def test_validate_json_lists_valid_intents_and_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata: {name: bad}\nspec:\n  backend: tproxy\n"
                   "  filtering:\n    input:\n      rules:\n        - {name: ssh, action: alow}\n")
    res = kernform("validate", "--json", "examples/service-lb.yaml", str(bad))
    assert res.returncode == 1 and res.stderr == "", res.stderr
    out = json.loads(res.stdout)
    assert [v["intent"] for v in out["valid"]] == ["service-lb"]
    assert [(p["file"], p["line"]) for p in out["problems"]] == [(str(bad), 9)]
    assert "did you mean 'allow'?" in out["problems"][0]["message"]
