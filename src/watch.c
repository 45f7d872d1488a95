/* watch.c — inotify on the folders of the files a load read, debounced, compared by content
 * with what that load read, so that unrelated events (an editor's swap file, a touched
 * README, a .lua file no load reads, a bare touch) cause no reload. */
#include "watch.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
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
#include <time.h>
#include <unistd.h>

#include "log.h"

/* After a failed load: how deep under the script's folder, and how many .lua files and
 * folders, are watched for the fix. Bounded so a script in / or $HOME stays cheap. */
#define TREE_DEPTH 4
#define TREE_MAX_FILES 1024
#define MAX_DIRS 256
/* Changed files the log names; more are counted. */
#define NAMES_SHOWN 4
/* However long events on watched names keep coming, the check runs this long after the
 * first one (a file rewritten every few ms must not hold a reload back for ever). */
#define SETTLE_MAX_MS 1000
/* Symlinks followed through one another before giving up (a loop of links). */
#define MAX_LINK_DEPTH 8

#define WATCH_EVENTS (IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE | \
                      IN_ATTRIB | IN_MODIFY | IN_DELETE_SELF)

/* A watched file and what its content was when last looked at. */
struct entry {
    char *path;      /* as opened by the load */
    char *rel;       /* relative to the script's folder when under it, for the log */
    uint64_t hash;   /* of its bytes and their count */
    bool present;    /* a regular file that could be read */
};

struct list {
    struct entry *v;
    int n, cap;
};

struct dirs {
    char *v[MAX_DIRS];
    int n;
};

/* The names an event must carry to be worth a check: every component of a watched file's
 * path, as given and where its symlinks lead. */
struct names {
    char **v;
    int n, cap;
};

struct watch {
    pthread_mutex_t lock;    /* files, tree, failed: set_files against the watch thread */
    struct list files;       /* what the last load read */
    struct list tree;        /* after a failed load: every *.lua under dir, as last seen */
    bool failed;
    bool name_files;         /* the script's watch: on_change gets the changed files' names */
    char dir[PATH_MAX];      /* the script's folder (of paths[0]), as given */
    char what[64];           /* for the log */
    int ifd;
    int wake[2];             /* 'q': stop; 'r': the set changed, arm its folders */
    struct names names;      /* of the armed set (under lock) */
    int *wds;                /* the inotify watches armed now (watch thread only) */
    int nwds;
    int settle_ms;
    watch_fn *on_change;
    void *arg;
    pthread_t thread;
    int running;
};

/* ---- content ------------------------------------------------------------------------------ */

#define FNV_OFFSET 14695981039346656037u

static uint64_t fnv(uint64_t h, const void *data, size_t len)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < len; i++)
        h = (h ^ p[i]) * 1099511628211u;   /* FNV-1a */
    return h;
}

/* The same value for the same bytes, whether they come from a load's snapshot or disk. */
static uint64_t hash_bytes(const char *data, size_t len)
{
    return fnv(fnv(FNV_OFFSET, data, len), &len, sizeof len);
}

/* The hash of a regular file's bytes (through symlinks); false when it is missing, is not
 * a regular file (a FIFO would block) or cannot be read. */
static bool hash_file(const char *path, uint64_t *out)
{
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return false;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return false;
    }
    char buf[65536];
    uint64_t h = FNV_OFFSET;
    size_t len = 0;
    ssize_t got;
    while ((got = read(fd, buf, sizeof buf)) > 0) {
        h = fnv(h, buf, (size_t)got);
        len += (size_t)got;
    }
    close(fd);
    if (got < 0)
        return false;
    *out = fnv(h, &len, sizeof len);
    return true;
}

/* ---- lists -------------------------------------------------------------------------------- */

static bool list_add(struct list *l, const char *path, const char *rel, uint64_t hash,
                     bool present)
{
    if (l->n == l->cap) {
        int cap = l->cap ? l->cap * 2 : 8;
        struct entry *v = realloc(l->v, (size_t)cap * sizeof *v);
        if (!v)
            return false;
        l->v = v;
        l->cap = cap;
    }
    struct entry *e = &l->v[l->n];
    e->path = strdup(path);
    e->rel = strdup(rel);
    if (!e->path || !e->rel) {
        free(e->path);
        free(e->rel);
        return false;
    }
    e->hash = hash;
    e->present = present;
    l->n++;
    return true;
}

static struct entry *list_find(const struct list *l, const char *rel)
{
    for (int i = 0; i < l->n; i++)
        if (strcmp(l->v[i].rel, rel) == 0)
            return &l->v[i];
    return NULL;
}

static void list_free(struct list *l)
{
    for (int i = 0; i < l->n; i++) {
        free(l->v[i].path);
        free(l->v[i].rel);
    }
    free(l->v);
    *l = (struct list){0};
}

/* ---- paths -------------------------------------------------------------------------------- */

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

/* path relative to the script's folder when it is under it (as given), else path. */
static const char *rel_of(const struct watch *w, const char *path)
{
    size_t n = strlen(w->dir);
    if (strcmp(w->dir, ".") == 0)
        return strncmp(path, "./", 2) == 0 ? path + 2 : path;
    if (strcmp(w->dir, "/") == 0)
        return path[0] == '/' ? path + 1 : path;
    if (strncmp(path, w->dir, n) == 0 && path[n] == '/')
        return path + n + 1;
    return path;
}

static void dirs_add(struct dirs *d, const char *dir)
{
    for (int i = 0; i < d->n; i++)
        if (strcmp(d->v[i], dir) == 0)
            return;
    if (d->n < MAX_DIRS && (d->v[d->n] = strdup(dir)) != NULL)
        d->n++;
}

static void dirs_free(struct dirs *d)
{
    for (int i = 0; i < d->n; i++)
        free(d->v[i]);
    d->n = 0;
}

static bool names_has(const struct names *s, const char *name)
{
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->v[i], name) == 0)
            return true;
    return false;
}

static void names_add(struct names *s, const char *name, size_t len)
{
    char buf[NAME_MAX + 1];
    if (len == 0 || len > NAME_MAX)
        return;
    memcpy(buf, name, len);
    buf[len] = '\0';
    if (strcmp(buf, ".") == 0 || strcmp(buf, "..") == 0 || names_has(s, buf))
        return;
    if (s->n == s->cap) {
        int cap = s->cap ? s->cap * 2 : 16;
        char **v = realloc(s->v, (size_t)cap * sizeof *v);
        if (!v)
            return;
        s->v = v;
        s->cap = cap;
    }
    if ((s->v[s->n] = strdup(buf)) != NULL)
        s->n++;
}

static void names_free(struct names *s)
{
    for (int i = 0; i < s->n; i++)
        free(s->v[i]);
    free(s->v);
    *s = (struct names){0};
}

/* Walks path component by component, resolving it anew (each check: a swap since the last
 * one leads elsewhere now): the folder holding each symlink met on the way is watched, so
 * replacing the link is an event (a release folder `current -> releases/N` swapped by a
 * rename, a ConfigMap's `..data`), and each component's name is one an event on may
 * matter. A link's target is walked the same way, with the rest of the path after it. */
static void links_of(const char *path, struct dirs *d, struct names *names, int depth)
{
    size_t len = strlen(path);
    char p[PATH_MAX];
    if (depth > MAX_LINK_DEPTH || len >= sizeof p)
        return;
    memcpy(p, path, len + 1);
    size_t start = 0;   /* of the current component */
    for (size_t i = 0; i <= len; i++) {
        if (p[i] != '/' && p[i] != '\0')
            continue;
        if (i == start) {   /* a leading or doubled slash */
            start = i + 1;
            continue;
        }
        names_add(names, p + start, i - start);
        char c = p[i];
        p[i] = '\0';
        struct stat st;
        char target[PATH_MAX];
        ssize_t n;
        if (lstat(p, &st) == 0 && S_ISLNK(st.st_mode) &&
            (n = readlink(p, target, sizeof target - 1)) > 0) {
            target[n] = '\0';
            char dir[PATH_MAX], next[PATH_MAX];
            folder_of(p, dir, sizeof dir);
            dirs_add(d, dir);
            const char *rest = c ? path + i : "";
            int w = target[0] == '/'
                        ? snprintf(next, sizeof next, "%s%s", target, rest)
                        : snprintf(next, sizeof next, "%s/%s%s", dir, target, rest);
            if (w > 0 && w < (int)sizeof next)
                links_of(next, d, names, depth + 1);
            return;   /* the rest is walked where the link leads */
        }
        p[i] = c;
        start = i + 1;
    }
}

/* The folders whose events may mean that path changed: its own, where its symlinks lead
 * (`script.lua -> ..data/script.lua`), and every folder between it and the script's
 * folder (a ConfigMap swaps `..data` in the top one, whatever subfolder a module is in). */
static void dirs_of_file(const struct watch *w, const char *path, struct dirs *d,
                         struct names *names)
{
    char dir[PATH_MAX], real[PATH_MAX];
    folder_of(path, dir, sizeof dir);
    dirs_add(d, dir);
    links_of(path, d, names, 0);
    if (realpath(path, real)) {
        char rdir[PATH_MAX];
        folder_of(real, rdir, sizeof rdir);
        dirs_add(d, rdir);
        links_of(real, d, names, MAX_LINK_DEPTH);   /* its names (no link left to follow) */
    }
    if (rel_of(w, path) == path && strcmp(w->dir, ".") != 0)
        return;   /* not under the script's folder as given */
    size_t top = strlen(w->dir);
    for (char *slash; strlen(dir) > top && (slash = strrchr(dir, '/')) != NULL;) {
        *slash = '\0';
        if (strlen(dir) > top)
            dirs_add(d, dir);
    }
}

/* Every *.lua under path (hidden entries skipped: a ConfigMap's `..data` and its targets
 * would count each file twice), up to TREE_DEPTH folders down and MAX_DIRS folders in all
 * (*budget), so a script in a big folder stays cheap; with hashes when `out`. */
static void scan_folder(const struct watch *w, const char *path, int depth, int *budget,
                        struct list *out, struct dirs *d)
{
    if (*budget <= 0)
        return;
    DIR *dp = opendir(path);
    if (!dp)
        return;
    --*budget;
    if (d)
        dirs_add(d, path);
    struct dirent *e;
    while ((e = readdir(dp)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char p[PATH_MAX];
        if (snprintf(p, sizeof p, "%s/%s", path, e->d_name) >= (int)sizeof p)
            continue;
        struct stat st;
        if (stat(p, &st) != 0)
            continue;
        size_t n = strlen(e->d_name);
        if (S_ISDIR(st.st_mode) && depth < TREE_DEPTH) {
            scan_folder(w, p, depth + 1, budget, out, d);
        } else if (out && S_ISREG(st.st_mode) && n > 4 &&
                   strcmp(e->d_name + n - 4, ".lua") == 0 && out->n < TREE_MAX_FILES) {
            uint64_t h = 0;
            bool present = hash_file(p, &h);
            list_add(out, p, rel_of(w, p), h, present);
        }
    }
    closedir(dp);
}

static void scan_tree(const struct watch *w, struct list *out, struct dirs *d)
{
    int budget = MAX_DIRS;
    scan_folder(w, w->dir, 0, &budget, out, d);
}

/* Arms inotify on the folders of the current set, and drops the watches no longer needed
 * (a folder left behind by a ConfigMap swap, a module no longer required). Watch thread,
 * under w->lock. The new watches are added before the old ones go, so no event is missed
 * in between. */
static void arm(struct watch *w)
{
    struct dirs d = {.n = 0};
    struct names names = {0};
    dirs_add(&d, w->dir);
    links_of(w->dir, &d, &names, 0);   /* the script's folder itself may be a link */
    for (int i = 0; i < w->files.n; i++)
        dirs_of_file(w, w->files.v[i].path, &d, &names);
    names_free(&w->names);
    w->names = names;
    if (w->failed)
        scan_tree(w, NULL, &d);
    int *wds = calloc((size_t)d.n, sizeof *wds);
    int n = 0;
    for (int i = 0; wds && i < d.n; i++) {
        int wd = inotify_add_watch(w->ifd, d.v[i], WATCH_EVENTS);
        if (wd >= 0)
            wds[n++] = wd;   /* a folder that does not exist (yet) is not an error */
    }
    dirs_free(&d);
    if (!wds)
        return;   /* out of memory: keep the old watches */
    for (int i = 0; i < w->nwds; i++) {
        bool kept = false;
        for (int j = 0; j < n && !kept; j++)
            kept = wds[j] == w->wds[i];
        if (!kept)
            inotify_rm_watch(w->ifd, w->wds[i]);   /* EINVAL when the folder is gone */
    }
    free(w->wds);
    w->wds = wds;
    w->nwds = n;
}

/* ---- the check ---------------------------------------------------------------------------- */

static void note(char *names, size_t len, int *count, const char *rel)
{
    if (++*count > NAMES_SHOWN)
        return;
    size_t used = strlen(names);
    snprintf(names + used, len - used, "%s%s", used ? ", " : "", rel);
}

static bool differs(const struct entry *e, bool present, uint64_t hash)
{
    return present != e->present || (present && hash != e->hash);
}

/* Compares what is on disk with what the last load read (and, after a failed load, the
 * *.lua files under the script's folder with how they were last seen); the new state
 * becomes the reference. Returns how many files changed, naming them in names. */
static int check(struct watch *w, char *names, size_t len)
{
    int count = 0;
    names[0] = '\0';
    pthread_mutex_lock(&w->lock);
    arm(w);   /* first: a write from now on is an event, seen after this check */
    for (int i = 0; i < w->files.n; i++) {
        struct entry *e = &w->files.v[i];
        uint64_t h = 0;
        bool present = hash_file(e->path, &h);
        if (differs(e, present, h))
            note(names, len, &count, e->rel);
        e->present = present;
        e->hash = h;
    }
    if (w->failed) {
        struct list now = {0};
        scan_tree(w, &now, NULL);
        for (int i = 0; i < now.n; i++) {
            const struct entry *was = list_find(&w->tree, now.v[i].rel);
            if ((!was || differs(was, now.v[i].present, now.v[i].hash)) &&
                !list_find(&w->files, now.v[i].rel))
                note(names, len, &count, now.v[i].rel);
        }
        for (int i = 0; i < w->tree.n; i++)
            if (!list_find(&now, w->tree.v[i].rel) && !list_find(&w->files, w->tree.v[i].rel))
                note(names, len, &count, w->tree.v[i].rel);
        list_free(&w->tree);
        w->tree = now;
    }
    pthread_mutex_unlock(&w->lock);
    if (count > NAMES_SHOWN) {
        size_t used = strlen(names);
        snprintf(names + used, len - used, " and %d more", count - NAMES_SHOWN);
    }
    return count;
}

/* Reads the wake pipe: true when asked to stop. */
static bool woken_to_stop(struct watch *w)
{
    char b[64];
    ssize_t n = read(w->wake[0], b, sizeof b);
    if (n <= 0)
        return n == 0;   /* EAGAIN: nothing there */
    return memchr(b, 'q', (size_t)n) != NULL;
}

/* Whether an event may mean a watched file changed: one on a name of the watched paths (the
 * file, a folder or symlink on the way to it), any after a failed load on a .lua file or a
 * folder (the fix may be a file no load read yet), one on a watched folder itself (deleted,
 * moved) or a lost queue. Others (a log appended next to the script, --record into its
 * folder, an editor's swap file) must not hold the check back. */
static bool relevant(const struct watch *w, const struct inotify_event *ev)
{
    if (ev->mask & IN_Q_OVERFLOW)
        return true;
    if (ev->mask & IN_IGNORED)
        return false;   /* a watch arm() dropped, or the folder's IN_DELETE_SELF came first */
    if (ev->len == 0 || ev->name[0] == '\0')
        return true;
    if (names_has(&w->names, ev->name))
        return true;
    size_t n = strlen(ev->name);
    return w->failed && ((ev->mask & IN_ISDIR) ||
                         (n > 4 && strcmp(ev->name + n - 4, ".lua") == 0));
}

/* Reads the pending inotify events; true if one of them is relevant. */
static bool drain(struct watch *w)
{
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    bool any = false;
    ssize_t got;
    while ((got = read(w->ifd, buf, sizeof buf)) > 0) {
        pthread_mutex_lock(&w->lock);
        for (char *p = buf; p < buf + got;) {
            const struct inotify_event *ev = (const struct inotify_event *)p;
            any = any || relevant(w, ev);
            p += sizeof *ev + ev->len;
        }
        pthread_mutex_unlock(&w->lock);
    }
    return any;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
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
        /* A new set is checked like an event: its folders are armed, and a file that
         * changed between its load and now (no folder of it was watched yet: a new
         * subfolder, or the first load before the watch started) is found. */
        if (pfd[1].revents && woken_to_stop(w))
            break;
        if (!drain(w) && !pfd[1].revents)
            continue;   /* only events on names no load read */
        /* Let the burst settle: a ConfigMap swap or an editor's save is several events. Only
         * relevant events restart the wait, and it ends SETTLE_MAX_MS after the first
         * anyway. */
        int64_t now = mono_ms(), quiet_at = now + w->settle_ms, last = now + SETTLE_MAX_MS;
        while (now < quiet_at && now < last) {
            int r = poll(pfd, 2, (int)((quiet_at < last ? quiet_at : last) - now));
            now = mono_ms();
            if (r > 0 && pfd[1].revents && woken_to_stop(w))
                return NULL;
            if (r > 0 && (drain(w) || pfd[1].revents))
                quiet_at = now + w->settle_ms;
        }
        char names[512];
        if (check(w, names, sizeof names) == 0) {
            log_debug("watch: %s: events, but nothing a load read changed", w->what);
            continue;
        }
        w->on_change(w->arg, w->name_files ? names : w->what);   /* it says what it does */
    }
    return NULL;
}

/* ---- start, set, stop --------------------------------------------------------------------- */

void watch_set_files(struct watch *w, const struct watch_file *files, int n, bool failed)
{
    if (!w)
        return;
    struct list l = {0}, tree = {0};
    for (int i = 0; i < n; i++) {
        if (list_find(&l, rel_of(w, files[i].path)))
            continue;
        uint64_t h = 0;
        bool present = true;
        if (files[i].data)
            h = hash_bytes(files[i].data, files[i].len);
        else
            present = hash_file(files[i].path, &h);
        if (!list_add(&l, files[i].path, rel_of(w, files[i].path), h, present))
            log_warn("watch: out of memory: %s is not watched", files[i].path);
    }
    if (failed)
        scan_tree(w, &tree, NULL);
    pthread_mutex_lock(&w->lock);
    struct list old = w->files, old_tree = w->tree;
    w->files = l;
    w->tree = tree;
    w->failed = failed;
    pthread_mutex_unlock(&w->lock);
    list_free(&old);
    list_free(&old_tree);
    log_debug("watch: following %d file%s%s", l.n, l.n == 1 ? "" : "s",
              failed ? " and every .lua under the script's folder (the load failed)" : "");
    if (write(w->wake[1], "r", 1) != 1)
        log_debug("watch: wake pipe full (a re-arm is pending anyway)");
}

static struct watch *start(const char *const *paths, int npaths, bool name_files,
                           const char *what, int settle_ms, watch_fn *on_change,
                           void *arg, char *err, size_t errlen)
{
    struct watch *w = calloc(1, sizeof *w);
    if (!w) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&w->lock, NULL);
    w->ifd = w->wake[0] = w->wake[1] = -1;
    folder_of(paths[0], w->dir, sizeof w->dir);
    snprintf(w->what, sizeof w->what, "%s", what);
    w->name_files = name_files;
    w->settle_ms = settle_ms;
    w->on_change = on_change;
    w->arg = arg;
    for (int i = 0; i < npaths; i++) {
        uint64_t h = 0;
        bool present = hash_file(paths[i], &h);
        if (!list_add(&w->files, paths[i], rel_of(w, paths[i]), h, present)) {
            watch_stop(w);
            snprintf(err, errlen, "out of memory");
            return NULL;
        }
    }
    w->ifd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (w->ifd < 0 || pipe2(w->wake, O_NONBLOCK | O_CLOEXEC) != 0) {
        snprintf(err, errlen, "cannot watch %s: %s", w->dir, strerror(errno));
        watch_stop(w);
        return NULL;
    }
    /* the first folder must be there; the others are armed when they can be */
    if (inotify_add_watch(w->ifd, w->dir, WATCH_EVENTS) < 0) {
        snprintf(err, errlen, "cannot watch %s: %s", w->dir, strerror(errno));
        watch_stop(w);
        return NULL;
    }
    arm(w);
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
    char dir[PATH_MAX];
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
    return start(&script_path, 1, true, script_path, settle_ms, on_change, arg, err, errlen);
}

struct watch *watch_files_start(const char *const *paths, int npaths, const char *what,
                                int settle_ms, watch_fn *on_change, void *arg,
                                char *err, size_t errlen)
{
    return start(paths, npaths, false, what, settle_ms, on_change, arg, err, errlen);
}

void watch_stop(struct watch *w)
{
    if (!w)
        return;
    if (w->running && write(w->wake[1], "q", 1) == 1)
        pthread_join(w->thread, NULL);
    if (w->wake[1] >= 0)
        close(w->wake[1]);
    if (w->wake[0] >= 0)
        close(w->wake[0]);
    if (w->ifd >= 0)
        close(w->ifd);
    list_free(&w->files);
    list_free(&w->tree);
    names_free(&w->names);
    free(w->wds);
    pthread_mutex_destroy(&w->lock);
    free(w);
}
