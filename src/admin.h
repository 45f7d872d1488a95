/* admin.h — the HTTP(S) health listener: liveness and readiness probes, Prometheus metrics,
 * and 200 on any other path. It runs on its own thread with plain sockets, never touching
 * gRPC or Lua. */
#ifndef LUACALLOUT_ADMIN_H
#define LUACALLOUT_ADMIN_H

#include <stdbool.h>
#include <stddef.h>

struct tls_identity;
struct admin;

/* What GET /live and GET /ready report. Each function is called on the listener's thread
 * for every probe, so it must be quick, never block and be safe to call from that thread
 * (read an atomic flag). A NULL function means "always true". */
struct admin_probes {
    bool (*live)(void *ud);  /* false: /live answers 503 (e.g. a worker is wedged) */
    bool (*ready)(void *ud); /* false: /ready answers 503 (e.g. draining) */
    void *ud;
};

/* Binds address ("host:port", "[v6]:port") synchronously, so a bad address or a port in
 * use is reported here as one line in err, then serves on a new thread. With id non-NULL
 * the listener speaks HTTPS. probes is copied; NULL means both probes always pass. */
struct admin *admin_start(const char *address, const struct tls_identity *id,
                          const struct admin_probes *probes, char *err, size_t errlen);
/* A reloaded certificate and key for the HTTPS connections accepted from now on (open ones
 * finish with theirs); nothing to do on a plain HTTP listener. The listener never asks for
 * client certificates, whatever id->client_ca_pem says: probes (kubelet's) present none.
 * Safe from any thread. 0, or -1 with err (the old identity stays). */
int admin_set_identity(struct admin *a, const struct tls_identity *id, char *err,
                       size_t errlen);
/* Stops the thread, closes every connection and the socket. NULL is a no-op. */
void admin_stop(struct admin *a);

#endif
