/* admin.h — the HTTP(S) health listener: GET on any path answers 200 with an empty body.
 * It runs on its own thread with plain sockets, never touching gRPC or Lua. */
#ifndef LUACALLOUT_ADMIN_H
#define LUACALLOUT_ADMIN_H

#include <stddef.h>

struct tls_identity;
struct admin;

/* Binds address ("host:port", "[v6]:port") synchronously, so a bad address or a port in
 * use is reported here as one line in err, then serves on a new thread. With id non-NULL
 * the listener speaks HTTPS. */
struct admin *admin_start(const char *address, const struct tls_identity *id, char *err,
                          size_t errlen);
/* Stops the thread and closes the socket. */
void admin_stop(struct admin *a);

#endif
