/* pbwire.h — the protobuf wire format on the per-message path, faster than protobuf-c's
 * generic code and producing (or accepting) exactly the same bytes and structs.
 *
 * Packing writes a message backwards from the end of a buffer: a nested message's length
 * is known once its contents are written, so every size is computed once instead of once
 * per nesting level. Unpacking handles the messages Envoy sends for nearly every phase
 * (headers, a body, trailers, observability_mode) and leaves anything else to protobuf-c. */
#ifndef LUACALLOUT_PBWIRE_H
#define LUACALLOUT_PBWIRE_H

#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

#include "arena.h"
#include "envoy/service/ext_proc/v3/external_processor.pb-c.h"

/* Packs msg so that it ends at `end` (writing backwards, never before `start`). Returns the
 * first byte of the encoding, or NULL when it does not fit in [start, end). The bytes are
 * those protobuf_c_message_pack would produce (fields in number order, unknown fields
 * last). */
uint8_t *pbwire_pack_backward(const ProtobufCMessage *msg, uint8_t *start, uint8_t *end);

/* Decodes a ProcessingRequest that carries only a phase (headers, body or trailers),
 * end_of_stream and observability_mode, into structs allocated in the arena — the same
 * structs protobuf-c would build. Bytes fields point into `data`, which must outlive the
 * result; strings are copied with their terminating NUL. NULL when the message has
 * anything else (attributes, metadata, protocol_config, an unknown field) or is malformed:
 * the caller then unpacks it with protobuf-c, which decides. */
Envoy__Service__ExtProc__V3__ProcessingRequest *pbwire_unpack_request(const uint8_t *data,
                                                                      size_t len,
                                                                      struct arena *a);

#endif
