/* send.c — see send.h.
 *
 * One channel, one completion queue, the streams one after another. Within a stream the
 * requests are written while the answers are read: a script may hold its answer to one
 * message until a later one arrives (or, in observability mode, answer nothing), so a
 * client that waited for an answer before writing the next message could wait forever.
 * As grpc core requires, at most one SEND_MESSAGE and one RECV_MESSAGE are outstanding. */
#include "send.h"

#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/log.h>
#include <grpc/support/time.h>

#include "exchange.h"

#define SEND_METHOD "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
#define SEND_DEFAULT_TIMEOUT_MS 10000L
/* A PEM file larger than this is not a certificate or a key. */
#define SEND_MAX_PEM ((long)1 << 20)

struct send_opts {
    const char *file;          /* "-" = stdin */
    const char *target;
    const char *ca, *cert, *key;
    const char *authority;
    bool plaintext, insecure;
    long timeout_ms;
};

static void usage(FILE *out)
{
    fprintf(out,
            "usage: luacallout send [FILE|-] --target HOST:PORT [--plaintext | --ca FILE | "
            "--insecure]\n"
            "                       [--cert FILE --key FILE] [--authority NAME] "
            "[--timeout_ms N]\n\n"
            "Runs each stream of FILE (default -, stdin: a JSON array or JSON lines of request\n"
            "messages, or --record lines, one stream each; docs/testing.md) as one\n"
            "ExternalProcessor/Process call against a running server. Prints each\n"
            "ProcessingResponse as a JSON line as it arrives, then the stream's status line.\n\n"
            "  --target HOST:PORT  the server's gRPC listener (required)\n"
            "  --plaintext         h2c, no TLS\n"
            "  --ca FILE           TLS, the server's certificate verified against FILE's CAs\n"
            "                      (default: TLS verified against the system's roots)\n"
            "  --insecure          TLS without verifying the server's certificate\n"
            "  --cert FILE --key FILE  a client certificate and its key (mTLS)\n"
            "  --authority NAME    :authority, and the TLS name sent (SNI) and verified\n"
            "  --timeout_ms N      deadline of each stream, connecting included (default %ld)\n\n"
            "Exit status: 0 every stream ended OK, 1 some stream did not (or the server could\n"
            "not be reached), 2 usage or file error.\n",
            SEND_DEFAULT_TIMEOUT_MS);
}

static int usage_error(const char *fmt, const char *arg)
{
    fprintf(stderr, "luacallout send: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (see luacallout send --help)\n");
    return 2;
}

/* "--name" and "--name=value", dashes or underscores: the spellings the server's own flags
 * accept. *inline_value: what follows '=', or NULL when there is none. */
static bool flag_is(const char *arg, const char *name, const char **inline_value)
{
    if (strncmp(arg, "--", 2) != 0)
        return false;
    const char *a = arg + 2;
    size_t i = 0;
    for (; name[i]; i++) {
        char c = a[i] == '-' ? '_' : a[i];
        if (c != name[i])
            return false;
    }
    if (a[i] == '=') {
        *inline_value = a + i + 1;
        return true;
    }
    if (a[i] == '\0') {
        *inline_value = NULL;
        return true;
    }
    return false;
}

/* Fills o from argv[2..]; -1 after --help (exit 0), 2 on a usage error, 0 to run. */
static int parse_args(int argc, char **argv, struct send_opts *o)
{
    static const char *const valued[] = {"target", "ca", "cert", "key", "authority",
                                         "timeout_ms", NULL};
    memset(o, 0, sizeof *o);
    o->timeout_ms = SEND_DEFAULT_TIMEOUT_MS;
    const char *timeout = NULL;
    for (int i = 2; i < argc; i++) {
        const char *arg = argv[i], *v = NULL;
        if (strcmp(arg, "-h") == 0 || flag_is(arg, "help", &v)) {
            usage(stdout);
            return -1;
        }
        if (flag_is(arg, "plaintext", &v) || flag_is(arg, "insecure", &v)) {
            if (v)
                return usage_error("%s takes no value", arg);
            if (arg[2] == 'p')
                o->plaintext = true;
            else
                o->insecure = true;
            continue;
        }
        const char *const *name = valued;
        for (; *name && !flag_is(arg, *name, &v); name++)
            ;
        if (*name) {
            if (!v) {
                if (i + 1 >= argc)
                    return usage_error("%s needs a value", arg);
                v = argv[++i];
            }
            const char **slot = strcmp(*name, "target") == 0  ? &o->target
                                : strcmp(*name, "ca") == 0    ? &o->ca
                                : strcmp(*name, "cert") == 0  ? &o->cert
                                : strcmp(*name, "key") == 0   ? &o->key
                                : strcmp(*name, "authority") == 0 ? &o->authority
                                                              : &timeout;
            *slot = v;
            continue;
        }
        if (arg[0] == '-' && arg[1] != '\0')
            return usage_error("unknown flag %s", arg);
        if (o->file)
            return usage_error("one request file only, not also '%s'", arg);
        o->file = arg;
    }
    if (!o->file)
        o->file = "-";
    if (!o->target || !*o->target)
        return usage_error("%s", "--target HOST:PORT is required");
    if (timeout) {
        char *end;
        errno = 0;
        long ms = strtol(timeout, &end, 10);
        if (errno || end == timeout || *end || ms <= 0 || ms > INT_MAX)
            return usage_error("--timeout_ms: '%s' is not a positive number of milliseconds",
                               timeout);
        o->timeout_ms = ms;
    }
    if (o->plaintext && (o->ca || o->insecure || o->cert || o->key))
        return usage_error("%s", "--plaintext is h2c: it takes no --ca, --insecure, --cert or --key");
    if (o->ca && o->insecure)
        return usage_error("%s", "--ca verifies the server, --insecure does not: pick one");
    if (!o->cert != !o->key)
        return usage_error("%s", "--cert and --key go together");
    return 0;
}

/* A PEM file as a NUL-terminated string (malloc'd), or NULL with a message on stderr. */
static char *read_pem(const char *flag, const char *path)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    long n = -1;
    if (f && fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && n <= SEND_MAX_PEM &&
        fseek(f, 0, SEEK_SET) == 0 && (buf = malloc((size_t)n + 1)) &&
        fread(buf, 1, (size_t)n, f) == (size_t)n) {
        buf[n] = '\0';
        fclose(f);
        if (strstr(buf, "-----BEGIN "))
            return buf;
        fprintf(stderr, "luacallout send: %s %s: not a PEM file\n", flag, path);
        free(buf);
        return NULL;
    }
    fprintf(stderr, "luacallout send: %s %s: %s\n", flag, path,
            n > SEND_MAX_PEM ? "too large for a PEM file" : strerror(errno ? errno : EIO));
    free(buf);
    if (f)
        fclose(f);
    return NULL;
}

/* The channel credentials the flags ask for, or NULL (message on stderr) when a file cannot
 * be read. grpc's TLS credentials rather than its SSL ones: only they can skip the
 * verification of the server's certificate (--insecure), in 1.51. */
static grpc_channel_credentials *make_creds(const struct send_opts *o)
{
    if (o->plaintext)
        return grpc_insecure_credentials_create();
    char *ca = NULL, *cert = NULL, *key = NULL;
    if ((o->ca && !(ca = read_pem("--ca", o->ca))) ||
        (o->cert && !(cert = read_pem("--cert", o->cert))) ||
        (o->key && !(key = read_pem("--key", o->key)))) {
        free(ca);
        free(cert);
        free(key);
        return NULL;
    }
    grpc_tls_credentials_options *opts = grpc_tls_credentials_options_create();
    if (ca || cert) {
        grpc_tls_identity_pairs *pairs = NULL;
        if (cert) {
            pairs = grpc_tls_identity_pairs_create();
            grpc_tls_identity_pairs_add_pair(pairs, key, cert);
        }
        /* copies ca, takes pairs; the options take their own reference to the provider */
        grpc_tls_certificate_provider *p = grpc_tls_certificate_provider_static_data_create(ca, pairs);
        grpc_tls_credentials_options_set_certificate_provider(opts, p);
        grpc_tls_certificate_provider_release(p);
        if (ca)
            grpc_tls_credentials_options_watch_root_certs(opts);
        if (cert)
            grpc_tls_credentials_options_watch_identity_key_cert_pairs(opts);
    }
    /* without a root provider the client trusts the system's roots (grpc's default) */
    if (o->insecure) {
        /* Both halves: the handshake's chain check, and the post-handshake name check of the
         * default verifier (and of each call's host). */
        grpc_tls_credentials_options_set_verify_server_cert(opts, 0);
        grpc_tls_certificate_verifier *v = grpc_tls_certificate_verifier_no_op_create();
        grpc_tls_credentials_options_set_certificate_verifier(opts, v);
        grpc_tls_certificate_verifier_release(v);
        grpc_tls_credentials_options_set_check_call_host(opts, 0);
    }
    grpc_channel_credentials *creds = grpc_tls_credentials_create(opts);
    free(ca);
    free(cert);
    free(key);
    return creds;
}

struct client {
    const struct send_opts *o;
    struct exchange *x;
    grpc_channel *channel;
    grpc_completion_queue *cq;
};

enum { TAG_SEND = 1, TAG_RECV, TAG_STATUS };
#define TAG(t) ((void *)(intptr_t)(t))

/* Writes message i of s (with the half-close after the last one; the initial metadata
 * before the first). Message count 0: the metadata and the half-close alone. */
static grpc_call_error start_send(grpc_call *call, const struct exchange_msgs *s, size_t i,
                                  grpc_byte_buffer **out)
{
    grpc_op ops[3];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    *out = NULL;
    if (i == 0)
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (i < s->count) {
        grpc_slice slice = grpc_slice_from_copied_buffer((const char *)s->data[i], s->lens[i]);
        *out = grpc_raw_byte_buffer_create(&slice, 1);
        grpc_slice_unref(slice);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = *out;
    }
    if (i + 1 >= s->count)
        ops[n++].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    return grpc_call_start_batch(call, ops, n, TAG(TAG_SEND), NULL);
}

/* Prints one received message as its JSON line; false when it is not a ProcessingResponse
 * (said on stderr). */
static bool print_response(struct client *c, grpc_byte_buffer *bb, size_t stream, size_t nth)
{
    grpc_byte_buffer_reader reader;
    grpc_slice flat = grpc_empty_slice();
    if (grpc_byte_buffer_reader_init(&reader, bb)) {
        flat = grpc_byte_buffer_reader_readall(&reader);
        grpc_byte_buffer_reader_destroy(&reader);
    }
    char err[512] = "unreadable message";
    size_t len = 0;
    char *line = exchange_response_line(c->x, GRPC_SLICE_START_PTR(flat), GRPC_SLICE_LENGTH(flat),
                                        &len, err, sizeof err);
    grpc_slice_unref(flat);
    if (!line) {
        fprintf(stderr, "luacallout send: stream %zu, answer %zu: %s\n", stream, nth, err);
        return false;
    }
    fwrite(line, 1, len, stdout);
    fputc('\n', stdout);
    fflush(stdout);   /* each answer as it arrives, also into a pipe */
    free(line);
    return true;
}

struct outcome {
    grpc_status_code code;
    char *message;           /* malloc'd */
    size_t answers;
    bool bad_answer;         /* a message that was not a ProcessingResponse */
};

/* Runs stream s as one Process call; fills r. Returns false when the call could not even
 * start (said on stderr). */
static bool run_stream(struct client *c, const struct exchange_msgs *s, size_t stream,
                       struct outcome *r)
{
    memset(r, 0, sizeof *r);
    gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                         gpr_time_from_millis(c->o->timeout_ms, GPR_TIMESPAN));
    grpc_slice method = grpc_slice_from_static_string(SEND_METHOD);
    grpc_call *call = grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, c->cq,
                                               method, NULL, deadline, NULL);
    if (!call) {
        fprintf(stderr, "luacallout send: cannot create a call on %s\n", c->o->target);
        return false;
    }
    grpc_metadata_array initial, trailing;
    grpc_metadata_array_init(&initial);
    grpc_metadata_array_init(&trailing);
    grpc_slice details = grpc_empty_slice();
    grpc_byte_buffer *sent = NULL, *received = NULL;

    grpc_op st;
    memset(&st, 0, sizeof st);
    st.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    st.data.recv_status_on_client.trailing_metadata = &trailing;
    st.data.recv_status_on_client.status = &r->code;
    st.data.recv_status_on_client.status_details = &details;
    bool status_pending = grpc_call_start_batch(call, &st, 1, TAG(TAG_STATUS), NULL) == GRPC_CALL_OK;

    grpc_op rv[2];
    memset(rv, 0, sizeof rv);
    rv[0].op = GRPC_OP_RECV_INITIAL_METADATA;
    rv[0].data.recv_initial_metadata.recv_initial_metadata = &initial;
    rv[1].op = GRPC_OP_RECV_MESSAGE;
    rv[1].data.recv_message.recv_message = &received;
    bool recv_pending = grpc_call_start_batch(call, rv, 2, TAG(TAG_RECV), NULL) == GRPC_CALL_OK;

    size_t next = 0;
    bool send_pending = start_send(call, s, next, &sent) == GRPC_CALL_OK;
    if (!status_pending || !recv_pending || !send_pending) {
        /* never happens with a fresh call and well-formed batches; do not wait for tags
         * that will not come */
        fprintf(stderr, "luacallout send: grpc refused to start the call\n");
        grpc_call_cancel(call, NULL);
    }

    /* Every batch ends by the call's deadline; the extra second only guards this loop. */
    gpr_timespec guard = gpr_time_add(deadline, gpr_time_from_seconds(5, GPR_TIMESPAN));
    while (status_pending || recv_pending || send_pending) {
        grpc_event ev = grpc_completion_queue_next(c->cq, guard, NULL);
        if (ev.type == GRPC_QUEUE_TIMEOUT) {
            grpc_call_cancel(call, NULL);
            guard = gpr_inf_future(GPR_CLOCK_MONOTONIC);
            continue;
        }
        if (ev.type != GRPC_OP_COMPLETE)
            break;
        switch ((intptr_t)ev.tag) {
        case TAG_SEND:
            send_pending = false;
            grpc_byte_buffer_destroy(sent);
            sent = NULL;
            /* a failed write means the stream is over: its status says why */
            if (ev.success && ++next < s->count)
                send_pending = start_send(call, s, next, &sent) == GRPC_CALL_OK;
            break;
        case TAG_RECV:
            recv_pending = false;
            if (ev.success && received) {
                r->answers++;
                if (!print_response(c, received, stream, r->answers))
                    r->bad_answer = true;
                grpc_byte_buffer_destroy(received);
                received = NULL;
                grpc_op op;
                memset(&op, 0, sizeof op);
                op.op = GRPC_OP_RECV_MESSAGE;
                op.data.recv_message.recv_message = &received;
                recv_pending = grpc_call_start_batch(call, &op, 1, TAG(TAG_RECV), NULL) ==
                               GRPC_CALL_OK;
            }
            break;
        case TAG_STATUS:
            status_pending = false;
            break;
        }
    }
    if (status_pending) {          /* the queue shut down under us: not expected */
        r->code = GRPC_STATUS_UNKNOWN;
        r->message = strdup("the completion queue stopped before the status arrived");
    } else {
        r->message = grpc_slice_to_c_string(details);
    }
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&initial);
    grpc_metadata_array_destroy(&trailing);
    grpc_byte_buffer_destroy(sent);
    grpc_byte_buffer_destroy(received);
    grpc_call_unref(call);
    return true;
}

/* A stream that failed without an answer while the channel is not connected never reached
 * the server: it could not connect (refused, unreachable, TLS handshake, deadline). */
static bool could_not_connect(struct client *c, const struct outcome *r)
{
    if (r->code == GRPC_STATUS_OK || r->answers > 0)
        return false;
    if (r->code != GRPC_STATUS_UNAVAILABLE && r->code != GRPC_STATUS_DEADLINE_EXCEEDED)
        return false;
    return grpc_channel_check_connectivity_state(c->channel, 0) != GRPC_CHANNEL_READY;
}

static int run_all(struct client *c, struct exchange_msgs *streams, size_t nstreams)
{
    int rc = 0;
    for (size_t i = 0; i < nstreams; i++) {
        struct outcome r;
        if (!run_stream(c, &streams[i], i + 1, &r))
            return 1;
        size_t len = 0;
        char *line = exchange_status_line(c->x, (int)r.code, r.message ? r.message : "",
                                          nstreams > 1 ? (int)i + 1 : 0, &len);
        if (line) {
            fwrite(line, 1, len, stdout);
            fputc('\n', stdout);
            fflush(stdout);
            free(line);
        } else {
            fprintf(stderr, "luacallout send: stream %zu: cannot write its status line\n", i + 1);
        }
        if (r.code != GRPC_STATUS_OK || r.bad_answer)
            rc = 1;
        bool unreachable = could_not_connect(c, &r);
        if (unreachable) {
            fprintf(stderr, "luacallout send: cannot connect to %s: %s\n", c->o->target,
                    r.code == GRPC_STATUS_DEADLINE_EXCEEDED
                        ? "no connection within --timeout_ms"
                        : (r.message && *r.message ? r.message : "unavailable"));
            if (i + 1 < nstreams)
                fprintf(stderr, "luacallout send: %zu more stream(s) not sent\n",
                        nstreams - i - 1);
        }
        free(r.message);
        if (unreachable)
            break;
    }
    return rc;
}

/* grpc's own log lines repeat, less clearly, what the status line and stderr already say
 * (a failed handshake is logged as an error too): dropped, unless GRPC_VERBOSITY asks. */
static void quiet_grpc_log(gpr_log_func_args *args)
{
    (void)args;
}

int send_main(int argc, char **argv)
{
    struct send_opts o;
    int rc = parse_args(argc, argv, &o);
    if (rc != 0)
        return rc < 0 ? 0 : rc;

    char err[1024];
    struct exchange *x = exchange_new(err, sizeof err);
    if (!x) {
        fprintf(stderr, "luacallout send: %s\n", err);
        return 2;
    }
    /* the whole file first: a typo on its last line fails before anything is sent */
    struct exchange_msgs *streams = NULL;
    size_t nstreams = 0;
    if (exchange_read_file(x, o.file, &streams, &nstreams, err, sizeof err) != 0) {
        fprintf(stderr, "luacallout send: %s\n", err);
        exchange_free(x);
        return 2;
    }

    if (!getenv("GRPC_VERBOSITY"))
        gpr_set_log_function(quiet_grpc_log);
    grpc_init();
    grpc_channel_credentials *creds = make_creds(&o);
    if (!creds) {
        rc = 2;
    } else {
        grpc_arg args[3];
        size_t nargs = 0;
        /* answers may carry whole bodies: no receive limit (the server sets its own) */
        args[nargs++] = (grpc_arg){.type = GRPC_ARG_INTEGER,
                                   .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
                                   .value.integer = -1};
        if (o.authority) {
            args[nargs++] = (grpc_arg){.type = GRPC_ARG_STRING, .key = GRPC_ARG_DEFAULT_AUTHORITY,
                                       .value.string = (char *)o.authority};
            if (!o.plaintext)
                args[nargs++] = (grpc_arg){.type = GRPC_ARG_STRING,
                                           .key = GRPC_SSL_TARGET_NAME_OVERRIDE_ARG,
                                           .value.string = (char *)o.authority};
        }
        grpc_channel_args chargs = {.num_args = nargs, .args = args};
        struct client c = {.o = &o, .x = x};
        c.channel = grpc_channel_create(o.target, creds, &chargs);
        grpc_channel_credentials_release(creds);
        c.cq = grpc_completion_queue_create_for_next(NULL);
        rc = run_all(&c, streams, nstreams);
        grpc_channel_destroy(c.channel);
        grpc_completion_queue_shutdown(c.cq);
        while (grpc_completion_queue_next(c.cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
               GRPC_QUEUE_SHUTDOWN)
            ;
        grpc_completion_queue_destroy(c.cq);
    }
    grpc_shutdown();
    exchange_msgs_free(streams, nstreams);
    exchange_free(x);
    return rc;
}
