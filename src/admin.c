/* admin.c — the HTTP(S) health listener, in the manner of the Python callout SDK: GET (or
 * HEAD) on any path answers 200 with an empty body, anything else 405.
 *
 * One thread accepts with poll() on the listening socket and a wake-up pipe, and serves
 * each connection inline: one request, one answer, close. Health probes are tiny and rare,
 * so the only concern is that a stuck client cannot hold the thread: every connection has
 * short socket timeouts and an overall deadline. */
#include "admin.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "metrics.h"
#include "tls.h"

#define REQUEST_MAX 8192        /* request line + headers */
#define IO_TIMEOUT_MS 2000      /* per read/write (SO_RCVTIMEO, SO_SNDTIMEO) */
#define CONN_DEADLINE_MS 5000   /* whole connection, handshake included */
#define LINGER_MS 200           /* draining an unread request body before close */
/* Connections served at once, each on its own short-lived thread, so an idle or slow
 * client (a TCP-only probe, a port scan) never delays the next health check. */
#define MAX_CONNS 32

struct admin {
    int lfd;
    int wake[2]; /* admin_stop writes to wake[1] */
    pthread_t thread;
    struct tls_server *tls;
    char name[INET6_ADDRSTRLEN + 16]; /* bound address, for logs */

    pthread_mutex_t lock;
    pthread_cond_t idle;          /* signalled when a connection thread ends */
    int conn_fds[MAX_CONNS];      /* -1 = free slot */
    int nconns;
};

struct conn_job {
    struct admin *admin;
    int slot;
    int fd;
    char peer[INET6_ADDRSTRLEN + 16];
};

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void set_timeouts(int fd, int ms)
{
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
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

struct conn {
    int fd;
    struct tls_conn *tls;
    long long deadline;
};

static ssize_t conn_read(struct conn *c, char *buf, size_t len)
{
    if (c->tls != NULL)
        return tls_conn_read(c->tls, buf, len);
    for (;;) {
        ssize_t n = recv(c->fd, buf, len, 0);
        if (n < 0 && errno == EINTR && now_ms() < c->deadline)
            continue;
        return n;
    }
}

static int conn_write_all(struct conn *c, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n;
        if (c->tls != NULL) {
            n = tls_conn_write(c->tls, buf, len);
        } else {
            n = send(c->fd, buf, len, MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR && now_ms() < c->deadline)
                continue;
        }
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* After answering a request that may have had a body: read and discard what the client
 * still sends for a moment, so close() does not turn the unread data into a reset that
 * could destroy our answer before the client reads it. Plain sockets only. */
static void linger_close(int fd)
{
    shutdown(fd, SHUT_WR);
    set_timeouts(fd, LINGER_MS);
    char sink[4096];
    long long end = now_ms() + LINGER_MS;
    for (int i = 0; i < 16 && now_ms() < end; i++) {
        ssize_t n = recv(fd, sink, sizeof sink, 0);
        if (n <= 0)
            break;
    }
}

static const char *find_end_of_headers(const char *buf, size_t len)
{
    for (size_t i = 0; i + 1 < len; i++) {
        if (buf[i] != '\n')
            continue;
        if (buf[i + 1] == '\n')
            return buf + i + 2;
        if (i + 2 < len && buf[i + 1] == '\r' && buf[i + 2] == '\n')
            return buf + i + 3;
    }
    return NULL;
}

static void serve(struct admin *a, int fd, const char *peer)
{
    struct conn c = {.fd = fd, .tls = NULL, .deadline = now_ms() + CONN_DEADLINE_MS};
    set_timeouts(fd, IO_TIMEOUT_MS);
    if (a->tls != NULL) {
        c.tls = tls_conn_accept(a->tls, fd);
        if (c.tls == NULL)
            return; /* tls.c logged the reason at debug level */
    }

    char req[REQUEST_MAX + 1];
    size_t len = 0;
    const char *end = NULL;
    while (end == NULL) {
        if (len == REQUEST_MAX || now_ms() >= c.deadline)
            break;
        ssize_t n = conn_read(&c, req + len, REQUEST_MAX - len);
        if (n <= 0) {
            log_debug("health check: %s: %s", peer,
                      n == 0 ? "closed before a full request"
                             : (errno == EAGAIN || errno == EWOULDBLOCK) ? "read timed out"
                                                                         : "read failed");
            goto done;
        }
        len += (size_t)n;
        end = find_end_of_headers(req, len);
    }
    req[len] = '\0';

    /* The request line: METHOD SP target SP version. */
    const char *status, *extra = "";
    char method[16] = "", target[128] = "";
    size_t mlen = strcspn(req, " \r\n");
    if (end == NULL) {
        status = len == REQUEST_MAX ? "431 Request Header Fields Too Large" : "408 Request Timeout";
    } else if (req[mlen] != ' ' || mlen == 0 || mlen >= sizeof method) {
        status = "400 Bad Request";
    } else {
        memcpy(method, req, mlen);
        size_t tlen = strcspn(req + mlen + 1, " \r\n");
        snprintf(target, sizeof target, "%.*s", (int)tlen, req + mlen + 1);
        if (strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0) {
            status = "200 OK";
        } else {
            status = "405 Method Not Allowed";
            extra = "Allow: GET, HEAD\r\n";
        }
    }

    /* GET /metrics is the one path with a body: the counters, for Prometheus. */
    char body[4096];
    size_t blen = 0;
    if (status[0] == '2' && strcmp(target, "/metrics") == 0) {
        blen = metrics_render(body, sizeof body);
        extra = "Content-Type: text/plain; version=0.0.4\r\n";
    }
    char resp[256];
    int rlen = snprintf(resp, sizeof resp,
                        "HTTP/1.1 %s\r\n%sContent-Length: %zu\r\nConnection: close\r\n\r\n",
                        status, extra, blen);
    int werr = conn_write_all(&c, resp, (size_t)rlen);
    if (!werr && blen && strcmp(method, "GET") == 0)
        werr = conn_write_all(&c, body, blen);
    log_debug("health check: %s %s %s -> %.3s%s", peer, method[0] ? method : "-",
              target[0] ? target : "-", status, werr ? " (write failed)" : "");
    if (c.tls == NULL && status[0] != '2' && !werr)
        linger_close(fd);
done:
    tls_conn_free(c.tls);
}

/* --- the listener thread --------------------------------------------------------------- */

static void *conn_thread(void *arg)
{
    struct conn_job *job = arg;
    struct admin *a = job->admin;
    serve(a, job->fd, job->peer);
    pthread_mutex_lock(&a->lock);
    a->conn_fds[job->slot] = -1;
    a->nconns--;
    close(job->fd);
    pthread_cond_signal(&a->idle);
    pthread_mutex_unlock(&a->lock);
    free(job);
    return NULL;
}

/* Hands an accepted connection to a thread of its own; closes it when MAX_CONNS are
 * already being served. */
static void dispatch(struct admin *a, int fd, const char *peer)
{
    struct conn_job *job = malloc(sizeof *job);
    pthread_mutex_lock(&a->lock);
    int slot = -1;
    for (int i = 0; job && i < MAX_CONNS; i++) {
        if (a->conn_fds[i] < 0) {
            slot = i;
            break;
        }
    }
    if (slot < 0) {
        pthread_mutex_unlock(&a->lock);
        log_warn("health check: %s: %d connections already open, closing this one", peer,
                 MAX_CONNS);
        close(fd);
        free(job);
        return;
    }
    *job = (struct conn_job){.admin = a, .slot = slot, .fd = fd};
    snprintf(job->peer, sizeof job->peer, "%s", peer);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    if (pthread_create(&t, &attr, conn_thread, job) != 0) {
        pthread_mutex_unlock(&a->lock);
        log_warn("health check: cannot start a connection thread: %s", strerror(errno));
        close(fd);
        free(job);
    } else {
        a->conn_fds[slot] = fd;
        a->nconns++;
        pthread_mutex_unlock(&a->lock);
    }
    pthread_attr_destroy(&attr);
}

static void *admin_thread(void *arg)
{
    struct admin *a = arg;
    struct pollfd pfd[2] = {{.fd = a->lfd, .events = POLLIN}, {.fd = a->wake[0], .events = POLLIN}};
    for (;;) {
        int r = poll(pfd, 2, -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            log_error("health check: poll failed: %s", strerror(errno));
            break;
        }
        if (pfd[1].revents != 0)
            break;
        if (!(pfd[0].revents & POLLIN))
            continue;
        struct sockaddr_storage ss;
        socklen_t sslen = sizeof ss;
        /* The listening socket is non-blocking (a connection reset between poll and accept
         * must not block the thread); the accepted one is blocking with timeouts. */
        int fd = accept4(a->lfd, (struct sockaddr *)&ss, &sslen, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                log_warn("health check: accept failed: %s", strerror(errno));
                /* Back off instead of spinning on a connection we cannot take; still
                 * wake for admin_stop. */
                if (poll(&pfd[1], 1, 100) > 0)
                    break;
            }
            continue;
        }
        char peer[INET6_ADDRSTRLEN + 16];
        format_addr((struct sockaddr *)&ss, sslen, peer, sizeof peer);
        dispatch(a, fd, peer);
    }
    return NULL;
}

static void admin_free(struct admin *a)
{
    if (a->lfd >= 0)
        close(a->lfd);
    if (a->wake[0] >= 0)
        close(a->wake[0]);
    if (a->wake[1] >= 0)
        close(a->wake[1]);
    tls_server_free(a->tls);
    pthread_cond_destroy(&a->idle);
    pthread_mutex_destroy(&a->lock);
    free(a);
}

struct admin *admin_start(const char *address, const struct tls_identity *id, char *err,
                          size_t errlen)
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
    a->lfd = a->wake[0] = a->wake[1] = -1;
    pthread_mutex_init(&a->lock, NULL);
    pthread_cond_init(&a->idle, NULL);
    for (int i = 0; i < MAX_CONNS; i++)
        a->conn_fds[i] = -1;

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
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 64) == 0) {
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
    if (pipe2(a->wake, O_CLOEXEC) != 0) {
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
    log_info("health check listening on %s (%s)", a->name, a->tls ? "HTTPS" : "HTTP");
    return a;
}

void admin_stop(struct admin *a)
{
    if (a == NULL)
        return;
    char b = 1;
    ssize_t w;
    do
        w = write(a->wake[1], &b, 1);
    while (w < 0 && errno == EINTR);
    pthread_join(a->thread, NULL);
    /* Wake connection threads blocked in a read, then wait for all of them. */
    pthread_mutex_lock(&a->lock);
    for (int i = 0; i < MAX_CONNS; i++)
        if (a->conn_fds[i] >= 0)
            shutdown(a->conn_fds[i], SHUT_RDWR);
    while (a->nconns > 0)
        pthread_cond_wait(&a->idle, &a->lock);
    pthread_mutex_unlock(&a->lock);
    admin_free(a);
}
