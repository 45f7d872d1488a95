-- ai_gateway.lua — one OpenAI-style endpoint in front of several model providers: the model
-- for body-aware callouts (docs/examples.md).
--
-- A client speaks OpenAI's Chat Completions API (POST /v1/chat/completions). The callout
-- reads the JSON body, picks the backend from its `model` (ROUTES below), tells Envoy with
-- the header `x-model-route` and a cleared route cache (the route table matches on the
-- header), and for Anthropic models rewrites the request into Anthropic's Messages API
-- (POST /v1/messages) and the answer back into OpenAI's format: a JSON answer whole, a
-- streamed (SSE) answer event by event, as the chunks arrive. OpenAI models pass through.
--
-- Why each phase does what it does:
--   request headers  The route depends on the body, which has not arrived: the handler
--                    remembers what it needs from the headers (ctx.state) and answers
--                    `wait_for_body = true`. Anything that is not a chat completion is let
--                    go at once: its mode_override switches the callout off for the rest of
--                    that request (no body buffered, no response phases).
--   request body     BUFFERED: the whole JSON document at once. The answer carries the
--                    header mutations (Envoy still holds the headers in this mode), the new
--                    body, and clear_route_cache; the server sets content-length to the new
--                    body's length itself (--content_length_follows_body, on by default).
--   response headers Picks the response body mode with mode_override, from the request's
--                    `stream` flag and what the provider answered: STREAMED for an SSE
--                    stream, so each chunk is translated as it comes (BUFFERED would hold
--                    the whole stream back until the model finished), BUFFERED for a JSON
--                    answer (also a provider's error answer to a streaming request), NONE
--                    for what is not translated (OpenAI's answers, other content types).
--   response body    Translates. SSE events may be split across chunks: the unfinished
--                    tail waits in ctx.state for the next chunk; the end of the stream
--                    flushes it and adds OpenAI's `data: [DONE]`, or, when the provider's
--                    stream was cut (no message_stop), an error event instead.
--
-- mode_override: Envoy honours it only on a headers response, only with
-- `allow_mode_override: true`, never when a body mode is FULL_DUPLEX_STREAMED or with
-- send_body_without_waiting_for_header_response, and it replaces the whole ProcessingMode,
-- so every field is named (processing_mode below). The configured modes are BUFFERED both
-- ways on purpose: if Envoy ignores the override (allow_mode_override left out), an SSE
-- answer arrives buffered, in one piece, and is still translated correctly, only not
-- incrementally: ~10 us an event, so about 15,000 events (1.8 MiB) fit the default 200 ms
-- script budget.
--
-- Envoy config (the ext_proc filter and the routes that read x-model-route):
--
--   http_filters:
--   - name: envoy.filters.http.ext_proc
--     typed_config:
--       "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
--       grpc_service: { envoy_grpc: { cluster_name: luacallout } }
--       allow_mode_override: true
--       processing_mode:
--         request_header_mode: SEND
--         response_header_mode: SEND
--         request_body_mode: BUFFERED
--         response_body_mode: BUFFERED
--         request_trailer_mode: SKIP
--         response_trailer_mode: SKIP
--   - name: envoy.filters.http.router
--   ...
--   routes:
--   - match: { prefix: "/", headers: [{ name: x-model-route, string_match: { exact: anthropic } }] }
--     route: { cluster: anthropic, host_rewrite_literal: api.anthropic.com, timeout: 300s }
--   - match: { prefix: "/", headers: [{ name: x-model-route, string_match: { exact: openai } }] }
--     route: { cluster: openai, host_rewrite_literal: api.openai.com, timeout: 300s }
--
-- The routes trust x-model-route, so the callout owns it (TRUSTED below): a client's own is
-- removed from every request. Route only on headers the callout sets.
--
-- Credentials: the client's `Authorization: Bearer <key>` is the provider's key; for
-- Anthropic it moves to `x-api-key` (a real gateway would swap a client token for its own
-- key here). Tool calls, audio and the other parameters Anthropic has no counterpart for
-- are refused with 400 rather than dropped: an allow-list fails closed when either API
-- grows a parameter that changes the answer.

local json = require "callout.json"

local CHAT_PATH = "/v1/chat/completions"
local ANTHROPIC_PATH = "/v1/messages"
local ANTHROPIC_VERSION = "2023-06-01"
-- Anthropic requires max_tokens; OpenAI does not. Used when the client gives none.
local DEFAULT_MAX_TOKENS = 4096

-- Model name prefix -> route (the value of x-model-route), tried in order.
local ROUTES = {
  { prefix = "claude-", route = "anthropic" },
  { prefix = "gpt-", route = "openai" },
  { prefix = "o1", route = "openai" },
  { prefix = "o3", route = "openai" },
  { prefix = "o4-", route = "openai" },
}

local function route_of(model)
  for _, r in ipairs(ROUTES) do
    if model:sub(1, #r.prefix) == r.prefix then return r.route end
  end
end

-- Envoy takes a mode_override as the whole new ProcessingMode: start from the filter
-- config above and change what differs, so nothing falls back to DEFAULT / NONE by mistake.
local function processing_mode(changes)
  local m = {
    request_header_mode = "SEND", response_header_mode = "SEND",
    request_body_mode = "BUFFERED", response_body_mode = "BUFFERED",
    request_trailer_mode = "SKIP", response_trailer_mode = "SKIP",
  }
  for k, v in pairs(changes) do m[k] = v end
  return m
end

-- Nothing more to do for this request: no body, no response phases.
local LET_GO = processing_mode {
  request_body_mode = "NONE", response_header_mode = "SKIP", response_body_mode = "NONE",
}

---------------------------------------------------------------------------------------------
-- JSON helpers. callout.json keeps the order in which an object's keys were assigned, so an
-- object built from a list of pairs is written in that order (providers and their SDKs do
-- not need it, but logs, caches and signatures over bodies do, and people read them).

-- ordered{ {"k1", v1}, {"k2", v2} }: an object with those keys in that order; a pair
-- whose value is nil is left out.
local function ordered(pairs_list)
  local o = json.object()
  for _, kv in ipairs(pairs_list) do
    if kv[2] ~= nil then o[kv[1]] = kv[2] end
  end
  return o
end

-- A JSON null from the client means "not given", as OpenAI reads it.
local function given(v)
  if v == json.null then return nil end
  return v
end

-- An OpenAI-style error answer, sent to the client at once.
local function openai_error(status, message, param, code)
  local body = json.encode(ordered {
    { "error", ordered {
      { "message", message },
      { "type", "invalid_request_error" },
      { "param", param or json.null },
      { "code", code or json.null },
    } },
  })
  return { immediate = { status = status,
                         headers = { { "content-type", "application/json" } },
                         body = body } }
end

---------------------------------------------------------------------------------------------
-- OpenAI request -> Anthropic request.

-- Inside messages the translation is an allow-list too: a key it does not carry (an
-- assistant's tool_calls, a name, a part's cache_control, a new field of either API) is
-- refused, naming it, rather than dropped. Each check returns nil, why, where.
local function unsupported(where)
  return nil, where .. " is not supported for this model", where
end

-- The first key of object `o` (a JSON null counts as absent) not in `allowed`, or nil.
local function extra_key(o, allowed)
  for k, v in pairs(o) do
    if not allowed[k] and given(v) ~= nil then return k end
  end
end

local function is_object(v) return json.kind(v) == "object" end

-- What a client's value is, in JSON's words, for an error message. The value itself is never
-- formatted in: tostring of a table or of json.null (a light userdata) is an address.
local function json_type(v)
  if v == json.null then return "null" end
  return json.kind(v) or type(v)   -- object, array, string, number, boolean
end

-- A text part -> its text.
local TEXT_PART = { type = true, text = true }
local function text_part(part, where)
  local k = extra_key(part, TEXT_PART)
  if k then return unsupported(where .. "." .. k) end
  if type(part.text) ~= "string" then
    return nil, where .. ".text must be a string", where .. ".text"
  end
  return part.text
end

-- OpenAI's image_url part -> Anthropic's image block (a data: URL becomes base64 source).
-- `detail` has no counterpart: "auto" (what Anthropic does anyway) is accepted, not sent.
local IMAGE_PART = { type = true, image_url = true }
local IMAGE_URL = { url = true, detail = true }
local function image_block(part, where)
  local k = extra_key(part, IMAGE_PART)
  if k then return unsupported(where .. "." .. k) end
  local iu = part.image_url
  if not is_object(iu) or type(iu.url) ~= "string" then
    return nil, where .. ".image_url.url must be a string", where .. ".image_url.url"
  end
  k = extra_key(iu, IMAGE_URL)
  if k then return unsupported(where .. ".image_url." .. k) end
  if given(iu.detail) ~= nil and iu.detail ~= "auto" then
    return unsupported(where .. ".image_url.detail")
  end
  local url = iu.url
  local media_type, data = url:match("^data:([%w.+/-]+);base64,(.*)$")
  local source
  if media_type then
    source = ordered { { "type", "base64" }, { "media_type", media_type }, { "data", data } }
  else
    source = ordered { { "type", "url" }, { "url", url } }
  end
  return ordered { { "type", "image" }, { "source", source } }
end

-- Content: a string stays a string; a list of parts becomes, through `part_of(part,
-- where)`, a list of what it returns. Anything else is refused at `where`.
local function parts_of(content, where, part_of)
  if type(content) == "string" then return content end
  if json.kind(content) ~= "array" then
    return nil, where .. " must be a string or a list of parts", where
  end
  local out = {}
  for i, part in ipairs(content) do
    local pw = ("%s[%d]"):format(where, i - 1)
    if not is_object(part) then return nil, pw .. " must be an object", pw end
    local v, why, param = part_of(part, pw)
    if v == nil then return nil, why, param end
    out[i] = v
  end
  return out
end

-- Text of a system message: a string, or text parts joined by newlines.
local function system_part(part, where)
  if part.type ~= "text" then return unsupported(where .. ".type") end
  return text_part(part, where)
end
local function text_of(content, where)
  local parts, why, param = parts_of(content, where, system_part)
  if type(parts) == "table" then return table.concat(parts, "\n") end
  return parts, why, param
end

-- Content of a user or assistant message: text parts become text blocks, image_url parts
-- image blocks.
local function message_part(part, where)
  if part.type == "text" then
    local text, why, param = text_part(part, where)
    if not text then return nil, why, param end
    return ordered { { "type", "text" }, { "text", text } }
  elseif part.type == "image_url" then
    return image_block(part, where)
  end
  return unsupported(where .. ".type")
end
local function content_of(content, where)
  local blocks, why, param = parts_of(content, where, message_part)
  if type(blocks) == "table" then return json.array(blocks) end
  return blocks, why, param
end

-- OpenAI parameters with an Anthropic counterpart, and how each is carried over. `model`,
-- `messages`, `max_tokens` and `max_completion_tokens` are handled apart, as they come first.
local PARAMS = {
  temperature = function(out, v) out.temperature = v end,   -- Anthropic accepts 0..1
  top_p = function(out, v) out.top_p = v end,
  stop = function(out, v)
    out.stop_sequences = type(v) == "string" and json.array { v } or v
  end,
  stream = function(out, v) out.stream = v end,
  stream_options = function() end,                          -- read into ctx.state below
  user = function(out, v) out.metadata = ordered { { "user_id", v } } end,
  n = function(_, v) if v ~= 1 then return "only n = 1 is supported" end end,
}
local HANDLED = { model = true, messages = true, max_tokens = true, max_completion_tokens = true }
-- What a message may hold (a JSON null counts as absent).
local MESSAGE_KEYS = { role = true, content = true }

-- The Anthropic body for an OpenAI request, or nil, why, which parameter.
-- Key order: model, max_tokens, system, messages (as in Anthropic's documentation), then
-- the optional parameters in the client's order.
local function to_anthropic(req)
  if json.kind(req.messages) ~= "array" or #req.messages == 0 then
    return nil, "'messages' must be a non-empty array", "messages"
  end
  local system, messages = {}, json.array()
  local first_turn   -- where the conversation began: the first user or assistant message
  for i, m in ipairs(req.messages) do
    local where = ("messages[%d]"):format(i - 1)
    if not is_object(m) then return nil, where .. " must be an object", where end
    local role = m.role
    if role == nil then return nil, where .. ".role is required", where .. ".role" end
    if type(role) ~= "string" then
      return nil, ("%s.role must be a string, got %s"):format(where, json_type(role)),
             where .. ".role"
    end
    -- Anthropic's system text is top-level, read before every turn: a system message in the
    -- middle moved there would change what the model reads, so it is refused, not moved
    if first_turn and (role == "system" or role == "developer") then
      return nil, ("%s.role: Anthropic takes system text only before the conversation, " ..
                   "not after %s ('%s')"):format(where, first_turn, role), where .. ".role"
    end
    if role == "user" or role == "assistant" then first_turn = first_turn or where end
    if role == "system" or role == "developer" or role == "user" or role == "assistant" then
      local k = extra_key(m, MESSAGE_KEYS)
      if k then return unsupported(where .. "." .. k) end
    end
    if role == "system" or role == "developer" then
      local text, why, param = text_of(m.content, where .. ".content")
      if not text then return nil, why, param end
      system[#system + 1] = text
    elseif role == "user" or role == "assistant" then
      local content, why, param = content_of(m.content, where .. ".content")
      if not content then return nil, why, param end
      messages[#messages + 1] = ordered { { "role", role }, { "content", content } }
    else
      return nil, ("%s: role '%s' is not supported for this model"):format(where, role), where
    end
  end
  if #messages == 0 then
    return nil, "'messages' must hold at least one user message", "messages"
  end

  local out = ordered {
    { "model", req.model },
    { "max_tokens", given(req.max_completion_tokens) or given(req.max_tokens) or DEFAULT_MAX_TOKENS },
  }
  if #system == 1 then
    out.system = system[1]
  elseif #system > 1 then
    local blocks = json.array()
    for i, text in ipairs(system) do blocks[i] = ordered { { "type", "text" }, { "text", text } } end
    out.system = blocks
  end
  out.messages = messages
  for k, v in pairs(req) do
    if not HANDLED[k] and given(v) ~= nil then
      local carry = PARAMS[k]
      if not carry then
        return nil, ("parameter '%s' is not supported for this model"):format(k), k
      end
      local why = carry(out, v)
      if why then return nil, why, k end
    end
  end
  return out
end

---------------------------------------------------------------------------------------------
-- Anthropic answers -> OpenAI answers.

local FINISH = {
  end_turn = "stop", stop_sequence = "stop", pause_turn = "stop",
  max_tokens = "length", tool_use = "tool_calls", refusal = "content_filter",
}

local function finish_reason(stop_reason)
  return FINISH[stop_reason] or "stop"
end

-- The provider's answers are read defensively: a value that is missing, null or of the
-- wrong type counts as absent (a token count as 0, a text as none), never a Lua error,
-- which would cut the client's answer with INTERNAL.

-- A token count: a non-negative integer, else 0.
local function count(v)
  if math.type(v) == "integer" and v >= 0 then return v end
  return 0
end

-- OpenAI's usage from Anthropic's: cached prompt tokens count as prompt tokens.
local function usage_of(input_tokens, output_tokens)
  local prompt, completion = count(input_tokens), count(output_tokens)
  return ordered {
    { "prompt_tokens", prompt },
    { "completion_tokens", completion },
    { "total_tokens", prompt + completion },
  }
end

local function prompt_tokens(u)
  if not is_object(u) then return 0 end
  return count(u.input_tokens) + count(u.cache_creation_input_tokens)
         + count(u.cache_read_input_tokens)
end

-- A Messages API answer -> a chat.completion.
local function completion_of(msg)
  local text = {}
  if json.kind(msg.content) == "array" then
    for _, block in ipairs(msg.content) do
      if is_object(block) and block.type == "text" and type(block.text) == "string" then
        text[#text + 1] = block.text
      end
    end
  end
  local usage = is_object(msg.usage) and msg.usage or {}
  return ordered {
    { "id", msg.id },
    { "object", "chat.completion" },
    { "created", os.time() },
    { "model", msg.model },
    { "choices", json.array {
      ordered {
        { "index", 0 },
        { "message", ordered { { "role", "assistant" }, { "content", table.concat(text) } } },
        { "logprobs", json.null },
        { "finish_reason", finish_reason(msg.stop_reason) },
      },
    } },
    { "usage", usage_of(prompt_tokens(usage), usage.output_tokens) },
  }
end

-- Anthropic's {"type":"error","error":{"type":...,"message":...}} -> OpenAI's error object.
-- Anthropic's server-side error types read as OpenAI's server_error; the others (invalid
-- request, authentication, permission, not found, rate limit) share their names.
local function error_of(doc)
  local e = type(doc) == "table" and doc.error
  if type(e) ~= "table" or type(e.message) ~= "string" then return nil end
  local kind = e.type
  if kind == "api_error" or kind == "overloaded_error" then kind = "server_error" end
  return ordered {
    { "error", ordered {
      { "message", e.message },
      { "type", type(kind) == "string" and kind or "api_error" },
      { "param", json.null },
      { "code", json.null },
    } },
  }
end

-- The whole JSON answer (BUFFERED). Something that is not the expected JSON passes as it is.
local function translate_json(body, ctx)
  local ok, doc = pcall(json.decode, body.body)
  if not ok then
    callout.log.warn("provider answer is not JSON, passed through: %s", doc)
    return nil
  end
  local out
  if ctx.state.status >= 400 then
    out = error_of(doc)
  elseif type(doc) == "table" and doc.type == "message" then
    out = completion_of(doc)
  end
  if not out then return nil end
  return { body = json.encode(out) }
end

---------------------------------------------------------------------------------------------
-- The SSE stream (STREAMED): Anthropic's events (message_start, content_block_start,
-- content_block_delta, content_block_stop, message_delta, message_stop, ping, error) become
-- OpenAI's chat.completion.chunk events.

local function sse(obj)
  return "data: " .. json.encode(obj) .. "\n\n"
end

-- One chat.completion.chunk with this delta (JSON text) and finish reason. Its head (id,
-- object, created, model) is the same for every chunk of a stream: it is encoded once, at
-- message_start, and each chunk is string pieces around the delta. Building and encoding
-- the whole object per event was 8 of the 22 us each event cost (6 of them in building the
-- ordered tables), which bounded what the buffered fallback could translate in time.
local function chunk(s, delta, finish)
  if not s.chunk_head then
    s.chunk_head = json.encode(ordered {
      { "id", s.id },
      { "object", "chat.completion.chunk" },
      { "created", s.created },
      { "model", s.model },
    }):sub(1, -2) .. ',"choices":[{"index":0,"delta":'
  end
  return "data: " .. s.chunk_head .. delta .. ',"logprobs":null,"finish_reason":' ..
         (finish and json.encode(finish) or "null") .. "}]}\n\n"
end

-- What one Anthropic event becomes (a string, possibly empty). `s` is the stream's state.
local function translate_event(s, ev)
  local t = ev.type
  if t == "message_start" then
    local msg = type(ev.message) == "table" and ev.message or {}
    s.id, s.model, s.created, s.chunk_head = msg.id, msg.model, os.time(), nil
    s.prompt_tokens = prompt_tokens(msg.usage)
    return chunk(s, '{"role":"assistant","content":""}')
  elseif t == "content_block_delta" then
    local d = type(ev.delta) == "table" and ev.delta or {}
    if d.type == "text_delta" and type(d.text) == "string" then
      return chunk(s, '{"content":' .. json.encode(d.text) .. "}")
    end
  elseif t == "message_delta" then
    local d = type(ev.delta) == "table" and ev.delta or {}
    if is_object(ev.usage) then s.completion_tokens = count(ev.usage.output_tokens) end
    return chunk(s, "{}", finish_reason(d.stop_reason))
  elseif t == "message_stop" then
    s.ended = true
    -- OpenAI sends usage only when asked (stream_options.include_usage), in a last chunk
    -- with no choices
    if s.include_usage then
      return sse(ordered {
        { "id", s.id },
        { "object", "chat.completion.chunk" },
        { "created", s.created },
        { "model", s.model },
        { "choices", json.array() },
        { "usage", usage_of(s.prompt_tokens, s.completion_tokens) },
      })
    end
  elseif t == "error" then
    s.ended = true   -- the provider's own end: its error is passed on, then [DONE]
    local e = error_of(ev)
    if e then return sse(e) end
  end
  -- ping, content_block_start / _stop, thinking and tool deltas: nothing for OpenAI's format
  return ""
end

-- The data of one SSE event block (its `data:` lines joined), or nil. One gmatch over the
-- data lines only; the usual block has one, returned without a table.
local function event_data(block)
  local first, more
  for v in ("\n" .. block):gmatch("\ndata: ?([^\n]*)") do
    if not first then first = v
    else more = more or {}; more[#more + 1] = v end
  end
  if more then return first .. "\n" .. table.concat(more, "\n") end
  return first
end

-- The provider's stream ended without its end (message_stop, or an error event): cut inside
-- an event, or between events. The client must not take it for a whole answer. OpenAI's SDKs
-- (Python, Node) raise APIError on a data event holding "error", so that is how it ends; and
-- no [DONE], which clients that read the raw stream take for a clean end.
local function stream_cut(where)
  callout.log.warn("provider's SSE stream ended %s: the client gets an error event", where)
  return sse(ordered {
    { "error", ordered {
      { "message", ("the provider's stream ended early (%s)"):format(where) },
      { "type", "server_error" },
      { "param", json.null },
      { "code", json.null },
    } },
  })
end

-- One event block: its translation appended to `out`. Returns false when its data is not
-- JSON (the caller decides whether that is a dropped event or a cut stream).
local function translate_block(s, block, out)
  local data = event_data(block)
  if not data then return true end
  local ok, ev = pcall(json.decode, data)
  if not ok or type(ev) ~= "table" then return false, data end
  out[#out + 1] = translate_event(s, ev)
  return true
end

-- Each chunk is scanned once: its line ends are made \n on their own (a \r ending a chunk
-- waits, it may be half of a \r\n), and the unfinished event is kept as a list of pieces
-- (s.held) joined only when its blank line arrives. Gluing the tail to every new chunk and
-- scanning it again was quadratic in an event's size (one long text delta in 16 KiB chunks).
local function translate_stream(body, ctx)
  local s = ctx.state
  local eos = body.end_of_stream
  local c = s.held_cr .. body.body
  s.held_cr = ""
  if not eos and c:sub(-1) == "\r" then c, s.held_cr = c:sub(1, -2), "\r" end
  if c:find("\r", 1, true) then c = c:gsub("\r\n?", "\n") end

  local out, pos, held = {}, 1, s.held
  -- the held event ends in this chunk: where its blank line is
  if #held > 0 then
    local block
    if s.held_nl and c:sub(1, 1) == "\n" then
      held[#held] = held[#held]:sub(1, -2)
      block, pos = table.concat(held), 2
    else
      local blank = c:find("\n\n", 1, true)
      if blank then block, pos = table.concat(held) .. c:sub(1, blank - 1), blank + 2 end
    end
    if block then
      s.held = {}
      local ok, data = translate_block(s, block, out)
      if not ok then callout.log.warn("SSE event is not JSON, dropped: %s", data) end
    elseif not eos then
      if #c > 0 then held[#held + 1], s.held_nl = c, c:sub(-1) == "\n" end
      return { body = "" }
    else
      c, s.held = table.concat(held) .. c, {}   -- the stream ends inside the held event
    end
  end

  local cut
  while true do
    local blank = c:find("\n\n", pos, true)
    if not blank then break end
    local ok, data = translate_block(s, c:sub(pos, blank - 1), out)
    if not ok then callout.log.warn("SSE event is not JSON, dropped: %s", data) end
    pos = blank + 2
  end
  if pos <= #c then
    if eos then
      -- the stream ended without the blank line: take what is there, if it is whole
      if not translate_block(s, c:sub(pos), out) then cut = "in the middle of an event" end
    else
      local tail = c:sub(pos)
      s.held[#s.held + 1], s.held_nl = tail, tail:sub(-1) == "\n"
    end
  end
  if eos then
    if not cut and not s.ended then cut = "before message_stop" end
    out[#out + 1] = cut and stream_cut(cut) or "data: [DONE]\n\n"
  end
  -- one answer per chunk (STREAMED); "" when no event is complete yet
  return { body = table.concat(out) }
end

---------------------------------------------------------------------------------------------
-- Handlers.

local function is_json(content_type)
  local ct = (content_type or ""):lower()
  return ct:find("^application/json") ~= nil
end

-- Headers the route table trusts. The callout owns them: every request loses the client's
-- own at once, in the first answer, and only the body handler sets them. Otherwise a request
-- the callout lets go (GET /v1/models, POST /v1/messages, /v1/chat/completions/ ...) would
-- reach the provider its client named, past the model and parameter allow-lists.
local TRUSTED = { "x-model-route" }

-- A chat completion is exactly POST /v1/chat/completions, with or without a query string.
-- No normalisation: /v1/chat/completions/, //v1/..., %2F, /V1/... are other paths, let go
-- like any other, and with x-model-route removed no route sends them to a provider.
local function is_chat(headers)
  local path = headers:get(":path") or ""
  return headers:get(":method") == "POST"
         and (path == CHAT_PATH or path:sub(1, #CHAT_PATH + 1) == CHAT_PATH .. "?")
end

function on_request_headers(headers, ctx)
  if not is_chat(headers) then
    return { mode_override = LET_GO, remove = TRUSTED }
  end
  if headers.end_of_stream then
    return openai_error(400, "a chat completion request needs a JSON body")
  end
  if not is_json(headers:get("content-type")) then
    return openai_error(400, "Content-Type must be application/json")
  end
  -- the body handler sees only the body: keep what it needs from the headers
  ctx.state.chat = true
  ctx.state.authorization = headers:get("authorization")
  -- removed now (BUFFERED: this answer goes at once), not only when the body handler sets
  -- the route: a body phase that fails under failure_mode_allow leaves no client route
  return { wait_for_body = true, remove = TRUSTED }
end

function on_request_body(body, ctx)
  -- not a chat completion (an Envoy without allow_mode_override still sends the body)
  if not ctx.state.chat then return nil end
  local ok, req = pcall(json.decode, body.body)
  if not ok then
    -- callout.json's reason says what and where (line, column): the client can fix it
    local why = tostring(req):gsub("^callout%.json: ", "")
    return openai_error(400, "the request body is not valid JSON: " .. why)
  end
  if json.kind(req) ~= "object" then
    return openai_error(400, "the request body must be a JSON object")
  end
  local model = given(req.model)
  if model == nil then return openai_error(400, "'model' is required", "model") end
  if type(model) ~= "string" then
    return openai_error(400, "'model' must be a string, got " .. json_type(model), "model")
  end
  local route = route_of(model)
  if not route then
    return openai_error(400, ("the model '%s' is not served here"):format(model), "model",
                        "model_not_found")
  end
  local s = ctx.state
  s.route, s.stream = route, given(req.stream) == true
  local opts = given(req.stream_options)
  s.include_usage = type(opts) == "table" and opts.include_usage == true
  callout.log.debug("model %s -> %s%s", model, route, s.stream and " (stream)" or "")

  if route == "openai" then
    return { add = { { "x-model-route", route } }, clear_route_cache = true }
  end

  local out, why, param = to_anthropic(req)
  if not out then return openai_error(400, why, param) end
  local add = {
    { ":path", ANTHROPIC_PATH },
    { "x-model-route", route },
    { "anthropic-version", ANTHROPIC_VERSION },
    -- the answer is translated, so it must come uncompressed
    { "accept-encoding", "identity" },
  }
  -- the auth scheme is case-insensitive (RFC 9110 11.1)
  local scheme, key = (s.authorization or ""):match("^(%S+)%s+(.+)$")
  if scheme and scheme:lower() == "bearer" then add[#add + 1] = { "x-api-key", key } end
  -- what the client sent may not be writable once re-nested (a value nested to the
  -- decoder's limit is one level deeper in Anthropic's body): the client's mistake, a 400
  local written, text = pcall(json.encode, out)
  if not written then
    local why = tostring(text):gsub("^callout%.json: ", "")
    return openai_error(400, "the request cannot be carried to the provider: " .. why)
  end
  return {
    add = add,
    remove = { "authorization" },
    clear_route_cache = true,
    body = text,
  }
end

function on_response_headers(headers, ctx)
  local s = ctx.state
  if s.route ~= "anthropic" then
    return { mode_override = processing_mode { response_body_mode = "NONE" } }
  end
  s.status = tonumber(headers:get(":status")) or 0
  local ct = (headers:get("content-type") or ""):lower()
  if s.stream and s.status == 200 and ct:find("^text/event%-stream") then
    s.translate, s.held, s.held_cr = translate_stream, {}, ""
    -- the stream is rewritten as it passes: its length is not known
    return { remove = { "content-length" },
             mode_override = processing_mode { response_body_mode = "STREAMED" } }
  elseif is_json(ct) then
    -- the body response carries the translated body's content-length (the server adds it)
    s.translate = translate_json
    return { remove = { "content-length" },
             mode_override = processing_mode { response_body_mode = "BUFFERED" } }
  end
  -- anything else (a proxy's HTML error page, say) reaches the client as it is
  return { mode_override = processing_mode { response_body_mode = "NONE" } }
end

function on_response_body(body, ctx)
  local translate = ctx.state.translate
  if translate then return translate(body, ctx) end
end
