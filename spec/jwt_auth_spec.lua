-- examples/jwt_auth.lua: RS256 tokens from Authorization, claims as decoded-* headers.
-- Keys are made with the openssl command; tokens are signed with it too.

local testing = require "callout.testing"

local tokens = dofile("spec/support/jwt_tokens.lua")
local sh, b64url = tokens.sh, tokens.b64url

describe("examples/jwt_auth.lua", function()
  local dir = sh("mktemp -d"):gsub("%s+$", "")
  for _, name in ipairs { "signer", "other" } do
    sh(("openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out %s/%s.key 2>/dev/null")
       :format(dir, name))
  end
  sh(("openssl pkey -in %s/signer.key -pubout -out %s/signer.pub"):format(dir, dir))
  teardown(function() os.execute("env -u LD_PRELOAD rm -rf " .. dir) end)

  local function sign(payload, header, key)
    return tokens.sign(dir, ("%s/%s.key"):format(dir, key or "signer"), payload,
                       header or '{"alg":"RS256","typ":"JWT"}')
  end

  -- The script reads JWT_PUBLIC_KEY_PATH with os.getenv; a spec cannot set the environment,
  -- so it loads the script behind a first line that answers for it (same line numbers).
  local source = assert(io.open("examples/jwt_auth.lua")):read("a")
  local function load_with(path)
    return testing.load_string(("local getenv = os.getenv; os.getenv = function(n) " ..
      "if n == 'JWT_PUBLIC_KEY_PATH' then return %s end return getenv(n) end ")
      :format(path and ("%q"):format(path) or "nil") .. source)
  end
  local script = load_with(dir .. "/signer.pub")

  local function headers_of(resp)
    local out = {}
    local hm = resp.request_headers.response.header_mutation or {}
    for i, o in ipairs(hm.set_headers or {}) do
      out[i] = { o.header.key, o.header.raw_value }
    end
    return out
  end

  local function bearer(token, value)
    return testing.request_headers { [":path"] = "/", authorization = value or ("Bearer " .. token) }
  end

  it("adds each claim as decoded-<claim>, in the token's order, and re-routes", function()
    local resp = testing.run(script, bearer(sign(
      '{"sub":"1234567890","name":"John Doe","admin":true,"iat":1712173461,"exp":4075658261}')))
    assert.same({ { "decoded-sub", "1234567890" }, { "decoded-name", "John Doe" },
                  { "decoded-admin", "True" }, { "decoded-iat", "1712173461" },
                  { "decoded-exp", "4075658261" } }, headers_of(resp))
    assert.is_true(resp.request_headers.response.clear_route_cache)
    assert.matches("Approved - Decoded Values: {'sub': '1234567890', 'name': 'John Doe', " ..
                   "'admin': True, 'iat': 1712173461, 'exp': 4075658261}",
                   table.concat(testing.logs(), "\n"), 1, true)
  end)

  it("prints values as Python's str() does", function()
    local resp = testing.run(script, bearer(sign('{"n":null,"f":false,"x":2.5,"w":3.0,"big":1e16,' ..
      '"tiny":0.00001,"l":[1,"a",null,[]],"o":{"k":"it\'s","e":{}},"u":"caf\\u00e9"}')))
    assert.same({ { "decoded-n", "None" }, { "decoded-f", "False" }, { "decoded-x", "2.5" },
                  { "decoded-w", "3.0" }, { "decoded-big", "1e+16" }, { "decoded-tiny", "1e-05" },
                  { "decoded-l", "[1, 'a', None, []]" }, { "decoded-o", [[{'k': "it's", 'e': {}}]] },
                  { "decoded-u", "café" } }, headers_of(resp))
  end)

  it("re-routes without headers for a token without claims", function()
    local resp = testing.run(script, bearer(sign("{}")))
    assert.same({}, headers_of(resp))
    assert.is_nil(resp.request_headers.response.header_mutation)
    assert.is_true(resp.request_headers.response.clear_route_cache)
  end)

  it("takes the last word of the header, whatever the scheme", function()
    local tok = sign('{"sub":"a"}')
    for _, value in ipairs { tok, "bearer " .. tok, "  Bearer   " .. tok .. " \t" } do
      assert.same({ { "decoded-sub", "a" } }, headers_of(testing.run(script, bearer(tok, value))))
    end
  end)

  it("denies a request without Authorization", function()
    assert.denied(testing.call(script, testing.request_headers { [":path"] = "/" }),
                  "No Authorization token found.")
  end)

  it("denies tokens that do not verify", function()
    local good = sign('{"sub":"a"}')
    local h, p = good:match("^([^.]*)%.([^.]*)%.")
    for what, value in pairs {
      empty = "", scheme_only = "Bearer", garbage = "Bearer abc",
      other_key = "Bearer " .. sign('{"sub":"a"}', nil, "other"),
      tampered = "Bearer " .. h .. "." .. b64url('{"sub":"b"}') .. "." .. good:match("[^.]*$"),
      unsigned = "Bearer " .. h .. "." .. p .. ".",
      expired = "Bearer " .. sign('{"exp":1000}'),
      not_yet = "Bearer " .. sign('{"nbf":' .. (os.time() + 600) .. '}'),
      audience = "Bearer " .. sign('{"aud":"x"}'),
      hs256 = "Bearer " .. sign('{"sub":"a"}', '{"alg":"HS256"}'),
    } do
      local r = testing.call(script, bearer(nil, value))
      assert.denied(r, "Authorization token is invalid.")
    end
  end)

  it("does not start without a usable key", function()
    assert.has_error(function() load_with(nil) end)
    local ok, err = pcall(load_with, nil)
    assert.matches("set JWT_PUBLIC_KEY_PATH", err, 1, true)
    ok, err = pcall(load_with, dir .. "/missing.pem")
    assert.is_false(ok)
    assert.matches("cannot read '" .. dir .. "/missing.pem'", err, 1, true)
    ok, err = pcall(load_with, dir .. "/input")
    assert.is_false(ok)
    assert.matches("no RSA key in '" .. dir .. "/input'", err, 1, true)
  end)
end)
