/* wirecheck.h — a bounded look at a message's wire bytes before any recursive decoder sees
 * them. protobuf-c's unpack recurses once per nesting level without limit, so a 41 KB
 * Struct nested 3,000 deep would overflow a worker's stack: this scan walks the same bytes
 * with an explicit stack of at most WIRECHECK_MAX_DEPTH frames and refuses deeper nesting,
 * naming the field path. It reads the message descriptors protobuf-c generated, so it
 * knows which length-delimited fields are messages. */
#ifndef LUACALLOUT_WIRECHECK_H
#define LUACALLOUT_WIRECHECK_H

#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

/* As protobuf's own C++ parser: messages nested deeper than this are refused. */
#define WIRECHECK_MAX_DEPTH 100

struct wirecheck_result {
    size_t ctx_bytes;   /* bytes of the top-level attributes and metadata_context fields */
};

/* 0 when no message in data nests deeper than WIRECHECK_MAX_DEPTH; -1 with "path: why" in
 * err otherwise. Malformed bytes are not judged here (0): the decoder that follows decides.
 * Fields named in ctx_fields (top-level field numbers, 0-terminated) have their lengths
 * summed into res->ctx_bytes. */
int wirecheck_depth(const uint8_t *data, size_t len, const ProtobufCMessageDescriptor *desc,
                    const uint32_t *ctx_fields, struct wirecheck_result *res, char *err,
                    size_t errlen);

#endif
