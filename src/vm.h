/* vm.h — one Lua VM running one generation of the user's script: the capped allocator, the
 * allow-list sandbox, the time budget, and the one protected call every Lua call goes
 * through. A VM is built from a snapshot (generation.h), never from disk, and is used by
 * one thread at a time: the thread that builds it, then the worker that adopts it. */
#ifndef LUACALLOUT_VM_H
#define LUACALLOUT_VM_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#include "arena.h"
#include "pbconv.h"

struct snapshot;
struct worker_vms;

/* Limits every VM of the process runs under; set once at start-up, before the first VM is
 * built. The defaults (vm_limits_default) are those of the command line. */
struct vm_limits {
    int timeout_ms;          /* per handler call (and for the top level), 0 = none */
    size_t memory_bytes;     /* per VM, 0 = none */
    int unsafe_stdlib;       /* 1: the whole standard library, debug and binary chunks too */
    size_t max_headers;      /* header entries in one message (a longer list: INVALID_ARGUMENT) */
    size_t max_ctx_bytes;    /* attributes + metadata merged into one stream's ctx */
    int content_length_follows_body;  /* 1: a replaced buffered body sets content-length */
};
extern const struct vm_limits vm_limits_default;
void vm_set_limits(const struct vm_limits *limits);
const struct vm_limits *vm_get_limits(void);

/* What a worker's VM is doing, for the watchdog on the control thread: written by the
 * worker around every handler call (plain stores, no lock), read by the control thread. */
struct vm_activity {
    _Atomic uint64_t since_ns;           /* CLOCK_MONOTONIC start of the running call, 0 = idle */
    _Atomic uint64_t stream;             /* the stream whose handler runs */
    _Atomic(const char *) where;         /* "handler (file:line)" of the running handler */
    _Atomic int phase;                   /* its message's phase (pbconv_phase), for metrics */
};

/* Longest gRPC status message we send; longer Lua errors are cut. */
#define VM_MESSAGE_MAX 2048
/* Sandbox refusals remembered for --check. */
#define VM_REFUSALS_MAX 1024

struct vm {
    lua_State *L;
    struct snapshot *snap;  /* the generation this VM runs (a reference) */
    bool loading;           /* the top level runs: the script's files may be read */

    /* budgets */
    size_t mem_used;        /* bytes the VM holds, counted by the allocator */
    uint64_t deadline_ns;   /* CLOCK_MONOTONIC time the running call must end by, 0 = none */
    uint64_t call_ns;       /* how long the last vm_call took (the handler histogram) */
    bool timed_out;         /* the hook (or a pattern match) stopped the running call */
    bool mem_exceeded;      /* the running call failed with LUA_ERRMEM */
    bool tainted;           /* a budget stopped a call mid-way: see vm_take_taint */
    size_t errmsg_len;      /* set by the message handler: message length before the traceback */
    bool denied;            /* set by the message handler: the error is callout.deny_callout */
    /* set by the message handler: the script file and line the error points at (the frame
     * its "file:line:" prefix names, else the innermost Lua frame); err_line 0: unknown */
    int err_line;
    char err_script[256];
    uint64_t current_stream;/* the stream whose handler runs, 0 outside handlers */
    const char *current_phase; /* its phase ("request_headers" ...), set by dispatch.c */
    struct vm_activity *activity;  /* the owning worker's, NULL when no worker owns the VM */

    /* per-worker bookkeeping (generation.c) */
    struct worker_vms *owner;  /* the worker that adopted it, NULL before */
    int streams;            /* streams started on this VM and not yet ended */
    bool retired;           /* a newer VM took over: close when streams reaches 0 */
    bool evicted;           /* too many retired VMs: its streams are being ended */
    struct vm *next;        /* in the worker's list of retired VMs */
    void *stream_list;      /* streams on this VM (stream.c), to end them if it must go */

    /* dispatch.c's per-VM buffers: the decoded request and response structs of one call,
     * and the packed answers */
    struct arena arena;
    uint8_t *out;
    size_t out_cap;
    size_t *lens;
    size_t lens_cap;
    /* Registry refs of the strings looked up per message: pushing an interned string by
     * ref skips hashing it. */
    int process_key;
    int phase_key[PBCONV_PHASE_COUNT];
    int handler_key[PBCONV_PHASE_COUNT];
    /* "on_x (file:line)" of each handler the script defines, [PBCONV_PHASE_COUNT] for
     * process(): what the watchdog names when a call hangs */
    char where[PBCONV_PHASE_COUNT + 1][160];
    bool has_process;       /* process() is defined: it answers every phase */

    char refusals[VM_REFUSALS_MAX];  /* what the sandbox refused, one per line */
    size_t refusals_len;
    char message[VM_MESSAGE_MAX];
};

/* Builds a VM from the snapshot: opens the sandboxed libraries, runs the script's top level
 * under the budget. While the snapshot is still being recorded (its first VM), the modules
 * the top level requires and the files it reads are read from disk into the snapshot;
 * every later VM reads them from there. NULL on failure with "file:line: msg" in err. */
struct vm *vm_open(struct snapshot *snap, char *err, size_t errlen);
void vm_close(struct vm *vm);

/* The bytes of a file a library function was given the path of (callout.jwt.load_key),
 * under the sandbox's rules: while the script loads, read once through the generation's
 * snapshot; in a handler, refused (raises). NULL with --unsafe_stdlib: the caller reads the
 * file itself. The bytes live as long as the VM. */
const char *vm_read_file(lua_State *L, const char *fn, const char *name, size_t *len);

/* The VM a lua_State belongs to (its extra space). */
static inline struct vm *vm_of(lua_State *L) { return *(struct vm **)lua_getextraspace(L); }

/* The handler globals the script defines (process, on_request_headers, ...), in that
 * order; returns how many were written to names (at most max). */
size_t vm_handlers(struct vm *vm, const char **names, size_t max);

/* Globals that look like a misspelled handler (on_request_header ...): writes one warning
 * per line into buf, returns how many there were. */
size_t vm_misspellings(struct vm *vm, char *buf, size_t len);

/* 1, once, after a handler call was stopped by a budget (time or memory): the VM may hold
 * half-updated tables, so new streams should start on a fresh one. */
int vm_take_taint(struct vm *vm);

/* The one protected, budgeted call: f a1..an on the stack; afterwards r1..rn (LUA_OK) or
 * the error. vm->timed_out / vm->mem_exceeded say whether a budget stopped it. `where`
 * names the handler for the watchdog (may be NULL). */
int vm_call(struct vm *vm, int narg, int nres, uint64_t stream, const char *where);

/* The error at the top of the stack after a failed vm_call: *msg_len is the length of the
 * part for a status message (without the traceback). */
const char *vm_error(struct vm *vm, size_t *msg_len);

#endif
