/* check.h — the unit tests' one assertion: CHECK(cond) counts a pass or, on the first
 * failure, prints where and what, and the closing "N passed, 1 failed" line, and exits 1.
 * Each test prints "N passed, 0 failed" at the end of main from `passed`. */
#ifndef LUACALLOUT_TEST_CHECK_H
#define LUACALLOUT_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>

static int passed;

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (cond) {                                                                    \
            passed++;                                                                  \
        } else {                                                                       \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);   \
            fprintf(stderr, "%d passed, 1 failed\n", passed);                          \
            exit(1);                                                                   \
        }                                                                              \
    } while (0)

#endif
