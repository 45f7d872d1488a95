/* log.h — the server log: one line per event on stderr, safe from any thread. */
#ifndef LUACALLOUT_LOG_H
#define LUACALLOUT_LOG_H

#include <stddef.h>

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };

void log_set_level(enum log_level level);
enum log_level log_get_level(void);
/* Accepts debug|info|warn|warning|error (any case); 0 on success, -1 on an unknown name. */
int log_parse_level(const char *name, enum log_level *out);
void log_msg(enum log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Sends lines to fn instead of stderr (NULL: back to stderr). fn gets the text after the
 * timestamp and level, without the newline. For the busted module (src/testing_native.c),
 * which collects each call's lines; set it before other threads log. */
typedef void log_sink_fn(void *ud, enum log_level level, const char *msg, size_t len);
void log_set_sink(log_sink_fn *fn, void *ud);

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

#endif
