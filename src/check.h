/* check.h — `luacallout --check SCRIPT [--request FILE]`: what a reload would do, for a
 * user's CI, and a dry run of requests through the script without any port. */
#ifndef LUACALLOUT_CHECK_H
#define LUACALLOUT_CHECK_H

/* Loads the script as a reload would and reports on it (stdout); with request_path, runs
 * each stream of that exchange file through it as the server would (same decoding,
 * sandbox and budgets) and prints every answer and each stream's status as JSON lines
 * (the report then goes to stderr). Returns the process's exit status: 0, 1 when the script
 * does not load or a stream ends with an error status, 2 when the file cannot be read. */
int check_script(const char *path, const char *request_path);

#endif
