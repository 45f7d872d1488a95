/* tag.h — what a completion-queue tag points at: every grpc batch we start carries a
 * struct tag embedded in its owner, and the worker loop calls tag->done when the batch
 * completes. */
#ifndef LUACALLOUT_TAG_H
#define LUACALLOUT_TAG_H

#include <stdbool.h>
#include <stddef.h>

struct tag {
    void (*done)(struct tag *tag, bool ok);
};

#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

#endif
