/* control.c — see control.h. A record: u32 type, u32 length (host order: both ends are
 * the same binary on the same machine), then the bytes. */
#include "control.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Larger than any snapshot (64 MiB) with its names. */
#define CONTROL_MAX_RECORD ((size_t)80 << 20)

static int write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

int control_send(int fd, uint32_t type, const void *data, size_t len)
{
    if (len > CONTROL_MAX_RECORD) {
        errno = EMSGSIZE;
        return -1;
    }
    /* one write for a small record: the reader then finds it whole */
    char small[4096];
    uint32_t head[2] = {type, (uint32_t)len};
    if (len <= sizeof small - sizeof head) {
        memcpy(small, head, sizeof head);
        if (len)
            memcpy(small + sizeof head, data, len);
        return write_all(fd, small, sizeof head + len);
    }
    if (write_all(fd, head, sizeof head) != 0)
        return -1;
    return write_all(fd, data, len);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Once a record has begun, its rest may take this long: a timeout of the caller's (a short
 * slice) must never leave half a record read, or every later record would be misread. */
#define CONTROL_REST_MS 10000

/* 1 when all n bytes came, 0 at end of file before any, -1 on error or timeout. The
 * deadline applies until the first byte; then the rest gets CONTROL_REST_MS more. */
static int read_all(int fd, void *p, size_t n, int64_t deadline)
{
    char *c = p;
    size_t got = 0;
    while (got < n) {
        int wait = -1;
        if (got > 0 && deadline >= 0 && deadline < now_ms() + CONTROL_REST_MS)
            deadline = now_ms() + CONTROL_REST_MS;
        if (deadline >= 0) {
            int64_t left = deadline - now_ms();
            if (left <= 0) {
                errno = ETIMEDOUT;
                return -1;
            }
            wait = (int)left;
        }
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int r = poll(&pfd, 1, wait);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0)
            continue;
        ssize_t k = read(fd, c + got, n - got);
        if (k < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (k < 0)
            return -1;
        if (k == 0) {
            if (got == 0)
                return 0;
            errno = EPIPE;
            return -1;
        }
        got += (size_t)k;
    }
    return 1;
}

int control_recv(int fd, uint32_t *type, char **data, size_t *len, int timeout_ms)
{
    int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    uint32_t head[2];
    int r = read_all(fd, head, sizeof head, deadline);
    if (r <= 0)
        return r;
    if (head[1] > CONTROL_MAX_RECORD) {
        errno = EMSGSIZE;
        return -1;
    }
    char *buf = malloc((size_t)head[1] + 1);
    if (!buf)
        return -1;
    /* the header is in: the body is part of the same record */
    int64_t rest = now_ms() + CONTROL_REST_MS;
    if (head[1] && read_all(fd, buf, head[1], deadline > rest ? deadline : rest) != 1) {
        free(buf);
        return -1;
    }
    buf[head[1]] = '\0';
    *type = head[0];
    *data = buf;
    *len = head[1];
    return 1;
}
