"""compiler.fastyaml returns exactly what yaml.load returns, or raises what it raises."""

from __future__ import annotations

import importlib
import random
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from compiler import fastyaml
from compiler.loader import _FastLoader

ROOT = Path(__file__).resolve().parents[2]
# bench/ is not an installed package: take it from the checkout, whatever the working directory.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
intents = importlib.import_module("bench.intents")
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))


def _outcome(load: Any, text: str) -> tuple[str, str]:
    # repr, not ==: it also compares recursive data (an alias inside its own anchor),
    # NaN (.nan), key order and types (1 vs True vs "1").
    try:
        return "data", repr(load(text))
    except Exception as exc:  # yaml.YAMLError, or ValueError for an impossible date
        return type(exc).__name__, str(exc)


def assert_same(text: str) -> None:
    expected = _outcome(lambda t: yaml.load(t, Loader=_FastLoader), text)
    got = _outcome(lambda t: fastyaml.load(t, _FastLoader), text)
    assert got == expected, text


def flow_doc(n: int) -> str:
    return intents.dump(intents.control_plane_doc("x", "tproxy", n))


def block_doc(n: int) -> str:
    return yaml.safe_dump(intents.control_plane_doc("x", "tproxy", n), sort_keys=False, default_flow_style=False)


def hand_written_doc(n: int) -> str:
    """The examples' style: indented sequences, one-line flow mappings with spaces inside braces."""
    cidrs = "\n".join(f"          - {c}" for c in intents.blocklist(n))
    backends = "\n".join(f"          - {{ address: 10.90.0.{i}, port: 8080 }}" for i in range(n))
    return ("apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata:\n  name: x\nspec:\n"
            "  filtering:\n    forward:\n      rules:\n        - name: deny\n          action: deny\n"
            f"          destinations:\n{cidrs}\n  loadBalancing:\n    services:\n      - name: web\n"
            f"        vip: 10.99.9.10\n        port: 80\n        backends:\n{backends}\n")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples(path: Path) -> None:
    assert_same(path.read_text())


@pytest.mark.parametrize("n", [100, 10_000])
@pytest.mark.parametrize("style", [flow_doc, block_doc, hand_written_doc], ids=lambda f: f.__name__)
def test_bench_documents(style: Any, n: int) -> None:
    text = style(n)
    assert_same(text)
    assert_same(text)  # again, from the memo


@pytest.mark.parametrize("style", [flow_doc, block_doc, hand_written_doc], ids=lambda f: f.__name__)
def test_long_lists_take_the_fast_path(style: Any) -> None:
    # Not a vacuous pass: the runs are found, so the equalities above test the splicing.
    assert fastyaml._runs(style(100))


def _items(k: int, fmt: str = "10.0.0.{}/32") -> list[str]:
    return [fmt.format(i) for i in range(k)]


FLOW = "[" + ", ".join(_items(40)) + "]"
WRAPPED = "[" + ",\n    ".join(_items(40)) + "]"
BLOCK = "".join(f"  - {c}\n" for c in _items(40))
INDENTLESS = "".join(f"- {c}\n" for c in _items(40))

CASES = {
    "flow value": f"k: {FLOW}\n",
    "wrapped flow": f"k: {WRAPPED}\n",
    "top-level flow": f"{WRAPPED}\n",
    "trailing comma": f"k: [{', '.join(_items(40))},\n  ]\n",
    "two trailing commas": f"k: [{', '.join(_items(40))},,]\n",
    "empty item": f"k: [a, , {', '.join(_items(40))}]\n",
    "closing bracket at column 0": f"k: [\n  {', '.join(_items(40))}\n]\n",
    "document marker in a flow": f"k: [{', '.join(_items(40))},\n---]\n",
    "flow in a comment": f"k: 1  # {FLOW}\n",
    "flow in a quoted scalar": f"k: \"{FLOW}\"\n",
    "flow in a single-quoted scalar": f"k: '{WRAPPED}'\n",
    "flow in a plain scalar": f"k: a {WRAPPED}\n",
    "flow in a block scalar": f"k: |\n  {FLOW}\nj: 2\n",
    "flow as a key": f"{FLOW}: 1\n",
    "flow as a key in a flow mapping": f"{{{FLOW}: 1}}\n",
    "anchored flow": f"a: &x {WRAPPED}\nb: *x\n",
    "recursive alias": f"a: &x [*x, {', '.join(_items(40))}]\n",
    "tagged flow": f"a: !!seq {FLOW}\n",
    "set tag": f"a: !!set {FLOW}\n",
    "tag glued to a flow": f"a: !!str{FLOW}\n",
    "multi-line scalars": "k: [" + ", ".join(f"a{i}\n     b{i}\n\n     c{i}" for i in range(40)) + "]\n",
    "ipv6": "k: [" + ", ".join(f"fd00:{i}::/64" for i in range(40)) + ", 2001:db8::1]\n",
    "mapping items in a flow": "k: [" + ", ".join(f"a{i}: {i}" for i in range(40)) + "]\n",
    "colon items": "k: [:a, " + ", ".join(_items(40)) + "]\n",
    "dash items": "k: [-1, -a, " + ", ".join(_items(40)) + ", -]\n",
    "yaml 1.1 scalars": "k: [" + ", ".join(["yes", "on", "off", "~", "null", "1:20", "0x1f", "0o17", "017",
                                            "1_000", ".inf", "-.inf", "1e3", "2001-02-03", "2001-02-03 04:05:06",
                                            "=", "<<", "true", "Null", "NO"] * 3) + "]\n",
    "impossible date": "k: [" + ", ".join(_items(40)) + ", 2001-02-30]\n",
    "control character": "k: [" + ", ".join(_items(40)) + ", a\x0bb]\n",
    "no-break space": "k: [" + ", ".join(_items(40)) + ", \xa0a\xa0]\n",
    "block value": f"k:\n{BLOCK}j: 1\n",
    "indentless": f"k:\n{INDENTLESS}j: 1\n",
    "top-level block": BLOCK,
    "no final newline": f"k:\n{BLOCK}".rstrip("\n"),
    "deeper line after a block run": f"k:\n{BLOCK}    continued\n",
    "deeper line after blank lines": f"k:\n{BLOCK}\n\n    continued\n",
    "deeper comment after a block run": f"k:\n{BLOCK}    # note\nj: 1\n",
    "same-indent line after a block run": f"k:\n{BLOCK}  j: 1\n",
    "tab after a block run": f"k:\n{BLOCK}\tj: 1\n",
    "mapping items in a block": "k:\n" + "".join(f"  - a{i}: {i}\n" for i in range(40)),
    "mapping item continued": "k:\n" + "".join(f"  - a{i}: {i}\n" for i in range(40)) + "    b: 2\n",
    "block mappings": "k:\n" + "".join(f"  - a: {i}\n    b: x\n    c: {i}.5\n" for i in range(40)),
    "block mappings, indentless": "k:\n" + "".join(f"- a: {i}\n  b: x\n" for i in range(40)) + "j: 1\n",
    "block mapping continued deeper": "k:\n" + "".join(f"  - a: {i}\n    b: x\n" for i in range(40))
                                      + "    c:\n      d: 1\n",
    "block mapping with a nested sequence": "k:\n" + "".join(f"  - a: {i}\n    b: x\n" for i in range(40))
                                            + "    c:\n    - 1\n",
    "block mapping with a null value": "k:\n" + "".join(f"  - a: {i}\n    b:\n" for i in range(40)),
    "block mapping with a duplicate key": "k:\n" + "".join(f"  - a: {i}\n    b: x\n" for i in range(40))
                                          + "  - a: 1\n    a: 2\n",
    "multi-line plain block items": "k:\n" + "".join(f"  - a{i}\n    b{i}\n" for i in range(40)),
    "mapping after a scalar item": "k:\n" + "".join(f"  - a{i}\n    b: {i}\n" for i in range(40)),
    "flow mappings in a block": "k:\n" + "".join(f"  - {{a: {i}, b: x}}\n" for i in range(40)),
    "duplicate key in a flow mapping": "k:\n" + "".join(f"  - {{a: {i}, b: x}}\n" for i in range(40))
                                       + "  - {a: 1, a: 2}\n",
    "block run in a block scalar": f"k: |\n{BLOCK}j: 1\n",
    "block run in a plain scalar": f"k: foo\n{BLOCK}",
    "block run in a quoted scalar": f"k: \"foo\n{BLOCK}\"\n",
    "block run in a flow": f"k: [\n{BLOCK}]\n",
    "omap tag": "k: !!omap\n" + "".join(f"  - a{i}: {i}\n" for i in range(40)),
    "anchored block": f"k: &x\n{BLOCK}j: *x\n",
    "merge key": "base: &b {z: 1}\nk:\n  <<: *b\n  l:\n" + "".join(f"    - {c}\n" for c in _items(40)),
    "nested sequence item": "k:\n  - - a\n" + BLOCK,
    "two runs in one list": "k:\n" + BLOCK + "  - 'q'\n" + BLOCK + "  - [1]\n" + BLOCK,
    "runs everywhere": f"a: {WRAPPED}\nb:\n{BLOCK}c: {FLOW}\nd:\n{INDENTLESS}",
    "two documents": f"k: {FLOW}\n---\nj: {FLOW}\n",
    "document end": f"k: {FLOW}\n...\n",
    "crlf": f"k: {WRAPPED}\nj:\n{BLOCK}".replace("\n", "\r\n"),
    "placeholder-like text": f"k: {FLOW}\nj: __kf_splice_\n",
    # Hexadecimal is text in a mark (the value of fwmark, an item of marks) and refused elsewhere: a context
    # that a run's items do not carry, so the result must not depend on how they are batched.
    "hex marks": "marks: [" + ", ".join(f"{i:#x}" for i in range(1, 41)) + "]\n",
    "hex marks, block": "marks:\n" + "".join(f"  - {i:#x}\n" for i in range(1, 41)),
    "hex outside marks": "ports: [" + ", ".join(f"{i:#x}" for i in range(1, 41)) + "]\n",
    "hex fwmark items": "k:\n" + "".join(f"  - {{fwmark: {i:#x}, b: x}}\n" for i in range(40)),
    "hex fwmark block items": "k:\n" + "".join(f"  - fwmark: {i:#x}\n    b: x\n" for i in range(40)),
    "hex in another key": "k:\n" + "".join(f"  - {{mark: {i:#x}, b: x}}\n" for i in range(40)),
    "yaml 1.2 words": "k: [" + ", ".join(["true", "False", "TRUE", "null", "Null", "~", ".inf", "-.Inf", ".NaN",
                                           "1.5", "-0", "+7", "1.", ".5", "1.5e+3"] * 3) + "]\n",
    "empty": "",
    "comment only": "# nothing\n",
}


@pytest.mark.parametrize("text", CASES.values(), ids=CASES.keys())
def test_cases(text: str) -> None:
    assert_same(text)
    assert_same(text)


def test_duplicate_keys_in_a_spliced_flow_mapping_still_raise() -> None:
    good = "k:\n" + "".join(f"  - {{a: {i}, b: x}}\n" for i in range(40))
    fastyaml.load(good, _FastLoader)  # every item memoised
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key"):
        fastyaml.load(good + "  - {a: 1, b: 2, a: 3}\n", _FastLoader)


def test_the_memo_does_not_leak_mutations() -> None:
    text = "k:\n" + "".join(f"  - {{a: {i}, b: x}}\n" for i in range(40)) + f"j: {WRAPPED}\n"
    expected = yaml.load(text, Loader=_FastLoader)
    first = fastyaml.load(text, _FastLoader)
    first["k"][0]["a"] = "changed"
    first["k"][1].clear()
    first["k"].append("more")
    first["j"][0] = "changed"
    first["j"].append("more")
    assert fastyaml.load(text, _FastLoader) == expected


def test_a_full_memo_is_emptied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastyaml, "_MEMO_LIMIT", 50)
    monkeypatch.setattr(fastyaml, "_memos", {})
    for n in (40, 80, 120, 40):
        assert_same(hand_written_doc(n))
        assert_same(flow_doc(n))
    # Emptied when found above the limit, then filled with at most one document's items.
    assert fastyaml._memos and all(len(memo) <= 50 + 120 for memo in fastyaml._memos.values())


# What edits put into or next to the runs: everything that could change their meaning.
SNIPPETS = [
    "# comment", "#", "'quoted'", '"quoted"', "'multi\n  line'", "&anchor", "*anchor", "&a x", "*a", "!!str",
    "!tag", "|", "|\n  block text", ">-", "key: value", "key:", ": v", "? k", "- x", "-", "- - x", "[x]", "{x: 1}",
    "{x: 1, x: 2}", "[", "]", "{", "}", ",", ", ,", "~", "null", "", "yes", "on", "No", "1:20", "0x1f", "-1",
    "1e3", ".inf", ".nan", "2001-02-03", "2001-02-30", "\t", "\tx", " ", "  ", "\n", "\n\n", "\n  continued",
    "\n        deeper", "\n---", "\n...", "---", "%YAML 1.1", "@x", "`x", "a\\b", "x #c", "x\x0by", "\xa0", "é",
    "fd00::1", "10.0.0.1/32", "__kf_splice_",
]


def _mutate(text: str, rng: random.Random) -> str:
    lines = text.split("\n")
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines))
        snippet = rng.choice(SNIPPETS)
        line = lines[i]
        indent = len(line) - len(line.lstrip(" "))
        action = rng.randrange(6)
        if action == 0:  # a new line, at this line's indentation, deeper, or shallower
            pad = " " * max(0, indent + rng.choice([-2, 0, 0, 2, 4]))
            lines.insert(i, pad + rng.choice(["", "- ", "k: "]) + snippet)
        elif action == 1 and len(lines) > 1:
            del lines[i]
        elif action == 2 and ", " in line:  # replace one item of a flow line
            items = line.split(", ")
            items[rng.randrange(len(items))] = snippet
            lines[i] = ", ".join(items)
        elif action == 3 and line.lstrip().startswith("- "):  # replace a block item
            lines[i] = line[:indent] + "- " + snippet
        elif action == 4:  # characters anywhere in the line
            j = rng.randint(0, len(line))
            lines[i] = line[:j] + snippet + line[j:]
        else:  # a copy of another line, e.g. a run's item out of place
            lines.insert(i, rng.choice(lines))
    return "\n".join(lines)


@pytest.mark.parametrize("base", [flow_doc, block_doc, hand_written_doc], ids=lambda f: f.__name__)
def test_random_edits(base: Any) -> None:
    rng = random.Random(0x5EED)
    text = base(60)
    for _ in range(150):
        assert_same(_mutate(text, rng))


def test_timing_report(capsys: pytest.CaptureFixture[str]) -> None:
    """Not an assertion on speed: a print, to see the gain (pytest -s)."""
    text = flow_doc(10_000)
    edited = text.replace("72.207.52.0/24", "72.207.52.0/25", 1)
    fastyaml.load(text, _FastLoader)
    timings = {}
    for name, load in (("yaml.load", lambda: yaml.load(edited, Loader=_FastLoader)),
                       ("fastyaml.load, warm", lambda: fastyaml.load(edited, _FastLoader))):
        start = time.perf_counter()
        load()
        timings[name] = (time.perf_counter() - start) * 1e3
    with capsys.disabled():
        print(" ".join(f"{name}: {ms:.1f} ms" for name, ms in timings.items()), end=" ")
