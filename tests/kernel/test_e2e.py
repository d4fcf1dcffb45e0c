"""End to end, for both backends: the examples applied in the sandbox lab, proven with real traffic.

Every test runs against tproxy and ebpf. Where the backends differ in what a
user can observe, the test says why (and the README's backend section lists
the differences): for the gateway's own processes, the ebpf backend balances
at the socket, so only processes in the intent's cgroup are balanced; traffic
forwarded from other hosts is balanced by both (ebpf: tc_lb on the intent's
interfaces).
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from compiler import compile_intent
from compiler.errors import ApplyError, KernelError
from compiler.loader import load_file, parse_text
from compiler.objects import BPF_PIN_ROOT, RTPROT_KERNFORM, DesiredState
from kernform import lab as lab_mod
from kernform import traffic
from kernform.lab import LabMap
from reconciler.apply import apply, destroy, make_plan
from reconciler.observe import Target
from reconciler.status import rule_counters

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SIDECAR_PROXY_PORT = 15006


BACKENDS = ["tproxy", "ebpf"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def cgroup_mount() -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2":
            return Path(fields[4])
    raise RuntimeError("no cgroup2 mount")


def intent_cgroup(intent: str) -> str:
    return str(cgroup_mount() / "kernform" / intent)


def desired_of(name: str, backend: str = "tproxy") -> DesiredState:
    return compile_intent(load_file(EXAMPLES / name).intent, backend)


@pytest.fixture(scope="module")
def servers(lab: LabMap) -> Iterator[LabMap]:
    with lab_mod.servers(lab):
        yield lab


@pytest.fixture
def gw(servers: LabMap) -> Iterator[Target]:
    """A target on the lab's gateway; whatever a test applies there is destroyed afterwards."""
    with Target(servers.gw_ns) as target:
        yield target
        for table in target.nft.tables():
            destroy(target, table.removeprefix("kernform-"))


@pytest.fixture
def applied(gw: Target, backend: str) -> Iterator[Target]:
    apply(gw, desired_of("edge-gateway.yaml", backend))
    yield gw


def balanced_get(m: LabMap, backend: str, intent: str, host: str, port: int, **kw: object) -> list[dict]:
    """A client of a load-balanced service in the client namespace: its connections are forwarded through
    the gateway (tproxy: nft DNAT in prerouting; ebpf: tc_lb on gw-client)."""
    return lab_mod.client_get(m, host, port, **kw)  # type: ignore[arg-type]


def local_get(m: LabMap, backend: str, intent: str, host: str, port: int, **kw: object) -> list[dict]:
    """A client of a load-balanced service on the gateway itself (tproxy: nft DNAT in output; ebpf: at
    connect(), for processes in the intent's cgroup)."""
    cgroup = intent_cgroup(intent) if backend == "ebpf" else None
    return lab_mod.client_get(m, host, port, ns=m.gw_ns, cgroup=cgroup, **kw)  # type: ignore[arg-type]


def client_address(m: LabMap, backend: str, family: int = 4) -> str:
    return m.client_v4 if family == 4 else m.client_v6


def get(m: LabMap, host: str, port: int, **kw: object) -> list[dict]:
    return lab_mod.client_get(m, host, port, **kw)  # type: ignore[arg-type]


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True, check=True).stdout


# ------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("family", [4, 6])
def test_inbound_interception_keeps_client_and_original_destination(servers: LabMap, applied: Target, family: int) -> None:
    host = servers.internet_v4 if family == 4 else servers.internet_v6
    (reply,) = get(servers, host, 443)
    assert reply.get("proxy") is True, reply
    assert reply["client_ip"] == (servers.client_v4 if family == 4 else servers.client_v6)
    assert traffic.split_hostport(reply["original_dst"]) == (host, 443)


def test_traffic_outside_the_interception_rule_is_not_intercepted(servers: LabMap, applied: Target) -> None:
    (reply,) = get(servers, servers.internet_v4, 8080)
    assert reply.get("server") == "wan-a" and "proxy" not in reply


def test_weighted_load_balancing_preserves_client_address(servers: LabMap, applied: Target, backend: str) -> None:
    replies = balanced_get(servers, backend, "edge-gateway", "10.70.100.10", 80, count=400)
    assert all("error" not in r for r in replies), replies[:3]
    hits = collections.Counter(r["server"] for r in replies)
    # weights 1:2:1 -> expected 100/200/100; bounds are > 6 standard deviations wide.
    assert 140 <= hits["b2"] <= 260 and 50 <= hits["b1"] <= 150 and 50 <= hits["b3"] <= 150, hits
    assert {r["client_ip"] for r in replies} == {client_address(servers, backend)}


def test_source_hash_keeps_a_client_on_one_backend_ipv6(servers: LabMap, applied: Target, backend: str) -> None:
    replies = balanced_get(servers, backend, "edge-gateway", "fd70:100::10", 80, count=30)
    assert len({r["server"] for r in replies if "error" not in r}) == 1
    assert {r["client_ip"] for r in replies} == {client_address(servers, backend, 6)}


def test_a_weight_change_is_a_map_only_change_and_takes_effect(servers: LabMap, applied: Target, backend: str) -> None:
    def tc_programs() -> str:
        return ip(servers.gw_ns, "-d", "link", "show", "gw-client") + subprocess.run(
            ["ip", "netns", "exec", servers.gw_ns, "tc", "filter", "show", "dev", "gw-client", "ingress"],
            capture_output=True, text=True, check=True).stdout

    before = tc_programs()
    text = (EXAMPLES / "edge-gateway.yaml").read_text()
    text = text.replace("port: 8080, weight: 2 }", "port: 8080, weight: 1 }").replace(
        "{ address: 10.70.2.13, port: 8080, weight: 1 }", "{ address: 10.70.2.13, port: 8080, weight: 6 }")
    changed = compile_intent(parse_text(text, "edge-gateway.yaml").intent, backend)
    result = apply(applied, changed)
    assert result.plan.actions and {a.kind for a in result.plan.actions} == (
        {"bpf.entry"} if backend == "ebpf" else {"nft.element"}), result.plan.counts()
    assert tc_programs() == before  # the same programs (ids) at the same places
    hits = collections.Counter(r.get("server") for r in balanced_get(servers, backend, "edge-gateway",
                                                                     "10.70.100.10", 80, count=240))
    # weights 1:1:6 -> expected 30/30/180
    assert hits["b3"] >= 140 and hits["b1"] + hits["b2"] <= 100, hits


@pytest.mark.parametrize("family", [4, 6])
def test_the_gateways_own_processes_are_balanced(servers: LabMap, applied: Target, backend: str, family: int) -> None:
    vip = "10.70.100.10" if family == 4 else "fd70:100::10"
    replies = local_get(servers, backend, "edge-gateway", vip, 80, count=60)
    assert all("error" not in r for r in replies), replies[:3]
    assert len({r["server"] for r in replies}) >= (2 if family == 4 else 1)
    # The source is one of the gateway's own addresses (tproxy picks it by the route to the VIP, before
    # the output DNAT; ebpf by the route to the backend chosen at connect()).
    addresses = json.loads(ip(servers.gw_ns, "-j", "address", "show"))
    own = {a["local"] for link in addresses for a in link.get("addr_info", [])}
    assert {r["client_ip"] for r in replies} <= own


def test_udp_service_is_balanced(servers: LabMap, gw: Target, backend: str) -> None:
    apply(gw, desired_of("service-lb.yaml", backend))
    replies = balanced_get(servers, backend, "service-lb", "10.70.100.53", 53, proto="udp", count=60)
    servers_seen = collections.Counter(r.get("server") for r in replies)
    assert set(servers_seen) == {"b2", "b3"}, servers_seen


def test_denied_traffic_is_dropped_and_counted(servers: LabMap, applied: Target, backend: str) -> None:
    (denied,) = get(servers, servers.internet_v4, 8081, timeout=0.5)
    (denied6,) = get(servers, servers.internet_v6, 8081, timeout=0.5)
    assert denied.get("error") == "timeout" and denied6.get("error") == "timeout"
    counters = rule_counters(applied, desired_of("edge-gateway.yaml", backend))
    assert counters["filtering.forward/deny-admin"]["packets"] >= 2  # at least one SYN per family


def test_rate_limit_drops_above_the_rate_per_source(servers: LabMap, gw: Target, backend: str) -> None:
    text = """apiVersion: kernform/v1
kind: NetworkIntent
metadata: {name: ratelimit}
spec:
  filtering:
    forward:
      stateful: false  # a packet limit (a stateful chain limits new flows, which ebpf refuses for UDP)
      rules:
        - {name: slow, action: rate-limit, interfaces: [gw-client], protocol: udp, ports: [8080],
           rateLimit: {rate: 5, per: second, burst: 5}}
"""
    desired = compile_intent(parse_text(text, "rl.yaml").intent, backend)
    apply(gw, desired)
    replies = get(servers, servers.backends[0].v4, 8080, proto="udp", count=40, timeout=0.2)
    answered = sum(1 for r in replies if "error" not in r)
    assert 3 <= answered <= 25, answered
    counted = rule_counters(gw, desired)["filtering.forward/slow"]
    dropped = counted["packets"] if backend == "tproxy" else counted["dropped"]
    assert dropped >= 40 - answered - 1, counted


def test_policy_routing_selects_the_uplink(servers: LabMap, applied: Target, backend: str) -> None:
    assert get(servers, servers.internet_v4, 8443)[0].get("server") == "wan-b"
    assert get(servers, servers.internet_v6, 8443)[0].get("server") == "wan-b"
    assert get(servers, servers.internet_v4, 8080)[0].get("server") == "wan-a"


def test_multi_uplink_source_policy(servers: LabMap, gw: Target, backend: str) -> None:
    apply(gw, desired_of("multi-uplink.yaml", backend))
    assert get(servers, servers.internet_v4, 8080)[0].get("server") == "wan-b"
    assert get(servers, servers.internet_v6, 8080)[0].get("server") == "wan-b"
    routes = ip(servers.gw_ns, "route", "show", "table", "203")
    assert "nexthop via 10.70.3.2" in routes and "weight 3" in routes


def test_outbound_interception_with_exclusions(servers: LabMap, backend: str) -> None:
    # ebpf intercepts at connect() for processes in the intent's cgroup: the applications run there.
    cgroup = intent_cgroup("sidecar") if backend == "ebpf" else None

    def app_get(host: str, **kw: object) -> dict:
        return lab_mod.client_get(servers, host, 8080, cgroup=cgroup, **kw)[0]  # type: ignore[arg-type]

    proxy = traffic.command("tproxy", "--port", str(SIDECAR_PROXY_PORT), "--name", "sidecar")
    with Target(servers.client_ns) as client:
        apply(client, desired_of("sidecar-outbound.yaml", backend))
        try:
            # The ebpf backend answers SO_ORIGINAL_DST for sockets of its cgroup, so the proxy runs there
            # too (in a real deployment as the excluded uid; this test proxy opens no connections itself).
            with lab_mod.background(servers.client_ns, proxy, SIDECAR_PROXY_PORT, cgroup=cgroup):
                reply = app_get(servers.backends[0].v4)
                assert reply.get("server") == "sidecar", reply
                assert traffic.split_hostport(reply["original_dst"]) == (servers.backends[0].v4, 8080)
                reply6 = app_get(servers.backends[0].v6)
                assert reply6.get("server") == "sidecar" and servers.backends[0].v6 in reply6["original_dst"]
                # excluded destination, and the proxy's own uid, go straight to the backend
                assert app_get(servers.backends[2].v4).get("server") == "b3"
                assert app_get(servers.backends[0].v4, uid=1337).get("server") == "b1"
        finally:
            destroy(client, "sidecar")


# ------------------------------------------------------------ reconciliation
def test_second_apply_performs_no_kernel_operation(servers: LabMap, applied: Target, backend: str) -> None:
    # A fresh process (a new Target: new sockets, no memory) finds nothing to do, and compiles nothing.
    with Target(servers.gw_ns) as fresh:
        result = apply(fresh, desired_of("edge-gateway.yaml", backend))
    assert result.plan.empty and result.operations == 0


def test_foreign_objects_survive_apply_and_destroy(servers: LabMap, gw: Target, backend: str) -> None:
    ns = servers.gw_ns
    subprocess.run(["ip", "netns", "exec", ns, "nft",
                    "add table inet foreign; add chain inet foreign pre { type filter hook prerouting priority -150; };"
                    " add rule inet foreign pre counter"], check=True)
    subprocess.run(["ip", "-n", ns, "rule", "add", "priority", "1000", "from", "10.99.0.0/16", "lookup", "200"], check=True)
    subprocess.run(["ip", "-n", ns, "route", "add", "10.99.0.0/16", "via", "10.70.3.2", "table", "200"], check=True)
    subprocess.run(["ip", "-n", ns, "route", "add", "local", "10.98.0.0/16", "dev", "lo", "table", "7100"], check=True)
    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "gw-client", "clsact"], check=True)
    # A foreign classifier (this kernel has u32 but neither matchall nor gact); it matches nothing useful.
    subprocess.run(["ip", "netns", "exec", ns, "tc", "filter", "add", "dev", "gw-client", "ingress", "pref", "7",
                    "protocol", "all", "u32", "match", "u32", "0", "0"], check=True)
    try:
        apply(gw, desired_of("edge-gateway.yaml", backend))
        destroy(gw, "edge-gateway")
        assert "table inet foreign" in subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "tables"],
                                                      capture_output=True, text=True).stdout
        assert "from 10.99.0.0/16 lookup 200" in ip(ns, "rule")
        assert "10.99.0.0/16 via 10.70.3.2" in ip(ns, "route", "show", "table", "200")
        assert "local 10.98.0.0/16" in ip(ns, "route", "show", "table", "7100")
        assert "clsact" in subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", "gw-client"],
                                          capture_output=True, text=True).stdout
        filters = subprocess.run(["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", "gw-client", "ingress"],
                                 capture_output=True, text=True).stdout
        assert "u32" in filters and "bpf" not in filters
    finally:
        subprocess.run(["ip", "netns", "exec", ns, "nft", "delete table inet foreign"], check=False)
        subprocess.run(["ip", "-n", ns, "rule", "del", "priority", "1000", "from", "10.99.0.0/16"], check=False)
        subprocess.run(["ip", "-n", ns, "route", "flush", "table", "200"], check=False)
        subprocess.run(["ip", "-n", ns, "route", "flush", "table", "7100"], check=False)
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "gw-client", "clsact"], check=False)


def test_destroy_leaves_nothing(servers: LabMap, gw: Target, backend: str) -> None:
    for name in ("edge-gateway.yaml", "multi-uplink.yaml", "service-lb.yaml"):
        apply(gw, desired_of(name, backend))
    for name in ("edge-gateway", "multi-uplink", "service-lb"):
        destroy(gw, name)
    ns = servers.gw_ns
    assert "kernform" not in subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"],
                                            capture_output=True, text=True).stdout
    for family in ("-4", "-6"):
        assert f"proto {RTPROT_KERNFORM}" not in ip(ns, family, "rule", "show")
        assert f"proto {RTPROT_KERNFORM}" not in ip(ns, family, "route", "show", "table", "all")
    for intent in ("edge-gateway", "multi-uplink", "service-lb"):
        assert not (Path(BPF_PIN_ROOT) / intent).exists()
    assert "bpf" not in subprocess.run(["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", "gw-client",
                                        "ingress"], capture_output=True, text=True).stdout


def test_removing_a_table_from_the_intent_sweeps_its_routes(servers: LabMap, gw: Target, backend: str) -> None:
    apply(gw, desired_of("multi-uplink.yaml", backend))
    smaller = load_file(EXAMPLES / "multi-uplink.yaml").intent.model_copy(deep=True)
    spec = smaller.spec.model_copy(update={"routing": smaller.spec.routing.model_copy(update={
        "tables": [t for t in smaller.spec.routing.tables if t.name != "spread"],
        "rules": [r for r in smaller.spec.routing.rules if r.table != "spread"],
    })})
    apply(gw, compile_intent(smaller.model_copy(update={"spec": spec}), backend))
    assert ip(servers.gw_ns, "route", "show", "table", "203").strip() == ""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kernform", *args], capture_output=True, text=True, cwd=ROOT)


def test_the_gitops_directory_applies_as_three_intents_and_works(servers: LabMap, gw: Target, backend: str) -> None:
    """examples/gitops/edge-gateway: the edge gateway split into three intents, applied as one directory."""
    directory = str(EXAMPLES / "gitops" / "edge-gateway")
    b = ["--backend", backend, "--netns", servers.gw_ns]
    result = cli("apply", "--quiet", directory, *b)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        f"Applied 3 intents on netns {servers.gw_ns}: gw-interception, gw-services, gw-edge.")
    (reply,) = get(servers, servers.internet_v4, 443)
    assert reply.get("proxy") is True and reply["client_ip"] == servers.client_v4, reply
    replies = balanced_get(servers, backend, "gw-services", "10.70.100.10", 80, count=40)
    assert {r.get("server") for r in replies} == {"b1", "b2", "b3"}, replies[:3]
    assert {r["client_ip"] for r in replies} == {servers.client_v4}
    (denied,) = get(servers, servers.internet_v4, 8081, timeout=0.5)
    assert denied.get("error") == "timeout"
    assert get(servers, servers.internet_v4, 8443)[0].get("server") == "wan-b"
    clean = cli("plan", "--detailed-exitcode", directory, *b)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    status = json.loads(cli("status", "--json", "--netns", servers.gw_ns).stdout)
    assert {i["intent"]: i["backend"] for i in status["intents"]} == {
        "gw-interception": backend, "gw-services": backend, "gw-edge": backend}
    destroyed = cli("destroy", "--yes", directory, "--netns", servers.gw_ns)
    assert destroyed.returncode == 0, destroyed.stderr
    assert not [t for t in gw.nft.tables() if t.startswith("kernform-gw-")]


def test_bad_file_is_reported_and_leaves_the_kernel_untouched(
    servers: LabMap, applied: Target, backend: str, tmp_path: Path
) -> None:
    before = applied.nft.snapshot("kernform-edge-gateway")
    rules_before = ip(servers.gw_ns, "rule")
    bad = tmp_path / "bad.yaml"
    good = (EXAMPLES / "edge-gateway.yaml").read_text()
    bad.write_text(good.replace("proxyPort: 15001", "proxyPort: 0").replace("ports: 8443", "ports: 99999"))
    result = cli("apply", str(bad), "--netns", servers.gw_ns, "--backend", backend)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{bad}:") for line in lines), result.stderr
    assert applied.nft.snapshot("kernform-edge-gateway") == before
    assert ip(servers.gw_ns, "rule") == rules_before


def test_failed_apply_keeps_the_previous_state(servers: LabMap, applied: Target, backend: str) -> None:
    before = applied.nft.snapshot("kernform-edge-gateway")
    broken = (EXAMPLES / "edge-gateway.yaml").read_text().replace("dev: gw-wan-b }", "dev: no-such-if }", 1)
    broken_intent = compile_intent(parse_text(broken.replace("deny-admin", "deny-admin2"), "x.yaml").intent, backend)
    with pytest.raises((KernelError, ApplyError)):
        apply(applied, broken_intent)
    assert applied.nft.snapshot("kernform-edge-gateway") == before
    plan, _ = make_plan(applied, desired_of("edge-gateway.yaml", backend))
    assert plan.empty, plan.actions


def test_cli_plan_json_and_exit_codes(servers: LabMap, gw: Target, backend: str) -> None:
    example = str(EXAMPLES / "edge-gateway.yaml")
    b = ["--backend", backend]
    pending = cli("plan", example, "--netns", servers.gw_ns, "--json", "--detailed-exitcode", *b)
    assert pending.returncode == 2, pending.stderr
    document = json.loads(pending.stdout)
    jsonschema.validate(document, json.loads((ROOT / "schemas" / "plan.schema.json").read_text()))
    assert document["summary"]["add"] > 0 and document["summary"]["remove"] == 0
    assert cli("apply", example, "--netns", servers.gw_ns, *b).returncode == 0
    clean = cli("plan", example, "--netns", servers.gw_ns, "--detailed-exitcode", *b)
    assert clean.returncode == 0 and "No changes" in clean.stdout
    status = cli("status", example, "--netns", servers.gw_ns, "--json", *b)
    report = json.loads(status.stdout)["intents"][0]
    assert report["inSync"] is True and "filtering.forward/deny-admin" in report["counters"]


@pytest.mark.parametrize(("first", "second"), [("tproxy", "ebpf"), ("ebpf", "tproxy")])
def test_switching_backends_leaves_nothing_of_the_old_one(servers: LabMap, gw: Target, first: str, second: str) -> None:
    apply(gw, desired_of("edge-gateway.yaml", first))
    plan, _ = make_plan(gw, desired_of("edge-gateway.yaml", second))
    kinds_removed = {a.kind for a in plan.actions if a.op == "remove"}
    kinds_added = {a.kind for a in plan.actions if a.op == "add"}
    if first == "tproxy":
        assert {"nft.chain", "nft.rule"} <= kinds_removed and "bpf.program" in kinds_added
    else:
        assert {"bpf.program", "bpf.entry"} <= kinds_removed and "nft.chain" in kinds_added
    apply(gw, desired_of("edge-gateway.yaml", second))
    ns = servers.gw_ns
    ruleset = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "kernform-edge-gateway"],
                             capture_output=True, text=True).stdout
    tc = subprocess.run(["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", "gw-client", "ingress"],
                        capture_output=True, text=True).stdout
    pins = [p for p in (Path(BPF_PIN_ROOT) / "edge-gateway").rglob("*")] if (Path(BPF_PIN_ROOT) / "edge-gateway").exists() else []
    if second == "ebpf":
        assert "chain" not in ruleset and "bpf" in tc
    else:
        assert "chain" in ruleset and "bpf" not in tc and not pins
    (reply,) = get(servers, servers.internet_v4, 80)
    assert reply.get("proxy") is True  # interception works after the switch


def test_interception_holds_up_when_client_ports_are_reused_during_time_wait(
    servers: LabMap, applied: Target, backend: str
) -> None:
    # The proxy closes first, so the gateway holds every connection in TIME_WAIT for 60 s. With only 300
    # client ports, 1,200 connections reuse each port four times while its TIME_WAIT entry is still there:
    # tc + bpf_sk_assign never answers such a SYN; nft TPROXY and sk_lookup (the ebpf design) must.
    ns = servers.client_ns
    before = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.ip_local_port_range"],
                            capture_output=True, text=True, check=True).stdout.split()
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=41000 41299"],
                   check=True)
    try:
        replies = get(servers, servers.internet_v4, 80, count=1200, timeout=2.0)
    finally:
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                        f"net.ipv4.ip_local_port_range={before[0]} {before[1]}"], check=True)
    failures = [r for r in replies if r.get("proxy") is not True]
    assert len(replies) == 1200 and not failures, (len(failures), failures[:3])
    ports = len({r["client_port"] for r in replies})
    assert ports <= 300 and len(replies) >= 4 * ports  # every port used at least four times
    # ... and the gateway held each port's last connection in TIME_WAIT, as it held the earlier ones
    waiting = subprocess.run(["ip", "netns", "exec", servers.gw_ns, "ss", "-Htan", "state", "time-wait"],
                             capture_output=True, text=True).stdout
    assert sum(1 for line in waiting.splitlines() if ":80 " in line) >= 0.9 * ports
