/* fuzz_strmatch.c — differential libFuzzer target: src/strmatch.c against the stock string
 * library on the same input; aborts when results or error messages differ.
 *
 * Input: [op] [init] [pattern length] [replacement length] pattern replacement subject.
 * op picks find, plain find, match, gmatch or a gsub (strmatch_diff.h); init 0 means no
 * init argument, otherwise it is the byte as a signed number (gsub with max n uses it as
 * n). Ours runs first under a step budget: the stock functions have none, so an input on
 * which ours runs out (exponential backtracking) is not given to them.
 *
 * cmake -S . -B build-fuzz -DFUZZ=ON -DSANITIZE=ON -DCMAKE_C_COMPILER=clang -DWERROR=OFF
 * cmake --build build-fuzz --target fuzz_strmatch
 * build-fuzz/fuzz_strmatch -max_len=512 -dict=tests/fuzz/fuzz_strmatch.dict CORPUS_DIR
 * (CORPUS_DIR: a copy of tests/fuzz/corpus/strmatch; libFuzzer adds to it) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../unit/strmatch_diff.h"

#define BUDGET_CHECKS 64 /* x STRMATCH_CHECK_STEPS steps, about 0.26 M */

static long checks_left;
static int tripped;

static int expired(lua_State *L)
{
    if (--checks_left > 0)
        return 0;
    tripped = 1;
    lua_pushliteral(L, "fuzz budget");
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static lua_State *L;
    if (L == NULL && (L = diff_open(expired)) == NULL)
        abort();
    if (size < 4)
        return 0;
    int op = data[0] % OP_COUNT;
    int has_init = data[1] != 0;
    lua_Integer init = (int8_t)data[1];
    size_t rest = size - 4;
    size_t lp = data[2] <= rest ? data[2] : rest;
    size_t lr = data[3] <= rest - lp ? data[3] : rest - lp;
    const char *p = (const char *)data + 4;
    const char *r = p + lp;
    const char *s = r + lr;
    size_t ls = rest - lp - lr;

    checks_left = BUDGET_CHECKS;
    tripped = 0;
    diff_run(L, "OURS", op, s, ls, p, lp, has_init, init, r, lr);
    if (!tripped) {
        diff_run(L, "STOCK", op, s, ls, p, lp, has_init, init, r, lr);
        size_t la, lb;
        const char *ours = lua_tolstring(L, -2, &la), *stock = lua_tolstring(L, -1, &lb);
        if (la != lb || memcmp(ours, stock, la) != 0 ||
            strncmp(stock, "driver failed", 13) == 0) {
            fprintf(stderr, "op %d init %lld%s\npattern: %.*s\nstock: %s\nours:  %s\n", op,
                    (long long)init, has_init ? "" : " (none)", (int)lp, p, stock, ours);
            abort();
        }
    }
    lua_settop(L, 0);
    return 0;
}
