"""grpc.health.v1.Health on both gRPC ports (plaintext and TLS): Check and Watch for the
server ("") and the ext_proc service, NOT_FOUND / SERVICE_UNKNOWN for any other, NOT_SERVING
while draining, and health calls kept apart from ext_proc streams."""

import re
import signal
import time

import grpc
import pytest

import harness as h

OK = grpc.StatusCode.OK
HP = h.health_pb2
SERVING = HP.HealthCheckResponse.SERVING
NOT_SERVING = HP.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = HP.HealthCheckResponse.SERVICE_UNKNOWN
EXT_PROC = "envoy.service.ext_proc.v3.ExternalProcessor"
KINDS = ["plaintext", "tls"]

SCRIPT = 'function on_request_headers(h, ctx) return { add = { {"x-ok", "1"} } } end\n'
REQ = h.headers_req("request_headers", [(":path", "/")])
GOOD = h.wrap("request_headers", h.add_header_mutation(add=[("x-ok", "1")]))


def check(stub, service):
    return stub.Check(HP.HealthCheckRequest(service=service), timeout=5).status


def metric(server, name):
    m = re.search(rf"^{name} (\S+)$", h.metrics_text(server), re.M)
    return float(m.group(1)) if m else None


@pytest.fixture(scope="module")
def server(module_servers):
    return module_servers.start(SCRIPT, "--threads", "2")


@pytest.mark.parametrize("kind", KINDS)
def test_check_serving_for_the_server_and_the_ext_proc_service(server, kind):
    stub = server.health_stub(kind)
    assert check(stub, "") == SERVING
    assert check(stub, EXT_PROC) == SERVING


@pytest.mark.parametrize("kind", KINDS)
def test_check_of_an_unknown_service_is_not_found(server, kind):
    stub = server.health_stub(kind)
    for service in ("nope", "envoy.service.ext_proc.v3.ExternalProcessor/Process",
                    "grpc.health.v1.Health"):
        with pytest.raises(grpc.RpcError) as e:
            check(stub, service)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND, (service, e.value.details())


def test_every_worker_answers(server):
    # A new channel per call: the kernel spreads connections over both worker processes.
    for _ in range(10):
        ch = grpc.insecure_channel(server.target("plaintext"))
        try:
            assert check(h.health_pb2_grpc.HealthStub(ch), "") == SERVING
        finally:
            ch.close()


@pytest.mark.parametrize("kind", KINDS)
def test_watch_sends_the_status_at_once_and_stays_open(server, kind):
    stub = server.health_stub(kind)
    calls = [stub.Watch(HP.HealthCheckRequest(service=s), timeout=30) for s in ("", EXT_PROC, "nope")]
    try:
        t0 = time.monotonic()
        assert [next(c).status for c in calls] == [SERVING, SERVING, SERVICE_UNKNOWN]
        assert time.monotonic() - t0 < 2
        time.sleep(0.5)
        # nothing changed, so nothing more is sent, and the calls (the unknown service's too,
        # as grpc's health protocol says) stay open
        assert all(c.is_active() and not c.done() for c in calls)
    finally:
        for c in calls:
            c.cancel()


def test_malformed_request_is_invalid_argument(server):
    ch = server.channel()
    check_raw = ch.unary_unary("/grpc.health.v1.Health/Check")
    with pytest.raises(grpc.RpcError) as e:
        check_raw(b"\x0a\x05ab", timeout=5)   # a string field longer than the message
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_other_methods_are_still_unimplemented(server):
    ch = server.channel()
    with pytest.raises(grpc.RpcError) as e:
        ch.unary_unary("/grpc.health.v1.Health/List")(b"", timeout=5)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_calls_are_not_ext_proc_streams(servers):
    # A Watch outlives --stream_idle_timeout_ms (it is no ext_proc stream), and health
    # calls do not move the stream counters.
    srv = servers.start(SCRIPT, "--threads", "1", "--stream_idle_timeout_ms", "300")
    stub = srv.health_stub()
    before = metric(srv, "luacallout_streams_total")
    w = stub.Watch(HP.HealthCheckRequest(service=""), timeout=30)
    try:
        assert next(w).status == SERVING
        for _ in range(5):
            assert check(stub, "") == SERVING
        time.sleep(1.0)
        assert w.is_active(), "the idle timeout ended a Watch"
        assert metric(srv, "luacallout_streams_total") == before
        assert metric(srv, "luacallout_streams_active") == 0
        # an ext_proc stream still counts (the counter is alive)
        responses, code, _ = h.process(srv.stub(), [REQ], timeout=5)
        assert (code, responses) == (OK, [GOOD])
        assert metric(srv, "luacallout_streams_total") == before + 1
    finally:
        w.cancel()


@pytest.mark.parametrize("kind", KINDS)
def test_draining_is_not_serving_and_watches_end_at_the_end_of_the_drain(servers, kind):
    srv = servers.start(SCRIPT, "--threads", "2", "--drain_grace_ms", "1500")
    stub = srv.health_stub(kind)
    watches = [stub.Watch(HP.HealthCheckRequest(service=s), timeout=30) for s in ("", EXT_PROC)]
    unknown = stub.Watch(HP.HealthCheckRequest(service="nope"), timeout=30)
    assert [next(w).status for w in watches] == [SERVING, SERVING]
    assert next(unknown).status == SERVICE_UNKNOWN
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    # the change reaches every open Watch at once, well inside the grace
    assert [next(w).status for w in watches] == [NOT_SERVING, NOT_SERVING]
    assert time.monotonic() - t0 < 1.0, time.monotonic() - t0
    assert check(stub, "") == NOT_SERVING
    assert check(stub, EXT_PROC) == NOT_SERVING
    with pytest.raises(grpc.RpcError) as e:
        check(stub, "nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # ext_proc streams are still served during the grace
    responses, code, details = h.process(srv.stub(kind), [REQ], timeout=5)
    assert (code, responses) == (OK, [GOOD]), details
    # the unknown service's Watch heard nothing new, and every Watch ends cleanly (OK)
    # once the drain is over
    for w in watches + [unknown]:
        assert list(w) == []
        assert w.code() == OK, w.details()
    took = time.monotonic() - t0
    assert 1.3 < took < 5, took
    assert srv.signal_and_wait(send=False) == 0, srv.log()


def test_combined_health_check_leaves_grpc_health_only(servers):
    srv = servers.start(SCRIPT, "--threads", "1", "--combined_health_check")
    host, port = srv.hostport("health")
    assert isinstance(h.connect_error(host, port), ConnectionRefusedError)
    for kind in KINDS:
        assert check(srv.health_stub(kind), "") == SERVING


def test_the_drain_reaches_health_at_once_while_the_worker_builds_a_reload(servers):
    # The worker's main thread is busy for 3 s in a reload's top level when the SIGTERM
    # comes: its gRPC health still hears the drain at once (it used to say SERVING until
    # the build was over).
    script = servers.script(SCRIPT)
    srv = servers.start(script, "--threads", "1", "--script_timeout_ms", "0",
                        "--drain_grace_ms", "1500", "--drain_timeout_ms", "2000")
    stub = srv.health_stub()
    watch = stub.Watch(HP.HealthCheckRequest(service=""), timeout=30)
    assert next(watch).status == SERVING
    script.write_text("local t = os.clock() while os.clock() - t < 3 do end\n" + SCRIPT)
    srv.proc.send_signal(signal.SIGHUP)
    # the supervisor's load (3 s), then the worker's build starts
    h.wait_for(lambda: "as generation 2" in srv.log(), 10, "the supervisor's load")
    time.sleep(0.5)
    assert check(stub, "") == SERVING   # the build is under way, nothing drains yet
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert next(watch).status == NOT_SERVING
    heard = time.monotonic() - t0
    assert heard < 0.3, heard
    assert check(stub, "") == NOT_SERVING
    assert check(stub, EXT_PROC) == NOT_SERVING
    assert time.monotonic() - t0 < 0.5, time.monotonic() - t0
    watch.cancel()
    assert srv.signal_and_wait(send=False) == 0, srv.log()
    assert "reloaded" not in srv.log()


def test_watches_beyond_100_per_worker_are_refused(servers):
    srv = servers.start(SCRIPT, "--threads", "1")
    stub = srv.health_stub()
    watches = [stub.Watch(HP.HealthCheckRequest(service=""), timeout=60) for _ in range(100)]
    try:
        assert [next(w).status for w in watches] == [SERVING] * 100
        extra = stub.Watch(HP.HealthCheckRequest(service=""), timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            next(extra)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many open grpc.health.v1.Health/Watch calls on this worker (100 at most)" \
            in e.value.details()
        h.wait_for(lambda: "gRPC health: refusing Watch calls (RESOURCE_EXHAUSTED): this "
                   "worker keeps at most 100 open" in srv.log(), 2, "the warning")
        # Check is not limited, and a Watch that ends makes room for another
        assert check(stub, "") == SERVING
        watches.pop().cancel()

        def another():
            w = stub.Watch(HP.HealthCheckRequest(service=""), timeout=60)
            try:
                if next(w).status == SERVING:
                    watches.append(w)
                    return True
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False
        h.wait_for(another, 5, "room for a new Watch")
        # many refusals, one warning (at most one every 10 s)
        for _ in range(20):
            with pytest.raises(grpc.RpcError):
                next(stub.Watch(HP.HealthCheckRequest(service=""), timeout=10))
        assert srv.log().count("refusing Watch calls") == 1, srv.log()
    finally:
        for w in watches:
            w.cancel()
