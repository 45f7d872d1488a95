-- callout.json (src/json.c): the round-trip corpus, the markers, key order, numbers, errors
-- with positions, limits. The module is the server's own code, reached through
-- callout.native (the same build); the last block checks what a script sees in the VM.

local testing = require "callout.testing"
local native = require "callout.native"
local json = native.json

-- Canonical documents: decode then encode gives the same bytes. Canonical means compact
-- (no blanks), minimal escapes (only '"', '\\' and control characters; '/' and U+2028 as
-- they are; short forms \b \f \n \r \t, else \u00XX lower-case), integers in decimal,
-- floats in their shortest %g form with an exponent without leading zeros and a ".0" when
-- the digits alone would read as an integer.
local CORPUS = {
  -- key order, empty containers, nesting
  '{"z":1,"a":2,"m":3}',
  '{"tools":[],"seed":12345678901234567,"opts":{}}',
  '[[],{},[[]],[{}],{"a":[]},{"a":{}}]',
  '{"a":{"b":{"c":{"d":[[[{}]]]}}}}',
  '[]', '{}', 'null', 'true', 'false', '0', '""',
  '[null,true,false]',
  '{"":"empty key","a":null}',
  -- integers
  '[9223372036854775807,-9223372036854775808,0,-1,12345678901234567,4294967296]',
  -- floats
  '[0.1,1e+300,-0.0,5e-324,1.5,1.0,-2.5,1e-7,0.000001,1.7976931348623157e+308,2.2250738585072014e-308]',
  '[0.30000000000000004,100.0,10000000000000000.0,1e+21,123456789012345.6,3.141592653589793]',
  -- strings and escapes
  '"a\\u0000b"',
  '"\\"\\\\\\b\\f\\n\\r\\t\\u0001\\u001f"',
  '"/ slash, \u{2028} and \u{2029} as they are"',
  '"\u{7f} DEL"',
  '"😀 a surrogate pair decoded, written as UTF-8"',
  '"ünïcödé, 中文, עברית"',
  '{"ключ":"значение","😀":[1]}',
  -- an OpenAI-style request
  '{"model":"gpt-4o","messages":[{"role":"system","content":"Be brief."},{"role":"user",' ..
    '"content":"Hi"}],"temperature":0.7,"max_tokens":256,"stream":false,"tools":[],' ..
    '"metadata":{},"seed":12345678901234567,"logit_bias":{"50256":-100}}',
}

-- Documents that decode to the same value as a canonical one, and what encode writes.
local NORMALISED = {
  { ' { "a" : [ 1 , 2 ] } ', '{"a":[1,2]}' },
  { '"\\u00e9\\/\\ud83d\\ude00"', '"é/😀"' },
  { '"\\u2028"', '"\u{2028}"' },
  { '[1E300,1e300,1.0e0,0.5e1,-0]', '[1e+300,1e+300,1.0,5.0,0]' },
  { '[1e-07,100e-2,1e2,1E16,1.5e-6]', '[1e-7,1.0,100.0,10000000000000000.0,0.0000015]' },
  -- what lua-api.md lists
  { '[1E2,1e0,1e3,0.10,1.50,1e-6,1e21,1.7976931348623157e308]',
    '[100.0,1.0,1000.0,0.1,1.5,0.000001,1e+21,1.7976931348623157e+308]' },
  { '[-0,-0e5,9007199254740993.0,9007199254740993,2e-324,1e-400]',
    '[0,-0.0,9007199254740992.0,9007199254740993,0.0,0.0]' },
  { '"\\u00e9\\/\\ud83d\\ude00\\u001F"', '"é/😀\\u001f"' },
}

-- The body handler, sent `body`, was stopped by the time budget at the script's `line`
-- (not after it, in C code that could not be interrupted).
local function assert_stopped_at(script, body, line)
  local r = testing.call(script, testing.request_body(body))
  assert.equal("DEADLINE_EXCEEDED", r.status_name, body .. ": " .. tostring(r.message))
  assert.matches("execution budget of 200 ms exceeded", r.message, 1, true)
  assert.is_nil(r.message:find("could not be interrupted", 1, true), r.message)
  assert.equal(line, tonumber(r.message:match("^[^:]+:(%d+): ")), r.message)
end

describe("callout.json", function()
  it("round-trips the corpus byte for byte", function()
    for _, doc in ipairs(CORPUS) do
      assert.equal(doc, json.encode(json.decode(doc)))
    end
  end)

  it("writes equivalent documents in the canonical form", function()
    for _, case in ipairs(NORMALISED) do
      assert.equal(case[2], json.encode(json.decode(case[1])), case[1])
    end
  end)

  it("round-trips nesting up to the limit and refuses one more, with its position", function()
    local deep = string.rep("[", 256) .. string.rep("]", 256)
    assert.equal(deep, json.encode(json.decode(deep)))
    local deeper = '{"a":' .. string.rep("[", 256) .. string.rep("]", 256) .. "}"
    assert.error_matches(function() json.decode(deeper) end,
      "callout.json: nested deeper than 256 at line 1, column 261", 1, true)
    local t = {}
    for _ = 1, 256 do t = { t } end
    assert.error_matches(function() json.encode(t) end, "nested deeper than 256", 1, true)
  end)

  it("keeps integers exact to 64 bits and floats as floats", function()
    local v = json.decode('[9223372036854775807,-9223372036854775808,1.0,12345678901234567]')
    assert.equal(math.maxinteger, v[1])
    assert.equal(math.mininteger, v[2])
    assert.equal("float", math.type(v[3]))
    assert.equal(12345678901234567, v[4])
    assert.equal("integer", math.type(v[4]))
    assert.equal("1.0", json.encode(1.0))
    assert.equal("3", json.encode(3))
    assert.equal("-0.0", json.encode(-0.0))
    for _, x in ipairs { 0.1, 1 / 3, 2 ^ 60 + 0.0, 1e-300, 5e-324, -123.456e78 } do
      assert.equal(x, json.decode(json.encode(x)))
    end
  end)

  it("keeps order and refuses a repeated key in containers of any size", function()
    -- members are placed in batches of 32 (src/json.c): across and inside a batch
    local keys, items = {}, {}
    for i = 1, 100 do
      keys[#keys + 1] = ('"k%d":%d'):format(101 - i, i)
      items[#items + 1] = i % 3 == 0 and "{}" or tostring(i)
    end
    local obj, arr = "{" .. table.concat(keys, ",") .. "}", "[" .. table.concat(items, ",") .. "]"
    assert.equal(obj, json.encode(json.decode(obj)))
    assert.equal(arr, json.encode(json.decode(arr)))
    assert.equal('[' .. arr .. ',' .. obj .. ']', json.encode(json.decode('[' .. arr .. ',' .. obj .. ']')))
    assert.error_matches(function() json.decode(obj:sub(1, -2) .. ',"k100":0}') end,
      'duplicate object key "k100" at line 1, column ' .. (#obj + 6), 1, true)
    assert.error_matches(function() json.decode(obj:sub(1, -2) .. ',"k2":0}') end,
      'duplicate object key "k2" at line 1, column ' .. (#obj + 4), 1, true)
  end)

  it("keeps decoded key order; new keys go last, in assignment order; nil removes", function()
    local o = json.decode('{"b":1,"a":2,"c":3}')
    o.z = 4
    o.y = 5
    o.a = nil
    o.b = 10                                  -- an existing key keeps its place
    assert.equal('{"b":10,"c":3,"z":4,"y":5}', json.encode(o))
    o.a = 6                                   -- removed, then assigned again: last
    assert.equal('{"b":10,"c":3,"z":4,"y":5,"a":6}', json.encode(o))
    local keys = {}
    for k in pairs(o) do keys[#keys + 1] = k end
    assert.same({ "b", "c", "z", "y", "a" }, keys)
    rawset(o, "r", 1)                         -- set around the order: after it, sorted
    assert.equal('{"b":10,"c":3,"z":4,"y":5,"a":6,"r":1}', json.encode(o))
    o.z = nil
    rawset(o, "z", 7)                         -- its old place is still in the order
    assert.equal('{"b":10,"c":3,"z":7,"y":5,"a":6,"r":1}', json.encode(o))
    o[2], o[10] = "two", "ten"                -- integer keys have no place: after, sorted
    assert.equal('{"b":10,"c":3,"z":7,"y":5,"a":6,"10":"ten","2":"two","r":1}', json.encode(o))
    assert.equal('{"a":2,"z":1,"10":3,"2":4}', json.encode(json.object { z = 1, a = 2, [10] = 3, [2] = 4 }))
  end)

  it("forgets removed keys' places while the object lives, keeping the order", function()
    local o = json.decode('{"b":1,"a":2}')
    o.gone = 0
    o.gone = nil
    collectgarbage()
    collectgarbage()
    local before = collectgarbage("count")
    for i = 1, 100000 do
      o["x" .. i] = i
      o["x" .. i] = nil
      if i == 50000 then o.c = 3 end
    end
    o.b = nil
    o.b = 4                                   -- removed, assigned again: last
    collectgarbage()
    collectgarbage()
    -- every place kept: some 10 MiB (the key strings and two slots each)
    assert.is_true(collectgarbage("count") - before < 512, collectgarbage("count") - before)
    assert.equal('{"a":2,"c":3,"b":4}', json.encode(o))
    local keys = {}
    for k in pairs(o) do keys[#keys + 1] = k end
    assert.same({ "a", "c", "b" }, keys)
  end)

  it("marks [] and {}: kind, object, array", function()
    assert.equal("array", json.kind(json.decode("[]")))
    assert.equal("object", json.kind(json.decode("{}")))
    assert.is_nil(json.kind({}))
    assert.is_nil(json.kind("x"))
    assert.equal("[]", json.encode(json.array()))
    assert.equal("{}", json.encode(json.object()))
    assert.equal('{"1":"a"}', json.encode(json.object { "a" }))
    local t = { b = 1, a = 2 }
    assert.equal(t, json.object(t))
    t.c = 3
    assert.equal('{"a":2,"b":1,"c":3}', json.encode(t))  -- marked keys sorted, then new ones
    local arr = json.decode("[1]")
    json.object(arr)
    assert.equal("object", json.kind(arr))
    assert.equal('{"1":1}', json.encode(arr))
    assert.error_matches(function() json.object(setmetatable({}, {})) end, "metatable")
  end)

  it("refuses a marked array it cannot write whole: other keys, holes", function()
    assert.error_matches(function() json.encode(json.array { x = 1 }) end,
      'callout.json: cannot encode key "x" in an array', 1, true)
    local o = json.decode('{"a":1}')
    assert.error_matches(function() json.encode(json.array(o)) end,
      'callout.json: cannot encode key "a" in an array', 1, true)
    assert.error_matches(function() json.encode(json.array { [1] = 1, [0] = 0 }) end,
      "callout.json: cannot encode key 0 in an array", 1, true)
    assert.error_matches(function() json.encode(json.array { [1.5] = 1 }) end,
      "callout.json: cannot encode key 1.5 in an array", 1, true)
    local a = json.decode("[1,2,3]")
    a[2] = nil
    assert.error_matches(function() json.encode(a) end,
      "callout.json: cannot encode an array with a hole: [2] is nil, [3] is not", 1, true)
    a = json.decode("[1]")
    a[100] = 1
    assert.error_matches(function() json.encode(a) end,
      "callout.json: cannot encode an array with a hole: [2] is nil, [100] is not", 1, true)
    a[100] = nil
    a[3] = nil                                -- the end may shrink
    assert.equal("[1]", json.encode(a))
    a[2] = json.null
    assert.equal("[1,null]", json.encode(a))
    assert.equal("[[],[1]]", json.encode(json.array { json.array(), json.array { 1 } }))
  end)

  it("writes plain tables: 1..n as an array, anything else as an object with sorted keys", function()
    assert.equal("[1,2,3]", json.encode { 1, 2, 3 })
    assert.equal("{}", json.encode {})
    assert.equal('{"a":1,"b":[true],"c":{}}', json.encode { c = {}, b = { true }, a = 1 })
    assert.equal('{"1":1,"3":3}', json.encode { [1] = 1, [3] = 3 })
    assert.equal('{"1":"x","k":"v"}', json.encode { "x", k = "v" })
    assert.error_matches(function() json.encode { [true] = 1 } end, "boolean key")
  end)

  it("refuses an integer key and its decimal string both in one object", function()
    local o = json.decode('{"1":"from the client"}')
    o[1] = "set by the script"
    assert.error_matches(function() json.encode(o) end,
      'callout.json: key 1 and key "1" both encode as "1"', 1, true)
    assert.error_matches(function() json.encode { [-7] = "a", ["-7"] = "b", x = 1 } end,
      'callout.json: key -7 and key "-7" both encode as "-7"', 1, true)
    o["1"] = nil
    assert.equal('{"1":"set by the script"}', json.encode(o))
    assert.equal('{"01":"b","1":"a"}', json.encode { [1] = "a", ["01"] = "b" })
  end)

  it("maps null to callout.null both ways", function()
    assert.equal(native.null, json.null)
    assert.equal(json.null, json.decode("null"))
    assert.equal(json.null, json.decode('{"a":null}').a)
    assert.equal('[null,1]', json.encode { json.null, 1 })
    assert.equal("null", json.encode(nil))
  end)

  it("keeps NUL in strings", function()
    local s = json.decode('"a\\u0000b"')
    assert.equal("a\0b", s)
    assert.equal('{"k":"\\u0000"}', json.encode(json.decode('{"k":"\\u0000"}')))
    -- and in keys (RFC 8259 allows it; Lua strings hold it), written back as \u0000
    assert.equal('{"k\\u0000":1}', json.encode(json.decode('{"k\\u0000":1}')))
    assert.equal(1, json.decode('{"k\\u0000":1}')["k\0"])
  end)

  it("refuses what JSON cannot say", function()
    local t = {}
    t.self = t
    assert.error_matches(function() json.encode(t) end, "callout.json: cannot encode a table that contains itself", 1, true)
    assert.error_matches(function() json.encode(0 / 0) end, "cannot encode NaN", 1, true)
    assert.error_matches(function() json.encode { math.huge } end, "cannot encode infinity", 1, true)
    assert.error_matches(function() json.encode(print) end, "cannot encode a function", 1, true)
    assert.error_matches(function() json.encode { io.stdout } end, "cannot encode a userdata", 1, true)
    assert.error_matches(function() json.encode "\xff" end, "invalid UTF-8 in a string at byte 1", 1, true)
    assert.error_matches(function() json.encode "\xed\xa0\x80" end, "invalid UTF-8", 1, true)
    -- a table seen twice is no cycle
    local shared = { 1 }
    assert.equal("[[1],[1]]", json.encode { shared, shared })
  end)

  it("quotes a repeated long key in its error cut between characters", function()
    -- the message is often JSON-encoded again (a 400 naming the reason): it must stay UTF-8
    for _, ch in ipairs { "é", "😀", "\u{2028}" } do
      local k = ch:rep(30)
      local ok, err = pcall(json.decode, '{"' .. k .. '":1,"' .. k .. '":2}')
      assert.is_false(ok)
      assert.is_truthy(utf8.len(err), err)
      assert.is_truthy(err:find('duplicate object key "' .. ch, 1, true), err)
      assert.is_truthy(err:find('..." at line 1', 1, true), err)
      assert.equal("string", type(json.encode { message = err }))
    end
  end)

  it("reports invalid documents with their line and column", function()
    local cases = {
      { '{"a":1,"a":2}', 'duplicate object key "a" at line 1, column 10' },
      { '{"b":{"a":1},"a":{"b":[]},"b":3}', 'duplicate object key "b" at line 1, column 29' },
      { '[1,2', "unexpected end of document at line 1, column 5" },
      { '{"a":\n nul}', "at line 2, column 4" },
      { '[18446744073709551616]', "too big integer at line 1, column 2" },
      { '[-9223372036854775809]', "too big negative integer at line 1, column 2" },
      { '99999999999999999999', "too big integer at line 1, column 1" },
      { '[1e400]', "real number overflow at line 1, column 2" },
      { '[NaN]', "invalid char in json text at line 1, column 2" },
      { '"\xff"', "invalid UTF-8 at line 1, column 2" },
      -- what yajl's own check lets through: overlong, surrogates, past U+10FFFF
      { '"\xc0\x80"', "invalid UTF-8 at line 1, column 2" },
      { '"ab\xe0\x80\x80"', "invalid UTF-8 at line 1, column 4" },
      { '"\xed\xa0\x80"', "invalid UTF-8 at line 1, column 2" },
      { '"\xf4\x90\x80\x80"', "invalid UTF-8 at line 1, column 2" },
      { '"\xf5\x80\x80\x80"', "invalid UTF-8 at line 1, column 2" },
      { '["a\\n", "\\\\\\"\xe0\x80\x80"]', "invalid UTF-8 at line 1, column 14" },
      { '{"\xed\xbf\xbf":1}', "invalid UTF-8 at line 1, column 3" },
      -- yajl would write '?' for a lone high surrogate, and a lone low one as bytes
      { '"\\ud800"', "invalid Unicode escape (a high surrogate without its pair) at line 1, column 2" },
      { '"x\\ud800\\u0041"', "invalid Unicode escape (a high surrogate without its pair) at line 1, column 3" },
      { '"\\udc00"', "invalid Unicode escape (a lone low surrogate) at line 1, column 2" },
      { '', "unexpected end of document at line 1, column 1" },
      { '[1] x', "trailing garbage at line 1, column 5" },
      { '1 2', "trailing garbage" },
      { "'a'", "invalid char in json text at line 1, column 1" },
      { '[1,]', "at line 1, column 4" },
      { '[01]', "at line 1, column 3" },
      { '/*c*/1', "comments are not enabled at line 1, column 1" },
      { '"a\tb"', "invalid character inside string" },
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(json.decode, c[1])
      assert.is_false(ok, c[1])
      assert.matches("^callout.json: ", err)
      assert.matches(c[2], err, 1, true)
      assert.matches("at line %d+, column %d+$", err)
    end
  end)

  it("refuses a document over 4 MiB, naming where", function()
    local big = '"' .. string.rep("a", 4 * 1024 * 1024) .. '"'
    assert.error_matches(function() json.decode(big) end,
      "callout.json: document longer than 4194304 bytes at line 1, column 4194305", 1, true)
    local fits = '"' .. string.rep("a", 4 * 1024 * 1024 - 2) .. '"'
    assert.equal(fits, json.encode(json.decode(fits)))
  end)

  it("builds its values in the VM: they count against the script's memory ceiling", function()
    -- 100 000 arrays are some 6 MB of Lua tables; the script holds 60 of its 64 MiB already
    local doc = "[" .. string.rep("[],", 100000) .. "[]]"
    local script = testing.load_string([[
      local json = require "callout.json"
      function on_request_body(body)
        local hog = string.rep("x", 60 * 1024 * 1024)
        local v = json.decode(body.body)
        return { body = tostring(#hog + #v) }
      end]])
    local r = testing.call(script, testing.request_body(doc))
    assert.equal("RESOURCE_EXHAUSTED", r.status_name)
    assert.matches("script memory limit", r.message, 1, true)
    -- without the hog the same document decodes
    local fits = testing.load_string([[
      local json = require "callout.json"
      function on_request_body(body) return { body = tostring(#json.decode(body.body)) } end]])
    r = testing.run(fits, testing.request_body(doc))
    assert.equal("100001", r.request_body.response.body_mutation.body)
  end)

  it("fails with the script's memory error when encode's output is past the ceiling", function()
    -- 47 MiB of output: the buffer's step from 32 to 64 MiB is refused, with room left for
    -- an error string (which is what encode raised instead: INTERNAL). Fewer values than a
    -- budget check's 1024 and strings shorter than its 64 KiB, so that this machine's speed
    -- cannot make the time budget the limit hit first.
    local script = testing.load_string([[
      local json = require "callout.json"
      function on_request_body(body)
        local s, t = string.rep("y", 60 * 1024), {}
        for i = 1, 800 do t[i] = s end
        return { body = tostring(#json.encode(t)) }
      end]])
    local r = testing.call(script, testing.request_body("x"))
    assert.equal("RESOURCE_EXHAUSTED", r.status_name, r.message)
    assert.matches("script memory limit", r.message, 1, true)
  end)

  it("stops decode and encode at the script's time budget, naming the script's line", function()
    -- one C call each, which the count hook never reaches (nor a loop of a few of them:
    -- it runs every 10 000 instructions): 10 decodes of 1M values are over a second on the
    -- dev VM, and t = {t, t} 24 times over is 16M values to walk
    local script = testing.load_string([[
      local json = require "callout.json"
      local doc = "[" .. ("0,"):rep(1024 * 1024) .. "0]"
      function on_request_body(body)
        if body.body == "dag" then
          local t = { 1 }
          for _ = 1, 24 do t = { t, t } end
          return { body = json.encode(t) }
        elseif body.body == "pcall" then
          for _ = 1, 10 do pcall(json.decode, doc) end
        end
        for _ = 1, 10 do json.decode(doc) end
        return { body = "done" }
      end]])
    for body, line in pairs { dag = 7, decode = 11, pcall = 9 } do
      assert_stopped_at(script, body, line)
    end
  end)

  it("stops inside one long string and inside json.object's key sort at the time budget", function()
    -- one string is one value, and json.object sorts keys without walking values: before
    -- checks inside them, these loops of a few C calls each (the count hook never fires) ran
    -- seconds in C
    local script = testing.load_string([[
      local json = require "callout.json"
      local ctrl = ("\1"):rep(1024 * 1024)                  -- 6 MiB of \u0001 out
      local wide = '"' .. ("\u{e9}"):rep(1024 * 1024) .. '"' -- 2 MiB of UTF-8 to check
      local keys = {}
      for i = 1, 20000 do keys["k" .. i] = i end
      function on_request_body(body)
        if body.body == "escape" then
          for _ = 1, 200 do json.encode(ctrl) end
        elseif body.body == "utf8" then
          for _ = 1, 400 do json.decode(wide) end
        else
          for _ = 1, 200 do json.object(keys); json.array(keys) end
        end
        return { body = "done" }
      end]])
    for body, line in pairs { escape = 8, utf8 = 10, object = 12 } do
      assert_stopped_at(script, body, line)
    end
  end)

  it("decodes -0 and 1E2 by their text: integer 0, float 100.0; 1e-400 underflows to 0.0", function()
    local v = json.decode("[-0,1E2,1.0,1e-400]")
    assert.equal("integer", math.type(v[1]))
    assert.equal("float", math.type(v[2]))
    assert.equal("float", math.type(v[3]))
    assert.equal(0.0, v[4])
  end)

  it("is callout.json in a script, next to cjson", function()
    local script = testing.load_string([[
      local json = require "callout.json"
      assert(json == callout.json and json.null == callout.null)
      local cjson = require "cjson"
      function on_request_body(body)
        local doc = json.decode(body.body)
        doc.routed = json.kind(doc.tools)
        return { body = json.encode(doc) }
      end]])
    local r = testing.run(script, testing.request_body('{"tools":[],"seed":12345678901234567}'))
    assert.equal('{"tools":[],"seed":12345678901234567,"routed":"array"}',
                 r.request_body.response.body_mutation.body)
  end)
end)
