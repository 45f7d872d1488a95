/* wirecheck.c — bounded nesting scan of protobuf wire bytes; see wirecheck.h. */
#include "wirecheck.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

struct frame {
    const ProtobufCMessageDescriptor *desc;
    const uint8_t *end;
    const char *field;   /* the field of the parent this message is in (NULL at the top) */
};

/* Reads a varint at *p (< end); false when malformed or truncated. */
static bool varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
    uint64_t r = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        r |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = r;
            return true;
        }
    }
    return false;
}

/* "a.b.c ... x.y.z": the first and the last few names of the path, which is long when the
 * nesting is what went wrong. */
static void describe_path(const struct frame *st, int depth, char *out, size_t len)
{
    size_t at = 0;
    out[0] = '\0';
    for (int i = 1; i <= depth && at + 1 < len; i++) {
        if (i > 4 && i <= depth - 3) {
            if (i == 5) {
                int w = snprintf(out + at, len - at, " ... ");
                at += w > 0 ? (size_t)w : 0;
            }
            continue;
        }
        int w = snprintf(out + at, len - at, "%s%s", at && out[at - 1] != ' ' ? "." : "",
                         st[i].field);
        at += w > 0 ? (size_t)w : 0;
    }
}

int wirecheck_depth(const uint8_t *data, size_t len, const ProtobufCMessageDescriptor *desc,
                    const uint32_t *ctx_fields, struct wirecheck_result *res, char *err,
                    size_t errlen)
{
    struct frame st[WIRECHECK_MAX_DEPTH + 2];
    int depth = 0;
    const uint8_t *p = data;
    st[0] = (struct frame){desc, data + len, NULL};
    res->ctx_bytes = 0;
    for (;;) {
        if (p >= st[depth].end) {
            if (depth == 0)
                return 0;
            p = st[depth].end;
            depth--;
            continue;
        }
        const uint8_t *end = st[depth].end;
        uint64_t key;
        if (!varint(&p, end, &key))
            return 0;
        uint32_t number = (uint32_t)(key >> 3);
        switch (key & 7) {
        case 0: {
            uint64_t v;
            if (!varint(&p, end, &v))
                return 0;
            break;
        }
        case 1:
            if (end - p < 8)
                return 0;
            p += 8;
            break;
        case 5:
            if (end - p < 4)
                return 0;
            p += 4;
            break;
        case 2: {
            uint64_t n;
            if (!varint(&p, end, &n) || n > (uint64_t)(end - p))
                return 0;
            const ProtobufCFieldDescriptor *f =
                st[depth].desc ? protobuf_c_message_descriptor_get_field(st[depth].desc, number)
                               : NULL;
            if (depth == 0 && ctx_fields) {
                for (const uint32_t *c = ctx_fields; *c; c++)
                    if (*c == number)
                        res->ctx_bytes += (size_t)n;
            }
            if (f && f->type == PROTOBUF_C_TYPE_MESSAGE) {
                if (depth == WIRECHECK_MAX_DEPTH) {
                    st[depth + 1].field = f->name;
                    char path[512];
                    describe_path(st, depth + 1, path, sizeof path);
                    snprintf(err, errlen, "%s: messages nested more than %d deep",
                             path, WIRECHECK_MAX_DEPTH);
                    return -1;
                }
                depth++;
                st[depth] = (struct frame){f->descriptor, p + n, f->name};
                break;   /* p now walks the nested message */
            }
            p += n;
            break;
        }
        default:   /* groups (3, 4) and invalid wire types: protobuf-c refuses them */
            return 0;
        }
    }
}
