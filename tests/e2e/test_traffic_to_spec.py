"""From live traffic to a spec (docs/testing.md): a server run with --record DIR serves 100
varied streams from concurrent clients and is stopped with SIGTERM; DIR then holds one line
per stream; a busted spec of three lines, `testing.replay(DIR, script)`, is green against
the script that served them and red — naming the header — against a copy that changes one
header value; `luacallout send` sends a recorded file to a running server again and gets the
recorded answers. The walkthrough's steps, each run as a user would."""

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

import harness as h
from harness import pb

SHOP = """
-- a small shop front: routes by path, tags each request, rewrites bodies, refuses /admin,
-- and breaks on /boom (a script error the record keeps and the replay must reproduce)
local VERSION = "v1"

function on_request_headers(h, ctx)
  local path = h:get(":path") or "/"
  ctx.state.route = path:match("^/(%w+)") or "root"
  if ctx.state.route == "admin" then callout.deny_callout("no admin here") end
  if ctx.state.route == "boom" then error("boom on " .. path) end
  return { add = { { "x-shop", VERSION }, { "x-route", ctx.state.route } }, remove = { "x-debug" } }
end

function on_request_body(body, ctx)
  if ctx.state.route == "echo" then return { body = body.body:upper() } end
end

function on_response_headers(h, ctx)
  if ctx.state.route == "gone" then
    return { immediate = { status = 410, body = "gone: " .. ctx.state.route } }
  end
  return { add = { { "x-served-by", "shop-" .. ctx.state.route } } }
end
"""

ROUTES = ("items", "echo", "admin", "boom", "gone", "cart")


def stream_of(i):
    """The messages of stream i: its route decides the script's path; some carry bodies."""
    route = ROUTES[i % len(ROUTES)]
    headers = [(":method", "POST" if route == "echo" else "GET"), (":path", f"/{route}/{i}"),
               (":authority", "shop.example"), ("x-debug", "1"), ("authorization", f"Bearer t{i}")]
    msgs = [h.headers_req("request_headers", headers)]
    if route == "echo":
        msgs.append(h.body_req("request_body", f"hello {i}", end_of_stream=True))
    msgs.append(h.headers_req("response_headers", [(":status", "200")]))
    return msgs


def run_load(srv, n=100, clients=4):
    """n streams from `clients` threads at once -> {i: (responses, status code)}."""
    seen, lock = {}, threading.Lock()

    def client(k):
        # a connection each (grpc-python shares one between channels unless told not to),
        # so that both workers serve some
        stub = srv.stub(options=[("grpc.use_local_subchannel_pool", 1)])
        for i in range(k, n, clients):
            responses, code, _ = h.process(stub, stream_of(i))
            with lock:
                seen[i] = (responses, code)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return seen


def busted(tmpdir, spec):
    """Runs busted on one spec file, with the kit from this source tree and this build."""
    env = dict(os.environ)
    if h.SANITIZED:   # the module is instrumented, the interpreter is not (CMakeLists.txt)
        lib = subprocess.run(["cc", "-print-file-name=libasan.so"], capture_output=True,
                             text=True).stdout.strip()
        env["LD_PRELOAD"] = lib
        env["ASAN_OPTIONS"] = "detect_leaks=0"
    p = subprocess.run(["busted", "--output=plainTerminal", f"--lpath={h.SRC}/lua/?.lua",
                        f"--cpath={Path(h.BIN).resolve().parent}/?.so", str(spec)],
                       capture_output=True, text=True, timeout=120, cwd=tmpdir, env=env)
    return p.returncode, p.stdout + p.stderr


@pytest.fixture
def recorded(servers):
    """The script, and DIR after 100 streams of load and a SIGTERM."""
    script = servers.script(SHOP, "shop.lua")
    rec = servers.tmpdir / "rec"
    srv = servers.start(script, "--record", str(rec), "--threads", "2")
    seen = run_load(srv)
    srv.signal_and_wait()
    return script, rec, seen


def test_100_streams_recorded_replay_green_then_red_on_one_header(servers, recorded):
    script, rec, seen = recorded
    assert len(seen) == 100
    codes = {}
    for responses, code in seen.values():
        codes[code.name] = codes.get(code.name, 0) + 1
    # the load is varied: answers, denials and script errors, as the routes say
    per_route = {r: sum(1 for i in range(100) if ROUTES[i % len(ROUTES)] == r) for r in ROUTES}
    n_ok = 100 - per_route["admin"] - per_route["boom"]
    assert codes == {"OK": n_ok, "PERMISSION_DENIED": per_route["admin"],
                     "INTERNAL": per_route["boom"]}, codes

    lines = [json.loads(l) for f in sorted(rec.glob("*.jsonl")) for l in f.open()]
    assert len(lines) == 100, f"{len(lines)} record lines for 100 streams"
    assert sorted(l["status"]["name"] for l in lines) == sorted(
        code.name for _, code in seen.values())
    # what the clients received is what was recorded, stream by stream (matched by :path)
    by_path = {l["requests"][0]["request_headers"]["headers"][1][1]: l for l in lines}
    for i, (responses, code) in seen.items():
        line = by_path[f"/{ROUTES[i % len(ROUTES)]}/{i}"]
        assert sum(len(group) for group in line["responses"]) == len(responses), (i, line)
        assert line["status"]["name"] == code.name
    # redacted by default
    assert all(dict(map(tuple, l["requests"][0]["request_headers"]["headers"]))["authorization"]
               == "[redacted]" for l in lines)

    spec = servers.tmpdir / "shop_spec.lua"
    spec.write_text(
        'local testing = require "callout.testing"\n'
        'describe("shop.lua against recorded traffic", function()\n'
        f'  testing.replay("{rec}", "{script}")\n'
        'end)\n')
    rc, out = busted(servers.tmpdir, spec)
    assert rc == 0, out
    assert "100 successes / 0 failures / 0 errors" in out, out

    # the same script with one header value changed: red, and the failures name the header
    changed = servers.script(SHOP.replace('local VERSION = "v1"', 'local VERSION = "v2"'),
                             "shop.lua")
    assert changed == script
    rc, out = busted(servers.tmpdir, spec)
    assert rc != 0, out
    # the streams that got a headers answer now differ (denied and failing ones set no x-shop)
    assert f"{100 - n_ok} successes / {n_ok} failures" in out, out
    assert ('request 1 (request_headers): responses[1].request_headers.response.header_mutation'
            '.set_headers[1].header.raw_value: expected "v1", got "v2"') in out, out


def test_a_recorded_file_sent_again_gets_the_recorded_answers(servers, recorded):
    script, rec, _ = recorded
    file = max(rec.glob("*.jsonl"), key=lambda f: f.stat().st_size)
    lines = [json.loads(l) for l in file.open()]
    assert len(lines) > 10
    srv = servers.start(script)
    p = subprocess.run([h.BIN, "send", str(file), "--target", srv.target("plaintext"),
                        "--plaintext"], capture_output=True, timeout=60)
    out = [json.loads(l) for l in p.stdout.decode().split("\n") if l]
    failed = [l for l in lines if l["status"]["code"] != 0]
    assert p.returncode == (1 if failed else 0), p.stderr
    # per stream: its answers in order, then its status line
    expected = []
    for n, line in enumerate(lines, 1):
        for group in line["responses"]:
            expected.extend(group)
        status = dict(line["status"])
        if status["name"] == "INTERNAL":   # names the script's path and line: same script
            assert "shop.lua:" in status["message"]
        expected.append({"stream": n, "status": status} if len(lines) > 1 else {"status": status})
    # redacted requests were sent as "[redacted]": this script does not read authorization
    assert out == expected
