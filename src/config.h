/* config.h — command-line flags turned into one immutable configuration. */
#ifndef LUACALLOUT_CONFIG_H
#define LUACALLOUT_CONFIG_H

#include <stdbool.h>

#include "log.h"

struct config {
    const char *script_path;
    const char *secure_address;     /* TLS gRPC listener */
    const char *plaintext_address;  /* h2c gRPC listener */
    const char *health_address;     /* HTTP(S) health listener */
    bool disable_tls;
    bool disable_plaintext;
    bool combined_health_check;     /* no separate health listener */
    bool secure_health_check;       /* health over HTTPS */
    const char *cert_chain_path;
    const char *private_key_path;
    const char *client_ca_path;     /* mTLS: clients of the TLS port need a cert from it */
    const char *cert_hostnames;     /* names of the ephemeral certificate (comma-separated) */
    int threads;
    enum log_level log_level;
    enum log_format log_format;     /* --log_format: text (default) or json */
    bool watch;                     /* reload when the script's folder changes */
    bool bench_echo;                /* fixed answers, no Lua: the benchmark's baseline */
    bool check;                     /* load the script, list its handlers, exit */
    const char *request_path;       /* --check --request: run these requests through it */
    bool unsafe_stdlib;             /* no sandbox: os.exit, io.popen, debug, bytecode */
    int script_timeout_ms;          /* per handler call; 0 = no limit */
    int script_memory_mb;           /* per Lua VM; 0 = no limit */
    /* Limits on what a client can make the server hold or do (docs/operations.md, Limits) */
    int max_message_kb;             /* one received ProcessingRequest */
    int max_headers;                /* header entries in one message */
    int max_ctx_kb;                 /* attributes + metadata merged into one stream's ctx */
    bool content_length_follows_body; /* a replaced buffered body sets content-length */
    int max_streams_per_connection; /* HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS */
    int stream_idle_timeout_ms;     /* a stream with no message for this long ends; 0 = none */
    int max_queued_kb;              /* answers a client has not read yet, per stream */
    int max_queued_total_mb;        /* the same, summed over all streams */
    int drain_grace_ms;             /* after SIGTERM: new streams still accepted this long */
    int drain_timeout_ms;           /* then: open streams may finish this long */
    /* --record (docs/operations.md, Recording traffic) */
    const char *record_dir;         /* record finished streams into files there */
    double record_sample;           /* the share of streams recorded, (0, 1] */
    int record_max_stream_kb;       /* a stream with more raw bytes is not recorded */
    int record_max_mb;              /* what the server writes into record_dir, in all */
    const char *record_redact;      /* header names whose values are not written */
    const char *worker_of;          /* set in worker processes: "slot,control,metrics,drain fds" */
};

enum config_result { CONFIG_RUN, CONFIG_EXIT_OK, CONFIG_EXIT_ERROR };

/* Parses argv into cfg (defaults first). On CONFIG_EXIT_OK (--help, --version) the text
 * was printed to stdout; on CONFIG_EXIT_ERROR one line was printed to stderr. */
enum config_result config_parse(struct config *cfg, int argc, char **argv);

#endif
