// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The load-balancing tables that sock_connect.c (connect-time balancing) and
 * tc_lb.c (forwarded traffic at tc) both hold, declared once so that the
 * compiler's single layout (compiler/bpf_layout.py) fits both objects.
 * Also their counters, which both programs keep alike (lb_counters per service,
 * lb_be_counters per backend).
 * Settings: KF_MAX_SERVICES, KF_MAX_BACKENDS, KF_MAGLEV_CHUNKS.
 */
#ifndef KF_LB_TABLES_H
#define KF_LB_TABLES_H

#include "kf_maps.h"
#include "kf_types.h"

/*
 * Limits, not sizes of an intent: the compiler passes the intent's
 * spec.ebpf.limits (the same whatever the intent holds), so adding
 * services, backends or Maglev slots is a map update, never a new program.
 */
#ifndef KF_MAX_SERVICES
#define KF_MAX_SERVICES 65536
#endif
#ifndef KF_MAX_BACKENDS
#define KF_MAX_BACKENDS 262144
#endif
/* Maglev chunks: a service of n backends takes at most 1 + n / 6 (see compiler/maglev.py). */
#ifndef KF_MAGLEV_CHUNKS
#define KF_MAGLEV_CHUNKS (KF_MAX_SERVICES + 2 * KF_MAX_BACKENDS / 6 + 1)
#endif
/* Backend chunks per family: a service of n backends takes at most 1 + n / KF_BACKEND_CHUNK. */
#define KF_BACKEND_CHUNKS (KF_MAX_SERVICES + KF_MAX_BACKENDS / KF_BACKEND_CHUNK + 1)

/* Hashes without preallocation: memory follows what the intent holds, not its limits. */
KF_MAP_F("hash", struct kf_svc_key_v4, struct kf_service, services_v4, KF_MAX_SERVICES, BPF_F_NO_PREALLOC);
KF_MAP_F("hash", struct kf_svc_key_v6, struct kf_service, services_v6, KF_MAX_SERVICES, BPF_F_NO_PREALLOC);
KF_MAP_F("hash", struct kf_maglev_key, struct kf_maglev_chunk, maglev, KF_MAGLEV_CHUNKS, BPF_F_NO_PREALLOC);
KF_MAP_F("hash", struct kf_maglev_key, struct kf_backend_chunk_v4, backends_v4, KF_BACKEND_CHUNKS,
	 BPF_F_NO_PREALLOC);
KF_MAP_F("hash", struct kf_maglev_key, struct kf_backend_chunk_v6, backends_v6, KF_BACKEND_CHUNKS,
	 BPF_F_NO_PREALLOC);
/* Per service (key = kf_service.id) and per backend (key = {service id, position}): what each program
 * balanced. Created by the program on first use. */
KF_MAP_F("percpu_hash", u32, struct kf_lb_counter, lb_counters, KF_MAX_SERVICES, BPF_F_NO_PREALLOC);
KF_MAP_F("percpu_hash", struct kf_maglev_key, struct kf_lb_backend_counter, lb_be_counters,
	 2 * KF_MAX_BACKENDS, BPF_F_NO_PREALLOC);

#endif /* KF_LB_TABLES_H */
