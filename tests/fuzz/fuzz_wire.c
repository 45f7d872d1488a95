/* fuzz_wire.c — our wire codec (pbwire.c) against protobuf-c, the reference, both ways and
 * byte for byte, on every input:
 *
 *   decode  the bytes as a ProcessingRequest with pbwire_unpack_request and with protobuf-c.
 *           When pbwire accepts them, protobuf-c must too, and both structs must pack to the
 *           same bytes (protobuf_c_message_pack is the judge of both).
 *   encode  the bytes decoded as a ProcessingResponse by protobuf-c (and the request decoded
 *           above), packed by pbwire_pack_backward and by protobuf_c_message_pack: the bytes
 *           must be identical, and pbwire must refuse a buffer one byte too short.
 *
 * protobuf-c's unpack recurses without a bound: run with -max_len small enough that a
 * nested Struct cannot overflow the stack (scripts/fuzz does), until decoding is bounded. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "fuzzcheck.h"
#include "pbwire.h"
#include "wirecheck.h"

typedef Envoy__Service__ExtProc__V3__ProcessingRequest Request;
typedef Envoy__Service__ExtProc__V3__ProcessingResponse Response;

static struct arena arena;

static uint8_t *packed(const ProtobufCMessage *m, size_t *n)
{
    *n = protobuf_c_message_get_packed_size(m);
    uint8_t *b = malloc(*n ? *n : 1);
    if (b == NULL)
        abort();
    if (protobuf_c_message_pack(m, b) != *n)
        fuzzcheck_fail("protobuf-c packs a different size than it computed");
    return b;
}

/* pbwire's encoding of m is protobuf-c's; it fits exactly and not in one byte less. */
static void same_encoding(const ProtobufCMessage *m, const char *what)
{
    size_t n;
    uint8_t *want = packed(m, &n);
    /* a buffer of exactly n bytes on the heap: ASan sees any write outside it */
    uint8_t *buf = malloc(n ? n : 1);
    if (buf == NULL)
        abort();
    uint8_t *first = pbwire_pack_backward(m, buf, buf + n);
    if (first != buf)
        fuzzcheck_fail("%s: pbwire did not fill exactly %zu bytes (%s)", what, n,
                       first ? "started late" : "refused");
    if (memcmp(buf, want, n) != 0)
        fuzzcheck_fail("%s: pbwire's %zu bytes differ from protobuf-c's", what, n);
    if (n > 0 && pbwire_pack_backward(m, buf + 1, buf + n) != NULL)
        fuzzcheck_fail("%s: pbwire packed %zu bytes into %zu", what, n, n - 1);
    free(buf);
    free(want);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    arena_init(&arena, 0);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* decode: the fast path must agree with protobuf-c whenever it accepts the bytes */
    Request *fast = pbwire_unpack_request(data, size, &arena);
    /* protobuf-c recurses without bound: only bytes the server's own scan lets through
     * reach it, as in dispatch.c (the scan is fuzzed here too) */
    struct wirecheck_result scan;
    char why[600];
    if (wirecheck_depth(data, size, &envoy__service__ext_proc__v3__processing_request__descriptor,
                        NULL, &scan, why, sizeof why) != 0) {
        if (fast != NULL)
            fuzzcheck_fail("pbwire decoded %zu bytes the depth scan refuses: %s", size, why);
        arena_reset(&arena);
        return 0;
    }
    Request *slow = envoy__service__ext_proc__v3__processing_request__unpack(NULL, size, data);
    if (fast != NULL) {
        if (slow == NULL)
            fuzzcheck_fail("pbwire decoded %zu bytes that protobuf-c rejects", size);
        size_t nf, ns;
        uint8_t *f = packed(&fast->base, &nf), *s = packed(&slow->base, &ns);
        if (nf != ns || memcmp(f, s, nf) != 0)
            fuzzcheck_fail("pbwire and protobuf-c decode %zu bytes differently", size);
        free(f);
        free(s);
        same_encoding(&fast->base, "request (pbwire's decoding)");
    }
    if (slow != NULL) {
        same_encoding(&slow->base, "request");
        envoy__service__ext_proc__v3__processing_request__free_unpacked(slow, NULL);
    }
    arena_reset(&arena);

    /* encode: every response protobuf-c can decode from these bytes */
    Response *r = envoy__service__ext_proc__v3__processing_response__unpack(NULL, size, data);
    if (r != NULL) {
        same_encoding(&r->base, "response");
        envoy__service__ext_proc__v3__processing_response__free_unpacked(r, NULL);
    }
    return 0;
}
