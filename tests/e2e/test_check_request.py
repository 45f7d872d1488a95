"""`luacallout --check SCRIPT --request FILE`: a dry run of an exchange file (docs/testing.md)
through the script, in-process. Its answers must be exactly what the running server answers
to the same messages over gRPC, read back independently with Python's protobuf."""

import base64
import json

import pytest
from google.protobuf import json_format

import harness as h
from harness import pb

SCRIPT = r'''
function on_request_headers(headers, ctx)
  local attrs = ctx.attributes and ctx.attributes["envoy.filters.http.ext_proc"] or {}
  return { add = { { "x-path", headers:get(":path") or "-" },
                   { "x-dup", table.concat(headers:get_all("x-a") or {}, "+") },
                   { "x-attr", tostring(attrs["request.method"]) } },
           remove = { "drop-me" } }
end
function on_request_body(body, ctx)
  if body.body == "boom" then error("the body said boom") end
  return { body = "len=" .. #body.body }
end
function on_response_headers(headers, ctx)
  return { add = { { "x-status", headers:get(":status") } } }
end
function on_response_body(body, ctx)
  return { body = string.char(0, 1, 2) .. body.body }
end
'''

# The same four messages, once in the exchange format (maps, pairs, base64, attributes) ...
REQUESTS = [
    {"request_headers": {"headers": {":path": "/items", ":method": "POST", "x-a": ["1", "2"],
                                     "drop-me": "x"}},
     "attributes": {"envoy.filters.http.ext_proc": {"request.method": "POST"}},
     "protocol_config": {"request_body_mode": "BUFFERED"}},
    {"request_body": {"body": "hello", "end_of_stream": True}},
    {"response_headers": {"headers": [[":status", "201"], ["set-cookie", "a"]]}},
    {"response_body": {"body_base64": base64.b64encode(b"\xff\xfe").decode(),
                       "end_of_stream": True}},
]


# ... and as protobuf messages built here, the way Envoy would send them.
def proto_requests():
    first = h.headers_req("request_headers", [(":method", "POST"), (":path", "/items"),
                                              ("drop-me", "x"), ("x-a", "1"), ("x-a", "2")])
    first.attributes["envoy.filters.http.ext_proc"].update({"request.method": "POST"})
    first.protocol_config.request_body_mode = 2   # BUFFERED
    return [first,
            h.body_req("request_body", b"hello", end_of_stream=True),
            h.headers_req("response_headers", [(":status", "201"), ("set-cookie", "a")]),
            h.body_req("response_body", b"\xff\xfe", end_of_stream=True)]


BYTES_FIELDS = {"body", "raw_value", "value"}


def to_proto_json(v):
    """The exchange format's JSON of a message -> proto3 JSON (bytes as base64), written
    independently of lua/callout/exchange.lua."""
    if isinstance(v, list):
        return [to_proto_json(e) for e in v]
    if not isinstance(v, dict):
        return v
    out = {}
    for k, e in v.items():
        if k.endswith("_base64") and k[:-7] in BYTES_FIELDS:
            out[k[:-7]] = e
        elif k in BYTES_FIELDS and isinstance(e, str):
            out[k] = base64.b64encode(e.encode()).decode()
        else:
            out[k] = to_proto_json(e)
    return out


def response_of(line):
    return json_format.ParseDict(to_proto_json(json.loads(line)), pb.ProcessingResponse())


def run_check(servers, script, requests_text, *extra, stdin=None):
    import subprocess
    path = servers.tmpdir / "requests.jsonl"
    if stdin is None:
        path.write_text(requests_text)
    p = subprocess.run([h.BIN, "--check", str(script), "--request", "-" if stdin else str(path),
                        *extra], input=(stdin or "").encode(), capture_output=True, timeout=30,
                       cwd=servers.tmpdir)
    lines = [l for l in p.stdout.decode().split("\n") if l]
    return p.returncode, lines, p.stderr.decode(errors="replace")


def jsonl(msgs):
    return "".join(json.dumps(m) + "\n" for m in msgs)


def test_dry_run_answers_exactly_what_the_server_answers(servers):
    script = servers.script(SCRIPT, "dry.lua")
    rc, lines, err = run_check(servers, script, jsonl(REQUESTS))
    assert rc == 0, (lines, err)
    assert json.loads(lines[-1]) == {"status": {"code": 0, "name": "OK", "message": ""}}
    dry = [response_of(l) for l in lines[:-1]]

    srv = servers.start(script)
    live, code, details = h.process(srv.stub(), proto_requests())
    assert code.value[0] == 0, details
    assert len(live) == 4 and len(dry) == 4, (lines, live)
    for i, (d, l) in enumerate(zip(dry, live)):
        assert d == l, f"answer {i + 1}:\n--check: {d}\nserver: {l}"
    # and the answers are the script's, not two empty messages that happen to agree
    assert h.header_map(live[0].request_headers.response.header_mutation) == [
        ("x-path", b"/items"), ("x-dup", b"1+2"), ("x-attr", b"POST")]
    assert live[1].request_body.response.body_mutation.body == b"len=5"
    assert live[3].response_body.response.body_mutation.body == b"\x00\x01\x02\xff\xfe"
    # binary bytes are written as base64, text as text
    assert json.loads(lines[3])["response_body"]["response"]["body_mutation"] == {
        "body_base64": base64.b64encode(b"\x00\x01\x02\xff\xfe").decode()}
    assert '"raw_value":"/items"' in lines[0]
    assert "dry.lua: ok, handlers:" in err   # the report moved to stderr


def test_a_failing_script_ends_the_stream_with_its_status_and_line(servers):
    script = servers.script(SCRIPT, "fails.lua")
    msgs = [REQUESTS[0], {"request_body": {"body": "boom", "end_of_stream": True}}, REQUESTS[2]]
    rc, lines, err = run_check(servers, script, jsonl(msgs))
    assert rc == 1, (lines, err)
    assert len(lines) == 2, lines          # the headers' answer, then the status: no more
    assert "request_headers" in json.loads(lines[0])
    status = json.loads(lines[1])["status"]
    assert status["code"] == 13 and status["name"] == "INTERNAL", status
    assert "fails.lua:10:" in status["message"] and "the body said boom" in status["message"]


def test_record_lines_are_one_stream_each(servers):
    script = servers.script(SCRIPT, "streams.lua")
    rec = lambda reqs: json.dumps({"version": 1, "requests": reqs, "responses": []})
    text = rec(REQUESTS[:2]) + "\n\n" + rec([{"request_body": {"body": "boom"}}]) + "\n" + \
        rec(REQUESTS[2:]) + "\n"
    rc, lines, err = run_check(servers, script, text)
    assert rc == 1, (lines, err)
    statuses = [json.loads(l) for l in lines if '"status"' in l and '"response' not in l]
    assert [(s["stream"], s["status"]["code"]) for s in statuses] == [(1, 0), (2, 13), (3, 0)]
    assert len(lines) == 2 + 1 + 1 + 2 + 1


def test_a_json_array_from_stdin(servers):
    script = servers.script(SCRIPT, "stdin.lua")
    rc, lines, err = run_check(servers, script, None, stdin=json.dumps(REQUESTS[:1]))
    assert rc == 0, (lines, err)
    assert json.loads(lines[0])["request_headers"]["response"]["header_mutation"][
        "remove_headers"] == ["drop-me"]


def test_undecodable_bytes_get_invalid_argument(servers):
    script = servers.script(SCRIPT, "raw.lua")
    garbage = base64.b64encode(b"\x0a\xff\xff\xff\xff\x0f").decode()
    rc, lines, err = run_check(servers, script, jsonl([{"raw_base64": garbage}]))
    assert rc == 1, (lines, err)
    assert json.loads(lines[-1])["status"]["name"] == "INVALID_ARGUMENT", lines


@pytest.mark.parametrize("text, where, why", [
    ('{"request_headers": {}}\n{"request_body": {"body": }}\n', "requests.jsonl:2:27:", "unallowed token"),
    ('{"request_headerz": {}}\n', "requests.jsonl:1: request 1", "unknown field 'request_headerz'"),
    ('{"request_body": {"body_base64": "abc"}}\n', "request 1.request_body.body_base64",
     "not a multiple of 4"),
    ('{"request_headers": {"headers": [["a"]]}}\n', "request_headers.headers[1]",
     "[name, value] pair"),
    ('{"request_body": {"bodi": "x"}}\n', "request 1", "unknown field 'bodi'"),
    ('\n\n', "requests.jsonl", "no request"),
])
def test_a_bad_file_is_refused_naming_where(servers, text, where, why):
    script = servers.script(SCRIPT, "bad.lua")
    rc, lines, err = run_check(servers, script, text)
    assert rc == 2, (lines, err)
    assert where in err and why in err, err
    assert lines == [], lines


def test_request_needs_check(servers):
    rc, out, err = servers.run_to_exit(["--request", "x.json", "script.lua"])
    assert rc == 2 and "--request is a dry run of --check" in err, err


STATUS_SCRIPT = """
function on_request_headers(h, ctx)
  local c = h:get("case")
  if c == "long" then error(string.rep("a", 5000)) end
  if c == "byte" then error("bad byte \\255 here") end
  if c == "echo" then error("header was: " .. (h:get("x") or "")) end
  if c == "deny" then return { deny = "denied \\255" } end
end
"""


def test_status_messages_long_or_not_utf8_are_kept_and_match_the_server(servers):
    """A status message is bytes: one longer than 1 KiB, or not UTF-8 (a script's error
    quoting a client's header), is printed whole (message_base64 when not UTF-8) by the dry
    run and by send against a running server — the same lines — and recorded the same."""
    import subprocess
    script = servers.script(STATUS_SCRIPT, "status.lua")
    streams = [[{"request_headers": {"headers": [["case", c]] + extra}}]
               for c, extra in (("long", []), ("byte", []),
                                ("echo", [{"key": "x", "raw_value_base64": "/w=="}]),
                                ("deny", []), ("ok", []))]
    text = "".join(json.dumps({"requests": s}) + "\n" for s in streams)
    rc, dry, err = run_check(servers, script, text)
    assert rc == 1, (dry, err)
    statuses = [json.loads(l)["status"] for l in dry if '"status"' in l]
    assert [s["code"] for s in statuses] == [13, 13, 13, 7, 0], dry

    def message(s):
        return base64.b64decode(s["message_base64"]) if "message_base64" in s \
            else s["message"].encode()
    assert message(statuses[0]).endswith(b"a" * 1500), statuses[0]
    assert b"bad byte \xff here" in message(statuses[1]) and "message" not in statuses[1]
    assert message(statuses[2]).endswith(b"header was: \xff")
    assert message(statuses[3]) == b"denied \xff"

    record = servers.tmpdir / "rec"
    srv = servers.start(script, "--record", str(record))
    path = servers.tmpdir / "status.jsonl"
    path.write_text(text)
    p = subprocess.run([h.BIN, "send", str(path), "--target", srv.target("plaintext"),
                        "--plaintext"], capture_output=True, timeout=30)
    live = [l for l in p.stdout.decode().split("\n") if l]
    assert p.returncode == 1, p.stderr
    assert live == dry, "send and --check --request differ"
    srv.signal_and_wait()
    lines = [json.loads(l) for f in sorted(record.glob("*.jsonl")) for l in f.open()]
    assert sorted((l["stream"], json.dumps(l["status"])) for l in lines) == \
        sorted((i + 1, json.dumps(s)) for i, s in enumerate(statuses)), lines
