/* pbwire.c — see pbwire.h. The packer follows protobuf-c's own rules for which fields go
 * on the wire (proto3 scalars only when not zero, oneof members when their case is set,
 * optional ones by their has_ flag, packed repeated scalars) so the bytes are identical;
 * tests/unit/test_pbwire.c holds it to that. */
#include "pbwire.h"

#include <stdbool.h>
#include <string.h>

typedef Envoy__Service__ExtProc__V3__ProcessingRequest Request;
typedef Envoy__Service__ExtProc__V3__HttpHeaders HttpHeaders;
typedef Envoy__Service__ExtProc__V3__HttpBody HttpBody;
typedef Envoy__Service__ExtProc__V3__HttpTrailers HttpTrailers;
typedef Envoy__Config__Core__V3__HeaderMap HeaderMap;
typedef Envoy__Config__Core__V3__HeaderValue HeaderValue;

/* ---- packing, backwards --------------------------------------------------------------- */

struct out {
    uint8_t *start;
    uint8_t *p;        /* the first byte written so far; moves towards start */
    bool overflow;
};

static void put_bytes(struct out *o, const void *data, size_t n)
{
    if (o->overflow || (size_t)(o->p - o->start) < n) {
        o->overflow = true;
        return;
    }
    o->p -= n;
    if (n)
        memcpy(o->p, data, n);
}

static void put_varint(struct out *o, uint64_t v)
{
    uint8_t tmp[10];
    size_t n = 0;
    do {
        tmp[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    } while (v);
    tmp[n - 1] &= 0x7f;
    put_bytes(o, tmp, n);
}

static void put_tag(struct out *o, uint32_t id, unsigned wire_type)
{
    put_varint(o, (uint64_t)id << 3 | wire_type);
}

static void put_fixed(struct out *o, const void *value, size_t n)
{
    uint8_t tmp[8];
    memcpy(tmp, value, n);   /* x86-64 and arm64 are little-endian, as the wire is */
    put_bytes(o, tmp, n);
}

static size_t element_size(ProtobufCType type)
{
    switch (type) {
    case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64: case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64: case PROTOBUF_C_TYPE_DOUBLE:
        return 8;
    case PROTOBUF_C_TYPE_BOOL:
        return sizeof(protobuf_c_boolean);
    case PROTOBUF_C_TYPE_STRING: case PROTOBUF_C_TYPE_MESSAGE:
        return sizeof(void *);
    case PROTOBUF_C_TYPE_BYTES:
        return sizeof(ProtobufCBinaryData);
    default:
        return 4;
    }
}

static unsigned wire_type_of(ProtobufCType type)
{
    switch (type) {
    case PROTOBUF_C_TYPE_SFIXED32: case PROTOBUF_C_TYPE_FIXED32: case PROTOBUF_C_TYPE_FLOAT:
        return 5;
    case PROTOBUF_C_TYPE_SFIXED64: case PROTOBUF_C_TYPE_FIXED64: case PROTOBUF_C_TYPE_DOUBLE:
        return 1;
    case PROTOBUF_C_TYPE_STRING: case PROTOBUF_C_TYPE_BYTES: case PROTOBUF_C_TYPE_MESSAGE:
        return 2;
    default:
        return 0;
    }
}

static void put_message(struct out *o, const ProtobufCMessage *m);

/* The value of one field (no tag). */
static void put_value(struct out *o, ProtobufCType type, const void *v)
{
    switch (type) {
    case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_ENUM:
        put_varint(o, (uint64_t)(int64_t) * (const int32_t *)v);   /* negative: 10 bytes */
        break;
    case PROTOBUF_C_TYPE_SINT32: {
        int32_t x = *(const int32_t *)v;
        put_varint(o, ((uint32_t)x << 1) ^ (uint32_t)(x >> 31));
        break;
    }
    case PROTOBUF_C_TYPE_UINT32:
        put_varint(o, *(const uint32_t *)v);
        break;
    case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_UINT64:
        put_varint(o, *(const uint64_t *)v);
        break;
    case PROTOBUF_C_TYPE_SINT64: {
        int64_t x = *(const int64_t *)v;
        put_varint(o, ((uint64_t)x << 1) ^ (uint64_t)(x >> 63));
        break;
    }
    case PROTOBUF_C_TYPE_BOOL:
        put_varint(o, *(const protobuf_c_boolean *)v ? 1 : 0);
        break;
    case PROTOBUF_C_TYPE_SFIXED32: case PROTOBUF_C_TYPE_FIXED32: case PROTOBUF_C_TYPE_FLOAT:
        put_fixed(o, v, 4);
        break;
    case PROTOBUF_C_TYPE_SFIXED64: case PROTOBUF_C_TYPE_FIXED64: case PROTOBUF_C_TYPE_DOUBLE:
        put_fixed(o, v, 8);
        break;
    case PROTOBUF_C_TYPE_STRING: {
        const char *s = *(const char *const *)v;
        size_t n = s ? strlen(s) : 0;
        put_bytes(o, s, n);
        put_varint(o, n);
        break;
    }
    case PROTOBUF_C_TYPE_BYTES: {
        const ProtobufCBinaryData *b = v;
        put_bytes(o, b->data, b->len);
        put_varint(o, b->len);
        break;
    }
    case PROTOBUF_C_TYPE_MESSAGE: {
        const ProtobufCMessage *sub = *(const ProtobufCMessage *const *)v;
        uint8_t *end = o->p;
        if (sub)
            put_message(o, sub);
        put_varint(o, (uint64_t)(end - o->p));
        break;
    }
    }
}

/* Whether a proto3 field without presence is at its default, and so left off the wire. */
static bool zeroish(ProtobufCType type, const void *v)
{
    switch (type) {
    case PROTOBUF_C_TYPE_SFIXED64: case PROTOBUF_C_TYPE_FIXED64: case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64: case PROTOBUF_C_TYPE_UINT64:
        return *(const uint64_t *)v == 0;
    case PROTOBUF_C_TYPE_FLOAT:
        return *(const float *)v == 0;
    case PROTOBUF_C_TYPE_DOUBLE:
        return *(const double *)v == 0;
    case PROTOBUF_C_TYPE_BOOL:
        return *(const protobuf_c_boolean *)v == 0;
    case PROTOBUF_C_TYPE_STRING:
        return *(const char *const *)v == NULL || **(const char *const *)v == '\0';
    case PROTOBUF_C_TYPE_BYTES:
        return ((const ProtobufCBinaryData *)v)->len == 0;
    case PROTOBUF_C_TYPE_MESSAGE:
        return *(const void *const *)v == NULL;
    default:
        return *(const uint32_t *)v == 0;
    }
}

static void put_field(struct out *o, const ProtobufCFieldDescriptor *f, const ProtobufCMessage *m)
{
    const char *member = (const char *)m + f->offset;
    bool pointer_type = f->type == PROTOBUF_C_TYPE_MESSAGE || f->type == PROTOBUF_C_TYPE_STRING;

    if (f->label == PROTOBUF_C_LABEL_REPEATED) {
        size_t count = *(const size_t *)((const char *)m + f->quantifier_offset);
        if (count == 0)
            return;
        const char *array = *(const char *const *)member;
        size_t size = element_size(f->type);
        if (f->flags & PROTOBUF_C_FIELD_FLAG_PACKED) {
            uint8_t *end = o->p;
            for (size_t i = count; i-- > 0;)
                put_value(o, f->type, array + i * size);
            put_varint(o, (uint64_t)(end - o->p));
            put_tag(o, f->id, 2);
        } else {
            for (size_t i = count; i-- > 0;) {
                put_value(o, f->type, array + i * size);
                put_tag(o, f->id, wire_type_of(f->type));
            }
        }
        return;
    }
    if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
        if (*(const uint32_t *)((const char *)m + f->quantifier_offset) != f->id)
            return;
        if (pointer_type && (*(const void *const *)member == NULL ||
                             *(const void *const *)member == f->default_value))
            return;
    } else if (f->label == PROTOBUF_C_LABEL_OPTIONAL) {
        if (pointer_type) {
            if (*(const void *const *)member == NULL ||
                *(const void *const *)member == f->default_value)
                return;
        } else if (!*(const protobuf_c_boolean *)((const char *)m + f->quantifier_offset)) {
            return;
        }
    } else if (f->label == PROTOBUF_C_LABEL_NONE) {
        if (zeroish(f->type, member))
            return;
    }
    put_value(o, f->type, member);
    put_tag(o, f->id, wire_type_of(f->type));
}

static void put_message(struct out *o, const ProtobufCMessage *m)
{
    for (size_t i = m->n_unknown_fields; i-- > 0;) {
        const ProtobufCMessageUnknownField *u = &m->unknown_fields[i];
        put_bytes(o, u->data, u->len);
        put_tag(o, u->tag, u->wire_type);
    }
    const ProtobufCMessageDescriptor *d = m->descriptor;
    for (unsigned i = d->n_fields; i-- > 0 && !o->overflow;)
        put_field(o, &d->fields[i], m);
}

uint8_t *pbwire_pack_backward(const ProtobufCMessage *msg, uint8_t *start, uint8_t *end)
{
    struct out o = {.start = start, .p = end};
    put_message(&o, msg);
    return o.overflow ? NULL : o.p;
}

/* ---- unpacking the common requests ---------------------------------------------------- */

struct in {
    const uint8_t *p, *end;
};

static bool get_varint(struct in *in, uint64_t *v)
{
    uint64_t x = 0;
    for (unsigned shift = 0; shift < 64 && in->p < in->end; shift += 7) {
        uint8_t b = *in->p++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return true;
        }
    }
    return false;
}

/* A length-delimited field's contents. */
static bool get_span(struct in *in, struct in *span)
{
    uint64_t n;
    if (!get_varint(in, &n) || n > (uint64_t)(in->end - in->p))
        return false;
    span->p = in->p;
    span->end = in->p + n;
    in->p += n;
    return true;
}

static bool get_tag(struct in *in, uint32_t *id, unsigned *wire_type)
{
    uint64_t t;
    if (!get_varint(in, &t) || t >> 3 == 0 || t >> 3 > 0x1fffffff)
        return false;
    *id = (uint32_t)(t >> 3);
    *wire_type = (unsigned)(t & 7);
    return true;
}

static char *copy_string(const struct in *span, struct arena *a)
{
    size_t n = (size_t)(span->end - span->p);
    char *s = arena_alloc(a, n + 1);
    if (s) {
        memcpy(s, span->p, n);
        s[n] = '\0';
    }
    return s;
}

static bool get_header_value(struct in span, HeaderValue *hv, struct arena *a)
{
    while (span.p < span.end) {
        uint32_t id;
        unsigned wt;
        struct in field;
        if (!get_tag(&span, &id, &wt) || wt != 2 || id < 1 || id > 3 || !get_span(&span, &field))
            return false;
        if (id == 3) {
            hv->raw_value.data = (uint8_t *)field.p;
            hv->raw_value.len = (size_t)(field.end - field.p);
        } else {
            char *s = copy_string(&field, a);
            if (!s)
                return false;
            if (id == 1)
                hv->key = s;
            else
                hv->value = s;
        }
    }
    return true;
}

static HeaderMap *get_header_map(struct in span, struct arena *a)
{
    /* count first, so the entries are one allocation */
    size_t n = 0;
    for (struct in scan = span; scan.p < scan.end; n++) {
        uint32_t id;
        unsigned wt;
        struct in field;
        if (!get_tag(&scan, &id, &wt) || id != 1 || wt != 2 || !get_span(&scan, &field))
            return NULL;
    }
    HeaderMap *map = arena_alloc(a, sizeof *map);
    HeaderValue **ptrs = arena_alloc(a, n * sizeof *ptrs + 1);
    HeaderValue *values = arena_alloc(a, n * sizeof *values + 1);
    if (!map || !ptrs || !values)
        return NULL;
    *map = (HeaderMap)ENVOY__CONFIG__CORE__V3__HEADER_MAP__INIT;
    map->n_headers = n;
    map->headers = ptrs;
    for (size_t i = 0; i < n; i++) {
        uint32_t id;
        unsigned wt;
        struct in field;
        /* the count above already read these; checking again costs two branches and lets
         * the compiler see that field is set (-O3 inlines this far and asks) */
        if (!get_tag(&span, &id, &wt) || !get_span(&span, &field))
            return NULL;
        values[i] = (HeaderValue)ENVOY__CONFIG__CORE__V3__HEADER_VALUE__INIT;
        if (!get_header_value(field, &values[i], a))
            return NULL;
        ptrs[i] = &values[i];
    }
    return map;
}

/* HttpHeaders (with_eos) or HttpTrailers: a header map in field 1, end_of_stream in 3. */
static bool get_headers(struct in span, HeaderMap **map, protobuf_c_boolean *eos, bool with_eos,
                        struct arena *a)
{
    while (span.p < span.end) {
        uint32_t id;
        unsigned wt;
        if (!get_tag(&span, &id, &wt))
            return false;
        if (id == 1 && wt == 2 && *map == NULL) {
            struct in field;
            if (!get_span(&span, &field) || !(*map = get_header_map(field, a)))
                return false;
        } else if (with_eos && id == 3 && wt == 0) {
            uint64_t v;
            if (!get_varint(&span, &v))
                return false;
            *eos = v != 0;
        } else {
            return false;   /* attributes, a repeated map, anything else: protobuf-c's job */
        }
    }
    return true;
}

static bool get_body(struct in span, HttpBody *body)
{
    while (span.p < span.end) {
        uint32_t id;
        unsigned wt;
        if (!get_tag(&span, &id, &wt))
            return false;
        if (id == 1 && wt == 2) {
            struct in field;
            if (!get_span(&span, &field))
                return false;
            body->body.data = (uint8_t *)field.p;
            body->body.len = (size_t)(field.end - field.p);
        } else if (id >= 2 && id <= 4 && wt == 0) {
            /* end_of_stream, and GRPC body mode's end_of_stream_without_message and
             * grpc_message_compressed */
            uint64_t v;
            if (!get_varint(&span, &v))
                return false;
            protobuf_c_boolean *flag = id == 2   ? &body->end_of_stream
                                       : id == 3 ? &body->end_of_stream_without_message
                                                 : &body->grpc_message_compressed;
            *flag = v != 0;
        } else {
            return false;
        }
    }
    return true;
}

Request *pbwire_unpack_request(const uint8_t *data, size_t len, struct arena *a)
{
    struct in in = {data, data + len};
    Request *req = arena_alloc(a, sizeof *req);
    if (!req)
        return NULL;
    *req = (Request)ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__INIT;
    while (in.p < in.end) {
        uint32_t id;
        unsigned wt;
        if (!get_tag(&in, &id, &wt))
            return NULL;
        if (id == 10 && wt == 0) {
            uint64_t v;
            if (!get_varint(&in, &v))
                return NULL;
            req->observability_mode = v != 0;
            continue;
        }
        /* one phase, once: a repeated or second phase field means merging, left to
         * protobuf-c */
        struct in span;
        if (id < 2 || id > 7 || wt != 2 || req->request_case != 0 || !get_span(&in, &span))
            return NULL;
        req->request_case = (Envoy__Service__ExtProc__V3__ProcessingRequest__RequestCase)id;
        if (id <= 3) {
            HttpHeaders *h = arena_alloc(a, sizeof *h);
            if (!h)
                return NULL;
            /* the generated function, not the __INIT macro: the macro names the deprecated
             * `attributes` fields, which clang then reports at every use */
            envoy__service__ext_proc__v3__http_headers__init(h);
            if (!get_headers(span, &h->headers, &h->end_of_stream, true, a))
                return NULL;
            if (id == 2)
                req->request_headers = h;
            else
                req->response_headers = h;
        } else if (id <= 5) {
            HttpBody *b = arena_alloc(a, sizeof *b);
            if (!b)
                return NULL;
            *b = (HttpBody)ENVOY__SERVICE__EXT_PROC__V3__HTTP_BODY__INIT;
            if (!get_body(span, b))
                return NULL;
            if (id == 4)
                req->request_body = b;
            else
                req->response_body = b;
        } else {
            HttpTrailers *t = arena_alloc(a, sizeof *t);
            if (!t)
                return NULL;
            *t = (HttpTrailers)ENVOY__SERVICE__EXT_PROC__V3__HTTP_TRAILERS__INIT;
            protobuf_c_boolean unused = 0;
            if (!get_headers(span, &t->trailers, &unused, false, a))
                return NULL;
            if (id == 6)
                req->request_trailers = t;
            else
                req->response_trailers = t;
        }
    }
    return req;
}
