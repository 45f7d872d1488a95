/* test_wire.c — our proto/ copy speaks Envoy's wire format. Each row packs a message with
 * exactly one field set and compares the bytes with an encoding written by hand from
 * Envoy's field numbers (tag = field << 3 | wire type), so a renumbered or retyped field in
 * proto/ fails here before it fails against a real Envoy. A few rows also decode. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "envoy/service/ext_proc/v3/external_processor.pb-c.h"

#include "check.h"

/* A pointer to a static message of type T (descriptor D) with the given fields set. */
#define M(T, D, ...) (&(T){.base = PROTOBUF_C_MESSAGE_INIT(&D), __VA_ARGS__})
#define BASE(p) (&(p)->base)

#define EP(name) envoy__service__ext_proc__v3__##name##__descriptor
#define CORE(name) envoy__config__core__v3__##name##__descriptor
#define GP(name) google__protobuf__##name##__descriptor

typedef Envoy__Service__ExtProc__V3__ProcessingRequest ProcessingRequest;
typedef Envoy__Service__ExtProc__V3__ProcessingRequest__AttributesEntry ReqAttr;
typedef Envoy__Service__ExtProc__V3__ProcessingResponse ProcessingResponse;
typedef Envoy__Service__ExtProc__V3__HttpHeaders HttpHeaders;
typedef Envoy__Service__ExtProc__V3__HttpHeaders__AttributesEntry HdrAttr;
typedef Envoy__Service__ExtProc__V3__HttpBody HttpBody;
typedef Envoy__Service__ExtProc__V3__HttpTrailers HttpTrailers;
typedef Envoy__Service__ExtProc__V3__HeadersResponse HeadersResponse;
typedef Envoy__Service__ExtProc__V3__BodyResponse BodyResponse;
typedef Envoy__Service__ExtProc__V3__TrailersResponse TrailersResponse;
typedef Envoy__Service__ExtProc__V3__CommonResponse CommonResponse;
typedef Envoy__Service__ExtProc__V3__ImmediateResponse ImmediateResponse;
typedef Envoy__Service__ExtProc__V3__GrpcStatus GrpcStatus;
typedef Envoy__Service__ExtProc__V3__HeaderMutation HeaderMutation;
typedef Envoy__Service__ExtProc__V3__BodyMutation BodyMutation;
typedef Envoy__Service__ExtProc__V3__StreamedBodyResponse StreamedBodyResponse;
typedef Envoy__Service__ExtProc__V3__StreamedImmediateResponse StreamedImmediateResponse;
typedef Envoy__Service__ExtProc__V3__ProtocolConfiguration ProtocolConfiguration;
typedef Envoy__Config__Core__V3__HeaderValue HeaderValue;
typedef Envoy__Config__Core__V3__HeaderValueOption HeaderValueOption;
typedef Envoy__Config__Core__V3__HeaderMap HeaderMap;
typedef Envoy__Config__Core__V3__Metadata Metadata;
typedef Envoy__Config__Core__V3__Metadata__FilterMetadataEntry FilterMetaEntry;
typedef Envoy__Config__Core__V3__Metadata__TypedFilterMetadataEntry TypedMetaEntry;
typedef Envoy__Type__V3__HttpStatus HttpStatus;
typedef Envoy__Extensions__Filters__Http__ExtProc__V3__ProcessingMode ProcessingMode;
typedef Google__Protobuf__Struct Struct;
typedef Google__Protobuf__Struct__FieldsEntry FieldsEntry;
typedef Google__Protobuf__Value Value;
typedef Google__Protobuf__ListValue ListValue;
typedef Google__Protobuf__Duration Duration;
typedef Google__Protobuf__BoolValue BoolValue;
typedef Google__Protobuf__Any Any;

#define EMPTY_STRUCT M(Struct, GP(struct))
#define PROCESSING_MODE_DESC envoy__extensions__filters__http__ext_proc__v3__processing_mode__descriptor

struct row {
    const char *name;
    const ProtobufCMessage *msg;
    const char *hex;  /* expected bytes, space-separated */
};

/* HttpHeaders.attributes and HeaderValueOption.append are deprecated in Envoy's API but
 * still on the wire; naming them here is the point. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
static const struct row rows[] = {
    /* ProcessingRequest: the phase oneof 2..7, then 8..11 */
    {"ProcessingRequest.request_headers = 2",
     BASE(M(ProcessingRequest, EP(processing_request), .request_case = 2,
            .request_headers = M(HttpHeaders, EP(http_headers)))), "12 00"},
    {"ProcessingRequest.response_headers = 3",
     BASE(M(ProcessingRequest, EP(processing_request), .request_case = 3,
            .response_headers = M(HttpHeaders, EP(http_headers)))), "1a 00"},
    {"ProcessingRequest.request_body = 4",
     BASE(M(ProcessingRequest, EP(processing_request), .request_case = 4,
            .request_body = M(HttpBody, EP(http_body)))), "22 00"},
    {"ProcessingRequest.response_body = 5",
     BASE(M(ProcessingRequest, EP(processing_request), .request_case = 5,
            .response_body = M(HttpBody, EP(http_body)))), "2a 00"},
    {"ProcessingRequest.request_trailers = 6",
     BASE(M(ProcessingRequest, EP(processing_request), .request_case = 6,
            .request_trailers = M(HttpTrailers, EP(http_trailers)))), "32 00"},
    {"ProcessingRequest.response_trailers = 7",
     BASE(M(ProcessingRequest, EP(processing_request), .request_case = 7,
            .response_trailers = M(HttpTrailers, EP(http_trailers)))), "3a 00"},
    {"ProcessingRequest.metadata_context = 8",
     BASE(M(ProcessingRequest, EP(processing_request),
            .metadata_context = M(Metadata, CORE(metadata)))), "42 00"},
    {"ProcessingRequest.attributes = 9 (map<string, Struct>)",
     BASE(M(ProcessingRequest, EP(processing_request), .n_attributes = 1,
            .attributes = (ReqAttr *[]){M(ReqAttr, EP(processing_request__attributes_entry),
                                          .key = "a", .value = EMPTY_STRUCT)})),
     "4a 05 0a 01 61 12 00"},
    {"ProcessingRequest.observability_mode = 10",
     BASE(M(ProcessingRequest, EP(processing_request), .observability_mode = 1)), "50 01"},
    {"ProcessingRequest.protocol_config = 11",
     BASE(M(ProcessingRequest, EP(processing_request),
            .protocol_config = M(ProtocolConfiguration, EP(protocol_configuration)))), "5a 00"},

    /* ProcessingResponse: the oneof 1..7 and 11, then 8..10 and 12 */
    {"ProcessingResponse.request_headers = 1",
     BASE(M(ProcessingResponse, EP(processing_response), .response_case = 1,
            .request_headers = M(HeadersResponse, EP(headers_response)))), "0a 00"},
    {"ProcessingResponse.response_headers = 2",
     BASE(M(ProcessingResponse, EP(processing_response), .response_case = 2,
            .response_headers = M(HeadersResponse, EP(headers_response)))), "12 00"},
    {"ProcessingResponse.request_body = 3",
     BASE(M(ProcessingResponse, EP(processing_response), .response_case = 3,
            .request_body = M(BodyResponse, EP(body_response)))), "1a 00"},
    {"ProcessingResponse.response_body = 4",
     BASE(M(ProcessingResponse, EP(processing_response), .response_case = 4,
            .response_body = M(BodyResponse, EP(body_response)))), "22 00"},
    {"ProcessingResponse.request_trailers = 5",
     BASE(M(ProcessingResponse, EP(processing_response), .response_case = 5,
            .request_trailers = M(TrailersResponse, EP(trailers_response)))), "2a 00"},
    {"ProcessingResponse.response_trailers = 6",
     BASE(M(ProcessingResponse, EP(processing_response), .response_case = 6,
            .response_trailers = M(TrailersResponse, EP(trailers_response)))), "32 00"},
    {"ProcessingResponse.immediate_response = 7",
     BASE(M(ProcessingResponse, EP(processing_response), .response_case = 7,
            .immediate_response = M(ImmediateResponse, EP(immediate_response)))), "3a 00"},
    {"ProcessingResponse.dynamic_metadata = 8",
     BASE(M(ProcessingResponse, EP(processing_response), .dynamic_metadata = EMPTY_STRUCT)),
     "42 00"},
    {"ProcessingResponse.mode_override = 9",
     BASE(M(ProcessingResponse, EP(processing_response),
            .mode_override = M(ProcessingMode, PROCESSING_MODE_DESC))), "4a 00"},
    {"ProcessingResponse.override_message_timeout = 10",
     BASE(M(ProcessingResponse, EP(processing_response),
            .override_message_timeout = M(Duration, GP(duration)))), "52 00"},
    {"ProcessingResponse.streamed_immediate_response = 11",
     BASE(M(ProcessingResponse, EP(processing_response), .response_case = 11,
            .streamed_immediate_response = M(StreamedImmediateResponse,
                                             EP(streamed_immediate_response)))), "5a 00"},
    {"ProcessingResponse.request_drain = 12",
     BASE(M(ProcessingResponse, EP(processing_response), .request_drain = 1)), "60 01"},

    /* StreamedImmediateResponse: the oneof 1..3 */
    {"StreamedImmediateResponse.headers_response = 1",
     BASE(M(StreamedImmediateResponse, EP(streamed_immediate_response), .response_case = 1,
            .headers_response = M(HttpHeaders, EP(http_headers)))), "0a 00"},
    {"StreamedImmediateResponse.body_response = 2",
     BASE(M(StreamedImmediateResponse, EP(streamed_immediate_response), .response_case = 2,
            .body_response = M(StreamedBodyResponse, EP(streamed_body_response)))), "12 00"},
    {"StreamedImmediateResponse.trailers_response = 3",
     BASE(M(StreamedImmediateResponse, EP(streamed_immediate_response), .response_case = 3,
            .trailers_response = M(HeaderMap, CORE(header_map)))), "1a 00"},

    /* HttpHeaders, HttpBody, HttpTrailers */
    {"HttpHeaders.headers = 1",
     BASE(M(HttpHeaders, EP(http_headers), .headers = M(HeaderMap, CORE(header_map)))), "0a 00"},
    {"HttpHeaders.attributes = 2 (map<string, Struct>)",
     BASE(M(HttpHeaders, EP(http_headers), .n_attributes = 1,
            .attributes = (HdrAttr *[]){M(HdrAttr, EP(http_headers__attributes_entry),
                                          .key = "a", .value = EMPTY_STRUCT)})),
     "12 05 0a 01 61 12 00"},
    {"HttpHeaders.end_of_stream = 3",
     BASE(M(HttpHeaders, EP(http_headers), .end_of_stream = 1)), "18 01"},
    {"HttpBody.body = 1",
     BASE(M(HttpBody, EP(http_body), .body = {1, (uint8_t *)"x"})), "0a 01 78"},
    {"HttpBody.end_of_stream = 2",
     BASE(M(HttpBody, EP(http_body), .end_of_stream = 1)), "10 01"},
    {"HttpBody.end_of_stream_without_message = 3",
     BASE(M(HttpBody, EP(http_body), .end_of_stream_without_message = 1)), "18 01"},
    {"HttpBody.grpc_message_compressed = 4",
     BASE(M(HttpBody, EP(http_body), .grpc_message_compressed = 1)), "20 01"},
    {"HttpTrailers.trailers = 1",
     BASE(M(HttpTrailers, EP(http_trailers), .trailers = M(HeaderMap, CORE(header_map)))),
     "0a 00"},

    /* the three phase responses */
    {"HeadersResponse.response = 1",
     BASE(M(HeadersResponse, EP(headers_response),
            .response = M(CommonResponse, EP(common_response)))), "0a 00"},
    {"BodyResponse.response = 1",
     BASE(M(BodyResponse, EP(body_response),
            .response = M(CommonResponse, EP(common_response)))), "0a 00"},
    {"TrailersResponse.header_mutation = 1",
     BASE(M(TrailersResponse, EP(trailers_response),
            .header_mutation = M(HeaderMutation, EP(header_mutation)))), "0a 00"},

    /* CommonResponse */
    {"CommonResponse.status = 1 (CONTINUE_AND_REPLACE = 1)",
     BASE(M(CommonResponse, EP(common_response), .status = 1)), "08 01"},
    {"CommonResponse.header_mutation = 2",
     BASE(M(CommonResponse, EP(common_response),
            .header_mutation = M(HeaderMutation, EP(header_mutation)))), "12 00"},
    {"CommonResponse.body_mutation = 3",
     BASE(M(CommonResponse, EP(common_response),
            .body_mutation = M(BodyMutation, EP(body_mutation)))), "1a 00"},
    {"CommonResponse.trailers = 4",
     BASE(M(CommonResponse, EP(common_response), .trailers = M(HeaderMap, CORE(header_map)))),
     "22 00"},
    {"CommonResponse.clear_route_cache = 5",
     BASE(M(CommonResponse, EP(common_response), .clear_route_cache = 1)), "28 01"},

    /* ImmediateResponse and GrpcStatus */
    {"ImmediateResponse.status = 1",
     BASE(M(ImmediateResponse, EP(immediate_response),
            .status = M(HttpStatus, envoy__type__v3__http_status__descriptor))), "0a 00"},
    {"ImmediateResponse.headers = 2",
     BASE(M(ImmediateResponse, EP(immediate_response),
            .headers = M(HeaderMutation, EP(header_mutation)))), "12 00"},
    {"ImmediateResponse.body = 3",
     BASE(M(ImmediateResponse, EP(immediate_response), .body = {1, (uint8_t *)"x"})),
     "1a 01 78"},
    {"ImmediateResponse.grpc_status = 4",
     BASE(M(ImmediateResponse, EP(immediate_response),
            .grpc_status = M(GrpcStatus, EP(grpc_status)))), "22 00"},
    {"ImmediateResponse.details = 5",
     BASE(M(ImmediateResponse, EP(immediate_response), .details = "d")), "2a 01 64"},
    {"GrpcStatus.status = 1",
     BASE(M(GrpcStatus, EP(grpc_status), .status = 7)), "08 07"},

    /* mutations */
    {"HeaderMutation.set_headers = 1",
     BASE(M(HeaderMutation, EP(header_mutation), .n_set_headers = 1,
            .set_headers = (HeaderValueOption *[]){M(HeaderValueOption,
                                                     CORE(header_value_option))})),
     "0a 00"},
    {"HeaderMutation.remove_headers = 2",
     BASE(M(HeaderMutation, EP(header_mutation), .n_remove_headers = 1,
            .remove_headers = (char *[]){"r"})), "12 01 72"},
    {"BodyMutation.body = 1",
     BASE(M(BodyMutation, EP(body_mutation), .mutation_case = 1, .body = {1, (uint8_t *)"x"})),
     "0a 01 78"},
    {"BodyMutation.clear_body = 2",
     BASE(M(BodyMutation, EP(body_mutation), .mutation_case = 2, .clear_body = 1)), "10 01"},
    {"BodyMutation.streamed_response = 3",
     BASE(M(BodyMutation, EP(body_mutation), .mutation_case = 3,
            .streamed_response = M(StreamedBodyResponse, EP(streamed_body_response)))),
     "1a 00"},
    {"StreamedBodyResponse.body = 1",
     BASE(M(StreamedBodyResponse, EP(streamed_body_response), .body = {1, (uint8_t *)"x"})),
     "0a 01 78"},
    {"StreamedBodyResponse.end_of_stream = 2",
     BASE(M(StreamedBodyResponse, EP(streamed_body_response), .end_of_stream = 1)), "10 01"},
    {"StreamedBodyResponse.end_of_stream_without_message = 3",
     BASE(M(StreamedBodyResponse, EP(streamed_body_response),
            .end_of_stream_without_message = 1)), "18 01"},
    {"StreamedBodyResponse.grpc_message_compressed = 4",
     BASE(M(StreamedBodyResponse, EP(streamed_body_response), .grpc_message_compressed = 1)),
     "20 01"},

    /* envoy.config.core.v3 */
    {"HeaderValue.key = 1", BASE(M(HeaderValue, CORE(header_value), .key = "k")), "0a 01 6b"},
    {"HeaderValue.value = 2", BASE(M(HeaderValue, CORE(header_value), .value = "v")), "12 01 76"},
    {"HeaderValue.raw_value = 3",
     BASE(M(HeaderValue, CORE(header_value), .raw_value = {1, (uint8_t *)"r"})), "1a 01 72"},
    {"HeaderValueOption.header = 1",
     BASE(M(HeaderValueOption, CORE(header_value_option),
            .header = M(HeaderValue, CORE(header_value)))), "0a 00"},
    {"HeaderValueOption.append = 2 (BoolValue)",
     BASE(M(HeaderValueOption, CORE(header_value_option),
            .append = M(BoolValue, GP(bool_value), .value = 1))), "12 02 08 01"},
    {"HeaderValueOption.append_action = 3 (OVERWRITE_IF_EXISTS_OR_ADD = 2)",
     BASE(M(HeaderValueOption, CORE(header_value_option), .append_action = 2)), "18 02"},
    {"HeaderValueOption.keep_empty_value = 4",
     BASE(M(HeaderValueOption, CORE(header_value_option), .keep_empty_value = 1)), "20 01"},
    {"HeaderMap.headers = 1",
     BASE(M(HeaderMap, CORE(header_map), .n_headers = 1,
            .headers = (HeaderValue *[]){M(HeaderValue, CORE(header_value))})), "0a 00"},
    {"Metadata.filter_metadata = 1 (map<string, Struct>)",
     BASE(M(Metadata, CORE(metadata), .n_filter_metadata = 1,
            .filter_metadata = (FilterMetaEntry *[]){M(FilterMetaEntry,
                                                       CORE(metadata__filter_metadata_entry),
                                                       .key = "a", .value = EMPTY_STRUCT)})),
     "0a 05 0a 01 61 12 00"},
    {"Metadata.typed_filter_metadata = 2 (map<string, Any>)",
     BASE(M(Metadata, CORE(metadata), .n_typed_filter_metadata = 1,
            .typed_filter_metadata = (TypedMetaEntry *[]){M(
                TypedMetaEntry, CORE(metadata__typed_filter_metadata_entry), .key = "a",
                .value = M(Any, GP(any)))})),
     "12 05 0a 01 61 12 00"},

    /* envoy.type.v3, ext_proc.v3 filter config */
    {"HttpStatus.code = 1 (404)",
     BASE(M(HttpStatus, envoy__type__v3__http_status__descriptor, .code = 404)), "08 94 03"},
    {"ProcessingMode.request_header_mode = 1",
     BASE(M(ProcessingMode, PROCESSING_MODE_DESC, .request_header_mode = 1)), "08 01"},
    {"ProcessingMode.response_header_mode = 2",
     BASE(M(ProcessingMode, PROCESSING_MODE_DESC, .response_header_mode = 1)), "10 01"},
    {"ProcessingMode.request_body_mode = 3",
     BASE(M(ProcessingMode, PROCESSING_MODE_DESC, .request_body_mode = 1)), "18 01"},
    {"ProcessingMode.response_body_mode = 4",
     BASE(M(ProcessingMode, PROCESSING_MODE_DESC, .response_body_mode = 1)), "20 01"},
    {"ProcessingMode.request_trailer_mode = 5",
     BASE(M(ProcessingMode, PROCESSING_MODE_DESC, .request_trailer_mode = 1)), "28 01"},
    {"ProcessingMode.request_body_mode = 3 (GRPC = 5)",
     BASE(M(ProcessingMode, PROCESSING_MODE_DESC, .request_body_mode = 5)), "18 05"},
    {"ProcessingMode.response_trailer_mode = 6",
     BASE(M(ProcessingMode, PROCESSING_MODE_DESC, .response_trailer_mode = 1)), "30 01"},
    {"ProtocolConfiguration.request_body_mode = 1 (BUFFERED = 2)",
     BASE(M(ProtocolConfiguration, EP(protocol_configuration), .request_body_mode = 2)), "08 02"},
    {"ProtocolConfiguration.response_body_mode = 2 (BUFFERED = 2)",
     BASE(M(ProtocolConfiguration, EP(protocol_configuration), .response_body_mode = 2)), "10 02"},
    {"ProtocolConfiguration.response_body_mode = 2 (GRPC = 5)",
     BASE(M(ProtocolConfiguration, EP(protocol_configuration), .response_body_mode = 5)), "10 05"},
    {"ProtocolConfiguration.send_body_without_waiting_for_header_response = 3",
     BASE(M(ProtocolConfiguration, EP(protocol_configuration),
            .send_body_without_waiting_for_header_response = 1)), "18 01"},

    /* google.protobuf */
    {"Struct.fields = 1 (map<string, Value>)",
     BASE(M(Struct, GP(struct), .n_fields = 1,
            .fields = (FieldsEntry *[]){M(FieldsEntry, GP(struct__fields_entry), .key = "a",
                                          .value = M(Value, GP(value)))})),
     "0a 05 0a 01 61 12 00"},
    {"Value.null_value = 1",
     BASE(M(Value, GP(value), .kind_case = 1, .null_value = 0)), "08 00"},
    {"Value.number_value = 2 (1.5)",
     BASE(M(Value, GP(value), .kind_case = 2, .number_value = 1.5)),
     "11 00 00 00 00 00 00 f8 3f"},
    {"Value.string_value = 3",
     BASE(M(Value, GP(value), .kind_case = 3, .string_value = "s")), "1a 01 73"},
    {"Value.bool_value = 4",
     BASE(M(Value, GP(value), .kind_case = 4, .bool_value = 1)), "20 01"},
    {"Value.struct_value = 5",
     BASE(M(Value, GP(value), .kind_case = 5, .struct_value = EMPTY_STRUCT)), "2a 00"},
    {"Value.list_value = 6",
     BASE(M(Value, GP(value), .kind_case = 6, .list_value = M(ListValue, GP(list_value)))),
     "32 00"},
    {"ListValue.values = 1",
     BASE(M(ListValue, GP(list_value), .n_values = 1,
            .values = (Value *[]){M(Value, GP(value))})), "0a 00"},
    {"Duration.seconds = 1", BASE(M(Duration, GP(duration), .seconds = 5)), "08 05"},
    {"Duration.nanos = 2", BASE(M(Duration, GP(duration), .nanos = 7)), "10 07"},
    {"BoolValue.value = 1", BASE(M(BoolValue, GP(bool_value), .value = 1)), "08 01"},
    {"Any.type_url = 1", BASE(M(Any, GP(any), .type_url = "t")), "0a 01 74"},
    {"Any.value = 2", BASE(M(Any, GP(any), .value = {1, (uint8_t *)"v"})), "12 01 76"},
};
#pragma GCC diagnostic pop

/* "0a 01 78" -> bytes; returns the count. */
static size_t unhex(const char *hex, uint8_t *out, size_t cap)
{
    size_t n = 0;
    while (*hex != '\0') {
        if (*hex == ' ') {
            hex++;
            continue;
        }
        unsigned v;
        CHECK(sscanf(hex, "%2x", &v) == 1);
        CHECK(n < cap);
        out[n++] = (uint8_t)v;
        hex += 2;
    }
    return n;
}

static void print_hex(const char *label, const uint8_t *p, size_t n)
{
    fprintf(stderr, "  %s:", label);
    for (size_t i = 0; i < n; i++)
        fprintf(stderr, " %02x", p[i]);
    fprintf(stderr, "\n");
}

static void test_encodings(void)
{
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        uint8_t want[64], got[64];
        size_t wn = unhex(rows[i].hex, want, sizeof want);
        size_t gn = protobuf_c_message_get_packed_size(rows[i].msg);
        CHECK(gn <= sizeof got);
        CHECK(protobuf_c_message_pack(rows[i].msg, got) == gn);
        if (gn != wn || memcmp(got, want, gn) != 0) {
            fprintf(stderr, "%s:\n", rows[i].name);
            print_hex("want", want, wn);
            print_hex("got ", got, gn);
        }
        CHECK(gn == wn && memcmp(got, want, gn) == 0);
    }
}

/* The other direction, as Envoy's bytes arrive. */
static void test_decoding(void)
{
    uint8_t buf[64];
    /* request_body { body: "x" end_of_stream: true } observability_mode: true */
    size_t n = unhex("22 05 0a 01 78 10 01 50 01", buf, sizeof buf);
    ProcessingRequest *rq = envoy__service__ext_proc__v3__processing_request__unpack(NULL, n, buf);
    CHECK(rq != NULL);
    CHECK(rq->request_case == ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_REQUEST_BODY);
    CHECK(rq->request_body->body.len == 1 && rq->request_body->body.data[0] == 'x');
    CHECK(rq->request_body->end_of_stream);
    CHECK(rq->observability_mode);
    envoy__service__ext_proc__v3__processing_request__free_unpacked(rq, NULL);

    /* response_headers { headers { headers { key: "k" raw_value: "vv" } } end_of_stream: true } */
    n = unhex("1a 0d 0a 09 0a 07 0a 01 6b 1a 02 76 76 18 01", buf, sizeof buf);
    rq = envoy__service__ext_proc__v3__processing_request__unpack(NULL, n, buf);
    CHECK(rq != NULL);
    CHECK(rq->request_case == ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_REQUEST__REQUEST_RESPONSE_HEADERS);
    CHECK(rq->response_headers->end_of_stream);
    CHECK(rq->response_headers->headers->n_headers == 1);
    HeaderValue *hv = rq->response_headers->headers->headers[0];
    CHECK(strcmp(hv->key, "k") == 0 && hv->raw_value.len == 2 && memcmp(hv->raw_value.data, "vv", 2) == 0);
    envoy__service__ext_proc__v3__processing_request__free_unpacked(rq, NULL);

    /* immediate_response { status { code: 404 } grpc_status { status: 16 } } */
    n = unhex("3a 09 0a 03 08 94 03 22 02 08 10", buf, sizeof buf);
    ProcessingResponse *rs = envoy__service__ext_proc__v3__processing_response__unpack(NULL, n, buf);
    CHECK(rs != NULL);
    CHECK(rs->response_case == ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_IMMEDIATE_RESPONSE);
    CHECK(rs->immediate_response->status->code == 404);
    CHECK(rs->immediate_response->grpc_status->status == 16);
    envoy__service__ext_proc__v3__processing_response__free_unpacked(rs, NULL);

    /* request_body { end_of_stream: true end_of_stream_without_message: true
     *                grpc_message_compressed: true } — GRPC body mode's flags */
    n = unhex("22 06 10 01 18 01 20 01", buf, sizeof buf);
    rq = envoy__service__ext_proc__v3__processing_request__unpack(NULL, n, buf);
    CHECK(rq != NULL);
    CHECK(rq->request_body->end_of_stream && rq->request_body->end_of_stream_without_message &&
          rq->request_body->grpc_message_compressed && rq->request_body->body.len == 0);
    envoy__service__ext_proc__v3__processing_request__free_unpacked(rq, NULL);

    /* streamed_immediate_response { headers_response { headers { headers { key: ":status"
     * raw_value: "200" } } } } request_drain: true */
    n = unhex("5a 14 0a 12 0a 10 0a 0e 0a 07 3a 73 74 61 74 75 73 1a 03 32 30 30 60 01", buf,
              sizeof buf);
    rs = envoy__service__ext_proc__v3__processing_response__unpack(NULL, n, buf);
    CHECK(rs != NULL);
    CHECK(rs->response_case ==
          ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_STREAMED_IMMEDIATE_RESPONSE);
    CHECK(rs->request_drain);
    CHECK(rs->streamed_immediate_response->response_case ==
          ENVOY__SERVICE__EXT_PROC__V3__STREAMED_IMMEDIATE_RESPONSE__RESPONSE_HEADERS_RESPONSE);
    hv = rs->streamed_immediate_response->headers_response->headers->headers[0];
    CHECK(strcmp(hv->key, ":status") == 0 && hv->raw_value.len == 3);
    envoy__service__ext_proc__v3__processing_response__free_unpacked(rs, NULL);

    /* request_trailers {} — the smallest valid reply, as our server sends it */
    n = unhex("2a 00", buf, sizeof buf);
    rs = envoy__service__ext_proc__v3__processing_response__unpack(NULL, n, buf);
    CHECK(rs != NULL);
    CHECK(rs->response_case == ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_TRAILERS);
    CHECK(rs->request_trailers != NULL && rs->request_trailers->header_mutation == NULL);
    envoy__service__ext_proc__v3__processing_response__free_unpacked(rs, NULL);
}

int main(void)
{
    test_encodings();
    test_decoding();
    printf("%d passed, 0 failed (%zu wire rows)\n", passed, sizeof rows / sizeof rows[0]);
    return 0;
}
