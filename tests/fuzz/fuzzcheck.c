/* fuzzcheck.c — see fuzzcheck.h. */
#include "fuzzcheck.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

#include "envoy/service/ext_proc/v3/external_processor.pb-c.h"

static void drop_line(void *ud, enum log_level level, const char *msg, size_t len)
{
    (void)ud, (void)level, (void)msg, (void)len;
}

void fuzzcheck_quiet_logs(void) { log_set_sink(drop_line, NULL); }

void fuzzcheck_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("fuzzcheck: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    abort();
}

bool fuzzcheck_utf8(const char *str, size_t len)
{
    const unsigned char *s = (const unsigned char *)str, *end = s + len;
    while (s < end) {
        unsigned c = *s++;
        if (c < 0x80)
            continue;
        size_t more;
        unsigned cp, min;
        if (c >= 0xc2 && c <= 0xdf) {
            more = 1, cp = c & 0x1f, min = 0x80;
        } else if (c >= 0xe0 && c <= 0xef) {
            more = 2, cp = c & 0x0f, min = 0x800;
        } else if (c >= 0xf0 && c <= 0xf4) {
            more = 3, cp = c & 0x07, min = 0x10000;
        } else {
            return false;   /* a continuation byte first, C0/C1 (overlong), F5.. */
        }
        if ((size_t)(end - s) < more)
            return false;
        for (size_t i = 0; i < more; i++) {
            if ((s[i] & 0xc0) != 0x80)
                return false;
            cp = cp << 6 | (s[i] & 0x3f);
        }
        s += more;
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
    }
    return true;
}

/* Whether list (comma-separated, may be NULL) holds `a` or, with b, "a.b". */
static bool listed(const char *list, const char *a, const char *b)
{
    if (list == NULL)
        return false;
    size_t al = strlen(a), bl = b ? strlen(b) : 0, want = b ? al + 1 + bl : al;
    for (const char *p = list; *p;) {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        if (n == want && memcmp(p, a, al) == 0 &&
            (b == NULL || (p[al] == '.' && memcmp(p + al + 1, b, bl) == 0)))
            return true;
        p += n + (comma != NULL);
    }
    return false;
}

static bool known_gap(const char *msg, const char *field)
{
    return listed(getenv("FUZZ_KNOWN_UTF8"), msg, field);
}

bool fuzzcheck_known(const char *name)
{
    if (!listed(getenv("FUZZ_KNOWN"), name, NULL))
        return false;
    static bool told;
    if (!told)
        fprintf(stderr, "fuzzcheck: known failure tolerated (FUZZ_KNOWN): %s\n", name);
    told = true;
    return true;
}

/* path: where m sits, e.g. "request_headers.response.header_mutation.set_headers[0]" */
static void check_string(const ProtobufCMessageDescriptor *d, const ProtobufCFieldDescriptor *f,
                         const char *s, const char *path)
{
    if (s == NULL || fuzzcheck_utf8(s, strlen(s)))
        return;
    if (!known_gap(d->short_name, f->name))
        fuzzcheck_fail("%s (%s.%s) is not valid UTF-8", path, d->short_name, f->name);
    static bool told;
    if (!told) {
        fprintf(stderr, "fuzzcheck: known gap hit (FUZZ_KNOWN_UTF8): %s (%s.%s)\n", path,
                d->short_name, f->name);
        told = true;
    }
}

static void strings_at(const ProtobufCMessage *m, char *path, size_t len, size_t cap)
{
    const ProtobufCMessageDescriptor *d = m->descriptor;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE)
            continue;
        const char *member = (const char *)m + f->offset;
        size_t n = 1;
        const void *const *items = (const void *const *)member;
        bool repeated = f->label == PROTOBUF_C_LABEL_REPEATED;
        if (repeated) {
            n = *(const size_t *)((const char *)m + f->quantifier_offset);
            items = *(const void *const *const *)member;
        } else if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
            if (*(const uint32_t *)((const char *)m + f->quantifier_offset) != f->id)
                continue;
        }
        for (size_t k = 0; k < n; k++) {
            int w = repeated ? snprintf(path + len, cap - len, "%s%s[%zu]", len ? "." : "",
                                        f->name, k)
                             : snprintf(path + len, cap - len, "%s%s", len ? "." : "", f->name);
            size_t end = w < 0 || (size_t)w >= cap - len ? cap - 1 : len + (size_t)w;
            if (f->type == PROTOBUF_C_TYPE_STRING)
                check_string(d, f, items[k], path);
            else if (items[k] != NULL)
                strings_at(items[k], path, end, cap);
            path[len] = '\0';
        }
    }
}

void fuzzcheck_strings(const ProtobufCMessage *m)
{
    char path[1024] = "";
    strings_at(m, path, 0, sizeof path);
}

void fuzzcheck_response(const uint8_t *data, size_t len, const char *what)
{
    Envoy__Service__ExtProc__V3__ProcessingResponse *r =
        envoy__service__ext_proc__v3__processing_response__unpack(NULL, len, data);
    if (r == NULL)
        fuzzcheck_fail("%s: %zu bytes that protobuf-c does not decode", what, len);
    size_t n = protobuf_c_message_get_packed_size(&r->base);
    uint8_t *again = malloc(n ? n : 1);
    if (again == NULL)
        abort();
    protobuf_c_message_pack(&r->base, again);
    if (n != len || memcmp(again, data, len) != 0)
        fuzzcheck_fail("%s: %zu bytes that protobuf-c re-encodes differently (%zu bytes)",
                       what, len, n);
    free(again);
    fuzzcheck_strings(&r->base);
    envoy__service__ext_proc__v3__processing_response__free_unpacked(r, NULL);
}
