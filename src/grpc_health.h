/* grpc_health.h — grpc.health.v1.Health on the gRPC ports: Check and Watch, what Envoy's
 * and Google Cloud's gRPC health checks call. One status for the whole worker process,
 * SERVING until the drain starts; the services it answers for are "" (the server) and
 * envoy.service.ext_proc.v3.ExternalProcessor. Health calls are not ext_proc streams:
 * no script, no idle timeout, not in the stream counters. */
#ifndef LUACALLOUT_GRPC_HEALTH_H
#define LUACALLOUT_GRPC_HEALTH_H

#include <grpc/grpc.h>
#include <stdbool.h>

enum grpc_health_method { GRPC_HEALTH_NONE, GRPC_HEALTH_CHECK, GRPC_HEALTH_WATCH };

/* Which health method `method` (a call's path) is, if any. */
enum grpc_health_method grpc_health_method_of(const grpc_slice *method);

/* Serves one Check or Watch call (worker thread); takes ownership of `call`, which was
 * requested on the calling worker's queue. has_vm false: the worker has no script VM to
 * run streams on, so it answers NOT_SERVING whatever the process's status. */
void grpc_health_start(grpc_call *call, enum grpc_health_method method, bool has_vm);

/* The process's status (any thread): every open Watch gets the new one. */
void grpc_health_set_serving(bool serving);

/* The drain is over (any thread): every open Watch ends with OK, and one opened from now
 * on ends right after its first answer. */
void grpc_health_end_watches(void);

/* Health calls started and not yet freed: like streams, they may still start batches, so
 * the worker queues must stay open until this is 0. */
long grpc_health_live_count(void);

#endif
