-- json_bench.lua — what a JSON body costs a script: µs per decode and per encode of an
-- OpenAI-style chat request of about 1 KiB and one of about 64 KiB, callout.json (the
-- server's own code, through callout.native) side by side with lua-cjson in the same run.
--
--   lua5.4 tests/bench/json_bench.lua [BUILD_DIR]      (default build; scripts/bench runs it)
--
-- Single-threaded, CPU time (os.clock), the best of 5 rounds of ~0.2 s each: the figures
-- are per call on this machine, indicative; a loaded machine only makes them larger.

local build = arg[1] or "build"
package.cpath = build .. "/?.so;" .. package.cpath
local json = require("callout.native").json
local has_cjson, cjson = pcall(require, "cjson")

-- One request: a system prompt, a tool with its JSON schema, then turns until the text is
-- at least `size` bytes.
local function request(size)
  local doc = json.decode([[{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant. Answer briefly, in the language of the question, and cite sources when you can."}],"temperature":0.7,"top_p":1.0,"max_tokens":512,"stream":false,"seed":12345678901234567,"tools":[{"type":"function","function":{"name":"get_weather","description":"Current weather for a city","parameters":{"type":"object","properties":{"city":{"type":"string"},"unit":{"type":"string","enum":["celsius","fahrenheit"]}},"required":["city"]}}}],"tool_choice":"auto","metadata":{},"user":"user-1234"}]])
  local turn = 0
  while #json.encode(doc) < size do
    turn = turn + 1
    local role = turn % 2 == 1 and "user" or "assistant"
    local m = json.object()
    m.role = role
    m.content = ("Turn %d: what is the weather like in Zürich today, and should I take an umbrella? "):format(turn)
    doc.messages[#doc.messages + 1] = m
  end
  return json.encode(doc)
end

local function per_call_us(f, arg)
  local best = math.huge
  for _ = 1, 5 do
    local n, t0 = 0, os.clock()
    local t
    repeat
      for _ = 1, 50 do f(arg) end
      n = n + 50
      t = os.clock() - t0
    until t > 0.2
    best = math.min(best, t / n * 1e6)
  end
  return best
end

print(("%-22s %9s %12s %12s %12s %12s"):format("body", "bytes", "json decode", "json encode",
                                                 "cjson decode", "cjson encode"))
for _, size in ipairs { 1024, 65536 } do
  local text = request(size)
  local v = json.decode(text)
  assert(json.encode(v) == text, "round trip")
  local row = { json_decode = per_call_us(json.decode, text), json_encode = per_call_us(json.encode, v) }
  if has_cjson then
    local cv = cjson.decode(text)
    row.cjson_decode = per_call_us(cjson.decode, text)
    row.cjson_encode = per_call_us(cjson.encode, cv)
  end
  local function f(x) return x and ("%10.1f µs"):format(x) or "         -" end
  print(("%-22s %9d %12s %12s %12s %12s"):format(("chat request ~%d KiB"):format(size // 1024),
        #text, f(row.json_decode), f(row.json_encode), f(row.cjson_decode), f(row.cjson_encode)))
end
if not has_cjson then print("(lua-cjson not installed: its columns are empty)") end
