/* test_admin.c — the probe callbacks of the health listener, which main.c does not wire
 * yet (the watchdog will): /live and /ready answer 503 exactly while their callback says
 * false, each callback gets its ud, and other paths do not consult them. The listener runs
 * in this process on a loopback port; the client is a plain blocking socket. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "admin.h"

#include "check.h"

struct flags {
    atomic_bool live, ready;
    atomic_int live_calls, ready_calls;
};

static bool is_live(void *ud)
{
    struct flags *f = ud;
    atomic_fetch_add(&f->live_calls, 1);
    return atomic_load(&f->live);
}

static bool is_ready(void *ud)
{
    struct flags *f = ud;
    atomic_fetch_add(&f->ready_calls, 1);
    return atomic_load(&f->ready);
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    CHECK(fd >= 0 && bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0 &&
          getsockname(fd, (struct sockaddr *)&sa, &len) == 0);
    close(fd);
    return ntohs(sa.sin_port);
}

static struct admin *start(const struct admin_probes *probes, int *port)
{
    char addr[64], err[256];
    for (int attempt = 0; attempt < 5; attempt++) {
        *port = free_port();
        snprintf(addr, sizeof addr, "127.0.0.1:%d", *port);
        struct admin *a = admin_start(addr, NULL, probes, err, sizeof err);
        if (a != NULL)
            return a;
        fprintf(stderr, "admin_start %s: %s (retrying)\n", addr, err);
    }
    CHECK(!"admin_start never succeeded");
    return NULL;
}

/* Sends "METHOD path HTTP/1.1" and reads the whole answer (the server closes) into out. */
static void request(int port, const char *method, const char *path, char *out, size_t outlen)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct timeval tv = {.tv_sec = 2};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0);
    char req[256];
    int n = snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: x\r\n\r\n", method, path);
    CHECK(send(fd, req, (size_t)n, 0) == n);
    size_t used = 0;
    for (;;) {
        ssize_t r = recv(fd, out + used, outlen - 1 - used, 0);
        CHECK(r >= 0); /* a timeout here means the server did not close after answering */
        if (r == 0)
            break;
        used += (size_t)r;
    }
    out[used] = '\0';
    close(fd);
}

static bool starts(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

static const char *body_of(const char *resp)
{
    const char *b = strstr(resp, "\r\n\r\n");
    return b ? b + 4 : "";
}

int main(void)
{
    char r[8192];
    int port;

    /* NULL probes: both pass. */
    struct admin *a = start(NULL, &port);
    request(port, "GET", "/live", r, sizeof r);
    CHECK(starts(r, "HTTP/1.1 200 ") && strcmp(body_of(r), "ok\n") == 0);
    request(port, "GET", "/ready", r, sizeof r);
    CHECK(starts(r, "HTTP/1.1 200 ") && strcmp(body_of(r), "") == 0);
    admin_stop(a);

    struct flags f = {.live = true, .ready = true};
    struct admin_probes probes = {.live = is_live, .ready = is_ready, .ud = &f};
    a = start(&probes, &port);

    request(port, "GET", "/live", r, sizeof r);
    CHECK(starts(r, "HTTP/1.1 200 ") && strcmp(body_of(r), "ok\n") == 0);
    CHECK(atomic_load(&f.live_calls) == 1 && atomic_load(&f.ready_calls) == 0);
    request(port, "GET", "/ready", r, sizeof r);
    CHECK(starts(r, "HTTP/1.1 200 ") && strcmp(body_of(r), "") == 0);
    CHECK(atomic_load(&f.ready_calls) == 1);

    /* Not live: /live fails, /ready and every other path are unaffected. */
    atomic_store(&f.live, false);
    request(port, "GET", "/live", r, sizeof r);
    CHECK(starts(r, "HTTP/1.1 503 ") && strcmp(body_of(r), "not live\n") == 0);
    request(port, "GET", "/live?verbose=1", r, sizeof r);
    CHECK(starts(r, "HTTP/1.1 503 "));
    request(port, "HEAD", "/live", r, sizeof r);
    CHECK(starts(r, "HTTP/1.1 503 ") && strstr(r, "Content-Length: 9\r\n") &&
          strcmp(body_of(r), "") == 0);
    request(port, "GET", "/ready", r, sizeof r);
    CHECK(starts(r, "HTTP/1.1 200 "));
    request(port, "GET", "/", r, sizeof r);
    CHECK(starts(r, "HTTP/1.1 200 ") && strcmp(body_of(r), "") == 0);
    request(port, "GET", "/lively", r, sizeof r);
    CHECK(starts(r, "HTTP/1.1 200 ") && strcmp(body_of(r), "") == 0);

    /* Not ready (draining): /ready fails; back to ready, it passes again. */
    atomic_store(&f.live, true);
    atomic_store(&f.ready, false);
    request(port, "GET", "/ready", r, sizeof r);
    CHECK(starts(r, "HTTP/1.1 503 ") && strcmp(body_of(r), "not ready\n") == 0);
    request(port, "GET", "/live", r, sizeof r);
    CHECK(starts(r, "HTTP/1.1 200 "));
    atomic_store(&f.ready, true);
    request(port, "GET", "/ready", r, sizeof r);
    CHECK(starts(r, "HTTP/1.1 200 "));

    /* Methods other than GET and HEAD never reach a callback. */
    int before = atomic_load(&f.live_calls);
    request(port, "POST", "/live", r, sizeof r);
    CHECK(starts(r, "HTTP/1.1 405 ") && atomic_load(&f.live_calls) == before);

    admin_stop(a);
    printf("%d passed\n", passed);
    return 0;
}
