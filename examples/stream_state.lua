-- stream_state.lua — per-stream state: copy a request header into the response.
--
-- One ext_proc stream carries one HTTP request and its response, and ctx.state lives as
-- long as the stream: what the request phase stores there, the response phase finds.
-- Here the request's "x-request-id" comes back on the response, so a client can match
-- them up without the backend's help.

local HEADER = "x-request-id"

function on_request_headers(headers, ctx)
  ctx.state.request_id = headers:get(HEADER)
end

function on_response_headers(headers, ctx)
  local id = ctx.state.request_id
  if id ~= nil then
    return { add = { { HEADER, id } } }
  end
end
