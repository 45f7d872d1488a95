/* fuzzcheck.h — what the fuzz targets hold every answer to, shared so that each target
 * checks the same thing the same way: a ProcessingResponse we send must decode with
 * protobuf-c (the reference decoder), re-encode to exactly the bytes we sent (our encoder
 * is canonical, as protobuf-c's is), and carry only valid UTF-8 in its `string` fields
 * (protobuf's C++ parser, Envoy's, rejects a message otherwise). A failed check aborts,
 * which libFuzzer reports as a crash with the input that caused it. */
#ifndef LUACALLOUT_FUZZCHECK_H
#define LUACALLOUT_FUZZCHECK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

/* Sends the server's log lines nowhere: a fuzzer calls handlers that fail on purpose
 * millions of times. */
void fuzzcheck_quiet_logs(void);

/* Whether s[0..len) is UTF-8 as protobuf's parser accepts it (no overlong forms, no
 * surrogates, nothing past U+10FFFF). Written here, apart from the server's own check, so
 * that the fuzzer does not trust what it tests. */
bool fuzzcheck_utf8(const char *s, size_t len);

/* Aborts unless every `string` field of m (recursively) is valid UTF-8. Known gaps can be
 * tolerated while they are being fixed: FUZZ_KNOWN_UTF8 is a comma-separated list of
 * "Message.field" (protobuf-c short names, e.g. "HeaderValue.key"); a hit on one of
 * those is reported once on stderr instead. */
void fuzzcheck_strings(const ProtobufCMessage *m);

/* Whether `name` is listed in FUZZ_KNOWN (comma-separated): a known failure, named where
 * it is checked (e.g. "empty-fail-message" in fuzz_dispatch.c), that a run exploring past
 * it tolerates. */
bool fuzzcheck_known(const char *name);

/* Aborts unless data[0..len) decodes as a ProcessingResponse with protobuf-c, packs back
 * to the same bytes and passes fuzzcheck_strings. `what` names the producer in the
 * message printed before aborting. */
void fuzzcheck_response(const uint8_t *data, size_t len, const char *what);

/* Prints why and aborts. */
void fuzzcheck_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

#endif
