"""matplotlib figures of one run: connection rates against N, control-plane times against N."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {"none": "#7f7f7f", "none-local": "#bcbcbc", "iptables": "#d62728", "tproxy": "#1f77b4",
           "tproxy-local": "#17becf", "ebpf": "#2ca02c", "ebpf-local": "#98df8a", "tproxy-synfix": "#9467bd"}
# Small horizontal offsets, so that variants with equal figures stay visible side by side.
DODGE = {"iptables": -0.09, "tproxy": -0.03, "tproxy-local": 0.03, "ebpf": 0.03, "ebpf-local": 0.09,
         "tproxy-synfix": 0.09}
MARKERS = {"iptables": "v", "tproxy": "o", "tproxy-local": "D", "ebpf": "s", "ebpf-local": "P", "tproxy-synfix": "^"}
LABELS = {"none": "no rules", "none-local": "no rules (from gateway ns)", "iptables": "iptables, linear",
          "tproxy": "kernform tproxy", "tproxy-local": "kernform tproxy (from gateway ns)",
          "ebpf": "kernform ebpf", "ebpf-local": "kernform ebpf (from gateway ns, in its cgroup)",
          "tproxy-synfix": "tproxy, SYN excluded from socket rule by hand"}


def _series(rows: list[dict[str, Any]], scenario: str, metric: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["scenario"] == scenario and r["metric"] == metric:
            out.setdefault(r["variant"], []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r["n"])
    return out


def _rate_panel(ax: Any, rows: list[dict[str, Any]], scenario: str, metric: str, title: str, xlabel: str) -> None:
    series = _series(rows, scenario, metric)
    ns = sorted({r["n"] for s in series.values() for r in s})
    if not ns:
        ax.set_visible(False)
        return
    pos = {n: i for i, n in enumerate(ns)}
    for variant, pts in series.items():
        colour = COLOURS.get(variant, "black")
        label = LABELS.get(variant, variant)
        if len(pts) == 1 and variant.startswith("none"):
            # A reference measured once (it does not depend on N): a band over the whole axis.
            r = pts[0]["rate"]
            ax.axhline(r["median"], color=colour, linestyle="--", linewidth=1.2, label=label)
            ax.axhspan(r["min"], r["max"], color=colour, alpha=0.12)
            continue
        xs = [pos[p["n"]] + DODGE.get(variant, 0.0) for p in pts]
        med = [p["rate"]["median"] for p in pts]
        lo = [p["rate"]["median"] - p["rate"]["min"] for p in pts]
        hi = [p["rate"]["max"] - p["rate"]["median"] for p in pts]
        ax.errorbar(xs, med, yerr=[lo, hi], color=colour, marker=MARKERS.get(variant, "o"), markersize=5, capsize=3,
                    label=label, alpha=0.9)
    ax.set_xlim(-0.5, len(ns) - 0.5)
    ax.set_xticks(range(len(ns)))
    ax.set_xticklabels([f"{n:,}" for n in ns])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("requests/s" if metric == "keepalive_rps" else "new connections/s")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def dataplane(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["dataplane"]["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    _rate_panel(axes[0][0], rows, "filter", "conn_rate", "Filtering: new connections/s (a request each)",
                "N non-matching CIDRs in a deny rule")
    _rate_panel(axes[0][1], rows, "filter", "keepalive_rps", "Filtering: requests/s on established connections",
                "N non-matching CIDRs in a deny rule")
    _rate_panel(axes[1][0], rows, "lb", "conn_rate", "Load balancing: new connections/s through a VIP",
                "backends behind the VIP")
    _rate_panel(axes[1][1], rows, "interception", "conn_rate",
                "Interception into haproxy: new connections/s\n(client ports reused while the gateway holds TIME_WAIT)",
                "extra intercepted destination CIDRs")
    meta = data["meta"]
    fig.suptitle(f"kernform data path, {meta['date']} ({meta['host']['cpus']} CPUs, kernel {meta['host']['kernel']}): "
                 f"median of {meta['settings']['reps']} interleaved runs, bars = min..max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80, pil_kwargs={"optimize": True})
    plt.close(fig)


def services(data: dict[str, Any], path: Path) -> None:
    """The services scenario (issue #13): new connections/s against the number of services, two panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["dataplane"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    _rate_panel(axes[0], rows, "services", "conn_rate", "Services: new connections/s to the last VIP",
                "services (VIP:80, 10 backends each)")
    _rate_panel(axes[1], rows, "services", "conn_rate_random", "Services: new connections/s, a random VIP each",
                "services (VIP:80, 10 backends each)")
    meta = data["meta"]
    fig.suptitle(f"kernform service dispatch, {meta['date']} ({meta['host']['cpus']} CPUs, kernel "
                 f"{meta['host']['kernel']}): median of {meta['settings']['reps']} interleaved runs, bars = min..max; "
                 "iptables = kube-proxy's iptables mode", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80, pil_kwargs={"optimize": True})
    plt.close(fig)


def controlplane(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["controlplane"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    panels = [
        (axes[0], [("compile_s", "compile", "-"), ("first_apply_s", "first apply", "-."),
                   ("noop_plan_s", "no-op plan", ":"), ("cli_apply", "`kernform apply` (+1 CIDR), wall", "--")],
         "Whole-intent operations"),
        (axes[1], [("change_cidr.apply_s", "+1 CIDR: apply step", "-"), ("change_cidr.pass_s", "+1 CIDR: whole pass", ":"),
                   ("change_weight.apply_s", "weight: apply step", "-."), ("watch", "watch: save -> applied", "--")],
         "One-element change in a running reconciler"),
    ]
    markers = {"tproxy": "o", "ebpf": "s"}
    colours = {"tproxy": COLOURS["tproxy"], "ebpf": COLOURS["ebpf"]}
    for ax, metrics, title in panels:
        for backend in ("tproxy", "ebpf"):
            pts = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["n"])
            if not pts:
                continue
            for key, label, style in metrics:
                ys = []
                for r in pts:
                    if key == "cli_apply":
                        ys.append(r["cli_apply"]["wall_s"]["median"])
                    elif key == "watch":
                        ys.append((r.get("watch") or {}).get("median_s") or float("nan"))
                    elif "." in key:
                        a, b = key.split(".")
                        ys.append(r[a][b]["median"])
                    else:
                        ys.append(r[key]["median"])
                ax.plot([r["n"] for r in pts], [y * 1000 for y in ys], linestyle=style, marker=markers[backend],
                        markersize=4, color=colours[backend], label=f"{backend}: {label}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("intent size N (CIDRs; service of min(N, 1000) backends)")
        ax.set_ylabel("milliseconds (median)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[1].axhline(50, color="black", linewidth=0.8)
    axes[1].text(axes[1].get_xlim()[0], 52, " 50 ms target", fontsize=7, va="bottom")
    fig.suptitle(f"kernform control plane, {data['meta']['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80, pil_kwargs={"optimize": True})
    plt.close(fig)
