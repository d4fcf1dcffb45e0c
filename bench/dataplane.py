"""Data-path measurements: filtering, load balancing and interception, each backend beside its references.

Each scenario is a phase with a freshly built network (so no state of one
phase, e.g. an iptables nat table that stays registered once created, weighs
on the next). Within a phase, for every N the state is applied to all
gateways at once, then the repetitions interleave the variants (order A B C D,
then D C B A, ...), so slow drift of the machine hits every variant alike.

Variants and where their load runs:
- filter: client -> gateway -> server nginx:80, new connections (one request
  each) and keep-alive requests. none: no rules (measured at every N, as the
  drift reference); iptables: FORWARD chain of N DROP rules (linear);
  tproxy/ebpf: kernform, a deny rule holding N CIDRs (nft interval set / tc
  program with an LPM trie).
- lb: a VIP over B backends, new connections. iptables: kube-proxy-style
  chain of B probability DNAT rules (client, forwarded); tproxy: nft DNAT
  through a map (client, forwarded; and `tproxy-local`, the load generator in
  the gateway namespace, which nft balances in its output hook); ebpf:
  socket-level connect() rewrite, which only balances processes in the
  intent's cgroup, so its load generator runs in the gateway namespace inside
  that cgroup. References: `none` (client straight to a backend through the
  gateway) and `none-local` (gateway namespace straight to a backend).
- interception: client -> 198.18.i.10:80 handed to haproxy (transparent bind
  on :15001) in the gateway. none: the client connects to haproxy's own
  address (no interception); iptables: the documented TPROXY recipe
  (-m socket, TPROXY rules, fwmark routing); tproxy: kernform's nft TPROXY;
  ebpf: kernform's sk_lookup; tproxy-synfix (only while kernform's socket
  rule still matches SYNs): kernform's tproxy state with that rule changed by
  hand (see patch_syn_rule). haproxy closes first, so the gateway keeps a
  TIME_WAIT entry for every connection, while the client, with 1,024
  ephemeral ports, reuses each 4-tuple within a fraction of a second.
- services: S VIPs:80, each over 10 backends (drawn from a pool of 1,000
  addresses the server's nginx answers on), forwarded from the client,
  `loadBalancing.interfaces` naming the gateway's client-side interface; new
  connections to the last VIP (the worst case for a design that walks a list)
  and to a random VIP per connection. none: the client straight to a backend
  (to a random pool address), no rules; iptables: kube-proxy's iptables mode,
  a KUBE-SERVICES-like chain of one rule per service jumping to the
  service's chain of probability DNAT rules; tproxy/ebpf: kernform. A backend
  whose apply fails at some S loses that row only (the error is recorded).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.objects import NftRule

from . import intents, load, servers, state
from . import topology as topo
from .load import Load, LoadSettings

FILTER_INTENT = "kfbench-filter"
LB_INTENT = "kfbench-lb"
ICPT_INTENT = "kfbench-icpt"
SVC_INTENT = "kfbench-svc"


@dataclass
class DataplaneSettings:
    filter_ns: list[int]
    lb_ns: list[int]
    icpt_ns: list[int]
    reps: int
    close: LoadSettings
    keepalive: LoadSettings
    interception: LoadSettings
    services_ns: list[int] = field(default_factory=lambda: [1, 100, 1_000, 10_000])
    apply_limit_s: float = 900.0  # one kernform apply of the services scenario (a generous bound: no hang)


@dataclass
class Dataplane:
    workdir: Path
    kfload: Path
    settings: DataplaneSettings
    kernform: state.KernformState
    say: Callable[[str], None]
    rows: list[dict[str, Any]] = field(default_factory=list)
    applies: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def lockfile(self) -> Path:
        return self.workdir / "xtables.lock"

    # ------------------------------------------------------------ plumbing
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        self.say(f"== data path: {name}")
        topo.up()
        try:
            with servers.running(self.workdir):
                yield
        finally:
            for ns, intent in sorted(self.kernform.applied):
                try:
                    self.kernform.destroy(ns, intent)
                except Exception as exc:
                    self.say(f"  !! destroy {intent} in {ns}: {exc}")
            for ns in list(self.kernform.targets):
                self.kernform.close_namespace(ns)
            topo.down()
            self.say(f"   ({name}: {time.monotonic() - started:.0f} s)")

    def ebpf_ok(self) -> bool:
        return self.kernform.ebpf_problem is None

    def kernform_apply(self, scenario: str, n: int, doc: dict[str, Any], variant: str | None = None) -> bool:
        backend = doc["spec"]["backend"]
        variant = variant or backend
        result = self.kernform.apply(topo.GATEWAYS[variant].ns, doc)
        if result is None:
            self.skipped[f"{scenario}/ebpf"] = self.kernform.ebpf_problem or "unknown"
            return False
        self.applies.append({"scenario": scenario, "variant": variant, "n": n, "seconds": result.seconds,
                             "operations": result.operations})
        return True

    def check(self, scenario: str, n: int, variant: str, ns: str, url: str, expect: str,
              cgroup: str | None = None) -> bool:
        body = servers.http_get(ns, url, cgroup=cgroup)
        ok = body.startswith(expect)
        self.checks.append({"scenario": scenario, "n": n, "variant": variant, "url": url, "ok": ok,
                            "reply": body[:120]})
        if not ok:
            self.say(f"  !! {scenario} N={n} {variant}: {url} answered {body!r}, expected {expect!r}...; row skipped")
        return ok

    def measure(self, scenario: str, n: int, loads: dict[str, Load], metrics: dict[str, tuple[LoadSettings, bool]],
                extra: Callable[[str], dict[str, Any]] | None = None,
                aimed: dict[tuple[str, str], Load] | None = None, retransmits: bool = False) -> None:
        """Interleaved repetitions of every (variant, metric); one row per pair. `aimed`: the load of a
        (variant, metric) pair that goes elsewhere than loads[variant] (e.g. a random VIP instead of the last).
        `retransmits`: count the SYNs and segments the load's namespace sent again during each repetition (a
        connection stalled for a second may end after the measured window, unseen in the latency, while the
        rate shows it)."""
        samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
        names = list(loads)

        def load_of(variant: str, metric: str) -> Load:
            return (aimed or {}).get((variant, metric), loads[variant])

        for rep in range(self.settings.reps):
            for variant in names if rep % 2 == 0 else reversed(names):
                for metric, (settings, keepalive) in metrics.items():
                    ld = load_of(variant, metric)
                    before = load.retransmits(ld.ns) if retransmits else {}
                    result = load.run(self.kfload, ld, settings, keepalive)
                    if retransmits:
                        result.update({k: v - before[k] for k, v in load.retransmits(ld.ns).items()})
                    samples.setdefault((variant, metric), []).append(result)
        for (variant, metric), reps in samples.items():
            ld = load_of(variant, metric)
            row = {"scenario": scenario, "metric": metric, "variant": variant, "n": n,
                   "load_from": ld.label, **load.summarise(reps)}
            if ld.addresses > 1:
                row["addresses"] = ld.addresses
            if retransmits:
                row["syn_retrans"] = sum(r["syn_retrans"] for r in reps)
                row["retrans_segs"] = sum(r["retrans_segs"] for r in reps)
            if extra is not None:
                row.update(extra(variant))
            self.rows.append(row)
            r = row["rate"]
            self.say(f"   {scenario:<12} N={n:<6} {variant:<13} {metric:<13} {r['median']:>9.0f}/s "
                     f"[{r['min']:.0f}..{r['max']:.0f}]  p50 {row['latency_us']['p50'] / 1000:.2f} ms "
                     f"p99 {row['latency_us']['p99'] / 1000:.2f} ms"
                     + (f"  errors {row['errors']}" if row["errors"] else "")
                     + (f"  retransmits: {row['syn_retrans']} SYN, {row['retrans_segs']} segments"
                        if row.get("retrans_segs") else ""))

    # ------------------------------------------------------------ scenarios
    def run_all(self, scenarios: tuple[str, ...] = ("filter", "lb", "interception", "services")) -> None:
        if "filter" in scenarios:
            self.filtering()
        if "lb" in scenarios:
            self.load_balancing()
        if "interception" in scenarios:
            self.interception()
        if "services" in scenarios:
            self.services()

    def filtering(self) -> None:
        s = self.settings
        gws = topo.GATEWAYS
        with self.phase("filtering (N CIDRs in a deny rule, forwarded traffic allowed)"):
            for n in s.filter_ns:
                cidrs = intents.blocklist(n)
                seconds = state.iptables_restore(gws["iptables"].ns, intents.iptables_filter(cidrs), self.lockfile)
                self.applies.append({"scenario": "filter", "variant": "iptables", "n": n, "seconds": seconds})
                for backend in ("tproxy", "ebpf"):
                    self.kernform_apply("filter", n, intents.filter_doc(FILTER_INTENT, backend, cidrs,
                                                                        topo.GW_CLIENT_IF))
                loads = {}
                # The no-rules reference does not depend on N, but it is measured at every N: it shows how
                # much the machine itself drifted between steps, which the target ratios correct for.
                for variant in ("none", "iptables", "tproxy", "ebpf"):
                    if variant == "ebpf" and not self.ebpf_ok():
                        continue
                    gw = gws[variant]
                    if self.check("filter", n, variant, topo.CLIENT_NS, f"http://{gw.internet}/", "nginx"):
                        loads[variant] = Load(topo.CLIENT_NS, gw.internet, 80, label="client, forwarded")
                self.measure("filter", n, loads, {"conn_rate": (s.close, False), "keepalive_rps": (s.keepalive, True)})

    def load_balancing(self) -> None:
        s = self.settings
        gws = topo.GATEWAYS
        with self.phase("load balancing (a VIP over B backends)"):
            cgroup: str | None = None
            for i, b in enumerate(s.lb_ns):
                seconds = state.iptables_restore(gws["iptables"].ns, intents.iptables_lb(gws["iptables"].vip, b),
                                                 self.lockfile)
                self.applies.append({"scenario": "lb", "variant": "iptables", "n": b, "seconds": seconds})
                # Both backends balance connections forwarded from the client's interface; ebpf also
                # balances at connect() for processes in its cgroup (ebpf-local).
                for backend in ("tproxy", "ebpf"):
                    self.kernform_apply("lb", b, intents.lb_doc(LB_INTENT, backend, gws[backend].vip, b,
                                                                interfaces=[topo.GW_CLIENT_IF]))
                candidates: dict[str, tuple[Load, str]] = {}
                if i == 0:
                    candidates["none"] = (Load(topo.CLIENT_NS, topo.backend_address(0), 8080,
                                               label="client, forwarded"), f"http://{topo.backend_address(0)}:8080/")
                    candidates["none-local"] = (Load(gws["none"].ns, topo.backend_address(0), 8080,
                                                     label="gateway namespace"),
                                                f"http://{topo.backend_address(0)}:8080/")
                for variant in ("iptables", "tproxy"):
                    candidates[variant] = (Load(topo.CLIENT_NS, gws[variant].vip, 80, label="client, forwarded"),
                                           f"http://{gws[variant].vip}/")
                candidates["tproxy-local"] = (Load(gws["tproxy"].ns, gws["tproxy"].vip, 80, label="gateway namespace"),
                                              f"http://{gws['tproxy'].vip}/")
                if self.ebpf_ok():
                    cgroup = state.cgroup_of(LB_INTENT)
                    if i == 0:
                        self.say(f"   ebpf: forwarded connections through tc_lb on {topo.GW_CLIENT_IF}; ebpf-local balances "
                                 f"at connect() for processes in the intent's cgroup: its load generator runs in "
                                 f"{gws['ebpf'].ns} inside {cgroup} (sh -c 'echo $$ > {cgroup}/cgroup.procs && exec "
                                 f"ip netns exec {gws['ebpf'].ns} kfload ...'); compare it with tproxy-local and "
                                 "none-local, which run there too")
                    candidates["ebpf"] = (Load(topo.CLIENT_NS, gws["ebpf"].vip, 80, label="client, forwarded"),
                                          f"http://{gws['ebpf'].vip}/")
                    candidates["ebpf-local"] = (Load(gws["ebpf"].ns, gws["ebpf"].vip, 80, cgroup=cgroup,
                                                     label="gateway namespace, in the intent's cgroup"),
                                                f"http://{gws['ebpf'].vip}/")
                loads = {}
                for variant, (ld, url) in candidates.items():
                    if self.check("lb", b, variant, ld.ns, url, "nginx 10.90.", cgroup=ld.cgroup):
                        loads[variant] = ld
                if self.ebpf_ok() and i == 0:
                    # Shown once: outside the cgroup, nothing is balanced (the VIP answers nobody).
                    body = servers.http_get(gws["ebpf"].ns, f"http://{gws['ebpf'].vip}/", timeout=1)
                    self.checks.append({"scenario": "lb", "n": b, "variant": "ebpf (outside the cgroup)",
                                        "url": f"http://{gws['ebpf'].vip}/", "ok": not body.startswith("nginx"),
                                        "reply": body[:120]})
                self.measure("lb", b, loads, {"conn_rate": (s.close, False)})

    def interception(self) -> None:
        s = self.settings
        gws = topo.GATEWAYS
        ipt = gws["iptables"]
        with self.phase("interception (inbound, into a transparent haproxy)"):
            state.tproxy_routing(ipt.ns, add=True)
            for i, n in enumerate(s.icpt_ns):
                extra = intents.blocklist(n, salt=1)
                seconds = state.iptables_restore(ipt.ns, intents.iptables_interception(ipt.internet_net, extra),
                                                 self.lockfile)
                self.applies.append({"scenario": "interception", "variant": "iptables", "n": n, "seconds": seconds})
                docs = {variant: intents.interception_doc(ICPT_INTENT, backend, gws[variant].internet_net, extra,
                                                          topo.GW_CLIENT_IF)
                        for variant, backend in (("tproxy", "tproxy"), ("ebpf", "ebpf"), ("tproxy-synfix", "tproxy"))}
                for variant, doc in docs.items():
                    self.kernform_apply("interception", n, doc, variant)
                synfix = self.patch_syn_rule(gws["tproxy-synfix"].ns, docs["tproxy-synfix"])
                loads = {}
                if i == 0 and self.check("interception", n, "none", topo.CLIENT_NS,
                                         f"http://{gws['none'].gw_client_addr}:{topo.PROXY_PORT}/", "haproxy"):
                    loads["none"] = Load(topo.CLIENT_NS, gws["none"].gw_client_addr, topo.PROXY_PORT,
                                         label="client, straight to the proxy")
                for variant in ("iptables", "tproxy", "ebpf", "tproxy-synfix"):
                    if (variant == "ebpf" and not self.ebpf_ok()) or (variant == "tproxy-synfix" and not synfix):
                        continue
                    gw = gws[variant]
                    if self.check("interception", n, variant, topo.CLIENT_NS, f"http://{gw.internet}/",
                                  f"haproxy {gw.internet}:80"):
                        loads[variant] = Load(topo.CLIENT_NS, gw.internet, 80, label="client, intercepted")
                self.measure("interception", n, loads, {"conn_rate": (s.interception, False)},
                             extra=lambda variant: {"gateway_time_wait": time_wait(gws[variant].ns)})
            state.tproxy_routing(ipt.ns, add=False)

    def services(self) -> None:
        """S services of 10 backends each: new connections to the last VIP and to a random VIP."""
        s = self.settings
        gws = topo.GATEWAYS
        if not intents.services_text_matches():
            raise RuntimeError("bench.intents.services_text no longer writes what PyYAML writes: fix it first")
        self.notes.append(f"services: service i is VIP 10.(100+g).0.1 + i on gateway g, port 80, over "
                          f"{topo.SERVICE_BACKENDS} backends, backend j = pool[("
                          f"{topo.SERVICE_BACKENDS}i+j) mod {topo.SERVICE_POOL}], pool = {topo.SERVICE_POOL} "
                          f"consecutive addresses from {topo.service_pool_address(0)}:8080; conn_rate: the last VIP, "
                          "conn_rate_random: a random VIP per connection; iptables: kube-proxy's iptables mode "
                          "(a services chain of one rule per service, a chain of probability DNAT rules per service)")
        with self.phase(f"services (S VIPs:80, {topo.SERVICE_BACKENDS} backends each; the last VIP and a random one)"):
            for i, n in enumerate(s.services_ns):
                vips = {v: [gws[v].service_vip(k) for k in range(n)] for v in ("iptables", "tproxy", "ebpf")}
                seconds = state.iptables_restore(gws["iptables"].ns, intents.iptables_services(vips["iptables"]),
                                                 self.lockfile)
                self.applies.append({"scenario": "services", "variant": "iptables", "n": n, "seconds": seconds})
                self.say(f"   S={n:,}: iptables-legacy-restore {seconds:.2f} s "
                         f"({n + n * topo.SERVICE_BACKENDS:,} rules in {n + 1:,} chains)")
                applied = []
                for backend in ("tproxy", "ebpf"):
                    if backend == "ebpf" and not self.ebpf_ok():
                        self.skipped.setdefault("services/ebpf", self.kernform.ebpf_problem or "unknown")
                        continue
                    if self.services_apply(backend, n, vips[backend]):
                        applied.append(backend)
                last = n - 1
                pool_first = topo.service_pool_address(0)
                loads: dict[str, Load] = {}
                aimed: dict[tuple[str, str], Load] = {}
                none_url = f"http://{topo.service_backend(last, 0)}:8080/"
                if self.check("services", n, "none", topo.CLIENT_NS, none_url, "nginx 10.90."):
                    loads["none"] = Load(topo.CLIENT_NS, topo.service_backend(last, 0), 8080,
                                         label="client, straight to a backend")
                    aimed["none", "conn_rate_random"] = Load(topo.CLIENT_NS, pool_first, 8080,
                                                             addresses=topo.SERVICE_POOL,
                                                             label="client, straight to a random pool address")
                for variant in ("iptables", *applied):
                    # The last VIP (the one the load aims at) and the first (the random load's range starts there).
                    if all(self.check("services", n, variant, topo.CLIENT_NS, f"http://{vip}/", "nginx 10.90.")
                           for vip in {vips[variant][last], vips[variant][0]}):
                        loads[variant] = Load(topo.CLIENT_NS, vips[variant][last], 80,
                                              label="client, forwarded, the last VIP")
                        aimed[variant, "conn_rate_random"] = Load(topo.CLIENT_NS, vips[variant][0], 80, addresses=n,
                                                                  label="client, forwarded, a random VIP")
                if i == 0:
                    self.say(f"   none: the client straight to a backend (last VIP's load) or to one of the "
                             f"{topo.SERVICE_POOL:,} pool addresses at random, through {gws['none'].ns}")
                self.measure("services", n, loads,
                             {"conn_rate": (s.close, False), "conn_rate_random": (s.close, False)}, aimed=aimed,
                             retransmits=True)

    def services_apply(self, backend: str, n: int, vips: list[str]) -> bool:
        """kernform's S services in the backend's gateway; a failure (or the time limit) costs this row only."""
        ns = topo.GATEWAYS[backend].ns
        text = intents.services_text(SVC_INTENT, backend, vips, interfaces=[topo.GW_CLIENT_IF])
        result = self.kernform.try_apply_text(ns, text, SVC_INTENT, backend, self.settings.apply_limit_s)
        if isinstance(result, str):
            self.skipped[f"services/{backend}/S={n}"] = result
            self.applies.append({"scenario": "services", "variant": backend, "n": n, "error": result})
            self.say(f"  !! services S={n:,} {backend}: apply failed, no row: {result}")
            return False
        self.applies.append({"scenario": "services", "variant": backend, "n": n, "seconds": result.seconds,
                             "compile_s": result.compile_s, "operations": result.operations})
        self.say(f"   S={n:,}: {backend} parse+compile {result.compile_s or 0:.2f} s, apply {result.seconds:.2f} s "
                 f"({result.operations:,} kernel operations)")
        return True

    def patch_syn_rule(self, ns: str, doc: dict[str, Any]) -> bool:
        """Let a fresh SYN skip kernform's `socket transparent 1 ... accept` rule, by hand, in this gateway only.

        That rule (first in intercept_pre) matches every packet whose 4-tuple
        has a socket with the transparent flag, TIME_WAIT entries included. A
        SYN that reuses the 4-tuple of a connection the proxy closed is then
        accepted there and never reaches the `tproxy` rule, whose TIME_WAIT
        handling (nf_tproxy_handle_time_wait4) would hand it to the proxy's
        listener; the kernel instead looks for a listener on the original port,
        finds none, answers from TIME_WAIT with an ACK, the client resets and
        retries ~10 ms later. The documented iptables recipe (-m socket first)
        has the same flaw. This row measures the rule with pure SYNs excluded.
        Returns False (no row) when kernform's own compiled rule already
        excludes them. The patched rule keeps kernform's comment, and kernform
        reads rules back by that comment, so a later apply leaves it in place.
        """
        compiled = [o for o in state.desired_of(doc).objects
                    if isinstance(o, NftRule) and o.rule_id == "established-transparent"]
        if not compiled:
            self.say("   (no `established-transparent` rule in kernform's tproxy output: no hand-patched row)")
            return False
        if "syn" in compiled[0].text:
            self.say("   (kernform's own socket rule already lets fresh SYNs through: no hand-patched row)")
            return False
        table, chain = f"kernform-{ICPT_INTENT}", "intercept_pre"
        listing = topo.run_in(ns, ["nft", "-a", "list", "chain", "inet", table, chain]).stdout
        fix = "tcp flags & (syn | ack) != syn socket transparent 1"
        for line in listing.splitlines():
            if "socket transparent 1" not in line or "# handle " not in line:
                continue
            rule, _, handle = line.strip().rpartition("# handle ")
            patched = rule if fix in rule else rule.replace("socket transparent 1", fix, 1)
            if patched != rule:
                topo.run_in(ns, ["nft", "replace", "rule", "inet", table, chain, "handle", handle.strip(), patched])
            note = f"tproxy-synfix: kernform's tproxy state with its first interception rule changed by hand to: {patched}"
            if note not in self.notes:
                self.notes.append(note)
            return True
        self.say("   (no `socket transparent` rule found in kernform's table: no hand-patched row)")
        return False


def time_wait(ns: str) -> int:
    """TIME_WAIT sockets in `ns` now (the gateway's, after the load)."""
    out = topo.run_in(ns, ["ss", "-Htan", "state", "time-wait"], check=False).stdout
    return len([line for line in out.splitlines() if line.strip()])
