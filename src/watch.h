/* watch.h — `--watch`: reload when the script (or a Lua module beside it) changes. */
#ifndef LUACALLOUT_WATCH_H
#define LUACALLOUT_WATCH_H

#include <stddef.h>

struct watch;

/* Watches the folder of script_path with inotify on a thread of its own. After a change
 * settles (no event for `settle_ms`, so an editor's save or a ConfigMap update that touches
 * several files gives one reload) and when the script or a *.lua beside it really differs
 * (followed through symlinks, as Kubernetes swaps a ConfigMap volume's `..data` link), it
 * calls on_change(arg) from that thread. NULL with a message in err on failure. */
struct watch *watch_start(const char *script_path, int settle_ms, void (*on_change)(void *arg),
                          void *arg, char *err, size_t errlen);
void watch_stop(struct watch *w);

#endif
