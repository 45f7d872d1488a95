/* check.c — see check.h. */
#include "check.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dispatch.h"
#include "exchange.h"
#include "generation.h"
#include "vm.h"

/* Names of sandbox-refused functions a script's source mentions: --check points them out
 * even when the top level never calls them (a handler might). */
static void scan_source(FILE *out, const struct snapshot *snap)
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
                fprintf(out, "%s:%d: warning: %s%s %s\n", snap->path, line, *r,
                       (*r)[n - 1] == '.' ? "*" : "", why);
            }
        }
    }
}

/* Prints a line of JSON (and frees it); false when there was none to print. */
static bool put_line(char *line, size_t len)
{
    if (!line)
        return false;
    fwrite(line, 1, len, stdout);
    fputc('\n', stdout);
    free(line);
    return true;
}

/* Runs each stream of the file through the script, as a worker would: one dispatch stream
 * per stream, every message through dispatch_handle, answers and the final status printed. */
static int dry_run(struct vm *vm, const char *request_path)
{
    char err[1024];
    struct exchange *x = exchange_new(err, sizeof err);
    if (!x) {
        fprintf(stderr, "luacallout: %s\n", err);
        return 2;
    }
    struct exchange_msgs *streams = NULL;
    size_t nstreams = 0;
    if (exchange_read_file(x, request_path, &streams, &nstreams, err, sizeof err) != 0) {
        fprintf(stderr, "luacallout: %s\n", err);
        exchange_free(x);
        return 2;
    }
    int rc = 0;
    for (size_t i = 0; i < nstreams; i++) {
        struct dispatch_stream *st = dispatch_stream_open(vm, i + 1);
        int status = 0;
        const char *message = "";
        char *failed = NULL;   /* the whole message, as the server sends it */
        for (size_t j = 0; st && j < streams[i].count; j++) {
            struct dispatch_reply reply;
            dispatch_handle(st, streams[i].data[j], streams[i].lens[j], &reply);
            if (reply.outcome == DISPATCH_FAIL) {
                status = reply.status;
                failed = strdup(reply.message);
                message = failed ? failed : "out of memory";
                break;
            }
            for (size_t k = 0, at = 0;
                 reply.outcome == DISPATCH_RESPOND && k < reply.count; at += reply.lens[k], k++) {
                size_t len = 0;
                char *line = exchange_response_line(x, reply.data + at, reply.lens[k], &len,
                                                    err, sizeof err);
                if (!put_line(line, len))
                    fprintf(stderr, "luacallout: answer %zu: %s\n", k + 1, err);
            }
        }
        if (!st) {
            status = 8;   /* RESOURCE_EXHAUSTED, as a worker out of memory answers */
            message = "out of memory";
        }
        size_t len = 0;
        char *line = exchange_status_line(x, status, message, nstreams > 1 ? (int)i + 1 : 0, &len);
        if (!put_line(line, len))
            fprintf(stderr, "luacallout: stream %zu: cannot write its status line\n", i + 1);
        free(failed);
        if (status != 0)
            rc = 1;
        if (st)
            dispatch_stream_close(st);
    }
    fflush(stdout);
    exchange_msgs_free(streams, nstreams);
    exchange_free(x);
    return rc;
}

/* --check: what a reload would do, for a user's CI: compile, run the top level, list the
 * handlers, then what the sandbox refused while loading, what the source uses that it would
 * refuse, and globals that look like misspelled handlers. With a request file, that report
 * goes to stderr and stdout has the dry run's JSON lines. */
int check_script(const char *path, const char *request_path)
{
    char err[1024];
    struct vm *vm = NULL;
    if (generation_load(path, 1, &vm, 1, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    FILE *out = request_path ? stderr : stdout;
    const char *names[8];
    size_t n = vm_handlers(vm, names, 8);
    fprintf(out, "%s: ok, handlers:", path);
    for (size_t i = 0; i < n; i++)
        fprintf(out, " %s", names[i]);
    fprintf(out, "\n");
    if (vm->refusals_len)
        fprintf(out, "%s: the sandbox refused, while the script loaded:\n%.*s", path,
                (int)vm->refusals_len, vm->refusals);
    if (!vm_get_limits()->unsafe_stdlib)
        scan_source(out, vm->snap);
    char typos[2048];
    if (vm_misspellings(vm, typos, sizeof typos))
        fprintf(out, "%s", typos);
    fflush(out);
    int rc = request_path ? dry_run(vm, request_path) : 0;
    vm_close(vm);
    return rc;
}
