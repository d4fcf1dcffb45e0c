// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The load-balancing tables that sock_connect.c (connect-time balancing) and
 * tc_lb.c (forwarded traffic at tc) both hold, declared once so that the
 * compiler's single layout (compiler/bpf_layout.py) fits both objects.
 * Also their counters, which both programs keep alike (lb_counters per service,
 * lb_be_counters per backend).
 * Settings: KF_MAX_SERVICES, KF_MAGLEV_SIZE (a prime), KF_MAX_BACKENDS.
 */
#ifndef KF_LB_TABLES_H
#define KF_LB_TABLES_H

#include "kf_maps.h"
#include "kf_types.h"

#ifndef KF_MAX_SERVICES
#define KF_MAX_SERVICES 256
#endif
#ifndef KF_MAGLEV_SIZE
#define KF_MAGLEV_SIZE 1021
#endif
#ifndef KF_MAX_BACKENDS
#define KF_MAX_BACKENDS 4096
#endif

KF_MAP("hash", struct kf_svc_key_v4, struct kf_service, services_v4, KF_MAX_SERVICES);
KF_MAP("hash", struct kf_svc_key_v6, struct kf_service, services_v6, KF_MAX_SERVICES);
/* Memory-mappable: the reconciler reads all KF_MAX_SERVICES * KF_MAGLEV_SIZE
 * slots (260k by default) with one mmap instead of 260k copies per observe. */
KF_MAP_F("array", u32, u32, maglev, KF_MAX_SERVICES * KF_MAGLEV_SIZE, BPF_F_MMAPABLE);
KF_MAP("array", u32, struct kf_backend_v4, backends_v4, KF_MAX_BACKENDS);
KF_MAP("array", u32, struct kf_backend_v6, backends_v6, KF_MAX_BACKENDS);
/* Per service (index = kf_service.id) and per backend (index = backend index, + KF_MAX_BACKENDS for
 * backends_v6): what each program balanced. */
KF_MAP("percpu_array", u32, struct kf_lb_counter, lb_counters, KF_MAX_SERVICES);
KF_MAP("percpu_array", u32, struct kf_lb_backend_counter, lb_be_counters, 2 * KF_MAX_BACKENDS);

#endif /* KF_LB_TABLES_H */
