"""The nft driver against the real kernel, in a namespace of the test's own."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from compiler import compile_intent
from compiler.loader import load_file, parse_text
from compiler.objects import DesiredState, index_by_key
from reconciler.drivers.nfnetlink import GenerationChanged
from reconciler.drivers.nft import NftDriver
from reconciler.plan import diff

pytestmark = pytest.mark.kernel
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "edge-gateway.yaml"


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kfnft-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def nft_only(desired: DesiredState) -> dict:
    return index_by_key(o for o in desired.objects if o.kind.startswith("nft."))


def converge(driver: NftDriver, desired: DesiredState) -> int:
    observed = driver.observe(f"kernform-{desired.intent}")
    plan = diff(desired.intent, "tproxy", "t", nft_only(desired), index_by_key(observed.objects))
    return driver.apply(plan.actions, desired.objects, observed)


def pending(driver: NftDriver, desired: DesiredState) -> list[str]:
    observed = driver.observe(f"kernform-{desired.intent}")
    plan = diff(desired.intent, "tproxy", "t", nft_only(desired), index_by_key(observed.objects))
    return [f"{a.op} {a.key}" for a in plan.actions]


def test_round_trip_and_idempotency(netns: str) -> None:
    desired = compile_intent(load_file(EXAMPLE).intent)
    driver = NftDriver(netns)
    assert converge(driver, desired) > 0
    assert pending(driver, desired) == []
    assert converge(driver, desired) == 0


def intent_with_cidrs(cidrs: list[str]) -> DesiredState:
    items = "\n".join(f"            - {c}" for c in cidrs)
    text = f"""apiVersion: kernform/v1
kind: NetworkIntent
metadata: {{name: big}}
spec:
  filtering:
    input:
      rules:
        - name: deny-list
          action: deny
          sources:
{items}
"""
    return compile_intent(parse_text(text, "big.yaml").intent)


def test_one_more_cidr_is_one_element_command(netns: str) -> None:
    cidrs = [f"10.{i // 256}.{i % 256}.0/24" for i in range(10_000)]
    driver = NftDriver(netns)
    converge(driver, intent_with_cidrs(cidrs))
    bigger = intent_with_cidrs(cidrs + ["192.0.2.0/24"])
    assert pending(driver, bigger) == ["add nft.element f_input_deny-list_src4 192.0.2.0/24"]
    assert converge(driver, bigger) == 1
    assert pending(driver, bigger) == []


def test_element_changes_skip_libnftables_and_the_listing(netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every other /24, so that nothing collapses into a shorter prefix.
    cidrs = [f"10.{i // 128}.{i % 128 * 2}.0/24" for i in range(2_000)] + ["2001:db8:1::/48"]
    driver = NftDriver(netns)
    converge(driver, intent_with_cidrs(cidrs))
    changed = intent_with_cidrs([*cidrs[1:], "192.0.2.0/25", "2001:db8::/64", "198.51.100.7"])
    assert len(pending(driver, changed)) == 4
    listings: list[str] = []
    real_cmd = driver._nft.cmd
    monkeypatch.setattr(driver._nft, "cmd", lambda text: listings.append(text) or real_cmd(text))
    assert converge(driver, changed) == 3  # raw batch: a delete and an add message for v4, an add for v6
    assert pending(driver, changed) == []  # answered from the kept observation: the generation moved by one
    assert listings == []
    monkeypatch.undo()
    # What libnftables reads back agrees, element for element, with what was written raw.
    fresh = NftDriver(netns)
    observed = fresh.observe(f"kernform-{changed.intent}")
    assert diff(changed.intent, "tproxy", "t", nft_only(changed), index_by_key(observed.objects)).empty


def test_ten_thousand_elements_in_one_element_batch(netns: str) -> None:
    # A batch is one netlink datagram: ~1 MB here, far above the default socket buffer (EMSGSIZE).
    small = [f"10.{i // 128}.{i % 128 * 2}.0/24" for i in range(1_000)]
    large = small + [f"11.{i // 128}.{i % 128 * 2}.0/24" for i in range(10_000)]
    driver = NftDriver(netns)
    converge(driver, intent_with_cidrs(small))
    converge(driver, intent_with_cidrs(large))
    observed = NftDriver(netns).observe(f"kernform-{intent_with_cidrs(large).intent}")
    assert diff("t", "tproxy", "t", nft_only(intent_with_cidrs(large)), index_by_key(observed.objects)).empty


def service_with_weights(weights: list[int]) -> DesiredState:
    backends = "\n".join(f"          - {{address: 10.9.0.{i + 1}, port: 8080, weight: {w}}}"
                         for i, w in enumerate(weights))
    text = f"""apiVersion: kernform/v1
kind: NetworkIntent
metadata: {{name: lb}}
spec:
  loadBalancing:
    services:
      - name: web
        vip: 10.9.9.9
        port: 80
        backends:
{backends}
"""
    return compile_intent(parse_text(text, "lb.yaml").intent)


def test_a_weight_change_rewrites_map_elements_only(netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    driver = NftDriver(netns)
    converge(driver, service_with_weights([1, 1, 1, 1]))
    changed = service_with_weights([1, 3, 1, 1])
    assert {a.split()[1] for a in pending(driver, changed)} == {"nft.element"}  # the rules stay as they are
    listings: list[str] = []
    real_cmd = driver._nft.cmd
    monkeypatch.setattr(driver._nft, "cmd", lambda text: listings.append(text) or real_cmd(text))
    converge(driver, changed)
    assert listings == [] and pending(driver, changed) == []
    monkeypatch.undo()
    observed = NftDriver(netns).observe("kernform-lb")
    assert diff("lb", "tproxy", "t", nft_only(changed), index_by_key(observed.objects)).empty


def test_a_stale_generation_refuses_the_element_batch(netns: str) -> None:
    driver = NftDriver(netns)
    converge(driver, intent_with_cidrs(["10.0.0.0/8"]))
    table = "kernform-big"
    observed = driver.observe(table)
    changed = intent_with_cidrs(["10.0.0.0/8", "192.0.2.0/24"])
    plan = diff(changed.intent, "tproxy", "t", nft_only(changed), index_by_key(observed.objects))
    subprocess.run(["ip", "netns", "exec", netns, "nft", "add table inet other"], check=True)
    with pytest.raises(GenerationChanged):
        driver.apply(plan.actions, changed.objects, observed)
    assert pending(driver, changed) == ["add nft.element f_input_deny-list_src4 192.0.2.0/24"]  # nothing written
    converge(driver, changed)
    assert pending(driver, changed) == []


def test_foreign_table_survives_apply_and_destroy(netns: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "nft", "add table inet other; add chain inet other c "
                    "{ type filter hook input priority 0; }; add rule inet other c counter accept"], check=True)
    desired = compile_intent(load_file(EXAMPLE).intent)
    driver = NftDriver(netns)
    converge(driver, desired)
    driver.delete_table(f"kernform-{desired.intent}")
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "ruleset"], capture_output=True, text=True).stdout
    assert "table inet other" in out and "counter packets" in out
    assert "kernform" not in out


def test_drift_inside_our_table_is_seen_and_repaired(netns: str) -> None:
    desired = compile_intent(load_file(EXAMPLE).intent)
    driver = NftDriver(netns)
    converge(driver, desired)
    table = f"kernform-{desired.intent}"
    subprocess.run(["ip", "netns", "exec", netns, "nft", f"delete element inet {table} ic_web-inbound_dst4 "
                    "{ 198.51.100.0/24 }; add rule inet " + table + " filter_forward counter drop"], check=True)
    drift = sorted(pending(driver, desired))
    assert len(drift) == 2 and drift[0] == "add nft.element ic_web-inbound_dst4 198.51.100.0/24"
    assert drift[1].startswith("remove nft.rule filter_forward/unknown-handle-")
    converge(driver, desired)
    assert pending(driver, desired) == []


def test_restore_puts_the_table_back(netns: str) -> None:
    desired = compile_intent(load_file(EXAMPLE).intent)
    driver = NftDriver(netns)
    converge(driver, desired)
    before = driver.snapshot(f"kernform-{desired.intent}")
    converge(driver, intent_with_cidrs(["10.0.0.0/8"]))  # another intent: a second table
    subprocess.run(["ip", "netns", "exec", netns, "nft", f"flush table inet kernform-{desired.intent}"], check=True)
    driver.restore(f"kernform-{desired.intent}", before)
    assert pending(driver, desired) == []
