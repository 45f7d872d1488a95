/* main.c — flags, --check, then the supervisor (or, with --worker_of, a worker process).
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

#include "config.h"
#include "generation.h"
#include "log.h"
#include "supervisor.h"
#include "vm.h"
#include "worker.h"

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
        return check_script(cfg.script_path);

    raise_nofile();
    if (cfg.worker_of)
        return worker_run(&cfg);
    return supervisor_run(&cfg, argc, argv);
}
