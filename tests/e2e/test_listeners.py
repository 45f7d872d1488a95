"""The three listeners (gRPC over TLS, gRPC h2c, HTTP(S) health) and the command line."""

import http.client
import re
import signal
import socket
import ssl
import time

import grpc
import pytest

import harness as h

OK = grpc.StatusCode.OK

SCRIPT = 'function on_request_headers(h, ctx) return { add = { {"x-ok", "1"} } } end\n'
REQ = h.headers_req("request_headers", [(":path", "/")])
GOOD = h.wrap("request_headers", h.add_header_mutation(add=[("x-ok", "1")]))

FLAGS = ["secure_address", "plaintext_address", "health_check_address", "disable_tls",
         "disable_plaintext", "combined_health_check", "secure_health_check", "cert_chain_path",
         "private_key_path", "threads", "log_level", "help", "version"]


def project_version():
    m = re.search(r"project\(\s*luacallout\s+VERSION\s+([0-9.]+)", (h.SRC / "CMakeLists.txt").read_text())
    assert m, "no project VERSION in CMakeLists.txt"
    return m.group(1)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return h.gen_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def default_server(module_servers):
    return module_servers.start(SCRIPT)


@pytest.fixture(scope="module")
def cert_server(module_servers, certs):
    return module_servers.start(SCRIPT, "--cert_chain_path", str(certs / "server.pem"),
                                "--private_key_path", str(certs / "server.key"))


def grpc_works(server, kind="plaintext", **kw):
    responses, code, details = h.process(server.stub(kind, **kw), [REQ], timeout=5)
    assert (code, responses) == (OK, [GOOD]), f"{kind}: {code} {details}"
    return True


def refuses(host, port):
    err = h.connect_error(host, port)
    assert isinstance(err, ConnectionRefusedError), \
        f"{host}:{port} should refuse connections, got {err or 'a connection'}"


def http_get(host, port, path="/", context=None):
    if context is None:
        conn = http.client.HTTPConnection(host, port, timeout=5)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=5, context=context)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def tls_context(cafile=None, cadata=None, check_hostname=True):
    ctx = ssl.create_default_context(cafile=cafile, cadata=cadata)
    ctx.check_hostname = check_hostname
    return ctx


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------

def test_tls_with_gen_certs(cert_server, certs):
    ca = (certs / "ca.pem").read_bytes()
    grpc_works(cert_server, "tls", root_pem=ca, override=None)          # IP SAN 127.0.0.1
    grpc_works(cert_server, "tls", root_pem=ca, override="localhost")   # DNS SAN localhost


def test_tls_serves_the_given_leaf(cert_server, certs):
    served = h.ephemeral_cert_of(cert_server)
    leaf = (certs / "server.pem").read_text()
    first = leaf[:leaf.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    assert h.fingerprint(served) == h.fingerprint(first)


def test_tls_gen_certs_untrusted_without_ca(cert_server):
    # A client that does not trust ca.pem (system roots only) cannot connect.
    with grpc.secure_channel(cert_server.target("secure"), grpc.ssl_channel_credentials(),
                             options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        _, code, _ = h.process(h.pb_grpc.ExternalProcessorStub(ch), [REQ], timeout=5)
    assert code == grpc.StatusCode.UNAVAILABLE


def test_no_ephemeral_warning_with_cert_files(cert_server):
    fps = [m for l in cert_server.log().splitlines() if "WARN" in l for m in h.FINGERPRINT_RE.findall(l)]
    assert fps == [], f"a WARN fingerprint line although a certificate was given:\n{cert_server.log()}"


# --------------------------------------------------------------------------------------------
# Health
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/healthz", "/any/deeper/path?x=1", "/ready"])
def test_http_health_any_path(default_server, path):
    host, port = default_server.hostport("health")
    assert http_get(host, port, path) == (200, b"")


def test_http_health_live_and_ready(default_server):
    # Without probe callbacks (the server passes none yet) both probes pass.
    host, port = default_server.hostport("health")
    assert http_get(host, port, "/live") == (200, b"ok\n")
    assert http_get(host, port, "/live?full=1") == (200, b"ok\n")
    assert http_get(host, port, "/ready") == (200, b"")


def test_http_health_headers_too_large(default_server):
    # Request line + headers are capped at 8 KiB: past that the answer is 431, not a hang.
    host, port = default_server.hostport("health")
    with socket.create_connection((host, port), timeout=3) as s:
        s.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 9000)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 431 "), data[:64]


def test_http_health_many_sequential(default_server):
    host, port = default_server.hostport("health")
    for i in range(20):
        assert http_get(host, port, f"/p{i}") == (200, b"")


def test_http_health_concurrent(default_server):
    host, port = default_server.hostport("health")
    results = h.run_in_threads(lambda i: http_get(host, port, f"/c{i}"), [(i,) for i in range(16)])
    assert results == [(200, b"")] * 16


def test_http_health_request_in_pieces(default_server):
    host, port = default_server.hostport("health")
    with socket.create_connection((host, port), timeout=3) as s:
        for part in (b"GET /hea", b"lthz HT", b"TP/1.1\r\nHost: x\r\n", b"\r\n"):
            s.sendall(part)
            time.sleep(0.05)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.0 200"), data
    head, _, body = data.partition(b"\r\n\r\n")
    assert re.search(rb"(?im)^content-length:\s*0\s*$", head), head


def test_http_health_survives_huge_request(default_server):
    host, port = default_server.hostport("health")
    for req in (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 100000 + b"\r\n\r\n"):
        with socket.create_connection((host, port), timeout=3) as s:
            try:
                s.sendall(req)
                s.recv(4096)
            except OSError:
                pass
    assert default_server.alive()
    assert http_get(host, port, "/") == (200, b"")


def test_http_health_survives_garbage(default_server):
    host, port = default_server.hostport("health")
    for junk in (b"\x16\x03\x01\x00\x05hello", b"NOT HTTP AT ALL\r\n\r\n", b""):
        with socket.create_connection((host, port), timeout=2) as s:
            if junk:
                s.sendall(junk)
            s.settimeout(2)
            try:
                s.recv(1024)
            except (socket.timeout, ConnectionResetError):
                pass
    assert http_get(host, port, "/") == (200, b"")


@pytest.mark.parametrize("secure", [False, True], ids=["http", "https"])
def test_health_not_blocked_by_idle_connection(module_servers, secure):
    # A TCP health probe, a port scanner or a slow client opens a connection and sends
    # nothing. A real health check arriving meanwhile must still be answered promptly
    # (kubelet's default probe timeout is 1 s).
    srv = module_servers.start(SCRIPT, *(["--secure_health_check"] if secure else []))
    host, port = srv.hostport("health")
    ctx = tls_context(cadata=h.fetch_cert_pem(host, port)) if secure else None
    idle = [socket.create_connection((host, port), timeout=5) for _ in range(3)]
    try:
        time.sleep(0.05)
        t0 = time.monotonic()
        result = http_get(host, port, "/healthz", context=ctx)
        elapsed = time.monotonic() - t0
    finally:
        for s in idle:
            s.close()
    assert result == (200, b"")
    assert elapsed < 1.0, f"health check took {elapsed:.2f}s while idle connections were open"


def test_https_health_with_gen_certs(module_servers, certs):
    srv = module_servers.start(SCRIPT, "--secure_health_check",
                               "--cert_chain_path", str(certs / "server.pem"),
                               "--private_key_path", str(certs / "server.key"))
    host, port = srv.hostport("health")
    ctx = tls_context(cafile=str(certs / "ca.pem"))
    assert http_get(host, port, "/", context=ctx) == (200, b"")
    assert http_get("localhost", port, "/healthz", context=ctx) == (200, b"")
    # Plain HTTP on the HTTPS port does not get a 200.
    try:
        status, _ = http_get(host, port, "/")
    except (http.client.HTTPException, OSError):
        status = None
    assert status != 200
    grpc_works(srv, "tls", root_pem=(certs / "ca.pem").read_bytes())


def test_https_health_ephemeral_same_cert_as_grpc(module_servers):
    srv = module_servers.start(SCRIPT, "--secure_health_check")
    host, port = srv.hostport("health")
    health_pem = h.fetch_cert_pem(host, port)
    assert h.fingerprint(health_pem) == h.fingerprint(h.ephemeral_cert_of(srv))
    assert http_get(host, port, "/", context=tls_context(cadata=health_pem)) == (200, b"")


# --------------------------------------------------------------------------------------------
# Addresses and disabling listeners
# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(not h.ipv6_loopback_works(), reason="no IPv6 loopback")
def test_ipv6_addresses(servers):
    srv = servers.start(SCRIPT, addresses={"plaintext": f"[::1]:{h.free_port('::1')}",
                                           "secure": f"[::1]:{h.free_port('::1')}",
                                           "health": f"[::1]:{h.free_port('::1')}"})
    grpc_works(srv, "plaintext")
    grpc_works(srv, "tls")            # ephemeral cert has the ::1 SAN
    grpc_works(srv, "tls", override=None)
    host, port = srv.hostport("health")
    assert http_get(host, port, "/") == (200, b"")
    # Bound to ::1 only: the same port on 127.0.0.1 is not ours.
    refuses("127.0.0.1", srv.port("plaintext"))


def test_disable_plaintext(servers):
    srv = servers.start(SCRIPT, "--disable_plaintext")
    refuses(*srv.hostport("plaintext"))
    grpc_works(srv, "tls")
    assert http_get(*srv.hostport("health")) == (200, b"")


def test_disable_tls(servers):
    srv = servers.start(SCRIPT, "--disable_tls")
    refuses(*srv.hostport("secure"))
    grpc_works(srv, "plaintext")
    assert http_get(*srv.hostport("health")) == (200, b"")


def test_combined_health_check(servers):
    srv = servers.start(SCRIPT, "--combined_health_check")
    refuses(*srv.hostport("health"))
    grpc_works(srv, "plaintext")
    grpc_works(srv, "tls")


def test_default_addresses(servers):
    # Without address flags: TLS on 8443, h2c on 8080, health on 8000 (all interfaces).
    busy = [p for p in (8443, 8080, 8000) if h.can_connect("127.0.0.1", p, timeout=0.2)]
    if busy:
        pytest.skip(f"ports {busy} already in use on this machine")
    srv = servers.start(SCRIPT, default_addresses=False, wait=False)
    assert not any(a.startswith("--") and "address" in a for a in srv.argv)
    srv.addresses = {"secure": "127.0.0.1:8443", "plaintext": "127.0.0.1:8080",
                     "health": "127.0.0.1:8000"}
    srv.enabled = set(srv.addresses)
    srv.wait_ready()
    grpc_works(srv, "plaintext")
    grpc_works(srv, "tls")
    assert http_get("127.0.0.1", 8000, "/") == (200, b"")


def test_both_disabled_is_an_error(servers):
    argv, _, _ = servers.argv(servers.script(SCRIPT), "--disable_tls", "--disable_plaintext")
    rc, out, err = servers.run_to_exit(argv[1:], timeout=10)
    assert rc != 0
    lines = [l for l in err.splitlines() if l.strip()]
    assert any(("plaintext" in l.lower() and "tls" in l.lower()) or "disable" in l.lower() for l in lines), err


# --------------------------------------------------------------------------------------------
# Start-up errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("listener", ["plaintext", "secure", "health"])
def test_port_in_use(servers, listener):
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        argv, _, _ = servers.argv(servers.script(SCRIPT),
                                  addresses={listener: f"127.0.0.1:{port}"})
        rc, out, err = servers.run_to_exit(argv[1:], timeout=10)
    finally:
        holder.close()
    assert rc != 0, err
    lines = [l for l in err.splitlines() if str(port) in l]
    assert lines, f"no line names port {port}:\n{err}"
    assert any(re.search(r"in use|EADDRINUSE", l, re.I) for l in lines), err


def test_cert_file_missing(servers):
    missing = servers.tmpdir / "no-such-cert.pem"
    argv, _, _ = servers.argv(servers.script(SCRIPT), "--cert_chain_path", str(missing),
                              "--private_key_path", str(servers.tmpdir / "no-such-key.pem"))
    rc, out, err = servers.run_to_exit(argv[1:], timeout=10)
    assert rc != 0
    assert "no-such-cert.pem" in err or "no-such-key.pem" in err, err


def test_cert_file_garbage(servers, certs):
    junk = servers.tmpdir / "junk.pem"
    junk.write_text("this is not a certificate\n")
    argv, _, _ = servers.argv(servers.script(SCRIPT), "--cert_chain_path", str(junk),
                              "--private_key_path", str(certs / "server.key"))
    rc, out, err = servers.run_to_exit(argv[1:], timeout=10)
    assert rc != 0
    assert err.strip(), "no message on stderr"


def test_cert_path_is_a_directory(servers, certs):
    d = servers.tmpdir / "certdir.pem"
    d.mkdir()
    argv, _, _ = servers.argv(servers.script(SCRIPT), "--cert_chain_path", str(d),
                              "--private_key_path", str(certs / "server.key"))
    rc, out, err = servers.run_to_exit(argv[1:], timeout=10)
    assert rc != 0
    assert "certdir.pem" in err, err


def test_cert_file_unreadable(servers, certs):
    import os
    if os.geteuid() == 0:
        pytest.skip("root reads files regardless of their mode (see test_cert_path_is_a_directory)")
    locked = servers.tmpdir / "locked.pem"
    locked.write_bytes((certs / "server.pem").read_bytes())
    locked.chmod(0)
    argv, _, _ = servers.argv(servers.script(SCRIPT), "--cert_chain_path", str(locked),
                              "--private_key_path", str(certs / "server.key"))
    rc, out, err = servers.run_to_exit(argv[1:], timeout=10)
    assert rc != 0
    assert "locked.pem" in err, err


def test_key_does_not_match_cert(servers, certs, tmp_path):
    other = h.gen_certs(tmp_path / "other")
    argv, _, _ = servers.argv(servers.script(SCRIPT), "--cert_chain_path", str(certs / "server.pem"),
                              "--private_key_path", str(other / "server.key"))
    rc, out, err = servers.run_to_exit(argv[1:], timeout=10)
    assert rc != 0
    assert err.strip(), "no message on stderr"


@pytest.mark.parametrize("given", ["cert_chain_path", "private_key_path"])
def test_cert_and_key_both_or_neither(servers, certs, given):
    path = certs / ("server.pem" if given == "cert_chain_path" else "server.key")
    argv, _, _ = servers.argv(servers.script(SCRIPT), f"--{given}", str(path))
    rc, out, err = servers.run_to_exit(argv[1:], timeout=10)
    assert rc != 0
    assert err.strip(), "no message on stderr"


@pytest.mark.parametrize("listener,address", [
    ("plaintext", "nonsense"),
    ("secure", "127.0.0.1:notaport"),
    ("health", "nonsense"),
    ("health", "127.0.0.1:99999"),
    ("plaintext", "256.1.1.1:80"),
])
def test_bad_address(servers, listener, address):
    argv, _, _ = servers.argv(servers.script(SCRIPT), addresses={listener: address})
    rc, out, err = servers.run_to_exit(argv[1:], timeout=10)
    assert rc != 0, err
    assert address in err, f"the bad address {address!r} is not named:\n{err}"


@pytest.mark.parametrize("args", [["--no_such_flag"], ["--threads", "abc"], ["--log_level", "loud"]],
                         ids=["unknown-flag", "threads-abc", "log-level-loud"])
def test_bad_flags(servers, args):
    argv, _, _ = servers.argv(servers.script(SCRIPT), *args)
    rc, out, err = servers.run_to_exit(argv[1:], timeout=10)
    assert rc != 0
    assert err.strip(), "no message on stderr"
    assert args[-1] in err or args[0].lstrip("-") in err, err


# --------------------------------------------------------------------------------------------
# --help, --version, flag spellings, signals, log level
# --------------------------------------------------------------------------------------------

def test_help(servers):
    rc, out, err = servers.run_to_exit(["--help"], timeout=10)
    assert rc == 0, err
    missing = [f for f in FLAGS if not re.search("--" + f.replace("_", "[-_]"), out)]
    assert missing == [], f"--help does not list {missing}:\n{out}"


def test_version(servers):
    rc, out, err = servers.run_to_exit(["--version"], timeout=10)
    assert rc == 0, err
    assert project_version() in out, out


def test_dashed_flags_with_equals(servers):
    srv = servers.start(SCRIPT, "--log-level=debug", "--threads=1", "--disable-plaintext",
                        dashed=True, equals=True)
    assert "--plaintext-address=" in " ".join(srv.argv)
    refuses(*srv.hostport("plaintext"))
    grpc_works(srv, "tls")
    assert http_get(*srv.hostport("health")) == (200, b"")


def test_dashed_flags_with_space(servers):
    srv = servers.start(SCRIPT, "--log-level", "info", "--threads", "2", "--disable-tls",
                        "--combined-health-check", dashed=True)
    refuses(*srv.hostport("secure"))
    refuses(*srv.hostport("health"))
    grpc_works(srv, "plaintext")


def test_underscore_flags_with_equals(servers, certs):
    srv = servers.start(SCRIPT, f"--cert_chain_path={certs / 'server.pem'}",
                        f"--private_key_path={certs / 'server.key'}", "--secure_health_check",
                        "--threads=3", equals=True)
    grpc_works(srv, "tls", root_pem=(certs / "ca.pem").read_bytes())
    assert http_get(*srv.hostport("health"), context=tls_context(cafile=str(certs / "ca.pem"))) == (200, b"")


def test_sigint_graceful(servers):
    srv = servers.start(SCRIPT)
    grpc_works(srv)
    assert srv.signal_and_wait(signal.SIGINT) == 0, srv.log()


def test_sigterm_drains_open_stream(servers):
    srv = servers.start(SCRIPT)
    s = h.BidiStream(srv.stub())
    try:
        assert s.exchange(REQ) == GOOD
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # New connections are no longer accepted, or at least the process is on its way out;
        # the stream already open finishes normally.
        assert s.exchange(h.headers_req("response_headers", [])).WhichOneof("response") == "response_headers"
        rest, code, details = s.finish()
        assert (rest, code) == ([], OK), details
    finally:
        s.cancel()
    assert srv.signal_and_wait(send=False) == 0, srv.log()


@pytest.mark.parametrize("kind", ["plaintext", "tls"])
def test_sigterm_with_idle_open_streams(servers, kind):
    # Streams that never end must not keep the server from exiting: after the grace period
    # they are cancelled and the exit is still clean (0) and within the stop timeout.
    # Several streams, so that both workers hold some when the calls are cancelled.
    srv = servers.start(SCRIPT)
    stub = srv.stub(kind)
    streams = [h.BidiStream(stub, timeout=60) for _ in range(8)]
    try:
        for s in streams:
            assert s.exchange(REQ) == GOOD
        t0 = time.monotonic()
        rc = srv.signal_and_wait(signal.SIGTERM, close_channels=False)
        elapsed = time.monotonic() - t0
    finally:
        for s in streams:
            s.cancel()
    assert rc == 0, f"exit code {rc} after {elapsed:.1f}s\n{srv.log()}"


def test_log_level_error_is_quiet(servers):
    srv = servers.start(SCRIPT, "--log_level", "error")
    grpc_works(srv)
    grpc_works(srv, "tls")
    noisy = [l for l in srv.log().splitlines() if re.search(r"\b(DEBUG|INFO|WARN)\b", l)]
    assert noisy == [], "\n".join(noisy)
