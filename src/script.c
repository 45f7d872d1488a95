/* script.c — one Lua VM running the user's script; see script.h.
 *
 * Every Lua call goes through docall() (lua.c's pattern): a protected call with a message
 * handler that appends a traceback. The handler also records where the error message ends
 * and the traceback begins, so the gRPC status carries "file:line: msg" while the log gets
 * the whole traceback. script_handle runs its whole Lua part (building the inputs, the
 * handler, the conversion of its result) inside one such call, so no Lua API call that
 * can raise runs unprotected. */
#include "script.h"

#include <assert.h>
#include <inttypes.h>
#include <time.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/status.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "arena.h"
#include "calloutlib.h"
#include "log.h"
#include "pbconv.h"
#include "pbreflect.h"
#include "pbwire.h"

/* Longest gRPC status message we send; longer Lua errors are cut. */
#define MESSAGE_MAX 2048
/* Instructions between two looks at the clock: cheap enough to leave on all the time
 * (HAProxy measured a count of 5000 and more as near free), fine enough to stop a runaway
 * loop within a millisecond or so. */
#define HOOK_COUNT 10000

const struct script_limits script_limits_default = {
    .timeout_ms = 200,
    .memory_bytes = (size_t)64 << 20,
    .unsafe_stdlib = 0,
    .max_headers = 1024,
    .max_ctx_bytes = (size_t)1 << 20,
};
static struct script_limits limits = {200, (size_t)64 << 20, 0, 1024, (size_t)1 << 20};

void script_set_limits(const struct script_limits *l) { limits = *l; }

struct script {
    lua_State *L;
    struct arena arena;   /* the decoded request and the response structs of one call */
    uint8_t *out;         /* packed responses, reused across calls */
    size_t out_cap;
    size_t *lens;         /* length of each packed response */
    size_t lens_cap;
    uint64_t current_stream;  /* the stream whose handler runs, 0 outside handlers */
    size_t errmsg_len;    /* set by msghandler: length of the message before the traceback */
    bool denied;          /* set by msghandler: the error came from callout.deny_callout */
    size_t mem_used;      /* bytes the VM holds, counted by the allocator */
    bool mem_exceeded;    /* the allocator refused a block: the call failed for memory */
    uint64_t deadline_ns; /* CLOCK_MONOTONIC time the running call must end by, 0 = none */
    bool timed_out;       /* the hook stopped the running call */
    bool tainted;         /* a budget stopped a call mid-way: see script_take_taint */
    /* Registry refs of the strings run_handler looks up per message ("process", the phase
     * names, the handler names): pushing an interned string by ref skips hashing it. */
    int process_key;
    int phase_key[PBCONV_PHASE_COUNT];
    int handler_key[PBCONV_PHASE_COUNT];
    char message[MESSAGE_MAX];
};

struct script_stream {
    struct script *s;
    uint64_t id;
    int ctx_ref;           /* the ctx table, in the registry */
    bool have_config;      /* a protocol_config arrived: the body modes below are known */
    bool full_duplex[2];   /* request, response body in FULL_DUPLEX_STREAMED mode */
    bool observing;        /* the value of ctx.observability_mode */
};

/* The script a lua_State belongs to lives in the state's extra space, so the message
 * handler can reach it without an upvalue (pushing a closure would allocate per call). */
static struct script *script_of(lua_State *L) { return *(struct script **)lua_getextraspace(L); }

/* Turns any error object into "where: message" + traceback; records the length of the
 * first part in script_of(L)->errmsg_len. */
static int msghandler(lua_State *L)
{
    const char *deny;
    size_t deny_len;
    if (calloutlib_is_deny(L, 1, &deny, &deny_len)) {
        /* callout.deny_callout(msg): the message alone, as the status text */
        script_of(L)->denied = true;
        lua_pushlstring(L, deny, strnlen(deny, deny_len));
        script_of(L)->errmsg_len = lua_rawlen(L, -1);
        return 1;
    }
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) {
            msg = lua_tostring(L, -1);
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
        }
    }
    script_of(L)->errmsg_len = strlen(msg);
    luaL_traceback(L, L, msg, 1);
    return 1;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The VM's allocator: realloc with a ceiling. Refusing a block makes Lua raise a memory
 * error in the running call, which fails that call only; the VM stays usable. */
static void *budget_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    struct script *s = ud;
    size_t old = ptr ? osize : 0;
    if (nsize == 0) {
        free(ptr);
        s->mem_used -= old;
        return NULL;
    }
    if (limits.memory_bytes && nsize > old && s->mem_used - old + nsize > limits.memory_bytes) {
        s->mem_exceeded = true;
        return NULL;
    }
    void *p = realloc(ptr, nsize);
    if (p)
        s->mem_used = s->mem_used - old + nsize;
    return p;
}

/* Runs every HOOK_COUNT instructions of every coroutine of the VM (new threads inherit
 * it). Past the deadline it raises, and re-arms itself to run at every instruction so a
 * script cannot pcall its way out of the error. */
static void budget_hook(lua_State *L, lua_Debug *ar)
{
    struct script *s = script_of(L);
    if (s->deadline_ns == 0 || (!s->timed_out && now_ns() < s->deadline_ns))
        return;
    s->timed_out = true;
    lua_sethook(L, budget_hook, LUA_MASKCOUNT, 1);
    /* ar is the interrupted function: name the script line the budget ran out on */
    lua_getinfo(L, "Sl", ar);
    if (ar->currentline > 0)
        lua_pushfstring(L, "%s:%d: execution budget of %d ms exceeded", ar->short_src,
                        ar->currentline, limits.timeout_ms);
    else
        lua_pushfstring(L, "execution budget of %d ms exceeded", limits.timeout_ms);
    lua_error(L);
}

static int panic(lua_State *L)
{
    log_error("Lua panic (an unprotected error): %s", lua_tostring(L, -1));
    abort();
}

/* The one protected entry point for calling Lua.
 * stack before: ... f a1..an   after: ... r1..rn (LUA_OK) or ... err (string) */
static int docall(lua_State *L, int narg, int nres)
{
    int base = lua_gettop(L) - narg;
    script_of(L)->errmsg_len = SIZE_MAX;
    script_of(L)->denied = false;
    lua_pushcfunction(L, msghandler);
    lua_insert(L, base);
    int status = lua_pcall(L, narg, nres, base);
    lua_remove(L, base);
    return status;
}

/* docall under the time budget. Afterwards s->timed_out / s->mem_exceeded say whether a
 * budget stopped the call; either taints the VM. */
static int budgeted_call(struct script *s, int narg, int nres)
{
    lua_State *L = s->L;
    s->timed_out = false;
    s->mem_exceeded = false;
    s->deadline_ns = limits.timeout_ms ? now_ns() + (uint64_t)limits.timeout_ms * 1000000u : 0;
    int status = docall(L, narg, nres);
    s->deadline_ns = 0;
    if (s->timed_out)
        lua_sethook(L, budget_hook, LUA_MASKCOUNT, HOOK_COUNT);
    if (status == LUA_OK)
        s->mem_exceeded = false;   /* a refused block the script caught with pcall */
    else if (status == LUA_ERRMEM)
        s->mem_exceeded = true;
    if (s->timed_out || s->mem_exceeded) {
        s->tainted = true;
        lua_gc(L, LUA_GCCOLLECT);   /* give the memory of a bomb back at once */
    }
    return status;
}

/* The error at the top of the stack after a failed docall, split in two: *msg_len is the
 * length of the part for a status message (without the traceback). */
static const char *docall_error(lua_State *L, size_t *msg_len)
{
    size_t len;
    const char *e = lua_tolstring(L, -1, &len);
    if (e == NULL) {
        e = "(error object is not a string)";
        len = strlen(e);
    }
    size_t first = script_of(L)->errmsg_len;
    *msg_len = first <= len ? first : len;  /* no handler ran (memory error): all of it */
    return e;
}

static void copy_message(char *dst, const char *src, size_t len)
{
    if (len > MESSAGE_MAX - 1)
        len = MESSAGE_MAX - 1;
    memcpy(dst, src, len);
    dst[len] = '\0';
}

/* Registry key (by address) of the metatable shared by every ctx. */
static const char ctx_mt_key = 0;

/* ctx.state, ctx.attributes and ctx.metadata are made the first time a script (or
 * pbconv_update_ctx) asks for them: most streams never touch some of them, and a stream's
 * first message then costs one table instead of four. */
static int ctx_index(lua_State *L)
{
    size_t len;
    const char *key = lua_tolstring(L, 2, &len);
    if (key == NULL || !((len == 5 && memcmp(key, "state", 5) == 0) ||
                         (len == 10 && memcmp(key, "attributes", 10) == 0) ||
                         (len == 8 && memcmp(key, "metadata", 8) == 0))) {
        lua_pushnil(L);
        return 1;
    }
    lua_newtable(L);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, -2);
    lua_rawset(L, 1);
    return 1;
}

/* load(chunk [, name [, mode [, env]]]) in text mode only: crafted bytecode can crash the
 * VM. Delegates to the original load with mode "t". */
static int load_text_only(lua_State *L)
{
    const char *mode = luaL_optstring(L, 3, "t");
    if (strchr(mode, 'b') != NULL)
        return luaL_error(L, "binary chunks are not allowed (run with --unsafe_stdlib)");
    lua_settop(L, 4);
    lua_pushliteral(L, "t");
    lua_replace(L, 3);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, 4, LUA_MULTRET);
    return lua_gettop(L);
}

/* loadfile(name [, mode [, env]]) and dofile(name), text mode only. */
static int loadfile_text_only(lua_State *L)
{
    const char *name = luaL_optstring(L, 1, NULL);
    const char *mode = luaL_optstring(L, 2, "t");
    if (strchr(mode, 'b') != NULL)
        return luaL_error(L, "binary chunks are not allowed (run with --unsafe_stdlib)");
    int env = !lua_isnone(L, 3) ? 3 : 0;
    if (luaL_loadfilex(L, name, "t") != LUA_OK) {
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    if (env) {
        lua_pushvalue(L, env);
        if (!lua_setupvalue(L, -2, 1))
            lua_pop(L, 1);
    }
    return 1;
}

static int dofile_text_only(lua_State *L)
{
    const char *name = luaL_optstring(L, 1, NULL);
    lua_settop(L, 1);
    if (luaL_loadfilex(L, name, "t") != LUA_OK)
        return lua_error(L);
    lua_call(L, 0, LUA_MULTRET);
    return lua_gettop(L) - 1;
}

/* package.searchers[2] in text mode: require finds Lua modules on package.path as usual,
 * but never loads a precompiled one. */
static int search_lua_text_only(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "searchpath");
    lua_pushstring(L, name);
    lua_getfield(L, -3, "path");
    lua_call(L, 2, 2);
    if (lua_isnil(L, -2))
        return 1;   /* the searchpath message: which files were tried */
    const char *file = lua_tostring(L, -2);
    if (luaL_loadfilex(L, file, "t") != LUA_OK)
        return luaL_error(L, "error loading module '%s' from file '%s':\n\t%s", name, file,
                          lua_tostring(L, -1));
    lua_pushstring(L, file);
    return 2;
}

/* Opens the libraries scripts may use, one by one (HAProxy's hlua_init_state), then takes
 * out what lets a script take the process down or escape the VM: os.exit, os.execute,
 * io.popen, the debug library and binary chunks. Reading files stays possible (keys and
 * config at load time). --unsafe_stdlib keeps everything. Runs under docall. */
static int open_state(lua_State *L)
{
    static const luaL_Reg libs[] = {
        {LUA_GNAME, luaopen_base},         {LUA_LOADLIBNAME, luaopen_package},
        {LUA_COLIBNAME, luaopen_coroutine}, {LUA_TABLIBNAME, luaopen_table},
        {LUA_IOLIBNAME, luaopen_io},       {LUA_OSLIBNAME, luaopen_os},
        {LUA_STRLIBNAME, luaopen_string},  {LUA_MATHLIBNAME, luaopen_math},
        {LUA_UTF8LIBNAME, luaopen_utf8},   {NULL, NULL},
    };
    for (const luaL_Reg *lib = libs; lib->func != NULL; lib++) {
        luaL_requiref(L, lib->name, lib->func, 1);
        lua_pop(L, 1);
    }
    if (limits.unsafe_stdlib) {
        luaL_requiref(L, LUA_DBLIBNAME, luaopen_debug, 1);
        lua_pop(L, 1);
    } else {
        lua_getglobal(L, "os");
        lua_pushnil(L);
        lua_setfield(L, -2, "exit");
        lua_pushnil(L);
        lua_setfield(L, -2, "execute");
        lua_getglobal(L, "io");
        lua_pushnil(L);
        lua_setfield(L, -2, "popen");
        lua_pop(L, 2);
        lua_getglobal(L, "load");
        lua_pushcclosure(L, load_text_only, 1);
        lua_setglobal(L, "load");
        lua_register(L, "loadfile", loadfile_text_only);
        lua_register(L, "dofile", dofile_text_only);
        lua_getglobal(L, "package");
        lua_getfield(L, -1, "searchers");
        lua_pushcfunction(L, search_lua_text_only);
        lua_rawseti(L, -2, 2);
        lua_pop(L, 2);
    }
    pbconv_open(L);
    calloutlib_open(L, &script_of(L)->current_stream);
    lua_createtable(L, 0, 2);
    lua_pushcfunction(L, ctx_index);
    lua_setfield(L, -2, "__index");
    lua_pushliteral(L, "luacallout.ctx");
    lua_setfield(L, -2, "__name");
    lua_rawsetp(L, LUA_REGISTRYINDEX, &ctx_mt_key);

    struct script *s = script_of(L);
    lua_pushliteral(L, "process");
    s->process_key = luaL_ref(L, LUA_REGISTRYINDEX);
    for (int p = 0; p < PBCONV_PHASE_COUNT; p++) {
        lua_pushstring(L, pbconv_phase_name((enum pbconv_phase)p));
        s->phase_key[p] = luaL_ref(L, LUA_REGISTRYINDEX);
        lua_pushstring(L, pbconv_handler_name((enum pbconv_phase)p));
        s->handler_key[p] = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    /* Most of what a handler allocates (inputs, ctx updates, its return table) dies with
     * the message: the generational collector handles that young garbage cheaply. */
    lua_gc(L, LUA_GCGEN, 0, 0);
    return 0;
}

/* Puts the script's own folder first on package.path, so `require "helper"` finds
 * helper.lua next to the script whatever the server's working directory. Runs under
 * docall. stack before: path   after: (empty) */
static int add_script_dir(lua_State *L)
{
    size_t len;
    const char *path = lua_tolstring(L, 1, &len);
    const char *slash = memrchr(path, '/', len);
    if (slash == NULL)
        lua_pushliteral(L, ".");
    else if (slash == path)
        lua_pushliteral(L, "");  /* a script in / : "/?.lua" */
    else
        lua_pushlstring(L, path, (size_t)(slash - path));
    const char *dir = lua_tostring(L, -1);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", dir, dir, lua_tostring(L, -1));
    lua_setfield(L, -3, "path");
    lua_settop(L, 0);
    return 0;
}

struct script *script_open(const char *path, char *err, size_t errlen)
{
    struct script *s = calloc(1, sizeof *s);
    if (s == NULL) {
        snprintf(err, errlen, "%s: out of memory", path);
        return NULL;
    }
    arena_init(&s->arena, 0);
    s->L = lua_newstate(budget_alloc, s);
    if (s->L == NULL) {
        snprintf(err, errlen, "%s: cannot create a Lua state: out of memory", path);
        arena_destroy(&s->arena);
        free(s);
        return NULL;
    }
    lua_State *L = s->L;
    *(struct script **)lua_getextraspace(L) = s;
    lua_atpanic(L, panic);
    lua_sethook(L, budget_hook, LUA_MASKCOUNT, HOOK_COUNT);

    lua_pushcfunction(L, open_state);
    int status = docall(L, 0, 0);
    if (status == LUA_OK) {
        lua_pushcfunction(L, add_script_dir);
        lua_pushstring(L, path);
        status = docall(L, 1, 0);
    }
    if (status == LUA_OK) {
        /* text only: crafted bytecode can crash the VM */
        status = luaL_loadfilex(L, path, "t");
        if (status == LUA_OK)
            status = budgeted_call(s, 0, 0);
        else
            script_of(L)->errmsg_len = SIZE_MAX;  /* a load error has no traceback part */
    }
    if (status != LUA_OK) {
        size_t len;
        const char *e = docall_error(L, &len);
        if (s->mem_exceeded)
            snprintf(err, errlen, "%s: the top level exceeded the script memory limit (%zu MB)",
                     path, limits.memory_bytes >> 20);
        else
            snprintf(err, errlen, "%.*s", (int)len, e);
        log_debug("loading %s: %s", path, e);
        script_close(s);
        return NULL;
    }
    assert(lua_gettop(L) == 0);
    s->tainted = false;
    const char *found[1];
    if (script_handlers(s, found, 1) == 0) {
        snprintf(err, errlen, "%s: defines no handler (process, on_request_headers, "
                 "on_response_headers, on_request_body, on_response_body, on_request_trailers "
                 "or on_response_trailers)", path);
        script_close(s);
        return NULL;
    }
    return s;
}

size_t script_handlers(struct script *s, const char **names, size_t max)
{
    static const char *const all[] = {"process", "on_request_headers", "on_response_headers",
                                      "on_request_body", "on_response_body",
                                      "on_request_trailers", "on_response_trailers"};
    lua_State *L = s->L;
    size_t n = 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        lua_pushstring(L, all[i]);   /* cannot fail: short strings of a fixed few */
        if (lua_rawget(L, -2) == LUA_TFUNCTION && n < max)
            names[n++] = all[i];
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return n;
}

int script_take_taint(struct script *s)
{
    int tainted = s->tainted;
    s->tainted = false;
    return tainted;
}

void script_close(struct script *s)
{
    if (s == NULL)
        return;
    lua_close(s->L);
    arena_destroy(&s->arena);
    free(s->out);
    free(s->lens);
    free(s);
}

/* Creates the stream's ctx on its first message. Runs under the message's docall.
 * stack: ... -> ... (ref stored in st->ctx_ref) */
static void new_ctx(lua_State *L, struct script_stream *st)
{
    lua_createtable(L, 0, 8);
    lua_pushinteger(L, (lua_Integer)st->id);
    lua_setfield(L, -2, "stream_id");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "observability_mode");
    lua_rawgetp(L, LUA_REGISTRYINDEX, &ctx_mt_key);
    lua_setmetatable(L, -2);
    st->ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

struct script_stream *script_stream_open(struct script *s, uint64_t id)
{
    struct script_stream *st = malloc(sizeof *st);
    if (st == NULL)
        return NULL;
    st->s = s;
    st->id = id;
    st->ctx_ref = LUA_NOREF;
    st->have_config = false;
    st->full_duplex[0] = st->full_duplex[1] = false;
    st->observing = false;
    return st;
}

void script_stream_close(struct script_stream *st)
{
    if (st == NULL)
        return;
    luaL_unref(st->s->L, LUA_REGISTRYINDEX, st->ctx_ref);
    free(st);
}

/* What run_handler needs and what it found out. */
struct call {
    struct script_stream *st;
    const pbconv_request *req;
    enum pbconv_phase phase;
    const char *handler;       /* the global that ran, for log lines */
    pbconv_response *resps;    /* the messages to send (arena) */
    size_t n;
    struct pbconv_result res;
    enum pbconv_status status;
    char err[1152];  /* PBCONV_BAD: "file:line: on_x returned a bad table: ..." */
};

/* Whether a process() response answers a message of `phase`: its own type, or an
 * immediate response (Envoy accepts one in every phase). */
static int check_raw_response(const pbconv_response *resp, enum pbconv_phase phase,
                              char *err, size_t errlen)
{
    static const int own[PBCONV_PHASE_COUNT] = {
        [PBCONV_REQUEST_HEADERS] = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_HEADERS,
        [PBCONV_RESPONSE_HEADERS] = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_RESPONSE_HEADERS,
        [PBCONV_REQUEST_BODY] = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_BODY,
        [PBCONV_RESPONSE_BODY] = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_RESPONSE_BODY,
        [PBCONV_REQUEST_TRAILERS] = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_REQUEST_TRAILERS,
        [PBCONV_RESPONSE_TRAILERS] = ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_RESPONSE_TRAILERS,
    };
    int set = (int)resp->response_case;
    if (set == own[phase] ||
        set == ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE_IMMEDIATE_RESPONSE)
        return 0;
    const char *name = pbconv_phase_name(phase);
    if (set == ENVOY__SERVICE__EXT_PROC__V3__PROCESSING_RESPONSE__RESPONSE__NOT_SET) {
        snprintf(err, errlen, "response: none of the 'response' oneof is set (a %s message "
                 "needs response.%s or response.immediate_response)", name, name);
        return -1;
    }
    const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field(
        &envoy__service__ext_proc__v3__processing_response__descriptor, (unsigned)set);
    snprintf(err, errlen, "response.%s does not answer a %s message (expected response.%s "
             "or response.immediate_response)", f != NULL ? f->name : "?", name, name);
    return -1;
}

/* The protected part of script_handle: updates ctx, calls process() or the phase's
 * handler, and converts its result into c->resps. The result is returned so it stays on
 * the stack, anchoring the strings c->resps point to, until the responses are packed.
 * stack before: lightuserdata(call)   after: result (nil when there is no handler) */
static int run_handler(lua_State *L)
{
    struct call *c = lua_touserdata(L, 1);
    struct script_stream *st = c->st;
    struct arena *a = &st->s->arena;
    const pbconv_request *req = c->req;
    lua_settop(L, 0);

    if (st->ctx_ref == LUA_NOREF)
        new_ctx(L, st);
    lua_rawgeti(L, LUA_REGISTRYINDEX, st->ctx_ref);  /* 1: ctx */
    pbconv_update_ctx(L, 1, req);
    struct script *s = st->s;
    lua_pushliteral(L, "phase");
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->phase_key[c->phase]);
    lua_rawset(L, 1);
    if ((bool)req->observability_mode != st->observing) {
        st->observing = req->observability_mode;
        lua_pushliteral(L, "observability_mode");
        lua_pushboolean(L, st->observing);
        lua_rawset(L, 1);
    }

    struct pbconv_in in = {.phase = c->phase};
    if (c->phase == PBCONV_REQUEST_BODY || c->phase == PBCONV_RESPONSE_BODY) {
        const Envoy__Service__ExtProc__V3__HttpBody *b =
            c->phase == PBCONV_REQUEST_BODY ? req->request_body : req->response_body;
        in.full_duplex = st->full_duplex[c->phase == PBCONV_RESPONSE_BODY];
        if (b != NULL) {
            in.chunk = b->body.data;
            in.chunk_len = b->body.len;
            in.end_of_stream = b->end_of_stream;
        }
    }

    /* raw lookups: a "strict" metatable on _G must not turn a missing handler into an error */
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);  /* 2: _G */
    bool raw = true;
    c->handler = "process";
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->process_key);
    if (lua_rawget(L, 2) != LUA_TFUNCTION) {
        lua_pop(L, 1);
        raw = false;
        c->handler = pbconv_handler_name(c->phase);
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->handler_key[c->phase]);
        if (lua_rawget(L, 2) != LUA_TFUNCTION) {
            lua_settop(L, 0);
            lua_pushnil(L);
            c->status = pbconv_to_responses(L, 1, &in, a, &c->resps, &c->n, &c->res, c->err,
                                            sizeof c->err);
            return 1;
        }
    }
    lua_replace(L, 2);    /* ctx handler: the handler stays to name itself in errors */
    lua_pushvalue(L, 2);
    if (raw)
        pbreflect_push(L, &req->base);
    else
        pbconv_push_input(L, req, c->phase);
    lua_pushvalue(L, 1);
    lua_call(L, 2, 1);    /* ctx handler result */

    char detail[1024];
    if (raw && !lua_isnil(L, 3)) {
        ProtobufCMessage *m = NULL;
        char sub[960];
        if (pbreflect_from_lua(L, 3, &envoy__service__ext_proc__v3__processing_response__descriptor,
                               "response", a, &m, sub, sizeof sub) != 0 ||
            check_raw_response((pbconv_response *)m, c->phase, sub, sizeof sub) != 0) {
            c->status = PBCONV_BAD;
            snprintf(detail, sizeof detail, "process returned a bad response: %s", sub);
        } else {
            c->status = PBCONV_OK;
            c->resps = (pbconv_response *)m;
            c->n = 1;
        }
    } else {
        c->status = pbconv_to_responses(L, 3, &in, a, &c->resps, &c->n, &c->res, detail,
                                        sizeof detail);
    }
    if (c->status == PBCONV_BAD) {
        lua_Debug ar;
        lua_pushvalue(L, 2);
        lua_getinfo(L, ">S", &ar);
        snprintf(c->err, sizeof c->err, "%s:%d: %s", ar.short_src, ar.linedefined, detail);
    }
    lua_replace(L, 1);
    lua_settop(L, 1);
    return 1;
}

static void fail(struct script *s, struct script_reply *reply, int status, const char *msg,
                 size_t len)
{
    copy_message(s->message, msg, len);
    reply->outcome = SCRIPT_FAIL;
    reply->status = status;
    reply->message = s->message;
}

/* Packs the n responses back to back into s->out. 0, or -1 when a buffer cannot grow. */
/* Packs the n responses back to back into s->out, the last one first (pbwire writes
 * backwards), growing the buffer and starting again when they do not fit. */
static int pack(struct script *s, const pbconv_response *resps, size_t n,
                struct script_reply *reply)
{
    if (n > s->lens_cap) {
        size_t cap = s->lens_cap * 2 > n ? s->lens_cap * 2 : n < 4 ? 4 : n;
        size_t *p = realloc(s->lens, cap * sizeof *p);
        if (p == NULL)
            return -1;
        s->lens = p;
        s->lens_cap = cap;
    }
    if (s->out == NULL && (s->out = malloc(256)) != NULL)
        s->out_cap = 256;
    if (s->out == NULL)
        return -1;
    for (;;) {
        uint8_t *end = s->out + s->out_cap, *at = end;
        size_t i = n;
        while (i > 0) {
            uint8_t *first = pbwire_pack_backward(&resps[i - 1].base, s->out, at);
            if (!first)
                break;
            s->lens[--i] = (size_t)(at - first);
            at = first;
        }
        if (i == 0) {
            reply->outcome = SCRIPT_RESPOND;
            reply->data = at;
            reply->len = (size_t)(end - at);
            reply->count = n;
            reply->lens = s->lens;
            return 0;
        }
        size_t cap = s->out_cap * 2;
        if (cap < s->out_cap)
            return -1;
        uint8_t *p = realloc(s->out, cap);
        if (p == NULL)
            return -1;
        s->out = p;
        s->out_cap = cap;
    }
}

void script_handle(struct script_stream *st, const uint8_t *msg, size_t len,
                   struct script_reply *reply)
{
    struct script *s = st->s;
    lua_State *L = s->L;
    int top = lua_gettop(L);
    memset(reply, 0, sizeof *reply);

    ProtobufCAllocator alloc = arena_pb_allocator(&s->arena);
    pbconv_request *req = pbwire_unpack_request(msg, len, &s->arena);
    if (req == NULL)   /* attributes, metadata, protocol_config ... or malformed */
        req = envoy__service__ext_proc__v3__processing_request__unpack(&alloc, len, msg);
    enum pbconv_phase phase;
    if (req == NULL) {
        log_warn("stream %" PRIu64 ": malformed ProcessingRequest (%zu bytes)", st->id, len);
        static const char m[] = "malformed ProcessingRequest";
        fail(s, reply, GRPC_STATUS_INVALID_ARGUMENT, m, sizeof m - 1);
        goto done;
    }
    if (pbconv_phase_of(req, &phase) != 0) {
        log_warn("stream %" PRIu64 ": ProcessingRequest with no phase set", st->id);
        static const char m[] = "ProcessingRequest carries no headers, body or trailers";
        fail(s, reply, GRPC_STATUS_INVALID_ARGUMENT, m, sizeof m - 1);
        goto done;
    }
    /* Envoy sends protocol_config with the first message; the body modes never change on
     * a stream (mode_override cannot switch into or out of FULL_DUPLEX_STREAMED) */
    if (req->protocol_config != NULL && !st->have_config) {
        st->have_config = true;
        st->full_duplex[0] = pbconv_full_duplex(req->protocol_config, PBCONV_REQUEST_BODY);
        st->full_duplex[1] = pbconv_full_duplex(req->protocol_config, PBCONV_RESPONSE_BODY);
    }

    struct call c = {.st = st, .req = req, .phase = phase, .handler = pbconv_handler_name(phase)};
    lua_pushcfunction(L, run_handler);
    lua_pushlightuserdata(L, &c);
    s->current_stream = st->id;
    int status = budgeted_call(s, 1, 1);
    s->current_stream = 0;
    bool observe = req->observability_mode;
    if (status != LUA_OK && (s->timed_out || s->mem_exceeded)) {
        /* A budget stopped the handler: say which, and where (the hook's error carries the
         * script line it stopped at; a memory error has no location, so name the handler). */
        char m[MESSAGE_MAX];
        size_t mlen;
        const char *e = docall_error(L, &mlen);
        int code = s->timed_out ? GRPC_STATUS_DEADLINE_EXCEEDED : GRPC_STATUS_RESOURCE_EXHAUSTED;
        if (s->timed_out)
            snprintf(m, sizeof m, "%.*s", (int)mlen, e);
        else
            snprintf(m, sizeof m, "%s exceeded the script memory limit (%zu MB)", c.handler,
                     limits.memory_bytes >> 20);
        log_error("stream %" PRIu64 ": %s stopped: %s", st->id, c.handler,
                  s->timed_out ? e : m);
        if (!observe)
            fail(s, reply, code, m, strlen(m));
    } else if (status != LUA_OK) {
        size_t mlen;
        const char *e = docall_error(L, &mlen);
        if (s->denied) {
            log_warn("stream %" PRIu64 ": %s denied the request: %.*s", st->id, c.handler,
                     (int)mlen, e);
            if (!observe)
                fail(s, reply, GRPC_STATUS_PERMISSION_DENIED, e, mlen);
        } else {
            log_error("stream %" PRIu64 ": %s failed: %s", st->id, c.handler, e);
            if (!observe)
                fail(s, reply, GRPC_STATUS_INTERNAL, e, mlen);
        }
    } else if (c.status == PBCONV_BAD) {
        log_error("stream %" PRIu64 ": %s", st->id, c.err);
        if (!observe)
            fail(s, reply, GRPC_STATUS_INTERNAL, c.err, strlen(c.err));
    } else if (c.status == PBCONV_NOMEM) {
        log_error("stream %" PRIu64 ": out of memory building the response", st->id);
        if (!observe)
            fail(s, reply, GRPC_STATUS_INTERNAL, "out of memory", strlen("out of memory"));
    } else if (observe) {
        /* Envoy does not wait for an answer in observability mode */
    } else if (c.status == PBCONV_DENY) {
        log_warn("stream %" PRIu64 ": %s denied the request: %.*s", st->id, c.handler,
                 (int)c.res.deny_len, c.res.deny_message);
        fail(s, reply, GRPC_STATUS_PERMISSION_DENIED, c.res.deny_message, c.res.deny_len);
    } else if (c.n == 0) {
        reply->outcome = SCRIPT_NO_RESPONSE;  /* a FULL_DUPLEX_STREAMED chunk held back */
    } else if (pack(s, c.resps, c.n, reply) != 0) {
        log_error("stream %" PRIu64 ": out of memory packing the response", st->id);
        fail(s, reply, GRPC_STATUS_INTERNAL, "out of memory", strlen("out of memory"));
    }
    if (observe)
        reply->outcome = SCRIPT_NO_RESPONSE;
    lua_pop(L, 1);  /* the handler's result, or the error */

done:
    assert(lua_gettop(L) == top);
    (void)top;
    arena_reset(&s->arena);
}
