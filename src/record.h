/* record.h — --record DIR: finished streams written as record lines (docs/operations.md,
 * Recording traffic), one JSON line per stream in the exchange format that
 * `--check --request` and callout.testing.replay read.
 *
 * The serving thread only copies bytes: at a stream's start it decides whether the stream
 * is sampled, while it runs it copies each request as received and the answers the
 * script gave it, and at its end it queues the capture. One recorder thread per worker
 * process turns captures into lines with its own exchange state (the exchange Lua state
 * is not thread-safe, and serving must not pay for recording) and appends them to the
 * process's own file, DIR/luacallout-<UTC yyyymmddThhmmss>-<pid>.jsonl. Nothing here ever
 * blocks a serving thread: a full queue, a stream over its size cap, the process's share
 * of --record_max_mb reached or a write error each drop records and count them
 * (luacallout_record_streams_total). */
#ifndef LUACALLOUT_RECORD_H
#define LUACALLOUT_RECORD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct vm;
struct dispatch_reply;
struct record_capture;

struct record_config {
    const char *dir;
    double sample;              /* 0 < sample <= 1: the share of streams recorded */
    size_t max_stream_bytes;    /* a stream's raw bytes past this: not recorded */
    size_t max_bytes;           /* what this process may write (its share of the total) */
    int total_mb, processes;    /* the server-wide setting it is a share of (messages) */
    const char *redact;         /* comma-separated header names, any case; "" = none */
};

/* Supervisor, before serving: DIR exists (created 0700 with its missing parents) and a file
 * can be created in it. 0, or -1 with "--record DIR: why" in err. */
int record_check_dir(const char *dir, char *err, size_t errlen);

/* Worker process, before it serves: opens its file and starts the recorder thread. 0, or
 * -1 with why in err (then nothing is recorded). */
int record_start(const struct record_config *cfg, int slot, char *err, size_t errlen);

/* Worker process, when its drain begins: what is lost from now on is the shutdown's, and
 * the exit's log says so apart. */
void record_drain_began(void);

/* Worker process, after the last stream has ended: the recorder writes what is queued,
 * for at most timeout_ms (what is left then is dropped and counted), then stops. The log
 * then says what was not recorded (the metrics die with the process): what the shutdown
 * lost, and what the worker's whole life lost, if anything. */
void record_stop(int timeout_ms);

/* Set by record_start; read by record_begin on every stream. */
extern bool record_on;

struct record_capture *record_begin_sampled(const struct vm *vm, uint64_t stream);

/* Serving thread, at a stream's start: its capture, or NULL (not recording, sampled out,
 * recording stopped). With --record off the cost is this one branch. */
static inline struct record_capture *record_begin(const struct vm *vm, uint64_t stream)
{
    return record_on ? record_begin_sampled(vm, stream) : NULL;
}

/* Serving thread: one request as received and what dispatch_handle made of it (its
 * answers when it responded; none when it did not or failed the stream). A capture that
 * grows past --record_max_stream_kb stops copying (it is dropped at its end). */
void record_message(struct record_capture *c, const uint8_t *req, size_t len,
                    const struct dispatch_reply *reply);

/* Serving thread, when the stream is freed: its final status, then the capture goes to
 * the recorder's queue (or is dropped and counted). Frees or hands over c. */
void record_end(struct record_capture *c, int code, const char *message, size_t message_len);

#endif
