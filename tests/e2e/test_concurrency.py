"""Many streams at once: every stream gets its own answers, in order, with its own ctx.state."""

import grpc
import pytest

import harness as h

OK = grpc.StatusCode.OK
N = 50

SCRIPT = r'''
function on_request_headers(hd, ctx)
  ctx.state.id = hd:get("x-id")
  return { add = { {"x-seen", ctx.state.id} } }
end

function on_request_body(b, ctx)
  ctx.state.body = b.body
  return { body = ctx.state.id .. ":" .. b.body }
end

function on_response_headers(hd, ctx)
  return { add = { {"x-id-echo", ctx.state.id}, {"x-req-body", ctx.state.body} } }
end

function on_response_body(b, ctx)
  -- A little work, so that streams really overlap inside the workers.
  local acc = 0
  for i = 1, 20000 do acc = (acc + i * #b.body) % 1000003 end
  return { body = b.body .. "|" .. ctx.state.id .. "|" .. (acc >= 0 and "done" or "") }
end
'''


def requests_for(i):
    sid = f"stream-{i:03d}-{'x' * (i % 7)}"
    return sid, [
        h.headers_req("request_headers", [(":path", f"/{i}"), ("x-id", sid)]),
        h.body_req("request_body", f"req-body-{i}".encode() * (1 + i % 5), end_of_stream=True),
        h.headers_req("response_headers", [(":status", "200")]),
        h.body_req("response_body", f"resp-body-{i}".encode() * (1 + i % 3), end_of_stream=True),
    ]


def expected_for(i):
    sid, reqs = requests_for(i)
    req_body = reqs[1].request_body.body
    resp_body = reqs[3].response_body.body
    return [
        h.wrap("request_headers", h.add_header_mutation(add=[("x-seen", sid)])),
        h.wrap("request_body", h.add_body_mutation(body=sid.encode() + b":" + req_body)),
        h.wrap("response_headers", h.add_header_mutation(add=[("x-id-echo", sid), ("x-req-body", req_body)])),
        h.wrap("response_body", h.add_body_mutation(body=resp_body + b"|" + sid.encode() + b"|done")),
    ]


@pytest.fixture(scope="module")
def server(module_servers):
    return module_servers.start(module_servers.script(SCRIPT, "concurrency.lua"))


def lockstep(stub, i):
    _, reqs = requests_for(i)
    got = []
    with h.BidiStream(stub, timeout=30) as s:
        for r in reqs:
            got.append(s.exchange(r))
        rest, code, details = s.finish()
    return got + rest, code, details


def pipelined(stub, i):
    _, reqs = requests_for(i)
    return h.process(stub, reqs, timeout=30)


def check_all(results):
    bad = []
    for i, (responses, code, details) in enumerate(results):
        if code != OK or responses != expected_for(i):
            bad.append((i, code, details, [r.WhichOneof("response") for r in responses]))
    assert bad == [], f"{len(bad)} of {len(results)} streams wrong, e.g. {bad[:3]}"


def test_expectations_are_distinct():
    assert len({str(expected_for(i)) for i in range(N)}) == N


def test_concurrent_lockstep_one_channel(server):
    stub = server.stub()
    check_all(h.run_in_threads(lambda i: lockstep(stub, i), [(i,) for i in range(N)]))


def test_concurrent_pipelined_one_channel(server):
    stub = server.stub()
    check_all(h.run_in_threads(lambda i: pipelined(stub, i), [(i,) for i in range(N)]))


def test_concurrent_many_connections_tls(server):
    # Ten TLS connections (no shared subchannel), five streams each.
    pem = h.ephemeral_cert_of(server)
    stubs = [server.stub("tls", root_pem=pem, options=[("grpc.use_local_subchannel_pool", 1),
                                                       ("test.conn", k)]) for k in range(10)]
    check_all(h.run_in_threads(lambda i: lockstep(stubs[i % 10], i), [(i,) for i in range(N)]))


def test_concurrent_with_failing_streams(server):
    # Every fifth stream is cancelled by its client half-way; the others are unaffected.
    stub = server.stub()

    def run(i):
        if i % 5 == 0:
            _, reqs = requests_for(i)
            s = h.BidiStream(stub, timeout=30)
            s.exchange(reqs[0])
            s.send(reqs[1])
            s.cancel()
            return None
        return lockstep(stub, i)

    results = h.run_in_threads(run, [(i,) for i in range(N)])
    bad = [i for i, r in enumerate(results)
           if r is not None and (r[1] != OK or r[0] != expected_for(i))]
    assert bad == []
    check_all([pipelined(stub, i) for i in range(3)])


def test_single_worker_interleaved_streams(servers):
    # --threads 1: one worker, one Lua state; twenty streams open at once still keep their
    # own ctx.state and get their answers in order.
    srv = servers.start(servers.script(SCRIPT, "concurrency.lua"), "--threads", "1")
    stub = srv.stub()
    n = 20
    streams = [h.BidiStream(stub, timeout=30) for _ in range(n)]
    got = [[] for _ in range(n)]
    try:
        for step in range(4):
            for i, s in enumerate(streams):
                got[i].append(s.exchange(requests_for(i)[1][step]))
        results = []
        for i, s in enumerate(streams):
            rest, code, details = s.finish()
            results.append((got[i] + rest, code, details))
    finally:
        for s in streams:
            s.cancel()
    check_all(results)


def test_many_sequential_streams(server):
    # Streams come and go; nothing piles up and every one is still answered correctly.
    stub = server.stub()
    for i in range(300):
        responses, code, details = h.process(stub, requests_for(i % N)[1])
        assert code == OK and responses == expected_for(i % N), (i, code, details)
