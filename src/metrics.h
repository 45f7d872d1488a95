/* metrics.h — the server's counters, updated lock-free from any thread of any process and
 * rendered in Prometheus text format by the health listener's /metrics.
 *
 * Each worker process counts into its own slot of a shared mapping the supervisor created
 * (metrics_share); the supervisor counts reloads into its own and renders the sum. A slot
 * outlives its process: a worker started in its place goes on counting from there. */
#ifndef LUACALLOUT_METRICS_H
#define LUACALLOUT_METRICS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

struct metrics {
    _Atomic uint64_t streams_total;
    _Atomic int64_t streams_active;
    _Atomic uint64_t messages_total;
    _Atomic uint64_t stream_errors_total;      /* streams ended with a non-OK status */
    _Atomic uint64_t reloads_total;            /* successful reloads */
    _Atomic uint64_t reload_failures_total;
    _Atomic uint64_t script_generation;        /* 1 = the script loaded at start-up */
    _Atomic uint64_t script_loaded_unix_ms;    /* when the current generation was loaded */
    _Atomic uint64_t script_load_us;           /* how long loading it took (all workers) */
    _Atomic uint64_t watchdog_stuck_total;     /* handler calls found stuck past the budget */
    _Atomic int64_t workers_serving;           /* worker processes serving (gauge) */
    _Atomic int64_t workers_stuck;             /* workers stuck in a handler (watchdog) */
    _Atomic uint64_t worker_restarts_total;    /* worker processes that ended unexpectedly */
    _Atomic int64_t reload_in_progress;        /* 1 while workers take a new generation */
    /* not rendered: what the supervisor watches in each worker's slot */
    _Atomic uint64_t heartbeat_ms;             /* CLOCK_MONOTONIC of the main thread's last tick */
    _Atomic uint64_t stuck_since_ms;           /* when the stuck handler call began, or 0 */
    _Atomic uint64_t building_since_ms;        /* the main thread is building VMs (a top
                                                * level runs) since then, or 0 */
};

/* Where this process counts: a private struct until metrics_share or metrics_attach. */
extern struct metrics *metrics;

/* Supervisor, before it starts workers: a shared mapping with its own counters and
 * nworkers slots. Returns the mapping's fd for the workers (-1 with errno on failure). */
int metrics_share(int nworkers);
/* Worker process: count into slot `slot` of the mapping behind fd. 0, or -1. */
int metrics_attach(int fd, int slot);
/* Supervisor: worker `slot`'s counters (NULL before metrics_share). */
struct metrics *metrics_slot(int slot);
/* Supervisor: slot `slot`'s process ended; its gauges drop to zero, counters stay, and the
 * streams it had open are counted as errors. */
void metrics_worker_gone(int slot);
/* Supervisor: a field summed over every slot (offsetof(struct metrics, field)). */
int64_t metrics_sum(size_t offset);

/* The identity of the generation serving new streams (luacallout_script_info). Any thread. */
void metrics_set_script(const char *sha256, const char *path, uint64_t generation);

/* Writes the Prometheus text exposition into buf; returns its length (truncated to len). */
size_t metrics_render(char *buf, size_t len);

#endif
