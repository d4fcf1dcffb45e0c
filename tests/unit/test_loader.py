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
        ("  routing:\n    tabels: []\n", "f.yaml:7:5: spec.routing: unknown key 'tabels': did you mean 'tables'?"),
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


# ------------------------------------------------------------------ one YAML meaning (compiler.yaml12)
RULE = "  interception:\n    rules:\n      - name: a\n        direction: inbound\n        ports: [{}]\n        proxyPort: 15001\n"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0100", "f.yaml:10:17: 0100: a number with a leading zero is 64 in YAML 1.1 and 100 in YAML 1.2; write 100, "
                 "or quote it"),
        ("09", "09: a number with a leading zero is the string '09' in YAML 1.1 and 9 in YAML 1.2; write 9"),
        ("0x50", "f.yaml:10:17: 0x50: a hexadecimal number is 80 in YAML 1.1 and in YAML 1.2's core schema but the "
                 "string '0x50' in its JSON schema"),
        ("1:30", "1:30: a base 60 number is 90 in YAML 1.1 and the string '1:30' in YAML 1.2; write 90, or quote it"),
        ("1_000", "1_000: a number with '_' is 1000 in YAML 1.1 and the string '1_000' in YAML 1.2; write 1000"),
        ("0o17", "0o17: an octal number is the string '0o17' in YAML 1.1 and 15 in YAML 1.2; write 15"),
        ("0b101", "0b101: a binary number is 5 in YAML 1.1 and the string '0b101' in YAML 1.2"),
        ("on", "on: a YAML 1.1 boolean is the boolean true in YAML 1.1 and the string 'on' in YAML 1.2; write true"),
        ("N", "N: a YAML 1.1 boolean is the boolean false in YAML 1.1 and the string 'N' in YAML 1.2"),
        ("2001-02-03", "2001-02-03: a date is the date 2001-02-03 in YAML 1.1 and the string '2001-02-03' in YAML 1.2"),
        ("1e3", "1e3: a number is the string '1e3' in YAML 1.1 and 1000.0 in YAML 1.2; quote it"),
        ("!!int 80", "f.yaml:10:17: the tag tag:yaml.org,2002:int: kernform takes no explicit tags"),
        ("! 80", "the tag !: kernform takes no explicit tags"),
        ("9" * 50, "a number of 50 digits is larger than any an intent takes"),
    ],
)
def test_forms_yaml_readers_disagree_on_are_refused(value: str, expected: str) -> None:
    found = problems_of(HEADER + RULE.format(value))
    assert any(expected in p for p in found), found


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("  loadBalancing:\n    services:\n      - {name: a, vip: 10.0.0.1, port: true, backends: [{address: 10.0.0.2}]}\n",
         "f.yaml:8:34: spec.loadBalancing.services.0.port: True is not of type 'integer'"),
        ("  loadBalancing:\n    services:\n      - {name: a, vip: 10.0.0.1, port: 80, backends: [{address: 10.0.0.2, "
         "weight: true}]}\n", "backends.0.weight: True is not of type 'integer'"),
        ("  loadBalancing:\n    services:\n      - {name: a, vip: 10.0.0.1, port: '80', backends: [{address: 10.0.0.2}]}\n",
         "services.0.port: '80' is not of type 'integer'"),
        ("  filtering:\n    input:\n      stateful: 'yes'\n", "f.yaml:8:7: spec.filtering.input.stateful: 'yes' is not "
                                                              "of type 'boolean'"),
        ("  filtering:\n    input:\n      stateful: 1\n", "spec.filtering.input.stateful: 1 is not of type 'boolean'"),
        ("  metadata2: 1\n", "spec: unknown key 'metadata2'"),
        ("  routing:\n    tables: [{name: a, id: 1.0}]\n", "spec.routing.tables.0.id: Input should be a valid integer"),
        ("  filtering:\n    input:\n      rules:\n        - {name: r, action: rate-limit, rateLimit: {rate: 4294967296}}\n",
         "rateLimit.rate: 4294967296 is greater than the maximum of 4294967295"),
        ("  filtering:\n    input:\n      rules:\n        - {name: r, action: rate-limit, rateLimit: {rate: 1, "
         "burst: 4294967296}}\n", "rateLimit.burst: 4294967296 is greater than the maximum of 4294967295"),
        ("  routing:\n    tables: [{name: a, id: 10}]\n    rules: [{name: r, priority: 5, table: a, uidRange: '1000-'}]\n",
         "uidRange: invalid id range '1000-'"),
        ("  routing:\n    tables: [{name: a, id: 10}]\n    rules: [{name: r, priority: 5, table: a, fwmark: ' 16'}]\n",
         "fwmark: invalid mark ' 16'"),
        ("  interception:\n    routingTable: 255\n", "f.yaml:7:5: table 255 is the system's 'local' table"),
    ],
)
def test_values_have_the_type_they_are_written_with(body: str, expected: str) -> None:
    found = problems_of(HEADER + body)
    assert any(expected in p for p in found), found


TABLE = "  routing:\n    tables:\n      - name: t\n        id: 200\n        routes:\n"


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        (["{to: default, via: 10.0.0.1, dev: eth0}", "{to: 0.0.0.0/0, via: 10.0.0.2, dev: eth0}"],
         "f.yaml:12:14: route to 0.0.0.0/0 (metric 0) is the same kernel route as the one at f.yaml:11:14 "
         "(table 200 0.0.0.0/0 metric 0)"),
        (["{to: 'fd00::/64', dev: eth0}", "{to: 'fd00::/64', dev: eth0, metric: 1024}"],
         "is the same kernel route as the one at f.yaml:11:14 (table 200 fd00::/64 metric 1024)"),
    ],
)
def test_routes_the_kernel_holds_as_one_are_refused_naming_both(routes: list[str], expected: str) -> None:
    found = problems_of(HEADER + TABLE + "".join(f"          - {r}\n" for r in routes))
    assert any(expected in p for p in found), found


def test_identical_policy_rules_are_refused_naming_both() -> None:
    body = (TABLE + "          - {to: default, via: 10.0.0.1, dev: eth0}\n    rules:\n"
            "      - {name: a, priority: 5, table: t, protocol: tcp, ports: 80}\n"
            "      - {name: b, priority: 5, table: t, protocol: tcp, ports: '80'}\n"
            "      - {name: c, priority: 5, table: t, protocol: tcp, ports: 81}\n")
    found = problems_of(HEADER + body)
    assert found == ["f.yaml:14:10: policy rule 'b' is the same kernel rule as policy rule 'a' at f.yaml:13:10 "
                     "(rule ipv4 priority 5 ipproto tcp dport 80 lookup 200); remove one, or make them differ "
                     "(another priority or selector)"], found


MARKS = ("  interception:\n    fwmark: {0}\n    rules:\n      - name: o\n        direction: outbound\n"
         "        exclude: {{marks: [{0}, 0x20/0xff, 48]}}\n        proxyPort: 15001\n"
         "  routing:\n    tables: [{{name: t, id: 10}}]\n    rules: [{{name: r, priority: 5, table: t, fwmark: {0}}}]\n")


@pytest.mark.parametrize("anchors", [False, True], ids=["fast path", "error path"])
def test_hexadecimal_is_taken_in_marks(anchors: bool) -> None:
    # An anchor (which only the error path reads) must not change what a file means.
    text = HEADER.replace("name: t", "name: &n t") if anchors else HEADER
    intent = parse_text(text + MARKS.format("0x10"), "f.yaml").intent
    assert intent == parse_text(HEADER + MARKS.format("'0x10'"), "f.yaml").intent
    assert intent.spec.interception.fwmark == "0x10/0xffffffff"
    assert intent.spec.interception.rules[0].exclude.marks == ["0x10/0xffffffff", "0x20/0xff", "0x30/0xffffffff"]
    assert intent.spec.routing.rules[0].fwmark == "0x10/0xffffffff"


def test_anchors_and_aliases_within_bounds_mean_what_they_expand_to() -> None:
    shared = "[10.0.0.0/8, 192.168.0.0/16]"
    body = ("  filtering:\n    input:\n      rules:\n        - {{name: a, action: deny, sources: {0}}}\n"
            "        - {{name: b, action: deny, destinations: {1}}}\n")
    with_alias = parse_text(HEADER + body.format(f"&nets {shared}", "*nets"), "f.yaml")
    written_out = parse_text(HEADER + body.format(shared, shared), "f.yaml")
    assert with_alias.intent == written_out.intent


def test_yaml_1_2_directive_bom_and_crlf_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(("\ufeff%YAML 1.2\n---\n" + HEADER + "  backend: ebpf\n").replace("\n", "\r\n").encode())
    assert load_file(path).intent.spec.backend == "ebpf"


def test_stdin_is_bounded_too() -> None:
    from compiler.loader import MAX_FILE_BYTES, collect_inputs

    loaded, problems = collect_inputs(["-"], stdin=lambda: HEADER + "#" * MAX_FILE_BYTES)
    assert not loaded and [str(p) for p in problems] == [
        f"<stdin>:1:1: the file holds more than {MAX_FILE_BYTES} characters (16 MiB), more than any intent "
        "needs: is it the right file?"]


def test_the_fast_reading_of_numbers_is_pyyaml_s_yaml_1_1_where_it_refuses() -> None:
    """classify's one pattern for what YAML 1.1 reads as no string is PyYAML's resolver (plus 1.2's octal)."""
    import random

    import yaml
    from yaml.nodes import ScalarNode

    from compiler import yaml12

    loader = yaml.SafeLoader("")
    rng = random.Random(0x1112)
    alphabet = "0123456789+-._:eExXoObB aAfFTtZz/"
    for _ in range(20_000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        if value[0] not in "0123456789+-." or value != value.strip():
            continue
        pyyaml = loader.resolve(ScalarNode, value, (True, False)) != "tag:yaml.org,2002:str"
        assert bool(yaml12._NOT_TEXT_TO_ONE.fullmatch(value)) == (pyyaml or value.startswith("0o")
                                                                   and value[2:].isdigit()
                                                                   and not set(value[2:]) & set("89")), value


def test_every_unknown_key_is_reported_at_its_own_position_with_the_key_it_probably_meant(tmp_path: Path) -> None:
    text = """apiVersion: kernform/v1
kind: NetworkIntent
metadata: {name: typos}
spec:
  filtering:
    input:
      rules:
        - name: ssh
          action: alow
          protocols: tcp
          prots: [22]
"""
    with pytest.raises(IntentError) as caught:
        parse_text(text, "t.yaml")
    shown = str(caught.value).splitlines()
    assert any(s.startswith("t.yaml:9:11: ") and "did you mean 'allow'?" in s for s in shown), shown
    assert any(s.startswith("t.yaml:10:11: ") and "unknown key 'protocols': did you mean 'protocol'?" in s
               for s in shown), shown
    assert any(s.startswith("t.yaml:11:11: ") and "unknown key 'prots': did you mean 'ports'?" in s
               for s in shown), shown
