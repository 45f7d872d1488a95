-- callout.jwt (src/jwt.c): keys, options, reasons, claim order; examples/jwt_auth.lua has
-- its own spec. A small script echoes what callout.jwt returns as dynamic metadata.

local testing = require "callout.testing"

local tokens = dofile("spec/support/jwt_tokens.lua")
local sh = tokens.sh

-- x-key: a key file or PEM text, x-token, x-opts: a Lua table constructor. A handler may not
-- read files (the sandbox allows that only while the script loads), so the key files of DIR
-- are loaded at the top level, and a load's error is raised when a request names that file.
local ECHO = [[
local DIR = %q
local jwt = callout.jwt
local cache, load_errors = {}, {}
for _, name in ipairs { "spki.pub", "pkcs1.pub", "k.key", "ec.key", "input", "nope" } do
  local ok, key = pcall(jwt.load_key, DIR .. "/" .. name)
  if ok then cache[DIR .. "/" .. name] = key else load_errors[DIR .. "/" .. name] = key end
end
function on_request_headers(h, ctx)
  local src = h:get("x-key")
  if load_errors[src] then error(load_errors[src], 0) end
  cache[src] = cache[src] or jwt.load_key(src)
  local opts = h:get("x-opts") and assert(load("return " .. h:get("x-opts")))()
  local claims, why = jwt.decode(h:get("x-token"), cache[src], opts)
  if claims == nil then return { dynamic_metadata = { r = { why = why } } } end
  if h:has("x-edit") then claims.sub = nil; claims.added = "yes" end
  local order, arrays = {}, {}
  for k, v in pairs(claims) do
    order[#order + 1] = k
    if type(v) == "table" then arrays[k] = jwt.is_array(v) end
  end
  return { dynamic_metadata = { r = { order = order, arrays = arrays,
                                      key = tostring(cache[src]) } } }
end
]]

describe("callout.jwt", function()
  local dir = sh("mktemp -d"):gsub("%s+$", "")
  sh(("openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out %s/k.key 2>/dev/null"):format(dir))
  sh(("openssl pkey -in %s/k.key -pubout -out %s/spki.pub"):format(dir, dir))
  sh(("openssl rsa -in %s/k.key -RSAPublicKey_out -out %s/pkcs1.pub 2>/dev/null"):format(dir, dir))
  sh(("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out %s/ec.key 2>/dev/null"):format(dir))
  teardown(function() os.execute("env -u LD_PRELOAD rm -rf " .. dir) end)

  local function sign(payload, header)
    return tokens.sign(dir, dir .. "/k.key", payload, header or '{"alg":"RS256"}')
  end

  sh(("printf 'not a key' > %s/input"):format(dir))
  local script = testing.load_string(ECHO:format(dir))

  -- The echo for a token: { order = ..., arrays = ... } or { why = reason }.
  local function decode(token, opts, extra)
    local h = { ["x-key"] = dir .. "/spki.pub", ["x-token"] = token, ["x-opts"] = opts }
    for k, v in pairs(extra or {}) do h[k] = v end
    return testing.run(script, testing.request_headers(h)).dynamic_metadata.r
  end
  local function why(token, opts) return decode(token, opts).why end

  it("returns the claims, pairs() in token order, arrays told from objects", function()
    local r = decode(sign('{"z":1,"a":[],"m":{},"b":[1],"a":2}'))
    assert.same({ "z", "a", "m", "b" }, r.order)        -- a repeated key keeps its first place
    assert.same({ m = false, b = true }, r.arrays)      -- "a" is 2 now: the last value wins
    assert.matches("RSA, 2048 bits", r.key, 1, true)
  end)

  it("keeps a repeated key's first place and last value in a large payload too", function()
    -- src/json.c places members in batches of 32: "a" is placed when repeated, "k35" waits
    local parts = { '"a":[]' }
    for i = 1, 40 do parts[#parts + 1] = ('"k%02d":%s'):format(i, i == 35 and "[]" or i) end
    parts[#parts + 1] = '"k35":{}'
    parts[#parts + 1] = '"a":{}'
    local r = decode(sign("{" .. table.concat(parts, ",") .. "}"))
    assert.equal(41, #r.order)
    assert.equal("a", r.order[1])
    assert.equal("k35", r.order[36])
    assert.same({ a = false, k35 = false }, r.arrays)
  end)

  it("walks keys a script added after the token's, and skips removed ones", function()
    local r = decode(sign('{"sub":"s","x":1,"y":2}'), nil, { ["x-edit"] = "1" })
    assert.same({ "x", "y", "added" }, r.order)
  end)

  it("reads SubjectPublicKeyInfo, PKCS#1 and private key PEM files, and PEM text", function()
    local tok = sign('{"k":1}')
    for _, file in ipairs { "spki.pub", "pkcs1.pub", "k.key" } do
      assert.same({ "k" }, decode(tok, nil, { ["x-key"] = dir .. "/" .. file }).order, file)
    end
    assert.same({ "k" }, decode(tok, nil, { ["x-key"] = assert(io.open(dir .. "/spki.pub")):read("a") }).order)
  end)

  it("refuses a key that is not RSA, or no key at all", function()
    for _, file in ipairs { "ec.key", "input", "nope" } do
      local r = testing.call(script, testing.request_headers {
        ["x-key"] = dir .. "/" .. file, ["x-token"] = sign("{}") })
      assert.grpc_error(r, "INTERNAL", file == "nope" and "cannot read" or "no RSA key")
    end
  end)

  it("gives PyJWT's reasons", function()
    local good = sign('{"sub":"a"}')
    assert.equal("Not enough segments", why("abc"))
    assert.equal("Not enough segments", why("a.b"))
    assert.equal("Invalid header padding", why("a.b.c"))
    assert.equal("Signature verification failed", why((good:gsub("%.[^.]*$", ".AAAA"))))
    assert.equal("Invalid crypto padding", why((good:gsub("%.[^.]*$", ".A"))))
    assert.equal("The specified alg value is not allowed", why(sign("{}", '{"alg":"RS512"}')))
    assert.equal("Algorithm not specified", why(sign("{}", '{"typ":"JWT"}')))
    assert.equal("Invalid header string: must be a json object", why(sign("{}", '"RS256"')))
    assert.equal("Invalid payload string: must be a json object", why(sign("[]")))
    assert.matches("^Invalid payload string: ", why(sign("{'a': 1}")))
    assert.equal("Key ID header parameter must be a string", why(sign("{}", '{"alg":"RS256","kid":1}')))
    assert.equal("Unsupported critical extension", why(sign("{}", '{"alg":"RS256","crit":["x"],"x":1}')))
    assert.equal("Issued At claim (iat) must be an integer.", why(sign('{"iat":"soon"}')))
    assert.equal("Not Before claim (nbf) must be an integer.", why(sign('{"nbf":null}')))
    assert.equal("Expiration Time claim (exp) must be an integer.", why(sign('{"exp":[1]}')))
    assert.equal("Signature has expired", why(sign('{"exp":1}')))
    assert.equal("Invalid audience", why(sign('{"aud":["a"]}')))
    assert.equal("Subject must be a string", why(sign('{"sub":1}')))
    assert.equal("JWT ID must be a string", why(sign('{"jti":{}}')))
  end)

  it("checks times against now, with leeway", function()
    local tok = sign('{"iat":1000,"nbf":1000,"exp":2000}')
    assert.equal("The token is not yet valid (iat)", why(tok, "{ now = 999 }"))
    assert.is_nil(why(tok, "{ now = 1000 }"))
    assert.is_nil(why(tok, "{ now = 1999.5 }"))
    assert.equal("Signature has expired", why(tok, "{ now = 2000 }"))
    assert.is_nil(why(tok, "{ now = 2005, leeway = 10 }"))
    assert.is_nil(why(tok, "{ now = 995, leeway = 10 }"))
    assert.equal("The token is not yet valid (nbf)", why(sign('{"nbf":1000}'), "{ now = 999.9 }"))
    -- int() of a string or a float, as Python does
    assert.is_nil(why(sign('{"exp":" 2_000 "}'), "{ now = 1999 }"))
    assert.is_nil(why(sign('{"exp":2000.9}'), "{ now = 1999 }"))
  end)

  it("checks the audience when one is expected", function()
    assert.is_nil(why(sign('{"aud":"api"}'), '{ audience = "api" }'))
    assert.is_nil(why(sign('{"aud":["x","api"]}'), '{ audience = { "y", "api" } }'))
    assert.equal("Audience doesn't match", why(sign('{"aud":"web"}'), '{ audience = "api" }'))
    assert.equal('Token is missing the "aud" claim', why(sign('{}'), '{ audience = "api" }'))
    assert.equal("Invalid claim format in token", why(sign('{"aud":["api",1]}'), '{ audience = "api" }'))
    assert.equal("Invalid claim format in token", why(sign('{"aud":{"a":1}}'), '{ audience = "api" }'))
    -- no audience expected: an empty aud is no audience
    assert.is_nil(why(sign('{"aud":""}')))
    assert.is_nil(why(sign('{"aud":[]}')))
  end)

  it("raises on bad arguments", function()
    local tok = sign("{}")
    assert.grpc_error(testing.call(script, testing.request_headers {
      ["x-key"] = dir .. "/spki.pub", ["x-token"] = tok, ["x-opts"] = "{ leway = 1 }" }),
      "INTERNAL", "unknown option 'leway'")
    assert.grpc_error(testing.call(script, testing.request_headers {
      ["x-key"] = dir .. "/spki.pub", ["x-token"] = tok, ["x-opts"] = "{ audience = 1 }" }),
      "INTERNAL", "option 'audience' must be")
    local bad = testing.load_string("function on_request_headers() callout.jwt.decode('a.b.c', 'key.pem') end")
    assert.grpc_error(testing.call(bad, testing.request_headers {}), "INTERNAL",
                      "bad argument #2 to 'decode'")
  end)

  it("is what require 'callout.jwt' returns", function()
    local s = testing.load_string([[
      function on_request_headers()
        return { add = { { "same", tostring(require("callout.jwt") == callout.jwt) } } }
      end]])
    assert.header_set(testing.run(s, testing.request_headers {}), "same", "true")
  end)
end)
