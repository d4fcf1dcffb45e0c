// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * kf_local.h - the network namespace's own addresses, as the programs that
 * must tell local traffic from forwarded traffic see them.
 *
 * Owns: the declaration of `local_addrs` (hash kf_addr_key -> u8), which
 * the reconciler keeps equal to the namespace's addresses (and their
 * broadcast addresses), and what "local" means besides it: loopback,
 * multicast and the limited broadcast. Used by tc_filter.c (input vs
 * forward at ingress, output vs forwarded at egress), sk_lookup.c (the
 * namespace's own connections are never inbound) and sock_connect.c (local
 * destinations are never intercepted). Lookups are written in each entry
 * file: bcc rewrites map calls only there.
 * Settings: KF_MAX_LOCAL_ADDRS.
 */
#ifndef KF_LOCAL_H
#define KF_LOCAL_H

#include "kf_maps.h"
#include "kf_types.h"

#ifndef KF_MAX_LOCAL_ADDRS
#define KF_MAX_LOCAL_ADDRS 1024
#endif

KF_MAP("hash", struct kf_addr_key, u8, local_addrs, KF_MAX_LOCAL_ADDRS);

/* Loopback (127.0.0.0/8, ::1), multicast (224.0.0.0/4, ff00::/8) or 255.255.255.255: local without a lookup. */
KF_ALWAYS_INLINE int kf_is_local_by_form(__u8 family, const __u8 *addr)
{
	if (family == 4)
		return addr[0] == 127 || (addr[0] & 0xf0) == 0xe0 ||
		       (addr[0] == 255 && addr[1] == 255 && addr[2] == 255 && addr[3] == 255);
	if (addr[0] == 0xff)
		return 1;
	for (int i = 0; i < 15; i++)
		if (addr[i])
			return 0;
	return addr[15] == 1;
}

#endif /* KF_LOCAL_H */
