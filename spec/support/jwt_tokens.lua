-- Test support shared by the JWT specs (not a spec itself): shell commands, base64url, and
-- RS256 tokens signed with the openssl command. Load with dofile from the repository root.
local M = {}

-- Runs a shell command, its output as a string. Without LD_PRELOAD: under a sanitizer
-- build busted preloads the ASan runtime, which has no business in openssl or mktemp.
function M.sh(cmd)
  local p = assert(io.popen("env -u LD_PRELOAD " .. cmd, "r"))
  local out = p:read("a")
  assert(p:close(), "failed: " .. cmd)
  return out
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

-- base64url without padding, as JWTs use it.
function M.b64url(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a << 16 | (b or 0) << 8 | (c or 0)
    for j = 1, c and 4 or b and 3 or 2 do
      local v = n >> (18 - 6 * (j - 1)) & 63
      out[#out + 1] = B64:sub(v + 1, v + 1)
    end
  end
  return table.concat(out)
end

-- A token for `payload` (JSON text) under `header`, signed RS256 with the private key file
-- `key`; `dir` is a scratch folder for the signing input.
function M.sign(dir, key, payload, header)
  local input = M.b64url(header) .. "." .. M.b64url(payload)
  local f = assert(io.open(dir .. "/input", "wb"))
  f:write(input)
  f:close()
  return input .. "." .. M.b64url(M.sh(("openssl dgst -sha256 -sign %s -binary %s/input")
                                       :format(key, dir)))
end

return M
