/* test_pbwire.c — pbwire must produce exactly protobuf-c's bytes, and its fast request
 * decoder must agree with protobuf-c on every input it accepts (and hand back the rest). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "pbwire.h"

/* HeaderValueOption.append is deprecated in Envoy's API, and still what Envoy reads */
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

static int passed, failed;

#define CHECK(c)                                                                            \
    do {                                                                                    \
        if (c) {                                                                            \
            passed++;                                                                       \
        } else {                                                                            \
            failed++;                                                                       \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #c);           \
        }                                                                                   \
    } while (0)

typedef Envoy__Service__ExtProc__V3__ProcessingRequest Request;
typedef Envoy__Service__ExtProc__V3__ProcessingResponse Response;

/* pbwire's bytes for m equal protobuf-c's, also when the buffer is one byte short. */
static void same_bytes(const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *want = malloc(n + 1), *buf = malloc(n + 16);
    protobuf_c_message_pack(m, want);
    uint8_t *first = pbwire_pack_backward(m, buf, buf + n + 16);
    CHECK(first != NULL && (size_t)(buf + n + 16 - first) == n && memcmp(first, want, n) == 0);
    if (n > 0)
        CHECK(pbwire_pack_backward(m, buf, buf + n - 1) == NULL);
    free(want);
    free(buf);
}

static Envoy__Config__Core__V3__HeaderValueOption *option(const char *k, const char *v, int action,
                                                          int append)
{
    Envoy__Config__Core__V3__HeaderValueOption *o = calloc(1, sizeof *o);
    Envoy__Config__Core__V3__HeaderValue *hv = calloc(1, sizeof *hv);
    *o = (Envoy__Config__Core__V3__HeaderValueOption)ENVOY__CONFIG__CORE__V3__HEADER_VALUE_OPTION__INIT;
    *hv = (Envoy__Config__Core__V3__HeaderValue)ENVOY__CONFIG__CORE__V3__HEADER_VALUE__INIT;
    hv->key = (char *)k;
    hv->raw_value.data = (uint8_t *)v;
    hv->raw_value.len = strlen(v);
    o->header = hv;
    o->append_action = action;
    if (append >= 0) {
        Google__Protobuf__BoolValue *b = calloc(1, sizeof *b);
        *b = (Google__Protobuf__BoolValue)GOOGLE__PROTOBUF__BOOL_VALUE__INIT;
        b->value = append;
        o->append = b;
    }
    return o;
}

static void test_pack(void)
{
    /* every response shape pbconv builds, and the corner cases of presence */
    Envoy__Service__ExtProc__V3__HeaderMutation hm = ENVOY__SERVICE__EXT_PROC__V3__HEADER_MUTATION__INIT;
    Envoy__Config__Core__V3__HeaderValueOption *opts[] = {
        option(":authority", "service-extensions.com", 0, -1), option(":path", "/", 1, -1),
        option("x-a", "", 0, 1), option("x-neg", "v", 3, 0)};
    hm.n_set_headers = 4;
    hm.set_headers = opts;
    char *removes[] = {"foo", "", "bar"};
    hm.n_remove_headers = 3;
    hm.remove_headers = removes;
    Envoy__Service__ExtProc__V3__BodyMutation bm;
    envoy__service__ext_proc__v3__body_mutation__init(&bm);
    Envoy__Service__ExtProc__V3__CommonResponse cr = ENVOY__SERVICE__EXT_PROC__V3__COMMON_RESPONSE__INIT;
    cr.header_mutation = &hm;
    cr.clear_route_cache = 1;
    cr.status = ENVOY__SERVICE__EXT_PROC__V3__COMMON_RESPONSE__RESPONSE_STATUS__CONTINUE_AND_REPLACE;
    Envoy__Service__ExtProc__V3__HeadersResponse hr = ENVOY__SERVICE__EXT_PROC__V3__HEADERS_RESPONSE__INIT;
    hr.response = &cr;
    Response r = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__INIT;
    same_bytes(&r.base);   /* empty */
    r.response_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_HEADERS;
    r.request_headers = &hr;
    same_bytes(&r.base);
    /* a oneof member at its default value is still sent (clear_body = false) */
    bm.mutation_case = ENVOY__SERVICE__EXT_PROC__V3__BODY_MUTATION__MUTATION_CLEAR_BODY;
    bm.clear_body = 0;
    cr.body_mutation = &bm;
    same_bytes(&r.base);
    bm.mutation_case = ENVOY__SERVICE__EXT_PROC__V3__BODY_MUTATION__MUTATION_BODY;
    bm.body.data = (uint8_t *)"a\0b";
    bm.body.len = 3;
    same_bytes(&r.base);
    Envoy__Service__ExtProc__V3__StreamedBodyResponse sbr = ENVOY__SERVICE__EXT_PROC__V3__STREAMED_BODY_RESPONSE__INIT;
    sbr.end_of_stream = 1;
    bm.mutation_case = ENVOY__SERVICE__EXT_PROC__V3__BODY_MUTATION__MUTATION_STREAMED_RESPONSE;
    bm.streamed_response = &sbr;
    same_bytes(&r.base);
    /* GRPC body mode's flags on a streamed chunk */
    sbr.end_of_stream_without_message = 1;
    sbr.grpc_message_compressed = 1;
    same_bytes(&r.base);
    r.request_drain = 1;
    same_bytes(&r.base);
    r.request_drain = 0;

    /* streamed_immediate_response: each member of its oneof */
    Envoy__Service__ExtProc__V3__StreamedImmediateResponse sir =
        ENVOY__SERVICE__EXT_PROC__V3__STREAMED_IMMEDIATE_RESPONSE__INIT;
    Response rs = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__INIT;
    rs.response_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_STREAMED_IMMEDIATE_RESPONSE;
    rs.streamed_immediate_response = &sir;
    same_bytes(&rs.base);
    Envoy__Config__Core__V3__HeaderMap lmap = ENVOY__CONFIG__CORE__V3__HEADER_MAP__INIT;
    Envoy__Config__Core__V3__HeaderValue *lhv[] = {opts[0]->header, opts[1]->header};
    lmap.n_headers = 2;
    lmap.headers = lhv;
    Envoy__Service__ExtProc__V3__HttpHeaders lh;
    envoy__service__ext_proc__v3__http_headers__init(&lh);
    lh.headers = &lmap;
    lh.end_of_stream = 1;
    sir.response_case = ENVOY__SERVICE__EXT_PROC__V3__STREAMED_IMMEDIATE_RESPONSE__RESPONSE_HEADERS_RESPONSE;
    sir.headers_response = &lh;
    same_bytes(&rs.base);
    sir.response_case = ENVOY__SERVICE__EXT_PROC__V3__STREAMED_IMMEDIATE_RESPONSE__RESPONSE_BODY_RESPONSE;
    sir.body_response = &sbr;
    same_bytes(&rs.base);
    sir.response_case = ENVOY__SERVICE__EXT_PROC__V3__STREAMED_IMMEDIATE_RESPONSE__RESPONSE_TRAILERS_RESPONSE;
    sir.trailers_response = &lmap;
    rs.request_drain = 1;
    same_bytes(&rs.base);

    /* an empty submessage in the oneof: 0a 00 */
    Envoy__Service__ExtProc__V3__HeadersResponse empty = ENVOY__SERVICE__EXT_PROC__V3__HEADERS_RESPONSE__INIT;
    r.request_headers = &empty;
    same_bytes(&r.base);

    /* immediate response, dynamic metadata (Struct with every Value kind), mode, duration */
    Envoy__Type__V3__HttpStatus st = ENVOY__TYPE__V3__HTTP_STATUS__INIT;
    st.code = ENVOY__TYPE__V3__STATUS_CODE__Forbidden;
    Envoy__Service__ExtProc__V3__GrpcStatus gs = ENVOY__SERVICE__EXT_PROC__V3__GRPC_STATUS__INIT;
    gs.status = 0;
    Envoy__Service__ExtProc__V3__ImmediateResponse ir = ENVOY__SERVICE__EXT_PROC__V3__IMMEDIATE_RESPONSE__INIT;
    ir.status = &st;
    ir.headers = &hm;
    ir.body.data = (uint8_t *)"denied";
    ir.body.len = 6;
    ir.grpc_status = &gs;
    ir.details = "because";
    r.response_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_IMMEDIATE_RESPONSE;
    r.immediate_response = &ir;

    Google__Protobuf__Value vals[6];
    for (int i = 0; i < 6; i++)
        vals[i] = (Google__Protobuf__Value)GOOGLE__PROTOBUF__VALUE__INIT;
    vals[0].kind_case = GOOGLE__PROTOBUF__VALUE__KIND_NULL_VALUE;
    vals[1].kind_case = GOOGLE__PROTOBUF__VALUE__KIND_NUMBER_VALUE;
    vals[1].number_value = -1.5;
    vals[2].kind_case = GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE;
    vals[2].string_value = "";
    vals[3].kind_case = GOOGLE__PROTOBUF__VALUE__KIND_BOOL_VALUE;
    vals[3].bool_value = 0;
    Google__Protobuf__Value *items[] = {&vals[0], &vals[1], &vals[2], &vals[3]};
    Google__Protobuf__ListValue lv = GOOGLE__PROTOBUF__LIST_VALUE__INIT;
    lv.n_values = 4;
    lv.values = items;
    vals[4].kind_case = GOOGLE__PROTOBUF__VALUE__KIND_LIST_VALUE;
    vals[4].list_value = &lv;
    Google__Protobuf__Struct inner = GOOGLE__PROTOBUF__STRUCT__INIT;
    Google__Protobuf__Struct__FieldsEntry e1 = GOOGLE__PROTOBUF__STRUCT__FIELDS_ENTRY__INIT;
    e1.key = "list";
    e1.value = &vals[4];
    Google__Protobuf__Struct__FieldsEntry *ie[] = {&e1};
    inner.n_fields = 1;
    inner.fields = ie;
    vals[5].kind_case = GOOGLE__PROTOBUF__VALUE__KIND_STRUCT_VALUE;
    vals[5].struct_value = &inner;
    Google__Protobuf__Struct outer = GOOGLE__PROTOBUF__STRUCT__INIT;
    Google__Protobuf__Struct__FieldsEntry e2 = GOOGLE__PROTOBUF__STRUCT__FIELDS_ENTRY__INIT;
    e2.key = "ns";
    e2.value = &vals[5];
    Google__Protobuf__Struct__FieldsEntry *oe[] = {&e2};
    outer.n_fields = 1;
    outer.fields = oe;
    r.dynamic_metadata = &outer;
    Envoy__Extensions__Filters__Http__ExtProc__V3__ProcessingMode pm =
        ENVOY__EXTENSIONS__FILTERS__HTTP__EXT_PROC__V3__PROCESSING_MODE__INIT;
    pm.request_body_mode = ENVOY__EXTENSIONS__FILTERS__HTTP__EXT_PROC__V3__PROCESSING_MODE__BODY_SEND_MODE__FULL_DUPLEX_STREAMED;
    pm.response_header_mode = ENVOY__EXTENSIONS__FILTERS__HTTP__EXT_PROC__V3__PROCESSING_MODE__HEADER_SEND_MODE__SKIP;
    r.mode_override = &pm;
    Google__Protobuf__Duration d = GOOGLE__PROTOBUF__DURATION__INIT;
    d.seconds = 1;
    d.nanos = 500000000;
    r.override_message_timeout = &d;
    same_bytes(&r.base);
    d.seconds = -3;   /* negative int64 and int32: ten-byte varints */
    d.nanos = -7;
    same_bytes(&r.base);

    /* unknown fields are kept, after the known ones */
    static uint8_t raw[] = {0xf8, 0x01, 0x05, 0x0a, 0x02, 0x68, 0x69, 0xfa, 0x01, 0x01, 0x21, 0x10, 0x01};
    Envoy__Service__ExtProc__V3__HttpBody *hb =
        envoy__service__ext_proc__v3__http_body__unpack(NULL, sizeof raw, raw);
    CHECK(hb != NULL);
    if (hb) {
        CHECK(hb->base.n_unknown_fields > 0);
        same_bytes(&hb->base);
        envoy__service__ext_proc__v3__http_body__free_unpacked(hb, NULL);
    }
    for (int i = 0; i < 4; i++) {
        free(opts[i]->header);
        free(opts[i]->append);
        free(opts[i]);
    }
}

/* Encodings of requests, built with protobuf-c. */
static size_t encode(const Request *r, uint8_t *buf)
{
    return protobuf_c_message_pack(&r->base, buf);
}

/* When pbwire accepts `data`, it must decode to what protobuf-c decodes: compared by
 * packing both (pbwire's packer is checked against protobuf-c above). */
static int agree(const uint8_t *data, size_t len, struct arena *a)
{
    Request *fast = pbwire_unpack_request(data, len, a);
    Request *slow = envoy__service__ext_proc__v3__processing_request__unpack(NULL, len, data);
    int accepted = fast != NULL;
    if (fast) {
        CHECK(slow != NULL);
        if (slow) {
            size_t n = protobuf_c_message_get_packed_size(&slow->base);
            size_t m = protobuf_c_message_get_packed_size(&fast->base);
            uint8_t *x = malloc(n + 1), *y = malloc(m + 1);
            protobuf_c_message_pack(&slow->base, x);
            protobuf_c_message_pack(&fast->base, y);
            CHECK(n == m && memcmp(x, y, n) == 0);
            free(x);
            free(y);
        }
    }
    if (slow)
        envoy__service__ext_proc__v3__processing_request__free_unpacked(slow, NULL);
    arena_reset(a);
    return accepted;
}

static void test_unpack(void)
{
    struct arena a;
    arena_init(&a, 0);
    uint8_t buf[4096];

    Envoy__Config__Core__V3__HeaderValue hv[3];
    Envoy__Config__Core__V3__HeaderValue *hvp[3] = {&hv[0], &hv[1], &hv[2]};
    for (int i = 0; i < 3; i++)
        hv[i] = (Envoy__Config__Core__V3__HeaderValue)ENVOY__CONFIG__CORE__V3__HEADER_VALUE__INIT;
    hv[0].key = ":path";
    hv[0].raw_value.data = (uint8_t *)"/x";
    hv[0].raw_value.len = 2;
    hv[1].key = "old";
    hv[1].value = "style";
    hv[2].key = "bin";
    hv[2].raw_value.data = (uint8_t *)"a\0\xff";
    hv[2].raw_value.len = 3;
    Envoy__Config__Core__V3__HeaderMap map = ENVOY__CONFIG__CORE__V3__HEADER_MAP__INIT;
    map.n_headers = 3;
    map.headers = hvp;
    Envoy__Service__ExtProc__V3__HttpHeaders hh = ENVOY__SERVICE__EXT_PROC__V3__HTTP_HEADERS__INIT;
    hh.headers = &map;
    hh.end_of_stream = 1;
    Envoy__Service__ExtProc__V3__HttpBody hb = ENVOY__SERVICE__EXT_PROC__V3__HTTP_BODY__INIT;
    hb.body.data = (uint8_t *)"chunk\0";
    hb.body.len = 6;
    hb.end_of_stream = 1;
    Envoy__Service__ExtProc__V3__HttpTrailers ht = ENVOY__SERVICE__EXT_PROC__V3__HTTP_TRAILERS__INIT;
    ht.trailers = &map;

    /* GRPC body mode: the two flags, and an end of stream without a message */
    Envoy__Service__ExtProc__V3__HttpBody gb = ENVOY__SERVICE__EXT_PROC__V3__HTTP_BODY__INIT;
    gb.body.data = (uint8_t *)"\x08\x01";
    gb.body.len = 2;
    gb.grpc_message_compressed = 1;
    Envoy__Service__ExtProc__V3__HttpBody ge = ENVOY__SERVICE__EXT_PROC__V3__HTTP_BODY__INIT;
    ge.end_of_stream = 1;
    ge.end_of_stream_without_message = 1;

    Request reqs[10];
    for (int i = 0; i < 10; i++)
        reqs[i] = (Request)ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__INIT;
    reqs[0].request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_REQUEST_HEADERS;
    reqs[0].request_headers = &hh;
    reqs[1].request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_RESPONSE_HEADERS;
    reqs[1].response_headers = &hh;
    reqs[1].observability_mode = 1;
    reqs[2].request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_REQUEST_BODY;
    reqs[2].request_body = &hb;
    reqs[3].request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_RESPONSE_BODY;
    reqs[3].response_body = &hb;
    reqs[4].request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_REQUEST_TRAILERS;
    reqs[4].request_trailers = &ht;
    reqs[5].request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_RESPONSE_TRAILERS;
    reqs[5].response_trailers = &ht;
    /* the rest go to protobuf-c: protocol_config, attributes */
    Envoy__Service__ExtProc__V3__ProtocolConfiguration pc = ENVOY__SERVICE__EXT_PROC__V3__PROTOCOL_CONFIGURATION__INIT;
    pc.request_body_mode = 4;
    reqs[6] = reqs[0];
    reqs[6].protocol_config = &pc;
    Google__Protobuf__Struct s = GOOGLE__PROTOBUF__STRUCT__INIT;
    Envoy__Service__ExtProc__V3__ProcessingRequest__AttributesEntry ae =
        ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__ATTRIBUTES_ENTRY__INIT;
    ae.key = "envoy.filters.http.ext_proc";
    ae.value = &s;
    Envoy__Service__ExtProc__V3__ProcessingRequest__AttributesEntry *aes[] = {&ae};
    reqs[7] = reqs[0];
    reqs[7].n_attributes = 1;
    reqs[7].attributes = aes;

    reqs[8].request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_REQUEST_BODY;
    reqs[8].request_body = &gb;
    reqs[9].request_case = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_RESPONSE_BODY;
    reqs[9].response_body = &ge;

    Request *r;
    size_t lens[10];
    uint8_t enc[10][512];
    for (int i = 0; i < 10; i++) {
        lens[i] = encode(&reqs[i], enc[i]);
        CHECK(agree(enc[i], lens[i], &a) == (i < 6 || i >= 8));
    }
    /* the fast path reads the GRPC flags itself */
    r = pbwire_unpack_request(enc[8], lens[8], &a);
    CHECK(r && r->request_body && r->request_body->grpc_message_compressed &&
          !r->request_body->end_of_stream_without_message && r->request_body->body.len == 2);
    arena_reset(&a);
    r = pbwire_unpack_request(enc[9], lens[9], &a);
    CHECK(r && r->response_body && r->response_body->end_of_stream &&
          r->response_body->end_of_stream_without_message &&
          !r->response_body->grpc_message_compressed);
    arena_reset(&a);
    /* the common path really is taken, and reads what it should */
    r = pbwire_unpack_request(enc[0], lens[0], &a);
    CHECK(r && r->request_headers && r->request_headers->end_of_stream &&
          r->request_headers->headers->n_headers == 3 &&
          strcmp(r->request_headers->headers->headers[1]->value, "style") == 0 &&
          r->request_headers->headers->headers[2]->raw_value.len == 3);
    arena_reset(&a);
    CHECK(agree((const uint8_t *)"", 0, &a) == 1);   /* no phase: decoded, left to the caller */

    /* mutations of valid encodings: every byte flipped, every truncation, random noise */
    unsigned seed = 12345;
    int accepted = 0, tried = 0;
    for (int i = 0; i < 10; i++) {
        for (size_t cut = 0; cut <= lens[i]; cut++, tried++)
            accepted += agree(enc[i], cut, &a);
        for (size_t k = 0; k < lens[i]; k++) {
            for (int bit = 0; bit < 8; bit++, tried++) {
                memcpy(buf, enc[i], lens[i]);
                buf[k] ^= (uint8_t)(1u << bit);
                accepted += agree(buf, lens[i], &a);
            }
        }
    }
    for (int round = 0; round < 20000; round++, tried++) {
        size_t n = (seed = seed * 1103515245u + 12345u) % 48;
        for (size_t k = 0; k < n; k++)
            buf[k] = (uint8_t)((seed = seed * 1103515245u + 12345u) >> 16);
        if (n > 0)
            buf[0] = (uint8_t)(0x12 + 8 * (seed % 6));   /* start with a phase tag */
        accepted += agree(buf, n, &a);
    }
    printf("fast path accepted %d of %d mutated inputs\n", accepted, tried);
    CHECK(accepted > 100);
    arena_destroy(&a);
}

int main(void)
{
    test_pack();
    test_unpack();
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
