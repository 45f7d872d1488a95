/* arena.h — a bump allocator for one message's worth of protobuf-c structs.
 *
 * Decoding a ProcessingRequest and building the ProcessingResponse allocate many small
 * objects that all die together when the reply has been packed. An arena turns those
 * into pointer bumps and a single reset, instead of a malloc/free per field.
 *
 * Memory is a list of chunks. arena_reset() keeps one chunk, grown to the high-water mark
 * of the previous round (up to ARENA_KEEP_MAX), so a steady stream of similar messages
 * stops calling malloc after the first one. Not thread-safe: one arena per worker. */
#ifndef LUACALLOUT_ARENA_H
#define LUACALLOUT_ARENA_H

#include <stddef.h>

#include <protobuf-c/protobuf-c.h>

/* Largest chunk a reset keeps; bigger rounds (huge bodies) give their memory back. */
#define ARENA_KEEP_MAX ((size_t)1 << 20)

struct arena_chunk;

struct arena {
    struct arena_chunk *head;  /* chunk being filled; older chunks follow via ->next */
    size_t first_size;         /* size of the first chunk of a round */
};

/* No memory is taken until the first allocation. first_size 0 picks a default. */
void arena_init(struct arena *a, size_t first_size);
/* Frees every chunk; the arena can be used again after arena_init. */
void arena_destroy(struct arena *a);
/* Invalidates every pointer handed out since the last reset. */
void arena_reset(struct arena *a);

/* Memory aligned for any type, uninitialised; NULL when malloc fails. */
void *arena_alloc(struct arena *a, size_t size);
/* Same, zero-filled; NULL on overflow of n * size too. */
void *arena_calloc(struct arena *a, size_t n, size_t size);

/* An allocator for protobuf_c_message_unpack() whose free is a no-op: everything the
 * decoder allocates goes away with the next arena_reset(). */
ProtobufCAllocator arena_pb_allocator(struct arena *a);

#endif
