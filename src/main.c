/* main.c — flags, --check (check.c), then the supervisor (or, with --worker_of, a worker process).
 *
 * Signals are blocked in every thread (they are blocked before any thread starts, and stay
 * blocked across the exec of a worker) and taken synchronously — sigtimedwait in the
 * supervisor, a signalfd in workers — so no handler ever runs in the middle of grpc or Lua
 * code. */
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

#include "check.h"
#include "config.h"
#include "generation.h"
#include "log.h"
#include "send.h"
#include "supervisor.h"
#include "vm.h"
#include "worker.h"

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

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    /* a client, not a server: its own flags, and Ctrl-C stops it (signals not blocked yet) */
    if (argc > 1 && strcmp(argv[1], "send") == 0)
        return send_main(argc, argv);
    sigset_t waited;
    supervisor_signals(&waited);
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
    log_set_format(cfg.log_format);
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
        .content_length_follows_body = cfg.content_length_follows_body,
    };
    vm_set_limits(&limits);
    if (cfg.check)
        return check_script(cfg.script_path, cfg.request_path);

    raise_nofile();
    if (cfg.worker_of)
        return worker_run(&cfg);
    return supervisor_run(&cfg, argc, argv);
}
