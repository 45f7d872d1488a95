/* supervisor.c — see supervisor.h.
 *
 * Workers are this same binary, exec'd with --worker_of=SLOT,CONTROL_FD,METRICS_FD and the
 * supervisor's own flags: a fresh process image, so nothing the supervisor's threads held
 * at fork time (a lock in OpenSSL, in our log) can be inherited half-taken. Each gets, over
 * its control socket, the TLS identity and the packed snapshot of the current generation:
 * all workers serve the same bytes, read from disk once. */
#include "supervisor.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "admin.h"
#include "config.h"
#include "control.h"
#include "generation.h"
#include "log.h"
#include "metrics.h"
#include "record.h"
#include "snapshot_pack.h"
#include "tls.h"
#include "vm.h"
#include "watch.h"

/* Quiet time after a file event before reloading: one reload per save or ConfigMap swap. */
#define WATCH_SETTLE_MS 200
#define TICK_MS 100
/* A worker that has not said READY by then is not going to (sanitizer builds are slow). */
#define READY_TIMEOUT_MS 60000
/* How long a reload waits for every worker to have built the new generation. */
#define RELOAD_ACK_MS 10000
/* A worker that dies this soon after it started is started again only after this long. */
#define RESTART_BACKOFF_MS 1000
/* After the drain timeout, how long workers get to cancel what is left and exit (their 2 s
 * to abandon streams that do not end, and a margin) before they are killed. */
#define STOP_MARGIN_MS 5000
/* A worker whose main thread has not ticked (every 100 ms) for this long is not coming
 * back by itself (SIGSTOP, a kernel hang): it is killed and replaced, so that the
 * connections the kernel keeps handing it are served by a worker that answers. */
#define UNRESPONSIVE_MS 5000
/* A worker stuck in one handler call this long past its budget (the watchdog reported it at
 * 1 s) is killed and replaced, for the same reason. */
#define STUCK_KILL_MS 10000

struct child {
    pid_t pid;             /* 0: not running */
    int ctl;               /* our end of its control socket */
    uint64_t started_ms;
    uint64_t restart_at_ms; /* when to start it again after an unexpected end (0: no) */
    bool killing;           /* we sent it SIGKILL */
    bool stop_asked;        /* we sent it STOP: its end is the one we asked for */
};

static bool stop_requested(void);

struct supervisor {
    const struct config *cfg;
    int argc;
    char **argv;
    char plaintext_address[320], secure_address[320];   /* with the actual port */
    int ports[2];
    int held[2];                     /* the ports, bound and held (not listening) */
    int metrics_fd;
    int drain_pipe[2];               /* [1] closed at the drain: each worker's health hears
                                      * it at once, whatever its main thread is doing */
    char *identity;                  /* CONTROL_IDENTITY payload */
    size_t identity_len;
    struct tls_identity *tls;        /* what identity was packed from (no cert_pem: no TLS) */
    struct tls_source tls_src;       /* where it is read from again (reload_tls) */
    struct admin *admin;             /* the health listener, which serves it too */
    _Atomic(struct watch *) watch;   /* --watch: follows the files of the last load */
    pthread_mutex_t lock;            /* reloads (watch thread) against restarts (main) */
    pthread_mutex_t reload_lock;     /* one reload at a time (the load runs outside lock) */
    pthread_mutex_t hup_lock;        /* the SIGHUP reload thread's state: */
    pthread_t reloader;
    bool reloader_running, reloader_joinable, reload_again;
    _Atomic bool started;            /* every first worker serves: start-up is over */
    _Atomic bool draining;           /* from the first SIGTERM/SIGINT: /ready says 503 */
    char *packed;                    /* the current generation, packed */
    size_t packed_len;
    uint64_t generation;
    uint64_t attempt;                /* reloads tried: tags their control records */
    char sha256[65];                 /* of the current generation's script */
    bool first_load_abandoned;       /* a signal came while the first top level ran */
    bool stopping;
    int n;
    struct child *kids;
    char exe[4096];                  /* what a worker is exec'd from */
};

static const char *hopeless(struct supervisor *sv, int slot, uint64_t now, char *why,
                            size_t len);

static uint64_t now_ms(int clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* ---- ports ---------------------------------------------------------------------------- */

/* Binds address for a listener of `what` and keeps the socket (never listening, so the
 * kernel gives it no connections) in *fd: the port stays ours while workers come and go,
 * and a second server on it fails here with a clear error rather than sharing it. The
 * address with its actual port (port 0 picks one) goes to `resolved`. */
static int hold_port(const char *what, const char *address, char *resolved, size_t rlen,
                     int *fd, int *port_out, char *err, size_t errlen)
{
    char host[256];
    const char *colon = strrchr(address, ':');
    size_t hlen = colon ? (size_t)(colon - address) : 0;
    if (!colon || !colon[1] || hlen >= sizeof host) {
        snprintf(err, errlen, "invalid %s address '%s': expected host:port", what, address);
        return -1;
    }
    memcpy(host, address, hlen);
    host[hlen] = '\0';
    bool bracketed = hlen >= 2 && host[0] == '[' && host[hlen - 1] == ']';
    if (bracketed) {
        memmove(host, host + 1, hlen - 2);
        host[hlen - 2] = '\0';
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *ai = NULL;
    int rc = getaddrinfo(host[0] ? host : NULL, colon + 1, &hints, &ai);
    if (rc != 0) {
        snprintf(err, errlen, "invalid %s address '%s': %s", what, address, gai_strerror(rc));
        return -1;
    }
    int one = 1, s = -1, saved = 0;
    /* First without SO_REUSEPORT: any socket already on the port makes this fail. */
    s = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s >= 0) {
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(s, ai->ai_addr, ai->ai_addrlen) != 0)
            saved = errno;
    } else {
        saved = errno;
    }
    struct sockaddr_storage got;
    socklen_t glen = sizeof got;
    if (!saved && getsockname(s, (struct sockaddr *)&got, &glen) != 0)
        saved = errno;
    if (s >= 0)
        close(s);
    s = -1;
    /* Then the socket we keep, with SO_REUSEPORT like the workers' listeners, on the port
     * the first one got (which port 0 chose). */
    if (!saved) {
        s = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0 || setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
            setsockopt(s, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0 ||
            bind(s, (struct sockaddr *)&got, glen) != 0)
            saved = errno ? errno : EINVAL;
    }
    freeaddrinfo(ai);
    if (saved) {
        if (s >= 0)
            close(s);
        snprintf(err, errlen, "cannot listen on %s (%s): %s", address, what, strerror(saved));
        return -1;
    }
    int port = got.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&got)->sin6_port)
                                         : ntohs(((struct sockaddr_in *)&got)->sin_port);
    snprintf(resolved, rlen, "%.*s:%d", (int)(colon - address), address, port);
    *fd = s;
    *port_out = port;
    return 0;
}

/* ---- workers -------------------------------------------------------------------------- */

/* The binary workers run: /proc/self/exe, which stays this very binary even when the file
 * is replaced by an upgrade — unless argv[0] names another file, as under valgrind (whose
 * /proc/self/exe is the tool): then argv[0], so that the tool can follow the exec. */
static void find_exe(struct supervisor *sv)
{
    snprintf(sv->exe, sizeof sv->exe, "/proc/self/exe");
    char real[4096];
    struct stat self, named;
    if (strchr(sv->argv[0], '/') && realpath(sv->argv[0], real) &&
        stat("/proc/self/exe", &self) == 0 && stat(real, &named) == 0 &&
        (self.st_dev != named.st_dev || self.st_ino != named.st_ino))
        snprintf(sv->exe, sizeof sv->exe, "%s", real);
}

/* Starts worker `slot` and sends it the identity and the current generation. 0, or -1
 * (logged). Called with the lock held, or before any other thread exists. */
static int spawn(struct supervisor *sv, int slot)
{
    struct child *c = &sv->kids[slot];
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
        log_error("cannot start worker %d: socketpair: %s", slot, strerror(errno));
        return -1;
    }
    char worker_of[64], plain[400], secure[400];
    snprintf(worker_of, sizeof worker_of, "--worker_of=%d,%d,%d,%d", slot, pair[1],
             sv->metrics_fd, sv->drain_pipe[0]);
    snprintf(plain, sizeof plain, "--plaintext_address=%s", sv->plaintext_address);
    snprintf(secure, sizeof secure, "--secure_address=%s", sv->secure_address);
    /* the supervisor's own flags, then the resolved addresses (the last value wins) */
    char **argv = calloc((size_t)sv->argc + 4, sizeof *argv);
    if (!argv) {
        close(pair[0]);
        close(pair[1]);
        return -1;
    }
    int k = 0;
    argv[k++] = sv->argv[0];
    argv[k++] = worker_of;
    for (int i = 1; i < sv->argc; i++)
        argv[k++] = sv->argv[i];
    argv[k++] = plain;
    argv[k++] = secure;
    argv[k] = NULL;
    pid_t pid = fork();
    if (pid == 0) {
        /* its own process group: what a script starts (--unsafe_stdlib) can be ended with
         * it, and a terminal's ^C reaches only the supervisor, which stops workers in order */
        setpgid(0, 0);
        /* the descriptors the worker keeps across exec */
        int keep[3] = {pair[1], sv->metrics_fd, sv->drain_pipe[0]};
        for (int i = 0; i < 3; i++) {
            int flags = fcntl(keep[i], F_GETFD);
            fcntl(keep[i], F_SETFD, flags & ~FD_CLOEXEC);
        }
        execv(sv->exe, argv);
        log_fatal("cannot start a worker: exec: %s", strerror(errno));
        _exit(127);
    }
    free(argv);
    close(pair[1]);
    if (pid < 0) {
        log_error("cannot start worker %d: fork: %s", slot, strerror(errno));
        close(pair[0]);
        return -1;
    }
    c->pid = pid;
    c->ctl = pair[0];
    c->started_ms = now_ms(CLOCK_MONOTONIC);
    c->restart_at_ms = 0;
    c->killing = false;
    c->stop_asked = false;
    if (control_send(c->ctl, CONTROL_IDENTITY, sv->identity, sv->identity_len) != 0 ||
        control_send(c->ctl, CONTROL_GENERATION, sv->packed, sv->packed_len) != 0)
        log_warn("worker %d (pid %d) did not take its start-up records: %s", slot, (int)pid,
                 strerror(errno));
    return 0;
}

/* Waits for worker `slot`'s answer of type want, or FAILED, for reload attempt `attempt`
 * (0: start-up), skipping anything else (a late answer to an aborted reload, a READY of a
 * worker started again). 1 for want, 0 for FAILED (its text in err), -1 no answer (the
 * time ran out, the worker exited or is past serving), -2 SIGTERM or SIGINT is pending:
 * the supervisor must stop instead of waiting on. */
static int await(struct supervisor *sv, int slot, uint32_t want, uint64_t attempt,
                 int timeout_ms, char *err, size_t errlen)
{
    struct child *c = &sv->kids[slot];
    uint64_t deadline = now_ms(CLOCK_MONOTONIC) + (uint64_t)timeout_ms;
    for (;;) {
        uint64_t now = now_ms(CLOCK_MONOTONIC);
        char why[128];
        if (stop_requested() || atomic_load(&sv->draining)) {
            snprintf(err, errlen, "the server is stopping");
            return -2;
        }
        if (hopeless(sv, slot, now, why, sizeof why)) {
            snprintf(err, errlen, "it %s", why);
            return -1;
        }
        if (now >= deadline) {
            snprintf(err, errlen, "no answer within %d ms", timeout_ms);
            return -1;
        }
        uint32_t type;
        char *data;
        size_t len;
        /* in slices, so that a stop or a hung worker is noticed while waiting */
        int slice = deadline - now < 100 ? (int)(deadline - now) : 100;
        int r = control_recv(c->ctl, &type, &data, &len, slice);
        if (r == -1 && errno == ETIMEDOUT)
            continue;
        if (r != 1) {
            snprintf(err, errlen, "%s", r == 0 ? "it exited" : strerror(errno));
            return -1;
        }
        char *text = NULL;
        uint64_t tag = strtoull(data, &text, 10);
        if (text && *text == ' ')
            text++;
        int result = tag != attempt ? 2 : type == want ? 1 : type == CONTROL_FAILED ? 0 : 2;
        if (result == 0)
            snprintf(err, errlen, "%s", text ? text : "");
        free(data);
        if (result != 2)
            return result;
    }
}

/* A worker ended: note it, and when that was not asked for, schedule its restart. */
static void child_ended(struct supervisor *sv, int slot, int status)
{
    struct child *c = &sv->kids[slot];
    char how[64];
    if (WIFSIGNALED(status))
        snprintf(how, sizeof how, "killed by signal %d (%s)", WTERMSIG(status),
                 strsignal(WTERMSIG(status)));
    else
        snprintf(how, sizeof how, "exit code %d", WEXITSTATUS(status));
    kill(-c->pid, SIGKILL);   /* what its script started, if anything */
    close(c->ctl);
    c->ctl = -1;
    c->pid = 0;
    metrics_worker_gone(slot);
    if (sv->stopping) {
        /* nothing is started again; but an end nobody asked for (a SIGKILL, a crash during
         * the grace) cost its clients their streams, and is said */
        if (!c->stop_asked && !c->killing)
            log_warn("worker %d ended during the drain (%s); the streams it had open were "
                     "lost", slot, how);
        return;
    }
    uint64_t now = now_ms(CLOCK_MONOTONIC);
    bool early = now - c->started_ms < RESTART_BACKOFF_MS;
    c->restart_at_ms = early ? now + RESTART_BACKOFF_MS : now;
    atomic_fetch_add(&metrics->worker_restarts_total, 1);
    log_error("worker %d ended unexpectedly (%s); starting a new one%s", slot, how,
              early ? " in 1 s" : "");
}

/* Why worker `slot` is past serving (NULL when it is not): its main thread has not ticked
 * for UNRESPONSIVE_MS while not building VMs (or building them for longer than a few
 * budgets allow, a minute with no budget), it has not started within a minute, or it is
 * stuck in a handler far past its budget. */
static const char *hopeless(struct supervisor *sv, int slot, uint64_t now, char *why,
                            size_t len)
{
    struct child *c = &sv->kids[slot];
    struct metrics *m = metrics_slot(slot);
    if (!c->pid || !m || c->killing)
        return NULL;
    int budget = vm_get_limits()->timeout_ms;
    uint64_t beat = atomic_load(&m->heartbeat_ms);
    uint64_t building = atomic_load(&m->building_since_ms);
    uint64_t stuck = atomic_load(&m->stuck_since_ms);
    uint64_t since = beat ? beat : c->started_ms;
    /* a build runs top levels, each within the budget: a few budgets beyond the usual
     * limit is plenty; with no budget, up to a minute */
    uint64_t build_limit = budget ? UNRESPONSIVE_MS + 4 * (uint64_t)budget : READY_TIMEOUT_MS;
    bool long_build = building && now > building && now - building > build_limit;
    if (!beat && now > since && now - since > READY_TIMEOUT_MS)
        snprintf(why, len, "has not started within %d ms", READY_TIMEOUT_MS);
    else if (beat && now > beat && now - beat > UNRESPONSIVE_MS && (!building || long_build))
        snprintf(why, len, "has not answered for %llu ms (stopped?)",
                 (unsigned long long)(now - beat));
    else if (stuck && budget && now > stuck && now - stuck > (uint64_t)budget + STUCK_KILL_MS)
        snprintf(why, len, "has been in one handler call for %llu ms, past its %d ms budget",
                 (unsigned long long)(now - stuck), budget);
    else
        return NULL;
    return why;
}

/* Kills a worker that no longer serves; the reaping below then starts another. */
static void kill_hopeless(struct supervisor *sv, uint64_t now)
{
    for (int i = 0; i < sv->n; i++) {
        char why[128];
        if (!hopeless(sv, i, now, why, sizeof why))
            continue;
        log_error("worker %d %s; killing it and starting a new one", i, why);
        sv->kids[i].killing = true;
        kill(sv->kids[i].pid, SIGKILL);
    }
}

/* Collects ended workers and starts again those whose time has come. Main thread, every
 * tick. Not while a reload holds the lock (it waits up to RELOAD_ACK_MS for the workers'
 * builds, watching them itself): the main thread must go on taking signals meanwhile, so
 * that a SIGTERM starts the drain, and gRPC health says NOT_SERVING, at once. */
static void reap_and_restart(struct supervisor *sv)
{
    int status;
    pid_t pid;
    if (pthread_mutex_trylock(&sv->lock) != 0)
        return;   /* the next tick */
    kill_hopeless(sv, now_ms(CLOCK_MONOTONIC));
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < sv->n; i++)
            if (sv->kids[i].pid == pid)
                child_ended(sv, i, status);
    }
    uint64_t now = now_ms(CLOCK_MONOTONIC);
    for (int i = 0; i < sv->n && !sv->stopping; i++) {
        struct child *c = &sv->kids[i];
        if (!c->pid && c->restart_at_ms && now >= c->restart_at_ms)
            spawn(sv, i);   /* its READY is read (and skipped) by the next await */
    }
    pthread_mutex_unlock(&sv->lock);
}

/* ---- generations ---------------------------------------------------------------------- */

/* A loaded generation, not yet serving. */
struct loaded {
    char *packed;
    size_t len;
    char sha256[65];
};

/* --watch follows the files a load read: the script and every module and file its top
 * level read, with the bytes it read (snap NULL: the script could not be read). */
static void watch_follow(struct supervisor *sv, const struct snapshot *snap, bool failed)
{
    struct watch *w = atomic_load(&sv->watch);
    if (!w)
        return;
    size_t n = snap ? snap->nfiles + 1 : 1;
    struct watch_file *files = calloc(n, sizeof *files);
    if (!files)
        return;   /* the old set stays watched */
    files[0] = snap ? (struct watch_file){snap->path, snap->source, snap->len}
                    : (struct watch_file){sv->cfg->script_path, NULL, 0};
    for (size_t i = 1; i < n; i++)   /* a C module (no data): as it is on disk now */
        files[i] = (struct watch_file){snap->files[i - 1].name, snap->files[i - 1].data,
                                       snap->files[i - 1].len};
    watch_set_files(w, files, (int)n, failed);
    free(files);
}

/* Loads the script as generation `generation`, here (so a broken script never reaches a
 * worker), and packs it. 0, or -1 with "file:line: msg" in err. */
static int load(struct supervisor *sv, uint64_t generation, struct loaded *out, char *err,
                size_t errlen)
{
    uint64_t t0 = now_us();
    struct vm *vm = NULL;
    /* generation_load, keeping the snapshot for the watch: what this load read (up to its
     * failure, when it fails) is what a change to is worth a reload */
    struct snapshot *snap = snapshot_read(sv->cfg->script_path, generation, err, errlen);
    int built = snap ? generation_build(snap, &vm, 1, err, errlen) : -1;
    watch_follow(sv, snap, built != 0);
    snapshot_unref(snap);     /* the VM holds its own reference */
    if (built != 0)
        return -1;
    out->packed = snapshot_pack(vm->snap, &out->len);
    if (!out->packed) {
        vm_close(vm);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    memcpy(out->sha256, vm->snap->sha256, sizeof out->sha256);
    char typos[2048];
    if (vm_misspellings(vm, typos, sizeof typos)) {
        for (char *line = strtok(typos, "\n"); line; line = strtok(NULL, "\n"))
            log_warn("%s", line);
    }
    atomic_store(&metrics->script_load_us, now_us() - t0);
    log_info("loaded %s as generation %llu (sha256 %s, %zu bytes, %zu files read while "
             "loading)", sv->cfg->script_path, (unsigned long long)generation,
             vm->snap->sha256, vm->snap->len, vm->snap->nfiles);
    vm_close(vm);
    return 0;
}

/* The loaded generation becomes the current one (what restarted workers get). */
static void make_current(struct supervisor *sv, struct loaded *l, uint64_t generation)
{
    free(sv->packed);
    sv->packed = l->packed;
    sv->packed_len = l->len;
    memcpy(sv->sha256, l->sha256, sizeof sv->sha256);
    sv->generation = generation;
    l->packed = NULL;
}

/* What /metrics says serves new streams: only once the workers do. */
static void publish(struct supervisor *sv, uint64_t load_us)
{
    metrics_set_script(sv->sha256, sv->cfg->script_path, sv->generation);
    atomic_store(&metrics->script_generation, sv->generation);
    atomic_store(&metrics->script_loaded_unix_ms, now_ms(CLOCK_REALTIME));
    atomic_store(&metrics->script_load_us, load_us);
}

/* Sends a record to every running worker. */
static void tell_all(struct supervisor *sv, uint32_t type, const void *data, size_t len)
{
    for (int i = 0; i < sv->n; i++)
        if (sv->kids[i].pid)
            control_send(sv->kids[i].ctl, type, data, len);
}

/* A reload reaches every worker or none: each builds the generation (GENERATION, LOADED);
 * only when all have does any serve it (COMMIT, SERVING). A worker that cannot build it, or
 * does not answer, fails the reload and every worker drops it (ABORT). */
static void reload(void *arg)
{
    struct supervisor *sv = arg;
    char err[1024];
    pthread_mutex_lock(&sv->reload_lock);
    if (atomic_load(&sv->draining)) {
        pthread_mutex_unlock(&sv->reload_lock);
        return;
    }
    uint64_t t0 = now_us();
    uint64_t generation = sv->generation + 1;   /* only reloads change it, one at a time */
    struct loaded l = {0};
    /* The load runs the top level, which may take its whole budget (or block in a C call,
     * without one): not under sv->lock, which the main thread takes to restart workers and
     * to drain. */
    int loaded = load(sv, generation, &l, err, sizeof err);
    pthread_mutex_lock(&sv->lock);
    uint64_t attempt = ++sv->attempt;
    char tag[24];
    snprintf(tag, sizeof tag, "%llu", (unsigned long long)attempt);
    if (sv->stopping) {
        free(l.packed);
        pthread_mutex_unlock(&sv->lock);
        pthread_mutex_unlock(&sv->reload_lock);
        return;
    }
    if (loaded != 0)
        goto failed;
    atomic_store(&metrics->reload_in_progress, 1);
    char *record = malloc(l.len + 8);
    if (!record) {
        snprintf(err, sizeof err, "out of memory");
        atomic_store(&metrics->reload_in_progress, 0);
        free(l.packed);
        goto failed;
    }
    for (int i = 0; i < 8; i++)
        record[i] = (char)(attempt >> (8 * i));
    memcpy(record + 8, l.packed, l.len);
    tell_all(sv, CONTROL_GENERATION, record, l.len + 8);
    free(record);
    for (int i = 0; i < sv->n; i++) {
        char why[900];
        if (sv->kids[i].pid &&
            await(sv, i, CONTROL_LOADED, attempt, RELOAD_ACK_MS, why, sizeof why) != 1) {
            snprintf(err, sizeof err, "worker %d: %s", i, why);
            tell_all(sv, CONTROL_ABORT, tag, strlen(tag));
            atomic_store(&metrics->reload_in_progress, 0);
            free(l.packed);
            goto failed;
        }
    }
    tell_all(sv, CONTROL_COMMIT, tag, strlen(tag));
    /* "reloaded" is only said once every worker serves new streams on it */
    for (int i = 0; i < sv->n; i++) {
        char why[900];
        if (sv->kids[i].pid &&
            await(sv, i, CONTROL_SERVING, attempt, RELOAD_ACK_MS, why, sizeof why) != 1)
            log_error("worker %d did not confirm generation %llu: %s", i,
                      (unsigned long long)generation, why);
    }
    make_current(sv, &l, generation);
    atomic_fetch_add(&metrics->reloads_total, 1);
    publish(sv, now_us() - t0);
    atomic_store(&metrics->reload_in_progress, 0);
    log_info("reloaded %s: generation %llu serves new streams (loaded in %llu us)",
             sv->cfg->script_path, (unsigned long long)generation,
             (unsigned long long)(now_us() - t0));
    pthread_mutex_unlock(&sv->lock);
    pthread_mutex_unlock(&sv->reload_lock);
    return;
failed:
    atomic_fetch_add(&metrics->reload_failures_total, 1);
    log_error("reload of %s failed, still serving generation %llu: %s", sv->cfg->script_path,
              (unsigned long long)(generation - 1), err);
    pthread_mutex_unlock(&sv->lock);
    pthread_mutex_unlock(&sv->reload_lock);
}

/* SIGHUP's reload runs on a thread of its own, so that the main thread goes on taking
 * signals (a SIGTERM during a slow top level starts the drain at once) and restarting
 * workers. A SIGHUP during a reload asks for one more after it. */
static void *reloader_main(void *arg)
{
    struct supervisor *sv = arg;
    for (;;) {
        reload(sv);
        pthread_mutex_lock(&sv->hup_lock);
        bool again = sv->reload_again && !atomic_load(&sv->draining);
        sv->reload_again = false;
        sv->reloader_running = again;
        pthread_mutex_unlock(&sv->hup_lock);
        if (!again)
            return NULL;
    }
}

static void reload_in_background(struct supervisor *sv)
{
    pthread_mutex_lock(&sv->hup_lock);
    if (sv->reloader_running) {
        sv->reload_again = true;
        log_info("SIGHUP received: a reload is under way; reloading %s again after it",
                 sv->cfg->script_path);
    } else {
        if (sv->reloader_joinable)
            pthread_join(sv->reloader, NULL);
        sv->reloader_joinable = false;
        log_info("SIGHUP received: reloading %s", sv->cfg->script_path);
        int e = pthread_create(&sv->reloader, NULL, reloader_main, sv);
        if (e == 0)
            sv->reloader_running = sv->reloader_joinable = true;
        else
            log_error("cannot reload: no thread for it: %s", strerror(e));
    }
    pthread_mutex_unlock(&sv->hup_lock);
}

/* At exit: true when a reload is still loading (its top level blocked in a C call, say),
 * which nothing can interrupt: the caller then exits without waiting for it. Otherwise
 * the SIGHUP thread is joined (it finds the drain and returns). */
static bool reload_abandoned(struct supervisor *sv)
{
    if (pthread_mutex_trylock(&sv->reload_lock) != 0)
        return true;
    pthread_mutex_unlock(&sv->reload_lock);
    pthread_mutex_lock(&sv->hup_lock);
    bool joinable = sv->reloader_joinable;
    sv->reloader_joinable = false;
    pthread_mutex_unlock(&sv->hup_lock);
    if (joinable)
        pthread_join(sv->reloader, NULL);
    return false;
}

/* SIGHUP, and --watch when a TLS file changes: the certificate, key and client CA bundle
 * are read again; a set that passes every check of tls_identity_load goes to every worker
 * and the HTTPS health listener, for their next handshakes (open connections keep the old
 * one); one that does not is refused, and the old one keeps serving. */
static void reload_tls(void *arg)
{
    struct supervisor *sv = arg;
    struct tls_identity next;
    char err[1024];
    pthread_mutex_lock(&sv->lock);
    if (sv->stopping || !sv->tls->cert_pem)   /* no cert_pem: no TLS listener */
        goto out;
    if (tls_identity_reload(sv->tls, &sv->tls_src, &next, err, sizeof err) != 0) {
        log_error("TLS reload refused, still serving certificate %s: %s",
                  sv->tls->fingerprint, err);
        goto out;
    }
    if (tls_identity_same(sv->tls, &next)) {
        log_info("TLS: certificate %s%s unchanged", sv->tls->fingerprint,
                 sv->tls->client_ca_pem ? " and client CA" : "");
        tls_identity_free(&next);
        goto out;
    }
    size_t len;
    char *packed = tls_identity_pack(&next, &len);
    if (!packed || admin_set_identity(sv->admin, &next, err, sizeof err) != 0) {
        log_error("TLS reload refused, still serving certificate %s: %s",
                  sv->tls->fingerprint, packed ? err : "out of memory");
        free(packed);
        tls_identity_free(&next);
        goto out;
    }
    tell_all(sv, CONTROL_IDENTITY, packed, len);
    memset(sv->identity, 0, sv->identity_len);   /* it holds the old key */
    free(sv->identity);
    sv->identity = packed;
    sv->identity_len = len;
    tls_identity_free(sv->tls);
    *sv->tls = next;
    if (next.client_ca_pem)
        log_info("TLS reloaded: new connections get certificate %s (serial %s, expires %s) "
                 "and need a client certificate from %s (%d CA certificate%s)",
                 next.fingerprint, next.serial, next.not_after, sv->tls_src.client_ca_path,
                 next.client_cas, next.client_cas == 1 ? "" : "s");
    else
        log_info("TLS reloaded: new connections get certificate %s (serial %s, expires %s)",
                 next.fingerprint, next.serial, next.not_after);
out:
    pthread_mutex_unlock(&sv->lock);
}

/* --watch: a change is reloaded, except during the drain (which no reload interrupts). */
static bool watched_change(struct supervisor *sv, const char *what)
{
    bool draining = atomic_load(&sv->draining);
    log_info("watch: %s changed: %s", what, draining ? "ignored: draining" : "reloading");
    return !draining;
}

static void script_changed(void *arg, const char *what)
{
    if (watched_change(arg, what))
        reload(arg);
}

static void tls_changed(void *arg, const char *what)
{
    if (watched_change(arg, what))
        reload_tls(arg);
}

/* --watch for the TLS files (none for an ephemeral certificate without a client CA). */
static struct watch *watch_tls(struct supervisor *sv)
{
    const char *paths[3];
    int n = 0;
    char err[512];
    if (!sv->tls->cert_pem)
        return NULL;
    if (sv->tls_src.cert_path) {
        paths[n++] = sv->tls_src.cert_path;
        paths[n++] = sv->tls_src.key_path;
    }
    if (sv->tls_src.client_ca_path)
        paths[n++] = sv->tls_src.client_ca_path;
    if (n == 0)
        return NULL;
    struct watch *w = watch_files_start(paths, n, "TLS files", WATCH_SETTLE_MS, tls_changed, sv,
                                        err, sizeof err);
    if (!w)
        log_error("--watch: %s; reload the certificates with SIGHUP instead", err);
    return w;
}

/* A SIGTERM or SIGINT is waiting for the main thread (signals are blocked everywhere). */
static bool stop_requested(void)
{
    sigset_t pending;
    return sigpending(&pending) == 0 &&
           (sigismember(&pending, SIGTERM) == 1 || sigismember(&pending, SIGINT) == 1);
}

/* ---- health --------------------------------------------------------------------------- */

/* Liveness fails while a worker is stuck in a handler past its budget (the watchdog);
 * readiness before the first workers serve, while no worker is serving and unstuck, and
 * from the moment a SIGTERM or SIGINT is pending (even before the main thread, busy
 * starting workers, takes it) to the exit. Health listener's thread. */
static bool probe_live(void *arg)
{
    (void)arg;
    return metrics_sum(offsetof(struct metrics, workers_stuck)) == 0;
}

static bool probe_ready(void *arg)
{
    struct supervisor *sv = arg;
    if (!atomic_load(&sv->started) || atomic_load(&sv->draining) || stop_requested())
        return false;
    return metrics_sum(offsetof(struct metrics, workers_serving)) -
               metrics_sum(offsetof(struct metrics, workers_stuck)) > 0;
}

/* ---- stopping ------------------------------------------------------------------------- */

static const char *signal_name(int sig) { return sig == SIGINT ? "SIGINT" : "SIGTERM"; }

/* Every worker's drain thread (worker.c) sees the end of the pipe. */
static void close_drain_pipe(struct supervisor *sv)
{
    if (sv->drain_pipe[1] >= 0)
        close(sv->drain_pipe[1]);
    sv->drain_pipe[1] = -1;
}

/* SIGTERM or SIGINT: the drain's first step (docs/operations.md, Drain). /ready answers 503
 * from now on and every worker is told, so that its gRPC health says NOT_SERVING; streams
 * are still accepted for --drain_grace_ms, the time a load balancer (Kubernetes'
 * endpoints, Envoy's health checker) takes to stop sending new ones. A second signal ends
 * the grace at once. stop_workers is the next step. Main thread. */
static void drain(struct supervisor *sv, int sig, const sigset_t *waited)
{
    uint64_t t0 = now_ms(CLOCK_MONOTONIC);
    atomic_store(&sv->draining, true);
    /* first, before the lock a reload may hold for a while: a worker whose main thread is
     * busy (building a reload's VMs) reads CONTROL_DRAIN only after */
    close_drain_pipe(sv);
    int grace = sv->cfg->drain_grace_ms;
    log_info("drain: %s received: /ready answers 503 and gRPC health NOT_SERVING; new streams "
             "are still accepted for %d ms (--drain_grace_ms)", signal_name(sig), grace);
    pthread_mutex_lock(&sv->lock);   /* a reload in its worker round gives up first */
    sv->stopping = true;             /* no reload, no worker started again */
    tell_all(sv, CONTROL_DRAIN, "", 0);
    pthread_mutex_unlock(&sv->lock);
    for (;;) {
        uint64_t now = now_ms(CLOCK_MONOTONIC);
        if (now >= t0 + (uint64_t)grace)
            break;
        uint64_t left = t0 + (uint64_t)grace - now;
        struct timespec tick = {.tv_sec = 0,
                                .tv_nsec = (long)(left < TICK_MS ? left : TICK_MS) * 1000000L};
        int again = sigtimedwait(waited, NULL, &tick);
        if (again == SIGTERM || again == SIGINT) {
            log_info("drain: second signal (%s): the grace ends now, after %llu of %d ms",
                     signal_name(again), (unsigned long long)(now_ms(CLOCK_MONOTONIC) - t0),
                     grace);
            break;
        }
        if (again == SIGHUP)
            log_limited_at(LOG_INFO, "drain: SIGHUP ignored: the server is draining");
        reap_and_restart(sv);
    }
}

/* The drain's last steps: every worker stops accepting (GOAWAY), gives its open streams up
 * to --drain_timeout_ms, cancels the rest and exits; what is left STOP_MARGIN_MS after that
 * is killed. 3 when a worker exited with 3 (a stuck handler) or had to be killed, else 0. */
static int stop_workers(struct supervisor *sv)
{
    int timeout = sv->cfg->drain_timeout_ms;
    pthread_mutex_lock(&sv->lock);
    sv->stopping = true;
    bool any = false;
    for (int i = 0; i < sv->n; i++)
        any |= sv->kids[i].pid != 0;
    if (any)
        log_info("drain: no new streams from now on (GOAWAY); open streams have %d ms to "
                 "finish (--drain_timeout_ms)", timeout);
    for (int i = 0; i < sv->n; i++)
        if (sv->kids[i].pid) {
            control_send(sv->kids[i].ctl, CONTROL_STOP, "", 0);
            sv->kids[i].stop_asked = true;
            kill(sv->kids[i].pid, SIGCONT);   /* a stopped worker reads it too */
        }
    pthread_mutex_unlock(&sv->lock);
    int rc = 0;
    uint64_t t0 = now_ms(CLOCK_MONOTONIC);
    uint64_t deadline = t0 + (uint64_t)timeout + STOP_MARGIN_MS;
    bool killed = false;
    for (;;) {
        int left = 0;
        for (int i = 0; i < sv->n; i++) {
            struct child *c = &sv->kids[i];
            int status;
            if (!c->pid)
                continue;
            pid_t r = waitpid(c->pid, &status, WNOHANG);
            if (r != c->pid) {
                left++;
                continue;
            }
            if (WIFEXITED(status) && WEXITSTATUS(status) == 3)
                rc = 3;   /* it logged the stuck handler it abandoned */
            else if (!WIFEXITED(status) && !killed)
                log_warn("worker %d had ended (killed by signal %d) before it could stop", i,
                         WTERMSIG(status));
            else if (WIFEXITED(status) && WEXITSTATUS(status) != 0)
                log_warn("worker %d stopped with exit code %d", i, WEXITSTATUS(status));
            child_ended(sv, i, status);
        }
        if (!left)
            break;
        if (!killed && now_ms(CLOCK_MONOTONIC) > deadline) {
            log_error("drain: %d worker%s did not stop within %d ms; killing %s", left,
                      left == 1 ? "" : "s", timeout + STOP_MARGIN_MS,
                      left == 1 ? "it" : "them");
            for (int i = 0; i < sv->n; i++)
                if (sv->kids[i].pid)
                    kill(sv->kids[i].pid, SIGKILL);
            rc = 3;
            killed = true;
        }
        struct timespec pause = {0, 10 * 1000000L};
        nanosleep(&pause, NULL);
    }
    if (any)
        log_info("drain: every worker has stopped, %llu ms after the grace",
                 (unsigned long long)(now_ms(CLOCK_MONOTONIC) - t0));
    return rc;
}

/* ---- the supervisor ------------------------------------------------------------------- */

/* The first load, on a thread of its own (load_first). Heap-held: the thread may outlive
 * the wait for it. */
struct first_load {
    struct supervisor *sv;
    struct loaded out;
    char err[1024];
    int rc;
    _Atomic bool done;
};

static void *first_load_main(void *arg)
{
    struct first_load *fl = arg;
    fl->rc = load(fl->sv, 1, &fl->out, fl->err, sizeof fl->err);
    atomic_store(&fl->done, true);
    return NULL;
}

/* Loads generation 1 while the main thread watches for SIGTERM/SIGINT: a start-up signal
 * is taken within a tick however long the top level runs, even blocked in a C call
 * (--unsafe_stdlib), which nothing can interrupt. 0, -1 (err), or -2: a signal came first;
 * the load is abandoned (sv->first_load_abandoned: the exit must not wait for it). */
static int load_first(struct supervisor *sv, struct loaded *out, char *err, size_t errlen)
{
    struct first_load *fl = calloc(1, sizeof *fl);
    if (!fl) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    fl->sv = sv;
    pthread_t t;
    int e = pthread_create(&t, NULL, first_load_main, fl);
    if (e != 0) {   /* no thread: load here, signals are taken after it */
        free(fl);
        return load(sv, 1, out, err, errlen);
    }
    while (!atomic_load(&fl->done)) {
        if (stop_requested()) {
            pthread_detach(t);
            sv->first_load_abandoned = true;   /* fl stays the thread's, never freed */
            return -2;
        }
        struct timespec pause = {0, 10 * 1000000L};
        nanosleep(&pause, NULL);
    }
    pthread_join(t, NULL);
    int rc = fl->rc;
    *out = fl->out;
    if (rc != 0)
        snprintf(err, errlen, "%s", fl->err);
    free(fl);
    return rc;
}

/* A signal during start-up: the workers serve nothing yet, so they (and what their top
 * levels started, in their process groups) are killed at once, not drained. */
static void kill_workers(struct supervisor *sv)
{
    pthread_mutex_lock(&sv->lock);
    sv->stopping = true;
    for (int i = 0; i < sv->n; i++) {
        struct child *c = &sv->kids[i];
        if (!c->pid)
            continue;
        c->killing = true;
        kill(-c->pid, SIGKILL);
        kill(c->pid, SIGKILL);
    }
    for (int i = 0; i < sv->n; i++) {
        int status;
        if (sv->kids[i].pid && waitpid(sv->kids[i].pid, &status, 0) == sv->kids[i].pid)
            child_ended(sv, i, status);
    }
    pthread_mutex_unlock(&sv->lock);
}

static int start(struct supervisor *sv, struct tls_identity *id, char *err, size_t errlen)
{
    const struct config *cfg = sv->cfg;
    sv->identity = tls_identity_pack(id, &sv->identity_len);
    if (!sv->identity) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    struct loaded first = {0};
    int loaded = load_first(sv, &first, err, errlen);
    if (loaded != 0)
        return loaded;
    make_current(sv, &first, 1);
    snprintf(sv->plaintext_address, sizeof sv->plaintext_address, "%s", cfg->plaintext_address);
    snprintf(sv->secure_address, sizeof sv->secure_address, "%s", cfg->secure_address);
    if (!cfg->disable_plaintext &&
        hold_port("plaintext gRPC", cfg->plaintext_address, sv->plaintext_address,
                  sizeof sv->plaintext_address, &sv->held[0], &sv->ports[0], err, errlen) != 0)
        return -1;
    if (!cfg->disable_tls &&
        hold_port("TLS gRPC", cfg->secure_address, sv->secure_address,
                  sizeof sv->secure_address, &sv->held[1], &sv->ports[1], err, errlen) != 0)
        return -1;
    if (stop_requested())
        return -2;
    for (int i = 0; i < sv->n; i++)
        if (spawn(sv, i) != 0) {
            snprintf(err, errlen, "cannot start worker %d", i);
            return -1;
        }
    for (int i = 0; i < sv->n; i++) {
        char why[900];
        int r = await(sv, i, CONTROL_READY, 0, READY_TIMEOUT_MS, why, sizeof why);
        if (r == -2)
            return -2;
        if (r != 1) {
            snprintf(err, errlen, "worker %d did not start: %s", i, why);
            return -1;
        }
    }
    publish(sv, atomic_load(&metrics->script_load_us));
    if (!cfg->disable_plaintext)
        log_info("plaintext gRPC listening on %s (port %d)", cfg->plaintext_address,
                 sv->ports[0]);
    if (!cfg->disable_tls)
        log_info("TLS gRPC listening on %s (port %d)", cfg->secure_address, sv->ports[1]);
    log_info("serving %s with %d worker process%s", cfg->script_path, sv->n,
             sv->n == 1 ? "" : "es");
    return 0;
}

void supervisor_signals(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGHUP);
    sigaddset(set, SIGCHLD);
}

/* What the TLS listeners serve, said once at start-up. */
static void log_tls_identity(const struct tls_identity *id, const struct tls_source *src)
{
    if (id->ephemeral)
        log_warn("no --cert_chain_path given: using an ephemeral self-signed certificate "
                 "for %s, SHA-256 fingerprint %s", src->hostnames ? src->hostnames : TLS_HOSTNAMES,
                 id->fingerprint);
    else
        log_info("TLS certificate %s: SHA-256 fingerprint %s, serial %s, expires %s",
                 src->cert_path, id->fingerprint, id->serial, id->not_after);
    if (id->client_ca_pem)
        log_info("mTLS: TLS gRPC clients need a certificate from %s (%d CA certificate%s); "
                 "the health listener asks for none", src->client_ca_path, id->client_cas,
                 id->client_cas == 1 ? "" : "s");
}

int supervisor_run(const struct config *cfg, int argc, char **argv)
{
    char err[1024];
    struct tls_identity id = {0};
    struct tls_source tls_src = {.cert_path = cfg->cert_chain_path,
                                 .key_path = cfg->private_key_path,
                                 .client_ca_path = cfg->client_ca_path,
                                 .hostnames = cfg->cert_hostnames};
    bool need_tls = !cfg->disable_tls || (cfg->secure_health_check && !cfg->combined_health_check);
    if (need_tls) {
        if (tls_identity_load(&id, &tls_src, err, sizeof err) != 0) {
            log_fatal("%s", err);
            return 1;
        }
        log_tls_identity(&id, &tls_src);
    }
    if (cfg->record_dir && record_check_dir(cfg->record_dir, err, sizeof err) != 0) {
        log_fatal("%s", err);
        return 1;
    }
    struct supervisor sv = {.cfg = cfg, .argc = argc, .argv = argv, .held = {-1, -1},
                            .metrics_fd = -1, .drain_pipe = {-1, -1}, .n = cfg->threads, .tls = &id,
                            .tls_src = tls_src};
    pthread_mutex_init(&sv.lock, NULL);
    pthread_mutex_init(&sv.reload_lock, NULL);
    pthread_mutex_init(&sv.hup_lock, NULL);
    sv.kids = calloc((size_t)sv.n, sizeof *sv.kids);
    find_exe(&sv);
    int rc = 0;
    struct admin *admin = NULL;
    struct watch *watch = NULL, *tls_watch = NULL;
    /* The counters the load sets are then the shared ones. */
    sv.metrics_fd = sv.kids ? metrics_share(sv.n) : -1;
    if (sv.metrics_fd >= 0 && pipe2(sv.drain_pipe, O_CLOEXEC) != 0) {
        log_fatal("cannot make the drain pipe: %s", strerror(errno));
        rc = 1;
        goto out;
    }
    if (sv.metrics_fd < 0) {
        log_fatal("%s%s", sv.kids ? "cannot share the metrics: " : "out of memory",
                sv.kids ? strerror(errno) : "");
        rc = 1;
        goto out;
    }
    /* The health listener before the first load: while a slow top level runs, a probe
     * hears /ready 503, not a refused connection. */
    struct admin_probes probes = {.live = probe_live, .ready = probe_ready, .ud = &sv};
    if (!cfg->combined_health_check) {
        admin = admin_start(cfg->health_address, cfg->secure_health_check ? &id : NULL, &probes,
                            err, sizeof err);
        if (!admin) {
            log_fatal("%s", err);
            rc = 1;
            goto out;
        }
    }
    sv.admin = admin;
    int started = start(&sv, &id, err, sizeof err);
    if (started == -2) {
        log_info("signal received during start-up: shutting down at once%s",
                 sv.first_load_abandoned ? " (the script's top level was still running)" : "");
        kill_workers(&sv);
        goto out;
    }
    if (started != 0) {
        log_fatal("%s", err);
        rc = 1;
        goto out;
    }
    atomic_store(&sv.started, true);
    if (cfg->watch) {
        watch = watch_start(cfg->script_path, WATCH_SETTLE_MS, script_changed, &sv, err,
                            sizeof err);
        if (!watch)
            log_error("--watch: %s; reload with SIGHUP instead", err);
        atomic_store(&sv.watch, watch);
        /* the first load's files, from the generation every worker runs */
        struct snapshot *first = watch ? snapshot_unpack(sv.packed, sv.packed_len) : NULL;
        if (first)
            watch_follow(&sv, first, false);
        snapshot_unref(first);
        tls_watch = watch_tls(&sv);
    }

    sigset_t waited;
    supervisor_signals(&waited);
    int sig;
    for (;;) {
        struct timespec tick = {.tv_sec = 0, .tv_nsec = TICK_MS * 1000000L};
        sig = sigtimedwait(&waited, NULL, &tick);
        if (sig == SIGTERM || sig == SIGINT)
            break;   /* the drain starts before anything else */
        reap_and_restart(&sv);
        if (sig == SIGHUP) {
            reload_in_background(&sv);   /* the script, on its own thread */
            reload_tls(&sv);             /* the certificates: a quick read of files */
        }
    }
    drain(&sv, sig, &waited);
out:
    atomic_store(&sv.draining, true);
    if (sv.kids) {
        int stopped = stop_workers(&sv);
        if (!rc)
            rc = stopped;
    }
    /* the health port answers (ready 503, live 200) until every worker is gone */
    if (admin)
        admin_stop(admin);
    if (sv.first_load_abandoned || reload_abandoned(&sv)) {
        log_warn("exiting with %s of %s still loading (its top level has not returned); it "
                 "is abandoned", sv.first_load_abandoned ? "the first load" : "a reload",
                 cfg->script_path);
        if (rc == 3)
            log_error("stopped, abandoning streams a stuck worker still held");
        else
            log_info("stopped");
        _exit(rc);
    }
    atomic_store(&sv.watch, NULL);
    watch_stop(watch);
    watch_stop(tls_watch);
    for (int i = 0; i < 2; i++) {
        if (sv.held[i] >= 0)
            close(sv.held[i]);
        if (sv.drain_pipe[i] >= 0)
            close(sv.drain_pipe[i]);
    }
    free(sv.kids);
    free(sv.packed);
    if (sv.identity) {
        memset(sv.identity, 0, sv.identity_len);
        free(sv.identity);
    }
    tls_identity_free(&id);
    pthread_mutex_destroy(&sv.lock);
    pthread_mutex_destroy(&sv.reload_lock);
    pthread_mutex_destroy(&sv.hup_lock);
    if (rc == 3)
        log_error("stopped, abandoning streams a stuck worker still held");
    else if (rc == 0)
        log_info("stopped");
    return rc;
}
