/* watch.c — inotify on the folders of the files a reload reads, debounced, with a content
 * fingerprint so that unrelated events (an editor's swap file, a touched README) cause no
 * reload. */
#include "watch.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"

struct watch {
    char **paths;               /* the files a reload reads, as given */
    int npaths;
    int lua_siblings;           /* the script's watch: every *.lua beside paths[0] too */
    char dir[PATH_MAX];         /* the folder of paths[0] (symlinks not followed) */
    char what[64];              /* for the log */
    int ifd;
    int wake[2];
    int settle_ms;
    watch_fn *on_change;
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

/* What a reload would read: the files, each followed through symlinks, and for the
 * script every *.lua in its folder. Order of readdir does not matter: entries are combined
 * by sum. */
static uint64_t fingerprint(const struct watch *w)
{
    uint64_t h = 14695981039346656037u;
    for (int i = 0; i < w->npaths; i++)
        h = mix_file(h, w->paths[i]);
    DIR *d = w->lua_siblings ? opendir(w->dir) : NULL;
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

/* The folder of path, as given (symlinks not followed). */
static void folder_of(const char *path, char *dir, size_t len)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        snprintf(dir, len, ".");
    else if (slash == path)
        snprintf(dir, len, "/");
    else
        snprintf(dir, len, "%.*s", (int)(slash - path), path);
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
            log_debug("watch: %s: events, but nothing a reload reads changed", w->what);
            continue;
        }
        w->fingerprint = now;
        w->on_change(w->arg, w->what);   /* it says what it does about it */
    }
    return NULL;
}

static struct watch *start(const char *const *paths, int npaths, int lua_siblings,
                           const char *what, int settle_ms, watch_fn *on_change,
                           void *arg, char *err, size_t errlen)
{
    struct watch *w = calloc(1, sizeof *w);
    if (!w) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    w->ifd = w->wake[0] = w->wake[1] = -1;
    w->paths = calloc((size_t)npaths, sizeof *w->paths);
    for (int i = 0; w->paths && i < npaths; i++)
        if ((w->paths[w->npaths] = strdup(paths[i])) != NULL)
            w->npaths++;
    if (w->npaths < npaths) {
        watch_stop(w);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    folder_of(paths[0], w->dir, sizeof w->dir);
    snprintf(w->what, sizeof w->what, "%s", what);
    w->lua_siblings = lua_siblings;
    w->settle_ms = settle_ms;
    w->on_change = on_change;
    w->arg = arg;
    w->ifd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", w->dir);
    bool ok = w->ifd >= 0 && pipe(w->wake) == 0;
    /* each file's folder: a file replaced by a rename, or a Kubernetes volume's `..data`
     * link swapped, shows up there and not on the file */
    for (int i = 0; ok && i < npaths; i++) {
        folder_of(paths[i], dir, sizeof dir);
        ok = inotify_add_watch(w->ifd, dir, IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM |
                                                IN_CREATE | IN_DELETE | IN_ATTRIB |
                                                IN_MODIFY) >= 0;
    }
    if (!ok) {
        snprintf(err, errlen, "cannot watch %s: %s", dir, strerror(errno));
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
    for (int i = 0; i < npaths; i++) {
        folder_of(paths[i], dir, sizeof dir);
        if (i == 0 || strcmp(dir, w->dir) != 0)
            log_info("watching %s for changes (%s)", dir, what);
    }
    return w;
}

struct watch *watch_start(const char *script_path, int settle_ms, watch_fn *on_change,
                          void *arg, char *err, size_t errlen)
{
    return start(&script_path, 1, 1, script_path, settle_ms, on_change, arg, err, errlen);
}

struct watch *watch_files_start(const char *const *paths, int npaths, const char *what,
                                int settle_ms, watch_fn *on_change, void *arg,
                                char *err, size_t errlen)
{
    return start(paths, npaths, 0, what, settle_ms, on_change, arg, err, errlen);
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
    for (int i = 0; i < w->npaths; i++)
        free(w->paths[i]);
    free(w->paths);
    free(w);
}
