/* strmatch.c — Lua 5.4 patterns (manual §6.4.1) with a step budget; see strmatch.h.
 *
 * The matcher is a backtracking matcher over the pattern text, as the manual's semantics
 * require (captures, back-references and the lazy `-` all depend on the order in which
 * alternatives are tried). The order in which it reads the pattern is also the order in
 * which it finds malformed parts: like Lua, a malformed item is reported only when matching
 * reaches it, so `("b"):match("a[")` is nil while `("a"):match("a[")` is an error. Every
 * such observable (results, captures, error messages) is checked against the stock
 * functions by tests/unit/test_strmatch.c and tests/fuzz/fuzz_strmatch.c.
 *
 * Lua strings always have a '\0' after their last byte; the few places that look one byte
 * past the pattern or the subject rely on that and read it as an ordinary '\0', as the
 * manual's semantics do (a frontier at the end of the subject sees '\0' after it). */
#include "strmatch.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lualib.h>

#define ESC '%'
#define MAX_CAPTURES 32 /* LUA_MAXCAPTURES */
#define MAX_DEPTH 200   /* Lua's MAXCCALLS for the matcher: then "pattern too complex" */

/* capture lengths that are not lengths */
#define CAP_OPEN (-1)     /* '(' seen, ')' not yet */
#define CAP_POSITION (-2) /* "()" */

/* What strmatch_open leaves for the four functions (their first upvalue). */
struct host {
    strmatch_expired_fn expired;
};

/* One call of find/match/gsub, or one step of a gmatch iterator. */
struct matcher {
    lua_State *L;
    const char *subj, *subj_end;
    const char *pat_end;
    strmatch_expired_fn expired;
    long budget;    /* steps left before asking expired() */
    int depth_left; /* recursion levels left */
    int ncap;
    struct {
        const char *at;
        ptrdiff_t len; /* or CAP_OPEN, CAP_POSITION */
    } cap[MAX_CAPTURES];
};

static void checkpoint(struct matcher *m)
{
    m->budget = STRMATCH_CHECK_STEPS;
    if (m->expired != NULL && m->expired(m->L))
        lua_error(m->L);
}

static inline void spend(struct matcher *m, size_t steps)
{
    m->budget -= (long)steps;
    if (m->budget < 0)
        checkpoint(m);
}

static void matcher_init(struct matcher *m, lua_State *L, strmatch_expired_fn expired,
                         const char *s, size_t ls, const char *p, size_t lp)
{
    m->L = L;
    m->subj = s;
    m->subj_end = s + ls;
    m->pat_end = p + lp;
    m->expired = expired;
    m->budget = STRMATCH_CHECK_STEPS;
}

/* Before each attempt at a new subject position. */
static void matcher_restart(struct matcher *m)
{
    m->ncap = 0;
    m->depth_left = MAX_DEPTH;
}

/* --- single-character classes ------------------------------------------------------------ */

/* Where the single-character class starting at p ends: after "x", "%x" or "[...]". */
static const char *class_end(struct matcher *m, const char *p)
{
    if (*p == ESC) {
        if (p + 1 >= m->pat_end)
            luaL_error(m->L, "malformed pattern (ends with '%%')");
        return p + 2;
    }
    if (*p != '[')
        return p + 1;
    const char *start = p++;
    if (p < m->pat_end && *p == '^')
        p++;
    /* The first byte of a set is a member even when it is ']' ("[]]", "[^]]"). */
    for (;;) {
        if (p >= m->pat_end)
            luaL_error(m->L, "malformed pattern (missing ']')");
        if (*p++ == ESC && p < m->pat_end)
            p++; /* "%]" is a member, not the end */
        if (p < m->pat_end && *p == ']') {
            spend(m, (size_t)(p - start)); /* a set may be as long as the pattern */
            return p + 1;
        }
    }
}

/* Is c in the class "%cl"? Upper-case letters complement; a non-letter stands for itself. */
static int in_class(int c, int cl)
{
    int yes;
    switch (tolower(cl)) {
    case 'a': yes = isalpha(c); break;
    case 'c': yes = iscntrl(c); break;
    case 'd': yes = isdigit(c); break;
    case 'g': yes = isgraph(c); break;
    case 'l': yes = islower(c); break;
    case 'p': yes = ispunct(c); break;
    case 's': yes = isspace(c); break;
    case 'u': yes = isupper(c); break;
    case 'w': yes = isalnum(c); break;
    case 'x': yes = isxdigit(c); break;
    case 'z': yes = c == 0; break; /* undocumented since 5.2, still accepted by 5.4 */
    default: return cl == c;
    }
    return isupper(cl) ? !yes : yes;
}

/* Is c in the set "[...]" that starts at p (its '[') and whose closing ']' is at close? */
static int in_set(int c, const char *p, const char *close)
{
    int member = 1;
    p++;
    if (*p == '^') {
        member = 0;
        p++;
    }
    for (; p < close; p++) {
        if (*p == ESC) {
            p++;
            if (in_class(c, (unsigned char)*p))
                return member;
        } else if (p[1] == '-' && p + 2 < close) {
            if ((unsigned char)p[0] <= c && c <= (unsigned char)p[2])
                return member;
            p += 2;
        } else if ((unsigned char)*p == c) {
            return member;
        }
    }
    return !member;
}

/* Does the subject byte at s match the class [p, ep)? Never past the subject's end. Testing
 * a set costs its length: "[" .. 60 KB .. "]*" is slow per subject byte. */
static int one_char(struct matcher *m, const char *s, const char *p, const char *ep)
{
    if (s >= m->subj_end)
        return 0;
    int c = (unsigned char)*s;
    switch (*p) {
    case '.': return 1;
    case ESC: return in_class(c, (unsigned char)p[1]);
    case '[': spend(m, (size_t)(ep - p)); return in_set(c, p, ep - 1);
    default: return (unsigned char)*p == c;
    }
}

/* --- the matcher ------------------------------------------------------------------------- */

static const char *match_at(struct matcher *m, const char *s, const char *p);

/* "x*" (from s) and "x+" (from s + 1): longest run first, then shorter ones. */
static const char *repeat_longest(struct matcher *m, const char *s, const char *p,
                                  const char *ep)
{
    size_t n = 0;
    while (one_char(m, s + n, p, ep))
        n++;
    spend(m, n);
    for (;;) {
        const char *end = match_at(m, s + n, ep + 1);
        if (end != NULL)
            return end;
        if (n == 0)
            return NULL;
        n--;
    }
}

/* "x-": shortest run first. Each longer try is a match_at call, which spends a step. */
static const char *repeat_shortest(struct matcher *m, const char *s, const char *p,
                                   const char *ep)
{
    for (;;) {
        const char *end = match_at(m, s, ep + 1);
        if (end != NULL)
            return end;
        if (!one_char(m, s, p, ep))
            return NULL;
        s++;
    }
}

/* "%bxy" at s, p pointing at x: where the balanced run ends, or NULL. */
static const char *balanced(struct matcher *m, const char *s, const char *p)
{
    if (p + 1 >= m->pat_end)
        luaL_error(m->L, "malformed pattern (missing arguments to '%%b')");
    if (s >= m->subj_end || *s != p[0])
        return NULL;
    char open = p[0], close = p[1];
    int depth = 1;
    const char *q;
    for (q = s + 1; q < m->subj_end; q++) {
        if (*q == close) {
            if (--depth == 0) {
                spend(m, (size_t)(q - s));
                return q + 1;
            }
        } else if (*q == open) {
            depth++;
        }
    }
    spend(m, (size_t)(q - s));
    return NULL;
}

/* "%1".."%9" (digit is the character): the text of that closed capture again, or NULL. */
static const char *backref(struct matcher *m, const char *s, int digit)
{
    int i = digit - '1';
    if (i < 0 || i >= m->ncap || m->cap[i].len == CAP_OPEN)
        luaL_error(m->L, "invalid capture index %%%d", i + 1);
    ptrdiff_t len = m->cap[i].len;
    if (len < 0) /* a position capture has no text; Lua never matches it */
        return NULL;
    spend(m, (size_t)len);
    if (m->subj_end - s >= len && memcmp(m->cap[i].at, s, (size_t)len) == 0)
        return s + len;
    return NULL;
}

static const char *capture_open(struct matcher *m, const char *s, const char *p,
                                ptrdiff_t kind)
{
    if (m->ncap >= MAX_CAPTURES)
        luaL_error(m->L, "too many captures");
    int i = m->ncap++;
    m->cap[i].at = s;
    m->cap[i].len = kind;
    const char *end = match_at(m, s, p);
    if (end == NULL)
        m->ncap--;
    return end;
}

/* ')': closes the innermost capture still open. */
static const char *capture_close(struct matcher *m, const char *s, const char *p)
{
    int i = m->ncap - 1;
    while (i >= 0 && m->cap[i].len != CAP_OPEN)
        i--;
    if (i < 0)
        luaL_error(m->L, "invalid pattern capture");
    m->cap[i].len = s - m->cap[i].at;
    const char *end = match_at(m, s, p);
    if (end == NULL)
        m->cap[i].len = CAP_OPEN;
    return end;
}

/* Matches the pattern from p against the subject from s; returns where the match ends, or
 * NULL. Items that cannot need backtracking (a plain byte, an anchor that holds, a frontier)
 * continue in the loop; alternatives recurse, and the recursion is what MAX_DEPTH bounds. */
static const char *match_at(struct matcher *m, const char *s, const char *p)
{
    if (m->depth_left-- == 0)
        luaL_error(m->L, "pattern too complex");
    while (p < m->pat_end) {
        spend(m, 1);
        switch (*p) {
        case '(':
            if (p + 1 < m->pat_end && p[1] == ')')
                s = capture_open(m, s, p + 2, CAP_POSITION);
            else
                s = capture_open(m, s, p + 1, CAP_OPEN);
            goto done;
        case ')':
            s = capture_close(m, s, p + 1);
            goto done;
        case '$':
            if (p + 1 == m->pat_end) { /* anywhere else '$' is an ordinary byte */
                if (s != m->subj_end)
                    s = NULL;
                goto done;
            }
            break;
        case ESC:
            switch (p[1]) { /* the '\0' after the pattern falls to the default */
            case 'b':
                s = balanced(m, s, p + 2);
                if (s == NULL)
                    goto done;
                p += 4;
                continue;
            case 'f': {
                p += 2;
                if (p >= m->pat_end || *p != '[')
                    luaL_error(m->L, "missing '[' after '%%f' in pattern");
                const char *ep = class_end(m, p);
                int before = s == m->subj ? 0 : (unsigned char)s[-1];
                int after = (unsigned char)*s; /* '\0' at the subject's end */
                if (in_set(before, p, ep - 1) || !in_set(after, p, ep - 1)) {
                    s = NULL;
                    goto done;
                }
                p = ep;
                continue;
            }
            case '0': case '1': case '2': case '3': case '4':
            case '5': case '6': case '7': case '8': case '9':
                s = backref(m, s, (unsigned char)p[1]);
                if (s == NULL)
                    goto done;
                p += 2;
                continue;
            default:
                break;
            }
            break;
        default:
            break;
        }

        /* a single-character class, maybe followed by '*', '+', '-' or '?' */
        const char *ep = class_end(m, p);
        char suffix = *ep; /* '\0' at the pattern's end */
        if (!one_char(m, s, p, ep)) {
            if (suffix == '*' || suffix == '?' || suffix == '-') {
                p = ep + 1; /* zero repetitions */
                continue;
            }
            s = NULL;
            goto done;
        }
        switch (suffix) {
        case '?': {
            const char *end = match_at(m, s + 1, ep + 1);
            if (end != NULL) {
                s = end;
                goto done;
            }
            p = ep + 1;
            continue;
        }
        case '+': s = repeat_longest(m, s + 1, p, ep); goto done;
        case '*': s = repeat_longest(m, s, p, ep); goto done;
        case '-': s = repeat_shortest(m, s, p, ep); goto done;
        default:
            s++;
            p = ep;
            continue;
        }
    }
done:
    m->depth_left++;
    return s;
}

/* --- captures to Lua values -------------------------------------------------------------- */

/* Capture i of the match [s, e): its text, or its position (pushed as an integer and
 * reported by returning CAP_POSITION). Capture 0 of a pattern without captures is the whole
 * match. *text is set for text captures only. */
static ptrdiff_t capture_get(struct matcher *m, int i, const char *s, const char *e,
                             const char **text)
{
    if (i >= m->ncap) {
        if (i != 0)
            luaL_error(m->L, "invalid capture index %%%d", i + 1);
        *text = s;
        return e - s;
    }
    ptrdiff_t len = m->cap[i].len;
    if (len == CAP_OPEN)
        luaL_error(m->L, "unfinished capture");
    if (len == CAP_POSITION) {
        lua_pushinteger(m->L, (lua_Integer)(m->cap[i].at - m->subj) + 1);
        return CAP_POSITION;
    }
    *text = m->cap[i].at;
    return len;
}

static void push_capture(struct matcher *m, int i, const char *s, const char *e)
{
    const char *text;
    ptrdiff_t len = capture_get(m, i, s, e, &text);
    if (len != CAP_POSITION)
        lua_pushlstring(m->L, text, (size_t)len);
}

/* Pushes every capture; with none, the whole match [s, e) unless s is NULL (find). */
static int push_captures(struct matcher *m, const char *s, const char *e)
{
    int n = m->ncap == 0 && s != NULL ? 1 : m->ncap;
    luaL_checkstack(m->L, n, "too many captures");
    for (int i = 0; i < n; i++)
        push_capture(m, i, s, e);
    return n;
}

/* --- the library functions --------------------------------------------------------------- */

/* An init argument as a 0-based offset; may be past the end (callers check). */
static size_t start_offset(lua_Integer init, size_t len)
{
    if (init > 0)
        return (size_t)init - 1;
    if (init == 0 || init < -(lua_Integer)len)
        return 0;
    return len - (size_t)(-init);
}

/* A pattern with none of these bytes matches only itself: find may search it as text. */
static int is_plain(const char *p, size_t lp)
{
    for (size_t i = 0; i < lp; i++)
        if (strchr("^$*+?.([%-", p[i]) != NULL && p[i] != '\0')
            return 0;
    return 1;
}

/* Plain search. memchr for the first byte and a compare is the fastest on text, but costs
 * up to lp per candidate ("aaa...b" in "aaaa..."): once the compares add up to the subject's
 * length, glibc's memmem (two-way, linear, slower to start) does the rest. Linear either
 * way, so it needs no budget. */
static const char *find_text(const char *s, size_t ls, const char *p, size_t lp)
{
    if (lp == 0)
        return s;
    if (lp > ls)
        return NULL;
    const char *last = s + (ls - lp); /* the last place a match can start */
    size_t work = 0;
    for (const char *q = s; q <= last; q++) {
        q = memchr(q, p[0], (size_t)(last - q) + 1);
        if (q == NULL)
            return NULL;
        if (memcmp(q + 1, p + 1, lp - 1) == 0)
            return q;
        work += lp;
        if (work > ls)
            return memmem(q + 1, (size_t)(s + ls - (q + 1)), p, lp);
    }
    return NULL;
}

static strmatch_expired_fn host_expired(lua_State *L)
{
    return ((struct host *)lua_touserdata(L, lua_upvalueindex(1)))->expired;
}

static int find_or_match(lua_State *L, int find)
{
    size_t ls, lp;
    const char *s = luaL_checklstring(L, 1, &ls);
    const char *p = luaL_checklstring(L, 2, &lp);
    size_t init = start_offset(luaL_optinteger(L, 3, 1), ls);
    if (init > ls) {
        luaL_pushfail(L);
        return 1;
    }
    if (find && (lua_toboolean(L, 4) || is_plain(p, lp))) {
        const char *at = find_text(s + init, ls - init, p, lp);
        if (at == NULL) {
            luaL_pushfail(L);
            return 1;
        }
        lua_pushinteger(L, (lua_Integer)(at - s) + 1);
        lua_pushinteger(L, (lua_Integer)(at - s + lp));
        return 2;
    }
    int anchored = lp > 0 && *p == '^';
    if (anchored) {
        p++;
        lp--;
    }
    struct matcher m;
    matcher_init(&m, L, host_expired(L), s, ls, p, lp);
    for (const char *from = s + init;; from++) {
        matcher_restart(&m);
        const char *end = match_at(&m, from, p);
        if (end != NULL) {
            if (!find)
                return push_captures(&m, from, end);
            lua_pushinteger(L, (lua_Integer)(from - s) + 1);
            lua_pushinteger(L, (lua_Integer)(end - s));
            return push_captures(&m, NULL, NULL) + 2;
        }
        if (anchored || from >= m.subj_end)
            break;
    }
    luaL_pushfail(L);
    return 1;
}

static int str_find(lua_State *L)
{
    return find_or_match(L, 1);
}

static int str_match(lua_State *L)
{
    return find_or_match(L, 0);
}

/* gmatch's iterator state; upvalues 1 and 2 of the iterator keep the subject and pattern
 * alive (and so the offsets valid). A '^' is not an anchor here: it matches itself. */
struct gmatch_state {
    strmatch_expired_fn expired;
    size_t next;     /* offset to try from; past the end when done */
    size_t last_end; /* end offset of the previous match, or SIZE_MAX */
};

static int gmatch_step(lua_State *L)
{
    size_t ls, lp;
    const char *s = lua_tolstring(L, lua_upvalueindex(1), &ls);
    const char *p = lua_tolstring(L, lua_upvalueindex(2), &lp);
    struct gmatch_state *g = lua_touserdata(L, lua_upvalueindex(3));
    struct matcher m;
    matcher_init(&m, L, g->expired, s, ls, p, lp);
    for (size_t from = g->next; from <= ls; from++) {
        matcher_restart(&m);
        const char *end = match_at(&m, s + from, p);
        /* an empty match right where the previous match ended does not count (5.4) */
        if (end != NULL && (size_t)(end - s) != g->last_end) {
            g->next = g->last_end = (size_t)(end - s);
            return push_captures(&m, s + from, end);
        }
    }
    g->next = ls + 1;
    return 0;
}

static int str_gmatch(lua_State *L)
{
    size_t ls;
    luaL_checklstring(L, 1, &ls);
    luaL_checklstring(L, 2, NULL);
    size_t init = start_offset(luaL_optinteger(L, 3, 1), ls);
    strmatch_expired_fn expired = host_expired(L);
    lua_settop(L, 2);
    struct gmatch_state *g = lua_newuserdatauv(L, sizeof *g, 0);
    g->expired = expired;
    g->next = init > ls ? ls + 1 : init;
    g->last_end = SIZE_MAX;
    lua_pushcclosure(L, gmatch_step, 3);
    return 1;
}

/* A replacement string for the match [s, e): "%0" the match, "%1".."%9" captures, "%%". */
static void add_expansion(struct matcher *m, luaL_Buffer *b, const char *s, const char *e,
                          const char *r, size_t lr)
{
    const char *r_end = r + lr, *esc;
    spend(m, lr); /* "%0%0..." over empty matches writes nothing but takes time */
    while ((esc = memchr(r, ESC, (size_t)(r_end - r))) != NULL) {
        luaL_addlstring(b, r, (size_t)(esc - r));
        char c = esc + 1 < r_end ? esc[1] : '\0';
        if (c == ESC) {
            luaL_addchar(b, ESC);
        } else if (c == '0') {
            luaL_addlstring(b, s, (size_t)(e - s));
        } else if (isdigit((unsigned char)c)) {
            const char *text;
            ptrdiff_t len = capture_get(m, c - '1', s, e, &text);
            if (len == CAP_POSITION)
                luaL_addvalue(b); /* the integer capture_get pushed, as a string */
            else
                luaL_addlstring(b, text, (size_t)len);
        } else {
            luaL_error(m->L, "invalid use of '%c' in replacement string", ESC);
        }
        r = esc + 2;
    }
    luaL_addlstring(b, r, (size_t)(r_end - r));
}

/* Appends the replacement for the match [s, e); returns whether it differs from the match
 * (a false or nil from a table or function keeps the match). */
static int add_replacement(struct matcher *m, luaL_Buffer *b, const char *s, const char *e,
                           int kind)
{
    lua_State *L = m->L;
    if (kind == LUA_TFUNCTION) {
        lua_pushvalue(L, 3);
        int n = push_captures(m, s, e);
        lua_call(L, n, 1);
    } else if (kind == LUA_TTABLE) {
        push_capture(m, 0, s, e);
        lua_gettable(L, 3);
    } else {
        size_t lr;
        const char *r = lua_tolstring(L, 3, &lr);
        add_expansion(m, b, s, e, r, lr);
        return 1;
    }
    if (!lua_toboolean(L, -1)) {
        lua_pop(L, 1);
        luaL_addlstring(b, s, (size_t)(e - s));
        return 0;
    }
    if (!lua_isstring(L, -1))
        return luaL_error(L, "invalid replacement value (a %s)", luaL_typename(L, -1));
    luaL_addvalue(b);
    return 1;
}

static int str_gsub(lua_State *L)
{
    size_t ls, lp;
    const char *s = luaL_checklstring(L, 1, &ls);
    const char *p = luaL_checklstring(L, 2, &lp);
    int kind = lua_type(L, 3);
    lua_Integer max_n = luaL_optinteger(L, 4, (lua_Integer)ls + 1);
    luaL_argexpected(L, kind == LUA_TNUMBER || kind == LUA_TSTRING ||
                     kind == LUA_TFUNCTION || kind == LUA_TTABLE,
                     3, "string/function/table");
    int anchored = lp > 0 && *p == '^';
    if (anchored) {
        p++;
        lp--;
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    struct matcher m;
    matcher_init(&m, L, host_expired(L), s, ls, p, lp);
    const char *at = s, *last_end = NULL;
    lua_Integer n = 0;
    int changed = 0;
    while (n < max_n) {
        matcher_restart(&m);
        const char *end = match_at(&m, at, p);
        if (end != NULL && end != last_end) { /* no empty match where the last one ended */
            n++;
            changed |= add_replacement(&m, &b, at, end, kind);
            at = last_end = end;
        } else if (at < m.subj_end) {
            luaL_addchar(&b, *at++);
        } else {
            break;
        }
        if (anchored)
            break;
    }
    if (changed) {
        luaL_addlstring(&b, at, (size_t)(m.subj_end - at));
        luaL_pushresult(&b);
    } else {
        lua_pushvalue(L, 1);
    }
    lua_pushinteger(L, n);
    return 2;
}

/* --- installing them --------------------------------------------------------------------- */

static void set_functions(lua_State *L, int table, int host)
{
    static const luaL_Reg fns[] = {
        {"find", str_find}, {"match", str_match}, {"gmatch", str_gmatch},
        {"gsub", str_gsub}, {NULL, NULL}};
    for (const luaL_Reg *f = fns; f->name != NULL; f++) {
        lua_pushvalue(L, host);
        lua_pushcclosure(L, f->func, 1);
        lua_setfield(L, table, f->name);
    }
}

void strmatch_open(lua_State *L, strmatch_expired_fn expired)
{
    struct host *h = lua_newuserdatauv(L, sizeof *h, 0);
    h->expired = expired;
    int host = lua_gettop(L);
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    if (lua_getfield(L, -1, LUA_STRLIBNAME) != LUA_TTABLE)
        luaL_error(L, "strmatch_open: the string library is not open");
    int lib = lua_gettop(L);
    set_functions(L, lib, host);
    lua_pushliteral(L, "");
    if (lua_getmetatable(L, -1)) {
        if (lua_getfield(L, -1, "__index") == LUA_TTABLE && !lua_rawequal(L, -1, lib))
            set_functions(L, lua_gettop(L), host);
        lua_pop(L, 2);
    }
    lua_settop(L, host - 1);
}
