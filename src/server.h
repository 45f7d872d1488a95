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
 * rest, joins the workers and frees everything. */
void server_stop(struct server *srv, int grace_ms);

#endif
