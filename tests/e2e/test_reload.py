"""Hot reload: SIGHUP and --watch swap the script for new streams without failing any stream;
a broken script leaves the old one serving; a stream finishes on the script it started on."""

import os
import re
import signal
import threading
import time
import urllib.request

import grpc
import pytest

import harness as h

GEN = """
function on_request_headers(headers, ctx)
  return { add = { {"x-gen", "%(tag)s"} } }
end
function on_response_headers(headers, ctx)
  return { add = { {"x-gen", "%(tag)s"} } }
end
"""


def gen_of(resp):
    """The x-gen value a headers response carries."""
    phase = resp.WhichOneof("response")
    muts = getattr(resp, phase).response.header_mutation.set_headers
    return [m.header.raw_value.decode() for m in muts if m.header.key == "x-gen"][0]


def ask(stub):
    responses, code, details = h.process(stub, [h.headers_req("request_headers", [(":path", "/")])])
    assert code == grpc.StatusCode.OK, details
    return gen_of(responses[0])


def metrics(server):
    with urllib.request.urlopen(f"http://{server.target('health')}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {k: int(v) for k, v in re.findall(r"^(luacallout_\w+) (\d+)$", text, re.M)}


def wait_for_log(server, pattern, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if re.search(pattern, server.log()):
            return
        time.sleep(0.02)
    pytest.fail(f"log never matched {pattern!r}:\n{server.log()}")


def reload(server, script, tag, expect_generation):
    script.write_text(GEN % {"tag": tag})
    server.proc.send_signal(signal.SIGHUP)
    wait_for_log(server, rf"generation {expect_generation} serves new streams")


def test_sighup_swaps_script_for_new_streams(servers):
    script = servers.script(GEN % {"tag": "A"}, name="gen.lua")
    srv = servers.start(script)
    stub = srv.stub()
    assert ask(stub) == "A"
    assert metrics(srv)["luacallout_script_generation"] == 1
    reload(srv, script, "B", 2)
    assert ask(stub) == "B"
    m = metrics(srv)
    assert m["luacallout_script_generation"] == 2
    assert m["luacallout_reloads_total"] == 1
    assert m["luacallout_reload_failures_total"] == 0


def test_broken_reload_keeps_old_script(servers):
    script = servers.script(GEN % {"tag": "A"}, name="gen.lua")
    srv = servers.start(script)
    stub = srv.stub()
    script.write_text("function on_request_headers(headers\n")   # syntax error on line 1/2
    srv.proc.send_signal(signal.SIGHUP)
    wait_for_log(srv, r"reload of .*gen\.lua failed, still serving generation 1: .*gen\.lua:\d+:")
    assert ask(stub) == "A"
    script.write_text("error('top level fails')\n")
    srv.proc.send_signal(signal.SIGHUP)
    wait_for_log(srv, r"failed, still serving generation 1: .*gen\.lua:1: top level fails")
    assert ask(stub) == "A"
    m = metrics(srv)
    assert m["luacallout_reload_failures_total"] == 2
    assert m["luacallout_script_generation"] == 1
    assert srv.alive()


def test_stream_keeps_the_script_it_started_on(servers):
    script = servers.script(GEN % {"tag": "A"}, name="gen.lua")
    srv = servers.start(script, "--threads", "1")
    stub = srv.stub()
    with h.BidiStream(stub) as old:
        first = old.exchange(h.headers_req("request_headers", [(":path", "/")]))
        assert gen_of(first) == "A"
        reload(srv, script, "B", 2)
        # a new stream, on the same (only) worker, already sees B ...
        assert ask(stub) == "B"
        # ... while the stream opened before the reload still runs A to its end
        second = old.exchange(h.headers_req("response_headers", [(":status", "200")]))
        assert gen_of(second) == "A"
        rest, code, details = old.finish()
        assert code == grpc.StatusCode.OK, details


def test_twenty_reloads_under_load_lose_nothing(servers):
    script = servers.script(GEN % {"tag": "A"}, name="gen.lua")
    srv = servers.start(script)
    stop = threading.Event()
    seen, failures, done = set(), [], [0]
    lock = threading.Lock()

    def client():
        stub = srv.stub()
        while not stop.is_set():
            reqs = [h.headers_req("request_headers", [(":path", "/")]),
                    h.body_req("request_body", b"x", end_of_stream=True),
                    h.headers_req("response_headers", [(":status", "200")])]
            responses, code, details = h.process(stub, reqs)
            with lock:
                if code != grpc.StatusCode.OK or len(responses) != 3:
                    failures.append((code, details, len(responses)))
                    continue
                tags = {gen_of(responses[0]), gen_of(responses[2])}
                if len(tags) != 1:
                    failures.append(("stream saw two scripts", tags))
                seen.update(tags)
                done[0] += 1

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            time.sleep(0.05)
            reload(srv, script, "B" if i % 2 == 0 else "A", i + 2)
    finally:
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not failures, failures[:5]
    assert seen == {"A", "B"}
    assert done[0] >= 40
    assert metrics(srv)["luacallout_reloads_total"] == 20


def test_reload_picks_up_required_module_from_script_folder(servers):
    # In a folder of its own, away from the server's working directory, so only the
    # script's folder on package.path can find the module.
    folder = servers.tmpdir / "app"
    folder.mkdir()
    helper = folder / "gen_helper.lua"
    helper.write_text('return { tag = "A" }\n')
    script = folder / "uses_helper.lua"
    script.write_text(
        'local helper = require "gen_helper"\n'
        'function on_request_headers() return { add = { {"x-gen", helper.tag} } } end\n')
    srv = servers.start(script)
    stub = srv.stub()
    assert ask(stub) == "A"
    helper.write_text('return { tag = "B" }\n')
    srv.proc.send_signal(signal.SIGHUP)
    wait_for_log(srv, r"generation 2 serves new streams")
    assert ask(stub) == "B"


def poll_until(fn, expected, timeout=10.0):
    deadline = time.time() + timeout
    got = None
    while time.time() < deadline:
        got = fn()
        if got == expected:
            return
        time.sleep(0.05)
    pytest.fail(f"still {got!r}, expected {expected!r}")


def test_watch_reloads_on_edit(servers):
    script = servers.script(GEN % {"tag": "A"}, name="gen.lua")
    srv = servers.start(script, "--watch")
    stub = srv.stub()
    assert ask(stub) == "A"
    script.write_text(GEN % {"tag": "B"})
    poll_until(lambda: ask(stub), "B")
    # a broken save keeps B serving
    script.write_text("function (\n")
    wait_for_log(srv, r"reload of .*failed")
    assert ask(stub) == "B"


def test_watch_follows_configmap_symlink_swap(servers):
    """Kubernetes updates a ConfigMap volume by pointing the ..data symlink at a new folder
    with one atomic rename; the script path is a symlink through ..data."""
    vol = servers.tmpdir / "configmap"
    (vol / "..v1").mkdir(parents=True)
    (vol / "..v1" / "callout.lua").write_text(GEN % {"tag": "A"})
    os.symlink("..v1", vol / "..data")
    os.symlink("..data/callout.lua", vol / "callout.lua")
    srv = servers.start(vol / "callout.lua", "--watch")
    stub = srv.stub()
    assert ask(stub) == "A"
    (vol / "..v2").mkdir()
    (vol / "..v2" / "callout.lua").write_text(GEN % {"tag": "B"})
    os.symlink("..v2", vol / "..data_tmp")
    os.rename(vol / "..data_tmp", vol / "..data")
    poll_until(lambda: ask(stub), "B")
    assert metrics(srv)["luacallout_reloads_total"] >= 1
