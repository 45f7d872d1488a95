-- jwt_auth.lua — the Python SDK's "jwt_auth" example, ported: let a request through only
-- with a valid RS256 JSON Web Token, and hand its claims to the backend as headers.
--
--   JWT_PUBLIC_KEY_PATH=key.pem scripts/run examples/jwt_auth.lua
--
-- The token is the last word of the Authorization header ("Bearer <token>"). callout.jwt
-- checks it as PyJWT's jwt.decode(token, key, algorithms=["RS256"]) does: signature, then
-- exp/nbf/iat, an unexpected aud, sub/jti types. Each claim then becomes a header
-- "decoded-<claim>" in the token's order and the route cache is cleared (routes may match
-- on them). No Authorization header, or a token that does not pass: the stream is denied
-- with the Python example's messages.

local jwt = callout.jwt

-- Read once, when the script loads: a missing or unusable key stops the server at start-up
-- instead of failing every request.
local key_path = os.getenv("JWT_PUBLIC_KEY_PATH")
if key_path == nil or key_path == "" then
  error("jwt_auth.lua: set JWT_PUBLIC_KEY_PATH to the PEM file of the RS256 public key", 0)
end
local key = jwt.load_key(key_path)

-- The header values are what Python's str() prints for the decoded JSON value (the Python
-- example sends str(value)), so that both send the same bytes: True/False, None, 1.5,
-- 1e+16, [1, 'a'], {'k': None}.
local repr

local function float_repr(x)
  if x ~= x then return "nan" end
  if x == math.huge or x == -math.huge then return x > 0 and "inf" or "-inf" end
  local s
  for digits = 1, 17 do    -- the shortest form that reads back as x, as Python picks it
    s = string.format("%." .. digits - 1 .. "e", x)
    if tonumber(s) == x then break end
  end
  local sign, d1, rest, e = s:match("^(-?)(%d)%.?(%d*)e([-+]%d+)$")
  local digits, point = (d1 .. rest):gsub("0+$", ""), tonumber(e) + 1
  if digits == "" then return sign .. "0.0" end
  if point > 16 or point < -3 then
    local m = #digits > 1 and digits:sub(1, 1) .. "." .. digits:sub(2) or digits
    return string.format("%s%se%s%02d", sign, m, point > 0 and "+" or "-", math.abs(point - 1))
  elseif point <= 0 then
    return sign .. "0." .. string.rep("0", -point) .. digits
  elseif point >= #digits then
    return sign .. digits .. string.rep("0", point - #digits) .. ".0"
  end
  return sign .. digits:sub(1, point) .. "." .. digits:sub(point + 1)
end

-- Code points Python's repr() escapes beyond ASCII: controls, separators, format
-- characters, surrogates, private use (ranges of str.isprintable() == False).
local UNPRINTABLE = { {0x80, 0xa0}, {0xad, 0xad}, {0x600, 0x605}, {0x61c, 0x61c},
  {0x6dd, 0x6dd}, {0x70f, 0x70f}, {0x180e, 0x180e}, {0x1680, 0x1680}, {0x2000, 0x200f},
  {0x2028, 0x202f}, {0x205f, 0x206f}, {0x3000, 0x3000}, {0xd800, 0xf8ff}, {0xfeff, 0xfeff},
  {0xfff9, 0xfffb}, {0xfffe, 0xffff}, {0xe0001, 0xe007f}, {0xf0000, 0x10ffff} }

local function string_repr(s)
  local q = (s:find("'", 1, true) and not s:find('"', 1, true)) and '"' or "'"
  local out = {}
  for _, c in utf8.codes(s, true) do
    local esc
    if c == 92 or c == q:byte() then esc = "\\" .. utf8.char(c)
    elseif c == 9 then esc = "\\t" elseif c == 10 then esc = "\\n" elseif c == 13 then esc = "\\r"
    elseif c < 32 or c == 127 then esc = string.format("\\x%02x", c)
    elseif c > 127 then
      for _, r in ipairs(UNPRINTABLE) do
        if c >= r[1] and c <= r[2] then
          esc = string.format(c <= 0xff and "\\x%02x" or c <= 0xffff and "\\u%04x" or "\\U%08x", c)
          break
        end
      end
    end
    out[#out + 1] = esc or utf8.char(c)
  end
  return q .. table.concat(out) .. q
end

function repr(v)
  if v == callout.null then return "None" end
  local t = type(v)
  if t == "boolean" then return v and "True" or "False" end
  if t == "string" then return string_repr(v) end
  if t == "number" then return math.type(v) == "integer" and tostring(v) or float_repr(v) end
  local parts = {}
  if jwt.is_array(v) then
    for i, x in ipairs(v) do parts[i] = repr(x) end
    return "[" .. table.concat(parts, ", ") .. "]"
  end
  for k, x in pairs(v) do parts[#parts + 1] = repr(k) .. ": " .. repr(x) end  -- token order
  return "{" .. table.concat(parts, ", ") .. "}"
end

local function str(v)
  return type(v) == "string" and v or repr(v)
end

-- Python's value.strip().split(' ')[-1]: the last space-separated word.
local function bearer_token(headers)
  local value = headers:get("authorization")
  if value == nil then return nil end
  value = value:gsub("^[%s\28-\31]+", ""):gsub("[%s\28-\31]+$", "")
  return value:match("[^ ]*$")
end

function on_request_headers(headers, ctx)
  local token = bearer_token(headers)
  if token == nil then
    callout.deny_callout("No Authorization token found.")
  end
  local claims, why = jwt.decode(token, key)
  if claims == nil then
    callout.log.debug("token refused: %s", why)
    callout.deny_callout("Authorization token is invalid.")
  end
  callout.log.info("Approved - Decoded Values: %s", repr(claims))
  local add = {}
  for name, value in pairs(claims) do      -- the token's order
    add[#add + 1] = { "decoded-" .. name, str(value) }
  end
  return { add = add, clear_route_cache = true }
end
