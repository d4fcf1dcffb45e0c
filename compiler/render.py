"""Human-readable text of compiled artifacts, for `kernform compile`.

The nft part is a complete `table inet ... { }` block that `nft -f` accepts;
the routing part reads like the equivalent `ip` commands.
"""

from __future__ import annotations

from collections import defaultdict

from .objects import (
    NFT_FAMILY,
    RTPROT_KERNFORM,
    BpfMapEntry,
    BpfProgram,
    DesiredState,
    IpRoute,
    IpRule,
    NftChain,
    NftCounter,
    NftElement,
    NftRule,
    NftSet,
    NftTable,
)

MAX_ELEMENTS_SHOWN = 50


def render_nft(desired: DesiredState, max_elements: int = MAX_ELEMENTS_SHOWN) -> str:
    tables = [o for o in desired.objects if isinstance(o, NftTable)]
    if not tables:
        return ""
    elements: dict[str, list[NftElement]] = defaultdict(list)
    for obj in desired.objects:
        if isinstance(obj, NftElement):
            elements[obj.set].append(obj)
    lines = [f"table {NFT_FAMILY} {tables[0].name} {{"]
    for obj in desired.objects:
        if isinstance(obj, NftCounter):
            lines.append(f"\tcounter {obj.name} {{ }}")
    for obj in desired.objects:
        if isinstance(obj, NftSet):
            word = "map" if obj.is_map else "set"
            lines.append(f"\t{word} {obj.name} {{  # {obj.origin}")
            lines += [f"\t\t{part.strip()};" for part in obj.declaration.split(";") if part.strip()]
            items = elements.get(obj.name, [])
            if items:
                shown = [e.element if e.value is None else f"{e.element} : {e.value}" for e in items[:max_elements]]
                more = f", ...  # {len(items) - max_elements} more" if len(items) > max_elements else ""
                lines.append("\t\telements = { " + ", ".join(shown) + more + " }")
            lines.append("\t}")
    rules: dict[str, list[NftRule]] = defaultdict(list)
    for obj in desired.objects:
        if isinstance(obj, NftRule):
            rules[obj.chain].append(obj)
    for obj in desired.objects:
        if isinstance(obj, NftChain):
            lines.append(f"\tchain {obj.name} {{")
            lines.append(f"\t\t{obj.declaration()}")
            for rule in sorted(rules.get(obj.name, []), key=lambda r: r.index):
                lines.append(f'\t\t{rule.text} comment "{rule.comment()}"')
            lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_routing(desired: DesiredState) -> str:
    lines = []
    for obj in desired.objects:
        if isinstance(obj, (IpRoute, IpRule)):
            lines.append(f"ip -{obj.family} {obj.describe()} proto {RTPROT_KERNFORM}   # {obj.origin}")
    return "\n".join(lines) + ("\n" if lines else "")


def render_bpf(desired: DesiredState, max_entries: int = MAX_ELEMENTS_SHOWN) -> str:
    entries: dict[tuple[str, str], list[BpfMapEntry]] = defaultdict(list)
    for obj in desired.objects:
        if isinstance(obj, BpfMapEntry):
            entries[(obj.program, obj.map)].append(obj)
    lines = []
    for obj in desired.objects:
        if not isinstance(obj, BpfProgram):
            continue
        lines.append(f"program {obj.name}   # {obj.origin}")
        lines.append(f"\tsource   bpf/{obj.source}")
        lines.append(f"\tsettings {' '.join(obj.cflags)}")
        lines.append(f"\tdigest   {obj.digest}")
        for function, point in obj.attachments:
            lines.append(f"\tattach   {function} -> {point}")
        for (program, map_name), items in sorted(entries.items()):
            if program != obj.name:
                continue
            lines.append(f"\tmap {map_name} ({len(items)} entries)")
            for entry in items[:max_entries]:
                lines.append(f"\t\t{entry.readable()}   # {entry.origin}")
            if len(items) > max_entries:
                lines.append(f"\t\t... {len(items) - max_entries} more")
    return "\n".join(lines) + ("\n" if lines else "")


def render(desired: DesiredState) -> str:
    parts = [f"# kernform compile: intent {desired.intent}, backend {desired.backend}", "", "# nftables", render_nft(desired)]
    routing = render_routing(desired)
    if routing:
        parts += ["# policy routing", routing]
    bpf = render_bpf(desired)
    if bpf:
        parts += ["# BPF programs and their maps", bpf]
    return "\n".join(parts)
