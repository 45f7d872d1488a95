"""Script safety: time and memory budgets, the sandbox, --check. A hostile or buggy handler
fails only its own stream, with a status that says why, and the next stream on the same
worker is served by a consistent VM."""

import threading

import grpc
import pytest

import harness as h

OK = grpc.StatusCode.OK

HOSTILE = r"""
shared = shared or { touched = 0 }

local function tag(v) return { add = { {"x-result", tostring(v)} } } end

function on_request_headers(headers, ctx)
  local case = headers:get("x-case")
  if case == "ok" then
    return tag("touched=" .. shared.touched)
  elseif case == "loop" then
    shared.touched = shared.touched + 1      -- half-way through an update ...
    while true do end                        -- ... when the budget stops it
  elseif case == "pcall_loop" then
    for _ = 1, 100 do pcall(function() while true do end end) end
    return tag("escaped")
  elseif case == "string_bomb" then
    return tag(#string.rep("x", 1 << 30))
  elseif case == "table_bomb" then
    local t = {}
    for i = 1, 1e9 do t[i] = ("y"):rep(65536) .. i end
  elseif case == "require_missing" then
    require "no_such_module_anywhere"
  elseif case == "error_table" then
    error({ code = 1 })
  elseif case == "os_exit" then
    os.exit(3)
  elseif case == "os_execute" then
    return tag(tostring(os.execute("true")))
  elseif case == "io_popen" then
    return tag(tostring(io.popen("true")))
  elseif case == "debug" then
    return tag(type(debug))
  elseif case == "bytecode" then
    local f, err = load(string.dump(function() return 1 end))
    return tag(tostring(f) .. " " .. tostring(err))
  elseif case == "bytecode_mode_b" then
    load("return 1", "x", "b")
  elseif case == "config" then
    return tag(CONFIG_LINE)
  end
end
"""


def req(case):
    return h.headers_req("request_headers", [(":path", "/"), ("x-case", case)])


def run(stub, case):
    responses, code, details = h.process(stub, [req(case)])
    value = None
    if responses and code == OK:
        sets = responses[0].request_headers.response.header_mutation.set_headers
        value = [s.header.raw_value.decode() for s in sets if s.header.key == "x-result"][0]
    return code, details, value


@pytest.fixture(scope="module")
def hostile(module_servers):
    config = module_servers.tmpdir / "config.txt"
    config.write_text("read at load time\n")
    src = (f'local f = assert(io.open("{config}"))\nCONFIG_LINE = f:read("l")\nf:close()\n'
           + HOSTILE)
    # one worker: the next stream runs on the very VM (or its rebuild) that just failed
    srv = module_servers.start(module_servers.script(src, "hostile.lua"), "--threads", "1",
                               "--script_timeout_ms", "100", "--script_memory_mb", "32")
    return srv


@pytest.fixture(scope="module")
def stub(hostile):
    return hostile.stub()


def test_healthy_stream_first(stub):
    assert run(stub, "ok") == (OK, "", "touched=0")


def test_runaway_loop_deadline_exceeded_with_line(stub):
    code, details, _ = run(stub, "loop")
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "hostile.lua:" in details and "execution budget of 100 ms exceeded" in details
    # the line named is the loop's
    line = int(details.split("hostile.lua:")[1].split(":")[0])
    src_lines = HOSTILE.splitlines()
    assert "while true do end" in src_lines[line - 3 - 1], (line, details)  # 3 config lines first


def test_next_stream_sees_no_half_updated_state(stub):
    # the loop above incremented shared.touched before it was stopped: the VM was rebuilt,
    # so the next stream sees the state of a freshly loaded script
    assert run(stub, "ok") == (OK, "", "touched=0")


def test_pcall_cannot_escape_the_budget(stub):
    code, details, _ = run(stub, "pcall_loop")
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
    assert run(stub, "ok")[0] == OK


@pytest.mark.parametrize("case", ["string_bomb", "table_bomb"])
def test_memory_bomb_resource_exhausted(stub, case):
    code, details, _ = run(stub, case)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "on_request_headers (" in details and "hostile.lua:" in details
    assert "exceeded the script memory limit (32 MB)" in details
    assert run(stub, "ok") == (OK, "", "touched=0")


def test_require_of_missing_module(stub):
    code, details, _ = run(stub, "require_missing")
    assert code == grpc.StatusCode.INTERNAL
    assert "module 'no_such_module_anywhere' not found" in details
    assert run(stub, "ok")[0] == OK


def test_error_with_a_table(stub):
    code, details, _ = run(stub, "error_table")
    assert code == grpc.StatusCode.INTERNAL
    assert "hostile.lua:" in details and "(error object is a table value)" in details
    assert run(stub, "ok")[0] == OK


@pytest.mark.parametrize("case,name", [("os_exit", "os.exit"), ("os_execute", "os.execute"),
                                       ("io_popen", "io.popen")])
def test_dangerous_functions_refused(hostile, stub, case, name):
    code, details, _ = run(stub, case)
    assert code == grpc.StatusCode.INTERNAL
    assert f"{name} (the sandbox refuses it" in details and "hostile.lua:" in details
    assert hostile.alive()
    assert run(stub, "ok")[0] == OK


def test_debug_library_absent(stub):
    assert run(stub, "debug") == (OK, "", "nil")


def test_binary_chunks_refused(stub):
    code, details, value = run(stub, "bytecode")
    assert code == OK
    assert value.startswith("nil ") and "binary chunk" in value
    code, details, _ = run(stub, "bytecode_mode_b")
    assert code == grpc.StatusCode.INTERNAL and "load of a binary chunk (the sandbox refuses" in details


def test_files_readable_at_load_time(stub):
    assert run(stub, "config") == (OK, "", "read at load time")


def test_hostile_stream_does_not_disturb_concurrent_streams(module_servers):
    src = HOSTILE.replace("shared = shared or { touched = 0 }",
                          "shared = shared or { touched = 0 }\nCONFIG_LINE = 'x'")
    srv = module_servers.start(module_servers.script(src, "concurrent.lua"), "--threads", "2",
                               "--script_timeout_ms", "300")
    stub = srv.stub()
    results = {}

    def hostile_call():
        results["loop"] = run(stub, "loop")[0]

    t = threading.Thread(target=hostile_call)
    t.start()
    oks = [run(stub, "ok") for _ in range(20)]
    t.join()
    assert results["loop"] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert all(code == OK and value.startswith("touched=") for code, _, value in oks), oks


def test_unsafe_stdlib_restores_everything(servers):
    srv = servers.start(servers.script(HOSTILE.replace("return tag(CONFIG_LINE)", "return tag(1)"),
                                       "unsafe.lua"), "--unsafe_stdlib")
    stub = srv.stub()
    assert run(stub, "debug") == (OK, "", "table")
    assert run(stub, "io_popen")[2].startswith("file (")   # io.popen("true") ran


def test_top_level_runaway_loop_fails_start_up(servers):
    script = servers.script("while true do end\nfunction on_request_headers() end\n", "spin.lua")
    rc, out, err = servers.run_to_exit(["--disable_tls", "--combined_health_check",
                                        "--plaintext_address", f"127.0.0.1:{h.free_port()}",
                                        script])
    assert rc != 0
    assert "spin.lua:1: execution budget of 200 ms exceeded" in err


def test_check_good_script_lists_handlers(servers):
    rc, out, err = servers.run_to_exit(["--check", h.SRC / "examples" / "basic.lua"])
    assert rc == 0, err
    assert out.strip().endswith("ok, handlers: on_request_headers on_response_headers "
                                "on_request_body on_response_body")


def test_check_broken_script(servers):
    script = servers.script("function on_request_headers(\n", "broken.lua")
    rc, out, err = servers.run_to_exit(["--check", script])
    assert rc == 1
    assert "broken.lua:2:" in err


def test_check_script_without_handlers(servers):
    script = servers.script("local function on_request_headers() end\n", "local_only.lua")
    rc, out, err = servers.run_to_exit(["--check", script])
    assert rc == 1
    assert "local_only.lua: defines no handler" in err
