-- replay_spec.lua — callout.testing.replay / replay_stream (docs/testing.md, "Replaying
-- recorded traffic"). Records are built here with exchange.record over the bytes a testing
-- stream exchanged (what record.c hands the same function), and one file was written by
-- the real server (spec/fixtures/replay/record.sh).
local testing = require "callout.testing"
local exchange = require "callout.exchange"
local json = require "callout.json"

local FIXTURE = "spec/fixtures/replay/recorded.jsonl"
local FIXTURE_SCRIPT = "spec/fixtures/replay/recorded.lua"

-- Runs msgs (exchange-format request messages) through script on one stream, as the
-- server would, and returns the record line's value, through JSON and back as in a file.
local function record_of(script, msgs, redact)
  local stream <close> = testing.stream(script)
  local reqs, resps, status, message = {}, {}, 0, ""
  for i, msg in ipairs(msgs) do
    reqs[i] = exchange.encode_request(msg)
    local r = stream:send(reqs[i])
    resps[i] = r.raw
    if not r.ok then
      status, message = r.status, r.message
      break
    end
  end
  local rec = exchange.record({ requests = reqs, responses = resps, status = status,
                                message = message, time = "2026-12-02T09:00:00.000Z",
                                script = "x.lua", generation = 1, sha256 = "0", stream = 7 },
                              redact)
  return json.decode(json.encode(rec))
end

local function write(path, lines)
  local f = assert(io.open(path, "wb"))
  for _, l in ipairs(lines) do f:write(type(l) == "string" and l or json.encode(l), "\n") end
  f:close()
end

local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  assert(os.execute("mkdir -p '" .. d .. "'"))
  return d
end

local SCRIPT = [[
function on_request_headers(headers, ctx)
  ctx.state.n = (ctx.state.n or 0) + 1
  ctx.state.path = headers:get(":path")
  if headers:get("x-fail") then error("asked to fail") end
  return { add = { {"x-a", "a"}, {"x-n", tostring(ctx.state.n)} } }
end
function on_request_body(body, ctx)
  ctx.state.n = ctx.state.n + 1
  return { body = body.body:upper() }
end
function on_response_headers(headers, ctx)
  ctx.state.n = ctx.state.n + 1
  return { add = { {"x-path-was", ctx.state.path}, {"x-n", tostring(ctx.state.n)} } }
end
]]

local GET = { request_headers = { headers = { [":method"] = "GET", [":path"] = "/a" } } }
local FAIL = { request_headers = { headers = { [":method"] = "GET", [":path"] = "/f", ["x-fail"] = "1" } } }
local BODY = { request_body = { body = "hi", end_of_stream = true } }
local RESP = { response_headers = { headers = { [":status"] = "200" } } }

describe("testing.replay_stream", function()
  local script = testing.load_string(SCRIPT)

  it("is green for the script that answered", function()
    local rec = record_of(script, { GET, BODY, RESP })
    assert.is_nil(testing.replay_stream(rec, script))
  end)

  it("names the request, the phase and the JSON path of a header value that differs", function()
    local rec = record_of(script, { GET, RESP })
    local changed = testing.load_string((SCRIPT:gsub('{"x%-a", "a"}', '{"x-a", "b"}')))
    assert.equal('request 1 (request_headers): responses[1].request_headers.response.' ..
                 'header_mutation.set_headers[1].header.raw_value: expected "a", got "b"',
                 testing.replay_stream(rec, changed))
  end)

  it("carries ctx.state across the phases: every request goes on one stream", function()
    -- x-n counts the stream's messages: on fresh streams each answer would say 1
    local rec = record_of(script, { GET, BODY, RESP })
    assert.equal("3", rec.responses[3][1].response_headers.response.header_mutation
                       .set_headers[2].header.raw_value)
    assert.is_nil(testing.replay_stream(rec, script))
    local forgetful = testing.load_string((SCRIPT:gsub("ctx%.state%.n = ctx%.state%.n %+ 1",
                                                       "ctx.state.n = 1")))
    assert.equal('request 3 (response_headers): responses[1].response_headers.response.' ..
                 'header_mutation.set_headers[2].header.raw_value: expected "3", got "1"',
                 testing.replay_stream(rec, forgetful))
  end)

  it("counts the answers: one fewer or one more is red", function()
    local rec = record_of(script, { GET, RESP })
    local more = json.decode(json.encode(rec))
    more.responses[2][2] = more.responses[2][1]
    local d = testing.replay_stream(more, script)
    assert.matches("^request 2 %(response_headers%): expected 2 answers, got 1; " ..
                   "responses%[2%]: expected {", d)
    local fewer = json.decode(json.encode(rec))
    fewer.responses[1] = {}
    d = testing.replay_stream(fewer, script)
    assert.matches("^request 1 %(request_headers%): expected 0 answers, got 1; " ..
                   "responses%[1%]: expected nothing, got {", d)
  end)

  it("reproduces a recorded INTERNAL: green when the script fails there again", function()
    local rec = record_of(script, { GET, FAIL })
    assert.equal(13, rec.status.code)
    assert.equal(0, #rec.responses[2])
    assert.is_nil(testing.replay_stream(rec, script))
  end)

  it("reproduces INVALID_ARGUMENT for a message that did not decode, sent again as its bytes", function()
    local stream <close> = testing.stream(script)
    local r = stream:send("\255\255\255")
    local rec = json.decode(json.encode(exchange.record(
      { requests = { "\255\255\255" }, responses = { {} }, status = r.status, message = r.message })))
    assert.equal(3, rec.status.code)
    assert.is_not_nil(rec.requests[1].raw_base64)
    assert.is_nil(testing.replay_stream(rec, script))
    rec.status.code = 13
    assert.matches("^request 1 %(raw%): expected the stream to fail with gRPC INTERNAL %(13%): " ..
                   ".*, it failed with gRPC INVALID_ARGUMENT %(3%)", testing.replay_stream(rec, script))
  end)

  it("is red when the recorded failure does not happen any more", function()
    local rec = record_of(script, { FAIL })
    local fixed = testing.load_string((SCRIPT:gsub('error%("asked to fail"%)', "")))
    assert.matches('^request 1 %(request_headers%): expected the stream to fail with gRPC ' ..
                   'INTERNAL %(13%): .*asked to fail; the script answered$',
                   testing.replay_stream(rec, fixed))
  end)

  it("is red when the script fails with another code, or where the record answered", function()
    local rec = record_of(script, { FAIL })
    local denies = testing.load_string((SCRIPT:gsub('error%("asked to fail"%)',
                                                    'callout.deny_callout("no")')))
    assert.equal('request 1 (request_headers): expected the stream to fail with gRPC ' ..
                 'INTERNAL (13): ' .. rec.status.message .. ', it failed with gRPC ' ..
                 'PERMISSION_DENIED (7): no', testing.replay_stream(rec, denies))
    local ok = record_of(script, { GET, RESP })
    local breaks = testing.load_string(SCRIPT .. "\nfunction on_response_headers() error('new bug') end")
    assert.matches("^request 2 %(response_headers%): the stream failed with gRPC INTERNAL " ..
                   "%(13%): .*new bug; recorded: 1 answer$", testing.replay_stream(ok, breaks))
  end)

  it("requires an answer where the client ended the stream (CANCELLED, idle timeout)", function()
    local rec = record_of(script, { GET })
    rec.status = { code = 1, name = "CANCELLED", message = "" }
    assert.is_nil(testing.replay_stream(rec, script))
    -- the client cancelled right after its last message: no answer recorded, and the
    -- script must not fail there
    local cancelled = record_of(script, { GET })
    cancelled.responses[1], cancelled.status = {}, { code = 1, name = "CANCELLED", message = "" }
    assert.matches("^request 1 %(request_headers%): expected 0 answers, got 1",
                   testing.replay_stream(cancelled, script))
    local idle = record_of(script, { { request_headers = GET.request_headers,
                                       observability_mode = true } })
    assert.equal(0, #idle.responses[1])
    idle.status = { code = 4, name = "DEADLINE_EXCEEDED", message = "no message for 5000 ms" }
    assert.is_nil(testing.replay_stream(idle, script))
  end)

  it("does not compare a status the transport caused after the answers", function()
    -- RESOURCE_EXHAUSTED: the client did not read its answers; the script is not at fault
    local rec = record_of(script, { GET })
    rec.status = { code = 8, name = "RESOURCE_EXHAUSTED", message = "answers not read by clients" }
    assert.is_nil(testing.replay_stream(rec, script))
  end)

  it("compares the headers of ignore_headers by presence, not value", function()
    local rec = record_of(script, { GET })
    rec.responses[1][1].request_headers.response.header_mutation.set_headers[2].header.raw_value = "9"
    assert.matches('set_headers%[2%]%.header%.raw_value: expected "9", got "1"$',
                   testing.replay_stream(rec, script))
    assert.is_nil(testing.replay_stream(rec, script, { ignore_headers = { "X-N" } }))
    -- still there, at its place
    local gone = testing.load_string((SCRIPT:gsub(', {"x%-n", tostring%(ctx%.state%.n%)}', "", 1)))
    assert.matches("^request 1 %(request_headers%): responses%[1%].request_headers.response." ..
                   "header_mutation.set_headers%[2%]: expected ",
                   testing.replay_stream(rec, gone, { ignore_headers = { "x-n" } }))
  end)

  it("does not compare values the record redacted; a script echoing one needs ignore_headers", function()
    local echo = testing.load_string([[
      function on_request_headers(headers)
        return { add = { {"set-cookie", "sid=1"}, {"x-echo", headers:get("authorization")} } }
      end]])
    local msg = { request_headers = { headers = { [":path"] = "/", authorization = "Bearer s3cret" } } }
    local rec = record_of(echo, { msg }, { authorization = true, ["set-cookie"] = true })
    local set = rec.responses[1][1].request_headers.response.header_mutation.set_headers
    assert.equal("[redacted]", set[1].header.raw_value)       -- set-cookie, by name
    assert.equal("Bearer s3cret", set[2].header.raw_value)    -- x-echo is not on the list
    assert.equal("[redacted]", rec.requests[1].request_headers.headers[2][2])
    -- the script sees "[redacted]" and echoes it
    assert.equal('request 1 (request_headers): responses[1].request_headers.response.' ..
                 'header_mutation.set_headers[2].header.raw_value: expected "Bearer s3cret", ' ..
                 'got "[redacted]"', testing.replay_stream(rec, echo))
    assert.is_nil(testing.replay_stream(rec, echo, { ignore_headers = { "x-echo" } }))
  end)

  it("refuses records it cannot replay", function()
    local rec = record_of(script, { GET })
    local v2 = json.decode(json.encode(rec)); v2.version = 2
    assert.has_error(function() testing.replay_stream(v2, script) end,
                     "unknown record version 2 (this kit reads version 1)")
    local none = json.decode(json.encode(rec)); none.responses = nil
    assert.has_error(function() testing.replay_stream(none, script) end,
                     "the record has no 'responses' list")
    local short = json.decode(json.encode(rec)); short.responses = json.array()
    assert.has_error(function() testing.replay_stream(short, script) end,
                     "the record has 1 request but 0 lists of answers: every request needs its list of answers")
    local empty = json.decode(json.encode(rec)); empty.requests, empty.responses = json.array(), json.array()
    assert.has_error(function() testing.replay_stream(empty, script) end,
                     "the record holds no request: nothing to replay (leave it out with opts.filter)")
    assert.has_error(function() testing.replay_stream(rec, script, { ignore = {} }) end)
  end)
end)

describe("testing.replay_all (and replay outside busted's cases)", function()
  local script = testing.load_string(SCRIPT)
  local dir = tmpdir()

  it("returns true, no failures and the number of cases when every stream answers the same", function()
    local path = dir .. "/ok.jsonl"
    write(path, { record_of(script, { GET, RESP }), record_of(script, { GET, FAIL }) })
    local ok, failures, n = testing.replay_all(path, script)
    assert.same({ true, {}, 2 }, { ok, failures, n })
  end)

  it("names file:line of each stream that differs", function()
    local path = dir .. "/red.jsonl"
    local good = record_of(script, { GET })
    local bad = json.decode(json.encode(good))
    bad.responses[1][1].request_headers.response.header_mutation.set_headers[1].header.raw_value = "z"
    write(path, { good, "", bad })
    local ok, failures = testing.replay_all(path, script)
    assert.is_false(ok)
    assert.same({ path .. ':3: request 1 (request_headers): responses[1].request_headers.' ..
                  'response.header_mutation.set_headers[1].header.raw_value: expected "z", got "a"' },
                failures)
  end)

  it("fails each line it cannot read, naming file:line, and replays the others", function()
    local path = dir .. "/bad.jsonl"
    local good = record_of(script, { GET })
    local v9 = json.decode(json.encode(good)); v9.version = 9
    local noresp = json.decode(json.encode(good)); noresp.responses = nil
    write(path, { good, "{not json", v9, noresp, '{"request_headers": {}}', good })
    local ok, failures, n = testing.replay_all(path, script)
    assert.is_false(ok)
    assert.equal(6, n)
    assert.same({
      path .. ":2:2: not a JSON line: expected a string key",
      path .. ":3: unknown record version 9 (this kit reads version 1)",
      path .. ":4: the record has no 'responses' list",
      path .. ":5: not a record line (no 'requests')",
    }, (function()
      -- the JSON decoder's wording is its own: keep only that it names line and column
      failures[1] = failures[1]:gsub("not a JSON line: .*", "not a JSON line: expected a string key")
      return failures
    end)())
  end)

  it("is never green by accident: a missing file, an empty file, nothing left by filter", function()
    local missing = dir .. "/nope.jsonl"
    assert.same({ false, { missing .. ": no such file or folder" }, 1 },
                { testing.replay_all(missing, script) })
    local empty = dir .. "/empty.jsonl"
    write(empty, {})
    assert.same({ false, { empty .. ": no streams to replay" }, 1 }, { testing.replay_all(empty, script) })
    local path = dir .. "/some.jsonl"
    write(path, { record_of(script, { GET }) })
    assert.same({ false, { path .. ": no streams to replay (none passed opts.filter)" }, 1 },
                { testing.replay_all(path, script, { filter = function() return false end }) })
    local nofiles = tmpdir()
    assert.same({ false, { nofiles .. ": no streams to replay (no *.jsonl file in the folder)" }, 1 },
                { testing.replay_all(nofiles, script) })
  end)

  it("keeps only the records opts.filter accepts", function()
    local path = dir .. "/filter.jsonl"
    local a, b = record_of(script, { GET }), record_of(script, { FAIL })
    local broken = json.decode(json.encode(b))
    broken.responses[1] = { a.responses[1][1] }   -- red if replayed
    write(path, { a, broken, a })
    assert.is_false((testing.replay_all(path, script)))
    local seen = {}
    local ok, failures, n = testing.replay_all(path, script, { filter = function(rec)
      seen[#seen + 1] = rec.requests[1].request_headers.headers[2][2]
      return rec.status.code == 0
    end })
    assert.same({ true, {}, 2 }, { ok, failures, n })
    assert.same({ "/a", "/f", "/a" }, seen)
  end)

  it("reads every *.jsonl of a folder, in name order", function()
    local d = tmpdir()
    local rec = record_of(script, { GET })
    local bad = json.decode(json.encode(rec)); bad.version = 5
    write(d .. "/b.jsonl", { bad })
    write(d .. "/a.jsonl", { rec, bad })
    write(d .. "/notes.txt", { "not a record" })
    local ok, failures, n = testing.replay_all(d .. "/", script)
    assert.is_false(ok)
    assert.equal(3, n)
    assert.same({ d .. "/a.jsonl:2: unknown record version 5 (this kit reads version 1)",
                  d .. "/b.jsonl:1: unknown record version 5 (this kit reads version 1)" }, failures)
  end)

  it("takes a script's path, and refuses what is not a script", function()
    local path = dir .. "/path.jsonl"
    write(path, { record_of(testing.load(FIXTURE_SCRIPT),
                            { { request_headers = { headers = { [":path"] = "/" } } } }) })
    assert.same({ true, {}, 1 }, { testing.replay_all(path, FIXTURE_SCRIPT) })
    assert.has_error(function() testing.replay_all(path, {}) end,
                     "testing.replay_all: expects a script (testing.load) or its path, got table")
    assert.has_error(function() testing.replay_all(path, script, { nope = 1 }) end,
                     "testing.replay_all: unknown option 'nope'")
    assert.has_error(function() testing.replay(path, script, { nope = 1 }) end,
                     "testing.replay: unknown option 'nope'")
  end)

  it("testing.replay inside a running case fails the case when a stream differs", function()
    -- a result nobody reads would leave the case green
    local path = dir .. "/inside.jsonl"
    local rec = record_of(script, { GET })
    write(path, { rec })
    assert.equal(1, testing.replay(path, script))
    local bad = json.decode(json.encode(rec))
    bad.responses[1][1].request_headers.response.header_mutation.set_headers[1].header.raw_value = "z"
    write(path, { rec, bad })
    local ok, err = pcall(testing.replay, path, script)
    assert.is_false(ok)
    assert.matches('testing.replay: 1 of 2 streams differ:\n' .. path .. ':2: request 1', tostring(err), 1, true)
    assert.has_error(function() testing.replay(dir .. "/nope.jsonl", script) end)
  end)

  it("testing.replay_stream takes a script's path too", function()
    local rec = record_of(testing.load(FIXTURE_SCRIPT), { { request_headers = { headers = { [":path"] = "/" } } } })
    assert.is_nil(testing.replay_stream(rec, FIXTURE_SCRIPT))
  end)
end)

describe("testing.replay in plain Lua (no busted, no LuaFileSystem)", function()
  it("runs the cases and returns ok, failures, n", function()
    local d = tmpdir()
    local script = testing.load_string(SCRIPT)
    local rec = record_of(script, { GET, RESP })
    local bad = json.decode(json.encode(rec)); bad.version = 3
    write(d .. "/one.jsonl", { rec, rec })
    write(d .. "/two.jsonl", { bad })
    write(d .. "/empty.jsonl", {})
    local sf = assert(io.open(d .. "/s.lua", "wb")); sf:write(SCRIPT); sf:close()
    local prog = d .. "/run.lua"
    local pf = assert(io.open(prog, "wb"))
    pf:write(string.format([[
      package.path, package.cpath = %q, %q
      package.loaded.lfs, package.preload.lfs = nil, function() error("no lfs here") end
      local testing = require "callout.testing"
      local ok, failures, n = testing.replay(%q, %q)
      print(ok, n, #failures)
      for _, f in ipairs(failures) do print(f) end
      print(select(2, testing.replay(%q, %q))[1])
      print(select(2, testing.replay(%q, %q))[1])
    ]], package.path, package.cpath, d .. "/", d .. "/s.lua", d .. "/none", d .. "/s.lua",
       d .. "/empty.jsonl", d .. "/s.lua"))
    pf:close()
    local p = assert(io.popen(string.format("lua5.4 %q 2>&1", prog)))
    local out = p:read("a")
    p:close()
    assert.equal("false\t3\t1\n" .. d .. "/two.jsonl:1: unknown record version 3 " ..
                 "(this kit reads version 1)\n" .. d .. "/none: no such file or folder\n" ..
                 d .. "/empty.jsonl: no streams to replay\n", out)
  end)
end)

describe("the record file the real server wrote (spec/fixtures/replay)", function()
  local script = testing.load(FIXTURE_SCRIPT)

  it("replays green, once x-auth-echo (which echoes a redacted header) is ignored", function()
    assert.same({ true, {}, 4 },
                { testing.replay_all(FIXTURE, script, { ignore_headers = { "x-auth-echo" } }) })
  end)

  it("is red at the echo without ignore_headers", function()
    assert.same({ false, { FIXTURE .. ':1: request 1 (request_headers): responses[1].' ..
                           'request_headers.response.header_mutation.set_headers[2].header.' ..
                           'raw_value: expected "Bearer test-token", got "[redacted]"' }, 4 },
                { testing.replay_all(FIXTURE, script) })
  end)

  it("is red on a script change that alters one header, and where a failure is gone", function()
    local f = assert(io.open(FIXTURE_SCRIPT, "rb"))
    local source = f:read("a")
    f:close()
    local changed = testing.load_string((source:gsub('"x%-path%-was", ctx%.state%.path',
                                                     '"x-path-was", ctx.state.path .. "/"')))
    local ok, failures = testing.replay_all(FIXTURE, changed, { ignore_headers = { "x-auth-echo" } })
    assert.is_false(ok)
    assert.same({
      FIXTURE .. ':1: request 2 (response_headers): responses[1].response_headers.response.' ..
        'header_mutation.set_headers[1].header.raw_value: expected "/a", got "/a/"',
      FIXTURE .. ':2: request 3 (response_headers): responses[1].response_headers.response.' ..
        'header_mutation.set_headers[1].header.raw_value: expected "/upload", got "/upload/"',
    }, failures)
    local fixed = testing.load_string((source:gsub('if headers:get%("x%-fail"%)[^\n]*', "")))
    ok, failures = testing.replay_all(FIXTURE, fixed, { ignore_headers = { "x-auth-echo" } })
    assert.same({ FIXTURE .. ":3: request 1 (request_headers): expected the stream to fail with " ..
                  "gRPC INTERNAL (13): spec/fixtures/replay/recorded.lua:7: asked to fail; " ..
                  "the script answered" }, failures)
  end)
end)

-- A folder holding s.lua (SCRIPT) and r.jsonl: a good record of GET, then the given lines,
-- where "bad" is that record with its header value changed to "z".
local function child_dir(lines)
  local d = tmpdir()
  local rec = record_of(testing.load_string(SCRIPT), { GET })
  local bad = json.decode(json.encode(rec))
  bad.responses[1][1].request_headers.response.header_mutation.set_headers[1].header.raw_value = "z"
  local out = { rec }
  for _, l in ipairs(lines) do out[#out + 1] = l == "bad" and bad or l end
  write(d .. "/r.jsonl", out)
  local sf = assert(io.open(d .. "/s.lua", "wb")); sf:write(SCRIPT); sf:close()
  return d, d .. "/r.jsonl", d .. "/s.lua"
end

-- busted run in a child process on a spec file of `source` -> its output
local function child_busted(d, name, source)
  local spec = d .. "/" .. name
  local cf = assert(io.open(spec, "wb")); cf:write(source); cf:close()
  local cmd = string.format("cd %q && LUA_PATH=%q LUA_CPATH=%q busted --output=plainTerminal " ..
                            "--lpath='' --cpath='' %q 2>&1", d, package.path, package.cpath, spec)
  local p = assert(io.popen(cmd))
  local out = p:read("a")
  p:close()
  return out, spec
end

describe("testing.replay inside busted", function()
  -- at describe level: one `it` per line of the file, named after it
  local n = testing.replay(FIXTURE, FIXTURE_SCRIPT, { ignore_headers = { "x-auth-echo" } })

  it("defined one case per record line", function()
    assert.equal(4, n)
  end)

  it("defines its cases from a describe block that names no global (the docs' example)", function()
    -- such a block has no _ENV: a replay that ran its cases in place there was green with
    -- no case at all
    local d, rec, script = child_dir({ "bad" })
    local out = child_busted(d, "only_spec.lua", string.format([[
      local testing = require "callout.testing"
      describe("only replay", function()
        testing.replay(%q, %q)
      end)
    ]], rec, script))
    assert.matches("1 success / 1 failure / 0 errors", out, 1, true)
  end)

  it("turns differences and unreadable lines into failing cases, not a crashed suite", function()
    local d, rec, script_path = child_dir({ "garbage", "bad" })
    local out, spec = child_busted(d, "child_spec.lua", string.format([[
      local testing = require "callout.testing"
      describe("child", function()
        local n = testing.replay(%q, %q)
        it("counted", function() assert.equal(3, n) end)
        testing.replay(%q, %q, {
          filter = function(rec) return rec.responses[1][1].request_headers.response
                                          .header_mutation.set_headers[1].header.raw_value == "z" end,
          name = function(rec) return "named " .. rec.stream end })
      end)
      testing.replay(%q, %q)
    ]], rec, script_path, rec, script_path, d .. "/missing.jsonl", script_path))
    assert.matches("2 successes / 5 failures / 0 errors", out, 1, true)   -- line 2 twice
    assert.matches("Failure -> " .. d .. "/r.jsonl @ 3\nchild named 7\n", out, 1, true)
    -- named after the record, reported at its line
    assert.matches("Failure -> " .. d .. "/r.jsonl @ 3\nchild " .. d .. "/r.jsonl:3 stream 7 GET /a\n",
                   out, 1, true)
    assert.matches(d .. "/r.jsonl:2:1: not a JSON line", out, 1, true)
    assert.matches(d .. '/r.jsonl:3: request 1 (request_headers): responses[1].request_headers.' ..
                   'response.header_mutation.set_headers[1].header.raw_value: expected "z", got "a"',
                   out, 1, true)
    -- a file that cannot be read is one failing case, at the spec's line
    assert.matches("Failure -> " .. spec .. " @ 10\n" .. d .. "/missing.jsonl\n" .. spec ..
                   ":10: " .. d .. "/missing.jsonl: no such file or folder", out, 1, true)
  end)
end)
