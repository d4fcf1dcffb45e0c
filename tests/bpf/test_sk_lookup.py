"""sk_lookup.c with real traffic: a connection to an intercepted destination
(routed locally, no socket listening there) lands on the proxy's listener on
another address and port, and getsockname() on the accepted socket returns
the original destination."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

pytestmark = pytest.mark.bpf

ICPT_REDIRECT, ICPT_BYPASS = 1, 2
TCP = 6


def test_sk_lookup_steers_to_proxy_and_keeps_original_destination(kf: Any, netns: Any) -> None:
    ns = netns.add("skl")
    kf.sh("ip", "-n", ns, "route", "add", "local", "10.99.0.0/24", "dev", "lo")

    bpf = kf.load_bpf("sk_lookup.c")
    fn = bpf.load_func(b"kf_sk_lookup", kf.PROG_TYPES["SK_LOOKUP"], attach_type=kf.ATTACH_TYPES["SK_LOOKUP"])
    # one rule (counter 0) as two descriptors: 0 bypasses 10.99.0.9 (its exclusion), 1 sends
    # 10.99.0.0/24 tcp 80 to proxy slot 0; allowed on lo (ifindex 1), where the test's own
    # connections arrive
    kf.fill_lpm(bpf[b"intercept_v4"], kf.rule_bitmaps({0: ["10.99.0.9/32"], 1: ["10.99.0.0/24"]}), 4)
    rules = bpf[b"intercept_rules"]
    for idx, action in ((0, ICPT_BYPASS), (1, ICPT_REDIRECT)):
        leaf = rules.Leaf()
        leaf.action, leaf.proto, leaf.port_lo, leaf.port_hi = action, TCP, 80, 80
        leaf.proxy_slot, leaf.counter = 0, 0
        rules[rules.Key(idx)] = leaf
    ifs = bpf[b"intercept_ifs"]
    allowed = ifs.Leaf()
    allowed.w[0] = 0b11
    ifs[ifs.Key(1)] = allowed

    with kf.in_netns(ns):
        proxy = socket.socket()
        client = socket.socket()
        bypassed = socket.socket()
        other_port = socket.socket()
    netns_fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    link = -1
    try:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen(8)
        kf.sockmap_set(kf.table_fd(bpf, "proxy_socks"), 0, proxy.fileno())
        link = kf.link_create(fn.fd, netns_fd, kf.ATTACH_TYPES["SK_LOOKUP"])

        client.settimeout(2)
        client.connect(("10.99.0.7", 80))
        proxy.settimeout(2)
        accepted, peer = proxy.accept()
        with accepted:
            assert accepted.getsockname() == ("10.99.0.7", 80)
            assert peer == client.getsockname()

        for sock, dst in ((bypassed, ("10.99.0.9", 80)), (other_port, ("10.99.0.7", 81))):
            sock.settimeout(2)
            with pytest.raises(ConnectionRefusedError):
                sock.connect(dst)

        counters = bpf[b"intercept_counters"]
        redirected = sum(c.redirected for c in counters[counters.Key(0)])
        bypass = sum(c.bypassed for c in counters[counters.Key(0)])
        assert redirected == 1 and bypass >= 1

        # Not allowed on lo any more: the namespace's own connections are not intercepted.
        del ifs[ifs.Key(1)]
        with kf.in_netns(ns):
            local = socket.socket()
        with local, pytest.raises(ConnectionRefusedError):
            local.settimeout(2)
            local.connect(("10.99.0.7", 80))
    finally:
        if link >= 0:
            os.close(link)  # an unpinned link detaches when its last fd closes
        os.close(netns_fd)
        for s in (proxy, client, bypassed, other_port):
            s.close()
