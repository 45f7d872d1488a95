-- The sandbox as a script sees it (issue 10): what is refused, and how the stream fails.
-- The e2e twin, against the real server, is tests/e2e/test_sandbox.py.

local testing = require "callout.testing"

local SCRIPT = [[
local CASES = {}
CASES.loadlib = function() local f = package.loadlib("liblua5.4.so.0", "luaopen_debug") return f end
CASES.open_write = function() local f = io.open("/tmp/luacallout-sandbox-spec", "w") return f end
CASES.proc_mem = function() local f = io.open("/proc/self/mem", "r+b") return f end
CASES.open_read = function() local f = io.open("/etc/hostname") return f end
CASES.popen = function() local f = io.popen("id") return f end
CASES.exit = function() local r = os.exit(1) return r end
CASES.execute = function() local r = os.execute("true") return r end
CASES.remove = function() local r = os.remove("/tmp/x") return r end
CASES.setlocale = function() local r = os.setlocale("C") return r end
CASES.gc = function() local t = setmetatable({}, {__gc = function() end}) return t end
CASES.load_b = function() local f = load("return 1", "x", "b") return f end
CASES.plain_after_memory = function()
  pcall(function() local t = {} for i = 1, 1e9 do t[i] = ("y"):rep(65536) .. i end end)
  error("plain", 0)
end
function on_request_headers(headers)
  local case = headers:get("x-case")
  if CASES[case] then
    local v = CASES[case]()
    return { add = { {"x-result", tostring(v)} } }
  end
  local d = string.dump(function() return 1 end)
  local f, e = load(d)
  return { add = {
    {"x-debug", type(debug)},
    {"x-bytecode", tostring(f) .. " " .. tostring(e)},
    {"x-rep", tostring(#string.rep("", 2^40))},
    {"x-path", tostring(pcall(function() package.path = "/tmp/?.lua" return require "nowhere_mod" end))},
  } }
end
]]

-- the line of SCRIPT that defines CASES.<case>
local function line_of(case)
  local n = 0
  for l in SCRIPT:gmatch("([^\n]*)\n") do
    n = n + 1
    if l:find("CASES." .. case .. " =", 1, true) then return n end
  end
end

describe("the sandbox", function()
  local script = testing.load_string(SCRIPT)

  local refused = {
    loadlib = "package.loadlib", open_write = "files can be opened for reading only",
    proc_mem = "io.open('/proc/self/mem', 'r+b')", open_read = "io.open in a handler",
    popen = "io.popen", exit = "os.exit", execute = "os.execute", remove = "os.remove",
    setlocale = "os.setlocale", gc = "setmetatable with a __gc finalizer",
    load_b = "load of a binary chunk",
  }
  for case, what in pairs(refused) do
    it("refuses " .. case .. " with INTERNAL, naming the sandbox and the line", function()
      local r = testing.call(script, testing.request_headers { ["x-case"] = case })
      assert.is_false(r.ok)
      assert.equal("INTERNAL", r.status_name)
      assert.truthy(r.message:find(what, 1, true), r.message)
      assert.truthy(r.message:find("the sandbox refuses it", 1, true), r.message)
      assert.equal(line_of(case), tonumber(r.message:match("^[^:]+:(%d+): ")), r.message)
    end)
  end

  it("leaves out debug, refuses bytecode, bounds string.rep, fixes the module path", function()
    local resp = testing.run(script, testing.request_headers { [":path"] = "/" })
    assert.header_set(resp, "x-debug", "nil")
    assert.header_set(resp, "x-bytecode", "nil attempt to load a binary chunk (mode is 't')")
    assert.header_set(resp, "x-rep", "0")
    assert.header_set(resp, "x-path", "false")
  end)

  it("reports a plain error after a caught memory error as INTERNAL, not RESOURCE_EXHAUSTED", function()
    local r = testing.call(script, testing.request_headers { ["x-case"] = "plain_after_memory" })
    assert.equal("INTERNAL", r.status_name)
    assert.equal("plain", r.message)
  end)
end)
