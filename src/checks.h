/* checks.h — the leaf checks every converter shares (pbconv for the on_* return tables,
 * pbreflect for process(), pbstruct for Struct values), so that one value is judged, and
 * described in an error, the same way wherever it appears:
 *
 *   - what a proto string and an HTTP header may hold (UTF-8, Envoy's header-name rules);
 *   - integer ranges and enum names read from Lua values;
 *   - the shape of a Lua table (sequence or map) and how a key or a number reads in a message;
 *   - the error path ("where in the table") and the one way to write an error;
 *   - suggestions for a misspelled key or handler name, and the message of a bad return.
 *
 * Nothing here calls Lua code or raises: tables are read with lua_next/lua_rawget only and
 * key types are checked before lua_tolstring, so a traversal in progress is never broken. */
#ifndef LUACALLOUT_CHECKS_H
#define LUACALLOUT_CHECKS_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <lua.h>
#include <protobuf-c/protobuf-c.h>

/* Nesting refused beyond this, both ways, by every recursive converter (it also stops
 * cycles in Lua tables). protobuf's C++ parser has the same recursion limit. */
#define CHECKS_MAX_DEPTH 100

/* ---- strings and headers ---------------------------------------------------------------- */

/* Whether s[0..len) is valid UTF-8 (no overlongs, surrogates or code points past
 * U+10FFFF): protobuf's parsers reject a message whose string fields are not. */
bool checks_utf8_valid(const char *s, size_t len);
/* Length of the well-formed UTF-8 sequence at s[0..n) (n > 0), 0 if s does not start one. */
size_t checks_utf8_seq(const char *s, size_t n);

/* What a proto `string` field may not hold; NULL when s is fine, else the reason
 * ("contains a NUL byte": protobuf-c strings end at the first NUL; "is not valid UTF-8"). */
const char *checks_proto_string(const char *s, size_t len);

/* Why a header name is refused: Envoy's ext_proc fails the whole mutation when a name in
 * set_headers or remove_headers is not a valid HTTP header name (RFC 9110 token characters;
 * a pseudo-header is ':' then lower-case token characters). */
enum checks_name {
    CHECKS_NAME_OK,
    CHECKS_NAME_EMPTY,
    CHECKS_NAME_NUL,
    CHECKS_NAME_UTF8,    /* not UTF-8: the proto string itself would be refused */
    CHECKS_NAME_CHAR,    /* a byte Envoy refuses in a name, at *at */
};
enum checks_name checks_header_name(const char *s, size_t len, size_t *at);
/* The reason for a refused name that is not empty/NUL/UTF-8, e.g. "has ' ' at byte 2 (...)". */
void checks_header_name_why(const char *s, size_t len, size_t at, char *buf, size_t size);

/* Writes s as 'text' for a message: bytes that are not printable ASCII as \xNN, cut with
 * "..." past 64 bytes. */
void checks_quote(const char *s, size_t len, char *buf, size_t size);

/* ---- numbers ------------------------------------------------------------------------------ */

/* Writes the number at idx as a header value: as tostring() would, except that a float
 * with an integral value has no ".0" (10/2 is 5.0 in Lua 5.4, but "5" is meant). Returns
 * the length, or -1 (buf then holds NaN, inf or -inf) when the number is not finite. */
int checks_format_number(lua_State *L, int idx, char *buf, size_t size);
/* The same for an error message, where a float gets as many digits as read back the same
 * double (2^63 is 9.2233720368547758e+18, not a rounded 9.2233720368548e+18). */
int checks_describe_number(lua_State *L, int idx, char *buf, size_t size);

enum checks_int {
    CHECKS_INT_OK,
    CHECKS_INT_NOT_NUMBER,     /* not a Lua number (strings are not converted) */
    CHECKS_INT_NOT_INTEGRAL,   /* a float with a fraction, NaN or an infinity */
    CHECKS_INT_OUT_OF_RANGE,
};
/* The number at idx as an integer in [lo, hi]: a Lua integer, or a float with an integral
 * value. */
enum checks_int checks_integer(lua_State *L, int idx, int64_t lo, int64_t hi, int64_t *out);
/* The same for uint64, whose upper half no lua_Integer holds. */
enum checks_int checks_uint64(lua_State *L, int idx, uint64_t *out);
/* The one message for a proto integer type (`type` e.g. "int32") refused by the checks
 * above: "expected an integer (int32), got a string", "... got 1.5", "3000000000 is out of
 * range for int32 (-2147483648..2147483647)". `got` describes a non-number ("a string"). */
void checks_integer_message(lua_State *L, int idx, enum checks_int r, const char *type,
                            const char *range, const char *got, char *buf, size_t size);

/* ---- enums -------------------------------------------------------------------------------- */

/* The value of enum d named s[0..len) (exact, no NUL inside), or NULL. */
const ProtobufCEnumValue *checks_enum_by_name(const ProtobufCEnumDescriptor *d, const char *s,
                                              size_t len);
/* "A, B or C": every value name of d, for messages. */
void checks_enum_names(const ProtobufCEnumDescriptor *d, char *buf, size_t size);

/* ---- tables ------------------------------------------------------------------------------- */

struct checks_shape {
    size_t n;          /* entries */
    size_t strings;    /* string keys */
    size_t integers;   /* integer keys (any value) */
    int other;         /* the type of a key that is neither, LUA_TNONE when there is none */
    bool seq;          /* the keys are exactly 1..n (so also for an empty table) */
};
/* Counts the entries of the table at idx (absolute or relative) by key kind. Needs 2 free
 * stack slots; stack unchanged. */
void checks_table_shape(lua_State *L, int idx, struct checks_shape *s);

/* Describes the table key at idx as the script spells it: 'name' (with `prefix`, e.g.
 * "immediate.", inside the quotes), [3], [1.5], [true], or "of type function"; a non-string
 * key is followed by " in <prefix without its dot>" when there is a prefix. */
void checks_describe_key(lua_State *L, int idx, const char *prefix, char *buf, size_t size);

/* ---- the error path and the one way to fail ----------------------------------------------- */

/* Where a converter is in the value it converts, e.g.
 * `response.request_headers.response.header_mutation.set_headers[1]` or
 * `dynamic_metadata["my.ns"].list[2]`: grown as it descends and cut back as it returns. */
struct checks_path {
    size_t len;
    char buf[512];   /* truncated when very long */
};
/* Appends printf-style text; returns the previous length, for checks_path_restore. */
size_t checks_path_push(struct checks_path *p, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void checks_path_restore(struct checks_path *p, size_t old);
/* Appends a string key: `.key` for identifiers, `["my.key"]` otherwise (non-printable bytes
 * shown as '?', long keys cut at 64 bytes). Returns the previous length. */
size_t checks_path_push_key(struct checks_path *p, const char *key, size_t len);
/* Appends the Lua key at idx: a string as above, [3], [1.5], [true], [table]. */
size_t checks_path_push_lua_key(struct checks_path *p, lua_State *L, int idx);

/* Where an error message goes and what starts it: "<lead_name><lead_text><path>: <message>"
 * (no ": " at an empty path; the lead parts are left out when NULL). */
struct checks_err {
    char *buf;
    size_t size;
    const char *lead_name;   /* e.g. "on_request_headers" */
    const char *lead_text;   /* e.g. " returned a bad table: " */
    struct checks_path path;
};
/* Starts e with an empty message and path; `path` (NULL: none) is the first part of it. */
void checks_err_init(struct checks_err *e, char *buf, size_t size, const char *path);
/* Writes the message; returns -1 so a converter can `return checks_fail(...)`. */
int checks_fail(struct checks_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int checks_vfail(struct checks_err *e, const char *fmt, va_list ap);

/* ---- errors that teach -------------------------------------------------------------------- */

/* The name a key is most likely a misspelling of: offer every known name, then ask. A name
 * is close when it differs only in case, is at most 1 (keys up to 4 bytes) or 2 edits away
 * (insert, delete, replace, swap two neighbours), or one is a prefix of the other (3 bytes at
 * least). Two names equally close give no suggestion: a guess should not mislead. */
struct checks_near {
    const char *key;
    size_t len;
    bool prefixes;     /* prefix matches count (keys of a table; not handler names) */
    int best_score;
    const char *best;
    bool tie;
};
void checks_near_init(struct checks_near *s, const char *key, size_t len);
/* The same for the table key at idx; a key that is not a string gets no suggestion. */
void checks_near_init_lua(struct checks_near *s, lua_State *L, int idx);
void checks_near_offer(struct checks_near *s, const char *name);
/* The suggestion, or NULL. */
const char *checks_near_best(const struct checks_near *s);
/* Writes " (did you mean '<prefix><best>'?)", or "" when best is NULL. */
void checks_did_you_mean(const char *best, const char *prefix, char *buf, size_t size);

/* The handler a global function name looks like a misspelling of (on_response_header ->
 * on_response_headers, Process -> process), or NULL (also for the handlers themselves).
 * Stricter than key suggestions (no prefixes, 1 edit for names under 9 bytes) so that a
 * helper such as `progress` or `on_request` is not taken for a handler. */
const char *checks_misspelled_handler(const char *global_name);

/* The message of a bad return value, with the place the script author looks first:
 * "<src>:<line>: on_request_headers (defined here) returned a bad table: unknown key 'ad'".
 * `detail` is what the converter wrote (pbconv_to_responses, or "process returned a bad
 * response: ..."), which starts with the handler's name; the line is the one where the
 * handler is defined (lua_Debug.linedefined), as the call site is inside the server. */
void checks_bad_table_message(char *buf, size_t size, const char *src, int line,
                              const char *handler, const char *detail);

#endif
