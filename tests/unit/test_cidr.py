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


def _random_cidr(rng: random.Random) -> str:
    if rng.random() < 0.8:
        n = rng.choice([8, 16, 23, 24, 24, 25, 30, 31, 32, 32, 32])
        # a narrow address space, so that inputs overlap, nest and merge
        value = (10 << 24 | rng.getrandbits(12) << 8 | rng.getrandbits(8)) >> (32 - n) << (32 - n)
        text = str(ipaddress.IPv4Network((value, n)))
        return text.removesuffix("/32") if n == 32 and rng.random() < 0.3 else text
    n = rng.choice([48, 64, 127, 128])
    return str(ipaddress.IPv6Network(((0xFD00 << 112 | rng.getrandbits(20) << 96) >> (128 - n) << (128 - n), n)))


def test_incremental_collapse_equals_collapse_through_a_series_of_edits() -> None:
    rng = random.Random(11)
    texts = [_random_cidr(rng) for _ in range(2000)]
    incremental = cidr.IncrementalCollapse(cidr.element_text)
    for step in range(300):
        for _ in range(rng.choice([1, 1, 2, 5, 40])):
            if texts and rng.random() < 0.5:
                texts.pop(rng.randrange(len(texts)))
            else:
                texts.insert(rng.randrange(len(texts) + 1), _random_cidr(rng))
        if step % 50 == 49:
            texts = texts[: len(texts) // 2]  # a large change: rebuilt from scratch
        assert incremental(texts) == cidr.collapse_to_elements(texts), step


def test_incremental_collapse_reuses_the_objects_of_unchanged_blocks() -> None:
    incremental = cidr.IncrementalCollapse(lambda family, value, length: [family, value, length])
    first = incremental(["10.0.0.0/24", "10.0.2.0/24"])
    second = incremental(["10.0.0.0/24", "10.0.2.0/24", "10.0.9.0/24"])
    assert second[4][0] is first[4][0] and second[4][1] is first[4][1]


def test_incremental_collapse_survives_a_bad_text() -> None:
    incremental = cidr.IncrementalCollapse(cidr.element_text)
    incremental(["10.0.0.0/24"])
    with pytest.raises(ValueError):
        incremental(["10.0.0.0/24", "10.0.0.1/24"])
    assert incremental(["10.0.1.0/24"]) == {4: ["10.0.1.0/24"]}


def test_the_bulk_ipv4_path_agrees_with_the_one_by_one_path() -> None:
    """canonical_list's fast path for unseen canonical IPv4 texts gives what ipaddress gives, and refuses
    what it refuses (its memos emptied first, so nothing is a memo hit)."""
    import ipaddress

    from compiler import cidr

    valid = ["10.0.0.0/8", "192.0.2.7", "0.0.0.0/0", "255.255.255.255", "100.64.0.0/10", "1.2.3.4/32", "fd00::/8",
             "::1", "172.16.0.0/12", "198.51.100.128/25", "10.0.0.0/08"]
    cidr._CANONICAL.clear()
    cidr._PARSED.clear()
    assert cidr.canonical_list(valid) == [ipaddress.ip_network(t, strict=True).with_prefixlen for t in valid]
    for bad in ("10.0.0.1/8", "192.0.2.128/24", "010.0.0.0/8", "256.0.0.0/8", "10.0.0.0/33"):
        cidr._CANONICAL.clear()
        cidr._PARSED.clear()
        with pytest.raises(ValueError):
            ipaddress.ip_network(bad, strict=True)
        with pytest.raises(ValueError):
            cidr.canonical_list([bad])


def test_a_list_partly_seen_before_is_canonicalised_like_a_fresh_one() -> None:
    """canonical_list looks only at the texts its memo lacks (an edit's one new CIDR): a list of seen,
    unseen, duplicated and non-canonical texts comes out as canonical() of each, in order, and a bad
    unseen text is refused even among seen ones."""
    import ipaddress

    from compiler import cidr

    seen = [f"10.{i}.0.0/16" for i in range(50)]
    cidr.canonical_list(seen)
    mixed = [*seen[:10], "192.0.2.7", "fd00::1", seen[3], "10.200.0.0/16", "192.0.2.7", "2001:db8::/32", *seen[10:]]
    assert cidr.canonical_list(mixed) == [ipaddress.ip_network(t, strict=True).with_prefixlen for t in mixed]
    with pytest.raises(ValueError):
        cidr.canonical_list([*seen, "10.0.0.1/8"])
