/* config.c — command-line flags to struct config. Flag names follow the Python
 * service-extensions SDK (`--secure_address` ...); dashed spellings are accepted too. */
#include "config.h"
#include "cpus.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef LUACALLOUT_VERSION
#define LUACALLOUT_VERSION "0.0.0"
#endif

enum flag_kind { FLAG_STRING, FLAG_BOOL, FLAG_INT, FLAG_LIMIT, FLAG_LEVEL, FLAG_LOG_FORMAT,
                 FLAG_HELP, FLAG_VERSION,
                 FLAG_LIST,       /* a string that may be empty */
                 FLAG_FRACTION }; /* a number in (0, 1] */

struct flag {
    const char *name;     /* canonical, underscore spelling */
    enum flag_kind kind;
    size_t offset;        /* into struct config */
    const char *metavar;  /* what the value is, for --help */
    const char *help;
};

#define AT(field) offsetof(struct config, field)

/* Credentials by name; bodies and metadata are never redacted (docs/operations.md). */
#define RECORD_REDACT_DEFAULT "authorization,proxy-authorization,cookie,set-cookie,x-api-key"

static const struct flag flags[] = {
    {"secure_address", FLAG_STRING, AT(secure_address), "ADDR",
     "TLS gRPC listener (default 0.0.0.0:8443)"},
    {"plaintext_address", FLAG_STRING, AT(plaintext_address), "ADDR",
     "plaintext (h2c) gRPC listener (default 0.0.0.0:8080)"},
    {"health_check_address", FLAG_STRING, AT(health_address), "ADDR",
     "HTTP health check listener (default 0.0.0.0:8000)"},
    {"disable_tls", FLAG_BOOL, AT(disable_tls), "", "do not open the TLS gRPC listener"},
    {"disable_plaintext", FLAG_BOOL, AT(disable_plaintext), "",
     "do not open the plaintext gRPC listener"},
    {"combined_health_check", FLAG_BOOL, AT(combined_health_check), "",
     "no separate health check listener"},
    {"secure_health_check", FLAG_BOOL, AT(secure_health_check), "",
     "serve the health check over HTTPS (same certificate as gRPC)"},
    {"cert_chain_path", FLAG_STRING, AT(cert_chain_path), "PATH",
     "PEM certificate chain for TLS (default: an ephemeral self-signed one)"},
    {"private_key_path", FLAG_STRING, AT(private_key_path), "PATH", "PEM private key for TLS"},
    {"client_ca_path", FLAG_STRING, AT(client_ca_path), "PATH",
     "PEM CA bundle: TLS gRPC clients must present a certificate it signed (mTLS)"},
    {"cert_hostnames", FLAG_STRING, AT(cert_hostnames), "LIST",
     "DNS names and IPs of the ephemeral certificate (default localhost,127.0.0.1,::1)"},
    {"watch", FLAG_BOOL, AT(watch), "",
     "reload when the script or a .lua file beside it, or a TLS file, changes (inotify)"},
    {"check", FLAG_BOOL, AT(check), "",
     "load the script, list the handlers it defines and exit (for CI)"},
    {"request", FLAG_STRING, AT(request_path), "FILE",
     "with --check: run the requests in FILE (exchange format, - = stdin) through the script, print the answers as JSON"},
    {"script_timeout_ms", FLAG_LIMIT, AT(script_timeout_ms), "MS",
     "time budget of one handler call, 0 = none (default 200)"},
    {"script_memory_mb", FLAG_LIMIT, AT(script_memory_mb), "MB",
     "memory ceiling of each worker's Lua VM, 0 = none (default 64)"},
    {"max_message_kb", FLAG_LIMIT, AT(max_message_kb), "KB",
     "largest ProcessingRequest accepted, in KiB (default 4096)"},
    {"max_headers", FLAG_LIMIT, AT(max_headers), "N",
     "header (or trailer) entries in one message (default 1024)"},
    {"max_ctx_kb", FLAG_LIMIT, AT(max_ctx_kb), "KB",
     "attributes and metadata one stream may accumulate in ctx, in KiB (default 1024)"},
    {"max_streams_per_connection", FLAG_LIMIT, AT(max_streams_per_connection), "N",
     "concurrent streams on one HTTP/2 connection (default 1000)"},
    {"stream_idle_timeout_ms", FLAG_LIMIT, AT(stream_idle_timeout_ms), "MS",
     "end a stream that sends no message for this long, 0 = never (default 300000)"},
    {"max_queued_kb", FLAG_LIMIT, AT(max_queued_kb), "KB",
     "answers a client has not read yet, per stream, in KiB (default 8192)"},
    {"max_queued_total_mb", FLAG_LIMIT, AT(max_queued_total_mb), "MB",
     "answers clients have not read yet, all streams together, in MiB (default 256)"},
    {"drain_grace_ms", FLAG_LIMIT, AT(drain_grace_ms), "MS",
     "after SIGTERM, keep accepting new streams this long, not ready (default 5000)"},
    {"drain_timeout_ms", FLAG_LIMIT, AT(drain_timeout_ms), "MS",
     "then let open streams finish this long before cancelling them (default 20000)"},
    {"content_length_follows_body", FLAG_BOOL, AT(content_length_follows_body), "",
     "a body response that replaces a BUFFERED body sets content-length (default true; =false: off)"},
    {"record", FLAG_STRING, AT(record_dir), "DIR",
     "record every finished stream as one JSON line in DIR (docs/operations.md, Recording traffic)"},
    {"record_sample", FLAG_FRACTION, AT(record_sample), "R",
     "with --record: record this share of the streams, 0 < R <= 1 (default 1)"},
    {"record_max_stream_kb", FLAG_LIMIT, AT(record_max_stream_kb), "KB",
     "with --record: a stream of more bytes than this is not recorded, 1 to 4096 (default 1024)"},
    {"record_max_mb", FLAG_LIMIT, AT(record_max_mb), "MB",
     "with --record: stop recording once the server wrote this much into DIR (default 64)"},
    {"record_redact", FLAG_LIST, AT(record_redact), "LIST",
     "with --record: headers whose values are written [redacted], comma-separated, empty = none "
     "(default " RECORD_REDACT_DEFAULT ")"},
    {"unsafe_stdlib", FLAG_BOOL, AT(unsafe_stdlib), "",
     "give scripts os.exit, os.execute, io.popen, debug and binary chunks"},
    {"bench_echo", FLAG_BOOL, AT(bench_echo), "",
     "benchmark baseline: answer every message with a fixed response, no Lua"},
    {"threads", FLAG_INT, AT(threads), "N",
     "worker processes, one serving thread each (default: the CPUs this process may use, affinity and cgroup quota)"},
    {"log_level", FLAG_LEVEL, AT(log_level), "LEVEL", "debug, info, warn or error (default info)"},
    {"log_format", FLAG_LOG_FORMAT, AT(log_format), "FORMAT",
     "text (default) or json: one JSON object per line (docs/operations.md, Logs)"},
    {"help", FLAG_HELP, 0, "", "print this help and exit"},
    /* internal: how the supervisor starts a worker process (SLOT,CONTROL_FD,METRICS_FD) */
    {"worker_of", FLAG_STRING, AT(worker_of), "", NULL},
    {"version", FLAG_VERSION, 0, "", "print the version and exit"},
};

static void usage(FILE *out)
{
    fprintf(out, "usage: luacallout [flags] SCRIPT.lua\n\n"
                 "Serves Envoy's ext_proc protocol with the handlers of a Lua script.\n\n"
                 "flags (--name value, --name=value; dashes or underscores):\n");
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++) {
        const struct flag *f = &flags[i];
        if (!f->help)
            continue;
        char left[64];
        snprintf(left, sizeof left, "--%s%s%s", f->name, *f->metavar ? " " : "", f->metavar);
        fprintf(out, "  %-34s %s\n", left, f->help);
    }
}

/* Matches "name" against a canonical underscore name, accepting '-' for '_'. */
static int same_name(const char *given, size_t len, const char *canonical)
{
    if (strlen(canonical) != len)
        return 0;
    for (size_t i = 0; i < len; i++) {
        char c = given[i] == '-' ? '_' : given[i];
        if (c != canonical[i])
            return 0;
    }
    return 1;
}

static void set_defaults(struct config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->secure_address = "0.0.0.0:8443";
    cfg->plaintext_address = "0.0.0.0:8080";
    cfg->health_address = "0.0.0.0:8000";
    cfg->threads = cpus_available();
    cfg->log_level = LOG_INFO;
    cfg->script_timeout_ms = 200;
    cfg->script_memory_mb = 64;
    cfg->max_message_kb = 4096;
    cfg->max_headers = 1024;
    cfg->max_ctx_kb = 1024;
    cfg->content_length_follows_body = true;
    cfg->max_streams_per_connection = 1000;
    cfg->stream_idle_timeout_ms = 300000;
    cfg->max_queued_kb = 8192;
    cfg->max_queued_total_mb = 256;
    cfg->drain_grace_ms = 5000;
    cfg->drain_timeout_ms = 20000;
    cfg->record_sample = 1;
    cfg->record_max_stream_kb = 1024;
    cfg->record_max_mb = 64;
    cfg->record_redact = RECORD_REDACT_DEFAULT;
}

static enum config_result fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static enum config_result fail(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "luacallout: %s (see --help)\n", line);
    return CONFIG_EXIT_ERROR;
}

enum config_result config_parse(struct config *cfg, int argc, char **argv)
{
    set_defaults(cfg);
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0') {
            if (strcmp(arg, "--") == 0 && i + 1 < argc)
                arg = argv[++i];
            else if (arg[0] == '-' && arg[1] != '\0')
                return fail("unknown flag '%s'", arg);
            if (cfg->script_path)
                return fail("more than one script given: '%s' and '%s'", cfg->script_path, arg);
            cfg->script_path = arg;
            continue;
        }
        const char *name = arg + 2;
        const char *eq = strchr(name, '=');
        size_t name_len = eq ? (size_t)(eq - name) : strlen(name);
        const struct flag *f = NULL;
        for (size_t k = 0; k < sizeof flags / sizeof flags[0]; k++) {
            if (same_name(name, name_len, flags[k].name)) {
                f = &flags[k];
                break;
            }
        }
        if (!f)
            return fail("unknown flag '%s'", arg);
        char *field = (char *)cfg + f->offset;
        if (f->kind == FLAG_HELP) {
            usage(stdout);
            return CONFIG_EXIT_OK;
        }
        if (f->kind == FLAG_VERSION) {
            printf("luacallout %s\n", LUACALLOUT_VERSION);
            return CONFIG_EXIT_OK;
        }
        if (f->kind == FLAG_BOOL) {
            if (eq && strcmp(eq + 1, "true") != 0 && strcmp(eq + 1, "false") != 0)
                return fail("flag --%s takes no value (or =true/=false), got '%s'", f->name,
                            eq + 1);
            *(bool *)field = !eq || strcmp(eq + 1, "true") == 0;
            continue;
        }
        const char *value = eq ? eq + 1 : NULL;
        if (!value) {
            if (i + 1 >= argc)
                return fail("flag --%s needs a value", f->name);
            value = argv[++i];
        }
        if (f->kind == FLAG_STRING) {
            if (!*value)
                return fail("flag --%s needs a non-empty value", f->name);
            *(const char **)field = value;
        } else if (f->kind == FLAG_LIST) {
            *(const char **)field = value;
        } else if (f->kind == FLAG_FRACTION) {
            char *end;
            errno = 0;
            double r = strtod(value, &end);
            if (errno || *end || !*value || !(r > 0 && r <= 1))
                return fail("flag --%s needs a number above 0 and at most 1, got '%s'", f->name,
                            value);
            *(double *)field = r;
        } else if (f->kind == FLAG_INT) {
            char *end;
            errno = 0;
            long n = strtol(value, &end, 10);
            if (errno || *end || n < 1 || n > 64)
                return fail("flag --%s needs a number from 1 to 64, got '%s'", f->name, value);
            *(int *)field = (int)n;
        } else if (f->kind == FLAG_LIMIT) {
            char *end;
            errno = 0;
            long n = strtol(value, &end, 10);
            if (errno || *end || !*value || n < 0 || n > 1000000)
                return fail("flag --%s needs a number from 0 to 1000000, got '%s'", f->name,
                            value);
            *(int *)field = (int)n;
        } else if (f->kind == FLAG_LEVEL) {
            if (log_parse_level(value, (enum log_level *)field) != 0)
                return fail("flag --%s: unknown level '%s' (debug, info, warn, error)", f->name,
                            value);
        } else if (f->kind == FLAG_LOG_FORMAT) {
            if (log_parse_format(value, (enum log_format *)field) != 0)
                return fail("flag --%s: unknown format '%s' (text, json)", f->name, value);
        }
    }
    if (!cfg->script_path)
        return fail("no script given: luacallout [flags] SCRIPT.lua");
    if (cfg->request_path && !cfg->check)
        return fail("--request is a dry run of --check: luacallout --check SCRIPT.lua "
                    "--request FILE");
    if (cfg->disable_tls && cfg->disable_plaintext)
        return fail("--disable_tls and --disable_plaintext together leave no gRPC listener");
    if (cfg->secure_health_check && cfg->combined_health_check)
        return fail("--secure_health_check and --combined_health_check contradict each other");
    if (!cfg->cert_chain_path != !cfg->private_key_path)
        return fail("--cert_chain_path and --private_key_path must be given together");
    if (cfg->cert_hostnames && cfg->cert_chain_path)
        return fail("--cert_hostnames names the ephemeral certificate; with --cert_chain_path "
                    "the names are those of that certificate");
    if (cfg->record_max_stream_kb < 1 || cfg->record_max_stream_kb > 4096)
        return fail("--record_max_stream_kb needs a number from 1 to 4096 (a record line must "
                    "stay under the 4 MiB callout.json reads), got %d", cfg->record_max_stream_kb);
    if (cfg->record_max_mb < 1)
        return fail("--record_max_mb needs a number from 1 to 1000000, got 0");
    if (cfg->record_dir && cfg->bench_echo)
        return fail("--record records what the script answers; --bench_echo runs no script");
    if (cfg->client_ca_path && cfg->disable_tls)
        return fail("--client_ca_path is for the TLS gRPC listener, which --disable_tls turns "
                    "off");
    return CONFIG_RUN;
}
