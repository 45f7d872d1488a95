/* snapshot_pack.h — a frozen snapshot (generation.h) as bytes, and back: how the supervisor
 * hands one generation, byte for byte, to every worker process. */
#ifndef LUACALLOUT_SNAPSHOT_PACK_H
#define LUACALLOUT_SNAPSHOT_PACK_H

#include <stddef.h>

struct snapshot;

/* The snapshot as one malloc'd buffer (*len bytes); NULL when out of memory. */
char *snapshot_pack(const struct snapshot *snap, size_t *len);

/* A frozen snapshot (refs = 1) from snapshot_pack's bytes; NULL when they are not such
 * bytes or memory runs out. */
struct snapshot *snapshot_unpack(const char *buf, size_t len);

#endif
