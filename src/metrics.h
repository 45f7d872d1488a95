/* metrics.h — process-wide counters, updated lock-free from any thread and rendered in
 * Prometheus text format by the health listener's /metrics. */
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
};

extern struct metrics metrics;

/* The identity of the generation serving new streams (luacallout_script_info). Any thread. */
void metrics_set_script(const char *sha256, const char *path, uint64_t generation);

/* Writes the Prometheus text exposition into buf; returns its length (truncated to len). */
size_t metrics_render(char *buf, size_t len);

#endif
