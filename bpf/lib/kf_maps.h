// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * kf_maps.h - how kernform declares its maps, with optional pinning.
 *
 * Owns: the KF_MAP* declaration macros. Without settings, maps are private
 * to the loaded bcc module. With -DKF_PIN_DIR='"/sys/fs/bpf/kernform/<intent>/<attachment>"'
 * (a C string literal, quotes included) every map is pinned at
 * KF_PIN_DIR "/<map name>"; when that pin already exists bcc reuses the
 * pinned map instead of creating a new one, so a restarted daemon keeps
 * the map contents (rules, counters, token buckets) of the running
 * programs. The directory must exist on a bpffs before loading.
 *
 * Only declarations live here: bcc rejects map method calls inside
 * macros, so lookups are always written out in functions.
 */
#ifndef KF_MAPS_H
#define KF_MAPS_H

#ifdef KF_PIN_DIR
#define KF_MAP(_type, _key, _leaf, _name, _max) \
	BPF_TABLE_PINNED(_type, _key, _leaf, _name, _max, KF_PIN_DIR "/" #_name)
#define KF_MAP_F(_type, _key, _leaf, _name, _max, _flags) \
	BPF_TABLE_PINNED(_type, _key, _leaf, _name, _max, KF_PIN_DIR "/" #_name, _flags)
#else
#define KF_MAP(_type, _key, _leaf, _name, _max) \
	BPF_TABLE(_type, _key, _leaf, _name, _max)
#define KF_MAP_F(_type, _key, _leaf, _name, _max, _flags) \
	BPF_F_TABLE(_type, _key, _leaf, _name, _max, _flags)
#endif

/* LPM tries must be created with BPF_F_NO_PREALLOC. */
#define KF_LPM(_key, _leaf, _name, _max) \
	KF_MAP_F("lpm_trie", _key, _leaf, _name, _max, BPF_F_NO_PREALLOC)

#endif /* KF_MAPS_H */
