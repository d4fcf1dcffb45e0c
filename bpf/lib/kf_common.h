// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * kf_common.h - settings, constants and small helpers shared by every
 * kernform BPF entry file.
 *
 * Owns: the default values of every -D setting (each can be overridden by
 * the compiler through cflags, never by editing C), the action / flag
 * constants that the Python compiler writes into maps, byte-order and
 * hashing helpers, and the helper prototypes that bcc declares wrongly.
 *
 * Conventions used by every map in kernform (the compiler relies on them):
 *   - addresses are raw bytes in network order (u8 addr[4] / addr[16]),
 *     i.e. exactly ipaddress.ip_address(...).packed in Python;
 *   - ports and every other integer are in host byte order;
 *   - every struct has explicit padding so that its layout is the same for
 *     C and for the ctypes types that bcc generates from it.
 */
#ifndef KF_COMMON_H
#define KF_COMMON_H

/* ---- settings (override with -DNAME=value) ---------------------------- */

/*
 * Number of rule descriptors per program (bits in a rule bitmap). The
 * verifier walks the rule loop once per bitmap word: 64 costs ~16k
 * verified instructions, 256 ~200k (tc_filter), 512 comes near the 1M
 * limit, so 256 is the supported maximum.
 */
#ifndef KF_MAX_RULES
#define KF_MAX_RULES 64
#endif
#if KF_MAX_RULES < 1 || KF_MAX_RULES > 256
#error "KF_MAX_RULES must be in 1..256"
#endif
#define KF_BITMAP_WORDS ((KF_MAX_RULES + 63) / 64)

/* Number of prefixes per LPM trie (src_v4, dst_v4, ... intercept_*). */
#ifndef KF_MAX_PREFIXES
#define KF_MAX_PREFIXES 16384
#endif

/* ---- protocol numbers and socket option names ------------------------- */

#define KF_ETH_P_IP 0x0800
#define KF_ETH_P_IPV6 0x86DD
#define KF_AF_INET 2
#define KF_AF_INET6 10
#define KF_IPPROTO_HOPOPTS 0
#define KF_IPPROTO_ICMP 1
#define KF_IPPROTO_TCP 6
#define KF_TCP_ACK 0x10 /* TCP flags byte */
#define KF_IPPROTO_UDP 17
#define KF_IPPROTO_ROUTING 43
#define KF_IPPROTO_FRAGMENT 44
#define KF_IPPROTO_AH 51
#define KF_IPPROTO_DSTOPTS 60
#define KF_IPPROTO_SCTP 132
#define KF_IPPROTO_UDPLITE 136

#define KF_SOL_IP 0
#define KF_SOL_IPV6 41
#define KF_SO_ORIGINAL_DST 80 /* also IP6T_SO_ORIGINAL_DST at SOL_IPV6 */

/* ---- helpers ---------------------------------------------------------- */

/*
 * bcc 0.26 declares bpf_get_socket_cookie() as returning u32, which
 * silently truncates the 64-bit cookie; declare it correctly here.
 */
static __u64 (*kf_get_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

#define KF_ALWAYS_INLINE static inline __attribute__((always_inline))
/* Keeps the compiler from merging or moving memory accesses across it (ctx reads). */
#define KF_BARRIER() asm volatile("" ::: "memory")

/*
 * Index of the lowest set bit of a non-zero word, without branches:
 * popcount((x & -x) - 1) by SWAR arithmetic. BPF has no ctz instruction,
 * clang may lower __builtin_ctzll to a table in .rodata (which bcc cannot
 * load), and a branchy binary search multiplies verifier states by 64 in
 * every loop over a rule bitmap.
 */
KF_ALWAYS_INLINE __u32 kf_ctz64(__u64 x)
{
	__u64 v = (x & -x) - 1;

	v = v - ((v >> 1) & 0x5555555555555555ULL);
	v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
	v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
	return (__u32)((v * 0x0101010101010101ULL) >> 56);
}

/* murmur3 fmix64: spreads an identity over a Maglev table. */
KF_ALWAYS_INLINE __u64 kf_mix64(__u64 x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return x;
}

KF_ALWAYS_INLINE __u16 kf_bswap16(__u16 x)
{
	return (__u16)((x << 8) | (x >> 8));
}

/* Ports in ctx structs and packets are big endian; maps hold host order. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define kf_ntohs(x) kf_bswap16((__u16)(x))
#define kf_htons(x) kf_bswap16((__u16)(x))
#else
#define kf_ntohs(x) ((__u16)(x))
#define kf_htons(x) ((__u16)(x))
#endif

#endif /* KF_COMMON_H */
