/* generation.c — script snapshots and the VMs workers run them on; see generation.h. */
#include "generation.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <openssl/evp.h>

#include "log.h"
#include "metrics.h"
#include "vm.h"

/* ---- snapshots ------------------------------------------------------------------------ */

static char *dup_bytes(const char *p, size_t len)
{
    char *d = malloc(len + 1);
    if (d) {
        memcpy(d, p, len);
        d[len] = '\0';
    }
    return d;
}

static void hex_sha256(const char *data, size_t len, char out[65])
{
    unsigned char md[32];
    unsigned int mdlen = 0;
    out[0] = '\0';
    if (EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL) != 1 || mdlen != 32)
        return;
    for (int i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

/* Reads a whole regular file, at most `max` bytes. NULL with errno set (EFBIG past max,
 * EINVAL for anything but a regular file: a FIFO or a device could block the load). */
static char *read_file(const char *path, size_t max, size_t *len)
{
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        int e = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
        close(fd);
        errno = e;
        return NULL;
    }
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        close(fd);
        return NULL;
    }
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (n < cap) {
            if (ferror(f)) {
                free(buf);
                buf = NULL;
                errno = EIO;
            }
            break;
        }
        if (cap >= max) {
            free(buf);
            buf = NULL;
            errno = EFBIG;
            break;
        }
        size_t ncap = cap * 2 > max ? max : cap * 2;
        char *nb = realloc(buf, ncap + 1);
        if (!nb) {
            free(buf);
            buf = NULL;
            errno = ENOMEM;
            break;
        }
        buf = nb;
        cap = ncap;
    }
    fclose(f);
    if (buf) {
        buf[n] = '\0';
        *len = n;
    }
    return buf;
}

struct snapshot *snapshot_read(const char *path, uint64_t generation, char *err, size_t errlen)
{
    struct snapshot *snap = calloc(1, sizeof *snap);
    if (!snap) {
        snprintf(err, errlen, "%s: out of memory", path);
        return NULL;
    }
    atomic_init(&snap->refs, 1);
    snap->generation = generation;
    snap->path = strdup(path);
    const char *slash = strrchr(path, '/');
    snap->dir = !slash ? strdup(".") : slash == path ? strdup("") : dup_bytes(path, (size_t)(slash - path));
    snap->source = read_file(path, SNAPSHOT_MAX_BYTES, &snap->len);
    if (!snap->source) {
        snprintf(err, errlen, "cannot open %s: %s", path,
                 errno == EFBIG ? "larger than 64 MiB" : strerror(errno));
        snapshot_unref(snap);
        return NULL;
    }
    if (!snap->path || !snap->dir) {
        snprintf(err, errlen, "%s: out of memory", path);
        snapshot_unref(snap);
        return NULL;
    }
    snap->bytes = snap->len;
    hex_sha256(snap->source, snap->len, snap->sha256);
    return snap;
}

void snapshot_ref(struct snapshot *snap) { atomic_fetch_add(&snap->refs, 1); }

void snapshot_unref(struct snapshot *snap)
{
    if (!snap || atomic_fetch_sub(&snap->refs, 1) != 1)
        return;
    for (size_t i = 0; i < snap->nfiles; i++) {
        free(snap->files[i].name);
        free(snap->files[i].data);
    }
    free(snap->files);
    free(snap->source);
    free(snap->dir);
    free(snap->path);
    free(snap);
}

const struct snapshot_file *snapshot_find(const struct snapshot *snap, const char *name)
{
    for (size_t i = 0; i < snap->nfiles; i++)
        if (strcmp(snap->files[i].name, name) == 0)
            return &snap->files[i];
    return NULL;
}

const struct snapshot_file *snapshot_add(struct snapshot *snap, const char *name,
                                         const char *data, size_t len, char *err,
                                         size_t errlen)
{
    if (snap->frozen) {
        snprintf(err, errlen, "the script's files were read when it loaded");
        return NULL;
    }
    if (len > SNAPSHOT_MAX_BYTES - snap->bytes) {
        snprintf(err, errlen, "the script and the files it reads exceed %zu MiB",
                 SNAPSHOT_MAX_BYTES >> 20);
        return NULL;
    }
    if (snap->nfiles == snap->cap) {
        size_t cap = snap->cap ? snap->cap * 2 : 8;
        struct snapshot_file *f = realloc(snap->files, cap * sizeof *f);
        if (!f) {
            snprintf(err, errlen, "out of memory");
            return NULL;
        }
        snap->files = f;
        snap->cap = cap;
    }
    struct snapshot_file *f = &snap->files[snap->nfiles];
    f->name = strdup(name);
    f->data = data ? dup_bytes(data, len) : NULL;
    f->len = data ? len : 0;
    if (!f->name || (data && !f->data)) {
        free(f->name);
        free(f->data);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    snap->nfiles++;
    snap->bytes += f->len;
    return f;
}

const struct snapshot_file *snapshot_file_for(struct snapshot *snap, const char *name,
                                              int *err_no, char *err, size_t errlen)
{
    const struct snapshot_file *f = snapshot_find(snap, name);
    if (f || snap->frozen) {
        *err_no = f ? 0 : ENOENT;
        return f;
    }
    size_t len;
    char *data = read_file(name, SNAPSHOT_MAX_BYTES - snap->bytes, &len);
    if (!data) {
        *err_no = errno;
        if (errno == EFBIG)
            snprintf(err, errlen, "the script and the files it reads exceed %zu MiB",
                     SNAPSHOT_MAX_BYTES >> 20);
        else
            snprintf(err, errlen, "%s", errno == EINVAL ? "not a regular file" : strerror(errno));
        return NULL;
    }
    f = snapshot_add(snap, name, data, len, err, errlen);
    free(data);
    *err_no = f ? 0 : ENOMEM;
    return f;
}

/* ---- generations ------------------------------------------------------------------------ */

int generation_build(struct snapshot *snap, struct vm **vms, int n, char *err, size_t errlen)
{
    int built = 0;
    for (; built < n; built++) {
        vms[built] = vm_open(snap, err, errlen);
        if (!vms[built])
            break;
        snap->frozen = true;   /* the first VM recorded what the top level read */
    }
    if (built == n)
        return 0;
    while (built-- > 0)
        vm_close(vms[built]);
    return -1;
}

int generation_load(const char *path, uint64_t generation, struct vm **vms, int n, char *err,
                    size_t errlen)
{
    struct snapshot *snap = snapshot_read(path, generation, err, errlen);
    if (!snap)
        return -1;
    int rc = generation_build(snap, vms, n, err, errlen);
    snapshot_unref(snap);     /* each VM holds its own reference */
    return rc;
}

static void adopt(struct worker_vms *w, struct vm *vm)
{
    vm->owner = w;
    vm->activity = w->activity;
}

/* Closes the oldest retired VMs past the bound: their streams are ended by w->evict, and
 * each VM is closed when its last stream is freed. */
static void bound_retired(struct worker_vms *w)
{
    int live = 0;
    for (struct vm *v = w->retired; v; v = v->next) {
        if (v->evicted)
            continue;
        if (++live > GENERATION_MAX_RETIRED) {
            v->evicted = true;
            log_warn("more than %d older script VMs are still in use on one worker: ending "
                     "the %d streams of the oldest (generation %llu)", GENERATION_MAX_RETIRED,
                     v->streams, (unsigned long long)v->snap->generation);
            if (w->evict)
                w->evict(v);
        }
    }
}

static void unlink_retired(struct worker_vms *w, struct vm *vm)
{
    for (struct vm **p = &w->retired; *p; p = &(*p)->next) {
        if (*p == vm) {
            *p = vm->next;
            w->nretired--;
            return;
        }
    }
}

static void retire(struct worker_vms *w, struct vm *vm)
{
    if (vm->streams == 0) {
        vm_close(vm);
        return;
    }
    vm->retired = true;
    vm->next = w->retired;
    w->retired = vm;
    w->nretired++;
    bound_retired(w);
}

/* Asks the control thread for a spare of the current VM's generation. */
static void want_spare(struct worker_vms *w)
{
    struct snapshot *snap = w->current->snap;
    snapshot_ref(snap);
    snapshot_unref(atomic_exchange(&w->want_spare, snap));
}

void generation_init(struct worker_vms *w, struct vm *vm)
{
    adopt(w, vm);
    w->current = vm;
    want_spare(w);
    /* before the worker thread starts, which writes it from then on */
    atomic_store_explicit(&metrics->lua_memory_bytes, vm->mem_used, memory_order_relaxed);
}

/* The spare, if it is one of the current generation (a reload may have made it stale). */
static struct vm *take_spare(struct worker_vms *w)
{
    struct vm *spare = atomic_exchange(&w->spare, NULL);
    if (spare && spare->snap != w->current->snap) {
        vm_close(spare);
        spare = NULL;
    }
    return spare;
}

struct vm *generation_current(struct worker_vms *w)
{
    struct vm *next = atomic_exchange(&w->pending, NULL);
    bool tainted = vm_take_taint(w->current);
    if (!next && tainted) {
        next = take_spare(w);
        if (next) {
            metrics_inc(&metrics->vm_rebuilds_total);   /* worker thread: its only writer */
            log_warn_limited("a handler exceeded its budget: new streams start on a fresh Lua VM "
                     "of generation %llu", (unsigned long long)next->snap->generation);
        } else {
            log_warn_limited("a handler exceeded its budget and no fresh Lua VM is ready yet: new "
                     "streams stay on the current one until it is");
            w->current->tainted = true;   /* look again at the next call */
            want_spare(w);
        }
    }
    if (next) {
        adopt(w, next);
        struct vm *old = w->current;
        w->current = next;
        retire(w, old);
        want_spare(w);
    }
    return w->current;
}

void generation_acquire(struct vm *vm) { vm->streams++; }

void generation_release(struct vm *vm)
{
    if (--vm->streams == 0 && vm->retired) {
        log_debug("closing a retired Lua VM: its last stream ended");
        if (vm->owner)
            unlink_retired(vm->owner, vm);
        vm_close(vm);
    }
}

void generation_fill_spare(struct worker_vms *w)
{
    struct snapshot *snap = atomic_exchange(&w->want_spare, NULL);
    if (!snap)
        return;
    char err[1024];
    struct vm *vm = vm_open(snap, err, sizeof err);
    if (!vm)
        log_error("cannot build a spare Lua VM of generation %llu: %s",
                  (unsigned long long)snap->generation, err);
    else
        vm_close(atomic_exchange(&w->spare, vm));   /* a stale spare, never used */
    snapshot_unref(snap);
}

void generation_free_all(struct worker_vms *w)
{
    while (w->retired) {
        struct vm *v = w->retired;
        w->retired = v->next;
        vm_close(v);
    }
    w->nretired = 0;
    vm_close(w->current);
    w->current = NULL;
    vm_close(atomic_exchange(&w->pending, NULL));
    vm_close(atomic_exchange(&w->spare, NULL));
    snapshot_unref(atomic_exchange(&w->want_spare, NULL));
}
