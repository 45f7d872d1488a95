/* admin.c — the HTTP(S) health listener: probes, metrics, and 200 on any other path.
 *
 * What it answers, one request per connection, then close (Connection: close):
 *   GET|HEAD /live       200 "ok\n"; 503 "not live\n" while probes->live() returns false
 *   GET|HEAD /ready      200, empty body; 503 "not ready\n" while probes->ready() is false
 *   GET|HEAD /metrics    200, Prometheus text from metrics_render
 *   GET|HEAD other paths 200, empty body (as the Python callout SDK does)
 *   other methods 405; a malformed request line 400; request line + headers over 8 KiB 431.
 * A missing callback counts as true. A query string does not change the path ("/live?x=1"
 * is /live). HEAD gets the headers of the GET answer without its body. The answer is sent
 * as soon as the blank line after the headers arrives; a request body is never parsed.
 *
 * How: one thread and one epoll set holding the listening socket, an eventfd that
 * admin_stop signals, and every accepted connection. Every socket is non-blocking, TLS
 * included (tls.c answers want-read/want-write instead of waiting), so no client can hold
 * the thread. Each connection has one deadline, CONN_DEADLINE_MS after accept, that covers
 * the TLS handshake, reading the request and writing the answer. Past it the connection is
 * closed; one that had started a request first gets a best-effort 408 (a single
 * non-blocking write) and LINGER_MS more to read it.
 *
 * At most max_conns connections are open: MAX_CONNS, or a quarter of RLIMIT_NOFILE when
 * that is lower, so a flood here leaves descriptors to the gRPC ports. Accepting one more,
 * or an accept that fails for lack of descriptors, closes the oldest connection, so a probe
 * arriving during a flood of idle or slow clients is accepted and answered; with nothing to
 * close, accepting pauses for EMFILE_BACKOFF_MS instead of spinning.
 *
 * After the answer (and after a TLS close_notify) the write side is shut down and what the
 * client still sends is read and dropped until EOF, for at most LINGER_MS and never past
 * the deadline, so close() does not turn unread bytes into a reset that destroys the
 * answer. */
#include "admin.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "metrics.h"
#include "tls.h"

#define REQUEST_MAX 8192        /* request line + headers */
#define CONN_DEADLINE_MS 5000   /* whole connection: handshake, request, answer */
#define LINGER_MS 200           /* dropping what the client sends after our answer */
#define MAX_CONNS 1024          /* open connections; one more closes the oldest */
#define BACKLOG 1024            /* a full backlog drops SYNs: a probe would wait 1 s */
#define DRAIN_READS_PER_WAKE 16 /* reads of 4 KiB while draining, then other clients' turn */
#define ACCEPTS_PER_WAKE 64     /* then serve the open connections before accepting more */
#define EMFILE_BACKOFF_MS 100   /* no descriptor and nothing to close: stop accepting a bit */
#define METRICS_MAX (1 << 20)   /* the metrics text may grow up to this */
#define EVICT_LOG_MS 60000      /* at most one warning per minute about closed connections */

enum conn_state {
    CONN_HANDSHAKE, /* TLS only */
    CONN_READING,   /* until the blank line that ends the headers */
    CONN_WRITING,   /* out[out_off..out_len) still to send */
    CONN_DRAINING,  /* answered, write side shut: reading and dropping until EOF */
};

struct conn {
    struct conn *prev, *next; /* open connections, oldest first; next also links closed ones */
    int fd;                   /* -1 once closed: the struct lives until the end of the batch */
    enum conn_state state;
    uint32_t events;          /* what epoll watches for it now */
    long long deadline;       /* CLOCK_MONOTONIC ms */
    struct tls_conn *tls;     /* NULL on a plain listener */
    char *out;                /* the answer, malloc'ed */
    size_t out_len, out_off;
    size_t len;               /* bytes of the request in req */
    char peer[INET6_ADDRSTRLEN + 16];
    char req[REQUEST_MAX + 1];
};

struct admin {
    int lfd, wake, ep;
    pthread_t thread;
    struct tls_server *tls;
    struct admin_probes probes;
    char name[INET6_ADDRSTRLEN + 16]; /* bound address, for logs */

    /* The rest belongs to the listener thread. */
    struct conn *oldest, *newest;
    int nconns, max_conns;
    struct conn *closed;        /* closed during this round of events, freed after it */
    long long accept_resume;    /* 0, or when to watch the listening socket again */
    char *metrics;              /* scratch for metrics_render, grown as needed */
    size_t metrics_cap;
    unsigned long long evicted; /* connections closed to make room, since the last warning */
    long long evict_logged;
};

/* Markers in epoll_event.data.ptr for the two descriptors that are not connections. */
static char listen_mark, wake_mark;

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* "1.2.3.4:80" or "[::1]:80" for a socket address. */
static void format_addr(const struct sockaddr *sa, socklen_t len, char *out, size_t outlen)
{
    char host[INET6_ADDRSTRLEN], port[8];
    if (getnameinfo(sa, len, host, sizeof host, port, sizeof port,
                    NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
        snprintf(out, outlen, "?");
        return;
    }
    if (sa->sa_family == AF_INET6)
        snprintf(out, outlen, "[%s]:%s", host, port);
    else
        snprintf(out, outlen, "%s:%s", host, port);
}

/* Splits "host:port" or "[v6]:port" into host (NULL for an empty host: all interfaces)
 * and port, in buf. -1 when the shape is wrong; an unbracketed IPv6 address is rejected
 * because its last colon is ambiguous. */
static int split_address(const char *address, char *buf, size_t buflen, const char **host,
                         const char **port)
{
    size_t len = strlen(address);
    if (len == 0 || len >= buflen)
        return -1;
    memcpy(buf, address, len + 1);
    char *colon;
    if (buf[0] == '[') {
        char *close = strchr(buf, ']');
        if (close == NULL || close == buf + 1 || close[1] != ':')
            return -1;
        *close = '\0';
        *host = buf + 1;
        colon = close + 1;
    } else {
        colon = strrchr(buf, ':');
        if (colon == NULL || memchr(buf, ':', (size_t)(colon - buf)) != NULL)
            return -1;
        *colon = '\0';
        *host = colon == buf ? NULL : buf;
    }
    *port = colon + 1;
    const char *p = *port;
    if (*p == '\0' || strlen(p) > 5)
        return -1;
    for (; *p; p++)
        if (*p < '0' || *p > '9')
            return -1;
    if (atoi(*port) > 65535)
        return -1;
    return 0;
}

/* --- one connection -------------------------------------------------------------------- */

/* Closes the socket now and unlinks c; the struct itself is freed after the current round
 * of epoll events, which may still name it (fd == -1 tells them it is gone). */
static void conn_close(struct admin *a, struct conn *c)
{
    if (c->fd < 0)
        return;
    epoll_ctl(a->ep, EPOLL_CTL_DEL, c->fd, NULL);
    tls_conn_free(c->tls);
    c->tls = NULL;
    close(c->fd);
    c->fd = -1;
    free(c->out);
    c->out = NULL;
    if (c->prev)
        c->prev->next = c->next;
    else
        a->oldest = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        a->newest = c->prev;
    a->nconns--;
    c->prev = NULL;
    c->next = a->closed;
    a->closed = c;
}

static void free_closed(struct admin *a)
{
    while (a->closed) {
        struct conn *c = a->closed;
        a->closed = c->next;
        free(c);
    }
}

/* want: TLS_WANT_READ or TLS_WANT_WRITE. */
static void conn_watch(struct admin *a, struct conn *c, int want)
{
    uint32_t events = want == TLS_WANT_WRITE ? EPOLLOUT : EPOLLIN;
    if (events == c->events)
        return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(a->ep, EPOLL_CTL_MOD, c->fd, &ev) != 0) {
        log_debug("health check: %s: epoll_ctl: %s", c->peer, strerror(errno));
        conn_close(a, c);
        return;
    }
    c->events = events;
}

/* > 0 bytes, 0 at EOF, or TLS_WANT_READ, TLS_WANT_WRITE, TLS_ERROR: the same answers for
 * a plain socket as tls.c gives for a TLS one. */
static ssize_t conn_recv(struct conn *c, void *buf, size_t len)
{
    if (c->tls != NULL)
        return tls_conn_read(c->tls, buf, len);
    for (;;) {
        ssize_t n = recv(c->fd, buf, len, 0);
        if (n >= 0)
            return n;
        if (errno == EINTR)
            continue;
        return errno == EAGAIN || errno == EWOULDBLOCK ? TLS_WANT_READ : TLS_ERROR;
    }
}

static ssize_t conn_send(struct conn *c, const void *buf, size_t len)
{
    if (c->tls != NULL)
        return tls_conn_write(c->tls, buf, len);
    for (;;) {
        ssize_t n = send(c->fd, buf, len, MSG_NOSIGNAL);
        if (n >= 0)
            return n;
        if (errno == EINTR)
            continue;
        return errno == EAGAIN || errno == EWOULDBLOCK ? TLS_WANT_WRITE : TLS_ERROR;
    }
}

/* Where the headers end (after the blank line), or NULL. from: where the previous search
 * stopped, so a request sent a byte at a time is not rescanned from its start each time. */
static const char *find_end_of_headers(const char *buf, size_t from, size_t len)
{
    for (size_t i = from > 2 ? from - 2 : 0; i + 1 < len; i++) {
        if (buf[i] != '\n')
            continue;
        if (buf[i + 1] == '\n')
            return buf + i + 2;
        if (i + 2 < len && buf[i + 1] == '\r' && buf[i + 2] == '\n')
            return buf + i + 3;
    }
    return NULL;
}

/* The metrics text in a->metrics, grown until metrics_render no longer fills it. */
static size_t render_metrics(struct admin *a)
{
    for (;;) {
        if (a->metrics == NULL) {
            a->metrics_cap = 16384;
            a->metrics = malloc(a->metrics_cap);
            if (a->metrics == NULL)
                return 0;
        }
        size_t n = metrics_render(a->metrics, a->metrics_cap);
        if (n < a->metrics_cap || a->metrics_cap >= METRICS_MAX)
            return n;
        char *bigger = realloc(a->metrics, a->metrics_cap * 2);
        if (bigger == NULL)
            return n;
        a->metrics = bigger;
        a->metrics_cap *= 2;
    }
}

static bool probe(bool (*fn)(void *), void *ud) { return fn == NULL || fn(ud); }

/* Builds the answer to the request in c->req (complete, or full, or not a request) into
 * c->out. -1 when out of memory. */
static int make_answer(struct admin *a, struct conn *c, bool complete)
{
    c->req[c->len] = '\0';
    const char *status, *extra = "", *body = "";
    size_t blen = 0;
    char method[16] = "", target[128] = "";
    size_t mlen = strcspn(c->req, " \r\n");
    if (!complete) {
        status = "431 Request Header Fields Too Large";
    } else if (c->req[mlen] != ' ' || mlen == 0 || mlen >= sizeof method) {
        status = "400 Bad Request";
    } else {
        memcpy(method, c->req, mlen);
        size_t tlen = strcspn(c->req + mlen + 1, " \r\n");
        snprintf(target, sizeof target, "%.*s", (int)tlen, c->req + mlen + 1);
        size_t plen = strcspn(target, "?");
        status = "200 OK";
        if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
            status = "405 Method Not Allowed";
            extra = "Allow: GET, HEAD\r\n";
        } else if (plen == 5 && memcmp(target, "/live", 5) == 0) {
            bool ok = probe(a->probes.live, a->probes.ud);
            status = ok ? "200 OK" : "503 Service Unavailable";
            body = ok ? "ok\n" : "not live\n";
            blen = strlen(body);
            extra = "Content-Type: text/plain\r\n";
        } else if (plen == 6 && memcmp(target, "/ready", 6) == 0) {
            if (!probe(a->probes.ready, a->probes.ud)) {
                status = "503 Service Unavailable";
                body = "not ready\n";
                blen = strlen(body);
                extra = "Content-Type: text/plain\r\n";
            }
        } else if (plen == 8 && memcmp(target, "/metrics", 8) == 0) {
            blen = render_metrics(a);
            if (blen > 0)
                body = a->metrics;
            extra = "Content-Type: text/plain; version=0.0.4\r\n";
        }
    }

    char head[256];
    int hlen = snprintf(head, sizeof head,
                        "HTTP/1.1 %s\r\n%sContent-Length: %zu\r\nConnection: close\r\n\r\n",
                        status, extra, blen);
    size_t send_body = strcmp(method, "HEAD") == 0 ? 0 : blen;
    c->out = malloc((size_t)hlen + send_body);
    if (c->out == NULL)
        return -1;
    memcpy(c->out, head, (size_t)hlen);
    memcpy(c->out + hlen, body, send_body);
    c->out_len = (size_t)hlen + send_body;
    c->out_off = 0;
    log_debug("health check: %s %s %s -> %.3s", c->peer, method[0] ? method : "-",
              target[0] ? target : "-", status);
    return 0;
}

/* Drives c as far as it goes without waiting, then tells epoll what it waits for (or
 * closes it). Called when its socket is ready, and once at accept for TLS. */
static void conn_step(struct admin *a, struct conn *c)
{
    int drained = 0;
    for (;;) {
        switch (c->state) {
        case CONN_HANDSHAKE: {
            int r = tls_conn_handshake(c->tls);
            if (r == 1) {
                c->state = CONN_READING;
                continue;
            }
            if (r == TLS_ERROR) {
                conn_close(a, c);
                return;
            }
            conn_watch(a, c, r);
            return;
        }
        case CONN_READING: {
            size_t before = c->len;
            ssize_t n = conn_recv(c, c->req + c->len, REQUEST_MAX - c->len);
            if (n == TLS_WANT_READ || n == TLS_WANT_WRITE) {
                conn_watch(a, c, (int)n);
                return;
            }
            if (n <= 0) {
                log_debug("health check: %s: %s", c->peer,
                          n == 0 ? "closed before a full request" : "read failed");
                conn_close(a, c);
                return;
            }
            c->len += (size_t)n;
            bool complete = find_end_of_headers(c->req, before, c->len) != NULL;
            if (!complete && c->len < REQUEST_MAX)
                continue;
            if (make_answer(a, c, complete) != 0) {
                conn_close(a, c);
                return;
            }
            c->state = CONN_WRITING;
            continue;
        }
        case CONN_WRITING: {
            while (c->out_off < c->out_len) {
                ssize_t n = conn_send(c, c->out + c->out_off, c->out_len - c->out_off);
                if (n == TLS_WANT_READ || n == TLS_WANT_WRITE) {
                    conn_watch(a, c, (int)n);
                    return;
                }
                if (n <= 0) {
                    log_debug("health check: %s: write failed", c->peer);
                    conn_close(a, c);
                    return;
                }
                c->out_off += (size_t)n;
            }
            tls_conn_close_notify(c->tls);
            shutdown(c->fd, SHUT_WR);
            c->state = CONN_DRAINING;
            long long linger = now_ms() + LINGER_MS;
            if (linger < c->deadline)
                c->deadline = linger;
            continue;
        }
        case CONN_DRAINING: {
            /* Raw bytes: after our close_notify nothing the client sends matters. A few
             * reads per wake-up, so a client that keeps sending cannot hold the thread;
             * epoll (level-triggered) brings us back, the deadline ends it. */
            char sink[4096];
            ssize_t n = recv(c->fd, sink, sizeof sink, 0);
            if (n > 0 && ++drained < DRAIN_READS_PER_WAKE)
                continue;
            if (n > 0) {
                conn_watch(a, c, TLS_WANT_READ);
                return;
            }
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                conn_watch(a, c, TLS_WANT_READ);
                return;
            }
            conn_close(a, c);
            return;
        }
        }
    }
}

/* At the deadline: a client that started a request gets a best-effort 408 (one try, no
 * waiting) and LINGER_MS to read it; any other connection is closed. */
static void conn_expire(struct admin *a, struct conn *c)
{
    static const char timeout[] = "HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n"
                                  "Connection: close\r\n\r\n";
    log_debug("health check: %s: deadline passed, closing", c->peer);
    if (c->state != CONN_READING || c->len == 0 ||
        conn_send(c, timeout, sizeof timeout - 1) <= 0) {
        conn_close(a, c);
        return;
    }
    tls_conn_close_notify(c->tls);
    shutdown(c->fd, SHUT_WR);
    c->state = CONN_DRAINING;
    c->deadline = now_ms() + LINGER_MS;
    conn_watch(a, c, TLS_WANT_READ);
}

/* Closes connections past their deadline; returns how long epoll may sleep (ms, -1 for
 * ever). Connections are at most max_conns, so a scan per round costs microseconds. */
static int expire_and_next_timeout(struct admin *a)
{
    long long now = now_ms(), next = -1;
    for (struct conn *c = a->oldest, *n; c != NULL; c = n) {
        n = c->next;
        if (c->deadline <= now)
            conn_expire(a, c);
        else if (next < 0 || c->deadline < next)
            next = c->deadline;
    }
    if (a->accept_resume != 0) {
        if (a->accept_resume <= now) {
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &listen_mark};
            if (epoll_ctl(a->ep, EPOLL_CTL_ADD, a->lfd, &ev) == 0)
                a->accept_resume = 0;
            else
                a->accept_resume = now + EMFILE_BACKOFF_MS;
        }
        if (a->accept_resume != 0 && (next < 0 || a->accept_resume < next))
            next = a->accept_resume;
    }
    if (next < 0)
        return -1;
    return next - now > 60000 ? 60000 : (int)(next - now);
}

/* Closes the oldest connection to make room for a new one. Warns the first time, then at
 * most once per EVICT_LOG_MS with a count, so a flood does not flood the log. */
static void evict_oldest(struct admin *a, const char *why)
{
    if (a->oldest == NULL)
        return;
    a->evicted++;
    long long now = now_ms();
    if (a->evict_logged == 0 || now - a->evict_logged >= EVICT_LOG_MS) {
        log_warn("health check: %s: closed %llu oldest connection(s) to accept new ones "
                 "(%d open)", why, a->evicted, a->nconns);
        a->evicted = 0;
        a->evict_logged = now;
    }
    conn_close(a, a->oldest);
}

static void accept_some(struct admin *a)
{
    for (int i = 0; i < ACCEPTS_PER_WAKE; i++) {
        struct sockaddr_storage ss;
        socklen_t sslen = sizeof ss;
        int fd = accept4(a->lfd, (struct sockaddr *)&ss, &sslen, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                if (a->oldest != NULL) {
                    /* The probe waiting in the backlog matters more than our oldest client. */
                    evict_oldest(a, strerror(errno));
                    continue;
                }
                /* Nothing of ours to give back: stop watching the listening socket for a
                 * moment instead of spinning on a connection we cannot take. */
                log_warn("health check: accept failed: %s", strerror(errno));
                epoll_ctl(a->ep, EPOLL_CTL_DEL, a->lfd, NULL);
                a->accept_resume = now_ms() + EMFILE_BACKOFF_MS;
            }
            return; /* EAGAIN: the backlog is empty */
        }
        if (a->nconns >= a->max_conns)
            evict_oldest(a, "connection limit reached");
        struct conn *c = malloc(sizeof *c);
        if (c == NULL) {
            close(fd);
            continue;
        }
        c->prev = a->newest;
        c->next = NULL;
        c->fd = fd;
        c->state = a->tls ? CONN_HANDSHAKE : CONN_READING;
        c->events = EPOLLIN;
        c->deadline = now_ms() + CONN_DEADLINE_MS;
        c->tls = NULL;
        c->out = NULL;
        c->out_len = c->out_off = c->len = 0;
        format_addr((struct sockaddr *)&ss, sslen, c->peer, sizeof c->peer);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if ((a->tls && (c->tls = tls_conn_new(a->tls, fd)) == NULL) ||
            epoll_ctl(a->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
            tls_conn_free(c->tls);
            close(fd);
            free(c);
            continue;
        }
        if (a->newest)
            a->newest->next = c;
        else
            a->oldest = c;
        a->newest = c;
        a->nconns++;
        /* Nothing to do before the client speaks: the ClientHello or the request line
         * wakes us. */
    }
}

/* --- the listener thread --------------------------------------------------------------- */

static void *admin_thread(void *arg)
{
    struct admin *a = arg;
    struct epoll_event evs[64];
    for (;;) {
        int timeout = expire_and_next_timeout(a);
        free_closed(a);
        int n = epoll_wait(a->ep, evs, sizeof evs / sizeof evs[0], timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            log_error("health check: epoll_wait failed: %s", strerror(errno));
            break;
        }
        for (int i = 0; i < n; i++) {
            void *p = evs[i].data.ptr;
            if (p == &wake_mark)
                goto out;
            if (p == &listen_mark) {
                accept_some(a);
                continue;
            }
            struct conn *c = p;
            if (c->fd >= 0)
                conn_step(a, c); /* errors and hang-ups show up as failed I/O there */
        }
    }
out:
    while (a->oldest)
        conn_close(a, a->oldest);
    free_closed(a);
    return NULL;
}

static void admin_free(struct admin *a)
{
    if (a->lfd >= 0)
        close(a->lfd);
    if (a->wake >= 0)
        close(a->wake);
    if (a->ep >= 0)
        close(a->ep);
    tls_server_free(a->tls);
    free(a->metrics);
    free(a);
}

/* A quarter of the descriptors this process may open, at most MAX_CONNS: a flood on the
 * health port must not starve the gRPC ports of descriptors. */
static int conn_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY)
        return MAX_CONNS;
    rlim_t quarter = rl.rlim_cur / 4;
    if (quarter < 8)
        return 8;
    return quarter < MAX_CONNS ? (int)quarter : MAX_CONNS;
}

struct admin *admin_start(const char *address, const struct tls_identity *id,
                          const struct admin_probes *probes, char *err, size_t errlen)
{
    char buf[512];
    const char *host, *port;
    if (address == NULL || split_address(address, buf, sizeof buf, &host, &port) != 0) {
        snprintf(err, errlen, "invalid health check address '%s': expected host:port",
                 address ? address : "");
        return NULL;
    }

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    int gai = getaddrinfo(host, port, &hints, &res);
    if (gai != 0) {
        snprintf(err, errlen, "invalid health check address '%s': %s", address,
                 gai == EAI_SYSTEM ? strerror(errno) : gai_strerror(gai));
        return NULL;
    }

    struct admin *a = calloc(1, sizeof *a);
    if (a == NULL) {
        freeaddrinfo(res);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    a->lfd = a->wake = a->ep = -1;
    if (probes != NULL)
        a->probes = *probes;
    a->max_conns = conn_limit();

    /* The first address that binds wins (e.g. "localhost" may give ::1 and 127.0.0.1). */
    int saved = 0;
    for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                        ai->ai_protocol);
        if (fd < 0) {
            saved = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, BACKLOG) == 0) {
            a->lfd = fd;
            break;
        }
        saved = errno;
        close(fd);
    }
    freeaddrinfo(res);
    if (a->lfd < 0) {
        snprintf(err, errlen, "cannot listen on %s: %s", address, strerror(saved));
        admin_free(a);
        return NULL;
    }
    struct sockaddr_storage ss;
    socklen_t sslen = sizeof ss;
    if (getsockname(a->lfd, (struct sockaddr *)&ss, &sslen) == 0)
        format_addr((struct sockaddr *)&ss, sslen, a->name, sizeof a->name);
    else
        snprintf(a->name, sizeof a->name, "%s", address);

    if (id != NULL && (a->tls = tls_server_new(id, err, errlen)) == NULL) {
        admin_free(a);
        return NULL;
    }
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = &listen_mark};
    struct epoll_event wev = {.events = EPOLLIN, .data.ptr = &wake_mark};
    if ((a->wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0 ||
        (a->ep = epoll_create1(EPOLL_CLOEXEC)) < 0 ||
        epoll_ctl(a->ep, EPOLL_CTL_ADD, a->lfd, &lev) != 0 ||
        epoll_ctl(a->ep, EPOLL_CTL_ADD, a->wake, &wev) != 0) {
        snprintf(err, errlen, "cannot start the health check listener: %s", strerror(errno));
        admin_free(a);
        return NULL;
    }

    /* The thread starts with every signal blocked, so signals go to the threads that
     * expect them (main's handlers or sigwait). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&a->thread, NULL, admin_thread, a);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        snprintf(err, errlen, "cannot start the health check listener: %s", strerror(rc));
        admin_free(a);
        return NULL;
    }
    log_info("health check listening on %s (%s, up to %d connections)", a->name,
             a->tls ? "HTTPS" : "HTTP", a->max_conns);
    return a;
}

int admin_set_identity(struct admin *a, const struct tls_identity *id, char *err,
                       size_t errlen)
{
    return a && a->tls ? tls_server_set_identity(a->tls, id, err, errlen) : 0;
}

void admin_stop(struct admin *a)
{
    if (a == NULL)
        return;
    uint64_t one = 1;
    ssize_t w;
    do
        w = write(a->wake, &one, sizeof one);
    while (w < 0 && errno == EINTR);
    pthread_join(a->thread, NULL);
    admin_free(a);
}
