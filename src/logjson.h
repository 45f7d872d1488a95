/* logjson.h — JSON text for log records, written into a fixed buffer that is never
 * overrun: every call appends one whole syntactic element or nothing (and then marks the
 * writer full), so whatever was written is a valid prefix that logjson_close can close.
 * Strings are escaped for JSON (quote, backslash, every control character) and made valid
 * UTF-8 (a byte that does not start a well-formed sequence becomes U+FFFD), and may be cut
 * to a byte budget at a character boundary, marked with "...". Room for the brackets that
 * close what is open is always kept (len + depth <= cap), so logjson_close never fails and
 * a record is always complete. No allocation, no locale,
 * no global state: safe from any thread, and fuzzed (tests/fuzz/fuzz_logjson.c). */
#ifndef LUACALLOUT_LOGJSON_H
#define LUACALLOUT_LOGJSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define LOGJSON_MAX_DEPTH 32

struct logjson {
    char *buf;
    size_t cap;     /* bytes buf may hold */
    size_t len;     /* bytes written */
    int depth;      /* open objects and arrays, at most LOGJSON_MAX_DEPTH */
    uint32_t arrays;/* bit d set: the container at depth d+1 is an array */
    bool first;     /* nothing written yet in the innermost open object or array */
    bool after_key; /* a key was written: its value comes next, without a comma */
    size_t key_at;  /* where that key (with its comma) began */
    bool full;      /* an element did not fit and was left out */
};

void logjson_init(struct logjson *j, char *buf, size_t cap);

/* Escapes s[0..n) into out[0..cap) without quotes: whole escapes and whole UTF-8
 * sequences only. Returns how many input bytes were consumed (n when all of it fitted);
 * *written is the output length. */
size_t logjson_escape(char *out, size_t cap, const char *s, size_t n, size_t *written);

/* Containers: open writes '{' or '[' (after a comma when needed), close the innermost
 * open one (never fails). In an object a value is accepted only right after its key, so
 * a key that did not fit takes its value with it. A key is written with logjson_key before the value of an object member. */
bool logjson_open(struct logjson *j, char bracket);
void logjson_close(struct logjson *j);
/* `"key":` — escaped like a string, never cut. */
bool logjson_key(struct logjson *j, const char *key, size_t n);

/* Values. logjson_string writes at most max bytes of escaped content (SIZE_MAX: as much
 * as fits); a longer string is cut at a character boundary and ends in "...". It fails
 * (writes nothing) only when not even the quotes and the marker fit. */
bool logjson_string(struct logjson *j, const char *s, size_t n, size_t max);
bool logjson_int(struct logjson *j, long long v);
/* A finite double in shortest round-trip form; NaN and infinities, which JSON cannot
 * hold, are written as null. */
bool logjson_number(struct logjson *j, double v);
bool logjson_bool(struct logjson *j, bool v);
bool logjson_null(struct logjson *j);
/* Bytes that are already JSON, verbatim: a value, or (members) `"k":v,...` of the open
 * object, e.g. made by another logjson writer. */
bool logjson_raw(struct logjson *j, const char *s, size_t n);
bool logjson_members(struct logjson *j, const char *s, size_t n);

/* The position to go back to if a group of elements (a key and its value) must be all
 * or nothing. */
struct logjson_mark { size_t len; int depth; uint32_t arrays; bool first, after_key; };
static inline struct logjson_mark logjson_mark(const struct logjson *j)
{
    return (struct logjson_mark){j->len, j->depth, j->arrays, j->first, j->after_key};
}
static inline void logjson_rewind(struct logjson *j, struct logjson_mark m)
{
    j->len = m.len;
    j->depth = m.depth;
    j->arrays = m.arrays;
    j->first = m.first;
    j->after_key = m.after_key;
}

#endif
