/* watch.h — `--watch`: reload when a file the last load read, or a TLS file, changes. */
#ifndef LUACALLOUT_WATCH_H
#define LUACALLOUT_WATCH_H

#include <stdbool.h>
#include <stddef.h>

struct watch;

/* What a watch calls on a change: arg as given, what names the files (for the log). */
typedef void watch_fn(void *arg, const char *what);

/* One file a load read: its path as opened, and the bytes the load saw (data NULL: what
 * is on disk when the watch is given it is the reference). */
struct watch_file {
    const char *path;
    const char *data;
    size_t len;
};

/* Watches, with inotify on a thread of its own, the files of the script's last load (at
 * first the script alone: give it the load's files with watch_set_files). Each file's
 * folder is watched as given and where its symlinks lead, and so are the folders between
 * it and the script's folder, so a file replaced by a rename and a Kubernetes ConfigMap
 * volume's `..data` link swapped over a new folder are both seen. After a change settles
 * (no event for `settle_ms`: an editor's save or a ConfigMap update is several events)
 * and when the content of a watched file differs from what the load read (a bare touch,
 * or the same bytes written again, is no change), it calls on_change(arg, names) from
 * that thread; names lists the changed files relative to the script's folder
 * ("lib/auth/jwt.lua", several comma-separated, capped). NULL with a message in err on
 * failure. */
struct watch *watch_start(const char *script_path, int settle_ms, watch_fn *on_change,
                          void *arg, char *err, size_t errlen);

/* The files the last load read replace the watched ones (callable from any thread, on_change
 * included). `failed`: that load failed, so what fixes it may be a file it never reached
 * (a module that does not exist yet): every *.lua under the script's folder (a few levels
 * deep, hidden folders skipped) is watched too until a load succeeds. */
void watch_set_files(struct watch *w, const struct watch_file *files, int n, bool failed);

/* The same for a fixed list of files (npaths >= 1), e.g. the TLS certificate, key and client
 * CA: each one's folder is watched, and on_change(arg, what) is called when the content of
 * any of them differs. */
struct watch *watch_files_start(const char *const *paths, int npaths, const char *what,
                                int settle_ms, watch_fn *on_change, void *arg,
                                char *err, size_t errlen);
void watch_stop(struct watch *w);

#endif
