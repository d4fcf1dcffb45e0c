"""Many intents as input: directories, several files, multi-document YAML and stdin, every problem at FILE:LINE:COL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from compiler import BackendUnavailable, compile_intent
from compiler.errors import IntentError
from compiler.loader import collect_inputs, load_file, load_inputs, parse_text, split_documents

ROOT = Path(__file__).resolve().parents[2]


def doc(name: str, body: str = "") -> str:
    return f"apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata:\n  name: {name}\n" + (f"spec:\n{body}" if body else "")


ROUTES = "  routing:\n    tables:\n      - {name: t, id: %d}\n"
BAD_RULE = "  routing:\n    tables: [{name: a, id: 10}]\n    rules:\n      - {name: r, priority: 10, table: b}\n"


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def names(paths: list[str], stdin: str = "") -> list[str]:
    return [i.intent.metadata.name for i in load_inputs(paths, stdin=lambda: stdin)]


def problems(paths: list[str], stdin: str = "") -> list[str]:
    with pytest.raises(IntentError) as caught:
        load_inputs(paths, stdin=lambda: stdin)
    return [str(p) for p in caught.value.problems]


# --------------------------------------------------------------- directories
def test_a_directory_gives_its_yaml_files_sorted_not_recursively(tmp_path: Path) -> None:
    write(tmp_path, {
        "b.yml": doc("b"), "a.yaml": doc("a"), "c.yaml": doc("c"),
        "README.md": "not an intent", "notes.txt": "nor this", ".hidden.yaml": doc("hidden"),
        "sub/d.yaml": doc("d"), "..data/e.yaml": doc("e"), "..2024_01_01/f.yaml": doc("f"),
    })
    assert names([str(tmp_path)]) == ["a", "b", "c"]


def test_configmap_style_symlinks_are_followed(tmp_path: Path) -> None:
    write(tmp_path, {"..2024_01_01/web.yaml": doc("web")})
    os.symlink("..2024_01_01", tmp_path / "..data")
    os.symlink("..data/web.yaml", tmp_path / "web.yaml")
    assert names([str(tmp_path)]) == ["web"]


def test_inputs_keep_their_order_and_a_file_named_twice_is_read_once(tmp_path: Path) -> None:
    write(tmp_path, {"dir/a.yaml": doc("a"), "dir/b.yaml": doc("b"), "z.yaml": doc("z")})
    assert names([str(tmp_path / "z.yaml"), str(tmp_path / "dir"), str(tmp_path / "dir/b.yaml")]) == ["z", "a", "b"]


@pytest.mark.parametrize(("files", "args", "expected"), [
    ({"x/README.md": "x"}, ["x"], "x:1:1: the directory holds no intent files (*.yaml, *.yml)"),
    ({}, ["missing.yaml"], "missing.yaml:1:1: cannot read the file: No such file or directory"),
    ({"e.yaml": "# nothing here\n"}, ["e.yaml"], "e.yaml:1:1: the file is empty"),
    ({"e.yaml": "---\n---\n"}, ["e.yaml"], "e.yaml:1:1: the file is empty"),
], ids=["empty directory", "missing file", "only a comment", "only markers"])
def test_inputs_that_give_nothing_are_problems(tmp_path: Path, files: dict[str, str], args: list[str],
                                               expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, files)
    monkeypatch.chdir(tmp_path)
    found = problems(args)
    assert any(p.startswith(expected) for p in found), found


# -------------------------------------------------------- multi-document YAML
MULTI = (
    "# two teams, one file\n"           # 1
    "---\n"                             # 2
    + doc("a", ROUTES % 200)            # 3-10
    + "...\n"                           # 11
    "---\n"                             # 12: an empty document, skipped
    "---\n"                             # 13
    + doc("b", BAD_RULE)                # 14-22: the bad rule on line 22
    + "--- # the third\n"               # 23
    + doc("c", ROUTES % 300)            # 24-31
)


def test_every_document_is_an_intent_and_problems_count_lines_in_the_whole_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"m.yaml": MULTI}) / "m.yaml"
    loaded, found = collect_inputs([str(path)])
    assert [i.intent.metadata.name for i in loaded] == ["a", "c"]
    assert [str(p) for p in found] == [
        f"{path}:22:33: policy rule 'r' names table 'b', which is not in routing.tables (known: a)"]


def test_positions_of_a_later_stage_count_lines_in_the_whole_file(tmp_path: Path) -> None:
    """A backend refusal of the second document is placed at its line in the file, like a load problem."""
    refused = "  backend: ebpf\n  filtering:\n    input:\n      rules:\n        - {name: d, action: deny}\n"
    path = write(tmp_path, {"m.yaml": doc("a") + "---\n" + doc("b", refused)}) / "m.yaml"
    second = load_inputs([str(path)])[1]
    with pytest.raises(BackendUnavailable) as caught:
        compile_intent(second.intent)
    found = second.problems_at(caught.value.findings)
    assert found and all((p.line, p.column) == (15, 11) for p in found), found  # `- {name: d, ...}` of the second


def test_a_syntax_error_in_a_later_document_is_placed_in_the_whole_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"m.yaml": doc("a") + "---\n" + doc("b") + "spec: [\n---\n" + doc("c")}) / "m.yaml"
    found = problems([str(path)])
    assert len(found) == 1 and found[0].startswith(f"{path}:11:") and "YAML syntax" in found[0], found


@pytest.mark.parametrize(("text", "expected"), [
    (doc("a") + "---\n" + doc("b"), ["a", "b"]),
    ("%YAML 1.2\n---\n" + doc("a") + "...\n%YAML 1.2\n---\n" + doc("b"), ["a", "b"]),
    (doc("a") + "... # a bare document follows\n" + doc("b"), ["a", "b"]),
    ((doc("a") + "---\n" + doc("b")).replace("\n", "\r\n"), ["a", "b"]),
    ("---\n---\n" + doc("a") + "---\n", ["a"]),
], ids=["markers", "directives", "explicit end", "CRLF", "empty documents"])
def test_documents_are_split_as_yaml_says(text: str, expected: list[str]) -> None:
    found = [parse_text(piece, "f").intent.metadata.name for piece in split_documents(text)]
    assert found == expected


def test_a_single_document_file_parses_exactly_as_before(tmp_path: Path) -> None:
    text = "---\n" + doc("a", ROUTES % 200)
    assert split_documents(text) == [text]
    assert split_documents(doc("a")) == [doc("a")]
    path = write(tmp_path, {"a.yaml": text}) / "a.yaml"
    assert load_inputs([str(path)])[0].intent == load_file(path).intent


# ------------------------------------------------------------------- stdin
def test_stdin_is_an_input_among_others(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": doc("a")})
    assert names([str(tmp_path / "a.yaml"), "-"], stdin=doc("s") + "---\n" + doc("t")) == ["a", "s", "t"]


def test_problems_of_stdin_are_placed_in_it() -> None:
    found = problems(["-"], stdin=doc("ok") + "---\n" + doc("s", BAD_RULE))
    assert found == ["<stdin>:14:33: policy rule 'r' names table 'b', which is not in routing.tables (known: a)"]


def test_stdin_can_be_read_once() -> None:
    assert problems(["-", "-"], stdin=doc("s")) == ["<stdin>:1:1: stdin ('-') is given twice: it can be read once"]


# ----------------------------------------------------------- duplicate names
@pytest.mark.parametrize(("files", "expected"), [
    ({"a.yaml": doc("web"), "b.yaml": "# b\n" + doc("web")},
     "b.yaml:5:3: intent 'web' is also defined at {root}/a.yaml:4:3"),
    ({"m.yaml": doc("web") + "---\n" + doc("api") + "---\n" + doc("web")},
     "m.yaml:14:3: intent 'web' is also defined at {root}/m.yaml:4:3"),
], ids=["two files", "one multi-document file"])
def test_two_intents_of_one_name_are_refused_naming_both(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    write(tmp_path, files)
    found = problems([str(tmp_path)])
    assert len(found) == 1 and found[0].startswith(str(tmp_path) + "/" + expected.format(root=tmp_path)), found


def test_every_problem_of_every_input_at_once(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": doc("a", BAD_RULE), "b.yaml": "spec: [\n", "c.yaml": doc("c", BAD_RULE)})
    found = problems([str(tmp_path)])
    assert [p.split(":")[0].rsplit("/", 1)[1] for p in found] == ["a.yaml", "b.yaml", "c.yaml"], found


# ------------------------------------------------------------- plan of many
def test_a_plan_set_totals_its_plans_and_both_formats_fit_the_schema(tmp_path: Path) -> None:
    import json

    import jsonschema

    from compiler import compile_intent
    from reconciler.plan import PlanSet, diff, render_set_text

    schema = json.loads((ROOT / "schemas" / "plan.schema.json").read_text())
    write(tmp_path, {"a.yaml": doc("a", ROUTES % 200), "b.yaml": doc("b", ROUTES % 201), "c.yaml": doc("c")})
    plans = []
    for loaded in load_inputs([str(tmp_path)]):
        desired = compile_intent(loaded.intent)
        observed = desired.by_key() if loaded.intent.metadata.name == "c" else {}
        plans.append(diff(desired.intent, desired.backend, "netns x", desired.by_key(), observed))
    plan_set = PlanSet("netns x", tuple(plans))
    document = json.loads(plan_set.to_json())
    jsonschema.validate(document, schema)
    jsonschema.validate(json.loads(plans[0].to_json()), schema)
    assert document["summary"] == {"add": 6, "change": 0, "remove": 0, "intents": 3, "intentsWithChanges": 2}
    assert [p["formatVersion"] for p in document["plans"]] == [1, 1, 1]
    text = render_set_text(plan_set)
    assert text.count("kernform plan: intent ") == 3
    assert text.endswith("Total over 3 intents on netns x (2 with changes: a, b): 6 to add, 0 to change, "
                         "0 to remove.\n"), text
    assert not plan_set.empty and PlanSet("netns x", (plans[2],)).empty


# -------------------------------------------------------------------- CLI
def kernform(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kernform.cli", *args], capture_output=True, text=True,
                          input=stdin, cwd=ROOT)


def test_cli_validate_a_directory(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": doc("a", ROUTES % 200), "b.yaml": doc("b", ROUTES % 201)})
    result = kernform("validate", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{tmp_path}/a.yaml: valid (intent a, 3 kernel objects)",
                                          f"{tmp_path}/b.yaml: valid (intent b, 3 kernel objects)"]


def test_cli_validate_refuses_a_conflict_naming_both_positions(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": doc("a", ROUTES % 200), "b.yaml": doc("b", ROUTES % 200), "c.yaml": doc("c")})
    result = kernform("validate", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [f"{tmp_path}/c.yaml: valid (intent c, 2 kernel objects)"]
    assert result.stderr.startswith(
        f"{tmp_path}/b.yaml:8:19: routing table 200 (routing.tables 't') conflicts with routing table 200 "
        f"(routing.tables 't') of intent 'a' at {tmp_path}/a.yaml:8:19: "), result.stderr


def test_cli_validate_reads_stdin_and_compile_takes_many() -> None:
    result = kernform("validate", "-", stdin=doc("a", ROUTES % 200) + "---\n" + doc("b", BAD_RULE))
    assert result.returncode == 1
    assert result.stdout == "<stdin>: valid (intent a, 3 kernel objects)\n"
    assert result.stderr.startswith("<stdin>:18:33: policy rule 'r' names table 'b'"), result.stderr
    result = kernform("compile", "-", stdin=doc("a", ROUTES % 200) + "---\n" + doc("b", ROUTES % 201))
    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if line.startswith("# kernform compile")]
    assert headers == ["# kernform compile: intent a, backend tproxy", "# kernform compile: intent b, backend tproxy"]
