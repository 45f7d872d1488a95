/* fuzz_dispatch.c — raw bytes -> the per-message entry point the server runs for every
 * message of a Process stream (dispatch.h), with two scripts that use every input a handler
 * gets and return what those inputs choose:
 *
 *   byte 0, bit 0   which script: 0 = HANDLERS (every on_* handler), 1 = PROCESS (process())
 *   then, repeated  2-byte big-endian length n, then n bytes: one ProcessingRequest
 *                   (the last may be short: it takes what is left)
 *
 * All messages of one input go to one stream, so state across messages (ctx.state, merged
 * attributes, protocol_config and its FULL_DUPLEX_STREAMED body modes) is exercised.
 * Every answer is held to fuzzcheck_response; a failure must carry a message and a real
 * gRPC status. The scripts choose their answer from an "ops" string they read from the
 * request (the x-fuzz header, else the first header's value, or the first bytes of a body),
 * one letter per action, so the fuzzer reaches every kind of answer by mutating bytes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzzcheck.h"
#include "dispatch.h"
#include "generation.h"
#include "vm.h"

static const char handlers_lua[] =
    "local function ops_of(headers)\n"
    "  local v = headers:get('x-fuzz')\n"
    "  if v == nil and #headers > 0 then v = headers[1][2] end\n"
    "  return (v or ''):sub(1, 24)\n"
    "end\n"
    "local function walk(t, depth)  -- reads a ctx table the way a script would\n"
    "  local n = 0\n"
    "  if depth > 4 or type(t) ~= 'table' then return 1 end\n"
    "  for k, v in pairs(t) do n = n + walk(v, depth + 1) end\n"
    "  return n\n"
    "end\n"
    "local function answer(ops, input, ctx, headers)\n"
    "  local r = {}\n"
    "  walk(ctx.attributes, 0); walk(ctx.metadata, 0); walk(ctx.protocol_config, 0)\n"
    "  for i = 1, #ops do\n"
    "    local c = ops:sub(i, i)\n"
    "    local e = headers and #headers > 0 and headers[i % #headers + 1]\n"
    "    if c == 'a' then\n"
    "      r.add = r.add or {}\n"
    "      r.add[#r.add + 1] = e and { e[1], e[2] } or { 'x-echo', input }\n"
    "    elseif c == 'p' then\n"
    "      r.add = r.add or {}\n"
    "      r.add[#r.add + 1] = { 'x-p' .. i, input, append_action = 'OVERWRITE_IF_EXISTS' }\n"
    "    elseif c == 'A' then r.add = { [ops] = input, ['x-n'] = i }; r.append_action = 'ADD_IF_ABSENT'\n"
    "    elseif c == 'r' then r.remove = { e and e[1] or 'x-gone', 'x-also' }\n"
    "    elseif c == 'c' then r.clear_route_cache = true\n"
    "    elseif c == 'b' then r.body = input\n"
    "    elseif c == 's' then r.status = 'CONTINUE_AND_REPLACE'\n"
    "    elseif c == 'k' then r.clear_body = true\n"
    "    elseif c == 'i' then\n"
    "      r = { immediate = { status = 200 + #input % 400, body = input, details = ops,\n"
    "            headers = { { 'x-i', input }, e and { e[1], e[2] } or nil },\n"
    "            grpc_status = #ops % 17 } }\n"
    "    elseif c == 'I' then r = { immediate = { headers = { [input] = ops } } }\n"
    "    elseif c == 'd' then return { deny = input ~= '' and input or true }\n"
    "    elseif c == 'm' then r.dynamic_metadata = ctx.attributes\n"
    "    elseif c == 'M' then r.dynamic_metadata = ctx.metadata\n"
    "    elseif c == 'j' then r.dynamic_metadata = { ns = { s = input, n = #input, l = { 1, input, true } } }\n"
    "    elseif c == 'o' then r.mode_override = { request_body_mode = 'STREAMED', response_header_mode = 'SKIP' }\n"
    "    elseif c == 't' then r.override_message_timeout = #ops / 7\n"
    "    elseif c == 'x' then r.chunks = { input, ops }\n"
    "    elseif c == 'X' then r.chunks = {}; r.end_of_stream = true\n"
    "    elseif c == 'g' then r.chunks = { { body = input, grpc_message_compressed = true },\n"
    "          { end_of_stream_without_message = true } }; r.end_of_stream = true\n"
    "    elseif c == 'D' then r.request_drain = true\n"
    "    elseif c == 'L' then r = { immediate = { stream = true, status = 200 + #ops, chunks = { input, ops },\n"
    "          headers = { ['x-l'] = ops }, trailers = { { 'x-t', input } } } }\n"
    "    elseif c == 'O' then r = { immediate = { stream = true, body = input, end_of_stream = false } }\n"
    "    elseif c == 'S' then ctx.state.saved = input\n"
    "    elseif c == 'R' then r.body = ctx.state.saved\n"
    "    elseif c == 'e' then error('fuzz error ' .. ops)\n"
    "    elseif c == 'E' then error({})\n"
    "    elseif c == 'n' then return nil\n"
    "    elseif c == 'T' then while true do end\n"
    "    elseif c == 'G' then return { body = string.rep(input .. 'x', 1 << 30) }\n"
    "    end\n"
    "  end\n"
    "  return r\n"
    "end\n"
    "local function on_headers(headers, ctx)\n"
    "  local ops = ops_of(headers)\n"
    "  local n = 0\n"
    "  for k, v in pairs(headers) do n = n + 1 end\n"
    "  local all = headers:get_all(headers[1] and headers[1][1] or 'x')\n"
    "  local input = (all[#all] or '') .. tostring(headers.end_of_stream)\n"
    "  if headers:has('x-fuzz', 'n') then return nil end\n"
    "  return answer(ops, input, ctx, headers)\n"
    "end\n"
    "local function on_body(body, ctx)\n"
    "  local ops = body.body:sub(1, 24)\n"
    "  return answer(ops, body.body:sub(25) .. tostring(body.end_of_stream), ctx, nil)\n"
    "end\n"
    "on_request_headers, on_response_headers = on_headers, on_headers\n"
    "on_request_trailers, on_response_trailers = on_headers, on_headers\n"
    "on_request_body, on_response_body = on_body, on_body\n";

static const char process_lua[] =
    "local function header_list(msg)\n"
    "  local m = msg.headers or msg.trailers\n"
    "  return m and m.headers or {}\n"
    "end\n"
    "local function value(h) return h.raw_value ~= '' and h.raw_value or h.value end\n"
    "function process(req, ctx)\n"
    "  local phase = ctx.phase\n"
    "  local msg = req[phase] or {}\n"
    "  local hs = header_list(msg)\n"
    "  local ops, input = '', ''\n"
    "  for _, h in ipairs(hs) do\n"
    "    if h.key == 'x-fuzz' then ops = value(h) else input = input .. value(h) end\n"
    "  end\n"
    "  if msg.body then ops, input = msg.body:sub(1, 24), msg.body:sub(25) end\n"
    "  local common = {}\n"
    "  local resp = { [phase] = {} }\n"
    "  if phase:find('trailers') then resp[phase] = common else resp[phase].response = common end\n"
    "  for i = 1, #ops do\n"
    "    local c = ops:sub(i, i)\n"
    "    local h = hs[i % math.max(#hs, 1) + 1]\n"
    "    if c == 'a' then\n"
    "      common.header_mutation = common.header_mutation or { set_headers = {} }\n"
    "      local sh = common.header_mutation.set_headers or {}\n"
    "      common.header_mutation.set_headers = sh\n"
    "      sh[#sh + 1] = { header = h and { key = h.key, raw_value = value(h) } or { key = 'x-a', value = input },\n"
    "                      append_action = i % 4, append = (i % 2 == 0) }\n"
    "    elseif c == 'r' then\n"
    "      common.header_mutation = common.header_mutation or {}\n"
    "      common.header_mutation.remove_headers = { h and h.key or 'x-r', input }\n"
    "    elseif c == 'b' then common.body_mutation = { body = input }\n"
    "    elseif c == 'k' then common.body_mutation = { clear_body = true }\n"
    "    elseif c == 'x' then common.body_mutation = { streamed_response = { body = input, end_of_stream = true } }\n"
    "    elseif c == 's' then common.status = 'CONTINUE_AND_REPLACE'\n"
    "    elseif c == 'N' then common.status = i\n"
    "    elseif c == 'c' then common.clear_route_cache = true\n"
    "    elseif c == 'i' then\n"
    "      resp = { immediate_response = { status = { code = 200 + #input % 400 }, body = input,\n"
    "               details = ops, grpc_status = { status = #ops % 17 },\n"
    "               headers = { set_headers = { { header = { key = 'x-i', raw_value = input } } } } } }\n"
    "    elseif c == 'm' then resp.dynamic_metadata = req.attributes\n"
    "    elseif c == 'M' then resp.dynamic_metadata = req.metadata_context and req.metadata_context.filter_metadata\n"
    "    elseif c == 'o' then resp.mode_override = { request_body_mode = 'FULL_DUPLEX_STREAMED', response_trailer_mode = 2 }\n"
    "    elseif c == 't' then resp.override_message_timeout = #input / 3\n"
    "    elseif c == 'w' then resp = req\n"
    "    elseif c == 'W' then resp = { [phase] = msg }\n"
    "    elseif c == 'S' then ctx.state.saved = input\n"
    "    elseif c == 'e' then error('fuzz error ' .. ops)\n"
    "    elseif c == 'n' then return nil\n"
    "    elseif c == 'T' then while true do end\n"
    "    end\n"
    "  end\n"
    "  return resp\n"
    "end\n";

static const char *const texts[2] = {handlers_lua, process_lua};
static struct vm *scripts[2];
static uint64_t next_id;

/* A VM of a new generation of the script at path, as the server builds one. */
static struct vm *open_vm(const char *path, char *err, size_t errlen)
{
    struct vm *vm = NULL;
    return generation_load(path, 1, &vm, 1, err, errlen) == 0 ? vm : NULL;
}

/* Writes the script to a temp file for generation_load (which reads it once) and removes it,
 * so that a run that ends in a crash leaves nothing behind. */
static struct vm *open_script(int which)
{
    char path[64], err[512];
    snprintf(path, sizeof path, "/tmp/fuzz_dispatch_XXXXXX");
    int fd = mkstemp(path);
    size_t len = strlen(texts[which]);
    if (fd < 0 || write(fd, texts[which], len) != (ssize_t)len || close(fd) != 0)
        fuzzcheck_fail("cannot write %s", path);
    struct vm *s = open_vm(path, err, sizeof err);
    unlink(path);
    if (s == NULL)
        fuzzcheck_fail("script %d does not load: %s", which, err);
    return s;
}

/* The VMs live across inputs, as a worker's do across streams: a fresh VM per input costs
 * ~2 ms under ASan, 20 times the message itself. The scripts keep nothing in globals, so an
 * input still reproduces on its own. (libFuzzer's per-input leak check would see the VM's
 * garbage as leaks: fuzz_dispatch.flags turns it off.) */
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    fuzzcheck_quiet_logs();
    /* budgets small enough that a looping or hoarding answer costs milliseconds */
    struct vm_limits lim = vm_limits_default;
    lim.timeout_ms = 10;
    lim.memory_bytes = (size_t)32 << 20;
    vm_set_limits(&lim);
    scripts[0] = open_script(0);
    scripts[1] = open_script(1);
    return 0;
}

/* The one place that names the entry point's calls (script_* today, dispatch_* later). */
static void run_stream(int which, const uint8_t *data, size_t size)
{
    struct dispatch_stream *st = dispatch_stream_open(scripts[which], ++next_id);
    if (st == NULL)
        abort();
    for (int n = 0; size > 0 && n < 16; n++) {
        size_t len = size >= 2 ? (size_t)data[0] << 8 | data[1] : 0;
        size_t skip = size >= 2 ? 2 : size;
        data += skip, size -= skip;
        if (len > size)
            len = size;
        struct dispatch_reply reply;
        dispatch_handle(st, data, len, &reply);
        data += len, size -= len;

        if (reply.outcome == DISPATCH_RESPOND) {
            size_t at = 0;
            for (size_t i = 0; i < reply.count; i++) {
                if (reply.lens[i] > reply.len - at)
                    fuzzcheck_fail("answer %zu overruns the reply (%zu of %zu bytes)", i,
                                   reply.lens[i], reply.len - at);
                fuzzcheck_response(reply.data + at, reply.lens[i], "dispatch_handle");
                at += reply.lens[i];
            }
            if (at != reply.len)
                fuzzcheck_fail("answers cover %zu of %zu reply bytes", at, reply.len);
        } else if (reply.outcome == DISPATCH_FAIL) {
            /* a deny message that starts with NUL ends up empty (the status message is a
             * C string): regressions/fuzz_dispatch/deny-message-leading-nul */
            if ((reply.message == NULL || reply.message[0] == '\0') &&
                !fuzzcheck_known("empty-fail-message"))
                fuzzcheck_fail("DISPATCH_FAIL without a message (status %d)", reply.status);
            if (reply.status < 1 || reply.status > 16)
                fuzzcheck_fail("DISPATCH_FAIL with status %d: %s", reply.status, reply.message);
        } else if (reply.outcome != DISPATCH_NO_RESPONSE) {
            fuzzcheck_fail("outcome %d", (int)reply.outcome);
        }
    }
    dispatch_stream_close(st);
    if (vm_take_taint(scripts[which])) {   /* a budget stopped a handler: fresh VM */
        vm_close(scripts[which]);
        scripts[which] = open_script(which);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    run_stream(data[0] & 1, data + 1, size - 1);
    return 0;
}
