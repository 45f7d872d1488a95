/* server.h — the gRPC server: listeners, worker threads, graceful shutdown. */
#ifndef LUACALLOUT_SERVER_H
#define LUACALLOUT_SERVER_H

#include <stddef.h>

struct config;
struct tls_identity;
struct server;

/* Loads the script once per worker, opens the enabled gRPC listeners and starts the
 * workers. NULL with one line in err when anything fails (script, address, port in use). */
struct server *server_start(const struct config *cfg, const struct tls_identity *id,
                            char *err, size_t errlen);

/* Loads the script again as a new generation for every worker: new streams start on it,
 * streams already open finish on the generation they started with. On failure the error
 * (file:line: msg) is logged and the current generation keeps serving. Thread-safe; 0 on
 * success, -1 on failure. */
int server_reload(struct server *srv);

/* Stops accepting calls, lets calls in flight finish for up to `grace_ms`, cancels the
 * rest, joins the workers and frees everything: 0. When streams did not end within 2 s of
 * their cancellation, gives up on them without freeing anything, and the process should
 * exit: -1 when a worker is stuck in a handler (a failure), -2 when no worker is and the
 * streams are held by the transport (clients that stopped reading). */
int server_stop(struct server *srv, int grace_ms);

/* The control thread's periodic work (every 100 ms or so): builds the spare VMs workers
 * asked for, and runs the watchdog, which logs (once per call) and counts a worker stuck
 * in one handler call past its budget by more than a margin. */
void server_tick(struct server *srv);

/* How many workers are stuck that way now (any thread); *nworkers gets the total. */
int server_stuck_workers(struct server *srv, int *nworkers);

#endif
