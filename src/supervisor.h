/* supervisor.h — the process luacallout starts as: it loads the script, holds the ports,
 * starts one worker process per --threads (worker.h: each runs its own grpc server on the
 * shared ports, so no two workers ever contend for a poller or a lock), serves health and
 * metrics, reloads every worker with the same generation, starts a worker again when one
 * dies, and drains and stops them all on SIGTERM (supervisor.c, drain). grpc is never
 * initialised here, so forking is safe. */
#ifndef LUACALLOUT_SUPERVISOR_H
#define LUACALLOUT_SUPERVISOR_H

#include <signal.h>

struct config;

/* The signals the supervisor takes (TERM, INT, HUP, CHLD): main blocks them before any
 * thread starts, and they stay blocked in workers across exec. */
void supervisor_signals(sigset_t *set);

/* Runs until SIGTERM or SIGINT (SIGHUP reloads); returns the process's exit code: 0; 1
 * when start-up failed; 3 when a worker had to be abandoned with a handler stuck. */
int supervisor_run(const struct config *cfg, int argc, char **argv);

#endif
