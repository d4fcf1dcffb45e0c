"""`kernform destroy` shows what it will remove and asks; without a terminal it needs --yes.

In a namespace of its own: without a terminal and without --yes nothing is removed (exit 1, the reason on
stderr); on a terminal (a pty) the plan of removals is shown, any answer but `yes` cancels, `yes` destroys.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox import ROOT, kernform, sh, veth_namespace

NS = "kfdconf"
INTENT = ("apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata: {name: dconf}\nspec:\n  backend: tproxy\n"
          "  filtering:\n    forward:\n      rules:\n        - {name: deny-docs, action: deny, "
          "destinations: [192.0.2.0/24]}\n")


@pytest.fixture
def applied(tmp_path: Path) -> Iterator[str]:
    with veth_namespace(NS, "dc0") as ns:
        path = tmp_path / "intent.yaml"
        path.write_text(INTENT)
        assert kernform("apply", str(path), "--netns", ns, "--quiet").returncode == 0
        try:
            yield ns
        finally:
            kernform("destroy", "--yes", "--intent", "dconf", "--netns", ns)


def table_present(ns: str) -> bool:
    return "kernform-dconf" in sh("ip", "netns", "exec", ns, "nft", "list", "tables")


def on_a_terminal(ns: str, answer: str) -> tuple[int, str]:
    """`kernform destroy --intent dconf` with a pty as its terminal, answering `answer` to the question."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "kernform", "destroy", "--intent", "dconf", "--netns", ns],
                            stdin=follower, stdout=follower, stderr=follower, cwd=ROOT, close_fds=True)
    os.close(follower)
    output = b""
    answered = False
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            proc.kill()
            raise AssertionError(f"no output for 60 s: {output!r}")
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
        if not answered and b"Only 'yes' will be accepted" in output:
            os.write(leader, answer.encode() + b"\n")
            answered = True
    os.close(leader)
    return proc.wait(timeout=60), output.decode(errors="replace")


def test_destroy_asks_and_needs_yes_without_a_terminal(applied: str) -> None:
    res = subprocess.run([sys.executable, "-m", "kernform", "destroy", "--intent", "dconf", "--netns", applied],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 1 and "add --yes" in res.stderr, res.stderr
    assert "- " in res.stdout and "192.0.2.0/24" in res.stdout  # what would have gone was shown
    assert table_present(applied)

    code, shown = on_a_terminal(applied, "no")
    assert code == 1 and "Destroy cancelled" in shown and "objects of intent dconf on netns kfdconf?" in shown, shown
    assert table_present(applied)

    code, shown = on_a_terminal(applied, "yes")
    assert code == 0 and "Destroy complete" in shown, shown
    assert not table_present(applied)


def test_a_changed_or_removed_rule_shows_what_the_kernel_holds(applied: str, tmp_path: Path) -> None:
    """Rules read back carry only digests; plan and destroy show the kernel's text of the old rule."""
    path = tmp_path / "changed.yaml"
    path.write_text(INTENT.replace("destinations: [192.0.2.0/24]", "destinations: [192.0.2.0/24], protocol: tcp"))
    res = kernform("plan", str(path), "--netns", applied)
    assert res.returncode == 0 and "(was: rule filter_forward[1] ip daddr @f_forward_deny-docs_dst4 counter" in \
        res.stdout, res.stdout
    assert "(digest " not in res.stdout
    res = subprocess.run([sys.executable, "-m", "kernform", "destroy", "--intent", "dconf", "--netns", applied],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "ct state established,related accept" in res.stdout and "(digest " not in res.stdout, res.stdout
