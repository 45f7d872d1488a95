/* server.h — one worker process's gRPC server: listeners, worker threads, graceful
 * shutdown. The supervisor (supervisor.h) runs one per worker process. */
#ifndef LUACALLOUT_SERVER_H
#define LUACALLOUT_SERVER_H

#include <stddef.h>

struct config;
struct snapshot;
struct tls_identity;
struct server;

/* Builds one VM of the snapshot per worker thread (cfg->threads), opens the enabled gRPC
 * listeners (shared with the other worker processes: SO_REUSEPORT) and starts the
 * threads. `slot` numbers this process's workers in the log; `processes` is how many
 * worker processes share the server-wide limits. NULL with one line in err when anything
 * fails (the script, a port). */
struct server *server_start(const struct config *cfg, const struct tls_identity *id,
                            struct snapshot *snap, int slot, int processes, char *err,
                            size_t errlen);

/* A reload in two steps, so that a generation reaches every worker process or none:
 * server_build makes one VM of the snapshot per worker thread (NULL with "file:line: msg"
 * in err); server_hand_over makes them the generation new streams start on (streams
 * already open finish on the one they started with); server_discard drops them instead. */
struct vm;
struct vm **server_build(struct server *srv, struct snapshot *snap, char *err, size_t errlen);
void server_hand_over(struct server *srv, struct vm **vms);
void server_discard(struct server *srv, struct vm **vms);

/* The certificate, key and client CA of the TLS port from the next handshake on; open
 * connections keep theirs. A no-op without a TLS port. 0, or -1 when out of memory. */
int server_set_identity(struct server *srv, const struct tls_identity *id);

/* The drain has begun: gRPC health answers NOT_SERVING (open Watches hear it); streams
 * are still accepted. */
void server_drain(struct server *srv);

/* Stops accepting calls (GOAWAY), lets calls in flight finish for up to `timeout_ms`,
 * cancels the rest, joins the workers and frees everything: 0. When streams did not end within 2 s of
 * their cancellation, gives up on them without freeing anything, and the process should
 * exit: -1 when a worker is stuck in a handler (a failure), -2 when no worker is and the
 * streams are held by the transport (clients that stopped reading). */
int server_stop(struct server *srv, int timeout_ms);

/* The control thread's periodic work (every 100 ms or so): builds the spare VMs workers
 * asked for, and runs the watchdog, which logs (once per call) and counts a worker stuck
 * in one handler call past its budget by more than a margin. */
void server_tick(struct server *srv);

/* How many workers are stuck that way now (any thread); *nworkers gets the total. */
int server_stuck_workers(struct server *srv, int *nworkers);

#endif
