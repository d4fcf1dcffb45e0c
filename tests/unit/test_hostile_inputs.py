"""Hostile inputs: every mutation of the bundled examples is refused with problems at FILE:LINE:COL, fast.

The corpus is generated from examples/*.yaml and examples/gitops: values of the wrong type, forms YAML 1.1
and 1.2 read differently, explicit tags, control characters, deep nesting, alias bombs, merge keys, huge
numbers, duplicate keys, truncations, documents that are not one intent, and values the kernel would refuse
only at apply. Each must raise IntentError (nothing else) within two seconds, every problem at a line and
column of the file; a sample also goes through `kernform validate`, as a user would run it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from compiler import fastyaml, yaml12
from compiler.errors import IntentError
from compiler.loader import MAX_FILE_BYTES, load_file, parse_text

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted([*ROOT.glob("examples/*.yaml"), *ROOT.glob("examples/gitops/*/*.yaml")])
SECONDS = 2.0


@dataclass(frozen=True)
class Case:
    name: str
    text: str


def _sources() -> list[tuple[str, str]]:
    return [(path.stem, path.read_text()) for path in EXAMPLES]


# ------------------------------------------------------------------ values of the wrong type or reading
# A field written `key: value`, in a block line or in a flow mapping; the value up to `,`, `}` or a comment.
_FIELD = re.compile(r"(?:^[ ]*(?:- )?|[{,][ ]*)(?P<key>[A-Za-z$]+): (?P<value>\[[^\]\n]*\]|[^\s,{}\[#][^,{}\n#]*?)"
                    r"(?=[ ]*(?:[,}]|#|$))", re.M)

NUMBER_BAD = ["true", "false", '"80"', "1.5", "0100", "0x50", "1:30", "1_000", "on", "1e3", "-.5", "0o17", "0b101",
              "[80]", "{a: 1}", "9" * 30, "9" * 5000, "-1", ".inf", ".nan", "''"]
STRING_BAD = ["true", "80", "on", "no", "Off", "y", "2001-02-03", "1.5", "[x]", "{x: 1}", "0100", "0x50", "1:30", "="]
BOOL_BAD = ['"yes"', "1", "yes", "on", "0", '"true"', "y", "off", "[true]", "No"]
LIST_BAD = ["[true]", "[on]", "[0100]", "[0x50]", "[1:30]", "x", "80", "true", "[[x]]", "[{a: 1}]", "[2001-02-03]"]
PORTS_BAD = ["[0100]", "[true]", "[0x50]", '["80-"]', '["\u0668\u0660"]', "[1:30]", "[on]", '["0x50"]', '["80 "]',
             "[65536]", "[1_000]", '["90-80"]']
MARK_BAD = ["true", "0100", "1:30", '"0x"', "[1]", "on", "0x1_0", '"0x_10"', '"-0x10"', '" 16"', "-16", "0x1ffffffff"]
IDS_BAD = ['["1000-"]', "[true]", "[0100]", '["-1"]', '["1_000"]', '["1000-999"]', "[1:30]"]
BAD_VALUES: dict[str, list[str]] = {
    **dict.fromkeys(("port", "proxyPort", "weight", "id", "priority", "metric", "rate", "burst", "routingTable",
                     "rulePriority"), NUMBER_BAD),
    **dict.fromkeys(("name", "vip", "address", "via", "dev", "iif", "oif", "table", "algorithm", "action", "direction",
                     "default", "per", "backend", "kind", "apiVersion", "to", "from", "protocol"), STRING_BAD),
    "stateful": BOOL_BAD,
    **dict.fromkeys(("destinations", "sources", "interfaces", "protocols"), LIST_BAD),
    "ports": PORTS_BAD,
    "fwmark": MARK_BAD,
    **dict.fromkeys(("uids", "gids"), IDS_BAD),
}
# Values that are invalid everywhere they are given: wrong for every field above.
TAGS = ["!!str ", "!!binary ", "!custom ", "! ", "!!int ", "!<tag:yaml.org,2002:str> "]


def _field_cases() -> Iterator[Case]:
    for stem, text in _sources():
        for occurrence, match in enumerate(_FIELD.finditer(text)):
            key, (start, end) = match["key"], match.span("value")
            line = text.count("\n", 0, start) + 1
            column = start - text.rfind("\n", 0, start)
            bad = BAD_VALUES.get(key)
            if bad:
                # Two wrong values per field, rotating through the list, so every value is used somewhere.
                for k in range(2):
                    index = (occurrence * 2 + k) % len(bad)
                    yield Case(f"{stem}:{line}:{column}:{key}=#{index}:{bad[index][:10]}",
                               text[:start] + bad[index] + text[end:])
            if occurrence % 2 == 0:
                tag = TAGS[occurrence // 2 % len(TAGS)]
                yield Case(f"{stem}:{line}:{column}:{key}-tag{tag.strip()}", text[:start] + tag + text[start:])


# ------------------------------------------------------------------ characters, nesting, aliases, keys
CHARACTERS = ["\x00", "\x01", "\x07", "\x08", "\x0b", "\x0c", "\x1b", "\x7f", "\x80", "\x85", "\x9f", "\u2028",
              "\u2029", "\ufeff", "\ufffe", "\uffff", "\ud800"]


def _character_cases() -> Iterator[Case]:
    for index, (stem, text) in enumerate(_sources()):
        comment = text.index("#") + 2 if "#" in text else 0
        places = {"comment": comment, "value": text.index("kernform/v1") + 4, "line start": text.index("\nkind") + 1,
                  "end": len(text)}
        for k, (where, at) in enumerate(places.items()):
            character = CHARACTERS[(index * len(places) + k) % len(CHARACTERS)]
            yield Case(f"{stem}:U+{ord(character):04X} at {where}", text[:at] + character + text[at:])


HEADER = "apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata:\n  name: hostile\nspec:\n"


def _spec(text: str, body: str) -> str:
    """`body` (lines indented under spec) added at the start of the example's spec."""
    return text.replace("\nspec:\n", "\nspec:\n" + body, 1)


def _laughs(levels: int, width: int) -> str:
    lines = [f"  l0: &l0 [{', '.join(['lol'] * width)}]\n"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]\n" for i in range(1, levels)]
    return "".join(lines)


def _structure_cases() -> Iterator[Case]:
    for stem, text in _sources():
        # A list of the example (or a route's destination): where nested lists and aliases are put.
        listed = next(m for m in _FIELD.finditer(text) if m["key"] in ("destinations", "interfaces", "to"))
        start, end = listed.span("value")
        for depth in (65, 400, 999, 1001, 5000):
            nested = "[" * depth + "x" + "]" * depth
            yield Case(f"{stem}:flow depth {depth}", text[:start] + nested + text[end:])
        for depth in (70, 400):
            block = "".join("  " * (i + 1) + f"k{i}:\n" for i in range(depth)) + "  " * (depth + 1) + "leaf\n"
            yield Case(f"{stem}:block depth {depth}", _spec(text, block))
        yield Case(f"{stem}:flow mapping depth", _spec(text, "  x: " + "{a: " * 300 + "1" + "}" * 300 + "\n"))
        # Aliases: bombs of several shapes, recursion, an undefined alias, an alias as a key.
        yield Case(f"{stem}:billion laughs", _spec(text, _laughs(9, 9)))
        yield Case(f"{stem}:wide laughs", _spec(text, _laughs(4, 100)))
        yield Case(f"{stem}:mapping laughs", _spec(text, "  m0: &m0 {a: 1, b: 2, c: 3, d: 4}\n" + "".join(
            f"  m{i}: &m{i} {{a: *m{i - 1}, b: *m{i - 1}, c: *m{i - 1}, d: *m{i - 1}}}\n" for i in range(1, 12))))
        yield Case(f"{stem}:laughs in a field", _spec(text[:start] + "*l8" + text[end:], _laughs(9, 9)))
        yield Case(f"{stem}:recursive alias", _spec(text, "  r: &r [a, *r]\n"))
        yield Case(f"{stem}:recursive mapping", _spec(text, "  r: &r {a: *r}\n"))
        yield Case(f"{stem}:undefined alias", text[:start] + "*nowhere" + text[end:])
        yield Case(f"{stem}:alias as a key", _spec(text, "  a: &k [x]\n  *k : 1\n"))
        yield Case(f"{stem}:collection as a key", _spec(text, "  ? [a, b]\n  : 1\n"))
        head, _, tail = text.rpartition("name: ")  # the last name: after the anchor, which heads the spec
        yield Case(f"{stem}:anchored hex mark aliased into a name",
                   _spec(f"{head}name: *m #{tail}", "  x: {fwmark: &m 0x10}\n"))
        # Merge keys, with and without unknown fields.
        yield Case(f"{stem}:merge with an unknown field",
                   _spec(text, "  base: &b {bogus: 1}\n  merged:\n    <<: *b\n    more: 2\n"))
        yield Case(f"{stem}:merge into metadata",
                   text.replace("metadata:\n", "metadata:\n  <<: {bogus: 1, name: x}\n", 1))
        yield Case(f"{stem}:explicit merge tag", text.replace("metadata:\n", "metadata:\n  !!merge <<: {x: 1}\n", 1))
        # Tags on collections, directives, documents that are not one intent.
        yield Case(f"{stem}:tagged mapping", text.replace("\nspec:\n", "\nspec: !!map\n", 1))
        yield Case(f"{stem}:omap", text.replace("\nspec:\n", "\nspec: !!omap\n", 1))
        yield Case(f"{stem}:set", text.replace("\nmetadata:\n", "\nmetadata: !!set\n", 1))
        yield Case(f"{stem}:YAML 1.1 directive", "%YAML 1.1\n---\n" + text)
        yield Case(f"{stem}:two documents", text + "\n---\n" + text)
        yield Case(f"{stem}:unknown key", _spec(text, "  bogus: 1\n"))
        # Huge values: numbers past any field, a name of a megabyte.
        yield Case(f"{stem}:huge name", text.replace("name: ", "name: " + "a" * 1_000_000 + "b", 1))
        yield Case(f"{stem}:oversize", "# " + "x" * MAX_FILE_BYTES + "\n" + text)


def _duplicate_cases() -> Iterator[Case]:
    for stem, text in _sources():
        lines = text.split("\n")
        fields = [i for i, line in enumerate(lines) if re.match(r"^ *[A-Za-z$]+: \S", line)]
        for i in fields[::3]:
            copy = [*lines[:i + 1], lines[i], *lines[i + 1:]]
            yield Case(f"{stem}:{i + 1}:duplicate {lines[i].strip()[:20]}", "\n".join(copy))
        flow = re.search(r"\{ ?(address: [^,]+),", text)
        if flow:
            yield Case(f"{stem}:duplicate in a flow mapping",
                       text[:flow.end()] + f" {flow[1]}," + text[flow.end():])


def _truncation_cases() -> Iterator[Case]:
    for stem, text in _sources():
        openers = [m.start() for m in re.finditer(r"[\[{\"]", text.split("\n", 1)[1])]
        for at in openers[::2]:
            cut = len(text.split("\n", 1)[0]) + 1 + at + 1
            yield Case(f"{stem}:truncated at {cut}", text[:cut])


def _semantic_cases() -> Iterator[Case]:
    """Values only the kernel would refuse, at apply, until validate learnt them."""
    for stem, text in _sources():
        if "routingTable: " in text:
            yield Case(f"{stem}:routingTable 254", re.sub(r"routingTable: \d+", "routingTable: 254", text))
        elif "  interception:\n" in text:
            yield Case(f"{stem}:routingTable 254",
                       text.replace("  interception:\n", "  interception:\n    routingTable: 254\n", 1))
        if "rate: " in text:
            yield Case(f"{stem}:rate 2^32", re.sub(r"rate: \d+", "rate: 4294967296", text))
            yield Case(f"{stem}:burst 2^32", re.sub(r"burst: \d+", "burst: 4294967296", text))
    routes = "  routing:\n    tables:\n      - name: t\n        id: {id}\n        routes:\n{routes}"
    hop = "via: 10.0.0.1, dev: eth0"
    for label, pair in {
        "default and 0.0.0.0/0": (f"{{to: default, {hop}}}", f"{{to: 0.0.0.0/0, {hop}}}"),
        "default6 and ::/0 metric 1024": ("{to: default6, dev: eth0}", "{to: '::/0', dev: eth0, metric: 1024}"),
        "one host twice": (f"{{to: 10.1.0.1, {hop}}}", f"{{to: 10.1.0.1/32, {hop}, type: unicast}}"),
    }.items():
        body = routes.format(id=200, routes="".join(f"          - {r}\n" for r in pair))
        yield Case(f"routes {label}", HEADER + body)
    for label, extra in {"identical rules": "", "identical rules with selectors": ", iif: eth0, protocol: tcp, "
                         "ports: 80"}.items():
        body = (routes.format(id=200, routes=f"          - {{to: default, {hop}}}\n")
                + f"    rules:\n      - {{name: a, priority: 5, table: t{extra}}}\n"
                f"      - {{name: b, priority: 5, table: t{extra}}}\n")
        yield Case(label, HEADER + body)
    for table in (0, 253, 255):
        yield Case(f"routingTable {table}", HEADER + f"  interception:\n    routingTable: {table}\n")
    yield Case("uidRange 1000-", HEADER + routes.format(id=200, routes="") .replace("        routes:\n", "")
               + "    rules:\n      - {name: a, priority: 5, table: t, uidRange: '1000-'}\n")
    for text in ("", "# only a comment\n", "[]\n", "42\n", "~\n", "just text\n", "---\n...\n", "a: b\n"):
        yield Case(f"document {text.strip()[:16]!r}", text)


def _corpus() -> list[Case]:
    cases = [*_field_cases(), *_character_cases(), *_structure_cases(), *_duplicate_cases(),
             *_truncation_cases(), *_semantic_cases()]
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), [n for n in names if names.count(n) > 1]
    return cases


CORPUS = _corpus()


def test_the_corpus_is_large() -> None:
    assert len(CORPUS) >= 200, len(CORPUS)


def _check_problems(exc: IntentError, text: str, filename: str) -> None:
    assert exc.problems
    lines = text.count("\n") + text.count("\r") + 2
    for problem in exc.problems:
        assert problem.file == filename, problem
        assert 1 <= problem.line <= lines and problem.column >= 1, problem
        assert problem.message and len(problem.message) <= 1000, problem


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_refused_with_positions(case: Case) -> None:
    start = time.perf_counter()
    with pytest.raises(IntentError) as caught:
        parse_text(case.text, "hostile.yaml")
    assert time.perf_counter() - start < SECONDS
    _check_problems(caught.value, case.text, "hostile.yaml")


@pytest.mark.parametrize("case", CORPUS[::7], ids=[c.name for c in CORPUS[::7]])
def test_refused_from_a_file(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "hostile.yaml"
    try:
        path.write_text(case.text, encoding="utf-8", newline="")
    except UnicodeEncodeError:
        pytest.skip("a lone surrogate is no UTF-8 text (parse_text refuses it)")
    start = time.perf_counter()
    with pytest.raises(IntentError) as caught:
        load_file(path)
    assert time.perf_counter() - start < SECONDS
    _check_problems(caught.value, case.text, str(path))


def test_the_cli_reports_them(tmp_path: Path) -> None:
    """Twenty cases through `kernform validate`, all at once: exit 1, every line FILE:LINE:COL, no traceback."""
    sample = [c for c in CORPUS if "\ud800" not in c.text and len(c.text) < 1_000_000]
    sample = sample[::max(1, len(sample) // 20)][:20]
    runs = []
    for index, case in enumerate(sample):
        path = tmp_path / f"case{index}.yaml"
        path.write_text(case.text, encoding="utf-8", newline="")
        runs.append((case, path, subprocess.Popen([sys.executable, "-m", "kernform", "validate", str(path)],
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                  cwd=ROOT)))
    for case, path, run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 1, (case.name, out, err)
        assert "Traceback" not in err, (case.name, err)
        lines = err.strip().split("\n")
        assert lines and all(re.match(rf"{re.escape(str(path))}:\d+:\d+: \S", line) for line in lines), (case.name, err)


# ------------------------------------------------------------------ both paths read alike
@pytest.mark.parametrize("case", CORPUS[::3], ids=[c.name for c in CORPUS[::3]])
def test_the_fast_path_never_accepts_what_the_error_path_refuses(case: Case) -> None:
    assert_paths_agree(case.text)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_both_paths_read_the_examples_alike(path: Path) -> None:
    text = path.read_text()
    assert yaml12.fits_fast_path(text)
    assert_paths_agree(text)
    assert not yaml12.read(text).problems


def assert_paths_agree(text: str) -> None:
    """What the fast path (fastyaml with StrictLoader) reads is what the error path (yaml12.read) reads; the
    fast path refuses whatever the error path refuses, except nesting deeper than yaml12.MAX_DEPTH, which it
    leaves to the models (no field of an intent nests that deep)."""
    reading = yaml12.read(text)
    if not yaml12.fits_fast_path(text):
        return
    try:
        fast = repr(fastyaml.load(text, yaml12.StrictLoader))
    except Exception:  # noqa: BLE001 - any refusal
        fast = None
    if not reading.problems:
        assert fast == repr(reading.document)
    elif fast is not None:
        assert all("nesting deeper" in message for _, _, message in reading.problems), reading.problems


# ------------------------------------------------------------------ bounds
def _timed_refusal(path: Path) -> tuple[float, str]:
    start = time.perf_counter()
    with pytest.raises(IntentError) as caught:
        load_file(path)
    return time.perf_counter() - start, str(caught.value)


def test_a_link_to_dev_zero_is_refused_at_once(tmp_path: Path) -> None:
    link = tmp_path / "zero.yaml"
    link.symlink_to("/dev/zero")
    elapsed, message = _timed_refusal(link)
    assert elapsed < 1 and f"{link}:1:1: the file holds more than {MAX_FILE_BYTES} bytes" in message


def test_an_oversize_file_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(HEADER + "# " + "x" * MAX_FILE_BYTES + "\n")
    elapsed, message = _timed_refusal(path)
    assert elapsed < 1 and "16 MiB" in message


def test_a_bomb_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(HEADER + _laughs(12, 10))
    elapsed, message = _timed_refusal(path)
    assert elapsed < 1 and "expand the document by more than" in message, message


def test_a_ten_megabyte_list_still_parses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A blocklist of 480,000 CIDRs (10 MB) is no hostile input: it is read, checked and valid."""
    cidrs = [f"{20 + i // 65536 % 80}.{i // 256 % 256}.{i % 256}.0/24" for i in range(0, 960_000, 2)]
    text = HEADER + ("  filtering:\n    forward:\n      rules:\n        - name: blocklist\n          action: deny\n"
                     "          destinations: [" + ",\n            ".join(cidrs) + "]\n")
    assert len(text) > 10_000_000
    path = tmp_path / "blocklist.yaml"
    path.write_text(text)
    start = time.perf_counter()
    loaded = load_file(path)
    elapsed = time.perf_counter() - start
    assert len(loaded.intent.spec.filtering.forward.rules[0].destinations) == len(cidrs)  # type: ignore[union-attr]
    with capsys.disabled():
        print(f"10 MB list: {elapsed:.1f} s", end=" ")


def test_a_bounded_read_of_dev_zero_is_refused_by_parse_text(tmp_path: Path) -> None:
    """What a reader of its own (the daemon) gets from read_intent_bytes is refused as too large, at once."""
    from compiler.loader import read_intent_bytes

    link = tmp_path / "zero.yaml"
    link.symlink_to("/dev/zero")
    start = time.perf_counter()
    data = read_intent_bytes(str(link))
    assert len(data) == MAX_FILE_BYTES + 1
    with pytest.raises(IntentError, match="more than 16777216 characters"):
        parse_text(data.decode("utf-8"), str(link))
    assert time.perf_counter() - start < 1
