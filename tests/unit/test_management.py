"""compiler.management: which parts of an intent would cut the SSH session kernform runs over."""

from __future__ import annotations

import pytest

from compiler.loader import parse_text
from compiler.management import Connection, cuts

SESSION = Connection("10.9.0.2", "10.9.0.1", 22, "eth0")


def intent(spec: str) -> object:
    text = "apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata: {name: m}\nspec:\n" + spec
    return parse_text(text, "m.yaml").intent


@pytest.mark.parametrize(("spec", "where"), [
    ("  filtering:\n    input:\n      rules:\n        - {name: r, action: deny, protocol: tcp, ports: [22]}\n",
     ("spec", "filtering", "input", "rules", 0)),
    ("  filtering:\n    input:\n      rules:\n        - {name: r, action: deny, sources: [10.9.0.0/16]}\n",
     ("spec", "filtering", "input", "rules", 0)),
    ("  filtering:\n    input:\n      rules:\n        - {name: r, action: rate-limit, protocol: tcp, ports: ['20-30'],"
     " rateLimit: {rate: 5}}\n", ("spec", "filtering", "input", "rules", 0)),
    ("  filtering:\n    input:\n      default: deny\n      rules:\n        - {name: web, action: allow, protocol: tcp,"
     " ports: [80]}\n", ("spec", "filtering", "input", "default")),
    ("  filtering:\n    input:\n      rules:\n        - {name: r, action: deny, interfaces: ['eth*'], protocol: tcp}\n",
     ("spec", "filtering", "input", "rules", 0)),
    ("  interception:\n    rules:\n      - {name: all, direction: inbound, ports: [22], proxyPort: 15001}\n",
     ("spec", "interception", "rules", 0)),
    ("  loadBalancing:\n    services:\n      - {name: s, vip: 10.9.0.1, port: 22, backends: [{address: 10.1.1.1}]}\n",
     ("spec", "loadBalancing", "services", 0)),
])
def test_what_would_cut_the_session(spec: str, where: tuple[object, ...]) -> None:
    assert [path for path, _ in cuts(intent(spec), SESSION)] == [where]  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", [
    "  filtering:\n    input:\n      rules:\n        - {name: r, action: deny, protocol: tcp, ports: [80]}\n",
    "  filtering:\n    input:\n      rules:\n        - {name: r, action: deny, protocol: udp}\n",
    "  filtering:\n    input:\n      rules:\n        - {name: r, action: deny, interfaces: [eth1]}\n",
    "  filtering:\n    input:\n      rules:\n        - {name: r, action: deny, sources: [192.0.2.0/24]}\n",
    "  filtering:\n    input:\n      default: deny\n      rules:\n        - {name: ssh, action: allow, protocol: tcp,"
    " ports: [22]}\n        - {name: rest, action: deny}\n",
    "  filtering:\n    forward:\n      default: deny\n",
    "  interception:\n    rules:\n      - {name: out, direction: outbound, proxyPort: 15001, exclude: {uids: [1337]}}\n",
    "  interception:\n    rules:\n      - {name: all, direction: inbound, proxyPort: 15001, exclude: {ports: [22]}}\n",
])
def test_what_leaves_the_session_alone(spec: str) -> None:
    assert cuts(intent(spec), SESSION) == []  # type: ignore[arg-type]


def test_an_unknown_interface_matches_rules_that_name_one() -> None:
    spec = "  filtering:\n    input:\n      rules:\n        - {name: r, action: deny, interfaces: [eth1]}\n"
    assert cuts(intent(spec), Connection("10.9.0.2", "10.9.0.1", 22, None))  # type: ignore[arg-type]


def test_ssh_connection_parsing() -> None:
    assert Connection.from_ssh("10.9.0.2 50022 10.9.0.1 22") == Connection("10.9.0.2", "10.9.0.1", 22)
    assert Connection.from_ssh("fd00::2 50022 fd00::1 2222") == Connection("fd00::2", "fd00::1", 2222)
    assert Connection.from_ssh("") is None and Connection.from_ssh("a b c d") is None
