"""The targets of issue #5, checked against one run's figures, and the ratios computed within that run."""

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
    return out


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

    def table(scenario: str, metric: str, variants: list[str], ns_label: str) -> None:
        ns = sorted({r["n"] for r in rows if r["scenario"] == scenario and r["metric"] == metric})
        if not ns:
            return
        out.append(f"| {ns_label} | " + " | ".join(f"{n:,}" for n in ns) + " |")
        out.append("|---|" + "---:|" * len(ns))
        for v in variants:
            cells = []
            for n in ns:
                r = _row(rows, scenario, metric, v, n)
                if r is None:
                    cells.append("")
                    continue
                rate = r["rate"]
                cells.append(f"{_k(rate['median'])} ({rate['min'] / 1000:.1f}–{rate['max'] / 1000:.1f})")
            if any(cells):
                out.append(f"| {v} | " + " | ".join(cells) + " |")
        out.append("")

    if rows:
        out.append("New connections/s (a request each), forwarded through the gateway; median (min–max):\n")
        table("filter", "conn_rate", ["none", "iptables", "tproxy", "ebpf"], "filter CIDRs")
        out.append("Requests/s on established (keep-alive) connections:\n")
        table("filter", "keepalive_rps", ["none", "iptables", "tproxy", "ebpf"], "filter CIDRs")
        out.append("Load balancing, new connections/s through the VIP:\n")
        table("lb", "conn_rate", ["none", "iptables", "tproxy", "ebpf", "none-local", "tproxy-local", "ebpf-local"],
              "backends")
        out.append("Interception into haproxy, new connections/s (client ports reused under the gateway's "
                   "TIME_WAIT):\n")
        table("interception", "conn_rate", ["none", "iptables", "tproxy", "ebpf", "tproxy-synfix"],
              "extra destinations")
        out.append("Latency of a new connection (connect() to the whole response, 32 in flight), p50 / p99 in ms, "
                   "at each scenario's largest N:\n")
        variants = [v for v in ("none", "none-local", "iptables", "tproxy", "tproxy-local", "ebpf", "ebpf-local",
                                "tproxy-synfix")
                    if any(r["variant"] == v and r["metric"] == "conn_rate" for r in rows)]
        out.append("| scenario (N) | " + " | ".join(variants) + " |")
        out.append("|---|" + "---:|" * len(variants))
        for scenario in ("filter", "lb", "interception"):
            ns = sorted({r["n"] for r in rows if r["scenario"] == scenario})
            if not ns:
                continue
            cells = []
            for v in variants:
                vns = [n for n in ns if _row(rows, scenario, "conn_rate", v, n)]
                r = _row(rows, scenario, "conn_rate", v, ns[-1] if ns[-1] in vns else (vns[0] if vns else -1))
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
