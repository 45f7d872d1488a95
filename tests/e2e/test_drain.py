"""The drain on SIGTERM/SIGINT (docs/operations.md, Drain): /ready 503 at once, new streams
still accepted for --drain_grace_ms, then no new streams (GOAWAY), open streams finish for up
to --drain_timeout_ms, the rest are cancelled, exit 0. The health port answers to the end."""

import os
import re
import signal
import socket
import threading
import time

import grpc
import pytest

import harness as h

OK = grpc.StatusCode.OK
SCRIPT = 'function on_request_headers(h, ctx) return { add = { {"x-ok", "1"} } } end\n'
REQ = h.headers_req("request_headers", [(":path", "/")])
GOOD = h.wrap("request_headers", h.add_header_mutation(add=[("x-ok", "1")]))
RESP_REQ = h.headers_req("response_headers", [(":status", "200")])


def http_status(server, path):
    """The status code of GET path on the health port (raw socket: a probe costs ~1 ms)."""
    host, port = server.hostport("health")
    with socket.create_connection((host, port), timeout=2) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
    if not data:
        raise ConnectionResetError("closed without an answer")   # the server is exiting
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    assert m, data
    return int(m.group(1))


class Prober:
    """Polls /ready (and /live) in a thread until stopped: [(monotonic time, ready, live)]."""

    def __init__(self, server):
        self.server = server
        self.seen = []
        self.errors = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        n = 0
        while not self._stop.is_set():
            try:
                ready = http_status(self.server, "/ready")
                live = http_status(self.server, "/live") if n % 5 == 0 else None
                self.seen.append((time.monotonic(), ready, live))
            except OSError as e:
                self.errors.append((time.monotonic(), e))
                if not self.server.alive():
                    return
            n += 1
            time.sleep(0.002)

    def stop(self):
        self._stop.set()
        self._t.join(5)

    def first(self, status, after):
        return next((t for t, r, _ in self.seen if t >= after and r == status), None)


def exchange_ok(stream, req, phase):
    resp = stream.exchange(req)
    assert resp.WhichOneof("response") == phase, resp
    return resp


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ready_is_503_within_100ms_while_grace_streams_are_served(servers, sig):
    srv = servers.start(SCRIPT, "--threads", "2", "--drain_grace_ms", "1500",
                        "--drain_timeout_ms", "3000")
    assert http_status(srv, "/ready") == 200
    probe = Prober(srv)
    try:
        h.wait_for(lambda: len(probe.seen) > 5, 5, "the probe to run")
        t0 = time.monotonic()
        srv.proc.send_signal(sig)
        first503 = h.wait_for(lambda: probe.first(503, t0), 2, "/ready 503")
        latency = first503 - t0
        assert latency < 0.1, f"/ready turned 503 {latency * 1000:.0f} ms after the signal"
        # A stream opened during the grace, on a new connection, is served to completion.
        time.sleep(0.3)
        ch = grpc.insecure_channel(srv.target("plaintext"))
        try:
            s = h.BidiStream(h.pb_grpc.ExternalProcessorStub(ch))
            assert s.exchange(REQ) == GOOD
            time.sleep(0.2)
            exchange_ok(s, RESP_REQ, "response_headers")
            # it outlives the grace: still served after it, then ends OK
            time.sleep(max(0.0, t0 + 1.8 - time.monotonic()))
            exchange_ok(s, RESP_REQ, "response_headers")
            rest, code, details = s.finish()
            assert (rest, code) == ([], OK), details
        finally:
            ch.close()
        rc = srv.signal_and_wait(send=False)
        took = time.monotonic() - t0
    finally:
        probe.stop()
    assert rc == 0, srv.log()
    assert 1.5 <= took < 4, took
    # from the signal to the exit: ready 503 every time, live 200 every time
    after = [(r, l) for t, r, l in probe.seen if t >= first503]
    assert after and all(r == 503 for r, _ in after), after
    assert all(l in (None, 200) for _, l in after) and any(l == 200 for _, l in after), after
    log = srv.log()
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    assert re.search(rf"drain: {name} received: /ready answers 503", log), log
    assert "drain: no new streams from now on (GOAWAY)" in log, log
    assert "drain: every worker has stopped" in log, log


def test_streams_in_flight_that_finish_within_the_timeout_are_not_lost(servers):
    srv = servers.start(SCRIPT, "--threads", "2", "--drain_grace_ms", "200",
                        "--drain_timeout_ms", "4000")
    stubs = [srv.stub("plaintext"), srv.stub("tls")]
    streams = [h.BidiStream(stubs[i % 2], timeout=30) for i in range(12)]
    try:
        for s in streams:
            assert s.exchange(REQ) == GOOD
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        # each goes on for a while after the grace is over, one message at a time
        for round_ in range(4):
            time.sleep(0.25)
            for s in streams:
                exchange_ok(s, RESP_REQ, "response_headers")
        assert time.monotonic() - t0 > 1.0
        for s in streams:
            rest, code, details = s.finish()
            assert (rest, code) == ([], OK), details
    finally:
        for s in streams:
            s.cancel()
    rc = srv.signal_and_wait(send=False, close_channels=False)
    took = time.monotonic() - t0
    assert rc == 0, srv.log()
    # it exits once the last stream has ended, not at the timeout
    assert took < 3.5, took
    assert "cancelling" not in srv.log(), srv.log()


def test_a_stream_open_at_the_timeout_is_cancelled_and_the_exit_is_0(servers):
    srv = servers.start(SCRIPT, "--threads", "1", "--drain_grace_ms", "500",
                        "--drain_timeout_ms", "1000")
    s = h.BidiStream(srv.stub(), timeout=30)
    try:
        assert s.exchange(REQ) == GOOD
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        rest, code, details = None, None, None
        try:
            s.recv()   # nothing is sent: this waits for the end of the call
        except grpc.RpcError as e:
            code = e.code()
        cancelled_after = time.monotonic() - t0
        assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), code
        rc = srv.signal_and_wait(send=False, close_channels=False)
        took = time.monotonic() - t0
    finally:
        s.cancel()
    assert rc == 0, srv.log()
    assert 1.4 < cancelled_after < 3.0, cancelled_after
    assert 1.4 < took < 3.5, took
    assert re.search(r"drain: cancelling the 1 stream still open after 1000 ms", srv.log()), srv.log()


def test_new_streams_after_the_grace_fail(servers):
    srv = servers.start(SCRIPT, "--threads", "2", "--drain_grace_ms", "300",
                        "--drain_timeout_ms", "4000")
    old = srv.stub()                       # a connection made before the signal
    pem = h.ephemeral_cert_of(srv)
    holder = h.BidiStream(srv.stub(), timeout=30)   # keeps the server draining
    try:
        assert holder.exchange(REQ) == GOOD
        assert h.process(old, [REQ], timeout=5)[1] == OK
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.8)
        assert srv.alive()
        # a new connection is refused, and the old one took GOAWAY: no new stream either way
        host, port = srv.hostport("plaintext")
        assert isinstance(h.connect_error(host, port), ConnectionRefusedError)
        for stub in (old, srv.stub(), srv.stub("tls", root_pem=pem)):
            responses, code, details = h.process(stub, [REQ], timeout=3)
            assert (responses, code) == ([], grpc.StatusCode.UNAVAILABLE), (code, details)
        # the stream opened before is still served
        exchange_ok(holder, RESP_REQ, "response_headers")
        rest, code, details = holder.finish()
        assert (rest, code) == ([], OK), details
    finally:
        holder.cancel()
    assert srv.signal_and_wait(send=False) == 0, srv.log()
    assert time.monotonic() - t0 < 3.5


def test_a_second_signal_ends_the_grace_at_once(servers):
    srv = servers.start(SCRIPT, "--threads", "2", "--drain_grace_ms", "20000",
                        "--drain_timeout_ms", "2000")
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    h.wait_for(lambda: "drain: SIGTERM received" in srv.log(), 5, "the drain to start")
    time.sleep(0.3)
    assert srv.alive()
    assert http_status(srv, "/ready") == 503
    srv.proc.send_signal(signal.SIGINT)
    rc = srv.signal_and_wait(send=False)
    took = time.monotonic() - t0
    assert rc == 0, srv.log()
    assert took < 3, took
    assert re.search(r"drain: second signal \(SIGINT\): the grace ends now, after \d+ of 20000 ms",
                     srv.log()), srv.log()


def test_ready_is_503_before_the_script_is_loaded(servers):
    # A top level that takes a second: the health port already answers, /ready 503.
    slow = ("local t = os.clock() while os.clock() - t < 1.0 do end\n" + SCRIPT)
    srv = servers.start(slow, "--threads", "1", "--script_timeout_ms", "5000", wait=False)
    got = h.wait_for(lambda: h.can_connect(*srv.hostport("health"), timeout=0.2) and
                     http_status(srv, "/ready"), 5, "the health port")
    assert got == 503
    assert http_status(srv, "/live") == 200
    assert not h.can_connect(*srv.hostport("plaintext"), timeout=0.2)
    srv.wait_ready()
    h.wait_for(lambda: http_status(srv, "/ready") == 200, 5, "/ready 200")


def test_a_drain_during_a_slow_reload_starts_at_once(servers):
    # The reload's top level runs for 3 s in the supervisor; a SIGTERM in the middle of it is
    # taken at once, and the server exits without waiting for the load.
    script = servers.script(SCRIPT)
    srv = servers.start(script, "--threads", "1", "--script_timeout_ms", "10000",
                        "--drain_grace_ms", "300")
    script.write_text("local t = os.clock() while os.clock() - t < 3.0 do end\n" + SCRIPT)
    srv.proc.send_signal(signal.SIGHUP)
    h.wait_for(lambda: "SIGHUP received" in srv.log(), 5, "the reload to start")
    time.sleep(0.3)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    h.wait_for(lambda: http_status(srv, "/ready") == 503, 1, "/ready 503")
    assert time.monotonic() - t0 < 0.1
    h.wait_for(lambda: "drain: SIGTERM received" in srv.log(), 1, "the drain to start")
    # streams are still served during the grace, on the old generation
    responses, code, details = h.process(srv.stub(), [REQ], timeout=5)
    assert (code, responses) == (OK, [GOOD]), details
    rc = srv.signal_and_wait(send=False)
    took = time.monotonic() - t0
    assert rc == 0, srv.log()
    assert took < 2.5, took
    assert "reloaded" not in srv.log()
    assert re.search(r"exiting with a reload of \S+ still loading .* it is abandoned", srv.log()), srv.log()


def test_supervisor_kill_after_follows_the_drain_timeout(servers):
    # A stream held open longer than the old fixed 10 s kill-after would allow: with a
    # 12 s drain timeout the workers are not killed at 10 s; the stream finishes normally.
    srv = servers.start(SCRIPT, "--threads", "1", "--drain_grace_ms", "0",
                        "--drain_timeout_ms", "12000")
    s = h.BidiStream(srv.stub(), timeout=60)
    try:
        assert s.exchange(REQ) == GOOD
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(max(0.0, t0 + 10.5 - time.monotonic()))
        assert srv.alive(), srv.log()
        exchange_ok(s, RESP_REQ, "response_headers")
        rest, code, details = s.finish()
        assert (rest, code) == ([], OK), details
    finally:
        s.cancel()
    assert srv.signal_and_wait(send=False, close_channels=False) == 0, srv.log()
    assert "killing" not in srv.log()


def busy_top_level(seconds):
    return f"local t = os.clock() while os.clock() - t < {seconds} do end\n" + SCRIPT


@pytest.mark.parametrize("when", ["supervisor_load", "workers_building"])
def test_a_signal_during_start_up_stops_at_once(servers, when):
    # A top level busy for 4 s runs in the supervisor, then in every worker. A SIGTERM in
    # either phase stops everything within a second, exit 0: nothing serves yet, so there
    # is nothing to drain (it used to finish the load, start the workers, wait for them
    # and kill them at timeout + 5 s, exit 3).
    srv = servers.start(busy_top_level(4), "--threads", "2", "--script_timeout_ms", "0",
                        "--drain_grace_ms", "5000", "--drain_timeout_ms", "5000", wait=False)
    if when == "supervisor_load":
        h.wait_for(lambda: h.can_connect(*srv.hostport("health"), timeout=0.2), 5,
                   "the health port")
        time.sleep(0.5)
        assert "as generation 1" not in srv.log()
    else:
        h.wait_for(lambda: "as generation 1" in srv.log(), 15, "the supervisor's load")
        h.wait_for(lambda: len(h.process_tree(srv.proc.pid)) == 3, 5, "the workers")
        time.sleep(0.5)
    kids = h.process_tree(srv.proc.pid)[1:]
    t0 = time.monotonic()
    rc = srv.signal_and_wait(signal.SIGTERM, timeout=15)
    took = time.monotonic() - t0
    assert rc == 0, srv.log()
    assert took < 1.0, (took, srv.log())
    log = srv.log()
    assert "signal received during start-up: shutting down at once" in log, log
    assert "abandoning" not in log and "killing" not in log, log
    for pid in kids:   # the workers are gone, not left building
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", pid


def test_a_worker_killed_during_the_grace_is_logged(servers):
    srv = servers.start(SCRIPT, "--threads", "2", "--drain_grace_ms", "2000")
    worker = h.process_tree(srv.proc.pid)[1]
    srv.proc.send_signal(signal.SIGTERM)
    h.wait_for(lambda: "drain: SIGTERM received" in srv.log(), 2, "the drain")
    os.kill(worker, signal.SIGKILL)
    h.wait_for(lambda: re.search(r"WARN +worker \d ended during the drain \(killed by signal 9"
                                 r".*\); the streams it had open were lost", srv.log()),
               1.5, "the warning about the killed worker")
    assert srv.signal_and_wait(send=False) == 0, srv.log()
    # the other worker's requested stop is not reported as a loss
    assert len(re.findall(r"ended during the drain", srv.log())) == 1, srv.log()


def test_a_watched_change_during_the_drain_is_said_to_be_ignored(servers):
    script = servers.script(SCRIPT)
    srv = servers.start(script, "--threads", "1", "--watch", "--drain_grace_ms", "3000")
    srv.proc.send_signal(signal.SIGTERM)
    h.wait_for(lambda: "drain: SIGTERM received" in srv.log(), 2, "the drain")
    script.write_text(SCRIPT + "-- changed\n")
    h.wait_for(lambda: re.search(r"watch: \S+ changed: ignored: draining", srv.log()), 2.5,
               "the watch's line")
    assert "changed: reloading" not in srv.log()
    assert srv.signal_and_wait(send=False) == 0, srv.log()


def test_an_idle_connection_does_not_hold_the_drain_open(servers):
    """A channel with no call in flight (grpc-python does not read its socket then, so it
    never sees the GOAWAY) must not keep the server until --drain_timeout_ms."""
    srv = servers.start(SCRIPT, "--threads", "1", "--drain_grace_ms", "0",
                        "--drain_timeout_ms", "10000")
    stub = srv.stub()
    _, code, details = h.process(stub, [REQ])   # the channel is connected, then idle
    assert code == grpc.StatusCode.OK, details
    t0 = time.monotonic()
    rc = srv.signal_and_wait(close_channels=False)
    took = time.monotonic() - t0
    assert rc == 0, srv.log()
    assert took < 3.0, (took, srv.log())
    assert "the connections still open" in srv.log(), srv.log()


SLOW_AT_GRACE_END = r'''
function on_request_headers(h, ctx)
  local spin = tonumber(h:get("x-spin") or "0")
  local t = os.clock()
  while os.clock() - t < spin / 1000 do end
  return { add = { {"x-ok", "1"} } }
end
'''


def test_streams_of_the_grace_are_served_when_a_handler_spans_its_end(servers):
    """A worker busy in a handler when the grace ends has not read the streams that came
    in meanwhile on open connections: they are accepted, so they must be served, not
    cancelled by the GOAWAY that follows."""
    srv = servers.start(SLOW_AT_GRACE_END, "--threads", "1", "--script_timeout_ms", "0",
                        "--drain_grace_ms", "1000", "--drain_timeout_ms", "5000")
    chans = [grpc.insecure_channel(srv.target("plaintext"),
                                   options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(4)]
    stubs = [h.pb_grpc.ExternalProcessorStub(c) for c in chans]
    for st in stubs:   # connected before the drain, as Envoy's are
        assert h.process(st, [REQ])[1] == grpc.StatusCode.OK
    results = {}

    def one(i, spin, at):
        time.sleep(max(0.0, at - time.monotonic()))
        req = h.headers_req("request_headers", [(":path", "/"), ("x-spin", str(spin))])
        results[i] = h.process(stubs[i], [req], timeout=10)[1]

    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    end = t0 + 1.0
    plan = [(800, 0.3), (0, 0.25), (0, 0.2), (0, 0.1)]   # ms of spin, s before the grace end
    threads = [threading.Thread(target=one, args=(i, spin, end - before))
               for i, (spin, before) in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    rc = srv.signal_and_wait(send=False, close_channels=False)
    for c in chans:
        c.close()
    assert results == {i: grpc.StatusCode.OK for i in range(len(plan))}, (results, srv.log())
    assert rc == 0, srv.log()
