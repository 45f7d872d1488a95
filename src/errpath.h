/* errpath.h — where a conversion error is: a path such as
 * `response.request_headers.response.header_mutation.set_headers[1]` or
 * `dynamic_metadata["my.ns"].list[2]`, grown and cut back as a converter descends, and the
 * error message that starts with it. Shared by pbstruct.c and pbreflect.c. */
#ifndef LUACALLOUT_ERRPATH_H
#define LUACALLOUT_ERRPATH_H

#include <stdarg.h>
#include <stddef.h>

struct errpath {
    size_t len;
    char buf[512];   /* truncated when very long */
};

/* Appends printf-style text; returns the previous length, for errpath_restore. */
size_t errpath_push(struct errpath *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void errpath_restore(struct errpath *p, size_t old);
/* Appends a string key: `.key` for identifiers, `["my.key"]` otherwise (non-printable bytes
 * shown as '?', long keys cut at 64 bytes). Returns the previous length. */
size_t errpath_push_key(struct errpath *p, const char *key, size_t len);
/* Writes "path: message" (or just the message at an empty path) into err; returns -1, so a
 * converter can `return errpath_fail(...)`. */
int errpath_vfail(const struct errpath *p, char *err, size_t errlen, const char *fmt, va_list ap);

#endif
