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

/* Stops accepting calls, lets calls in flight finish for up to `grace_ms`, cancels the
 * rest, joins the workers and frees everything. */
void server_stop(struct server *srv, int grace_ms);

#endif
