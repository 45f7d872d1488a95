/* arena.c — chunked bump allocator; see arena.h for why. */
#include "arena.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ALIGN _Alignof(max_align_t)
#define ROUND_UP(n) (((n) + ALIGN - 1) & ~(ALIGN - 1))
#define DEFAULT_FIRST_SIZE ((size_t)16 << 10)
/* Chunks double while they are smaller than this; past it they are sized to the request. */
#define GROW_MAX ((size_t)1 << 20)

struct arena_chunk {
    struct arena_chunk *next;
    size_t size;  /* bytes usable after the header */
    size_t used;
};

#define HDR ROUND_UP(sizeof(struct arena_chunk))

static struct arena_chunk *chunk_new(size_t size, struct arena_chunk *next)
{
    if (size > SIZE_MAX - HDR)
        return NULL;
    struct arena_chunk *c = malloc(HDR + size);
    if (c == NULL)
        return NULL;
    c->next = next;
    c->size = size;
    c->used = 0;
    return c;
}

void arena_init(struct arena *a, size_t first_size)
{
    a->head = NULL;
    a->first_size = first_size ? ROUND_UP(first_size) : DEFAULT_FIRST_SIZE;
}

void arena_destroy(struct arena *a)
{
    struct arena_chunk *c = a->head;
    while (c != NULL) {
        struct arena_chunk *next = c->next;
        free(c);
        c = next;
    }
    a->head = NULL;
}

void arena_reset(struct arena *a)
{
    struct arena_chunk *c = a->head;
    if (c == NULL)
        return;
    if (c->next == NULL) {  /* the common case: everything fit in one chunk */
        c->used = 0;
        return;
    }
    /* Several chunks: this round outgrew the first one. Replace them all with one chunk
     * as large as their sum, so the next similar round fits without malloc. */
    size_t total = 0;
    while (c != NULL) {
        struct arena_chunk *next = c->next;
        total += c->size;
        free(c);
        c = next;
    }
    if (total > ARENA_KEEP_MAX)
        total = ARENA_KEEP_MAX;
    if (total > a->first_size)
        a->first_size = total;
    a->head = chunk_new(a->first_size, NULL);  /* NULL is fine: the next alloc retries */
}

void *arena_alloc(struct arena *a, size_t size)
{
    if (size > SIZE_MAX - ALIGN)
        return NULL;
    size = ROUND_UP(size);
    struct arena_chunk *c = a->head;
    if (c == NULL || c->size - c->used < size) {
        size_t want = c == NULL ? a->first_size : c->size * 2;
        if (want > GROW_MAX)
            want = GROW_MAX;
        if (want < size)
            want = size;
        c = chunk_new(want, a->head);
        if (c == NULL)
            return NULL;
        a->head = c;
    }
    void *p = (char *)c + HDR + c->used;
    c->used += size;
    return p;
}

void *arena_calloc(struct arena *a, size_t n, size_t size)
{
    if (size != 0 && n > SIZE_MAX / size)
        return NULL;
    void *p = arena_alloc(a, n * size);
    if (p != NULL)
        memset(p, 0, n * size);
    return p;
}

static void *pb_alloc(void *data, size_t size) { return arena_alloc(data, size); }

static void pb_free(void *data, void *p)
{
    (void)data;
    (void)p;
}

ProtobufCAllocator arena_pb_allocator(struct arena *a)
{
    return (ProtobufCAllocator){.alloc = pb_alloc, .free = pb_free, .allocator_data = a};
}
