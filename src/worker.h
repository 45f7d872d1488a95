/* worker.h — the main thread of a worker process: started by the supervisor (exec of the
 * same binary with --worker_of), it receives the TLS identity and the generation to serve
 * over its control socket, runs one server (server.h) and follows the supervisor's
 * reloads and drain (DRAIN: health NOT_SERVING; STOP: stop accepting, finish, exit) until
 * it stops or the supervisor goes away. */
#ifndef LUACALLOUT_WORKER_H
#define LUACALLOUT_WORKER_H

struct config;

/* Runs the worker process; returns its exit code (0; 1 when it could not start; 3 when a
 * stuck handler kept it from stopping cleanly). */
int worker_run(const struct config *cfg);

#endif
