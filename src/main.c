/* main.c — start-up order, signals, shutdown.
 *
 * Signals are blocked in every thread (they are blocked before grpc or any worker starts a
 * thread) and taken synchronously here with sigwait, so no handler ever runs in the middle
 * of grpc or Lua code. */
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

#include "admin.h"
#include "config.h"
#include "log.h"
#include "script.h"
#include "server.h"
#include "stream.h"
#include "tls.h"
#include "watch.h"

#define SHUTDOWN_GRACE_MS 5000
/* Quiet time after a file event before reloading: one reload per save or ConfigMap swap. */
#define WATCH_SETTLE_MS 200

static void reload(void *srv) { server_reload(srv); }

/* --check: what a reload would do, for a user's CI: compile, run the top level, list the
 * handlers. */
static int check_script(const char *path)
{
    char err[1024];
    struct script *s = script_open(path, err, sizeof err);
    if (!s) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    const char *names[8];
    size_t n = script_handlers(s, names, 8);
    printf("%s: ok, handlers:", path);
    for (size_t i = 0; i < n; i++)
        printf(" %s", names[i]);
    printf("\n");
    script_close(s);
    return 0;
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
    struct script_limits limits = {
        .timeout_ms = cfg.script_timeout_ms,
        .memory_bytes = (size_t)cfg.script_memory_mb << 20,
        .unsafe_stdlib = cfg.unsafe_stdlib,
        .max_headers = (size_t)cfg.max_headers,
        .max_ctx_bytes = (size_t)cfg.max_ctx_kb << 10,
    };
    script_set_limits(&limits);
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
    if (!cfg.combined_health_check) {
        admin = admin_start(cfg.health_address, cfg.secure_health_check ? &id : NULL, err,
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
        int sig = 0;
        if (sigwait(&waited, &sig) != 0)
            continue;
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
    server_stop(srv, SHUTDOWN_GRACE_MS);
    tls_identity_free(&id);
    log_info("stopped");
    return 0;
}
