"""The tproxy lowering: golden files per example, and the properties that keep it cheap."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path

import pytest

from compiler import compile_intent
from compiler.loader import load_file, parse_text
from compiler.objects import KernelObject, NftElement, NftRule, ObjectKey, index_by_key
from compiler.render import render
from reconciler.plan import diff, render_text

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("backend", ["tproxy", "ebpf"])
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_compiled_output_matches_golden_file(path: Path, backend: str) -> None:
    text = render(compile_intent(load_file(path).intent, backend))
    # The program digests cover bpf/ sources: golden files pin the lowering, not the C.
    text = re.sub(r"(digest\s+)[0-9a-f]{16}", r"\1<digest>", text)
    golden = GOLDEN / f"{path.stem}.{backend}.txt"
    if os.environ.get("KERNFORM_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.exists(), f"no golden file {golden}: KERNFORM_UPDATE_GOLDEN=1 writes it"
    assert text == golden.read_text(), f"compiled output changed: KERNFORM_UPDATE_GOLDEN=1 to accept ({golden})"


def big_intent(cidrs: int, backends: int) -> str:
    # every other /24, so that collapsing cannot merge them
    sources = "\n".join(f"            - 10.{i // 128}.{i % 128 * 2}.0/24" for i in range(cidrs))
    members = "\n".join(f"          - {{address: 10.200.{i // 250}.{i % 250 + 1}, weight: {i % 5 + 1}}}" for i in range(backends))
    return f"""apiVersion: kernform/v1
kind: NetworkIntent
metadata: {{name: big}}
spec:
  loadBalancing:
    services:
      - name: svc
        vip: 10.100.0.1
        port: 80
        backends:
{members}
  filtering:
    input:
      rules:
        - name: deny-list
          action: deny
          sources:
{sources}
"""


def test_ten_thousand_cidrs_are_one_rule_and_a_set() -> None:
    desired = compile_intent(parse_text(big_intent(10_000, 10), "big.yaml").intent)
    rules = [o for o in desired.objects if isinstance(o, NftRule) and o.chain == "filter_input"]
    elements = [o for o in desired.objects if isinstance(o, NftElement) and o.set == "f_input_deny-list_src4"]
    assert len(rules) == 3  # established, the deny rule, the default-policy counter
    assert len(elements) == 10_000


def test_compile_of_ten_thousand_elements_is_fast() -> None:
    text = big_intent(10_000, 1_000)
    started = time.perf_counter()
    compile_intent(parse_text(text, "big.yaml").intent)
    # Generous bound (the benchmark measures); this catches accidental quadratic work.
    assert time.perf_counter() - started < 10


def test_adding_one_cidr_changes_one_element() -> None:
    before = compile_intent(parse_text(big_intent(100, 3), "a.yaml").intent)
    after = compile_intent(parse_text(big_intent(101, 3), "a.yaml").intent)
    plan = diff("big", "tproxy", "t", index_by_key(after.objects), index_by_key(before.objects))
    assert [(a.op, a.key.name) for a in plan.actions] == [("add", "f_input_deny-list_src4 10.0.200.0/24")]


def test_overlapping_cidrs_are_collapsed_for_interval_sets() -> None:
    text = big_intent(0, 1).replace("          sources:\n", "          sources: [10.0.0.0/8, 10.1.0.0/16, 10.1.2.3]\n")
    desired = compile_intent(parse_text(text, "o.yaml").intent)
    elements = [o.element for o in desired.objects if isinstance(o, NftElement) and o.set.startswith("f_input")]
    assert elements == ["10.0.0.0/8"]


def test_plan_text_names_the_intent_rule_and_summarises() -> None:
    desired = compile_intent(load_file(ROOT / "examples" / "edge-gateway.yaml").intent)
    plan = diff("edge-gateway", "tproxy", "netns x", index_by_key(desired.objects), {})
    text = render_text(plan)
    assert "# filtering.forward/deny-admin" in text
    assert "elements of lb_web6" in text  # large element lists are summarised per set
    assert text.rstrip().endswith(f"Plan: {len(plan.actions)} to add, 0 to change, 0 to remove.")


def test_a_re_sliced_away_element_is_shown_as_part_of_its_service() -> None:
    """A weight change removes map elements the kernel holds without an origin of their own: the plan names
    the service they belong to (their desired map's origin), not "not in the intent"."""
    before = compile_intent(parse_text(big_intent(3, 20), "i.yaml").intent, "tproxy")
    after = compile_intent(parse_text(big_intent(3, 20).replace("weight: 1}", "weight: 7}", 1), "i.yaml").intent,
                           "tproxy")
    observed = {key: NftElement(o.table, o.set, o.element, o.value) if isinstance(o, NftElement) else o
                for key, o in before.by_key().items()}  # as read back: no origins on elements
    plan = diff("i", "tproxy", "host", after.by_key(), observed)
    removed = [a for a in plan.actions if a.op == "remove" and a.kind == "nft.element"]
    assert removed and {a.origin for a in removed} == {"loadBalancing/svc"}, {a.origin for a in removed}
    text = render_text(plan)
    assert "not in the intent" not in text
    counts = plan.counts()
    assert text.splitlines()[1] == f"By intent part: loadBalancing/svc +{counts['add']} -{counts['remove']}"


@pytest.mark.parametrize("before,after", [("tproxy", "ebpf"), ("ebpf", "tproxy")])
def test_a_backend_switch_is_named_in_one_line(before: str, after: str) -> None:
    loaded = load_file(ROOT / "examples" / "service-lb.yaml")
    old = compile_intent(loaded.intent, before).by_key()
    new = compile_intent(loaded.intent, after).by_key()
    text = render_text(diff("service-lb", after, "host", new, old))
    assert text.splitlines()[1] == (f"Backend switch: {before} -> {after} (the {before} objects go, the {after} "
                                    "ones come)"), text[:300]
    same = render_text(diff("service-lb", after, "host", new, new))
    assert "Backend switch" not in same


def test_rules_that_only_moved_are_not_changes() -> None:
    """A rule added first in a chain moves every rule after it: the plan counts and shows one addition; a
    pure reorder shows as the chain's rules put back in order, and still refills the chain."""
    def intent(rules: list[str]) -> dict[ObjectKey, KernelObject]:
        body = "".join(f"        - {{name: {r}, action: deny, destinations: [192.0.2.{i}/32]}}\n"
                       for i, r in enumerate(rules))
        text = ("apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata: {name: moves}\nspec:\n  filtering:\n"
                f"    forward:\n      rules:\n{body}")
        return compile_intent(parse_text(text, "m.yaml").intent, "tproxy").by_key()

    before = intent(["a", "b", "c"])
    plan = diff("moves", "tproxy", "host", intent(["new", "a", "b", "c"]), before)
    assert plan.counts()["change"] == 0 and plan.counts()["add"] >= 1
    assert sum(a.moved_only for a in plan.actions) == 4  # a, b, c, the default counter: refilled in order
    assert "put back" not in render_text(plan) and "~ rule" not in render_text(plan)

    # The same rules in another order (the kernel's order edited by hand): not empty, shown as a reorder.
    rules = sorted((o for o in before.values() if isinstance(o, NftRule) and o.rule_id.startswith(("a", "b"))),
                   key=lambda r: r.index)
    first, second = rules[0], rules[1]
    held = dict(before)
    held[first.key] = dataclasses.replace(first, index=second.index)
    held[second.key] = dataclasses.replace(second, index=first.index)
    reorder = diff("moves", "tproxy", "host", before, held)
    assert not reorder.empty and reorder.counts() == {"add": 0, "change": 0, "remove": 0}
    assert "chain filter_forward: its rules put back in the intent's order" in render_text(reorder)
