-- examples/ai_gateway.lua: OpenAI chat completions routed by model; Anthropic's Messages API
-- behind it, requests and answers (JSON and SSE) translated.

local testing = require "callout.testing"
-- the server's callout.json, as scripts have it (busted reaches it through callout.native)
local json = require "callout.json"

-- What Envoy announces with the first message for the filter config of the example.
local BUFFERED = { request_body_mode = "BUFFERED", response_body_mode = "BUFFERED" }

local CHAT = {
  [":method"] = "POST", [":path"] = "/v1/chat/completions",
  ["content-type"] = "application/json", ["content-length"] = "180",
  authorization = "Bearer sk-ant-test", ["accept-encoding"] = "gzip",
}

-- The mode_override the example sends: the filter config's modes with one change.
local function mode(changes)
  local m = {
    request_header_mode = "SEND", response_header_mode = "SEND",
    request_body_mode = "BUFFERED", response_body_mode = "BUFFERED",
    request_trailer_mode = "SKIP", response_trailer_mode = "SKIP",
  }
  for k, v in pairs(changes) do m[k] = v end
  return m
end

-- The header mutation and CommonResponse of a decoded response of `phase`.
local function common(resp, phase)
  local r = assert(resp[phase], "no " .. phase .. " response")
  return r.response or {}
end

-- `created` is the clock: the bodies are compared with it as 0, after checking it.
local function uncreated(text)
  local before = os.time()
  local out = text:gsub('"created":(%d+)', function(t)
    t = tonumber(t)
    assert(t >= before - 5 and t <= os.time() + 1, "created is not now: " .. t)
    return '"created":0'
  end)
  return out
end

describe("examples/ai_gateway.lua", function()
  local script = testing.load("examples/ai_gateway.lua")

  -- A stream through the request phases: headers (answered now, empty: BUFFERED holds
  -- nothing) and the whole body. Returns the stream and the body's response.
  local function request(body, headers)
    local stream = testing.stream(script)
    local h = stream:run(testing.request_headers(headers or CHAT, { protocol_config = BUFFERED }))
    assert.same({ "x-model-route" }, common(h, "request_headers").header_mutation.remove_headers)
    return stream, stream:run(testing.request_body(body, { end_of_stream = true }))
  end

  local function rewritten(resp)
    return common(resp, "request_body").body_mutation.body
  end

  -- The immediate answer's body, decoded, after checking status and content type.
  local function refused(resp, status)
    assert.immediate(resp, status or 400)
    assert.header_set(resp, "content-type", "application/json")
    return resp.immediate_response.body
  end

  describe("requests", function()
    it("routes claude- models to Anthropic: path, headers, route cache", function()
      local stream <close>, b = request('{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"Hi"}]}')
      assert.header_set(b, ":path", "/v1/messages")
      assert.header_set(b, "x-model-route", "anthropic")
      assert.header_set(b, "anthropic-version", "2023-06-01")
      assert.header_set(b, "x-api-key", "sk-ant-test")
      assert.header_set(b, "accept-encoding", "identity")
      assert.header_removed(b, "authorization")
      assert.is_true(common(b, "request_body").clear_route_cache)
    end)

    it("reads the Bearer scheme in any case (RFC 9110: schemes are case-insensitive)", function()
      for _, auth in ipairs { "BEARER sk-ant-1", "bEaReR  sk-ant-1" } do
        local h = {}
        for k, v in pairs(CHAT) do h[k] = v end
        h.authorization = auth
        local stream <close>, b = request('{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"Hi"}]}', h)
        assert.header_set(b, "x-api-key", "sk-ant-1")
        assert.header_removed(b, "authorization")
      end
    end)

    it("rewrites the body into Messages format, keys in Anthropic's order", function()
      local stream <close>, b = request(
        '{"model":"claude-sonnet-4-5","messages":[{"role":"system","content":"Be brief."},' ..
        '{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello!"},' ..
        '{"role":"user","content":"Again"}],"temperature":0.5,"stop":"\\n\\n",' ..
        '"max_tokens":100,"user":"u-1","top_p":1.0,"stream":false}')
      local want = '{"model":"claude-sonnet-4-5","max_tokens":100,"system":"Be brief.",' ..
        '"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello!"},' ..
        '{"role":"user","content":"Again"}],"temperature":0.5,"stop_sequences":["\\n\\n"],' ..
        '"metadata":{"user_id":"u-1"},"top_p":1.0,"stream":false}'
      assert.body_replaced(b, want)
      -- the length follows the body (the server's content-length, not the client's 180)
      assert.header_set(b, "content-length", tostring(#want))
    end)

    it("defaults max_tokens, which Anthropic requires, and prefers max_completion_tokens", function()
      local stream <close>, b = request('{"model":"claude-haiku-4-5","messages":[{"role":"user","content":"Hi"}]}')
      assert.equal('{"model":"claude-haiku-4-5","max_tokens":4096,"messages":[{"role":"user","content":"Hi"}]}',
                   rewritten(b))
      local s2 <close>, b2 = request('{"model":"claude-haiku-4-5","max_tokens":7,' ..
        '"max_completion_tokens":9,"messages":[{"role":"user","content":"Hi"}]}')
      assert.equal('{"model":"claude-haiku-4-5","max_tokens":9,"messages":[{"role":"user","content":"Hi"}]}',
                   rewritten(b2))
    end)

    it("joins several system messages into system blocks and maps content parts", function()
      local stream <close>, b = request(
        '{"model":"claude-opus-4-1","messages":[{"role":"system","content":"A"},' ..
        '{"role":"developer","content":[{"type":"text","text":"B"}]},' ..
        '{"role":"user","content":[{"type":"text","text":"look"},' ..
        '{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBO"}},' ..
        '{"type":"image_url","image_url":{"url":"https://x.test/cat.jpg"}}]}],' ..
        '"stop":["END","STOP"],"temperature":null}')
      assert.equal('{"model":"claude-opus-4-1","max_tokens":4096,' ..
        '"system":[{"type":"text","text":"A"},{"type":"text","text":"B"}],' ..
        '"messages":[{"role":"user","content":[{"type":"text","text":"look"},' ..
        '{"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBO"}},' ..
        '{"type":"image","source":{"type":"url","url":"https://x.test/cat.jpg"}}]}],' ..
        '"stop_sequences":["END","STOP"]}', rewritten(b))
    end)

    it("keeps big integers and the stream flag; stream_options stays with the callout", function()
      local stream <close>, b = request('{"model":"claude-sonnet-4-5","stream":true,' ..
        '"stream_options":{"include_usage":true},"max_tokens":12345678901234567,' ..
        '"messages":[{"role":"user","content":"Hi"}]}')
      assert.equal('{"model":"claude-sonnet-4-5","max_tokens":12345678901234567,' ..
        '"messages":[{"role":"user","content":"Hi"}],"stream":true}', rewritten(b))
    end)

    it("passes gpt- models through to OpenAI: only the route header and the route cache", function()
      local stream <close>, b = request('{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi"}],"tools":[]}')
      assert.header_set(b, "x-model-route", "openai")
      assert.is_true(common(b, "request_body").clear_route_cache)
      assert.is_nil(common(b, "request_body").body_mutation)
      local hm = common(b, "request_body").header_mutation
      assert.equal(1, #hm.set_headers)
      assert.same({}, hm.remove_headers or {})
    end)

    it("refuses an unknown model with OpenAI's error, before any backend is asked", function()
      local stream <close>, b = request('{"model":"llama-3-70b","messages":[{"role":"user","content":"Hi"}]}')
      assert.equal('{"error":{"message":"the model \'llama-3-70b\' is not served here",' ..
        '"type":"invalid_request_error","param":"model","code":"model_not_found"}}', refused(b))
      local s2 <close>, b2 = request('{"messages":[{"role":"user","content":"Hi"}]}')
      assert.equal('{"error":{"message":"\'model\' is required","type":"invalid_request_error",' ..
        '"param":"model","code":null}}', refused(b2))
    end)

    it("refuses what it cannot translate: bad JSON, unsupported parameters and roles", function()
      local cases = {
        -- callout.json's reason, with its position
        { '{"model":"claude-sonnet-4-5",',
          "the request body is not valid JSON: unexpected end of document at line 1, column 30", nil },
        { '{"model":"claude-sonnet-4-5","model":"gpt-4o"}',
          'the request body is not valid JSON: duplicate object key "model" at line 1, column 36', nil },
        { '{"model":"claude-sonnet-4-5","max_tokens":123456789012345678901}',
          "the request body is not valid JSON: too big integer at line 1, column 43", nil },
        { '["claude-sonnet-4-5"]', "the request body must be a JSON object", nil },
        { '{"model":"claude-sonnet-4-5","messages":[]}', "'messages' must be a non-empty array", "messages" },
        { '{"model":"claude-sonnet-4-5","messages":{}}', "'messages' must be a non-empty array", "messages" },
        { '{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"x"}],"tools":[]}',
          "parameter 'tools' is not supported for this model", "tools" },
        { '{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"x"}],"n":2}',
          "only n = 1 is supported", "n" },
        { '{"model":"claude-sonnet-4-5","messages":[{"role":"tool","content":"x"}]}',
          "messages[0]: role 'tool' is not supported for this model", "messages[0]" },
        { '{"model":"claude-sonnet-4-5","messages":[{"role":"system","content":"x"}]}',
          "'messages' must hold at least one user message", "messages" },
      }
      for _, c in ipairs(cases) do
        local stream <close>, b = request(c[1])
        local err = json.decode(refused(b)).error
        assert.equal(c[2], err.message, c[1])
        assert.equal(c[3] or json.null, err.param, c[1])
      end
      -- n = 1 is what Anthropic does anyway: accepted, not sent on
      local stream <close>, b = request('{"model":"claude-sonnet-4-5","n":1,"messages":[{"role":"user","content":"x"}]}')
      assert.equal('{"model":"claude-sonnet-4-5","max_tokens":4096,"messages":[{"role":"user","content":"x"}]}',
                   rewritten(b))
    end)

    it("refuses a request it cannot write out again with a 400, not a Lua error", function()
      -- legal for the decoder at depth 256, one level too deep once inside Anthropic's body
      local deep = ("["):rep(255) .. "1" .. ("]"):rep(255)
      local stream <close>, b = request('{"model":"claude-x","messages":[{"role":"user","content":"hi"}],' ..
                                        '"user":' .. deep .. '}')
      local err = refused(b, 400)
      assert.is_truthy(err:find("the request cannot be carried to the provider: nested deeper than 256", 1, true), err)
    end)

    it("refuses a system message after the conversation began, naming its role", function()
      -- Anthropic's system text is top-level, before every turn: a late one moved there
      -- would change what the model reads, silently
      for _, role in ipairs { "system", "developer" } do
        local stream <close>, b = request('{"model":"claude-sonnet-4-5","messages":[' ..
          '{"role":"system","content":"early"},{"role":"user","content":"x"},' ..
          '{"role":"assistant","content":"y"},{"role":"' .. role .. '","content":"late"},' ..
          '{"role":"user","content":"z"}]}')
        local err = json.decode(refused(b)).error
        assert.equal("messages[3].role", err.param)
        assert.equal("messages[3].role: Anthropic takes system text only before the " ..
                     "conversation, not after messages[1] ('" .. role .. "')", err.message)
        assert.equal("invalid_request_error", err.type)
      end
      -- leading ones, however many, still make the top-level system
      local stream <close>, b = request('{"model":"claude-sonnet-4-5","messages":[' ..
        '{"role":"system","content":"A"},{"role":"developer","content":"B"},' ..
        '{"role":"user","content":"x"}]}')
      assert.equal('{"model":"claude-sonnet-4-5","max_tokens":4096,"system":[{"type":"text",' ..
        '"text":"A"},{"type":"text","text":"B"}],"messages":[{"role":"user","content":"x"}]}',
        rewritten(b))
    end)

    it("says what type a value was, never Lua's name for it (no addresses to the client)", function()
      local function ask(messages)
        return '{"model":"claude-sonnet-4-5","messages":' .. messages .. '}'
      end
      local cases = {
        { ask('[{"role":null,"content":"a"}]'), "messages[0].role must be a string, got null",
          "messages[0].role" },
        { ask('[{"role":{"r":"user"},"content":"a"}]'),
          "messages[0].role must be a string, got object", "messages[0].role" },
        { ask('[{"role":["user"],"content":"a"}]'),
          "messages[0].role must be a string, got array", "messages[0].role" },
        { ask('[{"role":5,"content":"a"}]'), "messages[0].role must be a string, got number",
          "messages[0].role" },
        { ask('[{"role":true,"content":"a"}]'), "messages[0].role must be a string, got boolean",
          "messages[0].role" },
        { ask('[{"content":"a"}]'), "messages[0].role is required", "messages[0].role" },
        { '{"model":{"name":"claude-x"},"messages":[{"role":"user","content":"a"}]}',
          "'model' must be a string, got object", "model" },
        { '{"model":null,"messages":[{"role":"user","content":"a"}]}', "'model' is required", "model" },
      }
      for _, c in ipairs(cases) do
        local stream <close>, b = request(c[1])
        local body = refused(b)
        assert.is_nil(body:find("0x", 1, true), body)
        assert.is_nil(body:find("userdata", 1, true), body)
        assert.is_nil(body:find("table:", 1, true), body)
        local err = json.decode(body).error
        assert.equal(c[2], err.message, c[1])
        assert.equal(c[3], err.param, c[1])
      end
    end)

    it("refuses what inside messages it does not carry, naming the field", function()
      local function ask(messages)
        return '{"model":"claude-sonnet-4-5","messages":' .. messages .. '}'
      end
      local cases = {
        { '[{"role":"user","content":"x"},{"role":"assistant","content":"calling",' ..
          '"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]}]',
          "messages[1].tool_calls" },
        { '[{"role":"user","content":"x","name":"alice"}]', "messages[0].name" },
        { '[{"role":"system","content":"x","name":"s"},{"role":"user","content":"x"}]', "messages[0].name" },
        { '[{"role":"user","content":[{"type":"text","text":"x","cache_control":{"type":"ephemeral"}}]}]',
          "messages[0].content[0].cache_control" },
        { '[{"role":"system","content":[{"type":"text","text":"x","cache_control":{"type":"ephemeral"}}]},' ..
          '{"role":"user","content":"x"}]', "messages[0].content[0].cache_control" },
        { '[{"role":"user","content":[{"type":"text","text":"x"},{"type":"input_audio","input_audio":{}}]}]',
          "messages[0].content[1].type" },
        { '[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x.test/a.png","detail":"high"}}]}]',
          "messages[0].content[0].image_url.detail" },
        { '[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x.test/a.png","x":1}}]}]',
          "messages[0].content[0].image_url.x" },
        { '[{"role":"user","content":[{"type":"text"}]}]', "messages[0].content[0].text" },
        { '[{"role":"user","content":[17]}]', "messages[0].content[0]" },
        { '[{"role":"user","content":17}]', "messages[0].content" },
        { '[{"role":"user"}]', "messages[0].content" },
        { '[{"role":"assistant","content":"x","refusal":"no"},{"role":"user","content":"x"}]', "messages[0].refusal" },
        { '[["user","x"]]', "messages[0]" },
      }
      for _, c in ipairs(cases) do
        local stream <close>, b = request(ask(c[1]))
        local err = json.decode(refused(b)).error
        assert.equal(c[2], err.param, c[1])
        assert.is_truthy(err.message:find(c[2], 1, true), err.message)
        assert.equal("invalid_request_error", err.type)
      end
      -- a JSON null is "not given" here too, as SDKs echo assistant messages back with
      -- "tool_calls": null, "refusal": null; detail "auto" is what Anthropic does
      local stream <close>, b = request(ask('[{"role":"user","content":[{"type":"image_url",' ..
        '"image_url":{"url":"https://x.test/a.png","detail":"auto"}}]},' ..
        '{"role":"assistant","content":"ok","tool_calls":null,"refusal":null,"name":null}]'))
      assert.equal('{"model":"claude-sonnet-4-5","max_tokens":4096,"messages":[{"role":"user",' ..
        '"content":[{"type":"image","source":{"type":"url","url":"https://x.test/a.png"}}]},' ..
        '{"role":"assistant","content":"ok"}]}', rewritten(b))
    end)

    it("waits for the body: wait_for_body on chat completions", function()
      -- the handler's own return value, as the server takes it: in BUFFERED mode the
      -- headers answer goes out empty (checked in request()); without a body mode it is
      -- refused, as Envoy would never send the body
      local r = testing.call(script, testing.request_headers(CHAT))
      assert.grpc_error(r, "INTERNAL", "wait_for_body")
    end)

    it("refuses a chat completion without a body or without JSON", function()
      local stream <close> = testing.stream(script)
      local r = stream:run(testing.request_headers(CHAT, { end_of_stream = true, protocol_config = BUFFERED }))
      assert.equal("a chat completion request needs a JSON body",
                   json.decode(refused(r)).error.message)
      local plain = {}
      for k, v in pairs(CHAT) do plain[k] = v end
      plain["content-type"] = "text/plain"
      r = testing.run(script, testing.request_headers(plain, { protocol_config = BUFFERED }))
      assert.equal("Content-Type must be application/json", json.decode(refused(r)).error.message)
    end)

    -- Only the route header is changed: the route table trusts x-model-route, so a client's
    -- own goes, whatever the request.
    local function only_route_removed(r)
      local hm = common(r, "request_headers").header_mutation
      assert.same({ "x-model-route" }, hm.remove_headers)
      assert.same({}, hm.set_headers or {})
      assert.is_nil(common(r, "request_headers").body_mutation)
      assert.is_falsy(common(r, "request_headers").clear_route_cache)
    end

    it("lets other requests go at once, with nothing more sent to the callout, unroutable", function()
      for _, h in ipairs {
        { [":method"] = "GET", [":path"] = "/v1/models" },
        { [":method"] = "GET", [":path"] = "/v1/chat/completions" },
        { [":method"] = "PUT", [":path"] = "/v1/chat/completions" },
        { [":method"] = "POST", [":path"] = "/v1/messages" },
        { [":method"] = "POST", [":path"] = "/v1/embeddings" },
        { [":method"] = "POST", [":path"] = "/v1/chat/completions/x" },
        { [":method"] = "POST", [":path"] = "/v1/chat/completions/" },
        { [":method"] = "POST", [":path"] = "//v1/chat/completions" },
        { [":method"] = "POST", [":path"] = "/v1/chat/completions%2F" },
        { [":method"] = "POST", [":path"] = "/V1/chat/completions" },
        { [":method"] = "POST", [":path"] = "/v1/chat/completions#x" },
      } do
        h["content-type"] = "application/json"
        h["x-model-route"] = "anthropic"   -- the client's pick: must not reach the route table
        local r = testing.run(script, testing.request_headers(h, { protocol_config = BUFFERED }))
        assert.same(mode { request_body_mode = "NONE", response_header_mode = "SKIP",
                           response_body_mode = "NONE" }, r.mode_override, h[":method"] .. " " .. h[":path"])
        only_route_removed(r)
      end
      -- a query string does not hide a chat completion: it waits for its body
      local q = {}
      for k, v in pairs(CHAT) do q[k] = v end
      q[":path"] = "/v1/chat/completions?trace=1"
      local r = testing.run(script, testing.request_headers(q, { protocol_config = BUFFERED }))
      assert.is_nil(r.mode_override)
      only_route_removed(r)
    end)

    it("drops a client's x-model-route on chat completions too, before the body decides", function()
      local h = {}
      for k, v in pairs(CHAT) do h[k] = v end
      h["x-model-route"] = "anthropic"
      local stream <close> = testing.stream(script)
      -- the headers answer already removes it: a body phase that fails (failure_mode_allow)
      -- leaves the request unroutable rather than routed by the client
      only_route_removed(stream:run(testing.request_headers(h, { protocol_config = BUFFERED })))
      local b = stream:run(testing.request_body('{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}',
                                                { end_of_stream = true }))
      assert.header_set(b, "x-model-route", "openai")
    end)

    it("leaves a body alone when Envoy sent it despite the override", function()
      local stream <close> = testing.stream(script)
      stream:run(testing.request_headers({ [":method"] = "POST", [":path"] = "/upload" },
                                         { protocol_config = BUFFERED }))
      assert.unchanged(stream:run(testing.request_body("not json", { end_of_stream = true })))
    end)
  end)

  -----------------------------------------------------------------------------------------
  describe("answers", function()
    local ASK = '{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"Hi"}]}'
    local ASK_STREAM = '{"model":"claude-sonnet-4-5","stream":true,"messages":[{"role":"user","content":"Hi"}]}'
    local ASK_USAGE = '{"model":"claude-sonnet-4-5","stream":true,"stream_options":{"include_usage":true},' ..
                      '"messages":[{"role":"user","content":"Hi"}]}'

    -- A stream that has gone through the request and the response headers; returns it
    -- and the response headers' answer.
    local function answered(ask, status, content_type)
      local stream = request(ask)
      local h = stream:run(testing.response_headers {
        [":status"] = tostring(status), ["content-type"] = content_type, ["content-length"] = "999",
        ["request-id"] = "req_1",
      })
      return stream, h
    end

    it("picks the response body mode from the stream flag (mode_override)", function()
      local s1 <close>, h1 = answered(ASK, 200, "application/json")
      assert.same(mode { response_body_mode = "BUFFERED" }, h1.mode_override)
      assert.header_removed(h1, "content-length")
      local s2 <close>, h2 = answered(ASK_STREAM, 200, "text/event-stream; charset=utf-8")
      assert.same(mode { response_body_mode = "STREAMED" }, h2.mode_override)
      assert.header_removed(h2, "content-length")
      -- a streaming request the provider refused: the error is JSON, buffered
      local s3 <close>, h3 = answered(ASK_STREAM, 429, "application/json")
      assert.same(mode { response_body_mode = "BUFFERED" }, h3.mode_override)
      -- neither JSON nor SSE: not translated, not even sent to the callout
      local s4 <close>, h4 = answered(ASK, 502, "text/html")
      assert.same(mode { response_body_mode = "NONE" }, h4.mode_override)
      assert.is_nil(common(h4, "response_headers").header_mutation)
    end)

    it("does not translate OpenAI's answers: their bodies skip the callout", function()
      local stream <close> = request('{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Hi"}]}')
      local h = stream:run(testing.response_headers { [":status"] = "200", ["content-type"] = "text/event-stream" })
      assert.same(mode { response_body_mode = "NONE" }, h.mode_override)
      assert.is_nil(common(h, "response_headers").header_mutation)
      -- an Envoy that ignores the override sends the body anyway: it passes unchanged
      assert.unchanged(stream:run(testing.response_body("data: {}\n\n", { end_of_stream = true })))
    end)

    it("translates a buffered answer into a chat.completion", function()
      local stream <close> = answered(ASK, 200, "application/json")
      local r = stream:run(testing.response_body(
        '{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5",' ..
        '"content":[{"type":"text","text":"Hello"},{"type":"text","text":", you."}],' ..
        '"stop_reason":"max_tokens","stop_sequence":null,' ..
        '"usage":{"input_tokens":10,"cache_read_input_tokens":2,"output_tokens":5}}',
        { end_of_stream = true }))
      local body = common(r, "response_body").body_mutation.body
      assert.equal('{"id":"msg_01","object":"chat.completion","created":0,"model":"claude-sonnet-4-5",' ..
        '"choices":[{"index":0,"message":{"role":"assistant","content":"Hello, you."},' ..
        '"logprobs":null,"finish_reason":"length"}],' ..
        '"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}', uncreated(body))
      assert.header_set(r, "content-length", tostring(#body))
    end)

    it("translates the provider's error into OpenAI's error", function()
      local stream <close> = answered(ASK_STREAM, 400, "application/json")
      local r = stream:run(testing.response_body(
        '{"type":"error","error":{"type":"invalid_request_error",' ..
        '"message":"temperature: range: 0..1"},"request_id":"req_1"}', { end_of_stream = true }))
      assert.body_replaced(r, '{"error":{"message":"temperature: range: 0..1",' ..
        '"type":"invalid_request_error","param":null,"code":null}}')
      local s2 <close> = answered(ASK, 529, "application/json")
      r = s2:run(testing.response_body(
        '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
        { end_of_stream = true }))
      assert.body_replaced(r, '{"error":{"message":"Overloaded","type":"server_error",' ..
        '"param":null,"code":null}}')
    end)

    it("reads odd provider values as absent: null usage, null or non-string text", function()
      for _, c in ipairs {
        { '"content":[{"type":"text","text":null},{"type":"text","text":{"a":1}},{"type":"text","text":"ok"}],' ..
          '"usage":{"input_tokens":null,"output_tokens":null}', "ok", 0, 0 },
        { '"content":{"type":"text"},"usage":{"input_tokens":"7","output_tokens":2.5,' ..
          '"cache_read_input_tokens":null}', "", 0, 0 },
        { '"content":[null,{"type":"text","text":"a"}],"usage":[1,2]', "a", 0, 0 },
        { '"content":[],"usage":{"input_tokens":4,"output_tokens":3}', "", 4, 3 },
      } do
        local stream <close> = answered(ASK, 200, "application/json")
        local r = stream:run(testing.response_body('{"id":"m","type":"message","model":"c",' .. c[1] ..
                                                   ',"stop_reason":{"x":1}}', { end_of_stream = true }))
        local out = json.decode(common(r, "response_body").body_mutation.body)
        assert.equal(c[2], out.choices[1].message.content, c[1])
        assert.equal("stop", out.choices[1].finish_reason)
        assert.same({ c[3], c[4], c[3] + c[4] },
                    { out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens }, c[1])
      end
    end)

    it("passes an answer it cannot read as it is", function()
      local stream <close> = answered(ASK, 200, "application/json")
      assert.unchanged(stream:run(testing.response_body("{oops", { end_of_stream = true })))
      local s2 <close> = answered(ASK, 500, "application/json")
      assert.unchanged(s2:run(testing.response_body('{"detail":"x"}', { end_of_stream = true })))
    end)

    -------------------------------------------------------------------------------------
    -- SSE
    local EVENTS = {
      'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",' ..
        '"role":"assistant","content":[],"model":"claude-sonnet-4-5","stop_reason":null,' ..
        '"stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":1}}}\n\n',
      'event: content_block_start\ndata: {"type":"content_block_start","index":0,' ..
        '"content_block":{"type":"text","text":""}}\n\n',
      'event: ping\ndata: {"type": "ping"}\n\n',
      'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,' ..
        '"delta":{"type":"text_delta","text":"Hel"}}\n\n',
      'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,' ..
        '"delta":{"type":"text_delta","text":"lo \\"you\\""}}\n\n',
      'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
      'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",' ..
        '"stop_sequence":null},"usage":{"output_tokens":5}}\n\n',
      'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    }
    local STREAM = table.concat(EVENTS)

    local function out_chunk(delta, finish)
      return 'data: {"id":"msg_1","object":"chat.completion.chunk","created":0,' ..
        '"model":"claude-sonnet-4-5","choices":[{"index":0,"delta":' .. delta ..
        ',"logprobs":null,"finish_reason":' .. (finish and '"' .. finish .. '"' or "null") .. '}]}\n\n'
    end
    local ROLE = out_chunk('{"role":"assistant","content":""}')
    local HEL = out_chunk('{"content":"Hel"}')
    local LO = out_chunk('{"content":"lo \\"you\\""}')
    local STOP = out_chunk("{}", "stop")
    local USAGE = 'data: {"id":"msg_1","object":"chat.completion.chunk","created":0,' ..
      '"model":"claude-sonnet-4-5","choices":[],' ..
      '"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}\n\n'
    local DONE = "data: [DONE]\n\n"

    -- Feeds the chunks as response body chunks (STREAMED: one answer each); returns what
    -- each answer sends, `created` zeroed.
    local function feed(stream, chunks)
      local out = {}
      for i, c in ipairs(chunks) do
        local r = stream:run(testing.response_body(c, { end_of_stream = i == #chunks }))
        local m = common(r, "response_body").body_mutation
        assert.is_not_nil(m, "chunk " .. i .. " got no body mutation")
        -- Envoy was configured BUFFERED (protocol_config), so the server adds the length of
        -- the replaced body; in the STREAMED mode the script switched to, Envoy ignores header
        -- changes of a body answer. Nothing else may ride along.
        local hm = common(r, "response_body").header_mutation
        if hm then
          assert.equal(1, #hm.set_headers)
          assert.equal("content-length", hm.set_headers[1].header.key)
          assert.equal(tostring(#m.body), hm.set_headers[1].header.raw_value)
          assert.equal("OVERWRITE_IF_EXISTS_OR_ADD", hm.set_headers[1].append_action)
          assert.same({}, hm.remove_headers or {})
        end
        out[i] = uncreated(m.body)
      end
      return out
    end

    it("translates the stream event by event, an event split across chunks", function()
      local stream <close> = answered(ASK_STREAM, 200, "text/event-stream")
      local cut = #EVENTS[1] + #EVENTS[2] + #EVENTS[3] + 30   -- inside the first delta
      local out = feed(stream, { STREAM:sub(1, cut), STREAM:sub(cut + 1, #STREAM - 10),
                                 STREAM:sub(#STREAM - 9), "" })
      assert.same({ ROLE, HEL .. LO .. STOP, "", DONE }, out)
    end)

    it("sends usage last when the client asked for it, then [DONE]", function()
      local stream <close> = answered(ASK_USAGE, 200, "text/event-stream")
      local out = feed(stream, { STREAM })
      assert.same({ ROLE .. HEL .. LO .. STOP .. USAGE .. DONE }, out)
    end)

    it("reads null usage in a stream as 0", function()
      local stream <close> = answered(ASK_USAGE, 200, "text/event-stream")
      local out = feed(stream, {
        'data: {"type":"message_start","message":{"id":"msg_1","model":"claude-sonnet-4-5",' ..
        '"usage":{"input_tokens":null,"cache_read_input_tokens":2}}}\n\n',
        'data: {"type":"message_delta","delta":{"stop_reason":null},"usage":{"output_tokens":null}}\n\n' ..
        EVENTS[8] })
      assert.same({ ROLE, STOP .. USAGE:gsub('"prompt_tokens":12,"completion_tokens":5,"total_tokens":17',
        '"prompt_tokens":2,"completion_tokens":0,"total_tokens":2') .. DONE }, out)
    end)

    it("gives the same stream whatever the chunking, one byte at a time included", function()
      local want = ROLE .. HEL .. LO .. STOP .. DONE
      for _, size in ipairs { 1, 2, 7, 64, 333 } do
        local stream <close> = answered(ASK_STREAM, 200, "text/event-stream")
        local chunks = {}
        for i = 1, #STREAM, size do chunks[#chunks + 1] = STREAM:sub(i, i + size - 1) end
        local out = feed(stream, chunks)
        for i, o in ipairs(out) do
          -- each answer holds whole events only
          assert.is_truthy(o == "" or o:match("^data: .-\n\n$"), ("size %d, chunk %d: %q"):format(size, i, o))
        end
        assert.equal(want, table.concat(out), "size " .. size)
      end
    end)

    -- The buffered fallback (an Envoy that ignores the override): the whole SSE answer in
    -- one body. (What that costs is measured, not asserted here: docs/examples.md gives the
    -- size that fits the default budget.)
    it("translates a whole SSE answer in one piece", function()
      local stream <close> = answered(ASK_STREAM, 200, "text/event-stream")
      local ev = {}
      for i = 1, 500 do
        ev[i] = 'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,' ..
                '"delta":{"type":"text_delta","text":"tok' .. i .. ' "}}\n\n'
      end
      local body = EVENTS[1] .. table.concat(ev) .. EVENTS[7] .. EVENTS[8]
      local out = feed(stream, { body })[1]
      local n = select(2, out:gsub('"delta":{"content":"tok%d+ "}', ""))
      assert.equal(500, n)
      assert.equal(ROLE, out:sub(1, #ROLE))
      assert.equal(STOP .. DONE, out:sub(-#(STOP .. DONE)))
    end)

    it("holds one long event across many chunks", function()
      local stream <close> = answered(ASK_STREAM, 200, "text/event-stream")
      local text = ("x"):rep(256 * 1024)
      local body = EVENTS[1] .. 'data: {"type":"content_block_delta","delta":{"type":"text_delta",' ..
                   '"text":"' .. text .. '"}}\n\n' .. EVENTS[8]
      local chunks = {}
      for i = 1, #body, 16384 do chunks[#chunks + 1] = body:sub(i, i + 16383) end
      local out = table.concat(feed(stream, chunks))
      assert.equal(ROLE .. out_chunk('{"content":"' .. text .. '"}') .. DONE, out)
    end)

    it("reads CRLF line ends, a CRLF split across chunks too", function()
      local crlf = STREAM:gsub("\n", "\r\n")
      local stream <close> = answered(ASK_STREAM, 200, "text/event-stream")
      local cut = crlf:find("\r\n\r\n", 1, true)   -- between \r and \n
      local out = feed(stream, { crlf:sub(1, cut), crlf:sub(cut + 1) })
      assert.same({ "", ROLE .. HEL .. LO .. STOP .. DONE }, out)
    end)

    it("flushes an event the stream ended without its blank line", function()
      local stream <close> = answered(ASK_STREAM, 200, "text/event-stream")
      local out = feed(stream, { EVENTS[1], EVENTS[4] .. EVENTS[8]:sub(1, -3) })
      assert.same({ ROLE, HEL .. DONE }, out)
    end)

    -- OpenAI's SDKs (Python, Node) raise on a data event with an "error" key; a stream that
    -- just stops, or stops at [DONE], reads to them as a complete answer.
    local CUT = 'data: {"error":{"message":"the provider\'s stream ended early (%s)",' ..
                '"type":"server_error","param":null,"code":null}}\n\n'
    local function warned(text)
      for _, line in ipairs(testing.logs()) do
        if line:find(text, 1, true) then return true end
      end
      return false
    end

    it("ends a stream cut inside an event with an error event, no [DONE], and a warning", function()
      local stream <close> = answered(ASK_STREAM, 200, "text/event-stream")
      local out = feed(stream, { EVENTS[1] .. EVENTS[4],
        'data: {"type":"content_block_delta","delta":{"type":"text_delta","text":"abc', "" })
      assert.same({ ROLE .. HEL, "", CUT:format("in the middle of an event") }, out)
      assert.is_true(warned("provider's SSE stream ended in the middle of an event"))
    end)

    it("ends a stream that stopped before message_stop with an error event, no [DONE]", function()
      local stream <close> = answered(ASK_STREAM, 200, "text/event-stream")
      local out = feed(stream, { EVENTS[1] .. EVENTS[4], "" })
      assert.same({ ROLE .. HEL, CUT:format("before message_stop") }, out)
      assert.is_true(warned("provider's SSE stream ended before message_stop"))
    end)

    it("turns an error event into OpenAI's error chunk", function()
      local stream <close> = answered(ASK_STREAM, 200, "text/event-stream")
      local out = feed(stream, { EVENTS[1] .. EVENTS[4],
        'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n' })
      assert.same({ ROLE .. HEL,
        'data: {"error":{"message":"Overloaded","type":"server_error","param":null,"code":null}}\n\n' .. DONE },
        out)
    end)

    it("drops an event that is not JSON, with a warning, and goes on", function()
      local stream <close> = answered(ASK_STREAM, 200, "text/event-stream")
      local r = stream:run(testing.response_body("data: {broken\n\n" .. EVENTS[1], { end_of_stream = false }))
      assert.equal(ROLE, uncreated(common(r, "response_body").body_mutation.body))
      local warned = false
      for _, line in ipairs(testing.logs()) do
        if line:find("SSE event is not JSON, dropped: {broken", 1, true) then warned = true end
      end
      assert.is_true(warned)
      -- a comment line is no event
      assert.same({ DONE }, feed(stream, { ": a comment\n\n" .. EVENTS[8] }))
    end)
  end)
end)
