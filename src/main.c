/* main.c — start-up order, signals, shutdown.
 *
 * Signals are blocked in every thread (they are blocked before grpc or any worker starts a
 * thread) and taken synchronously here with sigwait, so no handler ever runs in the middle
 * of grpc or Lua code. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "admin.h"
#include "config.h"
#include "log.h"
#include "generation.h"
#include "server.h"
#include "stream.h"
#include "tls.h"
#include "vm.h"
#include "watch.h"

#define SHUTDOWN_GRACE_MS 5000
/* Quiet time after a file event before reloading: one reload per save or ConfigMap swap. */
#define WATCH_SETTLE_MS 200
/* How often the control thread runs the watchdog and builds spare VMs. */
#define TICK_MS 100

static void reload(void *srv) { server_reload(srv); }

/* Names of sandbox-refused functions a script's source mentions: --check points them out
 * even when the top level never calls them (a handler might). */
static void scan_source(const struct snapshot *snap)
{
    static const char *const refused[] = {
        "os.exit", "os.execute", "os.remove", "os.rename", "os.tmpname", "os.setlocale",
        "io.popen", "io.tmpfile", "io.input", "io.output", "io.read", "io.write",
        "package.loadlib", "package.searchpath", "package.cpath", "package.path", "debug.",
        "string.dump", NULL};
    int line = 1;
    for (const char *p = snap->source; p < snap->source + snap->len; p++) {
        if (*p == '\n') {
            line++;
            continue;
        }
        for (const char *const *r = refused; *r; r++) {
            size_t n = strlen(*r);
            if ((size_t)(snap->source + snap->len - p) >= n && memcmp(p, *r, n) == 0 &&
                (p == snap->source || !(p[-1] == '_' || p[-1] == '.' ||
                                        (p[-1] >= 'a' && p[-1] <= 'z') ||
                                        (p[-1] >= 'A' && p[-1] <= 'Z')))) {
                const char *why = strcmp(*r, "package.cpath") == 0 || strcmp(*r, "package.path") == 0
                    ? "is fixed when the VM is built: changing it has no effect"
                    : strcmp(*r, "string.dump") == 0
                    ? "makes bytecode, which load refuses"
                    : "is refused by the sandbox (--unsafe_stdlib allows it)";
                printf("%s:%d: warning: %s%s %s\n", snap->path, line, *r,
                       (*r)[n - 1] == '.' ? "*" : "", why);
            }
        }
    }
}

/* --check: what a reload would do, for a user's CI: compile, run the top level, list the
 * handlers, then what the sandbox refused while loading, what the source uses that it would
 * refuse, and globals that look like misspelled handlers. */
static int check_script(const char *path)
{
    char err[1024];
    struct vm *vm = NULL;
    if (generation_load(path, 1, &vm, 1, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    const char *names[8];
    size_t n = vm_handlers(vm, names, 8);
    printf("%s: ok, handlers:", path);
    for (size_t i = 0; i < n; i++)
        printf(" %s", names[i]);
    printf("\n");
    if (vm->refusals_len)
        printf("%s: the sandbox refused, while the script loaded:\n%.*s", path,
               (int)vm->refusals_len, vm->refusals);
    if (!vm_get_limits()->unsafe_stdlib)
        scan_source(vm->snap);
    char typos[2048];
    if (vm_misspellings(vm, typos, sizeof typos))
        printf("%s", typos);
    vm_close(vm);
    return 0;
}

/* Liveness fails while a worker is stuck in a handler past its budget (the watchdog);
 * readiness while every worker is. Called on the health listener's thread: reads atomics. */
static bool probe_live(void *srv) { return server_stuck_workers(srv, NULL) == 0; }

static bool probe_ready(void *srv)
{
    int n = 0;
    return server_stuck_workers(srv, &n) < n;
}

/* Raises the soft limit on open files to the hard one: every stream's connection and every
 * health probe is a descriptor, and the default soft limit of 1024 is small for a server. */
static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* Waits for a signal for up to TICK_MS; 0 when none came. */
static int wait_signal(const sigset_t *set)
{
    struct timespec tick = {.tv_sec = 0, .tv_nsec = TICK_MS * 1000000L};
    int sig = sigtimedwait(set, NULL, &tick);
    return sig > 0 ? sig : 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    sigset_t waited;
    sigemptyset(&waited);
    sigaddset(&waited, SIGTERM);
    sigaddset(&waited, SIGINT);
    sigaddset(&waited, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &waited, NULL);

    struct config cfg;
    switch (config_parse(&cfg, argc, argv)) {
    case CONFIG_EXIT_OK:
        return 0;
    case CONFIG_EXIT_ERROR:
        return 2;
    case CONFIG_RUN:
        break;
    }
    log_set_level(cfg.log_level);
    /* A reload reads the path again: made absolute now, so that nothing that changes the
     * working directory later can change which file that is. */
    char abs_path[4096];
    if (cfg.script_path[0] != '/' && getcwd(abs_path, sizeof abs_path - 1)) {
        size_t n = strlen(abs_path);
        if (snprintf(abs_path + n, sizeof abs_path - n, "/%s", cfg.script_path) <
            (int)(sizeof abs_path - n))
            cfg.script_path = abs_path;
    }
    struct vm_limits limits = {
        .timeout_ms = cfg.script_timeout_ms,
        .memory_bytes = (size_t)cfg.script_memory_mb << 20,
        .unsafe_stdlib = cfg.unsafe_stdlib,
        .max_headers = (size_t)cfg.max_headers,
        .max_ctx_bytes = (size_t)cfg.max_ctx_kb << 10,
    };
    vm_set_limits(&limits);
    if (cfg.check)
        return check_script(cfg.script_path);

    char err[1024];
    struct tls_identity id = {0};
    bool need_tls = !cfg.disable_tls || (cfg.secure_health_check && !cfg.combined_health_check);
    if (need_tls) {
        if (tls_identity_load(&id, cfg.cert_chain_path, cfg.private_key_path, err,
                              sizeof err) != 0) {
            fprintf(stderr, "luacallout: %s\n", err);
            return 1;
        }
        if (id.ephemeral)
            log_warn("no --cert_chain_path given: using an ephemeral self-signed certificate "
                     "for localhost, SHA-256 fingerprint %s", id.fingerprint);
    }

    raise_nofile();
    stream_set_bench_echo(cfg.bench_echo);
    struct stream_limits stream_limits = {
        .max_queued_bytes = (size_t)cfg.max_queued_kb << 10,
        .max_queued_total_bytes = (size_t)cfg.max_queued_total_mb << 20,
        .idle_timeout_ms = cfg.stream_idle_timeout_ms,
    };
    stream_set_limits(&stream_limits);
    struct server *srv = server_start(&cfg, need_tls ? &id : NULL, err, sizeof err);
    if (!srv) {
        fprintf(stderr, "luacallout: %s\n", err);
        tls_identity_free(&id);
        return 1;
    }
    struct admin *admin = NULL;
    struct admin_probes probes = {.live = probe_live, .ready = probe_ready, .ud = srv};
    if (!cfg.combined_health_check) {
        admin = admin_start(cfg.health_address, cfg.secure_health_check ? &id : NULL, &probes, err,
                            sizeof err);
        if (!admin) {
            fprintf(stderr, "luacallout: %s\n", err);
            server_stop(srv, 0);
            tls_identity_free(&id);
            return 1;
        }
    }

    struct watch *watch = NULL;
    if (cfg.watch) {
        watch = watch_start(cfg.script_path, WATCH_SETTLE_MS, reload, srv, err, sizeof err);
        if (!watch)
            log_error("--watch: %s; reload with SIGHUP instead", err);
    }

    for (;;) {
        int sig = wait_signal(&waited);
        if (sig == 0) {
            server_tick(srv);
            continue;
        }
        if (sig == SIGHUP) {
            log_info("SIGHUP received: reloading %s", cfg.script_path);
            server_reload(srv);
            continue;
        }
        log_info("signal %d received: shutting down", sig);
        break;
    }

    watch_stop(watch);
    if (admin)
        admin_stop(admin);
    int stopped = server_stop(srv, SHUTDOWN_GRACE_MS);
    if (stopped == -1) {
        log_error("stopped, abandoning streams a stuck handler still holds");
        _exit(3);
    }
    if (stopped == -2) {
        log_info("stopped");
        _exit(0);
    }
    tls_identity_free(&id);
    log_info("stopped");
    return 0;
}
