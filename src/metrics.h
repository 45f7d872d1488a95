/* metrics.h — the server's counters, updated lock-free from any thread of any process and
 * rendered in Prometheus text format by the health listener's /metrics.
 *
 * Each worker process counts into its own slot of a shared mapping the supervisor created
 * (metrics_share); the supervisor counts reloads into its own and renders the sum. A slot
 * outlives its process: a worker started in its place goes on counting from there. */
#ifndef LUACALLOUT_METRICS_H
#define LUACALLOUT_METRICS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Labels of the per-message families. Phases are pbconv_phase's six, in its order
 * (dispatch.c checks), then "unknown": a message refused before its phase was read. */
#define METRICS_PHASES 7
#define METRICS_PHASE_UNKNOWN 6
/* What became of one message (luacallout_outcomes_total{outcome}). */
enum metrics_outcome {
    METRICS_CONTINUE,     /* answered "continue unchanged" */
    METRICS_MUTATE,       /* answered with a change (headers, body, metadata, mode ...) */
    METRICS_IMMEDIATE,    /* answered with an immediate response */
    METRICS_DENY,         /* the script denied: PERMISSION_DENIED */
    METRICS_LUA_ERROR,    /* the handler raised an error */
    METRICS_BAD_RETURN,   /* the handler returned a value that breaks the contract */
    METRICS_TIMEOUT,      /* the time budget stopped the handler */
    METRICS_MEMORY,       /* the memory limit stopped it (or no memory for the answer) */
    METRICS_WATCHDOG,     /* the watchdog found the call stuck past its budget */
    METRICS_REFUSED,      /* refused before any handler: malformed, over a limit */
    METRICS_OUTCOMES
};
/* gRPC status codes 0..16 (luacallout_streams_ended_total{code}). */
#define METRICS_CODES 17
/* What became of a stream under --record (luacallout_record_streams_total{result}). */
enum metrics_record_result {
    METRICS_RECORD_WRITTEN,       /* its line is in the file */
    METRICS_RECORD_SAMPLED_OUT,   /* not drawn by --record_sample */
    METRICS_RECORD_TOO_LARGE,     /* over --record_max_stream_kb (or its line over 4 MiB) */
    METRICS_RECORD_QUEUE_FULL,    /* the recorder was behind: its queue was full */
    METRICS_RECORD_CAP_REACHED,   /* this process's share of --record_max_mb was written */
    METRICS_RECORD_ERROR,         /* no memory, a line that would not convert, a write error */
    METRICS_RECORD_SHUTDOWN,      /* still queued when the worker's exit could wait no more */
    METRICS_RECORD_RESULTS
};
/* Finite upper bounds of the handler duration histogram (metrics.c); one bucket more
 * counts the calls above the last. */
#define METRICS_BUCKETS 14

/* One process's counters. Every field has one writer thread, named on its group: the
 * worker's serving thread (one per worker process), the worker's main thread, or the
 * supervisor. Single-writer counters are bumped with a relaxed load and store (no locked
 * instruction, metrics_inc); readers sum the slots when scraped. */
struct metrics {
    /* serving thread */
    _Atomic uint64_t streams_total;
    _Atomic int64_t streams_active;            /* (the supervisor zeroes it after the end) */
    _Atomic uint64_t messages_total;           /* bench_echo answers (not rendered alone) */
    _Atomic uint64_t stream_errors_total;      /* streams ended with a non-OK status */
    _Atomic uint64_t streams_ended[METRICS_CODES];      /* by final gRPC status */
    _Atomic uint64_t messages[METRICS_PHASES];          /* by phase */
    _Atomic uint64_t outcomes[METRICS_PHASES][METRICS_OUTCOMES];  /* [][WATCHDOG]: main */
    _Atomic uint64_t handler_buckets[METRICS_PHASES][METRICS_BUCKETS + 1]; /* not cumulative */
    _Atomic uint64_t handler_ns[METRICS_PHASES];        /* sum of the durations */
    _Atomic uint64_t vm_rebuilds_total;        /* fresh VMs swapped in after a budget error */
    _Atomic uint64_t lua_memory_bytes;         /* the VM of the last message, after it */
    /* supervisor (slot 0) */
    _Atomic uint64_t reloads_total;            /* successful reloads */
    _Atomic uint64_t reload_failures_total;
    _Atomic uint64_t script_generation;        /* 1 = the script loaded at start-up */
    _Atomic uint64_t script_loaded_unix_ms;    /* when the current generation was loaded */
    _Atomic uint64_t script_load_us;           /* how long loading it took (all workers) */
    _Atomic uint64_t worker_restarts_total;    /* worker processes that ended unexpectedly */
    _Atomic int64_t reload_in_progress;        /* 1 while workers take a new generation */
    /* the worker's main thread */
    _Atomic uint64_t watchdog_stuck_total;     /* handler calls found stuck past the budget */
    _Atomic int64_t workers_serving;           /* worker processes serving (gauge) */
    _Atomic int64_t workers_stuck;             /* workers stuck in a handler (watchdog) */
    _Atomic int64_t pid;                       /* the worker process (0: none), for process_* */
    /* the recorder (record.c): serving and recorder threads, atomic adds (only on
     * streams --record samples, or under --record_sample) */
    _Atomic uint64_t record_streams[METRICS_RECORD_RESULTS];
    _Atomic uint64_t record_bytes_total;       /* bytes of record lines written */
    /* not rendered: what the supervisor watches in each worker's slot */
    _Atomic uint64_t heartbeat_ms;             /* CLOCK_MONOTONIC of the main thread's last tick */
    _Atomic uint64_t stuck_since_ms;           /* when the stuck handler call began, or 0 */
    _Atomic uint64_t building_since_ms;        /* the main thread is building VMs (a top
                                                * level runs) since then, or 0 */
};

/* +1 on a counter only this thread writes: no locked instruction on the per-message path.
 * Relaxed: a scrape may see it a moment late, never torn. */
static inline void metrics_add(_Atomic uint64_t *c, uint64_t n)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + n,
                          memory_order_relaxed);
}

static inline void metrics_inc(_Atomic uint64_t *c) { metrics_add(c, 1); }

static inline void metrics_gauge_add(_Atomic int64_t *g, int64_t d)
{
    atomic_store_explicit(g, atomic_load_explicit(g, memory_order_relaxed) + d,
                          memory_order_relaxed);
}

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

/* Serving thread, once per message the script saw (or refused): its phase
 * (METRICS_PHASE_UNKNOWN when refused before it), what became of it, and how long the
 * protected call took (`timed` false: no handler ran, no histogram entry). */
void metrics_message(int phase, enum metrics_outcome outcome, uint64_t call_ns, bool timed);
/* Serving thread: a stream ended with that gRPC status. */
void metrics_stream_ended(int code);

/* Writes the Prometheus text exposition into buf; returns its length (truncated to len). */
size_t metrics_render(char *buf, size_t len);

#endif
