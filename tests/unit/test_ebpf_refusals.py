"""What the ebpf backend refuses: every offending field at once, each at FILE:LINE:COL of the field itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from compiler import compile_intent
from compiler.ebpf_refusals import refusals
from compiler.errors import BackendUnavailable
from compiler.loader import parse_text
from kernform.cli import main

ROOT = Path(__file__).resolve().parents[2]
HEADER = "apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata: {name: t}\nspec:\n  backend: ebpf\n"
# The body starts on line 6.
RULE = "{name: a, action: allow, protocol: tcp, interfaces: [e]}"
PORTS_200 = ", ".join(str(p) for p in range(1000, 1200))
PORTS_100 = ", ".join(str(p) for p in range(2000, 2100))


def problems(body: str) -> list[str]:
    loaded = parse_text(HEADER + body, "t.yaml")
    with pytest.raises(BackendUnavailable) as caught:
        compile_intent(loaded.intent)
    return [str(p) for p in loaded.problems_at(caught.value.findings)]


@pytest.mark.parametrize(
    ("body", "where", "fragment"),
    [
        pytest.param(
            "  filtering:\n    input:\n      rules:\n        - name: a\n          action: allow\n"
            "          protocol: tcp\n",
            "9:11", "input filter rule 'a' names no interface", id="filter-rule-without-interface"),
        pytest.param(
            "  filtering:\n    input:\n      rules:\n        - name: a\n          action: allow\n"
            "          interfaces: [eth0, \"gw-*\"]\n",
            "11:30", "'gw-*' is a prefix pattern", id="filter-rule-wildcard-interface"),
        pytest.param(
            f"  filtering:\n    input:\n      default: deny\n      rules: [{RULE}]\n  ebpf:\n    interfaces: [e]\n",
            "8:7", "a stateful default deny needs connection tracking", id="default-deny-stateful-by-default"),
        pytest.param(
            f"  filtering:\n    input:\n      default: deny\n      stateful: true\n      rules: [{RULE}]\n  ebpf:\n    interfaces: [e]\n",
            "9:7", "say `stateful: false`", id="default-deny-stateful-written"),
        pytest.param(
            "  filtering:\n    input:\n      default: deny\n      stateful: false\n      rules: [{name: a, action: allow, protocol: tcp, interfaces: [e]}]\n",
            "8:7", "a default deny needs them listed in spec.ebpf.interfaces", id="default-deny-without-ebpf-interfaces"),
        pytest.param(
            "  filtering:\n    input:\n      rules:\n        - name: a\n          action: rate-limit\n"
            "          protocol: tcp\n          interfaces: [e]\n          rateLimit: {rate: 7, per: minute}\n",
            "13:23", "7/minute is not a whole number per second", id="rate-per-minute-not-per-second"),
        pytest.param(
            "  filtering:\n    input:\n      rules:\n        - name: a\n          action: deny\n"
            "          interfaces: [e]\n          protocol: udp\n          ports: [53]\n",
            "12:11", "say `protocol: tcp`, or `stateful: false` on filtering.input", id="stateful-deny-udp"),
        pytest.param(
            "  filtering:\n    forward:\n      rules:\n        - name: a\n          action: deny\n"
            "          interfaces: [e]\n          destinations: [192.0.2.0/24]\n",
            "9:11", "(deny, protocol any) is in a stateful chain", id="stateful-deny-any-protocol"),
        pytest.param(
            "  filtering:\n    output:\n      rules:\n        - name: a\n          action: rate-limit\n"
            "          interfaces: [e]\n          protocol: icmp\n          rateLimit: {rate: 10}\n",
            "12:11", "would count every packet of established ICMP flows", id="stateful-rate-limit-icmp"),
        pytest.param(
            "  filtering:\n    input:\n      rules:\n"
            f"        - {{name: a, action: allow, protocol: tcp, interfaces: [e], ports: [{PORTS_200}]}}\n"
            f"        - {{name: b, action: allow, protocol: tcp, interfaces: [e], ports: [{PORTS_100}]}}\n",
            "10:11", "interface 'e' would need 300 rule descriptors", id="filter-descriptors-beyond-256"),
        pytest.param(
            "  interception:\n    rules:\n      - name: a\n        direction: inbound\n        interfaces: [e]\n"
            "        sources: [10.0.0.0/8]\n        proxyPort: 15001\n",
            "11:9", "source CIDRs need the tproxy backend", id="interception-sources"),
        pytest.param(
            "  interception:\n    rules:\n      - name: a\n        direction: inbound\n        interfaces: [e]\n"
            "        exclude:\n          sources: [10.0.0.0/8]\n        proxyPort: 15001\n",
            "12:11", "excluding source CIDRs needs the tproxy backend", id="interception-exclude-sources"),
        pytest.param(
            "  interception:\n    rules:\n      - name: a\n        direction: outbound\n        exclude:\n"
            "          uids: [1337]\n          marks: [0x10]\n        proxyPort: 15001\n",
            "12:11", "cannot exclude by mark", id="interception-exclude-marks"),
        pytest.param(
            "  interception:\n    rules:\n      - name: a\n        direction: outbound\n        exclude:\n"
            "          uids: [0, \"1000-1999\"]\n        proxyPort: 15001\n",
            "11:21", "1000-1999 holds 1000", id="interception-uid-range-too-wide"),
        pytest.param(
            "  interception:\n    rules:\n      - name: a\n        direction: inbound\n        proxyPort: 15001\n",
            "8:9", "intercepts inbound connections on named interfaces", id="inbound-interception-without-interface"),
        pytest.param(
            "  interception:\n    rules:\n      - name: a\n        direction: inbound\n"
            "        interfaces: [\"gw-*\"]\n        proxyPort: 15001\n",
            "10:22", "'gw-*' is a prefix pattern", id="inbound-interception-wildcard-interface"),
        pytest.param(
            "  interception:\n    rules:\n"
            "      - {name: a, direction: outbound, ports: [80], exclude: {uids: [1337]}, proxyPort: 15001}\n"
            "      - {name: b, direction: outbound, ports: [443], exclude: {uids: [1338]}, proxyPort: 15001}\n",
            "9:64", "'b' excludes uids [1338] but rule 'a' excludes uids [1337]", id="outbound-uids-differ"),
        pytest.param(
            "  interception:\n    rules:\n      - name: a\n        direction: outbound\n"
            "        exclude: {uids: [1337], gids: [1337]}\n        proxyPort: 15001\n      - name: b\n"
            "        direction: outbound\n        exclude: {uids: [1337]}\n        proxyPort: 15002\n",
            "14:9", "'b' excludes no gids but rule 'a' excludes gids [1337]", id="outbound-gids-differ"),
        pytest.param(
            "  interception:\n    rules:\n"
            f"      - {{name: a, direction: inbound, interfaces: [e], proxyPort: 15001, ports: [{PORTS_200}]}}\n"
            f"      - {{name: b, direction: inbound, interfaces: [e], proxyPort: 15001, ports: [{PORTS_100}]}}\n",
            "9:9", "the inbound rules need 300 rule descriptors", id="interception-descriptors-beyond-256"),
        pytest.param(
            "  loadBalancing:\n    interfaces: [\"gw-*\"]\n    services:\n"
            "      - {name: s, vip: 10.0.0.1, port: 80, backends: [{address: 10.0.0.2}]}\n",
            "7:18", "'gw-*' is a prefix pattern", id="load-balancing-wildcard-interface"),
        pytest.param(
            "  ebpf:\n    interfaces: [eth0, \"gw-*\"]\n  loadBalancing:\n    services:\n"
            "      - {name: s, vip: 10.0.0.1, port: 80, backends: [{address: 10.0.0.2}]}\n",
            "7:24", "'gw-*' is a prefix pattern", id="ebpf-interfaces-wildcard"),
    ],
)
def test_each_refusal_points_at_its_field(body: str, where: str, fragment: str) -> None:
    found = problems(body)
    assert len(found) == 1, found
    assert found[0].startswith(f"t.yaml:{where}: "), found
    assert fragment in found[0]
    assert "ebpf backend" in found[0]


def test_chains_with_different_defaults_and_statefulness_compile() -> None:
    """tc_filter tells input, forward and output apart by the packet's addresses: each chain keeps its own."""
    body = ("  ebpf:\n    interfaces: [e]\n  filtering:\n    input:\n      default: deny\n      stateful: false\n"
            "      rules: [{name: a, action: allow, protocol: tcp, interfaces: [e]}]\n"
            "    forward:\n      default: allow\n      rules: [{name: b, action: deny, protocol: tcp}]\n"
            "    output:\n      default: allow\n      stateful: false\n")
    compile_intent(parse_text(HEADER + body, "t.yaml").intent)


def test_every_offending_rule_is_reported_at_once() -> None:
    body = (
        "  interception:\n    rules:\n"
        "      - {name: a, direction: inbound, interfaces: [e], sources: [10.0.0.0/8], proxyPort: 15001}\n"
        "  filtering:\n    input:\n      rules:\n"
        "        - {name: b, action: deny, interfaces: [e], protocol: udp}\n"
        "        - {name: c, action: allow, interfaces: [\"gw-*\"]}\n"
    )
    assert [p.split(": ", 1)[0] for p in problems(body)] == ["t.yaml:8:56", "t.yaml:12:52", "t.yaml:13:49"]


def test_the_error_names_each_path_without_positions() -> None:
    body = "  filtering:\n    input:\n      rules: [{name: a, action: deny, interfaces: [e], protocol: udp}]\n"
    with pytest.raises(BackendUnavailable) as caught:
        compile_intent(parse_text(HEADER + body, "t.yaml").intent)
    assert str(caught.value).startswith("spec.filtering.input.rules[0].protocol: input filter rule 'a'")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            "  ebpf:\n    interfaces: [eth0]\n  filtering:\n    input:\n      default: deny\n      stateful: false\n"
            "      rules:\n        - {name: a, action: allow, protocol: udp, ports: [53]}\n"
            "        - {name: b, action: rate-limit, rateLimit: {rate: 120, per: minute}}\n"
            "    output:\n      default: deny\n      stateful: false\n",
            id="stateless-chains"),
        pytest.param(
            "  filtering:\n    forward:\n      rules:\n"
            "        - {name: a, action: deny, protocol: tcp, interfaces: [e], ports: [22]}\n"
            "        - {name: b, action: allow, interfaces: [e]}\n",
            id="stateful-chain-denying-tcp"),
        pytest.param(
            "  interception:\n    rules:\n"
            "      - {name: a, direction: inbound, interfaces: [e], ports: [80], proxyPort: 15001}\n"
            "      - {name: b, direction: outbound, exclude: {uids: [1337, 1338]}, proxyPort: 15006}\n"
            "      - {name: c, direction: outbound, exclude: {uids: [\"1337-1338\"]}, proxyPort: 15007}\n",
            id="interception-with-one-exclusion-set"),
    ],
)
def test_an_intent_the_ebpf_backend_can_express_has_no_refusals(body: str) -> None:
    intent = parse_text(HEADER + body, "t.yaml").intent
    assert refusals(intent) == []
    compile_intent(intent)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_examples_compile_for_ebpf(path: Path) -> None:
    intent = parse_text(path.read_text(), str(path)).intent
    assert refusals(intent) == []


THREE_PROBLEMS = HEADER + (
    "  interception:\n    rules:\n"
    "      - {name: a, direction: inbound, interfaces: [e], sources: [10.0.0.0/8], proxyPort: 15001}\n"
    "  filtering:\n    input:\n      rules:\n"
    "        - {name: b, action: deny, interfaces: [e], protocol: udp}\n"
    "        - {name: c, action: allow, interfaces: [\"gw-*\"]}\n"
)


@pytest.mark.parametrize("command", [["validate"], ["validate", "--backend", "ebpf"], ["compile"]])
def test_the_cli_prints_every_refusal_at_file_line_col(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       command: list[str]) -> None:
    path = tmp_path / "i.yaml"
    path.write_text(THREE_PROBLEMS)
    assert main([*command, str(path)]) == 1
    err = capsys.readouterr().err
    assert [line.split(": ", 1)[0] for line in err.splitlines()] == [f"{path}:8:56", f"{path}:12:52", f"{path}:13:49"]


def test_the_cli_overrides_spec_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "i.yaml"
    path.write_text(THREE_PROBLEMS)
    assert main(["validate", "--backend", "tproxy", str(path)]) == 0
    assert "valid" in capsys.readouterr().out


def test_validate_as_a_process_exits_1_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "i.yaml"
    path.write_text(THREE_PROBLEMS.replace("  backend: ebpf\n", ""))
    done = subprocess.run([sys.executable, "-m", "kernform", "validate", "--backend", "ebpf", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{path}:") and "ebpf backend" in line for line in lines)


def test_a_user_table_at_an_inbound_rules_table_is_refused() -> None:
    text = ("apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata: {name: e}\nspec:\n  interception:\n"
            "    routingTable: 7100\n    rules:\n"
            "      - {name: a, direction: inbound, interfaces: [eth0], proxyPort: 15001}\n"
            "      - {name: b, direction: inbound, interfaces: [eth1], proxyPort: 15002}\n"
            "  routing:\n    tables:\n      - {name: u, id: 7101}\n")
    loaded = parse_text(text, "e.yaml")
    with pytest.raises(BackendUnavailable) as refused:
        compile_intent(loaded.intent, "ebpf")
    (problem,) = loaded.problems_at(refused.value.findings)
    assert str(problem).startswith("e.yaml:12:19: routing table 7101 ('u') is the table the ebpf backend gives "
                                   "inbound interception rule 'b'"), problem
    compile_intent(loaded.intent, "tproxy")  # one table there: 7100
