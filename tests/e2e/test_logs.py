"""Logs (docs/operations.md, Logs): --log_format json writes one JSON object per line for
everything the server says — start-up, streams, script errors with their traceback,
callout.log, reloads, shutdown — with the fields that say which stream, phase, script line
and worker a record is about; the text format stays as it was; records of different
processes never share a line."""

import json
import re
import signal
import socket
import subprocess
import threading
import time

import grpc
import pytest

import harness as h

OK = grpc.StatusCode.OK
INTERNAL = grpc.StatusCode.INTERNAL

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SEVERITY = {"debug": "DEBUG", "info": "INFO", "warn": "WARNING", "error": "ERROR"}

HELPER = """
local M = {}
function M.check(v)
  if v == "module" then
    error("helper refused " .. v)
  end
end
return M
"""

SCRIPT = """
local helper = require "helper"
callout.log.info("script loaded")
local function explode(t)
  return t.missing.field
end

function on_request_headers(headers, ctx)
  callout.log.info({ ["logging.googleapis.com/trace"] = headers:get("x-trace") or "none",
                     path = headers:get(":path") }, "seen %s", headers:get(":path") or "?")
  local what = headers:get("x-fail")
  if what == "index" then explode({}) end
  if what == "module" then helper.check(what) end
  if what == "loop" then while true do end end
  if what == "table" then return { bogus = 1 } end
  if what == "deny" then callout.deny_callout("go away") end
  if what == "multiline" then callout.log.warn("two\\nlines \\0 and \\255 a bad byte") end
  return { add = { { "x-stream-id", tostring(ctx.stream_id) } } }
end

function on_response_headers(headers, ctx)
  callout.log.debug("response for stream %d", ctx.stream_id)
end
"""


def line_of(source, needle):
    return next(i for i, l in enumerate(source.splitlines(), 1) if needle in l)


def write_scripts(dirpath):
    # a long folder name: Lua shortens paths past 60 characters in its messages ("..."),
    # the script field must still be the whole path
    d = dirpath / ("a-folder-with-a-rather-long-name-" + "x" * 40)
    d.mkdir()
    (d / "helper.lua").write_text(HELPER)
    script = d / "logs.lua"
    script.write_text(SCRIPT)
    return script


def stream_id_of(responses):
    muts = responses[0].request_headers.response.header_mutation.set_headers
    return int(next(m.header.raw_value.decode() for m in muts if m.header.key == "x-stream-id"))


def run(stub, fail=None, trace=None, response=False):
    pairs = [(":path", "/p")]
    if fail:
        pairs.append(("x-fail", fail))
    if trace:
        pairs.append(("x-trace", trace))
    reqs = [h.headers_req("request_headers", pairs)]
    if response:
        reqs.append(h.headers_req("response_headers", [(":status", "200")]))
    return h.process(stub, reqs)


def records(text):
    """Every line of the log as a JSON object; fails on the first line that is not one."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError as e:
            pytest.fail(f"log line {n} is not JSON ({e}): {line!r}\n--- log ---\n{text}")
        assert isinstance(rec, dict), line
        out.append(rec)
    return out


def check_required(rec):
    assert TS.match(rec["ts"]), rec
    assert rec["level"] in SEVERITY, rec
    assert rec["severity"] == SEVERITY[rec["level"]], rec
    assert isinstance(rec["msg"], str) and rec["message"] == rec["msg"], rec
    for k in ("stream_id", "line", "worker"):
        assert k not in rec or (isinstance(rec[k], int) and rec[k] >= 0), rec
    for k in ("phase", "script", "traceback"):
        assert k not in rec or isinstance(rec[k], str), rec


def wait_records(server, pred, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        recs = records(server.log())
        if pred(recs):
            return recs
        if time.monotonic() > deadline:
            pytest.fail(f"never logged: {what}\n--- log ---\n{server.log()}")
        time.sleep(0.05)


def test_json_every_line_is_one_object_with_the_fields(servers, tmp_path):
    script = write_scripts(tmp_path)
    helper = script.parent / "helper.lua"
    srv = servers.start(script, "--log_format", "json", "--log_level", "debug", "--threads", "2",
                        "--script_timeout_ms", "100")
    stub = srv.stub()

    responses, code, details = run(stub, trace="projects/p/traces/abc", response=True)
    assert code == OK, details
    ok_id = stream_id_of(responses)
    for fail in ("index", "module", "loop", "table", "deny", "multiline"):
        _, code, details = run(stub, fail=fail)
        assert code != OK or fail == "multiline", (fail, details)

    srv.proc.send_signal(signal.SIGHUP)
    wait_records(srv, lambda rs: any("generation 2 serves new streams" in r["msg"] for r in rs),
                 "the reload")
    assert srv.signal_and_wait() == 0
    recs = records(srv.log())
    for r in recs:
        check_required(r)
    msgs = [r["msg"] for r in recs]

    # start-up, reload and shutdown, from the supervisor (no worker field)
    for needle in ("loaded ", "plaintext gRPC listening", "reloaded ", "stopped"):
        [r] = [r for r in recs if r["msg"].startswith(needle) and r["level"] == "info"][:1]
        assert "worker" not in r, r
    # the script's load-time line: the supervisor's load (no worker) and every worker's VMs
    loaded = [r for r in recs if r["msg"] == "script: script loaded"]
    assert {r.get("worker") for r in loaded} == {None, 0, 1}, loaded
    assert all("stream_id" not in r and "phase" not in r for r in loaded)

    # callout.log in a handler: the stream, the phase, the fields as members
    [seen] = [r for r in recs if r["msg"] == "seen /p" and r.get("stream_id") == ok_id]
    assert seen["phase"] == "request_headers" and seen["level"] == "info"
    assert seen["logging.googleapis.com/trace"] == "projects/p/traces/abc"
    assert seen["path"] == "/p" and isinstance(seen["worker"], int)
    [resp] = [r for r in recs if r["msg"] == f"response for stream {ok_id}"]
    assert (resp["stream_id"], resp["phase"], resp["level"]) == (ok_id, "response_headers", "debug")

    by_stream = {}
    for r in recs:
        if "stream_id" in r:
            by_stream.setdefault(r["stream_id"], []).append(r)

    def stream_of(pred):
        """The records of the one stream that has a record matching pred."""
        [sid] = {r["stream_id"] for r in recs if "stream_id" in r and pred(r)}
        return by_stream[sid]

    # a runtime error: the line that failed, the whole path, the traceback as a field
    err_line = line_of(SCRIPT, "return t.missing.field")
    rs = stream_of(lambda r: "attempt to index a nil value" in r["msg"])
    [e] = [r for r in rs if r["level"] == "error"]
    assert (e["script"], e["line"], e["phase"]) == (str(script), err_line, "request_headers"), e
    assert e["msg"].startswith("on_request_headers failed: ") and "\n" not in e["msg"], e
    assert e["traceback"].startswith("stack traceback:\n"), e
    assert f"in function 'on_request_headers'" in e["traceback"], e
    # the stream's callout.log line came before, with the same id and worker
    [s] = [r for r in rs if r["msg"] == "seen /p"]
    assert s["worker"] == e["worker"]

    # an error raised in a module points into the module
    [e] = [r for r in stream_of(lambda r: "helper refused module" in r["msg"]) if r["level"] == "error"]
    assert (e["script"], e["line"]) == (str(helper), line_of(HELPER, "error(")), e
    assert "helper.lua" in e["traceback"] and "logs.lua" in e["traceback"], e

    # the time budget: where the loop was
    [e] = [r for r in stream_of(lambda r: "execution budget" in r["msg"]) if r["level"] == "error"]
    assert (e["script"], e["line"]) == (str(script), line_of(SCRIPT, "while true do end")), e
    assert e["msg"].startswith("on_request_headers stopped: "), e

    # a bad return table: the handler's definition
    [e] = [r for r in stream_of(lambda r: "returned a bad table" in r["msg"]) if r["level"] == "error"]
    assert (e["script"], e["line"]) == (str(script), line_of(SCRIPT, "function on_request_headers")), e

    # a denial is a warning about the stream, not a script error
    [d] = [r for r in stream_of(lambda r: "denied the request: go away" in r["msg"]) if r["level"] == "warn"]
    assert "script" not in d and "traceback" not in d and d["phase"] == "request_headers"

    # a message with a newline, a NUL and a byte that is not UTF-8 stays on its line
    [m] = [r for r in recs if r["msg"].startswith("two\nlines ")]
    assert m["msg"] == "two\nlines \x00 and \ufffd a bad byte", m

    assert len({r["stream_id"] for r in recs if r.get("msg") == "seen /p"}) == 7


def test_text_format_is_as_before(servers, tmp_path):
    script = write_scripts(tmp_path)
    srv = servers.start(script, "--threads", "1")
    stub = srv.stub()
    responses, code, _ = run(stub, trace="t1")
    sid = stream_id_of(responses)
    _, code, details = run(stub, fail="index")
    assert code == INTERNAL
    assert srv.signal_and_wait() == 0
    text = srv.log()
    start = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO |WARN |ERROR) ")
    lines = text.splitlines()
    assert start.match(lines[0]), lines[0]
    assert f"INFO  stream {sid}: seen /p " + '{"logging.googleapis.com/trace":"t1","path":"/p"}' in text \
        or f"INFO  stream {sid}: seen /p " + '{"path":"/p","logging.googleapis.com/trace":"t1"}' in text, text
    # the error and its traceback on the following lines, as Lua prints them
    m = re.search(r"ERROR stream (\d+): on_request_headers failed: (\S+):(\d+): attempt to index a nil "
                  r"value \(field 'missing'\)\nstack traceback:\n\t", text)
    assert m, text
    assert int(m.group(1)) > sid and int(m.group(3)) == line_of(SCRIPT, "return t.missing.field")
    assert "INFO  script: script loaded" in text
    assert not any(l.startswith("{") for l in lines)


LONG = """
function on_request_headers(headers, ctx)
  local n = tonumber(headers:get("x-n"))
  for i = 1, 3 do
    callout.log.info({ i = i, pad = string.rep(headers:get("x-c"), 1500) }, "%s", string.rep("m", n))
  end
end
"""


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_records_of_workers_never_share_a_line(servers, tmp_path, fmt):
    """Four workers log long records at once into one pipe (as a container runtime reads
    stderr): every line is one whole record."""
    script = servers.script(LONG)
    argv, addrs, enabled = servers.argv(script, "--log_format", fmt, "--threads", "4",
                                        "--disable_tls")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    try:
        host, port = h.split_hostport(addrs["plaintext"])
        h.wait_for(lambda: h.can_connect(host, port, 0.2), 10, "the plaintext port")
        ch = grpc.insecure_channel(addrs["plaintext"])
        stub = h.pb_grpc.ExternalProcessorStub(ch)

        def one(k):
            c = "abcdefgh"[k % 8]
            for _ in range(5):
                _, code, details = h.process(stub, [h.headers_req(
                    "request_headers", [(":path", "/"), ("x-n", str(100 + 97 * k)), ("x-c", c)])])
                assert code == OK, details
        h.run_in_threads(one, [(k,) for k in range(16)])
        ch.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(h.STOP_TIMEOUT) == 0
        reader.join(10)
    text = chunks[0].decode()
    lines = text.splitlines()
    assert lines, text
    if fmt == "json":
        recs = [json.loads(l) for l in lines]   # raises on a line that is not one record
        assert all(len(l.encode()) < 4096 for l in lines)   # PIPE_BUF with the newline
        logged = [r for r in recs if "pad" in r]
        assert len(logged) == 16 * 5 * 3
        for r in logged:
            c = r["pad"][0]
            msg = r["msg"][:-3] if r["msg"].endswith("...") else r["msg"]   # cut to fit
            assert r["pad"] == c * len(r["pad"]) and msg == "m" * len(msg), r
    else:
        logged = [l for l in lines if " {" in l and "stream " in l]
        assert len(logged) == 16 * 5 * 3, text[:2000]
        pat = re.compile(r"^\S+ INFO  stream \d+: m+ \{.*\"pad\":\"([a-h])\1*\"?")
        for l in logged:
            assert pat.match(l), l[:300]
            assert len(l.encode()) < 4096
        assert all(len(l.encode()) < 4096 for l in lines)


def test_unknown_format_is_refused(servers, tmp_path):
    script = servers.script("function on_request_headers() end")
    rc, out, err = servers.run_to_exit(["--log_format", "xml", script])
    assert rc == 2 and "--log_format: unknown format 'xml' (text, json)" in err, (rc, err)
    rc, out, err = servers.run_to_exit(["--log-format=json", "--check", script])
    assert rc == 0, (rc, err)   # the dashed spelling is accepted too


NUL_SCRIPT = r'''
local callout = require("callout")
function on_request_headers(headers, ctx)
  if headers:get(":path") == "/deny" then
    callout.deny_callout("before\0after-deny")
  end
  error("before\0after-error", 0)
end
'''


def test_a_nul_in_an_error_or_a_deny_loses_nothing_after_it(servers):
    """The status and the log record keep what follows a NUL byte (written \\0 in the
    status, \\u0000 in JSON)."""
    srv = servers.start(NUL_SCRIPT, "--log_format", "json")
    stub = srv.stub()
    for path, code, tail in (("/e", grpc.StatusCode.INTERNAL, "after-error"),
                             ("/deny", grpc.StatusCode.PERMISSION_DENIED, "after-deny")):
        _, got, details = h.process(stub, [h.headers_req("request_headers", [(":path", path)])])
        assert got == code, details
        assert details.endswith("before\\0" + tail), details
        recs = wait_records(srv, lambda rs: any(tail in r["msg"] for r in rs), tail)
        [rec] = [r for r in recs if tail in r["msg"]]
        assert rec["msg"].endswith("before\x00" + tail), rec


def test_why_the_server_cannot_start_is_a_json_record_too(tmp_path):
    """The one line that says why start-up failed (here: the port is taken) is a JSON
    record like every other, not plain text."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        p = subprocess.run([str(h.BIN), "--log_format", "json", "--disable_tls",
                            "--combined_health_check", "--plaintext_address",
                            f"127.0.0.1:{port}", str(h.SRC / "examples" / "basic.lua")],
                           capture_output=True, text=True, timeout=30)
    finally:
        taken.close()
    assert p.returncode == 1, p.stderr
    recs = records(p.stderr)
    [why] = [r for r in recs if r["level"] == "error"]
    assert str(port) in why["msg"], recs
