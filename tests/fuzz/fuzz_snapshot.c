/* fuzz_snapshot.c — snapshot_unpack on any bytes (what a worker reads from the supervisor):
 * it refuses them or returns a snapshot; it never reads outside them. What it returns packs
 * to bytes no longer than the input (names stop at a NUL) that unpack and pack again to
 * themselves. */
#include <stdlib.h>
#include <string.h>

#include "fuzzcheck.h"
#include "generation.h"
#include "snapshot_pack.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct snapshot *snap = snapshot_unpack((const char *)data, size);
    if (!snap)
        return 0;
    size_t len = 0, len2 = 0;
    char *again = snapshot_pack(snap, &len);
    if (!again)
        fuzzcheck_fail("a snapshot that unpacked does not pack");
    if (len > size)
        fuzzcheck_fail("packing an unpacked snapshot made it longer (%zu > %zu)", len, size);
    struct snapshot *snap2 = snapshot_unpack(again, len);
    if (!snap2)
        fuzzcheck_fail("snapshot_pack made bytes snapshot_unpack refuses");
    char *third = snapshot_pack(snap2, &len2);
    if (!third || len2 != len || memcmp(third, again, len) != 0)
        fuzzcheck_fail("pack(unpack(pack(s))) differs from pack(s)");
    free(third);
    free(again);
    snapshot_unref(snap2);
    snapshot_unref(snap);
    return 0;
}
