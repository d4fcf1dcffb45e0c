"""compiler.cidr agrees with the ipaddress module, only faster."""

from __future__ import annotations

import ipaddress
import random

import pytest

from compiler import cidr


def reference(texts: list[str]) -> dict[int, list[str]]:
    result = {}
    for family in (4, 6):
        nets = [ipaddress.ip_network(t) for t in texts if ipaddress.ip_network(t).version == family]
        if nets:
            result[family] = [str(n.network_address) if n.prefixlen == n.max_prefixlen else n.with_prefixlen
                              for n in ipaddress.collapse_addresses(nets)]  # type: ignore[type-var]
    return result


def test_collapse_matches_ipaddress_on_random_prefixes() -> None:
    rng = random.Random(7)
    texts = []
    for _ in range(3000):
        n = rng.randint(0, 32)
        texts.append(str(ipaddress.IPv4Network((rng.getrandbits(32) >> (32 - n) << (32 - n) if n else 0, n))))
    for _ in range(500):
        n = rng.randint(1, 128)
        texts.append(str(ipaddress.IPv6Network((rng.getrandbits(128) >> (128 - n) << (128 - n), n))))
    texts += ["10.0.0.0/25", "10.0.0.128/25", "10.0.1.0/24", "192.0.2.7"]
    assert cidr.collapse_to_elements(texts) == reference(texts)


@pytest.mark.parametrize("text", ["10.0.0.1", "10.0.0.0/8", "0.0.0.0/0", "fd00::/8", "::1", "2001:db8::/32"])
def test_canonical_matches_ipaddress(text: str) -> None:
    assert cidr.canonical(text) == ipaddress.ip_network(text).with_prefixlen


@pytest.mark.parametrize("text", ["10.0.0.1/8", "10.0.0.0/33", "010.0.0.0/8", "1.2.3", "x", "fd00::1/8"])
def test_invalid_is_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        cidr.canonical(text)
