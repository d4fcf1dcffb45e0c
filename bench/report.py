"""The targets of issues #5 and #13, checked against one run's figures, and the ratios computed within that run."""

from __future__ import annotations

from typing import Any


def _row(rows: list[dict[str, Any]], scenario: str, metric: str, variant: str, n: int) -> dict[str, Any] | None:
    for r in rows:
        if (r["scenario"], r["metric"], r["variant"], r["n"]) == (scenario, metric, variant, n):
            return r
    return None


def _rate(rows: list[dict[str, Any]], scenario: str, metric: str, variant: str, n: int) -> float | None:
    r = _row(rows, scenario, metric, variant, n)
    return r["rate"]["median"] if r else None


def _target(name: str, value: float | None, threshold: float, op: str, unit: str, note: str = "") -> dict[str, Any]:
    met = None if value is None else (value >= threshold if op == ">=" else value < threshold if op == "<"
                                      else value <= threshold)
    return {"target": name, "value": value, "threshold": threshold, "op": op, "unit": unit, "met": met, "note": note}


def ratios(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Ratios inside one run: each row against its variant's smallest N and against the no-rules reference."""
    rows = data.get("dataplane", {}).get("rows", [])
    out = []
    for r in rows:
        ns = sorted(x["n"] for x in rows if (x["scenario"], x["metric"], x["variant"]) ==
                    (r["scenario"], r["metric"], r["variant"]))
        first = _rate(rows, r["scenario"], r["metric"], r["variant"], ns[0])
        ref_variant = "none-local" if r["variant"] in ("tproxy-local", "ebpf-local") and r["scenario"] == "lb" else "none"
        ref_ns = sorted(x["n"] for x in rows if (x["scenario"], x["metric"], x["variant"]) ==
                        (r["scenario"], r["metric"], ref_variant))
        # The reference measured in the same step when there is one (it shares the machine's state), else its first.
        ref_n = r["n"] if r["n"] in ref_ns else (ref_ns[0] if ref_ns else None)
        ref = _rate(rows, r["scenario"], r["metric"], ref_variant, ref_n) if ref_n is not None else None
        out.append({"scenario": r["scenario"], "metric": r["metric"], "variant": r["variant"], "n": r["n"],
                    "vs_own_smallest_n": r["rate"]["median"] / first if first else None,
                    "vs_reference": r["rate"]["median"] / ref if ref else None, "reference": ref_variant})
    return out


SERVICE_METRICS = {"conn_rate": "the last VIP", "conn_rate_random": "a random VIP"}
SERVICE_VARIANTS = ("none", "iptables", "tproxy", "ebpf")


def services_summary(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per metric and variant of the services scenario: rate(largest S) / rate(S=1), raw and corrected for the
    drift of the no-rules reference measured beside each step."""
    rows = [r for r in data.get("dataplane", {}).get("rows", []) if r["scenario"] == "services"]
    sns = sorted({r["n"] for r in rows})
    if len(sns) < 2:
        return []
    lo, hi = sns[0], sns[-1]
    out = []
    for metric in SERVICE_METRICS:
        ref_lo, ref_hi = _rate(rows, "services", metric, "none", lo), _rate(rows, "services", metric, "none", hi)
        drift = ref_hi / ref_lo if ref_lo and ref_hi else None
        for variant in SERVICE_VARIANTS:
            a, b = _rate(rows, "services", metric, variant, hi), _rate(rows, "services", metric, variant, lo)
            if a is None and b is None:
                continue
            raw = a / b if a and b else None
            out.append({"metric": metric, "variant": variant, "lo": lo, "hi": hi, "rate_lo": b, "rate_hi": a,
                        "ratio": raw, "drift": drift,
                        "corrected": raw / drift if raw is not None and drift and variant != "none" else None})
    return out


def _services_failure(data: dict[str, Any], variant: str, n: int) -> str | None:
    """Why the services scenario has no row for `variant` at S=n: its apply failed, or its VIP did not answer."""
    dp = data.get("dataplane", {})
    for a in dp.get("applies", []):
        if (a["scenario"], a["variant"], a["n"]) == ("services", variant, n) and a.get("error"):
            return f"apply failed: {a['error']}"
    for c in dp.get("checks", []):
        if (c["scenario"], c["variant"], c["n"]) == ("services", variant, n) and not c["ok"]:
            return f"{c['url']} answered {c['reply']!r}"
    return None


def _services_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    summary = services_summary(data)
    if summary:
        lo, hi = summary[0]["lo"], summary[0]["hi"]
        for metric, what in SERVICE_METRICS.items():
            for backend in ("tproxy", "ebpf"):
                name = (f"services: {backend} dispatch at {hi:,} services >= 0.9 of the {lo}-service rate "
                        f"(new connections to {what})")
                item = next((x for x in summary if (x["metric"], x["variant"]) == (metric, backend)), None)
                failure = _services_failure(data, backend, hi)
                if item is None or item["ratio"] is None:
                    t = _target(name, None, 0.9, ">=", "ratio", failure or "")
                    if failure or (item is not None and item["rate_lo"] is not None):
                        t["met"] = False  # measured at S=1 but not at the largest S: the target is missed
                    out.append(t)
                    continue
                value, note = item["ratio"], ""
                if item["corrected"] is not None:
                    value = item["corrected"]
                    note = (f"corrected for drift: raw ratio {item['ratio']:.2f}, while the no-rules reference "
                            f"measured beside each step moved {item['drift']:.2f}x")
                out.append(_target(name, value, 0.9, ">=", "ratio", note))
    rows = data.get("controlplane", {}).get("services", [])
    for backend in ("tproxy", "ebpf"):
        mine = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["services"])
        if not mine:
            continue
        r = mine[-1]
        s = f"{r['services']:,} services x {r['backends_per_service']} backends"
        checks = [("first_apply_s", "first apply (apply step) <= 3 s", 3.0),
                  ("add_service.apply_s", "add one service (apply step) <= 50 ms", 0.05),
                  ("remove_service.apply_s", "remove one service (apply step) <= 50 ms", 0.05)]
        for key, what, threshold in checks:
            name = f"control plane {backend}, {s}: {what}"
            if not r["reps"] or r.get("error"):
                # A failure at this S misses the target even when some repetitions completed.
                value = _path(r, key) if r["reps"] else None
                t = _target(name, value, threshold, "<=", "s", f"failed: {r['error']}" if r.get("error") else "")
                t["met"] = False
                out.append(t)
                continue
            out.append(_target(name, _path(r, key), threshold, "<=", "s"))
    return out


def _path(row: dict[str, Any], key: str) -> float:
    v: Any = row
    for part in key.split("."):
        v = v[part]
    return float(v["median"])


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    rows = data.get("dataplane", {}).get("rows", [])
    if rows:
        fns = sorted({r["n"] for r in rows if r["scenario"] == "filter"})
        if len(fns) > 1:
            lo, hi = fns[0], fns[-1]
            ref_hi, ref_lo = _rate(rows, "filter", "conn_rate", "none", hi), _rate(rows, "filter", "conn_rate", "none", lo)
            drift = ref_hi / ref_lo if ref_hi and ref_lo else None
            for backend in ("tproxy", "ebpf"):
                a, b = _rate(rows, "filter", "conn_rate", backend, hi), _rate(rows, "filter", "conn_rate", backend, lo)
                raw = a / b if a and b else None
                value: float | None
                if raw is not None and drift is not None:
                    value, note = raw / drift, (f"corrected for drift: raw ratio {raw:.2f}, while the no-rules "
                                                f"reference measured beside each step moved {drift:.2f}x")
                else:
                    value, note = raw, ""
                out.append(_target(f"filter: {backend} at N={hi:,} CIDRs keeps >= 90% of its N={lo} connection rate",
                                   value, 0.9, ">=", "ratio", note))
        bns = sorted({r["n"] for r in rows if r["scenario"] == "lb"})
        if len(bns) > 1:
            lo, hi = bns[0], bns[-1]
            for variant in ("tproxy", "tproxy-local", "ebpf", "ebpf-local"):
                a, b = _rate(rows, "lb", "conn_rate", variant, hi), _rate(rows, "lb", "conn_rate", variant, lo)
                out.append(_target(f"load balancing: {variant} with {hi:,} backends keeps >= 90% of its rate with "
                                   f"{lo} backend{'s' if lo > 1 else ''}", a / b if a and b else None, 0.9, ">=",
                                   "ratio", "the smallest service (B=1) stands for N=0: a service needs a backend"))
        for n in sorted({r["n"] for r in rows if r["scenario"] == "interception"}):
            a = _rate(rows, "interception", "conn_rate", "ebpf", n)
            b = _rate(rows, "interception", "conn_rate", "tproxy", n)
            out.append(_target(f"interception: ebpf/tproxy connection-rate ratio, N={n:,} extra destinations "
                               "(client ports reused under TIME_WAIT)", a / b if a and b else None, 1.0, ">=",
                               "ratio", "no threshold was set; >= 1 means sk_lookup keeps up with nft TPROXY"))
    cp = data.get("controlplane", {}).get("rows", [])
    if cp:
        ns = sorted({r["n"] for r in cp})
        hi = ns[-1]
        base = 100 if 100 in ns else ns[0]
        for r in (x for x in cp if x["n"] == hi):
            be = r["backend"]
            out.append(_target(f"control plane {be}, N={hi:,}: compile < 1 s", r["compile_s"]["median"], 1.0, "<", "s"))
            out.append(_target(f"control plane {be}, N={hi:,}: no-op plan < 0.5 s", r["noop_plan_s"]["median"], 0.5,
                               "<", "s"))
            small = next((x for x in cp if x["n"] == base and x["backend"] == be), None)
            for change, label in (("change_cidr", "add a CIDR"), ("change_weight", "change a backend weight")):
                for kind, what in (("apply_s", "apply step: observe, diff, apply, verify"),
                                   ("pass_s", "whole pass: parse + compile + apply step")):
                    value = r[change][kind]["median"]
                    out.append(_target(f"control plane {be}, N={hi:,}, {label}, {what}: < 50 ms", value, 0.05, "<",
                                       "s"))
                    if small is not None and hi != base:
                        ref = small[change][kind]["median"]
                        out.append(_target(f"control plane {be}, N={hi:,}, {label}, {what}: <= 2x its N={base} time",
                                           value / ref if ref else None, 2.0, "<=", "ratio"))
    out += _services_targets(data)
    return out


def render_services(data: dict[str, Any]) -> str:
    """The services scenario's ratios rate(largest S) / rate(S=1) per variant, as console lines."""
    summary = services_summary(data)
    if not summary:
        return ""
    lines = [f"Services: new connections/s at S={summary[0]['hi']:,} against S={summary[0]['lo']:,} "
             "(median of the repetitions):"]
    def k(v: float | None) -> str:
        return f"{v / 1000:.1f}k" if v else "-"

    for x in summary:
        ratio = f"{x['ratio']:.2f}" if x["ratio"] is not None else "n/a"
        corrected = f" (drift-corrected {x['corrected']:.2f})" if x["corrected"] is not None else ""
        lines.append(f"  {SERVICE_METRICS[x['metric']]:<13} {x['variant']:<9} {k(x['rate_lo']):>6} -> "
                     f"{k(x['rate_hi']):>6}  ratio {ratio}{corrected}")
    return "\n".join(lines)


def render_targets(items: list[dict[str, Any]]) -> str:
    lines = []
    for t in items:
        mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[t["met"]]
        if t["value"] is None:
            value = "not measured"
        elif t["unit"] == "s":
            value = f"{t['value'] * 1000:.1f} ms" if t["value"] < 1 else f"{t['value']:.2f} s"
        else:
            value = f"{t['value']:.2f}"
        lines.append(f"  [{mark}] {t['target']}: {value}" + (f"  ({t['note']})" if t["note"] else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- markdown (for the README)
def _k(x: float) -> str:
    return f"{x / 1000:.1f}k"


def markdown(data: dict[str, Any]) -> str:
    """The run's figures as Markdown tables: `python -m bench.report bench/results/<date>.json`."""
    out: list[str] = []
    rows = data.get("dataplane", {}).get("rows", [])

    def table(title: str, scenario: str, metric: str, variants: list[str], ns_label: str,
              ratio: bool = False) -> None:
        ns = sorted({r["n"] for r in rows if r["scenario"] == scenario and r["metric"] == metric})
        if not ns:
            return
        out.append(title + "\n")
        ratio = ratio and len(ns) > 1
        out.append(f"| {ns_label} | " + " | ".join(f"{n:,}" for n in ns) + " |"
                   + (f" {ns[-1]:,} / {ns[0]:,} |" if ratio else ""))
        out.append("|---|" + "---:|" * (len(ns) + ratio))
        for v in variants:
            cells = []
            for n in ns:
                r = _row(rows, scenario, metric, v, n)
                if r is None:
                    cells.append("")
                    continue
                rate = r["rate"]
                cells.append(f"{_k(rate['median'])} ({rate['min'] / 1000:.1f}–{rate['max'] / 1000:.1f})")
            if ratio and any(cells):
                hi, lo = _rate(rows, scenario, metric, v, ns[-1]), _rate(rows, scenario, metric, v, ns[0])
                cells.append(f"{hi / lo:.2f}" if hi and lo else "")
            if any(cells):
                out.append(f"| {v} | " + " | ".join(cells) + " |")
        out.append("")

    if rows:
        table("New connections/s (a request each), forwarded through the gateway; median (min–max):",
              "filter", "conn_rate", ["none", "iptables", "tproxy", "ebpf"], "filter CIDRs")
        table("Requests/s on established (keep-alive) connections:",
              "filter", "keepalive_rps", ["none", "iptables", "tproxy", "ebpf"], "filter CIDRs")
        table("Load balancing, new connections/s through the VIP:", "lb", "conn_rate",
              ["none", "iptables", "tproxy", "ebpf", "none-local", "tproxy-local", "ebpf-local"], "backends")
        table("Interception into haproxy, new connections/s (client ports reused under the gateway's TIME_WAIT):",
              "interception", "conn_rate", ["none", "iptables", "tproxy", "ebpf", "tproxy-synfix"],
              "extra destinations")
        for metric, what in SERVICE_METRICS.items():
            table(f"Services (VIP:80, 10 backends each), new connections/s to {what} (iptables: kube-proxy's "
                  "iptables mode; none: straight to a backend):", "services", metric, list(SERVICE_VARIANTS),
                  "services", ratio=True)
        stalled = [f"{r['variant']} at {r['n']:,} ({SERVICE_METRICS.get(r['metric'], r['metric'])}): "
                   f"{r['syn_retrans']:,} / {r['retrans_segs']:,}"
                   for r in rows if r["scenario"] == "services" and r.get("retrans_segs")]
        if stalled:
            out += ["Retransmits of the client over all repetitions, SYNs / all segments (a connection that "
                    "waited ~1 s or more): " + "; ".join(stalled), ""]
        failed = [(a["variant"], a["n"], a["error"]) for a in data.get("dataplane", {}).get("applies", [])
                  if a["scenario"] == "services" and a.get("error")]
        if failed:
            out += [f"- {v} at {n:,} services: apply failed: {e}" for v, n, e in failed] + [""]
        out.append("Latency of a new connection (connect() to the whole response, 32 in flight), p50 / p99 in ms, "
                   "at each scenario's largest N:\n")
        variants = [v for v in ("none", "none-local", "iptables", "tproxy", "tproxy-local", "ebpf", "ebpf-local",
                                "tproxy-synfix")
                    if any(r["variant"] == v and r["metric"] == "conn_rate" for r in rows)]
        out.append("| scenario (N) | " + " | ".join(variants) + " |")
        out.append("|---|" + "---:|" * len(variants))
        for scenario in ("filter", "lb", "interception", "services"):
            ns = sorted({r["n"] for r in rows if r["scenario"] == scenario})
            if not ns:
                continue
            cells = []
            for v in variants:
                vns = [n for n in ns if _row(rows, scenario, "conn_rate", v, n)]
                # A no-rules reference measured once (it does not depend on N) stands for every N; a variant
                # missing at the largest N (its apply failed there) shows nothing.
                once = v.startswith("none") and len(vns) == 1
                r = _row(rows, scenario, "conn_rate", v, ns[-1] if ns[-1] in vns else (vns[0] if once else -1))
                cells.append(f"{r['latency_us']['p50'] / 1000:.1f} / {r['latency_us']['p99'] / 1000:.1f}" if r else "")
            out.append(f"| {scenario} ({ns[-1]:,}) | " + " | ".join(cells) + " |")
        out.append("")
    cp = data.get("controlplane", {}).get("rows", [])
    if cp:
        out.append("Control plane (median of the repetitions; ops = kernel operations of the apply):\n")
        out.append("| backend | N | objects | compile | first apply | no-op plan | +1 CIDR: apply step / whole pass "
                   "(ops) | weight: apply step / whole pass (ops) | `kernform apply` wall, peak RSS | watch: save → "
                   "applied, median / p95 | watch peak RSS |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

        def ms(x: float) -> str:
            return f"{x * 1000:.0f} ms" if x >= 0.0095 else f"{x * 1000:.1f} ms"

        for r in sorted(cp, key=lambda r: (r["backend"] != "tproxy", r["n"])):
            cc, cw, w = r["change_cidr"], r["change_weight"], r.get("watch") or {}
            watch = f"{ms(w['median_s'])} / {ms(w['p95_s'])}" if w.get("median_s") is not None else ""
            wrss = f"{w['peak_rss_mb']:.0f} MB" if w.get("peak_rss_mb") else ""
            out.append(
                f"| {r['backend']} | {r['n']:,} | {r['objects']:,} | {ms(r['compile_s']['median'])} | "
                f"{ms(r['first_apply_s']['median'])} ({r['first_apply_ops']:,} ops) | {ms(r['noop_plan_s']['median'])}"
                f" | {ms(cc['apply_s']['median'])} / {ms(cc['pass_s']['median'])} ({cc['operations']}) | "
                f"{ms(cw['apply_s']['median'])} / {ms(cw['pass_s']['median'])} ({cw['operations']}) | "
                f"{ms(r['cli_apply']['wall_s']['median'])}, {r['cli_apply']['peak_rss_mb']:.0f} MB | {watch} | {wrss} |")
        out.append("")
    svc = data.get("controlplane", {}).get("services", [])
    if svc:
        out.append("Control plane, services of 10 backends each (median of the repetitions; apply step = observe, "
                   "diff, apply, verify with the desired state given; whole pass = parse + compile + apply step; "
                   "ops = kernel operations):\n")
        out.append("| backend | services | reps | objects | compile | first apply (ops) | no-op plan | +1 service: "
                   "apply step / whole pass (ops) | −1 service: apply step / whole pass (ops) |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")

        def ms2(x: float) -> str:
            return f"{x:.2f} s" if x >= 1 else f"{x * 1000:.0f} ms" if x >= 0.0095 else f"{x * 1000:.1f} ms"

        for r in sorted(svc, key=lambda r: (r["backend"] != "tproxy", r["services"])):
            if r["reps"]:
                a, m = r["add_service"], r["remove_service"]
                out.append(
                    f"| {r['backend']} | {r['services']:,} | {r['reps']} | {r['objects']:,} | "
                    f"{ms2(r['compile_s']['median'])} | "
                    f"{ms2(r['first_apply_s']['median'])} ({r['first_apply_ops']:,}) | "
                    f"{ms2(r['noop_plan_s']['median'])} | {ms2(a['apply_s']['median'])} / "
                    f"{ms2(a['pass_s']['median'])} ({a['operations']:,}) | {ms2(m['apply_s']['median'])} / "
                    f"{ms2(m['pass_s']['median'])} ({m['operations']:,}) |")
            if r.get("error"):
                error = r["error"].replace("|", "\\|")
                after = f" (after {r['reps']} repetitions)" if r["reps"] else ""
                out.append(f"| {r['backend']} | {r['services']:,} | {r['reps']} | failed{after}: {error} | | | | | |")
        out.append("")
        notes = [f"- {r['backend']} at {r['services']:,} services: {r['note']}" for r in svc if r.get("note")]
        if notes:
            out += [*notes, ""]
    if data.get("targets"):
        out.append("Targets:\n")
        out.append("| target | value | |")
        out.append("|---|---:|---|")
        for t in data["targets"]:
            if t["value"] is None:
                value = "not measured"
            elif t["unit"] == "s":
                value = f"{t['value'] * 1000:.0f} ms" if t["value"] < 1 else f"{t['value']:.2f} s"
            else:
                value = f"{t['value']:.2f}"
            mark = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
            out.append(f"| {t['target']} | {value} | {mark} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    import json
    import sys

    with open(sys.argv[1]) as f:
        print(markdown(json.load(f)))
