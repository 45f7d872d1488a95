/* watch.c — inotify on the script's folder, debounced, with a content fingerprint so that
 * unrelated events (an editor's swap file, a touched README) cause no reload. */
#include "watch.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"

struct watch {
    char *path;                 /* the script path as given */
    char dir[PATH_MAX];         /* the folder it was given in (symlinks not followed) */
    int ifd;
    int wake[2];
    int settle_ms;
    void (*on_change)(void *);
    void *arg;
    uint64_t fingerprint;
    pthread_t thread;
    int running;
};

static uint64_t mix(uint64_t h, const void *data, size_t len)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < len; i++)
        h = (h ^ p[i]) * 1099511628211u;   /* FNV-1a */
    return h;
}

static uint64_t mix_file(uint64_t h, const char *path)
{
    struct stat st;
    char real[PATH_MAX];
    if (stat(path, &st) != 0 || !realpath(path, real))
        return mix(h, "missing", 7);
    h = mix(h, real, strlen(real));
    h = mix(h, &st.st_ino, sizeof st.st_ino);
    h = mix(h, &st.st_size, sizeof st.st_size);
    return mix(h, &st.st_mtim, sizeof st.st_mtim);
}

/* What a reload would read: the script and every *.lua in its folder, each followed
 * through symlinks. Order of readdir does not matter: entries are combined by sum. */
static uint64_t fingerprint(const struct watch *w)
{
    uint64_t h = mix_file(14695981039346656037u, w->path);
    DIR *d = opendir(w->dir);
    if (!d)
        return h;
    uint64_t sum = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        if (n < 5 || strcmp(e->d_name + n - 4, ".lua") != 0)
            continue;
        char p[PATH_MAX];
        if (snprintf(p, sizeof p, "%s/%s", w->dir, e->d_name) >= (int)sizeof p)
            continue;
        sum += mix_file(mix(14695981039346656037u, e->d_name, n), p);
    }
    closedir(d);
    return h ^ sum;
}

/* Reads and discards pending inotify events; 1 if there were any. */
static int drain(int fd)
{
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    int any = 0;
    while (read(fd, buf, sizeof buf) > 0)
        any = 1;
    return any;
}

static void *watch_main(void *arg)
{
    struct watch *w = arg;
    struct pollfd pfd[2] = {{.fd = w->ifd, .events = POLLIN}, {.fd = w->wake[0], .events = POLLIN}};
    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (pfd[1].revents)
            break;
        drain(w->ifd);
        /* Let the burst settle: a ConfigMap swap or an editor's save is several events. */
        for (;;) {
            int r = poll(pfd, 2, w->settle_ms);
            if (r > 0 && pfd[1].revents)
                return NULL;
            if (r > 0 && drain(w->ifd))
                continue;
            break;
        }
        uint64_t now = fingerprint(w);
        if (now == w->fingerprint) {
            log_debug("watch: %s: events, but nothing a reload reads changed", w->dir);
            continue;
        }
        w->fingerprint = now;
        log_info("watch: %s changed: reloading", w->path);
        w->on_change(w->arg);
    }
    return NULL;
}

struct watch *watch_start(const char *script_path, int settle_ms, void (*on_change)(void *arg),
                          void *arg, char *err, size_t errlen)
{
    struct watch *w = calloc(1, sizeof *w);
    if (!w || !(w->path = strdup(script_path))) {
        free(w);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    const char *slash = strrchr(script_path, '/');
    if (!slash)
        snprintf(w->dir, sizeof w->dir, ".");
    else if (slash == script_path)
        snprintf(w->dir, sizeof w->dir, "/");
    else
        snprintf(w->dir, sizeof w->dir, "%.*s", (int)(slash - script_path), script_path);
    w->settle_ms = settle_ms;
    w->on_change = on_change;
    w->arg = arg;
    w->wake[0] = w->wake[1] = -1;
    w->ifd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (w->ifd < 0 ||
        inotify_add_watch(w->ifd, w->dir,
                          IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE |
                              IN_ATTRIB | IN_MODIFY) < 0 ||
        pipe(w->wake) != 0) {
        snprintf(err, errlen, "cannot watch %s: %s", w->dir, strerror(errno));
        watch_stop(w);
        return NULL;
    }
    w->fingerprint = fingerprint(w);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&w->thread, NULL, watch_main, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        snprintf(err, errlen, "cannot start the watch thread: %s", strerror(rc));
        watch_stop(w);
        return NULL;
    }
    w->running = 1;
    log_info("watching %s for changes", w->dir);
    return w;
}

void watch_stop(struct watch *w)
{
    if (!w)
        return;
    if (w->running) {
        char b = 1;
        if (write(w->wake[1], &b, 1) == 1)
            pthread_join(w->thread, NULL);
    }
    if (w->wake[1] >= 0)
        close(w->wake[1]);
    if (w->wake[0] >= 0)
        close(w->wake[0]);
    if (w->ifd >= 0)
        close(w->ifd);
    free(w->path);
    free(w);
}
