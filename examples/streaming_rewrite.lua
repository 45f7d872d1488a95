-- streaming_rewrite.lua — replace a word in a body that arrives in chunks, even when the
-- word is split between two chunks. For FULL_DUPLEX_STREAMED body mode (see
-- docs/streaming.md): each chunk may be answered with fewer or more chunks, so the script
-- holds back a tail that could be the start of the word, emits everything before it, and
-- flushes what it holds when the body ends.
--
-- Envoy config: processing_mode { request_body_mode: FULL_DUPLEX_STREAMED,
--   response_body_mode: FULL_DUPLEX_STREAMED, request_trailer_mode: SEND,
--   response_trailer_mode: SEND }  (Envoy requires trailers SEND with full duplex)

local WORD = "secret"
local REPLACEMENT = "[redacted]"

-- The length of the longest end of `s` that is the start of WORD (0 if none): those
-- bytes might be the first half of a WORD split across chunks.
local function partial_tail(s)
  for n = math.min(#WORD - 1, #s), 1, -1 do
    if s:sub(-n) == WORD:sub(1, n) then
      return n
    end
  end
  return 0
end

-- Rewrites `data` (the held tail plus the new chunk); returns what can be sent now and
-- what must wait for the next chunk.
local function rewrite(data, last)
  local out, pos = {}, 1
  while true do
    local s, e = data:find(WORD, pos, true)
    if not s then break end
    out[#out + 1] = data:sub(pos, s - 1)
    out[#out + 1] = REPLACEMENT
    pos = e + 1
  end
  local rest = data:sub(pos)
  local keep = last and 0 or partial_tail(rest)
  out[#out + 1] = rest:sub(1, #rest - keep)
  return table.concat(out), rest:sub(#rest - keep + 1)
end

local function on_body(body, ctx)
  -- one tail per direction: request and response bodies share ctx.state
  local key = ctx.phase .. ".tail"
  local ready, tail = rewrite((ctx.state[key] or "") .. body.body, body.end_of_stream)
  ctx.state[key] = tail
  if ready == "" then
    return { chunks = {} }   -- nothing to send yet (at end of stream an empty chunk goes out)
  end
  return { chunks = { ready } }
end

on_request_body = on_body
on_response_body = on_body

-- The length changes, so the original content-length must not reach the peer.
local function drop_length()
  return { remove = { "content-length" } }
end
on_request_headers = drop_length
on_response_headers = drop_length
