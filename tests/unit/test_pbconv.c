/* test_pbconv.c — the Lua contract (docs/lua-api.md) end to end through script.h: build
 * a ProcessingRequest with protobuf-c, pack it, dispatch_handle() it with a small script,
 * unpack the reply and look at every field. Plus direct checks of pbconv and the arena. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <grpc/status.h>
#include <lauxlib.h>
#include <lualib.h>

#include "arena.h"
#include "log.h"
#include "pbconv.h"
#include "dispatch.h"
#include "generation.h"
#include "vm.h"

#include "check.h"
#define CHECK_STR(a, b) CHECK((a) != NULL && strcmp((a), (b)) == 0)
#define CHECK_BYTES(bd, s, n) CHECK((bd).len == (n) && ((n) == 0 || memcmp((bd).data, (s), (n)) == 0))

typedef Envoy__Service__ExtProc__V3__ProcessingRequest Req;
typedef Envoy__Service__ExtProc__V3__ProcessingResponse Resp;
typedef Envoy__Config__Core__V3__HeaderValue HeaderValue;
typedef Envoy__Config__Core__V3__HeaderValueOption HeaderValueOption;
typedef Envoy__Service__ExtProc__V3__HeaderMutation HeaderMutation;
typedef Envoy__Service__ExtProc__V3__CommonResponse CommonResponse;

#define RESP(x) ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_##x

/* A VM of a new generation of the script at path, as the server builds one. */
static struct vm *open_vm(const char *path, char *err, size_t errlen)
{
    struct vm *vm = NULL;
    return generation_load(path, 1, &vm, 1, err, errlen) == 0 ? vm : NULL;
}

/* ---- scripts ---------------------------------------------------------------------------- */

static char tmpdir[] = "/tmp/test_pbconv.XXXXXX";
static int nscripts;
static char last_path[256];

/* Writes src to a fresh file; its path is left in last_path. */
static const char *write_script(const char *src)
{
    snprintf(last_path, sizeof last_path, "%s/s%d.lua", tmpdir, ++nscripts);
    FILE *f = fopen(last_path, "w");
    CHECK(f != NULL);
    CHECK(fputs(src, f) >= 0);
    CHECK(fclose(f) == 0);
    return last_path;
}

static struct vm *load(const char *src)
{
    char err[512] = "";
    struct vm *s = open_vm(write_script(src), err, sizeof err);
    if (s == NULL)
        fprintf(stderr, "script_open: %s\n", err);
    CHECK(s != NULL);
    return s;
}

/* ---- requests --------------------------------------------------------------------------- */

struct req {
    enum pbconv_phase phase;
    const char *const *kv;  /* name, value, name, value, ... */
    size_t n;               /* number of headers */
    bool old_value;         /* send values in `value`, not `raw_value` */
    bool eos;
    const char *body;
    size_t body_len;
    bool observe;
    bool extras;            /* metadata_context, attributes, protocol_config */
    /* beyond `extras`: one attribute and one filter_metadata entry, each {ns, key, value}
     * (a string value), and a protocol_config with these body modes when config is set */
    const char *attr[3];
    const char *meta[3];
    bool config;
    int req_mode, resp_mode;
    bool compressed, no_message;   /* GRPC body mode's HttpBody flags */
};

static uint8_t wire[1 << 16];

/* Packs the request described by r into wire; returns its length. */
static size_t build(const struct req *r)
{
    Req req = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__INIT;
    Envoy__Service__ExtProc__V3__HttpHeaders hh;   /* __init: the macro names deprecated fields */
    envoy__service__ext_proc__v3__http_headers__init(&hh);
    Envoy__Service__ExtProc__V3__HttpBody hb = ENVOY__SERVICE__EXT_PROC__V3__HTTP_BODY__INIT;
    Envoy__Service__ExtProc__V3__HttpTrailers ht = ENVOY__SERVICE__EXT_PROC__V3__HTTP_TRAILERS__INIT;
    Envoy__Config__Core__V3__HeaderMap map = ENVOY__CONFIG__CORE__V3__HEADER_MAP__INIT;
    HeaderValue hv[16];
    HeaderValue *hvp[16];
    CHECK(r->n <= 16);
    for (size_t i = 0; i < r->n; i++) {
        envoy__config__core__v3__header_value__init(&hv[i]);
        hv[i].key = (char *)r->kv[2 * i];
        if (r->old_value) {
            hv[i].value = (char *)r->kv[2 * i + 1];
        } else {
            hv[i].raw_value.data = (uint8_t *)r->kv[2 * i + 1];
            hv[i].raw_value.len = strlen(r->kv[2 * i + 1]);
        }
        hvp[i] = &hv[i];
    }
    map.n_headers = r->n;
    map.headers = hvp;
    switch (r->phase) {
    case PBCONV_REQUEST_HEADERS:
    case PBCONV_RESPONSE_HEADERS:
        hh.headers = &map;
        hh.end_of_stream = r->eos;
        req.request_case = r->phase == PBCONV_REQUEST_HEADERS ? 2 : 3;
        req.request_headers = &hh;
        break;
    case PBCONV_REQUEST_BODY:
    case PBCONV_RESPONSE_BODY:
        hb.body.data = (uint8_t *)r->body;
        hb.body.len = r->body_len;
        hb.end_of_stream = r->eos;
        hb.grpc_message_compressed = r->compressed;
        hb.end_of_stream_without_message = r->no_message;
        req.request_case = r->phase == PBCONV_REQUEST_BODY ? 4 : 5;
        req.request_body = &hb;
        break;
    default:
        ht.trailers = &map;
        req.request_case = r->phase == PBCONV_REQUEST_TRAILERS ? 6 : 7;
        req.request_trailers = &ht;
        break;
    }
    req.observability_mode = r->observe;

    Google__Protobuf__Value v = GOOGLE__PROTOBUF__VALUE__INIT;
    v.kind_case = GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE;
    v.string_value = "v";
    Google__Protobuf__Struct__FieldsEntry fe = GOOGLE__PROTOBUF__STRUCT__FIELDS_ENTRY__INIT;
    fe.key = "f";
    fe.value = &v;
    Google__Protobuf__Struct__FieldsEntry *fep = &fe;
    Google__Protobuf__Struct st = GOOGLE__PROTOBUF__STRUCT__INIT;
    st.n_fields = 1;
    st.fields = &fep;
    Envoy__Config__Core__V3__Metadata__FilterMetadataEntry me =
        ENVOY__CONFIG__CORE__V3__METADATA__FILTER_METADATA_ENTRY__INIT;
    me.key = "envoy.filters.http.ext_proc";
    me.value = &st;
    Envoy__Config__Core__V3__Metadata__FilterMetadataEntry *mep = &me;
    Envoy__Config__Core__V3__Metadata md = ENVOY__CONFIG__CORE__V3__METADATA__INIT;
    md.n_filter_metadata = 1;
    md.filter_metadata = &mep;
    Envoy__Service__ExtProc__V3__ProcessingRequest__AttributesEntry ae =
        ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__ATTRIBUTES_ENTRY__INIT;
    ae.key = "envoy.filters.http.ext_proc";
    ae.value = &st;
    Envoy__Service__ExtProc__V3__ProcessingRequest__AttributesEntry *aep = &ae;
    Envoy__Service__ExtProc__V3__ProtocolConfiguration pc =
        ENVOY__SERVICE__EXT_PROC__V3__PROTOCOL_CONFIGURATION__INIT;
    pc.request_body_mode = ENVOY__EXTENSIONS__FILTERS__HTTP__EXT_PROC__V3__PROCESSING_MODE__BODY_SEND_MODE__BUFFERED;
    if (r->extras) {
        req.metadata_context = &md;
        req.n_attributes = 1;
        req.attributes = &aep;
        req.protocol_config = &pc;
    }

    Google__Protobuf__Value av = GOOGLE__PROTOBUF__VALUE__INIT, mv = GOOGLE__PROTOBUF__VALUE__INIT;
    Google__Protobuf__Struct__FieldsEntry afe = GOOGLE__PROTOBUF__STRUCT__FIELDS_ENTRY__INIT,
                                          mfe = GOOGLE__PROTOBUF__STRUCT__FIELDS_ENTRY__INIT;
    Google__Protobuf__Struct__FieldsEntry *afep = &afe, *mfep = &mfe;
    Google__Protobuf__Struct ast = GOOGLE__PROTOBUF__STRUCT__INIT, mst = GOOGLE__PROTOBUF__STRUCT__INIT;
    if (r->attr[0] != NULL) {
        av.kind_case = GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE;
        av.string_value = (char *)r->attr[2];
        afe.key = (char *)r->attr[1];
        afe.value = &av;
        ast.n_fields = 1;
        ast.fields = &afep;
        ae.key = (char *)r->attr[0];
        ae.value = &ast;
        req.n_attributes = 1;
        req.attributes = &aep;
    }
    if (r->meta[0] != NULL) {
        mv.kind_case = GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE;
        mv.string_value = (char *)r->meta[2];
        mfe.key = (char *)r->meta[1];
        mfe.value = &mv;
        mst.n_fields = 1;
        mst.fields = &mfep;
        me.key = (char *)r->meta[0];
        me.value = &mst;
        req.metadata_context = &md;
    }
    if (r->config) {
        pc.request_body_mode = r->req_mode;
        pc.response_body_mode = r->resp_mode;
        pc.send_body_without_waiting_for_header_response = 1;
        req.protocol_config = &pc;
    }
    size_t len = protobuf_c_message_get_packed_size(&req.base);
    CHECK(len <= sizeof wire);
    CHECK(protobuf_c_message_pack(&req.base, wire) == len);
    return len;
}

static Resp *last_resp;
static struct dispatch_reply reply;

static void free_last(void)
{
    if (last_resp != NULL)
        protobuf_c_message_free_unpacked(&last_resp->base, NULL);
    last_resp = NULL;
}

/* Sends raw bytes; returns the unpacked response when the outcome is DISPATCH_RESPOND. */
static Resp *send_bytes(struct dispatch_stream *st, const uint8_t *msg, size_t len)
{
    free_last();
    dispatch_handle(st, msg, len, &reply);
    if (reply.outcome == DISPATCH_RESPOND) {
        CHECK(reply.data != NULL && reply.len > 0);
        last_resp = envoy__service__ext_proc__v3__processing_response__unpack(NULL, reply.len,
                                                                               reply.data);
        CHECK(last_resp != NULL);
    }
    return last_resp;
}

static Resp *send(struct dispatch_stream *st, const struct req *r)
{
    size_t len = build(r);
    return send_bytes(st, wire, len);
}

/* The CommonResponse of a headers or body reply (NULL when it has none). */
static CommonResponse *common(const Resp *r)
{
    switch (r->response_case) {
    case RESP(REQUEST_HEADERS): return r->request_headers->response;
    case RESP(RESPONSE_HEADERS): return r->response_headers->response;
    case RESP(REQUEST_BODY): return r->request_body->response;
    case RESP(RESPONSE_BODY): return r->response_body->response;
    default: return NULL;
    }
}

/* The value of set header `name` in hm, as a NUL-terminated copy (static buffer). */
static const char *set_value(const HeaderMutation *hm, const char *name)
{
    static char buf[1024];
    if (hm == NULL)
        return NULL;
    for (size_t i = 0; i < hm->n_set_headers; i++) {
        const HeaderValue *h = hm->set_headers[i]->header;
        if (strcmp(h->key, name) == 0) {
            CHECK(h->raw_value.len < sizeof buf);
            memcpy(buf, h->raw_value.data, h->raw_value.len);
            buf[h->raw_value.len] = '\0';
            return buf;
        }
    }
    return NULL;
}

static bool reply_is(const uint8_t *bytes, size_t n)
{
    return reply.outcome == DISPATCH_RESPOND && reply.len == n && memcmp(reply.data, bytes, n) == 0;
}

/* Checks a failure reply: status and exact message. */
static void check_fail(int status, const char *message, int line)
{
    if (reply.outcome != DISPATCH_FAIL || reply.status != status ||
        strcmp(reply.message, message) != 0) {
        fprintf(stderr, "line %d: expected status %d \"%s\", got outcome %d status %d \"%s\"\n",
                line, status, message, reply.outcome, reply.status,
                reply.message ? reply.message : "(null)");
    }
    CHECK(reply.outcome == DISPATCH_FAIL);
    CHECK(reply.status == status);
    CHECK_STR(reply.message, message);
}
#define CHECK_FAIL(status, message) check_fail(status, message, __LINE__)

/* ---- tests ------------------------------------------------------------------------------ */

static const char *const no_headers[] = {NULL};

static void test_basic_example(void)
{
    const char *src = getenv("LUACALLOUT_SRC");
    char path[1024], err[512];
    snprintf(path, sizeof path, "%s/examples/basic.lua", src ? src : ".");
    struct vm *s = open_vm(path, err, sizeof err);
    if (s == NULL)
        fprintf(stderr, "%s\n", err);
    CHECK(s != NULL);
    struct dispatch_stream *st = dispatch_stream_open(s, 1);
    CHECK(st != NULL);

    Resp *r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers});
    CHECK(r != NULL && r->response_case == RESP(REQUEST_HEADERS));
    CommonResponse *cr = common(r);
    CHECK(cr != NULL && cr->clear_route_cache);
    CHECK(cr->status == ENVOY__SERVICE__EXT_PROC__V3__COMMON_RESPONSE__RESPONSE_STATUS__CONTINUE);
    CHECK(cr->body_mutation == NULL);
    HeaderMutation *hm = cr->header_mutation;
    CHECK(hm != NULL && hm->n_set_headers == 3);
    const char *want[] = {":authority", "service-extensions.com", ":path", "/",
                          "header-request", "request"};
    for (size_t i = 0; i < 3; i++) {
        HeaderValueOption *o = hm->set_headers[i];
        CHECK_STR(o->header->key, want[2 * i]);
        CHECK_BYTES(o->header->raw_value, want[2 * i + 1], strlen(want[2 * i + 1]));
        CHECK(o->header->value == NULL || o->header->value[0] == '\0'); /* raw_value only */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
        CHECK(o->append == NULL && o->append_action == 0);  /* as the Python SDK sends */
#pragma GCC diagnostic pop
    }
    CHECK(hm->n_remove_headers == 1);
    CHECK_STR(hm->remove_headers[0], "foo");

    /* {add={{"hello","service-extensions"}}}: exact bytes, every length prefix included */
    static const uint8_t rh[] = {
        0x12, 0x23, 0x0a, 0x21, 0x12, 0x1f, 0x0a, 0x1d, 0x0a, 0x1b, 0x0a, 0x05, 'h', 'e', 'l',
        'l', 'o', 0x1a, 0x12, 's', 'e', 'r', 'v', 'i', 'c', 'e', '-', 'e', 'x', 't', 'e', 'n',
        's', 'i', 'o', 'n', 's'};
    send(st, &(struct req){.phase = PBCONV_RESPONSE_HEADERS, .kv = no_headers});
    CHECK(reply_is(rh, sizeof rh));

    r = send(st, &(struct req){.phase = PBCONV_REQUEST_BODY, .body = "x", .body_len = 1});
    CHECK(r != NULL && r->response_case == RESP(REQUEST_BODY));
    cr = common(r);
    CHECK(cr != NULL && cr->body_mutation != NULL && cr->header_mutation == NULL);
    CHECK(cr->body_mutation->mutation_case == ENVOY__SERVICE__EXT_PROC__V3__BODY_MUTATION__MUTATION_BODY);
    CHECK_BYTES(cr->body_mutation->body, "replaced-body", 13);
    CHECK(!cr->clear_route_cache);

    /* {clear_body=true}: 22 06 0a 04 1a 02 10 01 */
    static const uint8_t cb[] = {0x22, 0x06, 0x0a, 0x04, 0x1a, 0x02, 0x10, 0x01};
    send(st, &(struct req){.phase = PBCONV_RESPONSE_BODY});
    CHECK(reply_is(cb, sizeof cb));

    /* no trailer handlers: the empty response of the phase's own type */
    static const uint8_t rqt[] = {0x2a, 0x00}, rst[] = {0x32, 0x00};
    send(st, &(struct req){.phase = PBCONV_REQUEST_TRAILERS, .kv = no_headers});
    CHECK(reply_is(rqt, 2));
    send(st, &(struct req){.phase = PBCONV_RESPONSE_TRAILERS, .kv = no_headers});
    CHECK(reply_is(rst, 2));
    dispatch_stream_close(st);
    vm_close(s);
}

/* nil, {}, a missing handler, a handler that is not a function, and flags that are off
 * all mean "continue": the empty message of the phase's type, nothing more. */
static void test_empty_results(void)
{
    static const char *const srcs[] = {
        "function on_request_headers() end function on_response_headers() return nil end\n"
        "function on_request_body() return {} end function on_response_body() end\n"
        "function on_request_trailers() return {} end function on_response_trailers() end\n",
        "on_request_headers = 5 on_request_body = 'x'\n"
        "function on_response_trailers() end  -- a script must define one handler\n",
        "function on_request_headers() return {clear_route_cache = false, add = {}, remove = {},"
        " status = 'CONTINUE'} end\n"
        "function on_request_body() return {clear_body = false, deny = false} end\n"
        "function on_request_trailers() return {add = {}, remove = {}} end\n",
    };
    for (size_t k = 0; k < sizeof srcs / sizeof srcs[0]; k++) {
        struct vm *s = load(srcs[k]);
        struct dispatch_stream *st = dispatch_stream_open(s, 2);
        for (int p = 0; p < PBCONV_PHASE_COUNT; p++) {
            send(st, &(struct req){.phase = (enum pbconv_phase)p, .kv = no_headers});
            const uint8_t want[] = {(uint8_t)((p + 1) << 3 | 2), 0x00};
            CHECK(reply_is(want, 2));
        }
        dispatch_stream_close(st);
        vm_close(s);
    }
}

static void test_headers_object(void)
{
    struct vm *s = load(
        "function on_request_headers(h, ctx)\n"
        "  local names = {}\n"
        "  for i, p in ipairs(h) do names[i] = p[1] .. '=' .. p[2] end\n"
        "  return { add = {\n"
        "    {'n', #h}, {'list', table.concat(names, ';')},\n"
        "    {'get', h:get('X-FOO')}, {'get-miss', tostring(h:get('nope'))},\n"
        "    {'all', table.concat(h:get_all('x-Foo'), ',')}, {'all-miss', #h:get_all('nope')},\n"
        "    {'has', tostring(h:has('X-Foo'))}, {'has-miss', tostring(h:has('nope'))},\n"
        "    {'hasv', tostring(h:has('x-foo', 'b'))}, {'hasv-miss', tostring(h:has('x-foo', 'B'))},\n"
        "    {'eos', tostring(h.end_of_stream)}, {'type', type(h.get)},\n"
        "  } }\n"
        "end\n"
        "function on_request_trailers(t)\n"
        "  return { add = { {'n', #t}, {'v', t:get('T')}, {'eos', tostring(t.end_of_stream)} } }\n"
        "end\n");
    struct dispatch_stream *st = dispatch_stream_open(s, 3);
    static const char *const kv[] = {"x-foo", "a", "X-Up", "u", "x-foo", "b", "other", "o"};
    Resp *r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = kv, .n = 4, .eos = true});
    CHECK(r != NULL);
    HeaderMutation *hm = common(r)->header_mutation;
    CHECK_STR(set_value(hm, "n"), "4");
    CHECK_STR(set_value(hm, "list"), "x-foo=a;x-up=u;x-foo=b;other=o"); /* order, dups, lower */
    CHECK_STR(set_value(hm, "get"), "a");
    CHECK_STR(set_value(hm, "get-miss"), "nil");
    CHECK_STR(set_value(hm, "all"), "a,b");
    CHECK_STR(set_value(hm, "all-miss"), "0");
    CHECK_STR(set_value(hm, "has"), "true");
    CHECK_STR(set_value(hm, "has-miss"), "false");
    CHECK_STR(set_value(hm, "hasv"), "true");
    CHECK_STR(set_value(hm, "hasv-miss"), "false");
    CHECK_STR(set_value(hm, "eos"), "true");
    CHECK_STR(set_value(hm, "type"), "function");

    r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = kv, .n = 1});
    CHECK_STR(set_value(common(r)->header_mutation, "eos"), "false");

    /* older Envoys put the value in `value`; it is used when raw_value is empty */
    r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = kv, .n = 4, .old_value = true});
    CHECK_STR(set_value(common(r)->header_mutation, "list"), "x-foo=a;x-up=u;x-foo=b;other=o");

    /* both set: raw_value wins */
    Req req = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__INIT;
    Envoy__Service__ExtProc__V3__HttpHeaders hh;   /* __init: the macro names deprecated fields */
    envoy__service__ext_proc__v3__http_headers__init(&hh);
    Envoy__Config__Core__V3__HeaderMap map = ENVOY__CONFIG__CORE__V3__HEADER_MAP__INIT;
    HeaderValue hv = ENVOY__CONFIG__CORE__V3__HEADER_VALUE__INIT, *hvp = &hv;
    hv.key = "x-foo";
    hv.value = "old";
    hv.raw_value.data = (uint8_t *)"raw";
    hv.raw_value.len = 3;
    map.n_headers = 1;
    map.headers = &hvp;
    hh.headers = &map;
    req.request_case = 2;
    req.request_headers = &hh;
    size_t len = protobuf_c_message_pack(&req.base, wire);
    r = send_bytes(st, wire, len);
    CHECK_STR(set_value(common(r)->header_mutation, "get"), "raw");

    /* trailers: same object, no end_of_stream */
    static const char *const tkv[] = {"t", "tv"};
    r = send(st, &(struct req){.phase = PBCONV_REQUEST_TRAILERS, .kv = tkv, .n = 1});
    CHECK(r != NULL && r->response_case == RESP(REQUEST_TRAILERS));
    hm = r->request_trailers->header_mutation;
    CHECK_STR(set_value(hm, "n"), "1");
    CHECK_STR(set_value(hm, "v"), "tv");
    CHECK_STR(set_value(hm, "eos"), "nil");
    dispatch_stream_close(st);
    vm_close(s);
}

static void test_binary_body(void)
{
    struct vm *s = load(
        "function on_request_body(b)\n"
        "  return { body = b.body .. '\\0z', add = { {'len', #b.body},\n"
        "           {'eos', tostring(b.end_of_stream)} } }\n"
        "end\n"
        "function on_response_body(b) return { body = '' } end\n");
    struct dispatch_stream *st = dispatch_stream_open(s, 4);
    static const char body[] = {'a', 0, 'b', 0, (char)0xff, 0};
    Resp *r = send(st, &(struct req){.phase = PBCONV_REQUEST_BODY, .body = body,
                                     .body_len = sizeof body, .eos = true});
    CHECK(r != NULL);
    CommonResponse *cr = common(r);
    static const char want[] = {'a', 0, 'b', 0, (char)0xff, 0, 0, 'z'};
    CHECK_BYTES(cr->body_mutation->body, want, sizeof want);
    CHECK_STR(set_value(cr->header_mutation, "len"), "6");
    CHECK_STR(set_value(cr->header_mutation, "eos"), "true");

    /* an empty replacement body is still a replacement: body_mutation { body: "" } */
    r = send(st, &(struct req){.phase = PBCONV_RESPONSE_BODY});
    cr = common(r);
    CHECK(cr != NULL && cr->body_mutation != NULL);
    CHECK(cr->body_mutation->mutation_case == ENVOY__SERVICE__EXT_PROC__V3__BODY_MUTATION__MUTATION_BODY);
    CHECK(cr->body_mutation->body.len == 0);
    dispatch_stream_close(st);
    vm_close(s);
}

static void test_ctx_state(void)
{
    struct vm *s = load(
        "function on_request_headers(h, ctx)\n"
        "  ctx.state.n = (ctx.state.n or 0) + 1\n"
        "  return { add = { {'n', ctx.state.n}, {'phase', ctx.phase}, {'id', ctx.stream_id} } }\n"
        "end\n"
        "function on_response_headers(h, ctx)\n"
        "  return { add = { {'n', ctx.state.n or 'none'}, {'phase', ctx.phase} } }\n"
        "end\n");
    struct dispatch_stream *a = dispatch_stream_open(s, 41), *b = dispatch_stream_open(s, 42);
    CHECK(a != NULL && b != NULL);
    const struct req rq = {.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers};
    const struct req rs = {.phase = PBCONV_RESPONSE_HEADERS, .kv = no_headers};
    Resp *r = send(a, &rq);
    CHECK_STR(set_value(common(r)->header_mutation, "n"), "1");
    CHECK_STR(set_value(common(r)->header_mutation, "phase"), "request_headers");
    CHECK_STR(set_value(common(r)->header_mutation, "id"), "41");
    r = send(a, &rq);
    CHECK_STR(set_value(common(r)->header_mutation, "n"), "2");
    r = send(b, &rs);  /* b has its own, empty state */
    CHECK_STR(set_value(common(r)->header_mutation, "n"), "none");
    CHECK_STR(set_value(common(r)->header_mutation, "phase"), "response_headers");
    r = send(b, &rq);
    CHECK_STR(set_value(common(r)->header_mutation, "n"), "1");
    CHECK_STR(set_value(common(r)->header_mutation, "id"), "42");
    r = send(a, &rs);  /* a request phase left data for a response phase */
    CHECK_STR(set_value(common(r)->header_mutation, "n"), "2");
    dispatch_stream_close(a);
    dispatch_stream_close(b);
    /* a new stream after close starts empty even if it reuses the registry slot */
    struct dispatch_stream *c = dispatch_stream_open(s, 43);
    r = send(c, &rs);
    CHECK_STR(set_value(common(r)->header_mutation, "n"), "none");
    dispatch_stream_close(c);
    vm_close(s);
}

static void test_add_forms(void)
{
    struct vm *s = load(
        "function on_request_headers()\n"
        "  return { add = { zeta = '1', alpha = '2', mid = 3, f = 2.5, g = 10 / 2, big = 2^70,\n"
        "           h = 2^53 } }\n"
        "end\n"
        "function on_response_headers()\n"
        "  return { add = { {'z', '1'}, {'a', '2'}, {'z', '3'}, {'m', -7} } }\n"
        "end\n");
    struct dispatch_stream *st = dispatch_stream_open(s, 5);
    Resp *r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers});
    HeaderMutation *hm = common(r)->header_mutation;
    static const char *const sorted[] = {"alpha", "2", "big", "1.1805916207174e+21", "f", "2.5",
                                         "g", "5", "h", "9007199254740992", "mid", "3",
                                         "zeta", "1"};
    CHECK(hm->n_set_headers == 7);
    for (size_t i = 0; i < 7; i++) {
        CHECK_STR(hm->set_headers[i]->header->key, sorted[2 * i]);
        CHECK_BYTES(hm->set_headers[i]->header->raw_value, sorted[2 * i + 1],
                    strlen(sorted[2 * i + 1]));
    }
    r = send(st, &(struct req){.phase = PBCONV_RESPONSE_HEADERS, .kv = no_headers});
    hm = common(r)->header_mutation;
    static const char *const listed[] = {"z", "1", "a", "2", "z", "3", "m", "-7"};
    CHECK(hm->n_set_headers == 4);
    for (size_t i = 0; i < 4; i++) {
        CHECK_STR(hm->set_headers[i]->header->key, listed[2 * i]);
        CHECK_BYTES(hm->set_headers[i]->header->raw_value, listed[2 * i + 1],
                    strlen(listed[2 * i + 1]));
    }
    dispatch_stream_close(st);
    vm_close(s);
}

static void test_return_keys(void)
{
    struct vm *s = load(
        "function on_request_headers()\n"
        "  return { status = 'CONTINUE_AND_REPLACE', body = 'new', remove = {'a', 'b'} }\n"
        "end\n"
        "function on_response_headers() return { clear_route_cache = true } end\n"
        "function on_request_body()\n"
        "  return { status = 'CONTINUE_AND_REPLACE', add = { x = 'y' }, clear_route_cache = true,"
        " clear_body = true }\n"
        "end\n"
        "function on_response_body() return { remove = {'gone'} } end\n"
        "function on_request_trailers() return { add = { {'t', 'v'} }, remove = {'r'} } end\n"
        "function on_response_trailers() return { immediate = {} } end\n");
    struct dispatch_stream *st = dispatch_stream_open(s, 6);

    Resp *r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers});
    CommonResponse *cr = common(r);
    CHECK(cr->status == ENVOY__SERVICE__EXT_PROC__V3__COMMON_RESPONSE__RESPONSE_STATUS__CONTINUE_AND_REPLACE);
    CHECK_BYTES(cr->body_mutation->body, "new", 3);
    CHECK(cr->header_mutation->n_set_headers == 0 && cr->header_mutation->n_remove_headers == 2);
    CHECK_STR(cr->header_mutation->remove_headers[0], "a");
    CHECK_STR(cr->header_mutation->remove_headers[1], "b");
    CHECK(!cr->clear_route_cache);

    /* {clear_route_cache=true} sets only that flag: 12 04 0a 02 28 01 */
    static const uint8_t crc[] = {0x12, 0x04, 0x0a, 0x02, 0x28, 0x01};
    send(st, &(struct req){.phase = PBCONV_RESPONSE_HEADERS, .kv = no_headers});
    CHECK(reply_is(crc, sizeof crc));

    r = send(st, &(struct req){.phase = PBCONV_REQUEST_BODY});
    cr = common(r);
    CHECK(r->response_case == RESP(REQUEST_BODY));
    CHECK(cr->status == ENVOY__SERVICE__EXT_PROC__V3__COMMON_RESPONSE__RESPONSE_STATUS__CONTINUE_AND_REPLACE);
    CHECK(cr->clear_route_cache);
    CHECK(cr->body_mutation->mutation_case == ENVOY__SERVICE__EXT_PROC__V3__BODY_MUTATION__MUTATION_CLEAR_BODY);
    CHECK(cr->body_mutation->clear_body);
    CHECK_STR(set_value(cr->header_mutation, "x"), "y");

    r = send(st, &(struct req){.phase = PBCONV_RESPONSE_BODY});
    cr = common(r);
    CHECK(r->response_case == RESP(RESPONSE_BODY));
    CHECK(cr->body_mutation == NULL && cr->header_mutation->n_remove_headers == 1);
    CHECK_STR(cr->header_mutation->remove_headers[0], "gone");

    r = send(st, &(struct req){.phase = PBCONV_REQUEST_TRAILERS, .kv = no_headers});
    CHECK(r->response_case == RESP(REQUEST_TRAILERS));
    HeaderMutation *hm = r->request_trailers->header_mutation;
    CHECK(hm != NULL);
    CHECK_STR(set_value(hm, "t"), "v");
    CHECK(hm->n_remove_headers == 1);
    CHECK_STR(hm->remove_headers[0], "r");

    /* immediate = {} in a trailers phase: status 200, nothing else: 3a 05 0a 03 08 c8 01 */
    static const uint8_t imm[] = {0x3a, 0x05, 0x0a, 0x03, 0x08, 0xc8, 0x01};
    send(st, &(struct req){.phase = PBCONV_RESPONSE_TRAILERS, .kv = no_headers});
    CHECK(reply_is(imm, sizeof imm));
    dispatch_stream_close(st);
    vm_close(s);
}

static void test_immediate_and_deny(void)
{
    struct vm *s = load(
        "function on_request_headers(h)\n"
        "  if h:has('deny-true') then return { deny = true } end\n"
        "  if h:has('deny') then return { deny = h:get('deny') } end\n"
        "  if h:has('map') then return { immediate = { status = 302.0, headers = { location = '/x',"
        " b = 1 } } } end\n"
        "  return { immediate = { status = 403, headers = { {'x-why', 'no'}, {'x-n', 2} },\n"
        "    body = 'de\\0nied', details = 'blocked_by_lua', grpc_status = 7 } }\n"
        "end\n"
        "function on_request_body() return { deny = 'body no' } end\n");
    struct dispatch_stream *st = dispatch_stream_open(s, 7);
    Resp *r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers});
    CHECK(r != NULL && r->response_case == RESP(IMMEDIATE_RESPONSE));
    Envoy__Service__ExtProc__V3__ImmediateResponse *ir = r->immediate_response;
    CHECK(ir->status != NULL && ir->status->code == 403);
    CHECK(ir->headers != NULL && ir->headers->n_set_headers == 2 && ir->headers->n_remove_headers == 0);
    CHECK_STR(ir->headers->set_headers[0]->header->key, "x-why");
    CHECK_STR(set_value(ir->headers, "x-why"), "no");
    CHECK_STR(set_value(ir->headers, "x-n"), "2");
    CHECK_BYTES(ir->body, "de\0nied", 7);
    CHECK_STR(ir->details, "blocked_by_lua");
    CHECK(ir->grpc_status != NULL && ir->grpc_status->status == 7);
    CHECK(r->dynamic_metadata == NULL && r->mode_override == NULL);

    static const char *const map[] = {"map", "1"};
    r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = map, .n = 1});
    ir = r->immediate_response;
    CHECK(ir->status->code == 302);
    CHECK(ir->headers->n_set_headers == 2);
    CHECK_STR(ir->headers->set_headers[0]->header->key, "b"); /* map form: sorted */
    CHECK_STR(ir->headers->set_headers[1]->header->key, "location");
    CHECK(ir->grpc_status == NULL && ir->body.len == 0);
    CHECK(ir->details == NULL || ir->details[0] == '\0');

    static const char *const deny[] = {"deny", "go away"};
    CHECK(send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = deny, .n = 1}) == NULL);
    CHECK_FAIL(GRPC_STATUS_PERMISSION_DENIED, "go away");
    static const char *const deny_true[] = {"deny-true", "1"};
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = deny_true, .n = 1});
    CHECK_FAIL(GRPC_STATUS_PERMISSION_DENIED, "Callout DENIED.");
    send(st, &(struct req){.phase = PBCONV_REQUEST_BODY});
    CHECK_FAIL(GRPC_STATUS_PERMISSION_DENIED, "body no");
    dispatch_stream_close(st);
    vm_close(s);
}

/* A script whose on_request_headers (defined on line 1) returns `expr`; the expected
 * message is "<path>:1: on_request_headers returned ...". */
static void check_bad_return(const char *expr, enum pbconv_phase phase, const char *detail,
                             int line)
{
    char src[1024], want[1024];
    snprintf(src, sizeof src, "function %s() return %s end\n", pbconv_handler_name(phase), expr);
    struct vm *s = load(src);
    snprintf(want, sizeof want, "%s:1: %s (defined here) %s", last_path, pbconv_handler_name(phase), detail);
    struct dispatch_stream *st = dispatch_stream_open(s, 8);
    send(st, &(struct req){.phase = phase, .kv = no_headers});
    check_fail(GRPC_STATUS_INTERNAL, want, line);
    dispatch_stream_close(st);
    vm_close(s);
}
#define BAD(expr, phase, detail) check_bad_return(expr, phase, detail, __LINE__)
#define BADT(expr, detail) BAD(expr, PBCONV_REQUEST_HEADERS, "returned a bad table: " detail)

static void test_bad_returns(void)
{
    BAD("'x'", PBCONV_REQUEST_HEADERS, "returned a string, expected a table or nil");
    BAD("42", PBCONV_REQUEST_BODY, "returned a number, expected a table or nil");
    BAD("true", PBCONV_RESPONSE_TRAILERS, "returned a boolean, expected a table or nil");
    BADT("{ ad = {} }", "unknown key 'ad' (did you mean 'add'?)");
    BADT("{ {'a', 'b'} }", "unknown key [1]");
    BADT("{ [true] = 1 }", "unknown key [true]");
    BADT("{ add = 'x' }", "'add' must be a table, got string");
    BADT("{ remove = 'x' }", "'remove' must be a table, got string");
    BADT("{ clear_route_cache = 1 }", "'clear_route_cache' must be a boolean, got number");
    BADT("{ status = 1 }", "'status' must be a string, got number");
    BADT("{ status = 'STOP' }",
         "bad value for 'status': 'STOP' (expected \"CONTINUE\" or \"CONTINUE_AND_REPLACE\")");
    BADT("{ deny = 5 }", "'deny' must be a string or true, got number");
    BADT("{ immediate = true }", "'immediate' must be a table, got boolean");
    BADT("{ body = 'x' }", "'body' in a headers response needs status = \"CONTINUE_AND_REPLACE\"");
    BADT("{ body = 'x', status = 'CONTINUE' }",
         "'body' in a headers response needs status = \"CONTINUE_AND_REPLACE\"");
    BADT("{ clear_body = true }", "'clear_body' is not allowed in request_headers");
    BAD("{ body = 'x' }", PBCONV_REQUEST_TRAILERS,
        "returned a bad table: 'body' is not allowed in request_trailers");
    BAD("{ clear_route_cache = true }", PBCONV_RESPONSE_TRAILERS,
        "returned a bad table: 'clear_route_cache' is not allowed in response_trailers");
    BAD("{ status = 'CONTINUE' }", PBCONV_REQUEST_TRAILERS,
        "returned a bad table: 'status' is not allowed in request_trailers");
    BAD("{ body = 'x', clear_body = true }", PBCONV_REQUEST_BODY,
        "returned a bad table: 'body' and 'clear_body' cannot be combined");
    BAD("{ body = 1 }", PBCONV_REQUEST_BODY,
        "returned a bad table: 'body' must be a string, got number");
    BADT("{ deny = 'no', add = {} }", "'deny' cannot be combined with 'add'");
    BADT("{ immediate = {}, clear_route_cache = true }",
         "'immediate' cannot be combined with 'clear_route_cache'");
    BADT("{ immediate = { status = 42 } }",
         "bad value for 'immediate.status': 42 (expected an HTTP status 200-599)");
    BADT("{ immediate = { status = 600 } }",
         "bad value for 'immediate.status': 600 (expected an HTTP status 200-599)");
    BADT("{ immediate = { status = 200.5 } }",
         "bad value for 'immediate.status': 200.5 (expected an HTTP status 200-599)");
    BADT("{ immediate = { status = '403' } }", "'immediate.status' must be a number, got string");
    BADT("{ immediate = { grpc_status = -1 } }",
         "bad value for 'immediate.grpc_status': -1 (expected a gRPC status code 0-16)");
    BADT("{ immediate = { stauts = 403 } }",
         "unknown key 'immediate.stauts' (did you mean 'immediate.status'?)");
    BADT("{ immediate = { body = {} } }", "'immediate.body' must be a string, got table");
    BADT("{ immediate = { details = 'a\\0b' } }", "'immediate.details' contains a NUL byte");
    BADT("{ immediate = { headers = { {'a', {}} } } }",
         "'immediate.headers': value of 'a' is a table, expected a string or number");
    BADT("{ add = { {'a', 'b'}, c = 'd' } }",
         "'add' mixes {name, value} pairs with name = value entries");
    BADT("{ add = { [1] = {'a', 'b'}, [3] = {'c', 'd'} } }",
         "'add' is not a list: its keys are not 1..n");
    BADT("{ add = { 'a' } }", "'add' entry 1 is a string, expected a {name, value} pair");
    BADT("{ add = { {'a'} } }", "'add' entry 1 is not a {name, value} pair");
    BADT("{ add = { {1, 'b'} } }", "'add' entry 1: the name is a number, expected a string");
    BADT("{ add = { {'', 'b'} } }", "'add' entry 1: empty header name");
    BADT("{ add = { {'a\\0b', 'c'} } }", "'add': header name 'a' contains a NUL byte");
    BADT("{ add = { a = true } }", "'add': value of 'a' is a boolean, expected a string or number");
    BADT("{ add = { a = 0/0 } }", "'add': value of 'a' is not a finite number");
    BADT("{ add = { [2.5] = 'x' } }",
         "'add' has a key of type number; expected a list of {name, value} pairs or a map of "
         "name = value");
    BADT("{ remove = { 1 } }", "'remove' entry 1: the name is a number, expected a string");
    BADT("{ remove = { x = 'y' } }", "'remove' must be a list of header names");
    /* every string reaching a proto `string` field is UTF-8 (protobuf's parser refuses the
     * whole message otherwise), and header names are what Envoy's ext_proc accepts */
    BADT("{ add = { {'x-bad\\xff', 'v'} } }",
         "'add' entry 1: header name 'x-bad\\xff' is not valid UTF-8");
    BADT("{ add = { ['x-\\xc3\\x28'] = 'v' } }",
         "'add' entry 1: header name 'x-\\xc3(' is not valid UTF-8");
    BADT("{ remove = { 'ok', '\\xed\\xa0\\x80' } }",
         "'remove' entry 2: header name '\\xed\\xa0\\x80' is not valid UTF-8");
    BADT("{ immediate = { headers = { {'\\xff', 'v'} } } }",
         "'immediate.headers' entry 1: header name '\\xff' is not valid UTF-8");
    BADT("{ immediate = { details = 'x\\xff' } }", "'immediate.details' is not valid UTF-8");
    BADT("{ add = { {'a b', 'v'} } }",
         "'add' entry 1: header name 'a b' has ' ' at byte 2 (a header name is letters, digits "
         "and !#$%&'*+-.^_`|~ only; Envoy refuses the whole mutation otherwise)");
    BADT("{ remove = { 'caf\\xc3\\xa9' } }",
         "'remove' entry 1: header name 'caf\\xc3\\xa9' has '\\xc3' at byte 4 (a header name "
         "is letters, digits and !#$%&'*+-.^_`|~ only; Envoy refuses the whole mutation "
         "otherwise)");
    BADT("{ add = { {':Path', '/'} } }",
         "'add' entry 1: header name ':Path' has 'P' at byte 2 (a pseudo-header name is lower "
         "case)");
    BADT("{ add = { {':', '/'} } }",
         "'add' entry 1: header name ':' is ':' alone (a pseudo-header needs a name after the "
         "colon)");
    BADT("{ add = { {'x', 'v', append_acton = 'ADD_IF_ABSENT'} } }",
         "'add' entry 1 has an unknown key 'append_acton' (did you mean 'append_action'?) (a "
         "pair takes {name, value, append_action = ...})");
    BADT("{ clear = true }", "unknown key 'clear'");  /* two keys start so: no guess */
    BADT("{ add_headers = {} }", "unknown key 'add_headers' (did you mean 'add'?)");
    BADT("{ Immediate = {} }", "unknown key 'Immediate' (did you mean 'immediate'?)");
    BADT("{ xyz = 1 }", "unknown key 'xyz'");
}

/* What the handler may send: names Envoy accepts go through untouched. */
static void test_valid_names(void)
{
    struct vm *s = load(
        "function on_request_headers()\n"
        "  return { add = { {':path', '/x'}, {'X-Mixed_Case.1~', 'caf\\xc3\\xa9'} },\n"
        "           remove = { \"!#$%&'*+-.^_`|~\" } }\n"
        "end\n");
    struct dispatch_stream *st = dispatch_stream_open(s, 9);
    Resp *r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers});
    CHECK(r != NULL);
    HeaderMutation *hm = common(r)->header_mutation;
    CHECK(hm->n_set_headers == 2 && hm->n_remove_headers == 1);
    CHECK_STR(hm->set_headers[0]->header->key, ":path");
    CHECK_STR(hm->set_headers[1]->header->key, "X-Mixed_Case.1~");
    CHECK_BYTES(hm->set_headers[1]->header->raw_value, "caf\xc3\xa9", 5);
    CHECK_STR(hm->remove_headers[0], "!#$%&'*+-.^_`|~");
    dispatch_stream_close(st);
    vm_close(s);
}

/* ---- the whole protocol (issue 3) ------------------------------------------------------- */

#define BODY_MODE(x) ENVOY__EXTENSIONS__FILTERS__HTTP__EXT_PROC__V3__PROCESSING_MODE__BODY_SEND_MODE__##x
#define HDR_MODE(x) ENVOY__EXTENSIONS__FILTERS__HTTP__EXT_PROC__V3__PROCESSING_MODE__HEADER_SEND_MODE__##x
#define ACTION(x) ENVOY__CONFIG__CORE__V3__HEADER_VALUE_OPTION__HEADER_APPEND_ACTION__##x

/* Message i of the last reply (several in FULL_DUPLEX_STREAMED mode), unpacked; freed by
 * the next call with the same slot. */
static Resp *nth(size_t i)
{
    static Resp *held[8];
    CHECK(i < 8);
    CHECK(reply.outcome == DISPATCH_RESPOND && i < reply.count);
    size_t at = 0;
    for (size_t k = 0; k < i; k++)
        at += reply.lens[k];
    if (held[i] != NULL)
        protobuf_c_message_free_unpacked(&held[i]->base, NULL);
    held[i] = envoy__service__ext_proc__v3__processing_response__unpack(NULL, reply.lens[i],
                                                                         reply.data + at);
    CHECK(held[i] != NULL);
    return held[i];
}

/* The append flag and action of set header `name` in hm: -1 when append is unset. */
static int append_of(const HeaderMutation *hm, const char *name, int *action)
{
    for (size_t i = 0; i < hm->n_set_headers; i++) {
        const HeaderValueOption *o = hm->set_headers[i];
        if (strcmp(o->header->key, name) != 0)
            continue;
        *action = (int)o->append_action;
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
        return o->append == NULL ? -1 : (int)o->append->value;
#pragma GCC diagnostic pop
    }
    CHECK(!"header not found");
    return -2;
}
#define CHECK_APPEND(hm, name, want_append, want_action)                                  \
    do {                                                                                  \
        int act_ = -1;                                                                    \
        CHECK(append_of(hm, name, &act_) == (want_append));                               \
        CHECK(act_ == (want_action));                                                     \
    } while (0)

static void test_append_actions(void)
{
    struct vm *s = load(
        "function on_request_headers()\n"
        "  return { add = { {'a', '1', append_action = 'APPEND_IF_EXISTS_OR_ADD'},\n"
        "                   {'b', '2', append_action = 'ADD_IF_ABSENT'},\n"
        "                   {'c', '3', append_action = 'OVERWRITE_IF_EXISTS_OR_ADD'},\n"
        "                   {'d', '4', append_action = 'OVERWRITE_IF_EXISTS'},\n"
        "                   {'e', '5'} } }\n"
        "end\n"
        "function on_response_headers()\n"
        "  return { append_action = 'APPEND_IF_EXISTS_OR_ADD',\n"
        "           add = { {'x', '1'}, {'y', '2', append_action = 'OVERWRITE_IF_EXISTS'} } }\n"
        "end\n"
        "function on_request_body() return { append_action = 'ADD_IF_ABSENT', add = { m = 1, n = 2 } } end\n"
        "function on_response_body() return { append_action = 'OVERWRITE_IF_EXISTS' } end\n"
        "function on_request_trailers() return { add = { {'t', 'v', append_action = 'APPEND_IF_EXISTS_OR_ADD'} },"
        " append_action = 'ADD_IF_ABSENT' } end\n"
        "function on_response_trailers()\n"
        "  return { immediate = { status = 201, append_action = 'ADD_IF_ABSENT',\n"
        "    headers = { {'i', '1'}, {'j', '2', append_action = 'APPEND_IF_EXISTS_OR_ADD'} } } }\n"
        "end\n");
    struct dispatch_stream *st = dispatch_stream_open(s, 20);
    Resp *r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers});
    HeaderMutation *hm = common(r)->header_mutation;
    CHECK(hm->n_set_headers == 5);
    /* append = true only with APPEND_IF_EXISTS_OR_ADD (whose enum value is 0) */
    CHECK_APPEND(hm, "a", 1, ACTION(APPEND_IF_EXISTS_OR_ADD));
    CHECK_APPEND(hm, "b", -1, ACTION(ADD_IF_ABSENT));
    CHECK_APPEND(hm, "c", -1, ACTION(OVERWRITE_IF_EXISTS_OR_ADD));
    CHECK_APPEND(hm, "d", -1, ACTION(OVERWRITE_IF_EXISTS));
    CHECK_APPEND(hm, "e", -1, 0);
    CHECK(ACTION(APPEND_IF_EXISTS_OR_ADD) == 0 && ACTION(OVERWRITE_IF_EXISTS) == 3);

    /* the list's action applies to entries without their own */
    r = send(st, &(struct req){.phase = PBCONV_RESPONSE_HEADERS, .kv = no_headers});
    hm = common(r)->header_mutation;
    CHECK_APPEND(hm, "x", 1, ACTION(APPEND_IF_EXISTS_OR_ADD));
    CHECK_APPEND(hm, "y", -1, ACTION(OVERWRITE_IF_EXISTS));

    /* map form: the list's action for all */
    r = send(st, &(struct req){.phase = PBCONV_REQUEST_BODY});
    hm = common(r)->header_mutation;
    CHECK_APPEND(hm, "m", -1, ACTION(ADD_IF_ABSENT));
    CHECK_APPEND(hm, "n", -1, ACTION(ADD_IF_ABSENT));

    /* an action without `add` is accepted and sends nothing */
    static const uint8_t rsb[] = {0x22, 0x00};
    send(st, &(struct req){.phase = PBCONV_RESPONSE_BODY});
    CHECK(reply_is(rsb, 2));

    r = send(st, &(struct req){.phase = PBCONV_REQUEST_TRAILERS, .kv = no_headers});
    CHECK_APPEND(r->request_trailers->header_mutation, "t", 1, ACTION(APPEND_IF_EXISTS_OR_ADD));

    r = send(st, &(struct req){.phase = PBCONV_RESPONSE_TRAILERS, .kv = no_headers});
    CHECK(r->response_case == RESP(IMMEDIATE_RESPONSE));
    CHECK(r->immediate_response->status->code == 201);
    hm = r->immediate_response->headers;
    CHECK_APPEND(hm, "i", -1, ACTION(ADD_IF_ABSENT));
    CHECK_APPEND(hm, "j", 1, ACTION(APPEND_IF_EXISTS_OR_ADD));

    /* the exact wire bytes of {'a','1',append_action='APPEND_IF_EXISTS_OR_ADD'}: append
     * (field 2) = BoolValue{true}, and append_action 0 is proto3's default, so absent */
    dispatch_stream_close(st);
    vm_close(s);
    s = load("function on_request_trailers() return { add = { {'a', '1', append_action ="
             " 'APPEND_IF_EXISTS_OR_ADD'} } } end\n"
             "function on_response_trailers() return { add = { {'a', '1', append_action ="
             " 'ADD_IF_ABSENT'} } } end\n");
    st = dispatch_stream_open(s, 21);
    static const uint8_t app[] = {0x2a, 0x10, 0x0a, 0x0e, 0x0a, 0x0c, 0x0a, 0x06, 0x0a, 0x01,
                                  'a', 0x1a, 0x01, '1', 0x12, 0x02, 0x08, 0x01};
    send(st, &(struct req){.phase = PBCONV_REQUEST_TRAILERS, .kv = no_headers});
    CHECK(reply_is(app, sizeof app));
    static const uint8_t abs_[] = {0x32, 0x0e, 0x0a, 0x0c, 0x0a, 0x0a, 0x0a, 0x06, 0x0a, 0x01,
                                   'a', 0x1a, 0x01, '1', 0x18, 0x01};
    send(st, &(struct req){.phase = PBCONV_RESPONSE_TRAILERS, .kv = no_headers});
    CHECK(reply_is(abs_, sizeof abs_));
    dispatch_stream_close(st);
    vm_close(s);
}

static void test_mode_override_and_timeout(void)
{
    struct vm *s = load(
        "function on_request_headers()\n"
        "  return { mode_override = { request_header_mode = 'SEND', response_header_mode = 'SKIP',\n"
        "    request_body_mode = 'STREAMED', response_body_mode = 'BUFFERED_PARTIAL',\n"
        "    request_trailer_mode = 'DEFAULT', response_trailer_mode = 'SEND' },\n"
        "    override_message_timeout = 1.5, add = { {'k', 'v'} } }\n"
        "end\n"
        "function on_response_headers() return { mode_override = { response_body_mode = 'FULL_DUPLEX_STREAMED' },"
        " override_message_timeout = 2 } end\n"
        "function on_request_body() return { override_message_timeout = 0.001, mode_override = {} } end\n"
        "function on_response_body() return { override_message_timeout = 3600.25, immediate = { status = 500 } } end\n"
        "function on_request_trailers() return { mode_override = { response_body_mode = 'BUFFERED' } } end\n");
    struct dispatch_stream *st = dispatch_stream_open(s, 22);
    Resp *r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers});
    CHECK(r->response_case == RESP(REQUEST_HEADERS));
    CHECK_STR(set_value(common(r)->header_mutation, "k"), "v");
    Envoy__Extensions__Filters__Http__ExtProc__V3__ProcessingMode *pm = r->mode_override;
    CHECK(pm != NULL);
    CHECK(pm->request_header_mode == HDR_MODE(SEND));
    CHECK(pm->response_header_mode == HDR_MODE(SKIP));
    CHECK(pm->request_body_mode == BODY_MODE(STREAMED));
    CHECK(pm->response_body_mode == BODY_MODE(BUFFERED_PARTIAL));
    CHECK(pm->request_trailer_mode == HDR_MODE(DEFAULT));
    CHECK(pm->response_trailer_mode == HDR_MODE(SEND));
    CHECK(r->override_message_timeout != NULL);
    CHECK(r->override_message_timeout->seconds == 1 && r->override_message_timeout->nanos == 500000000);
    CHECK(r->dynamic_metadata == NULL);

    r = send(st, &(struct req){.phase = PBCONV_RESPONSE_HEADERS, .kv = no_headers});
    CHECK(r->mode_override->response_body_mode == BODY_MODE(FULL_DUPLEX_STREAMED));
    CHECK(r->mode_override->request_body_mode == BODY_MODE(NONE));
    CHECK(r->override_message_timeout->seconds == 2 && r->override_message_timeout->nanos == 0);

    r = send(st, &(struct req){.phase = PBCONV_REQUEST_BODY});
    CHECK(r->response_case == RESP(REQUEST_BODY));
    CHECK(r->override_message_timeout->seconds == 0 && r->override_message_timeout->nanos == 1000000);
    /* mode_override = {} is sent: an all-default ProcessingMode */
    CHECK(r->mode_override != NULL && r->mode_override->request_body_mode == 0);

    r = send(st, &(struct req){.phase = PBCONV_RESPONSE_BODY});
    CHECK(r->response_case == RESP(IMMEDIATE_RESPONSE));
    CHECK(r->immediate_response->status->code == 500);
    CHECK(r->override_message_timeout->seconds == 3600 && r->override_message_timeout->nanos == 250000000);

    r = send(st, &(struct req){.phase = PBCONV_REQUEST_TRAILERS, .kv = no_headers});
    CHECK(r->response_case == RESP(REQUEST_TRAILERS));
    CHECK(r->mode_override->response_body_mode == BODY_MODE(BUFFERED));
    dispatch_stream_close(st);
    vm_close(s);
}

static void test_dynamic_metadata(void)
{
    struct vm *s = load(
        "function on_request_headers()\n"
        "  return { dynamic_metadata = { ['my.ns'] = { s = 'v', n = 1.5, i = 3, t = true, f = false,\n"
        "    list = { 1, 'two', { x = 'y' } }, none = callout.null, nested = { deep = { k = 'v' } } } } }\n"
        "end\n"
        "function on_response_headers() return { dynamic_metadata = {}, immediate = { status = 404 } } end\n"
        "function on_request_trailers() return { dynamic_metadata = { a = { b = 'c' } } } end\n"
        "function on_request_body() return { dynamic_metadata = { a = 'x' }, deny = 'no' } end\n");
    struct dispatch_stream *st = dispatch_stream_open(s, 23);
    Resp *r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers});
    CHECK(r->response_case == RESP(REQUEST_HEADERS));
    Google__Protobuf__Struct *dm = r->dynamic_metadata;
    CHECK(dm != NULL && dm->n_fields == 1);
    CHECK_STR(dm->fields[0]->key, "my.ns");
    Google__Protobuf__Value *ns = dm->fields[0]->value;
    CHECK(ns->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_STRUCT_VALUE);
    int seen = 0;
    for (size_t i = 0; i < ns->struct_value->n_fields; i++) {
        const char *k = ns->struct_value->fields[i]->key;
        Google__Protobuf__Value *v = ns->struct_value->fields[i]->value;
        if (strcmp(k, "s") == 0) {
            CHECK(v->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE);
            CHECK_STR(v->string_value, "v");
        } else if (strcmp(k, "n") == 0) {
            CHECK(v->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_NUMBER_VALUE && v->number_value == 1.5);
        } else if (strcmp(k, "i") == 0) {
            CHECK(v->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_NUMBER_VALUE && v->number_value == 3);
        } else if (strcmp(k, "t") == 0) {
            CHECK(v->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_BOOL_VALUE && v->bool_value);
        } else if (strcmp(k, "f") == 0) {
            CHECK(v->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_BOOL_VALUE && !v->bool_value);
        } else if (strcmp(k, "none") == 0) {
            CHECK(v->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_NULL_VALUE);
        } else if (strcmp(k, "list") == 0) {
            CHECK(v->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_LIST_VALUE);
            CHECK(v->list_value->n_values == 3);
            CHECK(v->list_value->values[0]->number_value == 1);
            CHECK_STR(v->list_value->values[1]->string_value, "two");
            CHECK(v->list_value->values[2]->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_STRUCT_VALUE);
        } else if (strcmp(k, "nested") == 0) {
            CHECK(v->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_STRUCT_VALUE);
            CHECK_STR(v->struct_value->fields[0]->key, "deep");
        } else {
            CHECK(!"unexpected key");
        }
        seen++;
    }
    CHECK(seen == 8);

    /* with an immediate response; an empty table is an empty (present) Struct */
    r = send(st, &(struct req){.phase = PBCONV_RESPONSE_HEADERS, .kv = no_headers});
    CHECK(r->response_case == RESP(IMMEDIATE_RESPONSE) && r->immediate_response->status->code == 404);
    CHECK(r->dynamic_metadata != NULL && r->dynamic_metadata->n_fields == 0);
    static const uint8_t imm[] = {0x3a, 0x05, 0x0a, 0x03, 0x08, 0x94, 0x03, 0x42, 0x00};
    CHECK(reply_is(imm, sizeof imm));

    r = send(st, &(struct req){.phase = PBCONV_REQUEST_TRAILERS, .kv = no_headers});
    CHECK(r->response_case == RESP(REQUEST_TRAILERS) && r->dynamic_metadata->n_fields == 1);

    send(st, &(struct req){.phase = PBCONV_REQUEST_BODY});
    char want[512];
    snprintf(want, sizeof want, "%s:7: on_request_body (defined here) returned a bad table: 'deny' cannot be "
             "combined with 'dynamic_metadata'", last_path);
    CHECK_FAIL(GRPC_STATUS_INTERNAL, want);
    dispatch_stream_close(st);
    vm_close(s);
}

static void test_immediate_every_phase(void)
{
    struct vm *s = load(
        "local function imm(h, ctx)\n"
        "  return { immediate = { status = 599, headers = { {'x-phase', ctx.phase} },\n"
        "    append_action = 'OVERWRITE_IF_EXISTS_OR_ADD', body = 'b:' .. ctx.phase,\n"
        "    details = 'd_' .. ctx.phase, grpc_status = 16 } }\n"
        "end\n"
        "on_request_headers, on_response_headers, on_request_body = imm, imm, imm\n"
        "on_response_body, on_request_trailers, on_response_trailers = imm, imm, imm\n");
    struct dispatch_stream *st = dispatch_stream_open(s, 24);
    for (int p = 0; p < PBCONV_PHASE_COUNT; p++) {
        Resp *r = send(st, &(struct req){.phase = (enum pbconv_phase)p, .kv = no_headers});
        CHECK(r != NULL && r->response_case == RESP(IMMEDIATE_RESPONSE));
        Envoy__Service__ExtProc__V3__ImmediateResponse *ir = r->immediate_response;
        const char *name = pbconv_phase_name((enum pbconv_phase)p);
        char b[64];
        CHECK(ir->status->code == 599);
        CHECK_STR(set_value(ir->headers, "x-phase"), name);
        CHECK_APPEND(ir->headers, "x-phase", -1, ACTION(OVERWRITE_IF_EXISTS_OR_ADD));
        snprintf(b, sizeof b, "b:%s", name);
        CHECK_BYTES(ir->body, b, strlen(b));
        snprintf(b, sizeof b, "d_%s", name);
        CHECK_STR(ir->details, b);
        CHECK(ir->grpc_status != NULL && ir->grpc_status->status == 16);
    }
    /* the same in a FULL_DUPLEX_STREAMED body phase */
    Resp *r = send(st, &(struct req){.phase = PBCONV_REQUEST_BODY, .config = true,
                                     .req_mode = BODY_MODE(FULL_DUPLEX_STREAMED)});
    CHECK(reply.count == 1 && r->response_case == RESP(IMMEDIATE_RESPONSE));
    dispatch_stream_close(st);
    vm_close(s);
}

/* ctx.attributes, ctx.metadata, ctx.protocol_config and ctx.observability_mode. */
static void test_ctx_inputs(void)
{
    struct vm *s = load(
        "local function dump(t)\n"
        "  if type(t) ~= 'table' then return tostring(t) end\n"
        "  local keys = {}\n"
        "  for k in pairs(t) do keys[#keys + 1] = k end\n"
        "  table.sort(keys)\n"
        "  local out = {}\n"
        "  for _, k in ipairs(keys) do out[#out + 1] = k .. '=' .. dump(t[k]) end\n"
        "  return '{' .. table.concat(out, ',') .. '}'\n"
        "end\n"
        "local function echo(h, ctx)\n"
        "  return { add = { {'attr', dump(ctx.attributes)}, {'meta', dump(ctx.metadata)},\n"
        "    {'pc', dump(ctx.protocol_config)}, {'obs', tostring(ctx.observability_mode)} } }\n"
        "end\n"
        "function on_request_headers(h, ctx) ctx.state.n = (ctx.state.n or 0) + 1 return echo(h, ctx) end\n"
        "on_response_headers, on_request_trailers = echo, echo\n");
    struct dispatch_stream *st = dispatch_stream_open(s, 25);
    /* nothing sent: empty tables, no protocol_config */
    Resp *r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers});
    HeaderMutation *hm = common(r)->header_mutation;
    CHECK_STR(set_value(hm, "attr"), "{}");
    CHECK_STR(set_value(hm, "meta"), "{}");
    CHECK_STR(set_value(hm, "pc"), "nil");
    CHECK_STR(set_value(hm, "obs"), "false");

    r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers,
                               .attr = {"envoy.filters.http.ext_proc", "request.path", "/p"},
                               .meta = {"ns1", "k", "v1"}, .config = true,
                               .req_mode = BODY_MODE(STREAMED),
                               .resp_mode = BODY_MODE(FULL_DUPLEX_STREAMED)});
    hm = common(r)->header_mutation;
    CHECK_STR(set_value(hm, "attr"), "{envoy.filters.http.ext_proc={request.path=/p}}");
    CHECK_STR(set_value(hm, "meta"), "{ns1={k=v1}}");
    CHECK_STR(set_value(hm, "pc"), "{request_body_mode=STREAMED,response_body_mode="
                                   "FULL_DUPLEX_STREAMED,send_body_without_waiting_for_header_response=true}");

    /* merged per namespace, key by key; protocol_config stays the first one */
    r = send(st, &(struct req){.phase = PBCONV_RESPONSE_HEADERS, .kv = no_headers,
                               .attr = {"envoy.filters.http.ext_proc", "response.code", "200"},
                               .meta = {"ns2", "k", "v2"}, .config = true,
                               .req_mode = BODY_MODE(BUFFERED)});
    hm = common(r)->header_mutation;
    CHECK_STR(set_value(hm, "attr"), "{envoy.filters.http.ext_proc={request.path=/p,response.code=200}}");
    CHECK_STR(set_value(hm, "meta"), "{ns1={k=v1},ns2={k=v2}}");
    CHECK_STR(set_value(hm, "pc"), "{request_body_mode=STREAMED,response_body_mode="
                                   "FULL_DUPLEX_STREAMED,send_body_without_waiting_for_header_response=true}");
    /* a later value for the same key wins */
    r = send(st, &(struct req){.phase = PBCONV_REQUEST_TRAILERS, .kv = no_headers,
                               .meta = {"ns1", "k", "v3"}});
    CHECK_STR(set_value(r->request_trailers->header_mutation, "meta"), "{ns1={k=v3},ns2={k=v2}}");

    /* observability mode: the handler runs, ctx says so; the next message sees false again */
    CHECK(send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers, .observe = true}) == NULL);
    CHECK(reply.outcome == DISPATCH_NO_RESPONSE);
    r = send(st, &(struct req){.phase = PBCONV_RESPONSE_HEADERS, .kv = no_headers});
    CHECK_STR(set_value(common(r)->header_mutation, "obs"), "false");
    dispatch_stream_close(st);
    vm_close(s);

    s = load("function on_request_headers(h, ctx)\n"
             "  ctx.state.obs = tostring(ctx.observability_mode)\n"
             "  ctx.attributes = nil; ctx.metadata = 5\n"
             "end\n"
             "function on_response_headers(h, ctx)\n"
             "  return { add = { {'obs', ctx.state.obs}, {'a', ctx.attributes.ns.k},\n"
             "                   {'m', ctx.metadata.ns.k} } }\n"
             "end\n");
    st = dispatch_stream_open(s, 26);
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers, .observe = true});
    CHECK(reply.outcome == DISPATCH_NO_RESPONSE);
    /* a script that cleared ctx.attributes/metadata gets fresh tables */
    r = send(st, &(struct req){.phase = PBCONV_RESPONSE_HEADERS, .kv = no_headers,
                               .attr = {"ns", "k", "av"}, .meta = {"ns", "k", "mv"}});
    hm = common(r)->header_mutation;
    CHECK_STR(set_value(hm, "obs"), "true");
    CHECK_STR(set_value(hm, "a"), "av");
    CHECK_STR(set_value(hm, "m"), "mv");
    dispatch_stream_close(st);
    vm_close(s);
}

/* The body of streamed response i of the last reply, and its end_of_stream. */
static void check_streamed(size_t i, enum pbconv_phase phase, const char *body, bool eos)
{
    Resp *r = nth(i);
    Envoy__Service__ExtProc__V3__BodyResponse *b;
    if (phase == PBCONV_REQUEST_BODY) {
        CHECK(r->response_case == RESP(REQUEST_BODY));
        b = r->request_body;
    } else {
        CHECK(r->response_case == RESP(RESPONSE_BODY));
        b = r->response_body;
    }
    CHECK(b->response != NULL && b->response->body_mutation != NULL);
    CHECK(b->response->header_mutation == NULL);
    CHECK(b->response->status == 0);
    Envoy__Service__ExtProc__V3__BodyMutation *bm = b->response->body_mutation;
    CHECK(bm->mutation_case == ENVOY__SERVICE__EXT_PROC__V3__BODY_MUTATION__MUTATION_STREAMED_RESPONSE);
    CHECK_BYTES(bm->streamed_response->body, body, strlen(body));
    CHECK(bm->streamed_response->end_of_stream == eos);
}

/* The flags and drain of streamed response i. */
static void check_grpc_flags(size_t i, bool compressed, bool no_message, bool drain)
{
    Resp *r = nth(i);
    const Envoy__Service__ExtProc__V3__StreamedBodyResponse *sr =
        (r->response_case == RESP(REQUEST_BODY) ? r->request_body : r->response_body)
            ->response->body_mutation->streamed_response;
    CHECK(sr->grpc_message_compressed == compressed);
    CHECK(sr->end_of_stream_without_message == no_message);
    CHECK(r->request_drain == drain);
}

/* GRPC body mode, request_drain and streamed immediate responses (issue 13). */
static void test_newest_protocol(void)
{
    struct vm *s = load(
        "function on_request_headers(h, ctx)\n"
        "  local c = h:get('x-case')\n"
        "  if c == 'full' then return { immediate = { status = 201, headers = { {'x-a', '1'} },\n"
        "      chunks = { 'a', 'b' }, trailers = { t = 'v' } } } end\n"
        "  if c == 'open' then return { immediate = { stream = true, end_of_stream = false } } end\n"
        "end\n"
        "function on_request_body(b, ctx)\n"
        "  ctx.state.flags = (ctx.state.flags or '') .. tostring(b.grpc_message_compressed)\n"
        "    .. tostring(b.end_of_stream_without_message)\n"
        "  local cmd = b.body:match('^(%a+)')\n"
        "  if cmd == 'tbl' then return { chunks = { { body = 'x', grpc_message_compressed = true },\n"
        "      { end_of_stream_without_message = true } }, end_of_stream = true } end\n"
        "  if cmd == 'drain' then return { body = 'D', request_drain = true } end\n"
        "  if cmd == 'local' then return { immediate = { chunks = { 'L' } } } end\n"
        "end\n"
        "function on_response_body(b, ctx) return { request_drain = true } end\n");
    /* GRPC request body: flags in, echoed out; chunk tables */
    struct dispatch_stream *st = dispatch_stream_open(s, 31);
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers, .config = true,
                           .req_mode = BODY_MODE(GRPC), .resp_mode = BODY_MODE(BUFFERED)});
    CHECK(reply.outcome == DISPATCH_RESPOND && reply.count == 1);
    send(st, &(struct req){.phase = PBCONV_REQUEST_BODY, .body = "m", .body_len = 1,
                           .compressed = true});
    CHECK(reply.count == 1);
    check_streamed(0, PBCONV_REQUEST_BODY, "m", false);
    check_grpc_flags(0, true, false, false);
    send(st, &(struct req){.phase = PBCONV_REQUEST_BODY, .body = "tbl", .body_len = 3});
    CHECK(reply.count == 2);
    check_streamed(0, PBCONV_REQUEST_BODY, "x", false);
    check_grpc_flags(0, true, false, false);
    check_streamed(1, PBCONV_REQUEST_BODY, "", true);
    check_grpc_flags(1, false, true, false);
    /* drain: on the answer's last message; then the server echoes, without the handler */
    send(st, &(struct req){.phase = PBCONV_REQUEST_BODY, .body = "drain", .body_len = 5});
    CHECK(reply.count == 1);
    check_streamed(0, PBCONV_REQUEST_BODY, "D", false);
    check_grpc_flags(0, false, false, true);
    send(st, &(struct req){.phase = PBCONV_REQUEST_BODY, .body = "tbl", .body_len = 3,
                           .compressed = true});
    CHECK(reply.count == 1);
    check_streamed(0, PBCONV_REQUEST_BODY, "tbl", false);
    check_grpc_flags(0, true, false, false);
    send(st, &(struct req){.phase = PBCONV_REQUEST_BODY, .eos = true, .no_message = true});
    CHECK(reply.count == 1);
    check_streamed(0, PBCONV_REQUEST_BODY, "", true);
    check_grpc_flags(0, false, true, false);
    /* request_drain in a BUFFERED body: refused */
    send(st, &(struct req){.phase = PBCONV_RESPONSE_BODY, .body = "r", .body_len = 1, .eos = true});
    CHECK(reply.outcome == DISPATCH_FAIL && reply.status == GRPC_STATUS_INTERNAL &&
          strstr(reply.message, "'request_drain' is allowed only in body phases in "
                                "FULL_DUPLEX_STREAMED or GRPC mode (where Envoy defines it), "
                                "not in response_body") != NULL);
    dispatch_stream_close(st);

    /* a streamed immediate response: headers (":status" first), chunks, trailers */
    static const char *const full[] = {"x-case", "full"};
    st = dispatch_stream_open(s, 32);
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = full, .n = 1});
    CHECK(reply.outcome == DISPATCH_RESPOND && reply.count == 4);
    Resp *r = nth(0);
    CHECK(r->response_case == RESP(STREAMED_IMMEDIATE_RESPONSE));
    const Envoy__Service__ExtProc__V3__HttpHeaders *hh =
        r->streamed_immediate_response->headers_response;
    CHECK(hh != NULL && !hh->end_of_stream && hh->headers->n_headers == 2);
    CHECK_STR(hh->headers->headers[0]->key, ":status");
    CHECK_BYTES(hh->headers->headers[0]->raw_value, "201", 3);
    CHECK_STR(hh->headers->headers[1]->key, "x-a");
    r = nth(1);
    CHECK_BYTES(r->streamed_immediate_response->body_response->body, "a", 1);
    CHECK(!r->streamed_immediate_response->body_response->end_of_stream);
    r = nth(2);
    CHECK_BYTES(r->streamed_immediate_response->body_response->body, "b", 1);
    CHECK(!r->streamed_immediate_response->body_response->end_of_stream);
    r = nth(3);
    CHECK(r->streamed_immediate_response->trailers_response->n_headers == 1);
    CHECK_STR(r->streamed_immediate_response->trailers_response->headers[0]->key, "t");
    dispatch_stream_close(st);

    /* an open one, continued by the body handler, ended by the request's end */
    static const char *const open_[] = {"x-case", "open"};
    st = dispatch_stream_open(s, 33);
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = open_, .n = 1, .config = true,
                           .req_mode = BODY_MODE(FULL_DUPLEX_STREAMED)});
    CHECK(reply.count == 1 && !nth(0)->streamed_immediate_response->headers_response->end_of_stream);
    send(st, &(struct req){.phase = PBCONV_REQUEST_BODY, .body = "local", .body_len = 5});
    CHECK(reply.count == 1);
    CHECK_BYTES(nth(0)->streamed_immediate_response->body_response->body, "L", 1);
    CHECK(!nth(0)->streamed_immediate_response->body_response->end_of_stream);
    send(st, &(struct req){.phase = PBCONV_REQUEST_BODY, .body = "quiet", .body_len = 5});
    CHECK(reply.outcome == DISPATCH_NO_RESPONSE);
    send(st, &(struct req){.phase = PBCONV_REQUEST_BODY, .body = "local", .body_len = 5,
                           .eos = true});
    CHECK(reply.count == 1 && nth(0)->streamed_immediate_response->body_response->end_of_stream);
    dispatch_stream_close(st);
    vm_close(s);
}

static void test_full_duplex(void)
{
    struct vm *s = load(
        "function on_request_headers() end\n"
        "function on_request_body(b, ctx)\n"
        "  local cmd = b.body:match('^(%a+)')\n"
        "  if cmd == 'nil' then return nil end\n"
        "  if cmd == 'empty' then return {} end\n"
        "  if cmd == 'body' then return { body = 'B' } end\n"
        "  if cmd == 'chunks' then return { chunks = { 'a', '', 'c' } } end\n"
        "  if cmd == 'hold' then ctx.state.held = (ctx.state.held or '') .. b.body return { chunks = {} } end\n"
        "  if cmd == 'flush' then return { chunks = { ctx.state.held, b.body } } end\n"
        "  if cmd == 'end' then return { end_of_stream = true } end\n"
        "  if cmd == 'endempty' then return { chunks = {}, end_of_stream = true } end\n"
        "  if cmd == 'noend' then return { end_of_stream = false } end\n"
        "  if cmd == 'meta' then return { body = 'M', dynamic_metadata = { n = { k = 1 } },\n"
        "    override_message_timeout = 5, clear_route_cache = true } end\n"
        "  if cmd == 'holdmeta' then return { chunks = {}, dynamic_metadata = {} } end\n"
        "  if cmd == 'clear' then return { clear_body = true } end\n"
        "  if cmd == 'status' then return { status = 'CONTINUE' } end\n"
        "  if cmd == 'add' then return { add = { {'a', 'b'} } } end\n"
        "  if cmd == 'both' then return { body = 'x', chunks = {} } end\n"
        "  if cmd == 'badchunk' then return { chunks = { 'a', 5 } } end\n"
        "  if cmd == 'mapchunk' then return { chunks = { x = 'a' } } end\n"
        "  if cmd == 'eostype' then return { end_of_stream = 1 } end\n"
        "end\n");
    const char *path = last_path;
    char want[512];
    struct dispatch_stream *st = dispatch_stream_open(s, 27);
    /* the first message carries protocol_config: request bodies are full duplex */
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers, .config = true,
                           .req_mode = BODY_MODE(FULL_DUPLEX_STREAMED)});
    CHECK(reply.outcome == DISPATCH_RESPOND && reply.count == 1);

#define CHUNK(text, e) send(st, &(struct req){.phase = PBCONV_REQUEST_BODY, .body = text, \
                                              .body_len = strlen(text), .eos = e})
    /* nil and {}: the chunk forwarded unchanged, end_of_stream kept */
    CHUNK("nil 1", false);
    CHECK(reply.count == 1);
    check_streamed(0, PBCONV_REQUEST_BODY, "nil 1", false);
    CHUNK("empty", true);
    CHECK(reply.count == 1);
    check_streamed(0, PBCONV_REQUEST_BODY, "empty", true);
    CHUNK("body", false);
    check_streamed(0, PBCONV_REQUEST_BODY, "B", false);
    CHUNK("body", true);
    check_streamed(0, PBCONV_REQUEST_BODY, "B", true);
    /* chunks: one response each, in order, end_of_stream on the last only */
    CHUNK("chunks", true);
    CHECK(reply.count == 3 && reply.len == reply.lens[0] + reply.lens[1] + reply.lens[2]);
    check_streamed(0, PBCONV_REQUEST_BODY, "a", false);
    check_streamed(1, PBCONV_REQUEST_BODY, "", false);
    check_streamed(2, PBCONV_REQUEST_BODY, "c", true);
    /* held: nothing now, everything later */
    CHUNK("hold1", false);
    CHECK(reply.outcome == DISPATCH_NO_RESPONSE);
    CHUNK("hold2", false);
    CHECK(reply.outcome == DISPATCH_NO_RESPONSE);
    CHUNK("flush", true);
    CHECK(reply.count == 2);
    check_streamed(0, PBCONV_REQUEST_BODY, "hold1hold2", false);
    check_streamed(1, PBCONV_REQUEST_BODY, "flush", true);
    /* end_of_stream overrides; an ending body with nothing to say sends an empty chunk */
    CHUNK("end", false);
    CHECK(reply.count == 1);
    check_streamed(0, PBCONV_REQUEST_BODY, "end", true);
    CHUNK("endempty", false);
    CHECK(reply.count == 1);
    check_streamed(0, PBCONV_REQUEST_BODY, "", true);
    CHUNK("hold", true);
    CHECK(reply.count == 1);
    check_streamed(0, PBCONV_REQUEST_BODY, "", true);
    CHUNK("noend", false);
    check_streamed(0, PBCONV_REQUEST_BODY, "noend", false);
    /* a second end-of-stream chunk (an Envoy quirk) is answered like any other */
    CHUNK("", true);
    CHECK(reply.count == 1);
    check_streamed(0, PBCONV_REQUEST_BODY, "", true);
    CHUNK("", true);
    CHECK(reply.count == 1);
    check_streamed(0, PBCONV_REQUEST_BODY, "", true);
    /* ProcessingResponse-level keys ride on the first message */
    CHUNK("meta", false);
    CHECK(reply.count == 1);
    check_streamed(0, PBCONV_REQUEST_BODY, "M", false);
    CHECK(nth(0)->dynamic_metadata != NULL && nth(0)->dynamic_metadata->n_fields == 1);
    CHECK(nth(0)->override_message_timeout->seconds == 5);
    CHECK(nth(0)->request_body->response->clear_route_cache);
    /* observability mode: the handler runs, nothing is sent */
    CHECK(send(st, &(struct req){.phase = PBCONV_REQUEST_BODY, .body = "chunks", .body_len = 6,
                                 .observe = true}) == NULL);
    CHECK(reply.outcome == DISPATCH_NO_RESPONSE);

#define BADCHUNK(text, e, detail)                                                          \
    do {                                                                                   \
        CHUNK(text, e);                                                                    \
        snprintf(want, sizeof want, "%s:2: on_request_body (defined here) returned a bad table: %s", path, \
                 detail);                                                                  \
        CHECK_FAIL(GRPC_STATUS_INTERNAL, want);                                            \
    } while (0)
    BADCHUNK("noend", true, "bad value for 'end_of_stream': false, but this is the last chunk of "
                            "the body (a body must end)");
    BADCHUNK("holdmeta", false, "'dynamic_metadata' needs a message to travel with, and this "
                                "answer sends none (chunks = {} without end_of_stream)");
    BADCHUNK("clear", false, "'clear_body' is not allowed in request_body in FULL_DUPLEX_STREAMED "
                             "mode (see docs/streaming.md)");
    BADCHUNK("status", false, "'status' is not allowed in request_body in FULL_DUPLEX_STREAMED "
                              "mode (see docs/streaming.md)");
    BADCHUNK("add", false, "'add' is not allowed in request_body in FULL_DUPLEX_STREAMED mode "
                           "(see docs/streaming.md)");
    BADCHUNK("both", false, "'body' and 'chunks' cannot be combined");
    BADCHUNK("badchunk", false, "'chunks' entry 2 is a number, expected a string or a table { body = ... }");
    BADCHUNK("mapchunk", false, "'chunks' must be a list of strings or { body = ... } tables");
    BADCHUNK("eostype", false, "'end_of_stream' must be a boolean, got number");
    dispatch_stream_close(st);

    /* response bodies in FULL_DUPLEX_STREAMED, request bodies STREAMED: only the response
     * direction answers with streamed responses; chunks is an error elsewhere */
    vm_close(s);
    s = load("function on_request_body(b) if b.body == 'c' then return { chunks = {'x'} } end\n"
             "  return { body = b.body:upper() } end\n"
             "function on_response_body(b) return { chunks = { b.body, b.body } } end\n");
    path = last_path;
    st = dispatch_stream_open(s, 28);
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers, .config = true,
                           .req_mode = BODY_MODE(STREAMED),
                           .resp_mode = BODY_MODE(FULL_DUPLEX_STREAMED)});
    Resp *r = CHUNK("abc", false);
    CHECK(reply.count == 1);
    CHECK(common(r)->body_mutation->mutation_case == ENVOY__SERVICE__EXT_PROC__V3__BODY_MUTATION__MUTATION_BODY);
    CHECK_BYTES(common(r)->body_mutation->body, "ABC", 3);
    CHUNK("c", false);
    snprintf(want, sizeof want, "%s:1: on_request_body (defined here) returned a bad table: 'chunks' is allowed "
             "only in body phases in FULL_DUPLEX_STREAMED mode, not in request_body", path);
    CHECK_FAIL(GRPC_STATUS_INTERNAL, want);
    send(st, &(struct req){.phase = PBCONV_RESPONSE_BODY, .body = "rb", .body_len = 2, .eos = true});
    CHECK(reply.count == 2);
    check_streamed(0, PBCONV_RESPONSE_BODY, "rb", false);
    check_streamed(1, PBCONV_RESPONSE_BODY, "rb", true);
    dispatch_stream_close(st);

    /* no handler at all: forwarded unchanged; no protocol_config: a plain body phase */
    vm_close(s);
    s = load("-- no body handler\nfunction on_request_headers() end\n");
    st = dispatch_stream_open(s, 29);
    send(st, &(struct req){.phase = PBCONV_RESPONSE_BODY, .body = "x", .body_len = 1});
    static const uint8_t rsb[] = {0x22, 0x00};
    CHECK(reply_is(rsb, 2));
    send(st, &(struct req){.phase = PBCONV_RESPONSE_BODY, .body = "x", .body_len = 1, .config = true,
                           .resp_mode = BODY_MODE(FULL_DUPLEX_STREAMED)});
    CHECK(reply.count == 1);
    check_streamed(0, PBCONV_RESPONSE_BODY, "x", false);
    dispatch_stream_close(st);
    vm_close(s);
#undef CHUNK
#undef BADCHUNK
}

#define ACTIONS "(expected APPEND_IF_EXISTS_OR_ADD, ADD_IF_ABSENT, OVERWRITE_IF_EXISTS_OR_ADD or " \
                "OVERWRITE_IF_EXISTS)"
#define HMODES "(expected DEFAULT, SEND or SKIP)"
#define BMODES "(expected NONE, STREAMED, BUFFERED, BUFFERED_PARTIAL, FULL_DUPLEX_STREAMED or GRPC)"

static void test_new_bad_returns(void)
{
    /* append actions */
    BADT("{ add = { {'a', 'b'} }, append_action = 'APPEND' }",
         "bad value for 'append_action': 'APPEND' " ACTIONS);
    BADT("{ append_action = 1 }", "'append_action' must be a string, got number");
    BADT("{ add = { {'a', 'b'}, {'c', 'd', append_action = 'add_if_absent'} } }",
         "bad value for 'add[2].append_action': 'add_if_absent' " ACTIONS);
    BADT("{ add = { {'a', 'b', append_action = true} } }",
         "'add[1].append_action' must be a string, got boolean");
    BADT("{ add = { {'a', 'b', action = 'ADD_IF_ABSENT'} } }",
         "'add' entry 1 has an unknown key 'action' (a pair takes {name, value, "
         "append_action = ...})");
    BADT("{ add = { {'a', 'b', [0] = 'x'} } }",
         "'add' entry 1 has an unknown key [0] (a pair takes {name, value, append_action = ...})");
    BADT("{ immediate = { headers = { x = '1' }, append_action = 'NOPE' } }",
         "bad value for 'immediate.append_action': 'NOPE' " ACTIONS);
    BADT("{ immediate = { headers = { {'x', '1', append_action = 'NOPE'} } } }",
         "bad value for 'immediate.headers[1].append_action': 'NOPE' " ACTIONS);
    BADT("{ immediate = { append_action = 3 } }",
         "'immediate.append_action' must be a string, got number");
    BADT("{ append_action = 'ADD_IF_ABSENT', immediate = {} }",
         "'immediate' cannot be combined with 'append_action'");
    /* immediate ranges */
    BADT("{ immediate = { status = 199 } }",
         "bad value for 'immediate.status': 199 (expected an HTTP status 200-599)");
    BADT("{ immediate = { status = 100 } }",
         "bad value for 'immediate.status': 100 (expected an HTTP status 200-599)");
    BADT("{ immediate = { status = 600 } }",
         "bad value for 'immediate.status': 600 (expected an HTTP status 200-599)");
    BADT("{ immediate = { grpc_status = 17 } }",
         "bad value for 'immediate.grpc_status': 17 (expected a gRPC status code 0-16)");
    BADT("{ immediate = { grpc_status = 1.5 } }",
         "bad value for 'immediate.grpc_status': 1.5 (expected a gRPC status code 0-16)");
    /* mode_override */
    BADT("{ mode_override = 'STREAMED' }", "'mode_override' must be a table, got string");
    BADT("{ mode_override = { request_body = 'STREAMED' } }",
         "unknown key 'mode_override.request_body' (did you mean "
         "'mode_override.request_body_mode'?)");
    BADT("{ mode_override = { 'STREAMED' } }", "unknown key [1] in mode_override");
    BADT("{ mode_override = { request_body_mode = 'STREAM' } }",
         "bad value for 'mode_override.request_body_mode': 'STREAM' " BMODES);
    BADT("{ mode_override = { response_trailer_mode = 'STREAMED' } }",
         "bad value for 'mode_override.response_trailer_mode': 'STREAMED' " HMODES);
    BADT("{ mode_override = { request_header_mode = 1 } }",
         "'mode_override.request_header_mode' must be a string, got number");
    /* override_message_timeout */
    BADT("{ override_message_timeout = '5' }",
         "'override_message_timeout' must be a number, got string");
    BADT("{ override_message_timeout = 0 }",
         "bad value for 'override_message_timeout': 0 (expected a number of seconds from 0.001 "
         "to 315576000000)");
    BADT("{ override_message_timeout = 0.0009 }",
         "bad value for 'override_message_timeout': 0.0009 (expected a number of seconds from "
         "0.001 to 315576000000)");
    BADT("{ override_message_timeout = -1 }",
         "bad value for 'override_message_timeout': -1 (expected a number of seconds from 0.001 "
         "to 315576000000)");
    BADT("{ override_message_timeout = 0/0 }",
         "bad value for 'override_message_timeout': NaN (expected a number of seconds from "
         "0.001 to 315576000000)");
    BADT("{ override_message_timeout = 1e12 }",
         "bad value for 'override_message_timeout': 1000000000000 (expected a number of seconds "
         "from 0.001 to 315576000000)");
    /* dynamic_metadata: pbstruct names the path */
    BADT("{ dynamic_metadata = 'x' }", "'dynamic_metadata' must be a table, got string");
    BADT("{ dynamic_metadata = { ns = { f = print } } }",
         "dynamic_metadata.ns.f: a function cannot be converted to a protobuf Value");
    /* streaming keys outside FULL_DUPLEX_STREAMED */
    BADT("{ chunks = {} }", "'chunks' is allowed only in body phases in FULL_DUPLEX_STREAMED "
                            "mode, not in request_headers");
    BAD("{ end_of_stream = true }", PBCONV_RESPONSE_BODY,
        "returned a bad table: 'end_of_stream' is allowed only in body phases in "
        "FULL_DUPLEX_STREAMED mode, not in response_body");
    BAD("{ append_action = 'NOPE' }", PBCONV_RESPONSE_TRAILERS,
        "returned a bad table: bad value for 'append_action': 'NOPE' " ACTIONS);
}

/* A script finds modules in its own folder, whatever the working directory. */
static void test_require_from_script_dir(void)
{
    char mod[300];
    snprintf(mod, sizeof mod, "%s/pbconv_helper_mod.lua", tmpdir);
    FILE *f = fopen(mod, "w");
    CHECK(f != NULL);
    CHECK(fputs("return { tag = 'from-dir' }\n", f) >= 0);
    CHECK(fclose(f) == 0);
    struct vm *s = load("local m = require 'pbconv_helper_mod'\n"
                            "function on_request_headers() return { add = { {'t', m.tag} } } end\n");
    struct dispatch_stream *st = dispatch_stream_open(s, 34);
    Resp *r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers});
    CHECK_STR(set_value(common(r)->header_mutation, "t"), "from-dir");
    dispatch_stream_close(st);
    vm_close(s);
    unlink(mod);
}

/* callout.deny_callout: PERMISSION_DENIED with the message; a plain error stays INTERNAL. */
static void test_deny_callout(void)
{
    struct vm *s = load(
        "function on_request_headers(h, ctx)\n"
        "  if h:has('msg') then callout.deny_callout('go away') end\n"
        "  if h:has('nested') then local ok = pcall(callout.deny_callout, 'caught'); error('after') end\n"
        "  callout.deny_callout()\n"
        "end\n"
        "function on_request_body() require('callout').deny_callout('from body') end\n");
    const char *path = last_path;
    char want[512];
    struct dispatch_stream *st = dispatch_stream_open(s, 30);
    static const char *const msg[] = {"msg", "1"}, *const nested[] = {"nested", "1"};
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = msg, .n = 1});
    CHECK_FAIL(GRPC_STATUS_PERMISSION_DENIED, "go away");
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers});
    CHECK_FAIL(GRPC_STATUS_PERMISSION_DENIED, "Callout DENIED.");
    send(st, &(struct req){.phase = PBCONV_REQUEST_BODY});
    CHECK_FAIL(GRPC_STATUS_PERMISSION_DENIED, "from body");
    /* a deny caught by the script's own pcall is not a deny */
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = nested, .n = 1});
    snprintf(want, sizeof want, "%s:3: after", path);
    CHECK_FAIL(GRPC_STATUS_INTERNAL, want);
    /* observability mode: nothing sent */
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = msg, .n = 1, .observe = true});
    CHECK(reply.outcome == DISPATCH_NO_RESPONSE);
    dispatch_stream_close(st);
    vm_close(s);
}

/* process(request, ctx): the whole ProcessingRequest in, a whole ProcessingResponse out. */
static void test_process(void)
{
    struct vm *s = load(
        "function process(req, ctx)\n"
        "  ctx.state.n = (ctx.state.n or 0) + 1\n"
        "  if req.request_headers then\n"
        "    local h = req.request_headers.headers.headers\n"
        "    local cmd = h[1] and h[1].key\n"
        "    if cmd == 'nil' then return nil end\n"
        "    if cmd == 'badfield' then return { request_headers = { response = { header_mutation = {\n"
        "      set_headers = { { header = { kye = 'x' } } } } } } } end\n"
        "    if cmd == 'wrong' then return { response_headers = {} } end\n"
        "    if cmd == 'none' then return { dynamic_metadata = {} } end\n"
        "    if cmd == 'imm' then return { immediate_response = { status = { code = 418 } } } end\n"
        "    return { request_headers = { response = { header_mutation = { set_headers = {\n"
        "      { header = { key = 'x-raw', raw_value = cmd .. ':' .. ctx.phase .. ':' .. ctx.state.n },\n"
        "        append_action = 'ADD_IF_ABSENT' } } } } },\n"
        "      mode_override = { response_body_mode = 'BUFFERED' } }\n"
        "  end\n"
        "  if req.request_body then\n"
        "    return { request_body = { response = { body_mutation = { body = req.request_body.body:upper() } } } }\n"
        "  end\n"
        "end\n"
        "function on_request_headers() error('not called when process exists') end\n");
    const char *path = last_path;
    char want[512];
    struct dispatch_stream *st = dispatch_stream_open(s, 31);
    static const char *const plain[] = {"go", "1"};
    Resp *r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = plain, .n = 1});
    CHECK(r != NULL && r->response_case == RESP(REQUEST_HEADERS));
    HeaderMutation *hm = common(r)->header_mutation;
    CHECK_STR(set_value(hm, "x-raw"), "go:request_headers:1");
    CHECK_APPEND(hm, "x-raw", -1, ACTION(ADD_IF_ABSENT));
    CHECK(r->mode_override != NULL && r->mode_override->response_body_mode == BODY_MODE(BUFFERED));

    r = send(st, &(struct req){.phase = PBCONV_REQUEST_BODY, .body = "abc", .body_len = 3});
    CHECK(r->response_case == RESP(REQUEST_BODY));
    CHECK_BYTES(common(r)->body_mutation->body, "ABC", 3);

    /* nil: the empty response of the phase's type */
    static const char *const nil[] = {"nil", "1"};
    static const uint8_t rh[] = {0x0a, 0x00};
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = nil, .n = 1});
    CHECK(reply_is(rh, 2));
    static const uint8_t rst[] = {0x32, 0x00};
    send(st, &(struct req){.phase = PBCONV_RESPONSE_TRAILERS, .kv = no_headers});
    CHECK(reply_is(rst, 2));

    static const char *const imm[] = {"imm", "1"};
    r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = imm, .n = 1});
    CHECK(r->response_case == RESP(IMMEDIATE_RESPONSE) && r->immediate_response->status->code == 418);

    static const char *const badfield[] = {"badfield", "1"};
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = badfield, .n = 1});
    CHECK(reply.outcome == DISPATCH_FAIL && reply.status == GRPC_STATUS_INTERNAL);
    snprintf(want, sizeof want, "%s:1: process (defined here) returned a bad response: response.request_headers."
             "response.header_mutation.set_headers[1].header", path);
    CHECK(strncmp(reply.message, want, strlen(want)) == 0);
    CHECK(strstr(reply.message, "'kye'") != NULL);

    static const char *const wrong[] = {"wrong", "1"};
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = wrong, .n = 1});
    snprintf(want, sizeof want, "%s:1: process (defined here) returned a bad response: response.response_headers "
             "does not answer a request_headers message (expected response.request_headers or "
             "response.immediate_response)", path);
    CHECK_FAIL(GRPC_STATUS_INTERNAL, want);

    static const char *const none[] = {"none", "1"};
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = none, .n = 1});
    snprintf(want, sizeof want, "%s:1: process (defined here) returned a bad response: response: none of the "
             "'response' oneof is set (a request_headers message needs response.request_headers "
             "or response.immediate_response)", path);
    CHECK_FAIL(GRPC_STATUS_INTERNAL, want);
    dispatch_stream_close(st);
    vm_close(s);

    /* the request as a table: attributes, protocol_config, observability_mode, bytes */
    s = load("function process(req, ctx)\n"
             "  if req.observability_mode then ctx.state.obs = true return end\n"
             "  local a = req.attributes and req.attributes.ns and req.attributes.ns.k\n"
             "  local pc = req.protocol_config and req.protocol_config.request_body_mode\n"
             "  return { request_trailers = { header_mutation = { set_headers = {\n"
             "    { header = { key = 'a', raw_value = tostring(a) } },\n"
             "    { header = { key = 'pc', raw_value = tostring(pc) } },\n"
             "    { header = { key = 'obs', raw_value = tostring(ctx.state.obs) } },\n"
             "    { header = { key = 'v', raw_value = req.request_trailers.trailers.headers[1].raw_value } } } } } }\n"
             "end\n");
    st = dispatch_stream_open(s, 32);
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers, .observe = true});
    CHECK(reply.outcome == DISPATCH_NO_RESPONSE);
    static const char *const tv[] = {"t", "bin\xff"};
    r = send(st, &(struct req){.phase = PBCONV_REQUEST_TRAILERS, .kv = tv, .n = 1,
                               .attr = {"ns", "k", "attr"}, .config = true,
                               .req_mode = BODY_MODE(BUFFERED_PARTIAL)});
    CHECK(r != NULL && r->response_case == RESP(REQUEST_TRAILERS));
    hm = r->request_trailers->header_mutation;
    CHECK_STR(set_value(hm, "a"), "attr");
    CHECK_STR(set_value(hm, "pc"), "BUFFERED_PARTIAL");
    CHECK_STR(set_value(hm, "obs"), "true");
    CHECK_STR(set_value(hm, "v"), "bin\xff");
    dispatch_stream_close(st);
    vm_close(s);

    /* process() in FULL_DUPLEX_STREAMED: nil forwards the chunk, as with on_* handlers */
    s = load("function process(req) end\n");
    st = dispatch_stream_open(s, 33);
    send(st, &(struct req){.phase = PBCONV_REQUEST_BODY, .body = "fd", .body_len = 2, .eos = true,
                           .config = true, .req_mode = BODY_MODE(FULL_DUPLEX_STREAMED)});
    CHECK(reply.count == 1);
    check_streamed(0, PBCONV_REQUEST_BODY, "fd", true);
    dispatch_stream_close(st);
    vm_close(s);
}

static void test_lua_errors(void)
{
    char want[512];
    struct vm *s = load(
        "function on_request_headers(h)\n"
        "  if h:has('table') then error({}) end\n"
        "  if h:has('tostring') then error(setmetatable({}, {__tostring = function() return 'custom' end})) end\n"
        "  if h:has('level0') then error('bare', 0) end\n"
        "  if h:has('index') then local t = nil; return t.x end\n"
        "  error('boom')\n"
        "end\n"
        "function on_request_body() return { ad = 1 } end\n");
    const char *path = last_path;
    struct dispatch_stream *st = dispatch_stream_open(s, 9);
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers});
    snprintf(want, sizeof want, "%s:6: boom", path);
    CHECK_FAIL(GRPC_STATUS_INTERNAL, want);
    CHECK(strstr(reply.message, "traceback") == NULL);

    static const char *const t[] = {"table", "1"};
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = t, .n = 1});
    snprintf(want, sizeof want, "%s:2: (error object is a table value)", path);
    CHECK_FAIL(GRPC_STATUS_INTERNAL, want);

    static const char *const ts[] = {"tostring", "1"};
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = ts, .n = 1});
    CHECK_FAIL(GRPC_STATUS_INTERNAL, "custom");

    static const char *const l0[] = {"level0", "1"};
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = l0, .n = 1});
    CHECK_FAIL(GRPC_STATUS_INTERNAL, "bare");

    static const char *const ix[] = {"index", "1"};
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = ix, .n = 1});
    snprintf(want, sizeof want, "%s:5: attempt to index a nil value (local 't')", path);
    CHECK_FAIL(GRPC_STATUS_INTERNAL, want);

    /* the bad-table message points at the line where the handler is defined */
    send(st, &(struct req){.phase = PBCONV_REQUEST_BODY});
    snprintf(want, sizeof want, "%s:8: on_request_body (defined here) returned a bad table: unknown key 'ad' "
             "(did you mean 'add'?)", path);
    CHECK_FAIL(GRPC_STATUS_INTERNAL, want);

    /* a failure ends one message, not the script: the next trailer still works */
    static const uint8_t rqt[] = {0x2a, 0x00};
    send(st, &(struct req){.phase = PBCONV_REQUEST_TRAILERS, .kv = no_headers});
    CHECK(reply_is(rqt, 2));
    dispatch_stream_close(st);
    vm_close(s);
}

static void test_malformed(void)
{
    struct vm *s = load("function on_request_headers() error('must not run') end\n");
    struct dispatch_stream *st = dispatch_stream_open(s, 10);
    static const uint8_t truncated[] = {0x12, 0x05, 0x0a};  /* length 5, 1 byte follows */
    CHECK(send_bytes(st, truncated, sizeof truncated) == NULL);
    CHECK_FAIL(GRPC_STATUS_INVALID_ARGUMENT, "malformed ProcessingRequest");
    static const uint8_t badwire[] = {0x17};  /* wire type 7 does not exist */
    send_bytes(st, badwire, sizeof badwire);
    CHECK_FAIL(GRPC_STATUS_INVALID_ARGUMENT, "malformed ProcessingRequest");
    send_bytes(st, (const uint8_t *)"", 0);  /* valid, but no phase set */
    CHECK_FAIL(GRPC_STATUS_INVALID_ARGUMENT, "ProcessingRequest carries no headers, body or trailers");
    static const uint8_t only_obs[] = {0x50, 0x01};  /* observability_mode = true, no phase */
    send_bytes(st, only_obs, sizeof only_obs);
    CHECK(reply.outcome == DISPATCH_FAIL && reply.status == GRPC_STATUS_INVALID_ARGUMENT);
    dispatch_stream_close(st);
    vm_close(s);
}

static void test_observability_and_extras(void)
{
    struct vm *s = load(
        "function on_request_headers(h, ctx)\n"
        "  ctx.state.seen = (ctx.state.seen or 0) + 1\n"
        "  if h:has('fail') then error('logged only') end\n"
        "  if h:has('bad') then return { nope = 1 } end\n"
        "  if h:has('deny') then return { deny = 'x' } end\n"
        "  return { add = { {'seen', ctx.state.seen} } }\n"
        "end\n");
    struct dispatch_stream *st = dispatch_stream_open(s, 11);
    CHECK(send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers, .observe = true}) == NULL);
    CHECK(reply.outcome == DISPATCH_NO_RESPONSE);
    static const char *const kf[] = {"fail", "1"}, *const kb[] = {"bad", "1"}, *const kd[] = {"deny", "1"};
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = kf, .n = 1, .observe = true});
    CHECK(reply.outcome == DISPATCH_NO_RESPONSE);
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = kb, .n = 1, .observe = true});
    CHECK(reply.outcome == DISPATCH_NO_RESPONSE);
    send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = kd, .n = 1, .observe = true});
    CHECK(reply.outcome == DISPATCH_NO_RESPONSE);
    /* the handler did run each time; metadata, attributes and protocol_config are accepted */
    Resp *r = send(st, &(struct req){.phase = PBCONV_REQUEST_HEADERS, .kv = no_headers, .extras = true});
    CHECK(r != NULL);
    CHECK_STR(set_value(common(r)->header_mutation, "seen"), "5");
    dispatch_stream_close(st);
    vm_close(s);
}

static void test_open_errors(void)
{
    char err[512], want[600];
    const char *p = write_script("local x = = 1\n");
    CHECK(open_vm(p, err, sizeof err) == NULL);
    snprintf(want, sizeof want, "%s:1:", p);
    CHECK(strncmp(err, want, strlen(want)) == 0);

    p = write_script("local a = 1\nerror('top level')\n");
    CHECK(open_vm(p, err, sizeof err) == NULL);
    snprintf(want, sizeof want, "%s:2: top level", p);
    CHECK_STR(err, want);

    /* bytecode is refused: text mode only */
    p = write_script("\x1bLua");
    CHECK(open_vm(p, err, sizeof err) == NULL);
    CHECK(strstr(err, "binary") != NULL);

    CHECK(open_vm("/nonexistent/x.lua", err, sizeof err) == NULL);
    CHECK(strstr(err, "/nonexistent/x.lua") != NULL);
}

/* pbconv directly: the stack is left as found, on success and on error. */
static void test_pbconv_stack(void)
{
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    pbconv_open(L);
    struct arena a;
    arena_init(&a, 64);  /* tiny first chunk: the response must span several */
    pbconv_response resp;
    struct pbconv_result res;
    char err[256];
    CHECK(luaL_dostring(L, "return { add = { {'a', 'b'}, {'c', 1} }, remove = {'x'} }") == LUA_OK);
    lua_pushinteger(L, 99);  /* something above the value: idx need not be the top */
    CHECK(pbconv_to_response(L, -2, PBCONV_RESPONSE_HEADERS, &a, &resp, &res, err, sizeof err)
          == PBCONV_OK);
    CHECK(lua_gettop(L) == 2 && lua_tointeger(L, 2) == 99);
    CHECK(resp.response_case == RESP(RESPONSE_HEADERS));
    CHECK(resp.response_headers->response->header_mutation->n_set_headers == 2);
    uint8_t buf[256];
    size_t n = protobuf_c_message_pack(&resp.base, buf);
    CHECK(n == protobuf_c_message_get_packed_size(&resp.base) && n > 0);
    lua_settop(L, 0);
    arena_reset(&a);

    CHECK(luaL_dostring(L, "return { immediate = { headers = { {'a', 'b'}, {'c'} } } }") == LUA_OK);
    CHECK(pbconv_to_response(L, 1, PBCONV_REQUEST_HEADERS, &a, &resp, &res, err, sizeof err)
          == PBCONV_BAD);
    CHECK_STR(err, "on_request_headers returned a bad table: 'immediate.headers' entry 2 is not "
                   "a {name, value} pair");
    CHECK(lua_gettop(L) == 1);
    lua_pop(L, 1);

    lua_pushstring(L, "why");
    lua_setglobal(L, "why");
    CHECK(luaL_dostring(L, "return { deny = why }") == LUA_OK);
    CHECK(pbconv_to_response(L, 1, PBCONV_REQUEST_BODY, &a, &resp, &res, err, sizeof err)
          == PBCONV_DENY);
    CHECK(res.deny_len == 3 && memcmp(res.deny_message, "why", 3) == 0);
    CHECK(lua_gettop(L) == 1);
    lua_pop(L, 1);

    /* pushing: headers with uppercase names are folded; the object has the methods */
    Envoy__Config__Core__V3__HeaderMap map = ENVOY__CONFIG__CORE__V3__HEADER_MAP__INIT;
    HeaderValue hv = ENVOY__CONFIG__CORE__V3__HEADER_VALUE__INIT, *hvp = &hv;
    hv.key = "Content-Type";
    hv.value = "text/plain";
    map.n_headers = 1;
    map.headers = &hvp;
    pbconv_push_headers(L, &map, 1);
    lua_setglobal(L, "h");
    CHECK(luaL_dostring(L, "return h[1][1] .. '|' .. h:get('CONTENT-TYPE') .. '|' .. "
                           "tostring(h.end_of_stream)") == LUA_OK);
    CHECK_STR(lua_tostring(L, -1), "content-type|text/plain|true");
    lua_pop(L, 1);
    arena_destroy(&a);
    lua_close(L);
}

static void test_arena(void)
{
    struct arena a;
    arena_init(&a, 100);
    char *p = arena_alloc(&a, 1), *q = arena_alloc(&a, 3);
    CHECK(p != NULL && q != NULL && p != q);
    CHECK((uintptr_t)q % _Alignof(max_align_t) == 0);
    char *big = arena_alloc(&a, 100000);  /* larger than any chunk so far */
    CHECK(big != NULL);
    memset(big, 0xab, 100000);
    int *z = arena_calloc(&a, 10, sizeof *z);
    CHECK(z != NULL && z[0] == 0 && z[9] == 0);
    CHECK(arena_calloc(&a, SIZE_MAX / 2, 4) == NULL);
    CHECK(arena_alloc(&a, SIZE_MAX - 3) == NULL);
    arena_reset(&a);
    /* after the reset one chunk holds what the last round needed */
    char *r = arena_alloc(&a, 100000);
    CHECK(r != NULL);
    arena_reset(&a);
    CHECK(arena_alloc(&a, 100000) == r);
    /* as a protobuf-c allocator */
    ProtobufCAllocator pa = arena_pb_allocator(&a);
    static const uint8_t msg[] = {0x22, 0x03, 0x0a, 0x01, 'x'};  /* request_body { body: "x" } */
    Req *req = envoy__service__ext_proc__v3__processing_request__unpack(&pa, sizeof msg, msg);
    CHECK(req != NULL && req->request_case == 4 && req->request_body->body.len == 1);
    envoy__service__ext_proc__v3__processing_request__free_unpacked(req, &pa);  /* a no-op */
    arena_destroy(&a);
}

int main(void)
{
    if (getenv("TEST_VERBOSE") == NULL)
        log_set_level((enum log_level)(LOG_ERROR + 1));  /* expected errors stay quiet */
    CHECK(mkdtemp(tmpdir) != NULL);
    test_arena();
    test_pbconv_stack();
    test_basic_example();
    test_empty_results();
    test_headers_object();
    test_binary_body();
    test_ctx_state();
    test_add_forms();
    test_return_keys();
    test_immediate_and_deny();
    test_bad_returns();
    test_valid_names();
    test_lua_errors();
    test_malformed();
    test_observability_and_extras();
    test_open_errors();
    test_append_actions();
    test_mode_override_and_timeout();
    test_dynamic_metadata();
    test_immediate_every_phase();
    test_ctx_inputs();
    test_full_duplex();
    test_newest_protocol();
    test_new_bad_returns();
    test_deny_callout();
    test_process();
    test_require_from_script_dir();
    free_last();
    for (int i = 1; i <= nscripts; i++) {
        char p[256];
        snprintf(p, sizeof p, "%s/s%d.lua", tmpdir, i);
        unlink(p);
    }
    rmdir(tmpdir);
    printf("%d passed, 0 failed\n", passed);
    return 0;
}
