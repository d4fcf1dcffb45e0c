"""The loader reports every problem of a file at once, each at FILE:LINE:COL."""

from __future__ import annotations

from pathlib import Path

import pytest

from compiler.errors import IntentError
from compiler.loader import load_file, parse_text

EXAMPLES = sorted(Path(__file__).resolve().parents[2].joinpath("examples").glob("*.yaml"))

HEADER = "apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata:\n  name: t\nspec:\n"


def problems_of(text: str) -> list[str]:
    with pytest.raises(IntentError) as caught:
        parse_text(text, "f.yaml")
    return [str(p) for p in caught.value.problems]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    assert load_file(path).intent.metadata.name


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # YAML syntax
        ("  routing: [\n", "f.yaml:7:1: YAML syntax"),
        # schema: unknown key, wrong type, missing required field
        ("  routing:\n    tabels: []\n", "f.yaml:7:5: spec.routing: Additional properties are not allowed ('tabels'"),
        ("  routing:\n    tables:\n      - name: a\n        id: x\n", "f.yaml:9:9: spec.routing.tables.0.id: 'x' is not of type 'integer'"),
        ("  loadBalancing:\n    services:\n      - name: a\n        vip: 10.0.0.1\n", "f.yaml:8:9: spec.loadBalancing.services.0: 'port' is a required property"),
        # values
        ("  filtering:\n    input:\n      rules:\n        - name: a\n          action: deny\n          sources: [10.0.0.1/8]\n",
         "f.yaml:11:21: spec.filtering.input.rules.0.sources.0: invalid CIDR '10.0.0.1/8'"),
        ("  interception:\n    rules:\n      - name: a\n        direction: inbound\n        ports: [0]\n        proxyPort: 1\n",
         "port 0 is out of range 1-65535"),
        ("  interception:\n    rules:\n      - name: a\n        direction: inbound\n        ports: ['80-70000']\n        proxyPort: 1\n",
         "port 70000 is out of range 1-65535"),
        ("  loadBalancing:\n    services:\n      - name: a\n        vip: 10.0.0.1\n        port: 70000\n        backends: [{address: 10.0.0.2}]\n",
         "f.yaml:10:9: spec.loadBalancing.services.0.port: 70000 is greater than the maximum of 65535"),
        # semantics
        ("  routing:\n    tables: [{name: a, id: 10}]\n    rules:\n      - {name: r, priority: 10, table: b}\n",
         "f.yaml:9:33: policy rule 'r' names table 'b', which is not in routing.tables"),
        ("  routing:\n    tables: [{name: a, id: 10}, {name: a, id: 11}]\n", "duplicate routing table name 'a'"),
        ("  interception:\n    rules:\n      - name: a\n        direction: inbound\n", "f.yaml:8:9: interception rule 'a' has no proxyPort"),
        ("  loadBalancing:\n    services:\n      - {name: a, vip: 10.0.0.1, port: 80, backends: [{address: 10.0.0.2}]}\n"
         "      - {name: b, vip: 10.0.0.1, port: 80, backends: [{address: 10.0.0.3}]}\n",
         "VIP 10.0.0.1:80/tcp is already used by service 'a'"),
        ("  loadBalancing:\n    services:\n      - {name: a, vip: 10.0.0.1, port: 80, backends: [{address: 'fd00::1'}]}\n",
         "mixed families cannot be translated"),
        ("  routing:\n    tables:\n      - name: a\n        id: 10\n        routes: [{to: 10.0.0.0/8, via: 'fd00::1'}]\n",
         "next hop fd00::1 is not IPv4"),
        ("  routing:\n    tables:\n      - {name: a, id: 10}\n    rules:\n      - {name: r, priority: 5, table: a, from: 10.0.0.0/8, to: 'fd00::/8'}\n",
         "from and to are of different address families"),
    ],
)
def test_problem_is_reported_with_position(body: str, expected: str) -> None:
    found = problems_of(HEADER + body)
    assert any(expected in p for p in found), found


def test_every_problem_is_reported_at_once() -> None:
    body = (
        "  routing:\n"
        "    tables: [{name: a, id: 254}]\n"
        "    rules:\n"
        "      - {name: r, priority: 10, table: b}\n"
        "      - {name: r, priority: 11, table: a}\n"
    )
    found = problems_of(HEADER + body)
    assert len(found) == 3, found
    assert all(p.startswith("f.yaml:") for p in found)


def test_duplicate_keys_are_an_error() -> None:
    found = problems_of(HEADER + "  backend: tproxy\n  backend: ebpf\n")
    assert found and found[0].startswith("f.yaml:7:"), found


def test_missing_file_is_an_intent_error(tmp_path: Path) -> None:
    with pytest.raises(IntentError, match="cannot read the file"):
        load_file(tmp_path / "nope.yaml")
