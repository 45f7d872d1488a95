"""/metrics: the whole exposition parses with an independent parser (Debian's
python3-prometheus-client), every family has HELP and TYPE, histograms are cumulative and
consistent, and every counter moves by exactly what the traffic sent: streams by final
gRPC code, messages and outcomes by phase, handler durations, VM rebuilds, reloads; worker
counters are summed; process_* describe the whole server."""

import os
import re
import signal
import time

import grpc
from prometheus_client.parser import text_string_to_metric_families

import harness as h

OK = grpc.StatusCode.OK
PHASES = ["request_headers", "response_headers", "request_body", "response_body",
          "request_trailers", "response_trailers"]
OUTCOMES = ["continue", "mutate", "immediate", "deny", "lua_error", "bad_return", "timeout",
            "memory", "watchdog"]
PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
FRESH = [("grpc.use_local_subchannel_pool", 1)]

SCRIPT = r"""
function on_request_headers(headers, ctx)
  local case = headers:get("x-case")
  if case == "mutate" then return { add = { {"x-a", "1"} } }
  elseif case == "immediate" then return { immediate = { status = 403, body = "no" } }
  elseif case == "deny" then return { deny = "not you" }
  elseif case == "error" then error("boom")
  elseif case == "bad" then return { nonsense = 1 }
  elseif case == "loop" then while true do end
  elseif case == "memory" then
    local t = {}
    for i = 1, 1e9 do t[i] = ("y"):rep(65536) .. i end
  elseif case == "sleep" then os.execute("sleep 1.6")
  end
end
function on_request_body(body, ctx) return { body = "replaced" } end
function on_request_trailers(trailers, ctx) end
function on_response_headers(headers, ctx) return {} end
function on_response_body(body, ctx) return { clear_route_cache = false } end
function on_response_trailers(trailers, ctx) return { add = { {"x-t", "1"} } } end
"""


# --- reading the exposition ------------------------------------------------------------------

def scrape(server):
    """{(sample name, frozenset(labels)): value}, after checking the whole text."""
    text = h.metrics_text(server)
    check_text(text)
    samples = {}
    for fam in text_string_to_metric_families(text):
        assert fam.type in ("counter", "gauge", "histogram"), (fam.name, fam.type)
        assert fam.documentation, f"{fam.name} has no HELP"
        if fam.type == "counter":
            assert all(s.name == fam.name + "_total" for s in fam.samples), fam
        if fam.type == "histogram":
            check_histogram(fam)
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return samples


def check_text(text):
    """What the parser forgives: every sample's family was declared (HELP, then TYPE) before
    it, once; the text ends with a newline."""
    assert text.endswith("\n")
    helped, typed = set(), {}
    for line in text.splitlines():
        m = re.match(r"# (HELP|TYPE) (\S+) (.+)$", line)
        if m:
            kind, name, rest = m.groups()
            seen = helped if kind == "HELP" else typed
            assert name not in seen, f"{kind} {name} twice"
            if kind == "HELP":
                helped.add(name)
            else:
                assert name in helped, f"TYPE before HELP for {name}"
                typed[name] = rest
            continue
        assert line and not line.startswith("#"), repr(line)
        name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
        base = re.sub(r"_(bucket|sum|count)$", "", name) if name not in typed else name
        assert base in typed, f"sample {name} has no TYPE"
        if typed[base] == "histogram":
            assert name != base, f"bare sample {name} of a histogram"


def check_histogram(fam):
    by_labels = {}
    for s in fam.samples:
        rest = {k: v for k, v in s.labels.items() if k != "le"}
        by_labels.setdefault(frozenset(rest.items()), []).append(s)
    assert by_labels
    for labels, samples in by_labels.items():
        buckets = [(float(s.labels["le"]), s.value) for s in samples if s.name.endswith("_bucket")]
        count = [s.value for s in samples if s.name.endswith("_count")]
        total = [s.value for s in samples if s.name.endswith("_sum")]
        assert len(count) == 1 and len(total) == 1, samples
        assert buckets == sorted(buckets), f"buckets out of order: {buckets}"
        assert buckets[-1][0] == float("inf"), buckets
        values = [v for _, v in buckets]
        assert values == sorted(values), f"not cumulative: {labels} {values}"
        assert count[0] == buckets[-1][1], f"count != +Inf bucket: {labels}"
        assert (count[0] == 0) == (total[0] == 0), f"sum {total[0]} for count {count[0]}"
        assert buckets[0][0] == 5e-05 and buckets[-2][0] == 1.0, buckets


def v(samples, name, **labels):
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


def delta(before, after):
    return {k: after[k] - before.get(k, 0) for k in after}


def moved(d, name, **labels):
    return d[(name, frozenset(labels.items()))]


# --- traffic -------------------------------------------------------------------------------

def headers(case):
    return h.headers_req("request_headers", [(":path", "/"), ("x-case", case)])


def one(stub, case):
    _, code, details = h.process(stub, [headers(case)])
    return code


def raw_stream(server, payloads):
    """A Process stream of raw bytes: what the stubs cannot send (a malformed message)."""
    call = server.channel().stream_stream(PROCESS)(iter(payloads), timeout=h.RPC_TIMEOUT)
    try:
        for _ in call:
            pass
        return call.code()
    except grpc.RpcError as e:
        return e.code()


def wait_streams_closed(server):
    h.wait_for(lambda: re.search(r"^luacallout_streams_active 0$", h.metrics_text(server), re.M),
               5, "every stream freed")


# --- the tests -------------------------------------------------------------------------------

def test_every_counter_moves_by_what_the_traffic_did(servers):
    srv = servers.start(SCRIPT, "--threads", "1", "--script_timeout_ms", "100",
                        "--script_memory_mb", "32")
    stub = srv.stub()
    before = scrape(srv)
    assert v(before, "luacallout_build_info", version=re.search(
        r'version="([^"]+)"', h.metrics_text(srv)).group(1)) == 1
    codes = [one(stub, c) for c in ("continue", "continue", "continue", "mutate", "mutate",
                                    "immediate", "deny", "error", "bad", "loop")]
    assert codes == [OK] * 6 + [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INTERNAL,
                                grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED]
    # the next stream starts on a fresh VM: the spare built at start-up
    assert one(stub, "continue") == OK
    rebuilt = scrape(srv)
    assert moved(delta(before, rebuilt), "luacallout_vm_rebuilds_total") == 1
    assert one(stub, "memory") == grpc.StatusCode.RESOURCE_EXHAUSTED
    # a second rebuild needs a new spare: streams until it is swapped in, each counted
    extra = 0
    while True:
        assert one(stub, "continue") == OK
        extra += 1
        if moved(delta(before, scrape(srv)), "luacallout_vm_rebuilds_total") == 2:
            break
        assert extra < 100, "no second rebuild"
        time.sleep(0.05)
    # every phase on one stream
    all_phases = [headers("continue"), h.body_req("request_body", b"abc"),
                  h.trailers_req("request_trailers", [("x-t", "1")]),
                  h.headers_req("response_headers", [(":status", "200")]),
                  h.body_req("response_body", b"def"),
                  h.trailers_req("response_trailers", [("x-u", "2")])]
    responses, code, _ = h.process(stub, all_phases)
    assert code == OK and len(responses) == 6
    # refused before any handler: malformed bytes, a message with no phase
    assert raw_stream(srv, [b"\x0a\x05\x01"]) == grpc.StatusCode.INVALID_ARGUMENT
    _, code, _ = h.process(stub, [h.pb.ProcessingRequest(observability_mode=True)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # a stream the client cancels after one answer
    s = h.BidiStream(stub)
    s.exchange(headers("mutate"))
    s.cancel()
    wait_streams_closed(srv)

    after = scrape(srv)
    d = delta(before, after)
    continues = 4 + extra + 1          # 3 + the first rebuild's + the second's + all phases
    streams = 10 + 1 + 1 + extra + 1 + 2 + 1
    assert moved(d, "luacallout_streams_total") == streams
    expect_codes = {"OK": 6 + 1 + extra + 1, "PERMISSION_DENIED": 1, "INTERNAL": 2,
                    "DEADLINE_EXCEEDED": 1, "RESOURCE_EXHAUSTED": 1, "INVALID_ARGUMENT": 2,
                    "CANCELLED": 1}
    for code in ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                 "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                 "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                 "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"):
        assert moved(d, "luacallout_streams_ended_total", code=code) == \
            expect_codes.get(code, 0), code
    assert moved(d, "luacallout_stream_errors_total") == streams - expect_codes["OK"] - 1
    header_msgs = streams - 2
    expect_msgs = {"request_headers": header_msgs, "unknown": 2}
    for p in PHASES[1:]:
        expect_msgs[p] = 1
    for p in PHASES + ["unknown"]:
        assert moved(d, "luacallout_messages_total", phase=p) == expect_msgs[p], p
    expect = {("request_headers", "continue"): continues,
              ("request_headers", "mutate"): 3, ("request_headers", "immediate"): 1,
              ("request_headers", "deny"): 1, ("request_headers", "lua_error"): 1,
              ("request_headers", "bad_return"): 1, ("request_headers", "timeout"): 1,
              ("request_headers", "memory"): 1,
              ("request_body", "mutate"): 1, ("request_trailers", "continue"): 1,
              ("response_headers", "continue"): 1, ("response_body", "continue"): 1,
              ("response_trailers", "mutate"): 1}
    # The watchdog also counts a call still running 1 s past its budget: the budget is
    # checked between Lua instructions, so on a loaded machine under ASan one long C step
    # (the memory case's allocation and emergency collection) or a worker descheduled
    # that long can be. test_watchdog_outcome_... checks that count exactly.
    slow = moved(d, "luacallout_outcomes_total", phase="request_headers", outcome="watchdog")
    assert slow <= 2, slow
    expect[("request_headers", "watchdog")] = slow
    for p in PHASES:
        for o in OUTCOMES:
            assert moved(d, "luacallout_outcomes_total", phase=p, outcome=o) == \
                expect.get((p, o), 0), (p, o)
    assert moved(d, "luacallout_outcomes_total", phase="unknown", outcome="refused") == 2
    # every message a handler saw has a duration; the loop took its whole budget
    for p in PHASES:
        n = moved(d, "luacallout_handler_duration_seconds_count", phase=p)
        assert n == expect_msgs[p], p
        assert moved(d, "luacallout_handler_duration_seconds_sum", phase=p) > 0, p
    assert moved(d, "luacallout_handler_duration_seconds_bucket", phase="request_headers",
                 le="0.05") <= header_msgs - 1   # the loop ran 100 ms
    assert moved(d, "luacallout_handler_duration_seconds_bucket", phase="request_headers",
                 le="+Inf") == header_msgs
    assert v(after, "luacallout_lua_memory_bytes", worker="0") > 10_000
    assert v(after, "luacallout_streams_active") == 0


def test_worker_counters_are_summed(servers):
    srv = servers.start(SCRIPT, "--threads", "2")
    pids = h.wait_for(lambda: len(h.process_tree(srv.proc.pid)) >= 3 and
                      h.process_tree(srv.proc.pid)[1:], 5, "2 workers")
    before = scrape(srv)
    cpu = {p: sum(map(int, open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[11:13]))
           for p in pids}
    n = 60
    for _ in range(n):
        with grpc.insecure_channel(srv.target("plaintext"), options=FRESH) as ch:
            _, code, _ = h.process(h.pb_grpc.ExternalProcessorStub(ch), [headers("mutate")])
            assert code == OK
    busy = sum(sum(map(int, open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[11:13]))
               > cpu[p] for p in pids)
    assert busy == 2, "the streams did not reach both workers"
    wait_streams_closed(srv)
    d = delta(before, scrape(srv))
    assert moved(d, "luacallout_streams_total") == n
    assert moved(d, "luacallout_streams_ended_total", code="OK") == n
    assert moved(d, "luacallout_messages_total", phase="request_headers") == n
    assert moved(d, "luacallout_outcomes_total", phase="request_headers", outcome="mutate") == n
    assert moved(d, "luacallout_handler_duration_seconds_count", phase="request_headers") == n
    after = scrape(srv)
    assert v(after, "luacallout_lua_memory_bytes", worker="0") > 10_000
    assert v(after, "luacallout_lua_memory_bytes", worker="1") > 10_000
    assert ("luacallout_lua_memory_bytes", frozenset({("worker", "2")})) not in after


def test_process_metrics_describe_the_whole_server(servers):
    t0 = time.time()
    srv = servers.start(SCRIPT, "--threads", "2")
    tree = h.wait_for(lambda: len(h.process_tree(srv.proc.pid)) >= 3 and
                      h.process_tree(srv.proc.pid), 5, "2 workers")
    m = scrape(srv)
    rss = v(m, "process_resident_memory_bytes")
    assert rss > 1 << 20
    # the sum over the supervisor and both workers, as /proc says
    assert 0.7 < rss / (h.rss_mb(srv) * (1 << 20)) < 1.4, (rss, h.rss_mb(srv))
    fds = v(m, "process_open_fds")
    assert fds > 3
    theirs = sum(len(os.listdir(f"/proc/{p}/fd")) for p in tree)
    assert abs(fds - theirs) <= 6, (fds, theirs)
    assert abs(v(m, "process_start_time_seconds") - t0) < 5
    cpu = v(m, "process_cpu_seconds_total")
    assert cpu > 0
    for _ in range(3):
        one(srv.stub(), "continue")
    assert v(scrape(srv), "process_cpu_seconds_total") >= cpu


def test_reloads_ok_and_failed_and_the_script_identity(servers):
    script = servers.script(SCRIPT, name="reloaded.lua")
    srv = servers.start(script)
    m = scrape(srv)
    info = [k for k in m if k[0] == "luacallout_script_info"]
    assert len(info) == 1
    labels = dict(info[0][1])
    assert labels["generation"] == "1" and labels["path"].endswith("reloaded.lua")
    assert re.fullmatch(r"[0-9a-f]{64}", labels["sha256"])
    first_sha = labels["sha256"]
    t_loaded = v(m, "luacallout_script_load_timestamp_seconds")
    assert abs(t_loaded - time.time()) < 30
    assert 0 < v(m, "luacallout_script_load_duration_seconds") < 10

    script.write_text(SCRIPT + "\n-- changed\n")
    srv.proc.send_signal(signal.SIGHUP)
    h.wait_for(lambda: v(scrape(srv), "luacallout_reloads_total") == 1, 10, "the reload")
    m = scrape(srv)
    info = dict(next(k for k in m if k[0] == "luacallout_script_info")[1])
    assert info["generation"] == "2" and info["sha256"] != first_sha
    assert v(m, "luacallout_script_generation") == 2
    assert v(m, "luacallout_reload_failures_total") == 0
    assert v(m, "luacallout_script_load_timestamp_seconds") >= t_loaded

    script.write_text("function on_request_headers(\n")
    srv.proc.send_signal(signal.SIGHUP)
    h.wait_for(lambda: v(scrape(srv), "luacallout_reload_failures_total") == 1, 10,
               "the failed reload")
    m = scrape(srv)
    assert v(m, "luacallout_reloads_total") == 1
    assert dict(next(k for k in m if k[0] == "luacallout_script_info")[1])["generation"] == "2"


def test_watchdog_outcome_counts_the_stuck_call_and_then_how_it_ended(servers):
    srv = servers.start(SCRIPT, "--threads", "1", "--script_timeout_ms", "100",
                        "--unsafe_stdlib")
    before = scrape(srv)
    # sleeps 1.6 s in C: past budget + the watchdog's 1 s margin, then returns late
    assert one(srv.stub(), "sleep") == grpc.StatusCode.DEADLINE_EXCEEDED
    d = delta(before, scrape(srv))
    assert moved(d, "luacallout_outcomes_total", phase="request_headers", outcome="watchdog") == 1
    assert moved(d, "luacallout_outcomes_total", phase="request_headers", outcome="timeout") == 1
    assert moved(d, "luacallout_watchdog_stuck_total") == 1
    assert moved(d, "luacallout_messages_total", phase="request_headers") == 1
    assert moved(d, "luacallout_handler_duration_seconds_bucket", phase="request_headers",
                 le="1") == 0
    assert moved(d, "luacallout_handler_duration_seconds_bucket", phase="request_headers",
                 le="+Inf") == 1


def test_a_script_path_that_is_not_utf8_is_a_valid_label(servers, tmp_path):
    """The text format is UTF-8: a path byte that starts no UTF-8 sequence is U+FFFD, and
    quotes, backslashes and newlines are escaped."""
    d = tmp_path / os.fsdecode(b'odd\xff"\\\ndir')
    d.mkdir()
    script = d / "basic.lua"
    script.write_text((h.SRC / "examples" / "basic.lua").read_text())
    srv = servers.start(script)
    text = h.metrics_text(srv)   # decodes strictly: the whole body is UTF-8
    [info] = [f for f in text_string_to_metric_families(text)
              if f.name == "luacallout_script_info"]
    [s] = info.samples
    assert s.labels["path"] == str(script).replace(os.fsdecode(b"\xff"), "\ufffd")
