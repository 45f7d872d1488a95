/* fuzz_exchange.c — libFuzzer target for the exchange format (src/exchange.c,
 * lua/callout/exchange.lua): what `luacallout send` and `--check --request` read from a
 * file, and what `--record` writes about bytes a client sent.
 *
 * First byte even: the rest is a request file's text. Reading it either fails with a message
 * that names the file ("input...") or gives streams of messages; every message that is not
 * raw bytes must decode as a ProcessingRequest.
 * First byte odd: the rest is the bytes of one request, as a client may send them. Its record
 * line must read back as exactly one stream of one message, and recording that message again
 * must give the same line (what --record writes, replay sends unchanged).
 *
 * cmake -S . -B build-fuzz -DFUZZ=ON -DCMAKE_C_COMPILER=clang
 * cmake --build build-fuzz --target fuzz_exchange
 * build-fuzz/fuzz_exchange CORPUS_DIR   (a copy of tests/fuzz/corpus/fuzz_exchange) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "exchange.h"
#include "fuzzcheck.h"

static struct exchange *x;

static void fail(const char *what, const char *s, size_t n)
{
    fprintf(stderr, "fuzz_exchange: %s: %.*s\n", what, (int)(n > 400 ? 400 : n), s);
    abort();
}

static char *record(const uint8_t *msg, size_t len, size_t *outlen)
{
    const uint8_t *req[1] = {msg};
    size_t lens[1] = {len}, nresp[1] = {0};
    struct exchange_capture c = {
        .nreq = 1, .req = req, .req_lens = lens, .nresp = nresp, .status = 3,
        .message = "bad", .script = "s.lua", .sha256 = "0", .generation = 1, .stream = 1,
        .time = 1.5,
    };
    static const char *const redact[] = {"authorization", NULL};
    char err[512];
    char *line = exchange_record_line(x, &c, redact, outlen, err, sizeof err);
    if (!line)
        fail("a request does not record", err, strlen(err));
    return line;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (x == NULL) {
        char err[256];
        if ((x = exchange_new(err, sizeof err)) == NULL)
            fail("exchange_new", err, strlen(err));
    }
    if (size == 0)
        return 0;
    char err[1024];
    struct exchange_msgs *streams = NULL;
    size_t n = 0;
    if ((data[0] & 1) == 0) {
        if (exchange_read_text(x, (const char *)data + 1, size - 1, "input", &streams, &n, err,
                               sizeof err) != 0) {
            if (strncmp(err, "input", 5) != 0)
                fail("an error that does not name the file", err, strlen(err));
            return 0;
        }
        exchange_msgs_free(streams, n);
        return 0;
    }
    size_t l1, l2;
    char *line1 = record(data + 1, size - 1, &l1);
    if (exchange_read_text(x, line1, l1, "record", &streams, &n, err, sizeof err) != 0)
        fail("a record line does not read back", err, strlen(err));
    if (n != 1 || streams[0].count != 1)
        fail("a record line of one request reads back as another count", line1, l1);
    char *line2 = record(streams[0].data[0], streams[0].lens[0], &l2);
    if (l1 != l2 || memcmp(line1, line2, l1) != 0) {
        fprintf(stderr, "first:  %.*s\nsecond: %.*s\n", (int)l1, line1, (int)l2, line2);
        fail("recording the replayed bytes gives another line", "", 0);
    }
    free(line1);
    free(line2);
    exchange_msgs_free(streams, n);
    return 0;
}
