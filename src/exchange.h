/* exchange.h — the exchange format (docs/testing.md) in the binary: a plain Lua state, not
 * a script VM, running lua/callout/exchange.lua, so that `luacallout send`,
 * `--check --request` and `--record` read and write exactly what callout.testing does.
 * A state serves one thread at a time. */
#ifndef LUACALLOUT_EXCHANGE_H
#define LUACALLOUT_EXCHANGE_H

#include <stddef.h>
#include <stdint.h>

struct exchange;

struct exchange *exchange_new(char *err, size_t errlen);
void exchange_free(struct exchange *x);

/* One stream of a request file: its ProcessingRequest messages, as bytes. */
struct exchange_msgs {
    size_t count;
    uint8_t **data;
    size_t *lens;
    int line;          /* where the stream starts in the file */
};

/* The streams of a request file (path "-": stdin): a JSON array or JSON lines of request
 * messages (one stream), or record lines (one stream each). -1 with "file:line: why" in err.
 * Free with exchange_msgs_free. */
int exchange_read_file(struct exchange *x, const char *path, struct exchange_msgs **streams,
                       size_t *nstreams, char *err, size_t errlen);
/* The same for text already read; `name` stands for the file in errors. */
int exchange_read_text(struct exchange *x, const char *text, size_t len, const char *name,
                       struct exchange_msgs **streams, size_t *nstreams, char *err,
                       size_t errlen);
void exchange_msgs_free(struct exchange_msgs *streams, size_t n);

/* One ProcessingResponse's bytes -> its JSON text, one line (malloc'd, no newline), *outlen
 * bytes. NULL with err when the bytes are not a ProcessingResponse. */
char *exchange_response_line(struct exchange *x, const uint8_t *msg, size_t len, size_t *outlen,
                             char *err, size_t errlen);

/* {"stream":n,"status":{"code":N,"name":"NAME","message":"..."}} ("stream" only when n > 0),
 * malloc'd, no newline. NULL when out of memory. */
char *exchange_status_line(struct exchange *x, int code, const char *message, int stream,
                           size_t *outlen);

/* A finished stream, as the server received and sent it. */
struct exchange_capture {
    size_t nreq;
    const uint8_t *const *req;         /* requests as received */
    const size_t *req_lens;
    const size_t *nresp;               /* nresp[i]: answers sent after request i */
    const uint8_t *const *resp;        /* every answer, in order */
    const size_t *resp_lens;
    int status;                        /* the stream's final gRPC status */
    const char *message;               /* its message ("" or NULL for none) */
    const char *script, *sha256;       /* the generation that served it */
    uint64_t generation, stream;
    double time;                       /* when it started, Unix seconds */
};

/* The capture as one record line (malloc'd, no newline). `redact`: NULL-terminated header
 * names (any case) whose values are written "[redacted]"; may be NULL. NULL with err on
 * failure. */
char *exchange_record_line(struct exchange *x, const struct exchange_capture *c,
                           const char *const *redact, size_t *outlen, char *err, size_t errlen);

#endif
