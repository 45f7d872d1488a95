"""`luacallout send FILE --target HOST:PORT`: the binary as a gRPC client of a running server.
Each stream of an exchange file (docs/testing.md) is one Process call; every answer is printed
as a JSON line as it arrives, then the stream's status line. Over h2c, TLS verified against a
CA, TLS without verification (--insecure), and mTLS; exit 0 / 1 / 2 for OK / a failed stream /
a usage or file error."""

import base64
import json
import socket
import subprocess
import time

import pytest
from google.protobuf import json_format

import harness as h

BASIC = h.SRC / "examples" / "basic.lua"

# basic.lua's four answers, in the exchange format's response JSON (proto field names, sparse).
BASIC_ANSWERS = [
    {"request_headers": {"response": {
        "clear_route_cache": True,
        "header_mutation": {
            "remove_headers": ["foo"],
            "set_headers": [
                {"header": {"key": ":authority", "raw_value": "service-extensions.com"}},
                {"header": {"key": ":path", "raw_value": "/"}},
                {"header": {"key": "header-request", "raw_value": "request"}}]}}}},
    {"request_body": {"response": {"body_mutation": {"body": "replaced-body"}}}},
    {"response_headers": {"response": {"header_mutation": {"set_headers": [
        {"header": {"key": "hello", "raw_value": "service-extensions"}}]}}}},
    {"response_body": {"response": {"body_mutation": {"clear_body": True}}}},
]
OK_LINE = {"status": {"code": 0, "name": "OK", "message": ""}}

# A hand-written file: headers as a map and as pairs, a text body and a base64 one.
BASIC_FILE = "\n".join([
    '{"request_headers": {"headers": {":path": "/x", ":method": "GET", "foo": "1"}}}',
    '{"request_body": {"body": "hello", "end_of_stream": true}}',
    '{"response_headers": {"headers": [[":status", "200"], ["set-cookie", "a"], '
    '["set-cookie", "b"]]}}',
    '{"response_body": {"body_base64": "AAH/", "end_of_stream": true}}',
]) + "\n"

# What the server received, sent back: the bytes of each body and the headers it saw.
ECHO = r'''
local function hex(s) return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end)) end
function on_request_headers(headers, ctx)
  ctx.state.n = (ctx.state.n or 0) + 1
  return { add = { { "x-path", headers:get(":path") or "-" },
                   { "x-cookies", table.concat(headers:get_all("set-cookie") or {}, "+") },
                   { "x-authority", headers:get(":authority") or "-" } } }
end
function on_response_headers(headers, ctx)
  return { add = { { "x-cookies", table.concat(headers:get_all("set-cookie") or {}, "+") } } }
end
function on_request_body(body, ctx)
  if body.body == "boom" then error("the body said boom") end
  return { body = "hex:" .. hex(body.body) }
end
function on_response_body(body, ctx)
  return { body = string.char(0xff) .. body.body }
end
'''

# Holds every chunk of a FULL_DUPLEX_STREAMED body and answers them all at the end: a
# client that waited for an answer before sending the next message would wait forever.
HOLD = r'''
function on_request_body(body, ctx)
  ctx.state.held = (ctx.state.held or "") .. body.body
  if not body.end_of_stream then return { chunks = {} } end
  return { chunks = { ctx.state.held } }
end
'''


def send(*args, stdin=None, timeout=30):
    """Runs `luacallout send ARGS`: (exit code, stdout's JSON lines, stderr, seconds)."""
    t0 = time.monotonic()
    p = subprocess.run([h.BIN, "send", *map(str, args)], input=stdin, capture_output=True,
                       timeout=timeout)
    took = time.monotonic() - t0
    out = p.stdout.decode()
    lines = [json.loads(l) for l in out.splitlines() if l.strip()]
    err = p.stderr.decode(errors="replace")
    assert not h.sanitizer_report(err), err
    return p.returncode, lines, err, took


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def set_headers(answer, phase):
    muts = answer[phase]["response"]["header_mutation"]["set_headers"]
    # sparse: an empty value is left out
    return {m["header"]["key"]: m["header"].get("raw_value", "") for m in muts}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return h.gen_certs(tmp_path_factory.mktemp("pki") / "certs")


@pytest.fixture(scope="module")
def basic(module_servers, pki):
    """basic.lua, its TLS port serving gen-certs' server certificate (localhost, 127.0.0.1)."""
    return module_servers.start(BASIC, "--cert_chain_path", str(pki / "server.pem"),
                                "--private_key_path", str(pki / "server.key"))


@pytest.fixture(scope="module")
def echo(module_servers):
    return module_servers.start(module_servers.script(ECHO, "echo.lua"))


# --------------------------------------------------------------------------------------------
# what is sent and what is printed
# --------------------------------------------------------------------------------------------

def test_plaintext_prints_exactly_what_the_script_answers(basic, tmp_path):
    f = write(tmp_path, "req.jsonl", BASIC_FILE)
    rc, lines, err, _ = send(f, "--target", basic.target("plaintext"), "--plaintext")
    assert rc == 0, err
    assert lines == BASIC_ANSWERS + [OK_LINE]


def test_same_lines_as_check_request(basic, tmp_path):
    """A live server and the in-process dry run print the same JSON, line for line."""
    f = write(tmp_path, "req.jsonl", BASIC_FILE)
    p = subprocess.run([h.BIN, "--check", str(BASIC), "--request", str(f)], capture_output=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr
    live = subprocess.run([h.BIN, "send", str(f), "--target", basic.target("plaintext"),
                           "--plaintext"], capture_output=True, timeout=30)
    assert live.returncode == 0, live.stderr
    assert live.stdout == p.stdout and live.stdout.count(b"\n") == 5


# docs/testing.md's example and its grpcurl equivalent (proto3 JSON: camelCase, bytes base64)
DOC_FILE = ('{"request_headers": {"headers": {":method": "GET", ":path": "/hello", "foo": "bar"}}}\n'
            '{"request_body": {"body": "hi", "end_of_stream": true}}\n')
DOC_GRPCURL = [
    '{"requestHeaders": {"headers": {"headers": [{"key": ":method", "rawValue": "R0VU"}, '
    '{"key": ":path", "rawValue": "L2hlbGxv"}, {"key": "foo", "rawValue": "YmFy"}]}}}',
    '{"requestBody": {"body": "aGk=", "endOfStream": true}}']


def proto3_of(v):
    """send's JSON of an answer -> proto3 JSON with proto field names (bytes in base64)."""
    if isinstance(v, list):
        return [proto3_of(e) for e in v]
    if not isinstance(v, dict):
        return v
    out = {}
    for k, e in v.items():
        if k in ("body", "raw_value") and isinstance(e, str):
            out[k] = base64.b64encode(e.encode()).decode()
        elif k.endswith("_base64"):
            out[k[:-7]] = e
        else:
            out[k] = proto3_of(e)
    return out


def test_the_documented_grpcurl_request_is_the_same_stream(basic, tmp_path):
    """The doc's grpcurl messages, sent with grpc-python, get the answers send prints for the
    doc's request file."""
    f = write(tmp_path, "hello.jsonl", DOC_FILE)
    rc, lines, err, _ = send(f, "--target", basic.target("plaintext"), "--plaintext")
    assert rc == 0, err
    reqs = [json_format.Parse(m, h.pb.ProcessingRequest()) for m in DOC_GRPCURL]
    responses, code, details = h.process(basic.stub("plaintext"), reqs)
    assert code == h.grpc.StatusCode.OK, details
    got = [json_format.MessageToDict(r, preserving_proto_field_name=True) for r in responses]
    assert got == [proto3_of(l) for l in lines[:-1]] and len(got) == 2
    assert lines[-1] == OK_LINE


def test_the_bytes_sent_are_the_file_s(echo, tmp_path):
    """Pairs keep order and duplicates, base64 bodies arrive as bytes, and an answer that is
    not UTF-8 prints as body_base64."""
    f = write(tmp_path, "req.jsonl", BASIC_FILE)
    rc, lines, err, _ = send(f, "--target", echo.target("plaintext"), "--plaintext")
    assert rc == 0, err
    assert len(lines) == 5 and lines[-1] == OK_LINE, lines
    got = set_headers(lines[0], "request_headers")
    assert got["x-path"] == "/x" and got["x-cookies"] == ""
    assert lines[1] == {"request_body": {"response": {"body_mutation": {"body": "hex:68656c6c6f"}}}}
    assert set_headers(lines[2], "response_headers") == {"x-cookies": "a+b"}
    body = lines[3]["response_body"]["response"]["body_mutation"]
    assert base64.b64decode(body["body_base64"]) == b"\xff\x00\x01\xff", body


def test_stdin_and_a_json_array(echo):
    req = json.dumps([{"request_headers": {"headers": {":path": "/from-stdin"}}},
                      {"request_body": {"body_base64": "/w==", "end_of_stream": True}}])
    rc, lines, err, _ = send("-", "--target", echo.target("plaintext"), "--plaintext",
                             stdin=req.encode())
    assert rc == 0, err
    assert set_headers(lines[0], "request_headers")["x-path"] == "/from-stdin"
    assert lines[1]["request_body"]["response"]["body_mutation"]["body"] == "hex:ff"
    assert lines[2:] == [OK_LINE]


def test_record_lines_are_one_stream_each(echo, tmp_path):
    """Three record lines, three streams: ctx.state starts afresh in each, and each status
    line names its stream."""
    recs = []
    for i in range(3):
        recs.append(json.dumps({"version": 1, "stream": 40 + i, "requests": [
            {"request_headers": {"headers": {":path": f"/r{i}"}}},
            {"request_body": {"body": f"b{i}", "end_of_stream": True}}],
            "responses": [[], []], "status": {"code": 0, "name": "OK", "message": ""}}))
    f = write(tmp_path, "rec.jsonl", "\n".join(recs) + "\n")
    rc, lines, err, _ = send(f, "--target", echo.target("plaintext"), "--plaintext")
    assert rc == 0, err
    assert len(lines) == 9, lines
    for i in range(3):
        a, b, status = lines[3 * i:3 * i + 3]
        assert set_headers(a, "request_headers")["x-path"] == f"/r{i}"
        assert b["request_body"]["response"]["body_mutation"]["body"] == "hex:" + f"b{i}".encode().hex()
        assert status == {"stream": i + 1, "status": OK_LINE["status"]}


def test_a_failing_script_exits_1_with_its_status(echo, tmp_path):
    f = write(tmp_path, "req.jsonl",
              '{"request_headers": {"headers": {":path": "/"}}}\n'
              '{"request_body": {"body": "boom", "end_of_stream": true}}\n')
    rc, lines, err, _ = send(f, "--target", echo.target("plaintext"), "--plaintext")
    assert rc == 1, (lines, err)
    assert "request_headers" in lines[0]
    status = lines[-1]["status"]
    assert status["code"] != 0 and status["name"] != "OK", status
    assert "the body said boom" in status["message"], status


def test_answers_held_until_later_messages(servers, tmp_path):
    """FULL_DUPLEX_STREAMED: the script answers nothing to the first two chunks and all three
    at the end; send keeps writing while no answer comes."""
    srv = servers.start(HOLD)
    f = write(tmp_path, "req.jsonl", "\n".join([
        '{"request_headers": {"headers": {":path": "/"}}, '
        '"protocol_config": {"request_body_mode": "FULL_DUPLEX_STREAMED"}}',
        '{"request_body": {"body": "a"}}',
        '{"request_body": {"body": "b"}}',
        '{"request_body": {"body": "c", "end_of_stream": true}}']) + "\n")
    rc, lines, err, took = send(f, "--target", srv.target("plaintext"), "--plaintext",
                                "--timeout_ms", "5000")
    assert rc == 0, (lines, err)
    assert [list(l) for l in lines] == [["request_headers"], ["request_body"], ["status"]], lines
    assert lines[1] == {"request_body": {"response": {"body_mutation": {
        "streamed_response": {"body": "abc", "end_of_stream": True}}}}}
    assert took < 4, took


def test_observability_mode_answers_nothing(basic, tmp_path):
    f = write(tmp_path, "req.jsonl",
              '{"request_headers": {"headers": {":path": "/"}}, "observability_mode": true}\n'
              '{"request_body": {"body": "x", "end_of_stream": true}, "observability_mode": true}\n')
    rc, lines, err, took = send(f, "--target", basic.target("plaintext"), "--plaintext")
    assert rc == 0, err
    assert lines == [OK_LINE]
    assert took < 5, took


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------

def test_tls_verified_with_ca(basic, pki, tmp_path):
    f = write(tmp_path, "req.jsonl", BASIC_FILE)
    rc, lines, err, _ = send(f, "--target", basic.target("secure"), "--ca", str(pki / "ca.pem"))
    assert rc == 0, err
    assert lines == BASIC_ANSWERS + [OK_LINE]
    # the name checked is --authority's: the certificate has localhost, not other.example
    rc, lines, err, _ = send(f, "--target", basic.target("secure"), "--ca", str(pki / "ca.pem"),
                             "--authority", "localhost")
    assert rc == 0, err
    rc, lines, err, _ = send(f, "--target", basic.target("secure"), "--ca", str(pki / "ca.pem"),
                             "--authority", "other.example")
    assert rc == 1 and f"cannot connect to {basic.target('secure')}" in err, err


def test_tls_default_roots_refuse_a_private_ca(basic, tmp_path):
    f = write(tmp_path, "req.jsonl", BASIC_FILE)
    rc, lines, err, _ = send(f, "--target", basic.target("secure"))
    assert rc == 1, (lines, err)
    assert f"luacallout send: cannot connect to {basic.target('secure')}:" in err, err
    assert lines[-1]["status"]["name"] == "UNAVAILABLE", lines


def test_insecure_accepts_a_self_signed_cert_with_a_wrong_name(servers, tmp_path):
    """The ephemeral certificate, self-signed for wrong.example: refused by the system roots
    and (name mismatch) by itself as CA; --insecure connects anyway."""
    srv = servers.start(BASIC, "--cert_hostnames", "wrong.example")
    cert = write(tmp_path, "eph.pem", h.ephemeral_cert_of(srv))
    f = write(tmp_path, "req.jsonl", BASIC_FILE)
    target = srv.target("secure")
    for extra in ([], ["--ca", cert]):
        rc, lines, err, _ = send(f, "--target", target, *extra)
        assert rc == 1, (extra, lines, err)
        assert f"luacallout send: cannot connect to {target}:" in err, err
        assert [l["status"]["name"] for l in lines] == ["UNAVAILABLE"], lines
    rc, lines, err, _ = send(f, "--target", target, "--insecure")
    assert rc == 0, err
    assert lines == BASIC_ANSWERS + [OK_LINE]
    # the name given to it is trusted no more than the one it replaces
    rc, lines, err, _ = send(f, "--target", target, "--ca", cert, "--authority", "wrong.example")
    assert rc == 0, err


def test_mtls_client_certificate(servers, pki, tmp_path):
    srv = servers.start(BASIC, "--cert_chain_path", str(pki / "server.pem"), "--private_key_path",
                        str(pki / "server.key"), "--client_ca_path", str(pki / "ca.pem"))
    f = write(tmp_path, "req.jsonl", BASIC_FILE)
    target = srv.target("secure")
    rc, lines, err, _ = send(f, "--target", target, "--ca", str(pki / "ca.pem"),
                             "--cert", str(pki / "client.pem"), "--key", str(pki / "client.key"))
    assert rc == 0, err
    assert lines == BASIC_ANSWERS + [OK_LINE]
    rc, lines, err, _ = send(f, "--target", target, "--ca", str(pki / "ca.pem"), "--timeout_ms", "3000")
    assert rc == 1, (lines, err)
    assert [l["status"]["name"] for l in lines] == ["UNAVAILABLE"], lines
    assert f"luacallout send: cannot connect to {target}:" in err, err


# --------------------------------------------------------------------------------------------
# failures: connection, file, usage
# --------------------------------------------------------------------------------------------

def test_connection_refused_exits_1_quickly(tmp_path):
    f = write(tmp_path, "req.jsonl", BASIC_FILE + BASIC_FILE.replace('"/x"', '"/y"'))
    port = h.free_port()
    rc, lines, err, took = send(f, "--target", f"127.0.0.1:{port}", "--plaintext")
    assert rc == 1, (lines, err)
    assert f"luacallout send: cannot connect to 127.0.0.1:{port}:" in err, err
    assert "refused" in err.lower(), err
    assert [l["status"]["name"] for l in lines] == ["UNAVAILABLE"], lines
    assert took < 5, took


def test_a_silent_listener_is_bounded_by_timeout_ms(tmp_path):
    """A socket that accepts TCP and never speaks HTTP/2: the connection never becomes ready,
    and --timeout_ms ends the stream."""
    f = write(tmp_path, "req.jsonl", BASIC_FILE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        target = "127.0.0.1:%d" % s.getsockname()[1]
        rc, lines, err, took = send(f, "--target", target, "--plaintext", "--timeout_ms", "500")
    assert rc == 1, (lines, err)
    assert lines == [{"status": {"code": 4, "name": "DEADLINE_EXCEEDED",
                                 "message": lines[0]["status"]["message"]}}], lines
    assert f"cannot connect to {target}" in err, err
    assert 0.4 < took < 5, took


def test_bad_json_exits_2_naming_file_and_line(tmp_path):
    f = write(tmp_path, "bad.jsonl", '{"request_headers": {"headers": {":path": "/"}}}\n'
                                     '{"request_body": {"body": "x",}\n')
    rc, lines, err, _ = send(f, "--target", f"127.0.0.1:{h.free_port()}", "--plaintext")
    assert rc == 2 and lines == [], (lines, err)
    assert f"{f}:2:" in err, err
    f = write(tmp_path, "bad.json", '[{"request_headers": {"headers": {}}},\n'
                                    ' {"request_bodyy": {}}]\n')
    rc, lines, err, _ = send(f, "--target", f"127.0.0.1:{h.free_port()}", "--plaintext")
    assert rc == 2 and lines == [], (lines, err)
    assert f"{f}:" in err and "request_bodyy" in err, err


def test_usage(tmp_path):
    p = subprocess.run([h.BIN, "send", "--help"], capture_output=True, timeout=10)
    assert p.returncode == 0
    assert b"--target HOST:PORT" in p.stdout and b"--insecure" in p.stdout
    f = write(tmp_path, "req.jsonl", BASIC_FILE)
    for args, says in [((f,), "--target"),
                       ((f, "--target", "x:1", "--bogus"), "unknown flag --bogus"),
                       ((f, "--target", "x:1", "--plaintext", "--ca", f), "--plaintext"),
                       ((f, "--target", "x:1", "--insecure", "--ca", f), "pick one"),
                       ((f, "--target", "x:1", "--cert", f), "--cert and --key"),
                       ((f, "--target", "x:1", "--timeout_ms", "0"), "--timeout_ms"),
                       ((f, f, "--target", "x:1"), "one request file"),
                       ((tmp_path / "missing.jsonl", "--target", "x:1"), "missing.jsonl"),
                       ((f, "--target", "x:1", "--ca", tmp_path / "nope.pem"), "nope.pem")]:
        rc, lines, err, _ = send(*args)
        assert rc == 2 and lines == [], (args, rc, lines, err)
        assert says in err, (args, err)
