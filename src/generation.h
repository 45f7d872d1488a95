/* generation.h — script generations: immutable snapshots of the script and of what its
 * top level read, and the VMs each worker runs them on.
 *
 * A load reads the script file once into a snapshot. Its first VM records into the
 * snapshot every module the top level requires and every file it reads; the snapshot is
 * then frozen, and every other VM of that generation — one per worker, a spare per worker,
 * every rebuild after a budget error — is built from those bytes, never from disk. So one
 * generation is one script, byte for byte, on every worker.
 *
 * Per worker: `current` serves new streams; a reload hands over a new VM through
 * `pending`; a budget error swaps in the `spare` (built ahead on the control thread, so no
 * top level runs on the worker's hot path). A VM a stream still uses is retired, not
 * closed, and closed when its last stream ends; at most GENERATION_MAX_RETIRED retired VMs
 * are kept per worker, so what open streams can pin is bounded. */
#ifndef LUACALLOUT_GENERATION_H
#define LUACALLOUT_GENERATION_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct vm;

/* One file the top level read (a Lua module, a data file) or a C module it loaded. */
struct snapshot_file {
    char *name;   /* the path as opened */
    char *data;   /* its bytes (NULL for a C module: only the path is kept) */
    size_t len;
};

struct snapshot {
    _Atomic int refs;
    uint64_t generation;     /* 1 = the load at start-up */
    char *path;              /* the script's path, as given */
    char *dir;               /* its folder, first on the module path */
    char *source;            /* the script's bytes */
    size_t len;
    char sha256[65];         /* hex, of source */
    bool frozen;             /* the first VM finished its top level: no more disk reads */
    struct snapshot_file *files;
    size_t nfiles, cap, bytes;
};

/* Largest total of files a snapshot holds (script, modules, files its top level reads). */
#define SNAPSHOT_MAX_BYTES ((size_t)64 << 20)

/* Reads the script into a new snapshot (refs = 1). NULL with "path: why" in err. */
struct snapshot *snapshot_read(const char *path, uint64_t generation, char *err,
                               size_t errlen);
void snapshot_ref(struct snapshot *snap);
void snapshot_unref(struct snapshot *snap);
/* The recorded file of that name, or NULL. */
const struct snapshot_file *snapshot_find(const struct snapshot *snap, const char *name);
/* Records a file (data NULL: a C module); only before the snapshot is frozen. The bytes are
 * copied. NULL with a message in err when the snapshot would exceed SNAPSHOT_MAX_BYTES. */
const struct snapshot_file *snapshot_add(struct snapshot *snap, const char *name,
                                         const char *data, size_t len, char *err,
                                         size_t errlen);

/* The file of that name from the snapshot; while the snapshot is being recorded (not
 * frozen), a file not yet in it is read from disk and added. NULL when there is no such
 * file (*err_no ENOENT, or the errno of the failed read, with a message in err). */
const struct snapshot_file *snapshot_file_for(struct snapshot *snap, const char *name,
                                              int *err_no, char *err, size_t errlen);

/* Loads the script at path as generation `generation`: the snapshot and its first VM, then
 * n - 1 more VMs from the snapshot. vms[0..n) are set on success (each holding its own
 * reference to the snapshot) and 0 returned; on failure nothing is kept, -1 is returned and
 * err has "file:line: msg". */
int generation_load(const char *path, uint64_t generation, struct vm **vms, int n, char *err,
                    size_t errlen);

/* n VMs of the snapshot (the first records what the top level reads, when the snapshot is
 * not frozen yet). 0 with vms[0..n) set (each holding a reference), or -1 with
 * "file:line: msg" in err and nothing kept. */
int generation_build(struct snapshot *snap, struct vm **vms, int n, char *err, size_t errlen);

#define GENERATION_MAX_RETIRED 4

/* The VMs of one worker. `current` and the retired list belong to the worker's thread;
 * `pending` and `spare` are handed over by the control thread. */
struct worker_vms {
    struct vm *current;
    _Atomic(struct vm *) pending;   /* a reloaded generation, adopted at the next call */
    _Atomic(struct vm *) spare;     /* a fresh VM of current's generation, for a rebuild */
    _Atomic(struct snapshot *) want_spare;  /* build a spare of this (a reference), or NULL */
    struct vm *retired;             /* retired VMs that streams still use, newest first */
    int nretired;
    struct vm_activity *activity;   /* given to every VM the worker adopts */
    /* Ends every stream still on a VM that must go (too many retired): set by the server */
    void (*evict)(struct vm *vm);
};

/* Worker thread, at each new call: adopts a pending generation, or the spare when the
 * current VM was tainted by a budget error. Returns the VM new streams start on. */
struct vm *generation_current(struct worker_vms *w);
/* A stream starts / ends on vm (worker thread). The last release of a retired VM closes it. */
void generation_acquire(struct vm *vm);
void generation_release(struct vm *vm);
/* Start-up: the worker runs vm; a spare of its generation is wanted. */
void generation_init(struct worker_vms *w, struct vm *vm);
/* Control thread (or start-up): builds the spare of a worker that wants one. */
void generation_fill_spare(struct worker_vms *w);
/* Frees every VM of the worker (at shutdown, no stream left). */
void generation_free_all(struct worker_vms *w);

#endif
