/* vm.c — one Lua VM: capped allocator, allow-list sandbox, budgets, the protected call.
 *
 * Every Lua call goes through docall() (lua.c's pattern): a protected call with a message
 * handler that appends a traceback and records where the message ends, so a gRPC status
 * carries "file:line: msg" while the log gets the whole traceback.
 *
 * The sandbox is built, not stripped (HAProxy's hlua_init_state): the base, coroutine,
 * table, string, math and utf8 libraries, and chosen parts of os, io and package. Files
 * can be read only while the top level runs, and only through the generation's snapshot;
 * modules are found on a path fixed when the VM is built; no finalizer (__gc) can be set
 * from Lua, since Lua runs finalizers with hooks off, outside every budget. The C loops a
 * script can make unbounded without allocating (string.rep of an empty string, table
 * shifts over a huge __len) are bounded here; pattern matching is the budgeted matcher of
 * strmatch.c. --unsafe_stdlib opens everything instead. */
#include "vm.h"

#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>

#include "calloutlib.h"
#include "checks.h"
#include "generation.h"
#include "json.h"
#include "log.h"
#include "pbconv.h"
#include "strmatch.h"

/* Instructions between two looks at the clock: cheap enough to leave on all the time
 * (HAProxy measured a count of 5000 and more as near free), fine enough to stop a runaway
 * loop within a millisecond or so. */
#define HOOK_COUNT 10000
/* Elements table.insert/remove/move may shift in one call: far more than a VM under the
 * memory ceiling can hold, so only a lying __len reaches it. */
#define TABLE_SHIFT_MAX ((lua_Integer)1 << 26)

const struct vm_limits vm_limits_default = {
    .timeout_ms = 200,
    .memory_bytes = (size_t)64 << 20,
    .unsafe_stdlib = 0,
    .max_headers = 1024,
    .max_ctx_bytes = (size_t)1 << 20,
    .content_length_follows_body = 1,
};
static struct vm_limits limits = {200, (size_t)64 << 20, 0, 1024, (size_t)1 << 20, 1};

void vm_set_limits(const struct vm_limits *l) { limits = *l; }
const struct vm_limits *vm_get_limits(void) { return &limits; }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- errors ------------------------------------------------------------------------------ */

/* Records in the VM the file and line an error message points at, for the log's script
 * and line fields: the frame whose "short_src:line:" starts the message, else the
 * innermost Lua frame. The full path comes from the frame's source (short_src is cut to
 * LUA_IDSIZE, with "..." in front, for long paths). Allocates nothing. */
static void note_site(lua_State *L, const char *msg)
{
    struct vm *vm = vm_of(L);
    lua_Debug ar;
    for (int level = 1; level < 64 && lua_getstack(L, level, &ar); level++) {
        if (!lua_getinfo(L, "Sl", &ar) || ar.currentline <= 0)
            continue;
        size_t k = strlen(ar.short_src);
        char *end;
        bool named = strncmp(msg, ar.short_src, k) == 0 && msg[k] == ':' &&
                     strtol(msg + k + 1, &end, 10) == ar.currentline && *end == ':';
        if (named || vm->err_line == 0) {
            const char *src = ar.source[0] == '@' || ar.source[0] == '=' ? ar.source + 1
                                                                         : ar.short_src;
            snprintf(vm->err_script, sizeof vm->err_script, "%s", src);
            vm->err_line = ar.currentline;
        }
        if (named)
            break;
    }
}

/* Turns any error object into "where: message" + traceback; records the length of the
 * first part in vm_of(L)->errmsg_len. */
static int msghandler(lua_State *L)
{
    const char *deny;
    size_t deny_len;
    if (calloutlib_is_deny(L, 1, &deny, &deny_len)) {
        /* callout.deny_callout(msg): the message alone, as the status text */
        vm_of(L)->denied = true;
        lua_pushlstring(L, deny, deny_len);
        vm_of(L)->errmsg_len = lua_rawlen(L, -1);
        return 1;
    }
    size_t len = 0;
    const char *msg = lua_tolstring(L, 1, &len);
    if (msg == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) {
            msg = lua_tolstring(L, -1, &len);
        } else {
            /* error({...}): no message to read, so say what it is and, when a Lua function
             * raised it, where (level 1 is usually the C function `error` itself) */
            const char *where = "";
            for (int level = 1; level <= 2; level++) {
                luaL_where(L, level);
                if (lua_rawlen(L, -1) > 0) {
                    where = lua_tostring(L, -1);
                    break;
                }
                lua_pop(L, 1);
            }
            msg = lua_pushfstring(L, "%s(error object is a %s value)", where,
                                  luaL_typename(L, 1));
            len = strlen(msg);
        }
    }
    /* the whole message, NUL bytes included (luaL_traceback would stop at the first),
     * then a newline and the traceback */
    vm_of(L)->errmsg_len = len;
    note_site(L, msg);
    lua_pushlstring(L, msg, len);
    lua_pushliteral(L, "\n");
    luaL_traceback(L, L, NULL, 1);
    lua_concat(L, 3);
    return 1;
}

/* The one protected entry point for calling Lua.
 * stack before: ... f a1..an   after: ... r1..rn (LUA_OK) or ... err (string) */
static int docall(lua_State *L, int narg, int nres)
{
    int base = lua_gettop(L) - narg;
    vm_of(L)->errmsg_len = SIZE_MAX;
    vm_of(L)->denied = false;
    vm_of(L)->err_line = 0;
    lua_pushcfunction(L, msghandler);
    lua_insert(L, base);
    int status = lua_pcall(L, narg, nres, base);
    lua_remove(L, base);
    return status;
}

const char *vm_error(struct vm *vm, size_t *msg_len)
{
    size_t len;
    const char *e = lua_tolstring(vm->L, -1, &len);
    if (e == NULL) {
        e = "(error object is not a string)";
        len = strlen(e);
    }
    size_t first = vm->errmsg_len;
    *msg_len = first <= len ? first : len;  /* no handler ran (memory error): all of it */
    return e;
}

static int panic(lua_State *L)
{
    log_error("Lua panic (an unprotected error): %s", lua_tostring(L, -1));
    abort();
}

/* ---- budgets ----------------------------------------------------------------------------- */

/* The VM's allocator: realloc with a ceiling. Refusing a block makes Lua raise a memory
 * error in the running call (after an emergency collection), which fails that call only. */
static void *budget_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    struct vm *vm = ud;
    size_t old = ptr ? osize : 0;
    if (nsize == 0) {
        free(ptr);
        vm->mem_used -= old;
        return NULL;
    }
    if (limits.memory_bytes && nsize > old && vm->mem_used - old + nsize > limits.memory_bytes)
        return NULL;
    void *p = realloc(ptr, nsize);
    if (p)
        vm->mem_used = vm->mem_used - old + nsize;
    return p;
}

/* Marks the running call as out of time and pushes the message to raise. */
static void push_timeout(lua_State *L, lua_Debug *ar, const char *in)
{
    struct vm *vm = vm_of(L);
    vm->timed_out = true;
    lua_sethook(L, NULL, 0, 0);   /* re-armed below by the caller or budget_hook */
    if (ar && lua_getinfo(L, "Sl", ar) && ar->currentline > 0)
        lua_pushfstring(L, "%s:%d: execution budget of %d ms exceeded%s", ar->short_src,
                        ar->currentline, limits.timeout_ms, in);
    else
        lua_pushfstring(L, "execution budget of %d ms exceeded%s", limits.timeout_ms, in);
}

static void budget_hook(lua_State *L, lua_Debug *ar);

/* Once out of time, the hook runs at every instruction, so a script cannot pcall its way
 * out of the error. */
static void arm_kill(lua_State *L) { lua_sethook(L, budget_hook, LUA_MASKCOUNT, 1); }

/* Runs every HOOK_COUNT instructions of every coroutine of the VM (new threads inherit
 * it). Past the deadline it raises. */
static void budget_hook(lua_State *L, lua_Debug *ar)
{
    struct vm *vm = vm_of(L);
    if (vm->deadline_ns == 0 || (!vm->timed_out && now_ns() < vm->deadline_ns))
        return;
    push_timeout(L, ar, "");
    arm_kill(L);
    lua_error(L);
}

/* strmatch's budget check: the pattern functions are one C call the hook never reaches. */
static int pattern_expired(lua_State *L)
{
    struct vm *vm = vm_of(L);
    if (vm->deadline_ns == 0 || (!vm->timed_out && now_ns() < vm->deadline_ns))
        return 0;
    lua_Debug ar;
    push_timeout(L, lua_getstack(L, 1, &ar) ? &ar : NULL, " (in a string pattern)");
    arm_kill(L);
    return 1;
}

/* For C loops a script drives without running Lua instructions: raises the budget error
 * once the deadline has passed. */
static void check_deadline(lua_State *L)
{
    struct vm *vm = vm_of(L);
    if (vm->deadline_ns == 0 || (!vm->timed_out && now_ns() < vm->deadline_ns))
        return;
    lua_Debug ar;
    push_timeout(L, lua_getstack(L, 1, &ar) ? &ar : NULL, "");
    arm_kill(L);
    lua_error(L);
}

/* callout.json's budget check (ljson_set_budget): decode and encode are one C call each. */
static int json_budget(lua_State *L)
{
    check_deadline(L);
    return 0;
}

int vm_call(struct vm *vm, int narg, int nres, uint64_t stream, const char *where)
{
    lua_State *L = vm->L;
    vm->timed_out = false;
    vm->mem_exceeded = false;
    vm->current_stream = stream;
    uint64_t t0 = 0;
    uint64_t start = now_ns();   /* for vm->call_ns (the handler duration histogram) */
    if (limits.timeout_ms) {
        t0 = start;
        vm->deadline_ns = t0 + (uint64_t)limits.timeout_ms * 1000000u;
    }
    struct vm_activity *act = vm->activity;
    if (act && t0) {
        atomic_store_explicit(&act->stream, stream, memory_order_relaxed);
        atomic_store_explicit(&act->where, where, memory_order_relaxed);
        atomic_store_explicit(&act->since_ns, t0, memory_order_release);
    }
    int status = docall(L, narg, nres);
    uint64_t end = now_ns();
    vm->call_ns = end - start;
    if (status == LUA_OK && t0 && end > vm->deadline_ns) {
        /* It returned, but late: C code the budget could not interrupt held it. The call is
         * over, so the VM is consistent; the stream still ends as out of time. */
        lua_pop(L, nres);
        lua_pushfstring(L, "%s: execution budget of %d ms exceeded in C code that could not "
                        "be interrupted", where ? where : "the call", limits.timeout_ms);
        vm->errmsg_len = lua_rawlen(L, -1);
        vm->timed_out = true;
        status = LUA_ERRRUN;
        vm->deadline_ns = 0;
        if (act)
            atomic_store_explicit(&act->since_ns, 0, memory_order_release);
        vm->current_stream = 0;
        return status;
    }
    if (act && t0)
        atomic_store_explicit(&act->since_ns, 0, memory_order_release);
    vm->deadline_ns = 0;
    vm->current_stream = 0;
    if (vm->timed_out)
        lua_sethook(L, budget_hook, LUA_MASKCOUNT, HOOK_COUNT);
    /* Only a memory error that ended the call counts: one the script caught with pcall
     * (and maybe followed by an error of its own) is the script's business. */
    vm->mem_exceeded = status == LUA_ERRMEM;
    if (status != LUA_OK && (vm->timed_out || vm->mem_exceeded)) {
        vm->tainted = true;
        lua_gc(L, LUA_GCCOLLECT);   /* give the memory of a bomb back at once */
    } else {
        vm->timed_out = false;      /* a budget error a coroutine swallowed is not ours */
    }
    return status;
}

int vm_take_taint(struct vm *vm)
{
    int tainted = vm->tainted;
    vm->tainted = false;
    return tainted;
}

/* ---- the sandbox --------------------------------------------------------------------------- */

/* Records what the sandbox refused (for --check) and raises it as an error. */
static int refuse(lua_State *L, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int refuse(lua_State *L, const char *fmt, ...)
{
    struct vm *vm = vm_of(L);
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    size_t n = strlen(line);
    if (!memmem(vm->refusals, vm->refusals_len, line, n) &&
        vm->refusals_len + n + 1 < sizeof vm->refusals) {
        memcpy(vm->refusals + vm->refusals_len, line, n);
        vm->refusals_len += n;
        vm->refusals[vm->refusals_len++] = '\n';
    }
    luaL_where(L, 1);
    lua_pushfstring(L, "%s (the sandbox refuses it; --unsafe_stdlib allows it)", line);
    lua_concat(L, 2);
    return lua_error(L);
}

/* A stub in place of a function the sandbox leaves out; its upvalue is the name. */
static int refused_function(lua_State *L)
{
    return refuse(L, "%s", lua_tostring(L, lua_upvalueindex(1)));
}

/* Sets t[name] to a stub that refuses "lib.name" (stack: t on top, unchanged). */
static void stub(lua_State *L, const char *lib, const char *name)
{
    lua_pushfstring(L, "%s.%s", lib, name);
    lua_pushcclosure(L, refused_function, 1);
    lua_setfield(L, -2, name);
}

/* Copies the named fields of the table at `from` into the table on top of the stack. */
static void copy_fields(lua_State *L, int from, const char *const *names)
{
    from = lua_absindex(L, from);
    for (; *names; names++) {
        lua_getfield(L, from, *names);
        lua_setfield(L, -2, *names);
    }
}

/* setmetatable(t, mt), refusing a metatable with __gc: Lua runs finalizers with hooks off,
 * so one could run forever. Whether an object is finalized is decided here, when the
 * metatable is set (a __gc added later is ignored), so checking here is enough. */
static int setmetatable_no_gc(lua_State *L)
{
    if (lua_type(L, 2) == LUA_TTABLE) {
        lua_pushliteral(L, "__gc");
        int t = lua_rawget(L, 2);
        lua_pop(L, 1);
        if (t != LUA_TNIL)
            return refuse(L, "setmetatable with a __gc finalizer");
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);
    return 1;
}

/* string.rep(s, n [, sep]): the stock loop runs n times even when nothing is copied. */
static int rep_bounded(lua_State *L)
{
    size_t l, lsep = 0;
    luaL_checklstring(L, 1, &l);
    lua_Integer n = luaL_checkinteger(L, 2);
    luaL_optlstring(L, 3, "", &lsep);
    if (n <= 0 || (l == 0 && (lsep == 0 || n == 1))) {
        lua_pushliteral(L, "");
        return 1;
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);
    return 1;
}

/* table.insert / table.remove / table.move with the number of elements they would shift
 * bounded: with a __len that lies, the stock loops run in C for as long as it says. */
static int shift_bounded(lua_State *L)
{
    lua_Integer count;
    int which = (int)lua_tointeger(L, lua_upvalueindex(2));
    if (which == 2) {   /* move(a1, f, e, t [, a2]) */
        lua_Integer f = luaL_checkinteger(L, 2), e = luaL_checkinteger(L, 3);
        count = e >= f ? (e - f < TABLE_SHIFT_MAX ? e - f : TABLE_SHIFT_MAX) : 0;
    } else {
        luaL_checktype(L, 1, LUA_TTABLE);
        count = luaL_len(L, 1);
    }
    if (count >= TABLE_SHIFT_MAX || count < -TABLE_SHIFT_MAX)
        return luaL_error(L, "table.%s: too many elements (more than %d)",
                          which == 0 ? "insert" : which == 1 ? "remove" : "move",
                          (int)TABLE_SHIFT_MAX);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

static void wrap_field(lua_State *L, const char *name, lua_CFunction f, int which)
{
    lua_getfield(L, -1, name);
    if (which >= 0) {
        lua_pushinteger(L, which);
        lua_pushcclosure(L, f, 2);
    } else {
        lua_pushcclosure(L, f, 1);
    }
    lua_setfield(L, -2, name);
}

/* A file of the snapshot as a read-only Lua file handle (fmemopen over the snapshot's
 * bytes, which outlive every VM of the generation). */
static int memfile_close(lua_State *L)
{
    luaL_Stream *p = luaL_checkudata(L, 1, LUA_FILEHANDLE);
    int ok = fclose(p->f) == 0;
    return luaL_fileresult(L, ok, NULL);
}

static int push_memfile(lua_State *L, const struct snapshot_file *f)
{
    luaL_Stream *p = lua_newuserdatauv(L, sizeof *p, 0);
    p->closef = NULL;   /* closed: safe for __gc if fmemopen fails */
    luaL_setmetatable(L, LUA_FILEHANDLE);
    static char empty[1];
    p->f = f->len ? fmemopen(f->data, f->len, "r") : fmemopen(empty, 1, "r");
    if (p->f && !f->len)
        fseek(p->f, 1, SEEK_SET);   /* an empty file: at its end from the start */
    if (!p->f)
        return luaL_fileresult(L, 0, f->name);
    p->closef = memfile_close;
    return 1;
}

/* The snapshot's file `name`, for `fn` at load time (refused in a handler). NULL when there
 * is none, with why in *why and the errno in *err_no (err holds the text). */
static const struct snapshot_file *file_at_load(lua_State *L, const char *fn, const char *name,
                                                const char **why, int *err_no, char *err,
                                                size_t errlen)
{
    struct vm *vm = vm_of(L);
    if (!vm->loading)
        refuse(L, "%s in a handler: files can be read only while the script loads (read "
                  "them at the top level)", fn);
    err[0] = '\0';
    *err_no = 0;
    const struct snapshot_file *f = snapshot_file_for(vm->snap, name, err_no, err, errlen);
    if (f && !f->data) {
        *why = "it is a C module";
        *err_no = EINVAL;
        return NULL;
    }
    *why = err[0] ? err : strerror(*err_no);
    return f;
}

/* The snapshot's file `name` for reading at load time: NULL after pushing fail, msg, errno. */
static const struct snapshot_file *load_time_file(lua_State *L, const char *fn,
                                                  const char *name)
{
    const char *why;
    int e;
    char err[256];
    const struct snapshot_file *f = file_at_load(L, fn, name, &why, &e, err, sizeof err);
    if (!f) {
        luaL_pushfail(L);
        lua_pushfstring(L, "%s: %s", name, why);
        lua_pushinteger(L, e);
    }
    return f;
}

const char *vm_read_file(lua_State *L, const char *fn, const char *name, size_t *len)
{
    if (limits.unsafe_stdlib)
        return NULL;
    const char *why;
    int e;
    char err[256];
    const struct snapshot_file *f = file_at_load(L, fn, name, &why, &e, err, sizeof err);
    if (!f)
        luaL_error(L, "%s: cannot read '%s': %s", fn, name, why);
    *len = f->len;
    return f->data;
}

/* io.open(name [, mode]): read modes only, at load time, from the snapshot. */
static int sandbox_open(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    const char *mode = luaL_optstring(L, 2, "r");
    if (strcmp(mode, "r") != 0 && strcmp(mode, "rb") != 0)
        return refuse(L, "io.open('%s', '%s'): files can be opened for reading only", name,
                      mode);
    const struct snapshot_file *f = load_time_file(L, "io.open", name);
    return f ? push_memfile(L, f) : 3;
}

/* io.lines(name, ...): the lines of a snapshot file. */
static int sandbox_lines(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    const struct snapshot_file *f = load_time_file(L, "io.lines", name);
    if (!f) {
        lua_pop(L, 1);
        return lua_error(L);
    }
    push_memfile(L, f);           /* ... file */
    lua_replace(L, 1);            /* file, formats... */
    luaL_getmetafield(L, 1, "__index");
    lua_getfield(L, -1, "lines");
    lua_remove(L, -2);
    lua_insert(L, 1);             /* lines, file, formats... */
    lua_call(L, lua_gettop(L) - 1, 1);
    return 1;
}

/* io.close(file): closing the default output (no argument) is not for scripts. */
static int sandbox_close(lua_State *L)
{
    luaL_checkudata(L, 1, LUA_FILEHANDLE);
    lua_getfield(L, 1, "close");
    lua_pushvalue(L, 1);
    lua_call(L, 1, LUA_MULTRET);
    return lua_gettop(L) - 1;
}

/* Loads a Lua chunk of the snapshot, text only. Pushes the function or fail, msg. */
static int load_snapshot_chunk(lua_State *L, const struct snapshot_file *f)
{
    lua_pushfstring(L, "@%s", f->name);
    int st = luaL_loadbufferx(L, f->data, f->len, lua_tostring(L, -1), "t");
    lua_remove(L, -2);
    if (st != LUA_OK) {
        luaL_pushfail(L);
        lua_insert(L, -2);
        return 2;
    }
    return 1;
}

/* loadfile(name [, mode [, env]]) from the snapshot, text only. */
static int sandbox_loadfile(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    const char *mode = luaL_optstring(L, 2, "t");
    if (strchr(mode, 'b'))
        return refuse(L, "loadfile of a binary chunk");
    const struct snapshot_file *f = load_time_file(L, "loadfile", name);
    if (!f)
        return 2;
    int n = load_snapshot_chunk(L, f);
    if (n == 1 && !lua_isnone(L, 3)) {
        lua_pushvalue(L, 3);
        if (!lua_setupvalue(L, -2, 1))
            lua_pop(L, 1);
    }
    return n;
}

static int sandbox_dofile(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    const struct snapshot_file *f = load_time_file(L, "dofile", name);
    if (!f)
        return lua_pop(L, 1), lua_error(L);
    lua_settop(L, 0);
    if (load_snapshot_chunk(L, f) != 1)
        return lua_error(L);
    lua_call(L, 0, LUA_MULTRET);
    return lua_gettop(L);
}

static int reader_budgeted(lua_State *L);

/* load(chunk [, name [, mode [, env]]]) in text mode only: crafted bytecode can crash the
 * VM. Delegates to the original load (upvalue 1) with mode "t". */
static int load_text_only(lua_State *L)
{
    const char *mode = luaL_optstring(L, 3, "t");
    if (strchr(mode, 'b') != NULL)
        return refuse(L, "load of a binary chunk");
    lua_settop(L, 4);
    if (lua_type(L, 1) == LUA_TFUNCTION) {
        lua_pushvalue(L, 1);
        lua_pushcclosure(L, reader_budgeted, 1);
        lua_replace(L, 1);
    }
    lua_pushliteral(L, "t");
    lua_replace(L, 3);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, 4, LUA_MULTRET);
    return lua_gettop(L);
}

/* Calls fn(L, filename, ud) for each template of `path` with '?' replaced by `name`
 * (dots in name becoming '/'), until it returns non-zero; returns that, or 0. */
static int each_candidate(lua_State *L, const char *path, const char *name,
                          int (*fn)(lua_State *L, const char *file, void *ud), void *ud)
{
    luaL_Buffer b;
    const char *mod = luaL_gsub(L, name, ".", "/");   /* pushed */
    for (const char *t = path; *t;) {
        const char *end = strchr(t, ';');
        size_t len = end ? (size_t)(end - t) : strlen(t);
        luaL_buffinit(L, &b);
        for (size_t i = 0; i < len; i++) {
            if (t[i] == '?')
                luaL_addstring(&b, mod);
            else
                luaL_addchar(&b, t[i]);
        }
        luaL_pushresult(&b);                       /* mod file */
        int r = len ? fn(L, lua_tostring(L, -1), ud) : 0;
        if (r < 0) {                               /* found, nothing pushed */
            lua_pop(L, 2);
            return r;
        }
        if (r) {                                   /* mod file r1..rn */
            lua_remove(L, -1 - r);
            lua_remove(L, -1 - r);
            return r;
        }
        lua_pop(L, 1);
        t += len + (end ? 1 : 0);
    }
    lua_pop(L, 1);
    return 0;
}

/* For a Lua module: pushes loader, filename when `file` is in the snapshot (recorded from
 * disk while the first VM loads). */
static int try_lua_module(lua_State *L, const char *file, void *ud)
{
    (void)ud;
    struct vm *vm = vm_of(L);
    int e;
    char err[256];
    const struct snapshot_file *f = vm->loading
        ? snapshot_file_for(vm->snap, file, &e, err, sizeof err)
        : snapshot_find(vm->snap, file);
    if (!f || !f->data)
        return 0;
    if (load_snapshot_chunk(L, f) != 1)
        return luaL_error(L, "error loading module from file '%s':\n\t%s", file,
                          lua_tostring(L, -1));
    lua_pushstring(L, file);
    return 2;
}

/* package.searchers[2]: Lua modules on the path fixed when the VM was built (upvalue 1). */
static int search_lua(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    const char *path = lua_tostring(L, lua_upvalueindex(1));
    int r = each_candidate(L, path, name, try_lua_module, NULL);
    if (r)
        return r;
    if (vm_of(L)->loading)
        lua_pushfstring(L, "no file for '%s' on the module path %s", name, path);
    else
        lua_pushfstring(L, "module '%s' was not loaded while the script loaded (modules are "
                           "read only then: require it at the top level)", name);
    return 1;
}

/* For a C module: pushes loader, filename (through the original package.loadlib, upvalue
 * 2 of search_c) when `file` exists (recorded as a path in the snapshot). */
static int try_c_module(lua_State *L, const char *file, void *ud)
{
    const char *symbol = ud;
    struct vm *vm = vm_of(L);
    if (!snapshot_find(vm->snap, file)) {
        if (vm->snap->frozen || access(file, R_OK) != 0)
            return 0;
        char err[128];
        if (!snapshot_add(vm->snap, file, NULL, 0, err, sizeof err))
            return luaL_error(L, "%s: %s", file, err);
    }
    lua_pushvalue(L, lua_upvalueindex(2));
    lua_pushstring(L, file);
    lua_pushstring(L, symbol);
    lua_call(L, 2, 2);
    if (lua_isnil(L, -2))
        return luaL_error(L, "error loading C module from file '%s':\n\t%s", file,
                          lua_tostring(L, -1));
    lua_pop(L, 1);
    lua_pushstring(L, file);
    return 2;
}

/* Whether a C module file is there (for the refusal's message): pushes nothing. */
static int exists_c_module(lua_State *L, const char *file, void *ud)
{
    (void)L, (void)ud;
    return access(file, R_OK) == 0 ? -1 : 0;
}

/* package.searchers[3]: C modules on the fixed C path (upvalue 1), only while loading. */
/* C modules of the system's Lua folders a sandboxed script may load: they add no way out of
 * the sandbox (no file system, no sleeping, no process state). Others there (lfs, luasystem,
 * ...) would write files, change the working directory or block in C; C modules in the
 * script's own folder are the operator's, and load. */
static const char *const c_modules_allowed[] = {"cjson", NULL};

static bool c_module_allowed(const char *name)
{
    for (const char *const *n = c_modules_allowed; *n; n++)
        if (strcmp(*n, name) == 0)
            return true;
    return false;
}

static int search_c(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    if (!vm_of(L)->loading) {
        lua_pushfstring(L, "C module '%s' was not loaded while the script loaded", name);
        return 1;
    }
    /* luaopen_ + the name up to its first '-', dots as '_' */
    const char *dash = strchr(name, '-');
    lua_pushlstring(L, name, dash ? (size_t)(dash - name) : strlen(name));
    const char *sym = luaL_gsub(L, lua_tostring(L, -1), ".", "_");
    lua_pushfstring(L, "luaopen_%s", sym);
    lua_replace(L, -3);
    lua_pop(L, 1);
    /* the script's folder for any module, the whole C path for the allowed ones */
    bool allowed = c_module_allowed(name);
    if (allowed)
        lua_pushvalue(L, lua_upvalueindex(1));
    else
        lua_pushfstring(L, "%s/?.so", vm_of(L)->snap->dir);
    int r = each_candidate(L, lua_tostring(L, -1), name, try_c_module,
                           (void *)lua_tostring(L, -2));
    if (r) {
        lua_remove(L, -1 - r);
        lua_remove(L, -1 - r);
        return r;
    }
    lua_pop(L, 2);
    if (!allowed &&
        each_candidate(L, lua_tostring(L, lua_upvalueindex(1)), name, exists_c_module, NULL))
        return refuse(L, "require '%s', a C module of the system's Lua folders (only %s "
                         "may be loaded from there)", name, c_modules_allowed[0]);
    lua_pushfstring(L, "no C module for '%s' on %s", name, lua_tostring(L, lua_upvalueindex(1)));
    return 1;
}

/* The package library, sandboxed: require with preload, our Lua and C searchers on the
 * paths fixed now (the script's folder first), no loadlib and no searchpath. Changing
 * package.path or package.cpath later has no effect. stack: package table on top. */
static void sandbox_package(lua_State *L, const char *dir)
{
    int pkg = lua_gettop(L);
    lua_getfield(L, pkg, "path");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", dir, dir, lua_tostring(L, -1));
    lua_remove(L, -2);
    lua_pushvalue(L, -1);
    lua_setfield(L, pkg, "path");          /* for reading only */
    lua_getfield(L, pkg, "cpath");
    lua_pushfstring(L, "%s/?.so;%s", dir, lua_tostring(L, -1));
    lua_remove(L, -2);
    lua_pushvalue(L, -1);
    lua_setfield(L, pkg, "cpath");
    /* stack: pkg path cpath */
    lua_getfield(L, pkg, "searchers");
    lua_pushvalue(L, -3);
    lua_pushcclosure(L, search_lua, 1);
    lua_rawseti(L, -2, 2);
    lua_pushvalue(L, -2);
    lua_getfield(L, pkg, "loadlib");
    lua_pushcclosure(L, search_c, 2);
    lua_rawseti(L, -2, 3);
    lua_pushnil(L);
    lua_rawseti(L, -2, 4);                 /* the all-in-one C searcher */
    lua_pop(L, 3);
    stub(L, "package", "loadlib");
    stub(L, "package", "searchpath");
}

/* xpcall(f, msgh, ...): Lua calls a message handler with hooks off when the error comes
 * from the budget hook, so the script's handler is skipped once the call is out of time. */
static int skip_handler_when_out_of_time(lua_State *L)
{
    if (vm_of(L)->timed_out)
        return 1;   /* the error as it is */
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);
    return 1;
}

static int xpcall_budgeted(lua_State *L)
{
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_pushvalue(L, 2);
    lua_pushcclosure(L, skip_handler_when_out_of_time, 1);
    lua_replace(L, 2);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

/* load's reader function, behind a look at the deadline: a C function as reader (say
 * collectgarbage) never runs a Lua instruction. */
static int reader_budgeted(lua_State *L)
{
    check_deadline(L);
    lua_settop(L, 0);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_call(L, 0, 1);
    return 1;
}

/* table.concat(list [, sep [, i [, j]]]) with a look at the deadline every few thousand
 * elements: over a proxy whose __index is a C function, the stock loop runs no Lua. */
static int concat_budgeted(lua_State *L)
{
    luaL_Buffer b;
    size_t lsep;
    const char *sep = luaL_optlstring(L, 2, "", &lsep);
    lua_Integer i = luaL_optinteger(L, 3, 1);
    lua_Integer last = lua_isnoneornil(L, 4) ? luaL_len(L, 1) : luaL_checkinteger(L, 4);
    luaL_buffinit(L, &b);
    for (lua_Integer n = 0; i <= last; i++, n++) {
        if ((n & 4095) == 4095)
            check_deadline(L);
        lua_geti(L, 1, i);
        if (!lua_isstring(L, -1))
            return luaL_error(L, "invalid value (at index %I) in table for 'concat'",
                              (LUAI_UACINT)i);
        luaL_addvalue(&b);
        if (i < last)
            luaL_addlstring(&b, sep, lsep);
        if (i == LUA_MAXINTEGER)
            break;
    }
    luaL_pushresult(&b);
    return 1;
}

/* table.sort(list [, comp]): a heap sort with a look at the deadline every few thousand
 * steps (the stock quicksort over a proxy runs no Lua). Not stable, as the stock one. */
static bool sort_less(lua_State *L, int a, int b)
{
    if (lua_isnoneornil(L, 2))
        return lua_compare(L, a, b, LUA_OPLT);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, a - 1);
    lua_pushvalue(L, b - 2);
    lua_call(L, 2, 1);
    bool r = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return r;
}

static void sift_down(lua_State *L, lua_Integer root, lua_Integer n, unsigned *steps)
{
    for (;;) {
        if ((++*steps & 1023) == 0)
            check_deadline(L);
        lua_Integer child = 2 * root;
        if (child > n)
            return;
        lua_geti(L, 1, child);
        if (child + 1 <= n) {
            lua_geti(L, 1, child + 1);
            if (sort_less(L, -2, -1)) {      /* the larger child is the right one */
                lua_remove(L, -2);
                child++;
            } else {
                lua_pop(L, 1);
            }
        }
        lua_geti(L, 1, root);                /* child_v root_v */
        if (!sort_less(L, -1, -2)) {
            lua_pop(L, 2);
            return;
        }
        lua_seti(L, 1, child);               /* t[child] = root_v */
        lua_seti(L, 1, root);                /* t[root] = child_v */
        root = child;
    }
}

static int sort_budgeted(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_Integer n = luaL_len(L, 1);
    if (n > 1) {
        luaL_argcheck(L, n < INT_MAX, 1, "array too big");
        if (!lua_isnoneornil(L, 2))
            luaL_checktype(L, 2, LUA_TFUNCTION);
        lua_settop(L, 2);
        luaL_checkstack(L, 8, "sort");
        unsigned steps = 0;
        for (lua_Integer root = n / 2; root >= 1; root--)
            sift_down(L, root, n, &steps);
        for (lua_Integer end = n; end > 1; end--) {
            lua_geti(L, 1, 1);
            lua_geti(L, 1, end);
            lua_seti(L, 1, 1);
            lua_seti(L, 1, end);
            sift_down(L, 1, end - 1, &steps);
        }
    }
    return 0;
}

/* Gives every metatable C code made with luaL_newmetatable (file handles, headers, keys,
 * ...) a __metatable field, so getmetatable() hands a script "locked" instead of the
 * shared table: otherwise a script could add __gc to it and every object made later would
 * run that finalizer outside the budget. */
static void lock_metatables(lua_State *L)
{
    lua_pushnil(L);
    while (lua_next(L, LUA_REGISTRYINDEX) != 0) {      /* key mt */
        if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TTABLE) {
            lua_getfield(L, -1, "__name");              /* key mt name */
            bool named = lua_rawequal(L, -1, -3);
            lua_pop(L, 1);
            lua_pushliteral(L, "__metatable");
            if (named && lua_rawget(L, -2) == LUA_TNIL) {
                lua_pushliteral(L, "__metatable");
                lua_pushliteral(L, "locked");
                lua_rawset(L, -4);
            }
            lua_pop(L, 1);
        }
        lua_pop(L, 1);                                  /* key */
    }
}

/* Makes the table on top of the stack the global `name` and package.loaded[name]; pops it. */
static void set_library(lua_State *L, const char *name)
{
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, name);
    lua_pop(L, 1);
    lua_setglobal(L, name);
}

/* Opens a library (not registered in package.loaded: require cannot reach the original)
 * and makes a new table of it the global `name`: the functions in `keep`, our own `own`,
 * and stubs that refuse the names in `refuse`. */
static void sandboxed_library(lua_State *L, const char *name, lua_CFunction open,
                              const char *const *keep, const luaL_Reg *own,
                              const char *const *refuse)
{
    lua_pushcfunction(L, open);
    lua_call(L, 0, 1);
    lua_createtable(L, 0, 16);
    copy_fields(L, -2, keep);
    if (own)
        luaL_setfuncs(L, own, 0);
    for (; *refuse; refuse++)
        stub(L, name, *refuse);
    set_library(L, name);
    lua_pop(L, 1);
}

/* Opens the libraries scripts may use. Runs under docall. stack: dir -> (empty) */
static int open_state(lua_State *L)
{
    const char *dir = lua_tostring(L, 1);
    static const luaL_Reg libs[] = {
        {LUA_GNAME, luaopen_base},          {LUA_LOADLIBNAME, luaopen_package},
        {LUA_COLIBNAME, luaopen_coroutine}, {LUA_TABLIBNAME, luaopen_table},
        {LUA_STRLIBNAME, luaopen_string},   {LUA_MATHLIBNAME, luaopen_math},
        {LUA_UTF8LIBNAME, luaopen_utf8},    {NULL, NULL},
    };
    for (const luaL_Reg *lib = libs; lib->func != NULL; lib++) {
        luaL_requiref(L, lib->name, lib->func, 1);
        lua_pop(L, 1);
    }
    if (limits.unsafe_stdlib) {
        luaL_requiref(L, LUA_IOLIBNAME, luaopen_io, 1);
        luaL_requiref(L, LUA_OSLIBNAME, luaopen_os, 1);
        luaL_requiref(L, LUA_DBLIBNAME, luaopen_debug, 1);
        lua_pop(L, 3);
        lua_getglobal(L, "package");
        lua_getfield(L, -1, "path");
        lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", dir, dir, lua_tostring(L, -1));
        lua_setfield(L, -3, "path");
        lua_pop(L, 2);
    } else {
        /* os: the clock and the environment only */
        static const char *const os_keep[] = {"clock", "date", "difftime", "getenv", "time",
                                              NULL};
        static const char *const os_refuse[] = {"exit", "execute", "remove", "rename",
                                                "tmpname", "setlocale", NULL};
        sandboxed_library(L, LUA_OSLIBNAME, luaopen_os, os_keep, NULL, os_refuse);
        /* io: files of the snapshot, read-only, at load time; no standard streams */
        static const char *const io_keep[] = {"type", NULL};
        static const luaL_Reg io_own[] = {{"open", sandbox_open}, {"lines", sandbox_lines},
                                          {"close", sandbox_close}, {NULL, NULL}};
        static const char *const io_refuse[] = {"popen", "tmpfile", "input", "output",
                                                "read", "write", NULL};
        sandboxed_library(L, LUA_IOLIBNAME, luaopen_io, io_keep, io_own, io_refuse);
        /* the package library of the loaded table stays the one require uses */
        lua_getglobal(L, LUA_LOADLIBNAME);
        sandbox_package(L, dir);
        lua_pop(L, 1);
        /* base */
        lua_getglobal(L, "load");
        lua_pushcclosure(L, load_text_only, 1);
        lua_setglobal(L, "load");
        lua_register(L, "loadfile", sandbox_loadfile);
        lua_register(L, "dofile", sandbox_dofile);
        lua_getglobal(L, "setmetatable");
        lua_pushcclosure(L, setmetatable_no_gc, 1);
        lua_setglobal(L, "setmetatable");
        lua_getglobal(L, "xpcall");
        lua_pushcclosure(L, xpcall_budgeted, 1);
        lua_setglobal(L, "xpcall");
        lua_getglobal(L, LUA_TABLIBNAME);
        lua_pushcfunction(L, concat_budgeted);
        lua_setfield(L, -2, "concat");
        lua_pushcfunction(L, sort_budgeted);
        lua_setfield(L, -2, "sort");
        wrap_field(L, "insert", shift_bounded, 0);
        wrap_field(L, "remove", shift_bounded, 1);
        wrap_field(L, "move", shift_bounded, 2);
        lua_pop(L, 1);
        lua_getglobal(L, LUA_STRLIBNAME);
        wrap_field(L, "rep", rep_bounded, -1);
        lua_pop(L, 1);
    }
    strmatch_open(L, pattern_expired);
    ljson_set_budget(L, json_budget);
    pbconv_open(L);
    calloutlib_open(L, &vm_of(L)->current_stream, &vm_of(L)->current_phase);
    if (!limits.unsafe_stdlib)
        lock_metatables(L);

    struct vm *vm = vm_of(L);
    lua_pushliteral(L, "process");
    vm->process_key = luaL_ref(L, LUA_REGISTRYINDEX);
    for (int p = 0; p < PBCONV_PHASE_COUNT; p++) {
        lua_pushstring(L, pbconv_phase_name((enum pbconv_phase)p));
        vm->phase_key[p] = luaL_ref(L, LUA_REGISTRYINDEX);
        lua_pushstring(L, pbconv_handler_name((enum pbconv_phase)p));
        vm->handler_key[p] = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    /* Most of what a handler allocates (inputs, ctx updates, its return table) dies with
     * the message: the generational collector handles that young garbage cheaply. */
    lua_gc(L, LUA_GCGEN, 0, 0);
    lua_settop(L, 0);
    return 0;
}

/* ---- building and closing ------------------------------------------------------------------ */

static const char *const handler_names[] = {"process", "on_request_headers",
                                            "on_response_headers", "on_request_body",
                                            "on_response_body", "on_request_trailers",
                                            "on_response_trailers"};

size_t vm_handlers(struct vm *vm, const char **names, size_t max)
{
    lua_State *L = vm->L;
    size_t n = 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    for (size_t i = 0; i < sizeof handler_names / sizeof handler_names[0]; i++) {
        lua_pushstring(L, handler_names[i]);   /* cannot fail: short strings of a fixed few */
        if (lua_rawget(L, -2) == LUA_TFUNCTION && n < max)
            names[n++] = handler_names[i];
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return n;
}

size_t vm_misspellings(struct vm *vm, char *buf, size_t len)
{
    lua_State *L = vm->L;
    size_t found = 0, at = 0;
    if (len)
        buf[0] = '\0';
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    lua_pushnil(L);
    while (lua_next(L, -2) != 0) {
        if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TFUNCTION) {
            const char *name = lua_tostring(L, -2);
            const char *meant = checks_misspelled_handler(name);
            if (meant) {
                lua_Debug ar;
                lua_pushvalue(L, -1);
                lua_getinfo(L, ">S", &ar);
                int w = snprintf(buf + at, at < len ? len - at : 0,
                                 "%s:%d: global function '%s' looks like a misspelling of "
                                 "the handler '%s', which the server would call\n",
                                 ar.short_src, ar.linedefined, name, meant);
                if (w > 0 && at + (size_t)w < len)
                    at += (size_t)w;
                found++;
            }
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return found;
}

/* Records "handler (file:line)" for each handler, for the watchdog's log line. */
static void note_handlers(struct vm *vm)
{
    lua_State *L = vm->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    for (int p = 0; p <= PBCONV_PHASE_COUNT; p++) {
        const char *name = p == PBCONV_PHASE_COUNT ? "process"
                                                   : pbconv_handler_name((enum pbconv_phase)p);
        snprintf(vm->where[p], sizeof vm->where[p], "%s", name);
        if (lua_getfield(L, -1, name) == LUA_TFUNCTION) {
            lua_Debug ar;
            lua_getinfo(L, ">S", &ar);
            snprintf(vm->where[p], sizeof vm->where[p], "%s (%s:%d)", name, ar.short_src,
                     ar.linedefined);
            if (p == PBCONV_PHASE_COUNT)
                vm->has_process = true;
        } else {
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
}

struct vm *vm_open(struct snapshot *snap, char *err, size_t errlen)
{
    const char *path = snap->path;
    struct vm *vm = calloc(1, sizeof *vm);
    if (vm == NULL) {
        snprintf(err, errlen, "%s: out of memory", path);
        return NULL;
    }
    arena_init(&vm->arena, 0);
    snapshot_ref(snap);
    vm->snap = snap;
    vm->L = lua_newstate(budget_alloc, vm);
    if (vm->L == NULL) {
        snprintf(err, errlen, "%s: cannot create a Lua state: out of memory", path);
        vm_close(vm);
        return NULL;
    }
    lua_State *L = vm->L;
    *(struct vm **)lua_getextraspace(L) = vm;
    lua_atpanic(L, panic);
    lua_sethook(L, budget_hook, LUA_MASKCOUNT, HOOK_COUNT);

    lua_pushcfunction(L, open_state);
    lua_pushstring(L, snap->dir);
    int status = docall(L, 1, 0);
    if (status == LUA_OK) {
        lua_pushfstring(L, "@%s", path);
        /* text only: crafted bytecode can crash the VM */
        status = luaL_loadbufferx(L, snap->source, snap->len, lua_tostring(L, -1), "t");
        lua_remove(L, -2);
        if (status == LUA_OK) {
            vm->loading = true;
            status = vm_call(vm, 0, 0, 0, "the top level");
            vm->loading = false;
        } else {
            vm->errmsg_len = SIZE_MAX;  /* a load error has no traceback part */
        }
    }
    if (status != LUA_OK) {
        size_t len;
        const char *e = vm_error(vm, &len);
        if (vm->mem_exceeded)
            snprintf(err, errlen, "%s: the top level exceeded the script memory limit (%zu MB)",
                     path, limits.memory_bytes >> 20);
        else
            snprintf(err, errlen, "%.*s", (int)len, e);
        log_debug("loading %s: %s", path, e);
        vm_close(vm);
        return NULL;
    }
    assert(lua_gettop(L) == 0);
    vm->tainted = false;
    const char *found[1];
    if (vm_handlers(vm, found, 1) == 0) {
        snprintf(err, errlen, "%s: defines no handler (process, on_request_headers, "
                 "on_response_headers, on_request_body, on_response_body, on_request_trailers "
                 "or on_response_trailers)", path);
        vm_close(vm);
        return NULL;
    }
    note_handlers(vm);
    return vm;
}

void vm_close(struct vm *vm)
{
    if (vm == NULL)
        return;
    if (vm->L)
        lua_close(vm->L);
    snapshot_unref(vm->snap);
    arena_destroy(&vm->arena);
    free(vm->out);
    free(vm->lens);
    free(vm);
}
