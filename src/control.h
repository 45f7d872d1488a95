/* control.h — the supervisor's conversation with a worker process: length-prefixed records
 * over a socketpair (the worker's end is inherited across exec). */
#ifndef LUACALLOUT_CONTROL_H
#define LUACALLOUT_CONTROL_H

#include <stddef.h>
#include <stdint.h>

/* Reload records carry the reload's attempt number, so that an answer left over from an
 * earlier reload (one that was aborted before every answer was read) is never taken for
 * this one's: GENERATION starts with it (8 bytes, little-endian) before the packed snapshot;
 * COMMIT and ABORT are it, in decimal; LOADED, FAILED and SERVING start with it in
 * decimal and a space (FAILED then has the error). Start-up is attempt 0. */
enum control_type {
    CONTROL_IDENTITY = 1,    /* supervisor: the TLS identity (tls_identity_pack: certificate,
                              * key, client CA), first at start-up, again when reloaded */
    CONTROL_GENERATION = 2,  /* supervisor: a generation to serve (snapshot_pack bytes) */
    CONTROL_READY = 3,       /* worker: listening and serving the first generation */
    CONTROL_LOADED = 4,      /* worker: a later generation is built, not serving yet */
    CONTROL_FAILED = 5,      /* worker: it could not be built, or could not start (the error) */
    CONTROL_COMMIT = 6,      /* supervisor: serve the generation built last */
    CONTROL_ABORT = 7,       /* supervisor: drop it (another worker could not build it) */
    CONTROL_SERVING = 8,     /* worker: new streams now start on it */
    CONTROL_DRAIN = 9,       /* supervisor: draining: health NOT_SERVING, still accepting */
    CONTROL_STOP = 10,       /* supervisor: the grace is over: stop accepting, let open
                              * streams finish for --drain_timeout_ms, cancel the rest, exit */
};

/* Writes one whole record, waiting as long as it takes. 0, or -1 (errno). */
int control_send(int fd, uint32_t type, const void *data, size_t len);

/* Reads one record, waiting up to timeout_ms (-1: no limit). 1 with *data malloc'd (with a
 * NUL after its *len bytes); 0 when the other end closed; -1 on timeout (errno ETIMEDOUT)
 * or error. */
int control_recv(int fd, uint32_t *type, char **data, size_t *len, int timeout_ms);

#endif
