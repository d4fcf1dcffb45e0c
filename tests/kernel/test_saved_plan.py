"""`kernform plan --out PLANFILE` and `kernform apply PLANFILE`: exactly the reviewed plan, or a refusal.

In a namespace of its own: a saved plan applies and leaves the kernel as the intent says; a plan saved
before the kernel changed (the intent applied meanwhile, or an element deleted by hand), or before its
file changed, is refused with exit 1, a message naming what changed, and the kernel byte for byte as it was.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox import kernform, sh, veth_namespace

NS = "kfsaved"
TABLE = "kernform-savedplan"


def intent(*cidrs: str) -> str:
    return ("apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata: {name: savedplan}\nspec:\n  backend: tproxy\n"
            "  filtering:\n    forward:\n      rules:\n"
            f"        - {{name: deny-docs, action: deny, destinations: [{', '.join(cidrs)}]}}\n")


@pytest.fixture
def ns() -> Iterator[str]:
    with veth_namespace(NS, "sp0") as name:
        try:
            yield name
        finally:
            kernform("destroy", "--yes", "--intent", "savedplan", "--netns", name, "--quiet")


def ruleset(ns: str) -> str:
    return sh("ip", "netns", "exec", ns, "nft", "list", "ruleset")


def test_a_saved_plan_applies_exactly_and_a_stale_one_is_refused(ns: str, tmp_path: Path) -> None:
    path, saved = tmp_path / "intent.yaml", tmp_path / "plan.json"
    path.write_text(intent("192.0.2.0/24"))
    res = kernform("plan", str(path), "--netns", ns, "--out", str(saved))
    assert res.returncode == 0 and "Saved the plan" in res.stdout, res.stderr
    assert json.loads(saved.read_text())["kind"] == "kernform-saved-plan"
    assert ruleset(ns).strip() == ""  # planning changed nothing

    res = kernform("apply", str(saved), "--json")  # the target comes from the plan
    assert res.returncode == 0, res.stderr
    applied = json.loads(res.stdout)
    assert applied["target"] == f"netns {ns}" and applied["intents"][0]["result"] == "applied"
    assert applied["intents"][0]["verified"] and applied["intents"][0]["add"] > 0
    assert "192.0.2.0/24" in ruleset(ns)
    assert kernform("plan", str(path), "--netns", ns, "--detailed-exitcode").returncode == 0

    # Saved, then the kernel moves on (the same change applied meanwhile): refused, nothing touched.
    path.write_text(intent("192.0.2.0/24", "198.51.100.0/24"))
    assert kernform("plan", str(path), "--netns", ns, "--out", str(saved)).returncode == 0
    assert kernform("apply", str(path), "--netns", ns, "--quiet").returncode == 0
    before = ruleset(ns)
    res = kernform("apply", str(saved))
    assert res.returncode == 1 and "the kernel changed since the plan" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and ruleset(ns) == before

    # Saved, then an element deleted by hand: the saved plan (no changes) no longer says what apply would do.
    assert kernform("plan", str(path), "--netns", ns, "--out", str(saved)).returncode == 0
    sh("ip", "netns", "exec", ns, "nft", "delete", "element", "inet", TABLE, "f_forward_deny-docs_dst4",
       "{ 198.51.100.0/24 }")
    before = ruleset(ns)
    res = kernform("apply", str(saved))
    assert res.returncode == 1 and "the kernel changed since the plan" in res.stderr, res.stderr
    assert ruleset(ns) == before

    # Saved, then the file edited: refused before the kernel is even read.
    assert kernform("plan", str(path), "--netns", ns, "--out", str(saved)).returncode == 0
    path.write_text(intent("203.0.113.0/24"))
    res = kernform("apply", str(saved))
    assert res.returncode == 1 and f"{path} changed since the plan" in res.stderr, res.stderr
    assert ruleset(ns) == before

    # Elsewhere than planned: refused.
    path.write_text(intent("192.0.2.0/24", "198.51.100.0/24"))
    assert kernform("plan", str(path), "--netns", ns, "--out", str(saved)).returncode == 0
    res = kernform("apply", str(saved), "--netns", "kfsaved-other")
    assert res.returncode == 1 and "planned with --netns kfsaved" in res.stderr, res.stderr
    # ... and where planned, the saved plan repairs the deleted element.
    assert kernform("apply", str(saved), "--quiet").returncode == 0
    assert "198.51.100.0/24" in ruleset(ns)
