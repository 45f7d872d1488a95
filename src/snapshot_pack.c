/* snapshot_pack.c — see snapshot_pack.h. Layout, integers little-endian:
 *   u64 generation, str path, str dir, str source, 64 bytes sha256 (hex),
 *   u32 nfiles, then per file: str name, u8 has_data, str data (when has_data)
 * where str is a u32 length and that many bytes. */
#include "snapshot_pack.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "generation.h"

struct out {
    char *buf;
    size_t len, cap;
    int failed;
};

static void put(struct out *o, const void *p, size_t n)
{
    if (o->failed)
        return;
    if (o->len + n > o->cap) {
        size_t cap = o->cap ? o->cap : 4096;
        while (cap < o->len + n)
            cap *= 2;
        char *b = realloc(o->buf, cap);
        if (!b) {
            o->failed = 1;
            return;
        }
        o->buf = b;
        o->cap = cap;
    }
    memcpy(o->buf + o->len, p, n);
    o->len += n;
}

static void put_u32(struct out *o, uint32_t v)
{
    unsigned char b[4] = {v & 0xff, (v >> 8) & 0xff, (v >> 16) & 0xff, v >> 24};
    put(o, b, 4);
}

static void put_str(struct out *o, const char *s, size_t n)
{
    put_u32(o, (uint32_t)n);
    put(o, s, n);
}

char *snapshot_pack(const struct snapshot *snap, size_t *len)
{
    struct out o = {0};
    for (int i = 0; i < 8; i++) {
        unsigned char b = (unsigned char)(snap->generation >> (8 * i));
        put(&o, &b, 1);
    }
    put_str(&o, snap->path, strlen(snap->path));
    put_str(&o, snap->dir, strlen(snap->dir));
    put_str(&o, snap->source, snap->len);
    put(&o, snap->sha256, 64);
    put_u32(&o, (uint32_t)snap->nfiles);
    for (size_t i = 0; i < snap->nfiles; i++) {
        const struct snapshot_file *f = &snap->files[i];
        unsigned char has = f->data != NULL;
        put_str(&o, f->name, strlen(f->name));
        put(&o, &has, 1);
        if (has)
            put_str(&o, f->data, f->len);
    }
    if (o.failed) {
        free(o.buf);
        return NULL;
    }
    *len = o.len;
    return o.buf;
}

struct in {
    const char *p, *end;
};

static int get(struct in *in, void *dst, size_t n)
{
    if ((size_t)(in->end - in->p) < n)
        return -1;
    memcpy(dst, in->p, n);
    in->p += n;
    return 0;
}

static int get_u32(struct in *in, uint32_t *v)
{
    unsigned char b[4];
    if (get(in, b, 4) != 0)
        return -1;
    *v = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
    return 0;
}

/* A NUL-terminated copy of the next string (its length in *n); NULL when short or out of
 * memory. */
static char *get_str(struct in *in, size_t *n)
{
    uint32_t len;
    if (get_u32(in, &len) != 0 || (size_t)(in->end - in->p) < len)
        return NULL;
    char *s = malloc((size_t)len + 1);
    if (!s)
        return NULL;
    memcpy(s, in->p, len);
    s[len] = '\0';
    in->p += len;
    if (n)
        *n = len;
    return s;
}

struct snapshot *snapshot_unpack(const char *buf, size_t len)
{
    struct in in = {buf, buf + len};
    struct snapshot *snap = calloc(1, sizeof *snap);
    if (!snap)
        return NULL;
    atomic_init(&snap->refs, 1);
    unsigned char g[8];
    uint32_t nfiles;
    if (get(&in, g, 8) != 0)
        goto bad;
    for (int i = 0; i < 8; i++)
        snap->generation |= (uint64_t)g[i] << (8 * i);
    if (!(snap->path = get_str(&in, NULL)) || !(snap->dir = get_str(&in, NULL)) ||
        !(snap->source = get_str(&in, &snap->len)) || get(&in, snap->sha256, 64) != 0 ||
        get_u32(&in, &nfiles) != 0 || nfiles > len)
        goto bad;
    snap->sha256[64] = '\0';
    snap->bytes = snap->len;
    snap->files = calloc(nfiles ? nfiles : 1, sizeof *snap->files);
    if (!snap->files)
        goto bad;
    snap->cap = nfiles;
    for (uint32_t i = 0; i < nfiles; i++) {
        struct snapshot_file *f = &snap->files[i];
        unsigned char has;
        if (!(f->name = get_str(&in, NULL)) || get(&in, &has, 1) != 0) {
            snap->nfiles = i + 1;
            goto bad;
        }
        snap->nfiles = i + 1;
        if (has && !(f->data = get_str(&in, &f->len)))
            goto bad;
        snap->bytes += f->len;
    }
    if (in.p != in.end)
        goto bad;
    snap->frozen = true;
    return snap;
bad:
    snapshot_unref(snap);
    return NULL;
}
