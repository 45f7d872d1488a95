/* watch.h — `--watch`: reload when the script (or a Lua module beside it), or a TLS file,
 * changes. */
#ifndef LUACALLOUT_WATCH_H
#define LUACALLOUT_WATCH_H

#include <stddef.h>

struct watch;

/* What a watch calls on a change: arg as given, what names the files (for the log). */
typedef void watch_fn(void *arg, const char *what);

/* Watches the folder of script_path with inotify on a thread of its own. After a change
 * settles (no event for `settle_ms`, so an editor's save or a ConfigMap update that touches
 * several files gives one reload) and when the script or a *.lua beside it really differs
 * (followed through symlinks, as Kubernetes swaps a ConfigMap volume's `..data` link), it
 * calls on_change(arg, what) from that thread; it logs what it does about the change
 * ("watch: <what> changed: reloading"). NULL with a message in err on failure. */
struct watch *watch_start(const char *script_path, int settle_ms, watch_fn *on_change,
                          void *arg, char *err, size_t errlen);
/* The same for a list of files (npaths >= 1), e.g. the TLS certificate, key and client
 * CA: each one's folder is watched, and on_change is called when any of the files really
 * differs. `what` names them in the log. */
struct watch *watch_files_start(const char *const *paths, int npaths, const char *what,
                                int settle_ms, watch_fn *on_change, void *arg,
                                char *err, size_t errlen);
void watch_stop(struct watch *w);

#endif
