"""The sandbox, the budgets, the watchdog and immutable generations, attacked the way a hostile
script author would (issue 10). Each test asserts the promise, so it fails if the promise
breaks: a refused function fails its stream with INTERNAL naming the sandbox and the script's
file:line, a budget stops its stream within the budget plus a margin, the server keeps
serving, a worker wedged in C is reported and never holds up shutdown, and a generation is one
script byte for byte whatever happens on disk.

Attacks that wedge a worker for good when they succeed run on a server of their own, killed at
teardown (see `disposable`), so a broken promise fails one test, not the module."""

import hashlib
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

import harness as h

OK = grpc.StatusCode.OK
INTERNAL = grpc.StatusCode.INTERNAL
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

BUDGET_MS = 200
MARGIN_S = 1.3            # budget + margin: a stopped stream ends within 1.5 s
LIBC = next((p for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib/aarch64-linux-gnu/libc.so.6",
                         "/usr/lib/libc.so.6", "/lib/libc.so.6") if os.path.exists(p)), "libc.so.6")



def lua_str(s):
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------------------------
# The hostile script: one case per x-case header value, each on a line of its own marked
# "-- @case" so a test can tell the line an error must name.
# --------------------------------------------------------------------------------------------

HOSTILE = r"""
counter = 0
local LOOP = function() while true do end end
TOP = {}
local function rec(name, ...) TOP[name] = table.concat({tostring(select(1, ...)), tostring(select(2, ...))}, " ") end
-- attempts at the top level, recorded for the handler to report
rec("loadlib", pcall(package.loadlib, "liblua5.4.so.0", "luaopen_debug"))
rec("proc_mem", pcall(io.open, "/proc/self/mem", "r+b"))
rec("write", pcall(io.open, OUT, "w"))
rec("gc", pcall(setmetatable, {}, {__gc = LOOP}))
rec("exit", pcall(os.exit, 3))
package.path = EVIL .. "/?.lua;" .. package.path
package.cpath = EVIL .. "/?.so;" .. package.cpath
rec("require_evil", pcall(require, "evilmod"))
TOP.read_config = io.open(CONFIG):read("a")

local CASES = {}
-- refused by the sandbox
CASES.loadlib_debug = function() local f = package.loadlib("liblua5.4.so.0", "luaopen_debug") return f and f() end -- @loadlib_debug
CASES.loadlib_exit = function() local f = package.loadlib(LIBC, "exit") return f and f(7) end -- @loadlib_exit
CASES.proc_mem = function() local f = io.open("/proc/self/mem", "r+b") return f end -- @proc_mem
CASES.open_write = function() local f = io.open(OUT, "w") return f and f:write("pwned") end -- @open_write
CASES.open_append = function() local f = io.open(OUT, "a+") return f end -- @open_append
CASES.open_read = function() local f = io.open(CONFIG, "r") return f and f:read("a") end -- @open_read
CASES.open_read_bin = function() local f = io.open(CONFIG, "rb") return f and f:read("a") end -- @open_read_bin
CASES.io_lines = function() for l in io.lines(CONFIG) do return l end end -- @io_lines
CASES.io_output = function() local f = io.output(OUT) return f end -- @io_output
CASES.io_write = function() local f = io.write("pwned") return f end -- @io_write
CASES.io_read = function() local f = io.read("a") return f end -- @io_read
CASES.io_input = function() local f = io.input(CONFIG) return f end -- @io_input
CASES.io_popen = function() local f = io.popen("id") return f end -- @io_popen
CASES.io_tmpfile = function() local f = io.tmpfile() return f end -- @io_tmpfile
CASES.os_remove = function() local r = os.remove(VICTIM) return r end -- @os_remove
CASES.os_rename = function() local r = os.rename(VICTIM, VICTIM .. ".moved") return r end -- @os_rename
CASES.os_tmpname = function() local r = os.tmpname() return r end -- @os_tmpname
CASES.os_setlocale = function() local r = os.setlocale("de_DE.UTF-8") return r end -- @os_setlocale
CASES.os_exit = function() local r = os.exit(3) return r end -- @os_exit
CASES.os_execute = function() local r = os.execute("true") return r end -- @os_execute
CASES.dofile = function() local r = dofile(CONFIG_LUA) return r end -- @dofile
CASES.loadfile = function() local r = loadfile(CONFIG_LUA) return r end -- @loadfile
CASES.load_mode_b = function() local r = load("return 1", "x", "b") return r end -- @load_mode_b
CASES.require_os_exit = function() local r = require("os").exit(3) return r end -- @require_os_exit
CASES.loaded_io_popen = function() local r = package.loaded.io.popen("id") return r end -- @loaded_io_popen
CASES.g_os_exit = function() local r = _G["o" .. "s"]["ex" .. "it"](3) return r end -- @g_os_exit
CASES.coroutine_exit = function() local r = coroutine.wrap(function() os.exit(3) end)() return r end -- @coroutine_exit
CASES.pcall_exit = function() local ok, e = pcall(os.exit, 3) error(e) end -- @pcall_exit
CASES.setmetatable_gc = function() local t = setmetatable({}, {__gc = LOOP}) return t end -- @setmetatable_gc
CASES.setmetatable_gc_false = function() local t = setmetatable({}, {__gc = false}) return t end -- @setmetatable_gc_false
-- answers (status OK): what a trick got
CASES.top = function(h) return TOP[h:get("x-arg")] end
CASES.debug = function() return type(debug) .. " " .. tostring(package.loaded.debug) end
CASES.require_debug = function() local ok = pcall(require, "debug") return tostring(ok) end
CASES.require_luacallout_os = function() local ok, m = pcall(require, "luacallout.os") return tostring(ok) end
CASES.bytecode = function() local f, e = load(string.dump(function() return 1 end)) return tostring(f) .. " " .. tostring(e) end
CASES.bytecode_strmeta = function() local d = getmetatable("").__index.dump(function() return 1 end) local f, e = load(d, "=d", "t") return tostring(f) .. " " .. tostring(e) end
CASES.bytecode_reader = function()
  local d, done = string.dump(function() return 1 end), false
  local f, e = load(function() if done then return nil end done = true return d end)
  return tostring(f) .. " " .. tostring(e)
end
CASES.path_in_handler = function()
  package.path = EVIL .. "/?.lua"
  package.cpath = EVIL .. "/?.so"
  local ok = pcall(require, "evilmod2")
  return tostring(ok) .. " " .. tostring(EVIL_RAN)
end
CASES.strmeta_rep = function() local s = getmetatable("").__index.rep("", 2^40) return #s end
CASES.counter = function() return counter end
-- budgets
CASES.find_rep = function() local r = ("a"):rep(1000):find(".-.-.-b") return r end -- @find_rep
CASES.cookie = function(h) local c = h:get("cookie") local r = c:match("^%s*(.-)%s*=%s*(.-)%s*;%s*(.-)%s*=%s*(.-)%s*$") return r end -- @cookie
CASES.gmatch = function(h) local n = 0 for k in h:get("cookie"):gmatch("(.-)%s*=%s*(.-)%s*;") do n = n + 1 end return n end
CASES.rep_empty = function() return #string.rep("", 2^40) end
CASES.rep_empty_sep = function() return #string.rep("", 1e15, "") end
CASES.rep_sep = function() return #string.rep("", 1e15, "x") end
CASES.move = function() local t = table.move({}, 1, 2^50, 2) return #t end
CASES.insert_len = function() local t = setmetatable({}, {__len = function() return 2^50 end}) table.insert(t, 1, "x") return "inserted" end
CASES.remove_len = function() local t = setmetatable({}, {__len = function() return 2^50 end}) table.remove(t, 1) return "removed" end
CASES.gc_loop = function() while true do collectgarbage() end end
CASES.gc_step_loop = function() while true do collectgarbage("step", 1000) end end
CASES.coroutine_loop = function() while true do coroutine.resume(coroutine.create(LOOP)) end end
CASES.coroutine_wrap = function() coroutine.wrap(LOOP)() end
CASES.coroutine_nested = function()
  local function deeper(n) if n == 0 then LOOP() end coroutine.resume(coroutine.create(deeper), n - 1) end
  while true do deeper(50) end
end
CASES.pcall_error_loop = function() while true do pcall(error, "x") end end
CASES.pcall_loop = function() while true do pcall(LOOP) end end
CASES.xpcall_loop = function() while true do xpcall(LOOP, LOOP) end end
CASES.close_loop = function() local x <close> = setmetatable({}, {__close = LOOP}) LOOP() end
CASES.concat_proxy = function() local t = setmetatable({}, {__index = table.concat}) return #table.concat(t, "", 1, 2^40) end
CASES.sort_proxy = function() local u = setmetatable({}, {__index = table.concat}) local t = setmetatable({}, {__len = function() return 2^31 - 2 end, __index = u, __newindex = rawequal}) table.sort(t) return "sorted" end
CASES.load_reader = function() local f, e = load(collectgarbage) return tostring(e) end
-- memory: a ceiling caught by pcall, then a plain error
CASES.mem_then_plain = function()
  local ok, e = pcall(function() local t = {} for i = 1, 1e9 do t[i] = ("y"):rep(65536) .. i end end)
  error("plain after " .. tostring(ok), 0)
end

function on_request_headers(headers, ctx)
  counter = counter + 1
  local case = headers:get("x-case")
  local f = CASES[case]
  if not f then error("no case " .. tostring(case)) end
  local v = f(headers, ctx)
  return { add = { {"x-result", tostring(v)} } }
end
"""


def line_of(source, marker, offset=0):
    """1-based line of the '-- @marker' line in source (plus the lines prepended)."""
    for i, l in enumerate(source.splitlines(), 1):
        if l.rstrip().endswith("-- @" + marker):
            return i + offset
    raise AssertionError(f"no -- @{marker} in the script")


def req(case, *extra):
    return h.headers_req("request_headers", [(":path", "/"), ("x-case", case), *extra])


def run(stub, case, *extra, timeout=h.RPC_TIMEOUT):
    """(code, details, x-result value, seconds)."""
    t0 = time.monotonic()
    responses, code, details = h.process(stub, [req(case, *extra)], timeout=timeout)
    took = time.monotonic() - t0
    value = None
    if responses and code == OK:
        sets = responses[0].request_headers.response.header_mutation.set_headers
        value = [s.header.raw_value.decode() for s in sets if s.header.key == "x-result"][0]
    return code, details, value, took


class Hostile:
    """A hostile script and what it was started with."""

    def __init__(self, factory, name="sandbox.lua", extra=(), budget_ms=BUDGET_MS):
        d = factory.tmpdir
        self.evil = d / "evil"
        self.evil.mkdir(exist_ok=True)
        # modules that exist only on a path the script sets: loading one sets EVIL_RAN
        for m in ("evilmod", "evilmod2"):
            (self.evil / f"{m}.lua").write_text("EVIL_RAN = true\nreturn {}\n")
        self.out = d / "written_by_script.txt"
        self.victim = d / "victim.txt"
        self.victim.write_text("keep me\n")
        self.config = d / "config.txt"
        self.config.write_text("config read at load time\n")
        self.config_lua = d / "config.lua"
        self.config_lua.write_text("return 42\n")
        self.prelude = "".join(f"{k} = {lua_str(v)}\n" for k, v in (
            ("OUT", self.out), ("EVIL", self.evil), ("VICTIM", self.victim),
            ("CONFIG", self.config), ("CONFIG_LUA", self.config_lua), ("LIBC", LIBC)))
        self.source = self.prelude + HOSTILE
        self.name = name
        self.path = factory.script(self.source, name)
        self.offset = self.prelude.count("\n")
        self.server = factory.start(self.path, "--threads", "1", "--script_timeout_ms",
                                    str(budget_ms), "--script_memory_mb", "32", *extra)
        self.stub = self.server.stub()

    def line(self, marker):
        return line_of(HOSTILE, marker, self.offset)


@pytest.fixture(scope="module")
def hostile(module_servers):
    return Hostile(module_servers)


@pytest.fixture
def disposable(servers):
    """Starts a Hostile on a server of its own that is SIGKILLed at teardown: an attack
    that succeeds wedges its worker for good, and must fail only its own test."""
    made = []

    def start(**kw):
        hs = Hostile(servers, **kw)
        made.append(hs)
        return hs
    yield start
    for hs in made:
        srv = hs.server
        if srv in servers.servers:
            servers.servers.remove(srv)
        if srv.alive():
            srv.proc.kill()
        srv.signal_and_wait(send=False)
        san = h.sanitizer_report(srv.log())
        assert not san, f"sanitizer report: {san}\n{srv.log()}"


def assert_serving(hs):
    assert hs.server.alive(), hs.server.log()
    code, details, value, _ = run(hs.stub, "counter", timeout=5)
    assert code == OK, (code, details)
    return int(value)


# --------------------------------------------------------------------------------------------
# Sandbox: refused functions
# --------------------------------------------------------------------------------------------

REFUSED = {
    "loadlib_debug": "package.loadlib",
    "loadlib_exit": "package.loadlib",
    "proc_mem": "io.open('/proc/self/mem', 'r+b')",
    "open_write": "io.open(",
    "open_append": "io.open(",
    "open_read": "io.open in a handler",
    "open_read_bin": "io.open in a handler",
    "io_lines": "io.lines in a handler",
    "io_output": "io.output",
    "io_write": "io.write",
    "io_read": "io.read",
    "io_input": "io.input",
    "io_popen": "io.popen",
    "io_tmpfile": "io.tmpfile",
    "os_remove": "os.remove",
    "os_rename": "os.rename",
    "os_tmpname": "os.tmpname",
    "os_setlocale": "os.setlocale",
    "os_exit": "os.exit",
    "os_execute": "os.execute",
    "dofile": "dofile in a handler",
    "loadfile": "loadfile in a handler",
    "load_mode_b": "load of a binary chunk",
    "require_os_exit": "os.exit",
    "loaded_io_popen": "io.popen",
    "g_os_exit": "os.exit",
    "coroutine_exit": "os.exit",
    "pcall_exit": "os.exit",
    "setmetatable_gc": "setmetatable with a __gc finalizer",
    "setmetatable_gc_false": "setmetatable with a __gc finalizer",
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_in_a_handler(hostile, case):
    before = assert_serving(hostile)
    code, details, value, took = run(hostile.stub, case, timeout=5)
    assert code == INTERNAL, (code, details, value)
    assert "sandbox" in details, details
    assert REFUSED[case] in details, details
    assert f"{hostile.name}:{hostile.line(case)}:" in details, details
    assert took < MARGIN_S
    # the server is alive, and the next stream is served by the same VM (a refusal is a
    # plain error, no rebuild)
    assert assert_serving(hostile) == before + 2
    assert not hostile.out.exists(), "the script wrote a file"
    assert hostile.victim.read_text() == "keep me\n"
    assert not Path(str(hostile.victim) + ".moved").exists()


@pytest.mark.parametrize("name,expect", [
    ("loadlib", "false"),           # pcall failed
    ("proc_mem", "false"),
    ("write", "false"),
    ("gc", "false"),
    ("exit", "false"),
    ("require_evil", "false"),
    ("read_config", "config read at load time\n"),   # reading at load time is allowed
])
def test_refused_at_the_top_level(hostile, name, expect):
    code, details, value, _ = run(hostile.stub, "top", ("x-arg", name))
    assert code == OK, details
    if expect == "false":
        assert value.startswith("false "), value          # the pcall caught an error
        if name != "require_evil":
            assert "sandbox" in value, value
    else:
        assert value == expect, value
    assert not hostile.out.exists()


def test_module_path_is_fixed_when_the_vm_is_built(hostile):
    # the top level set package.path to a folder with evilmod.lua: require did not load it
    code, _, value, _ = run(hostile.stub, "top", ("x-arg", "require_evil"))
    assert code == OK and value.startswith("false ") and "evilmod" in value, value
    # nor in a handler, nor with package.cpath
    code, details, value, _ = run(hostile.stub, "path_in_handler")
    assert (code, value) == (OK, "false nil"), (code, details, value)


@pytest.mark.parametrize("case,expect", [
    ("debug", "nil nil"),
    ("require_debug", "false"),
    ("require_luacallout_os", "false"),
])
def test_no_way_back_to_debug(hostile, case, expect):
    code, details, value, _ = run(hostile.stub, case)
    assert (code, value) == (OK, expect), (code, details, value)


@pytest.mark.parametrize("case", ["bytecode", "bytecode_strmeta", "bytecode_reader"])
def test_bytecode_refused(hostile, case):
    code, details, value, _ = run(hostile.stub, case)
    assert code == OK, details
    assert value.startswith("nil ") and "binary chunk" in value, value


def test_libc_exit_did_not_kill_the_server(hostile):
    run(hostile.stub, "loadlib_exit", timeout=5)
    time.sleep(0.1)
    assert hostile.server.alive(), hostile.server.log()
    assert_serving(hostile)


# --------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------

COOKIE = ("cookie", "=" * 60000)


def assert_stopped_within_budget(hs, case, *extra, allowed=(DEADLINE, INTERNAL)):
    code, details, value, took = run(hs.stub, case, *extra, timeout=MARGIN_S + 1)
    assert took < MARGIN_S, f"{case} took {took:.2f} s ({code}, {details})"
    assert code in allowed, (code, details, value)
    assert_serving(hs)
    return code, details, value


@pytest.mark.parametrize("case", [
    "find_rep",
    "cookie",
    "gmatch",
])
def test_pattern_matching_is_budgeted(disposable, case):
    hs = disposable()
    code, details, _ = assert_stopped_within_budget(hs, case, COOKIE, allowed=(DEADLINE,))
    assert "execution budget of 200 ms exceeded" in details and "string pattern" in details, details
    if case in ("find_rep", "cookie"):
        assert f"{hs.name}:{hs.line(case)}:" in details, details


def test_hostile_cookie_does_not_delay_an_unrelated_stream(killed_at_teardown):
    """Two workers, one fed the 60 KB cookie: streams on the other keep being served, and
    the hostile one ends within its budget."""
    srv = killed_at_teardown.start(HOSTILE_COOKIE_ONLY, "--threads", "2", "--script_timeout_ms", "200")
    stub = srv.stub()
    out = {}

    def hostile_call():
        t0 = time.monotonic()
        r = h.process(stub, [h.headers_req("request_headers", [("cookie", "=" * 60000)])],
                      timeout=MARGIN_S + 1)
        out["hostile"] = (r[1], time.monotonic() - t0)
    t = threading.Thread(target=hostile_call)
    t.start()
    worst = 0.0
    for _ in range(10):
        t0 = time.monotonic()
        _, code, details = h.process(stub, [h.headers_req("request_headers", [("cookie", "a=b;")])],
                                     timeout=MARGIN_S + 1)
        worst = max(worst, time.monotonic() - t0)
        assert code == OK, details
    t.join()
    assert out["hostile"][0] == DEADLINE and out["hostile"][1] < MARGIN_S, out
    assert worst < MARGIN_S, worst


HOSTILE_COOKIE_ONLY = r"""
function on_request_headers(headers)
  local c = headers:get("cookie") or ""
  local k = c:match("^%s*(.-)%s*=%s*(.-)%s*;%s*(.-)%s*=%s*(.-)%s*$")
  return { add = { {"x-k", tostring(k)} } }
end
"""


@pytest.mark.parametrize("case,allowed", [
    ("rep_empty", (OK,)),            # nothing to copy: "" at once
    ("rep_empty_sep", (OK,)),
    ("rep_sep", (INTERNAL, EXHAUSTED)),
    ("move", (INTERNAL,)),
    ("insert_len", (INTERNAL,)),
    ("remove_len", (INTERNAL,)),
    ("strmeta_rep", (OK,)),
    ("gc_loop", (DEADLINE,)),
    ("gc_step_loop", (DEADLINE,)),
    ("coroutine_loop", (DEADLINE,)),
    ("coroutine_wrap", (DEADLINE,)),
    ("coroutine_nested", (DEADLINE,)),
    ("pcall_error_loop", (DEADLINE,)),
    ("pcall_loop", (DEADLINE,)),
    ("close_loop", (DEADLINE,)),
])
def test_c_paths_are_bounded(hostile, case, allowed):
    code, details, value = assert_stopped_within_budget(hostile, case, allowed=allowed)
    if code == OK:
        assert value == "0", value
    if code == DEADLINE:
        assert "execution budget of 200 ms exceeded" in details, details


@pytest.mark.parametrize("case", [
    "concat_proxy",
    "sort_proxy",
    "xpcall_loop",
    "load_reader",
])
def test_c_function_metamethods_and_readers_are_bounded(disposable, case):
    hs = disposable()
    assert_stopped_within_budget(hs, case, allowed=(DEADLINE, INTERNAL, EXHAUSTED))


def test_memory_error_caught_then_plain_error_is_internal(hostile):
    before = assert_serving(hostile)
    code, details, value, took = run(hostile.stub, "mem_then_plain")
    assert code == INTERNAL, (code, details)
    assert details.startswith("plain after false"), details
    assert "memory limit" not in details
    # the VM was not rebuilt: the global counter went on counting
    assert assert_serving(hostile) == before + 2


# --------------------------------------------------------------------------------------------
# Finalizers: Lua runs __gc with hooks off, so none may run a script's loop
# --------------------------------------------------------------------------------------------

GC_CTX = r"""
n = 0
function on_request_headers(headers, ctx)
  n = n + 1
  local case = headers:get("x-case")
  if case == "arm" then
    local mt = getmetatable(ctx)
    if type(mt) ~= "table" then return { add = { {"x-result", "protected " .. type(mt)} } } end
    local ok = pcall(function() mt.__gc = function() while true do end end end)
    return { add = { {"x-result", "armed " .. tostring(ok)} } }
  elseif case == "collect" then
    collectgarbage() collectgarbage()
  end
  return { add = { {"x-result", tostring(n)} } }
end
"""

GC_FILE = r"""
KEEP = io.open(CONFIG)
local mt = getmetatable(KEEP)
ARMED = pcall(function() mt.__gc = function() while true do end end end)
function on_request_headers(headers, ctx)
  if headers:get("x-case") == "collect" then
    KEEP = nil
    collectgarbage() collectgarbage()
  end
  return { add = { {"x-result", tostring(ARMED)} } }
end
"""


def gc_server(servers, source):
    d = servers.tmpdir
    (d / "config.txt").write_text("x\n")
    src = f"CONFIG = {lua_str(d / 'config.txt')}\n" + source
    srv = servers.start(servers.script(src, "gc.lua"), "--threads", "1", "--script_timeout_ms",
                        str(BUDGET_MS))
    return srv, srv.stub()


@pytest.fixture
def killed_at_teardown(servers):
    yield servers
    for srv in list(servers.servers):
        servers.servers.remove(srv)
        if srv.alive():
            srv.proc.kill()
        srv.signal_and_wait(send=False)


def answer(stub, case, timeout=5):
    t0 = time.monotonic()
    responses, code, details = h.process(stub, [req(case)], timeout=timeout)
    value = None
    if code == OK:
        sets = responses[0].request_headers.response.header_mutation.set_headers
        value = [s.header.raw_value.decode() for s in sets if s.header.key == "x-result"][0]
    return code, details, value, time.monotonic() - t0


def test_gc_through_the_ctx_metatable(killed_at_teardown):
    srv, stub = gc_server(killed_at_teardown, GC_CTX)
    code, details, armed, _ = answer(stub, "arm")
    assert code == OK, details
    if armed.startswith("protected"):
        return
    for _ in range(3):                   # streams whose ctx now carries the finalizer
        assert answer(stub, "x")[0] == OK
    code, details, _, took = answer(stub, "collect", timeout=MARGIN_S + 1)
    assert took < MARGIN_S, f"collect took {took:.2f} s ({code} {details})"
    assert answer(stub, "x", timeout=3)[0] == OK


def test_gc_through_the_file_handle_metatable(killed_at_teardown):
    srv, stub = gc_server(killed_at_teardown, GC_FILE)
    code, details, armed, _ = answer(stub, "x")
    assert code == OK, details
    if armed == "false":
        return
    code, details, _, took = answer(stub, "collect", timeout=MARGIN_S + 1)
    assert took < MARGIN_S, f"collect took {took:.2f} s ({code} {details})"
    assert answer(stub, "x", timeout=3)[0] == OK


def test_looping_finalizer_from_the_issue_refused(servers):
    # the attack of the issue: a table with a looping __gc, then collectgarbage()
    src = r"""
function on_request_headers()
  local t = setmetatable({}, {__gc = function() while true do end end})
  t = nil
  collectgarbage()
  return {}
end
"""
    srv = servers.start(servers.script(src, "gcloop.lua"), "--threads", "1",
                        "--script_timeout_ms", str(BUDGET_MS))
    t0 = time.monotonic()
    _, code, details = h.process(srv.stub(), [req("x")], timeout=5)
    assert time.monotonic() - t0 < MARGIN_S
    assert code == INTERNAL and "sandbox" in details and "gcloop.lua:3:" in details, details
    _, code, _ = h.process(srv.stub(), [req("x")], timeout=5)
    assert code == INTERNAL   # served again, refused again


# --------------------------------------------------------------------------------------------
# --check and --unsafe_stdlib
# --------------------------------------------------------------------------------------------

def test_check_reports_os_exit_at_the_top_level(servers):
    script = servers.script("os.exit(1)\nfunction on_request_headers() end\n", "exits.lua")
    rc, out, err = servers.run_to_exit(["--check", script])
    assert rc == 1, (out, err)
    assert "exits.lua:1: os.exit (the sandbox refuses it" in err, err


def test_check_reports_a_caught_os_exit(servers):
    script = servers.script("pcall(os.exit, 1)\nfunction on_request_headers() end\n"
                            "function on_response_headers() os.execute('x') end\n", "caught.lua")
    rc, out, err = servers.run_to_exit(["--check", script])
    assert rc == 0, (out, err)
    assert "caught.lua: the sandbox refused, while the script loaded:\nos.exit\n" in out, out
    assert "caught.lua:1: warning: os.exit is refused by the sandbox" in out, out
    assert "caught.lua:3: warning: os.execute is refused by the sandbox" in out, out


def test_check_reports_a_misspelled_handler(servers):
    script = servers.script("function on_request_headers() end\n"
                            "function on_request_header() end\n", "typo.lua")
    rc, out, err = servers.run_to_exit(["--check", script])
    assert rc == 0, (out, err)
    assert "typo.lua:2: global function 'on_request_header' looks like a misspelling of the " \
           "handler 'on_request_headers'" in out, out


def test_unsafe_stdlib_gives_everything_back(servers):
    out = servers.tmpdir / "unsafe_out.txt"
    src = f"OUT = {lua_str(out)}\n" + r"""
function on_request_headers()
  local f = assert(io.open(OUT, "w")) f:write("written") f:close()
  local p = io.popen("echo popen") local s = p:read("l") p:close()
  return { add = { {"x-result", table.concat({type(debug), type(debug.sethook),
    type(package.loadlib), s, tostring(os.setlocale())}, " ")} } }
end
"""
    srv = servers.start(servers.script(src, "unsafe.lua"), "--unsafe_stdlib")
    code, details, value, _ = answer(srv.stub(), "x")
    assert (code, value) == (OK, "table function function popen C"), (code, details, value)
    assert out.read_text() == "written"


# --------------------------------------------------------------------------------------------
# Watchdog and shutdown
# --------------------------------------------------------------------------------------------

metrics_text = h.metrics_text
wait_for = h.wait_for


def metric(server, name):
    m = re.search(rf"^{name} (\d+)$", metrics_text(server), re.M)
    assert m, f"no {name} in /metrics"
    return int(m.group(1))


def script_sha(server):
    m = re.search(r'^luacallout_script_info\{sha256="([0-9a-f]{64})"', metrics_text(server), re.M)
    assert m, metrics_text(server)
    return m.group(1)


def health_status(server, path="/live"):
    try:
        with urllib.request.urlopen(f"http://{server.target('health')}{path}", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


STUCK = r"""
function on_request_headers(headers)
  -- the shell writes its pid, then becomes the sleep: the test ends it by that pid
  os.execute("echo $$ >> " .. PIDS .. "; exec sleep " .. headers:get("x-sleep"))
  return { add = { {"x-result", "back"} } }
end
"""


class StuckServer:
    def __init__(self, factory, threads, name):
        self.pids = factory.tmpdir / f"{name}.pids"
        src = f"PIDS = {lua_str(self.pids)}\n" + STUCK
        self.script = factory.script(src, f"{name}.lua")
        self.server = factory.start(self.script, "--unsafe_stdlib", "--threads", str(threads),
                                    "--script_timeout_ms", "100")

    def start_stream(self, seconds, own_connection=False):
        """Starts a stream whose handler sleeps `seconds` in C; returns its thread. Channels
        to one target share a connection unless own_connection, and grpc gives a connection's
        calls to one worker's queue first."""
        opts = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
        stub = h.pb_grpc.ExternalProcessorStub(self.server.channel(options=opts))
        t = threading.Thread(target=h.process, args=(stub, [h.headers_req(
            "request_headers", [("x-sleep", str(seconds))])]), kwargs={"timeout": seconds + 10},
            daemon=True)
        t.start()
        return t

    def sleeping(self):
        """How many handlers are in their sleep now (each wrote its pid)."""
        return len(self.pids.read_text().split()) if self.pids.exists() else 0

    def wedge_every_worker(self, threads, seconds):
        """New connections, a sleeping stream on each, until every worker sleeps."""
        for _ in range(24):
            if self.sleeping() >= threads:
                return
            self.start_stream(seconds, own_connection=True)
            deadline = time.monotonic() + 1
            n = self.sleeping()
            while self.sleeping() == n and time.monotonic() < deadline:
                time.sleep(0.02)
        assert self.sleeping() >= threads, f"only {self.sleeping()} of {threads} workers wedged"

    def handler_line(self):
        return line_of_text(self.script.read_text(), "function on_request_headers")

    def end_sleeps(self):
        """Ends the sleeps the script started, by the pids they wrote."""
        if not self.pids.exists():
            return
        for line in self.pids.read_text().split():
            try:
                os.kill(int(line), signal.SIGKILL)
            except (ProcessLookupError, ValueError, PermissionError):
                pass


def line_of_text(text, start):
    return next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith(start))


def test_watchdog_reports_a_stuck_handler(servers):
    ss = StuckServer(servers, 1, "wd")
    try:
        srv = ss.server
        t0 = time.monotonic()
        call = ss.start_stream(3)
        line = wait_for(lambda: re.search(r"watchdog: worker 0 has been in .*", srv.log()), 5,
                        "the watchdog line")
        took = time.monotonic() - t0
        assert took < 1.5 + 1.0, f"watchdog reported after {took:.2f} s"
        text = line.group(0)
        assert "on_request_headers (" in text and f"wd.lua:{ss.handler_line()})" in text, text
        assert re.search(r"\(stream \d+\)", text), text
        assert metric(srv, "luacallout_watchdog_stuck_total") == 1
        wait_for(lambda: "watchdog: worker 0 is serving again" in srv.log(), 5, "serving again")
        assert len(re.findall(r"watchdog: worker 0 has been in", srv.log())) == 1, srv.log()
        assert metric(srv, "luacallout_watchdog_stuck_total") == 1
        call.join(10)
    finally:
        ss.end_sleeps()


def test_liveness_fails_while_a_worker_is_stuck(servers):
    ss = StuckServer(servers, 1, "live")
    try:
        srv = ss.server
        assert health_status(srv) == 200
        ss.start_stream(3)
        wait_for(lambda: "watchdog: worker 0 has been in" in srv.log(), 5, "the watchdog line")
        assert health_status(srv) == 503
        assert health_status(srv, "/ready") == 503     # the only worker is stuck
        assert health_status(srv, "/") == 200          # any other path: the SDK's 200
        wait_for(lambda: "serving again" in srv.log(), 5, "serving again")
        assert health_status(srv) == 200
        assert health_status(srv, "/ready") == 200
    finally:
        ss.end_sleeps()


@pytest.mark.parametrize("threads", [1, 2])
def test_sigterm_with_every_worker_wedged(servers, threads):
    ss = StuckServer(servers, threads, f"wedged{threads}")
    srv = ss.server
    try:
        ss.wedge_every_worker(threads, 30)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            rc = srv.proc.wait(5 + 2 + 1)
        except Exception:
            rc = None
        took = time.monotonic() - t0
        assert rc is not None, f"no exit within 8 s of SIGTERM\n{srv.log()}"
        assert rc != 0, srv.log()
        assert took < 8, took
    finally:
        servers.servers.remove(srv)
        if srv.alive():
            srv.proc.kill()
        srv.signal_and_wait(send=False)
        ss.end_sleeps()


# --------------------------------------------------------------------------------------------
# Generations: what serves is what was loaded, byte for byte
# --------------------------------------------------------------------------------------------

GEN = r"""
local helper = require "helper"
n = 0
function on_request_headers(headers)
  n = n + 1
  if headers:get("x-case") == "loop" then while true do end end
  return { add = { {"x-result", "%(tag)s " .. helper.tag .. " " .. n} } }
end
"""


def sha_of(text):
    return hashlib.sha256(text.encode()).hexdigest()


def ask(stub):
    code, details, value, _ = answer(stub, "x")
    assert code == OK, details
    return value


def wait_log(srv, pattern, timeout=10):
    return wait_for(lambda: re.search(pattern, srv.log()), timeout, pattern)


def test_edit_without_sighup_never_serves(servers):
    d = servers.tmpdir
    (d / "helper.lua").write_text('return { tag = "H1" }\n')
    old = GEN % {"tag": "A"}
    script = servers.script(old, "gen.lua")
    srv = servers.start(script, "--threads", "1", "--script_timeout_ms", "100")
    stub = srv.stub()
    assert ask(stub) == "A H1 1"
    assert script_sha(srv) == sha_of(old)
    new = GEN % {"tag": "B"}
    script.write_text(new)
    (d / "helper.lua").write_text('return { tag = "H2" }\n')
    time.sleep(0.4)                         # a spare is built ahead on the control thread
    for i in range(1, 3):
        code, details, _, _ = answer(stub, "loop")
        assert code == DEADLINE, details
        # the next stream starts the swap to a fresh VM, and answers from it
        assert ask(stub) == "A H1 1"
        assert srv.log().count("new streams start on a fresh Lua VM of generation 1") == i, srv.log()
        time.sleep(0.3)
    assert script_sha(srv) == sha_of(old)
    assert metric(srv, "luacallout_reloads_total") == 0
    srv.proc.send_signal(signal.SIGHUP)
    wait_log(srv, r"generation 2 serves new streams")
    assert ask(stub) == "B H2 1"
    assert script_sha(srv) == sha_of(new)


SLOW_TOP = r"""
TAG1 = "%(tag)s"
local t0 = os.clock() while os.clock() - t0 < 0.08 do end   -- a slow top level
function on_request_headers()
  return { add = { {"x-result", TAG1 .. "/" .. TAG2} } }
end
TAG2 = "%(tag)s"
"""


def test_generation_is_one_script_on_every_worker(servers):
    """Saves race reloads on 2 workers: within one generation (bracketed by /metrics), every
    stream answers the same, and the answer is the script whose sha256 /metrics shows."""
    script = servers.script(SLOW_TOP % {"tag": "t0"}, "race.lua")
    srv = servers.start(script, "--threads", "2", "--script_timeout_ms", "500")
    stub = srv.stub()
    tag_of = {sha_of(SLOW_TOP % {"tag": "t0"}): "t0/t0"}
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            text = SLOW_TOP % {"tag": f"t{i}"}
            tag_of[sha_of(text)] = f"t{i}/t{i}"
            srv.proc.send_signal(signal.SIGHUP)
            time.sleep(0.05 + (i % 3) * 0.03)   # the reload is under way ...
            with open(script, "w") as f:       # ... when the file is rewritten, in two halves
                half = text.index('"x-result"')  # a torn file does not compile
                f.write(text[:half])
                f.flush()
                time.sleep(0.02)
                f.write(text[half:])
            time.sleep(0.05)

    def info():
        t = metrics_text(srv)
        sha = re.search(r'sha256="([0-9a-f]{64})"', t).group(1)
        gen = int(re.search(r"^luacallout_script_generation (\d+)$", t, re.M).group(1))
        # while workers take a generation, the old one may still serve new streams
        busy = re.search(r"^luacallout_reload_in_progress (\d+)$", t, re.M).group(1) != "0"
        return (gen, busy), sha

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    checked = 0
    try:
        end = time.monotonic() + 4
        while time.monotonic() < end:
            g1, sha1 = info()
            answers = h.run_in_threads(lambda: ask(stub), [()] * 6)
            g2, sha2 = info()
            if g1 != g2 or g1[1]:
                continue
            checked += 1
            assert sha1 == sha2
            assert sha1 in tag_of, "generation's sha256 is no script ever written"
            assert set(answers) == {tag_of[sha1]}, (g1, answers, tag_of[sha1])
    finally:
        stop.set()
        w.join(5)
    assert checked >= 3, checked
    assert metric(srv, "luacallout_reloads_total") >= 2


def test_reload_blocked_in_a_fifo_does_not_hold_up_shutdown(servers):
    d = servers.tmpdir
    fifo, arm = d / "fifo", d / "arm"
    os.mkfifo(fifo)
    src = (f"local arm = io.open({lua_str(arm)})\n"
           f"if arm then io.open({lua_str(fifo)}) end   -- blocks until a writer opens it\n"
           "function on_request_headers() return {} end\n")
    srv = servers.start(servers.script(src, "fifo.lua"), "--threads", "1")
    servers.servers.remove(srv)
    try:
        arm.write_text("1")
        srv.proc.send_signal(signal.SIGHUP)
        wait_log(srv, r"SIGHUP received")
        time.sleep(0.3)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(5 + 2 + 1)
        except Exception:
            pass
        assert not srv.alive(), f"still running {time.monotonic() - t0:.1f} s after SIGTERM"
    finally:
        if srv.alive():
            srv.proc.kill()
        srv.signal_and_wait(send=False)


# --- found by the docs-only attacker -------------------------------------------------------

SYSTEM_LFS = Path("/usr/lib/x86_64-linux-gnu/lua/5.4/lfs.so")


@pytest.mark.skipif(not SYSTEM_LFS.exists(), reason="Debian's lua-filesystem is not installed")
def test_system_c_modules_other_than_cjson_are_refused(servers):
    # lfs (installed with busted) would write the file system and chdir the whole process
    script = servers.script('local lfs = require "lfs"\nfunction on_request_headers() end\n',
                            "lfs_user.lua")
    rc, out, err = servers.run_to_exit(["--check", script])
    assert rc == 1, (out, err)
    assert "require 'lfs', a C module of the system's Lua folders" in err, err
    assert "the sandbox refuses it" in err, err
    ok = servers.script('local cjson = require "cjson"\n'
                        'function on_request_headers() return { add = {{"x-j", cjson.encode({1})}} } end\n',
                        "cjson_user.lua")
    rc, out, err = servers.run_to_exit(["--check", ok])
    assert rc == 0, (out, err)


def test_handler_returning_late_from_c_is_deadline_exceeded(servers):
    # C code the hook cannot interrupt (here os.execute, with --unsafe_stdlib) held the call
    # past its budget: the answer it then returns is not sent
    srv = servers.start(servers.script(
        'function on_request_headers() os.execute("sleep 0.6") return { add = {{"x-late", "1"}} } end\n',
        "late.lua"), "--unsafe_stdlib", "--script_timeout_ms", "100", "--threads", "1")
    responses, code, details = h.process(srv.stub(), [h.headers_req("request_headers", [])])
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
    assert responses == []
    assert "execution budget of 100 ms exceeded in C code that could not be interrupted" in details
    responses, code, _ = h.process(srv.stub(), [h.headers_req("request_headers", [])])
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED   # the VM serves on (no rebuild needed)


def test_reload_reads_the_path_resolved_at_start_up(servers, tmp_path):
    # a relative script path is made absolute at start-up: changing the working directory
    # later (which --unsafe_stdlib scripts can) cannot change the file a SIGHUP loads
    (tmp_path / "rel.lua").write_text('function on_request_headers() return { add = {{"x-who", "real"}} } end\n')
    other = tmp_path / "other"
    other.mkdir()
    (other / "rel.lua").write_text('function on_request_headers() return { add = {{"x-who", "impostor"}} } end\n')
    argv, addrs, enabled = servers.argv(Path("rel.lua"))
    assert "rel.lua" in argv
    srv = h.Server(argv, tmp_path / "rel.log", addrs, enabled, cwd=tmp_path)
    servers.servers.append(srv)
    srv.wait_ready()
    assert "loaded " + str(tmp_path / "rel.lua") in srv.log()
