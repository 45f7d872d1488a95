/* test_snapshot_pack.c — a snapshot survives snapshot_pack/snapshot_unpack byte for byte
 * (what the supervisor hands every worker), and damaged bytes are refused, never read past. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "generation.h"
#include "snapshot_pack.h"

static struct snapshot *sample(const char *path)
{
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    /* bytes a text format would lose: a NUL, invalid UTF-8, no final newline */
    static const char src[] = "function on_request_headers() return {} end\n-- \0\xff\xfe end";
    CHECK(fwrite(src, 1, sizeof src - 1, f) == sizeof src - 1);
    fclose(f);
    char err[256];
    struct snapshot *snap = snapshot_read(path, 42, err, sizeof err);
    CHECK(snap != NULL);
    CHECK(snap->len == sizeof src - 1);
    CHECK(snapshot_add(snap, "/etc/data.json", "{\"a\":\0 1}", 9, err, sizeof err) != NULL);
    CHECK(snapshot_add(snap, "/opt/mod.so", NULL, 0, err, sizeof err) != NULL);  /* a C module */
    CHECK(snapshot_add(snap, "/empty", "", 0, err, sizeof err) != NULL);
    snap->frozen = true;
    return snap;
}

static void same(const struct snapshot *a, const struct snapshot *b)
{
    CHECK(b->generation == a->generation);
    CHECK(strcmp(b->path, a->path) == 0 && strcmp(b->dir, a->dir) == 0);
    CHECK(b->len == a->len && memcmp(b->source, a->source, a->len) == 0);
    CHECK(strcmp(b->sha256, a->sha256) == 0 && strlen(b->sha256) == 64);
    CHECK(b->frozen);
    CHECK(b->nfiles == a->nfiles);
    for (size_t i = 0; i < a->nfiles; i++) {
        CHECK(strcmp(b->files[i].name, a->files[i].name) == 0);
        CHECK((b->files[i].data == NULL) == (a->files[i].data == NULL));
        CHECK(b->files[i].len == a->files[i].len);
        if (a->files[i].data)
            CHECK(memcmp(b->files[i].data, a->files[i].data, a->files[i].len) == 0);
    }
    CHECK(snapshot_find(b, "/etc/data.json") != NULL);
    CHECK(snapshot_find(b, "/nope") == NULL);
}

int main(void)
{
    char path[] = "/tmp/test_snapshot_packXXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    close(fd);
    struct snapshot *snap = sample(path);
    size_t len = 0;
    char *packed = snapshot_pack(snap, &len);
    CHECK(packed != NULL && len > snap->len);

    struct snapshot *back = snapshot_unpack(packed, len);
    CHECK(back != NULL);
    same(snap, back);
    /* and again: packing what was unpacked gives the same bytes */
    size_t len2 = 0;
    char *again = snapshot_pack(back, &len2);
    CHECK(again != NULL && len2 == len && memcmp(again, packed, len) == 0);
    free(again);
    snapshot_unref(back);

    /* every truncation is refused (each length read from exactly a copy of that size,
     * so ASan sees any read past it) */
    for (size_t n = 0; n < len; n++) {
        char *cut = malloc(n ? n : 1);
        memcpy(cut, packed, n);
        CHECK(snapshot_unpack(cut, n) == NULL);
        free(cut);
    }
    /* a byte too many, and a file count larger than the bytes could hold */
    char *longer = malloc(len + 1);
    memcpy(longer, packed, len);
    longer[len] = 0;
    CHECK(snapshot_unpack(longer, len + 1) == NULL);
    free(longer);
    size_t count_at = 8 + 4 + strlen(snap->path) + 4 + strlen(snap->dir) + 4 + snap->len + 64;
    char *lying = malloc(len);
    memcpy(lying, packed, len);
    memset(lying + count_at, 0xff, 4);
    CHECK(snapshot_unpack(lying, len) == NULL);
    free(lying);

    free(packed);
    snapshot_unref(snap);
    unlink(path);
    printf("%d passed, 0 failed\n", passed);
    return 0;
}
