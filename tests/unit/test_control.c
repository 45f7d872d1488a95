/* test_control.c — the supervisor's records: whole records arrive whole; a short wait that
 * ends in the middle of a record does not lose it or misalign the next one; end of file and
 * timeouts are told apart. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "control.h"

static int writer_fd;

static void sleep_ms(int ms)
{
    struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* A record written in three pieces with pauses longer than the reader's waits. */
static void *slow_writer(void *arg)
{
    (void)arg;
    uint32_t head[2] = {CONTROL_LOADED, 5};
    sleep_ms(250);   /* the reader's first waits end before the record begins */
    CHECK(write(writer_fd, head, 6) == 6);            /* part of the header */
    sleep_ms(150);
    CHECK(write(writer_fd, (char *)head + 6, 2) == 2);
    sleep_ms(150);
    CHECK(write(writer_fd, "7 ab", 4) == 4);          /* part of the body */
    sleep_ms(150);
    CHECK(write(writer_fd, "c", 1) == 1);
    CHECK(control_send(writer_fd, CONTROL_SERVING, "7 ", 2) == 0);   /* the next one */
    return NULL;
}

int main(void)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);

    /* a whole record, empty */
    CHECK(control_send(sv[0], CONTROL_READY, NULL, 0) == 0);
    uint32_t type;
    char *data;
    size_t len;
    CHECK(control_recv(sv[1], &type, &data, &len, 1000) == 1);
    CHECK(type == CONTROL_READY && len == 0 && data[0] == '\0');
    free(data);
    pthread_t t;
    writer_fd = sv[0];

    /* a short timeout with nothing sent: a timeout, not end of file */
    errno = 0;
    CHECK(control_recv(sv[1], &type, &data, &len, 30) == -1 && errno == ETIMEDOUT);

    /* a record trickling in slower than the reader's 100 ms waits */
    CHECK(pthread_create(&t, NULL, slow_writer, NULL) == 0);
    int timeouts = 0, got = 0;
    while (got == 0 && timeouts < 50) {
        int r = control_recv(sv[1], &type, &data, &len, 100);
        if (r == -1 && errno == ETIMEDOUT) {
            timeouts++;
            continue;
        }
        CHECK(r == 1);
        got = 1;
    }
    CHECK(got && type == CONTROL_LOADED && len == 5 && memcmp(data, "7 abc", 5) == 0);
    free(data);
    CHECK(control_recv(sv[1], &type, &data, &len, 1000) == 1);
    CHECK(type == CONTROL_SERVING && len == 2 && memcmp(data, "7 ", 2) == 0);
    free(data);
    pthread_join(t, NULL);
    CHECK(timeouts >= 1);   /* the wait did end before the record began */

    /* end of file: 0; end of file inside a record: an error */
    CHECK(control_send(sv[0], CONTROL_FAILED, "1 x", 3) == 0);
    CHECK(write(sv[0], "\x02\0\0\0\x09\0\0\0abc", 11) == 11);   /* says 9 bytes, sends 3 */
    close(sv[0]);
    CHECK(control_recv(sv[1], &type, &data, &len, 1000) == 1 && type == CONTROL_FAILED);
    free(data);
    CHECK(control_recv(sv[1], &type, &data, &len, 1000) == -1);
    CHECK(control_recv(sv[1], &type, &data, &len, 1000) == 0);
    close(sv[1]);

    /* a record too large to be ours is refused before any allocation */
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    CHECK(write(sv[0], "\x02\0\0\0\xff\xff\xff\xff", 8) == 8);
    CHECK(control_recv(sv[1], &type, &data, &len, 1000) == -1 && errno == EMSGSIZE);
    close(sv[0]);
    close(sv[1]);
    printf("%d passed, 0 failed\n", passed);
    return 0;
}
