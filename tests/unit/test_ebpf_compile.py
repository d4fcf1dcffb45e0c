"""The ebpf lowering: LPM bitmaps, map-only changes, and what it refuses with a reason."""

from __future__ import annotations

import pytest

from compiler import compile_intent
from compiler.cidr import Prefix
from compiler.ebpf import lpm_values
from compiler.errors import BackendUnavailable
from compiler.loader import parse_text
from compiler.objects import BpfMapEntry, BpfProgram, index_by_key
from reconciler.plan import diff

HEADER = "apiVersion: kernform/v1\nkind: NetworkIntent\nmetadata: {name: t}\nspec:\n  backend: ebpf\n"


def compiled(body: str):  # type: ignore[no-untyped-def]
    return compile_intent(parse_text(HEADER + body, "t.yaml").intent)


def test_lpm_values_carry_the_bits_of_covering_prefixes() -> None:
    n = Prefix.of
    values = lpm_values({n("10.0.0.0/8"): 0b01, n("10.1.0.0/16"): 0b10, n("0.0.0.0/0"): 0b100})
    assert values == {n("10.0.0.0/8"): 0b101, n("10.1.0.0/16"): 0b111, n("0.0.0.0/0"): 0b100}


FILTER = """  filtering:
    input:
      stateful: false
      rules:
        - name: deny-list
          action: deny
          interfaces: [eth0]
          sources: [{sources}]
"""


def test_adding_a_cidr_is_a_map_update_only() -> None:
    before = compiled(FILTER.format(sources="192.0.2.0/24"))
    after = compiled(FILTER.format(sources="192.0.2.0/24, 198.51.100.0/24"))
    plan = diff("t", "ebpf", "x", index_by_key(after.objects), index_by_key(before.objects))
    assert plan.actions and all(isinstance(a.new, BpfMapEntry) for a in plan.actions)
    assert [a.op for a in plan.actions] == ["add"]


def test_program_settings_come_from_the_compiler() -> None:
    desired = compiled(FILTER.format(sources="192.0.2.0/24"))
    (program,) = [o for o in desired.objects if isinstance(o, BpfProgram)]
    # the limits of spec.ebpf.limits, never a size of the intent
    assert program.source == "tc_filter.c" and program.cflags == ("-DKF_MAX_RULES=256", "-DKF_MAX_PREFIXES=1048576")
    assert program.attachments == (("kf_tc_ingress", "tc:eth0:ingress"),)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("  filtering:\n    input:\n      rules: [{name: a, action: deny}]\n", "name them on the rule"),
        ("  filtering:\n    input:\n      default: deny\n      rules: [{name: a, action: deny, interfaces: [e]}]\n",
         "stateless"),
        ("  interception:\n    rules:\n      - {name: a, direction: inbound, sources: [10.0.0.0/8], proxyPort: 1}\n",
         "source CIDRs need the tproxy backend"),
        ("  filtering:\n    input:\n      rules:\n        - {name: a, action: rate-limit, interfaces: [e], "
         "rateLimit: {rate: 7, per: minute}}\n", "not a whole number per second"),
    ],
)
def test_what_the_ebpf_backend_cannot_express_is_refused_with_a_reason(body: str, reason: str) -> None:
    with pytest.raises(BackendUnavailable, match=reason):
        compiled(body)


def test_lpm_entries_kept_between_compiles_equal_entries_built_afresh() -> None:
    import random

    from compiler import ebpf
    from compiler.cidr import Prefix

    rng = random.Random(5)

    def random_prefix() -> Prefix:
        length = rng.choice([0, 8, 16, 24, 24, 28, 32, 32])
        value = (10 << 24 | rng.getrandbits(10) << 8 | rng.getrandbits(8)) >> (32 - length) << (32 - length)
        return Prefix(4, value if length else 0, length)

    def fresh(bits: dict[Prefix, int]) -> list[tuple[Prefix, int]]:
        return sorted(ebpf.lpm_values(bits).items())

    bits = {random_prefix(): rng.getrandbits(4) | 1 for _ in range(1500)}
    table = ebpf._LpmTable()
    for step in range(200):
        for _ in range(rng.choice([1, 1, 3, 30])):
            roll = rng.random()
            if roll < 0.4 and bits:
                del bits[rng.choice(list(bits))]
            elif roll < 0.7 and bits:
                bits[rng.choice(list(bits))] = rng.getrandbits(4) | 1
            else:
                bits[random_prefix()] = rng.getrandbits(4) | 1
        entries = table.entries(bits, lambda network, value: (network, value))  # type: ignore[arg-type,return-value]
        assert entries == fresh(bits), step
