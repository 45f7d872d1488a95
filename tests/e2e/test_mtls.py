"""TLS for real deployments: client certificates (--client_ca_path), certificates reloaded
on SIGHUP and with --watch without dropping open connections, and the names of the
ephemeral certificate (--cert_hostnames).

The certificates are made here with the openssl command line: a CA, two server
certificates it signed (the second one is what a reload installs), a client certificate it
signed, and a client certificate of another CA."""

import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

import harness as h

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

SCRIPT = 'function on_request_headers(h, ctx) return { add = { {"x-ok", "1"} } } end\n'
REQ = h.headers_req("request_headers", [(":path", "/")])
GOOD = h.wrap("request_headers", h.add_header_mutation(add=[("x-ok", "1")]))


# --------------------------------------------------------------------------------------------
# certificates
# --------------------------------------------------------------------------------------------

def openssl(*args, cwd):
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, timeout=30)
    assert p.returncode == 0, f"openssl {' '.join(args)}: {p.stderr.decode(errors='replace')}"


def make_ca(d, name):
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", f"{name}.key", cwd=d)
    openssl("req", "-new", "-x509", "-key", f"{name}.key", "-sha256", "-days", "30",
            "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", f"{name}.pem", cwd=d)


def make_leaf(d, name, ca, usage, san=None):
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", f"{name}.key", cwd=d)
    openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr",
            cwd=d)
    ext = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature",
           f"extendedKeyUsage={usage}"]
    if san:
        ext.append(f"subjectAltName={san}")
    (Path(d) / f"{name}.ext").write_text("\n".join(ext) + "\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-set_serial", "0x" + os.urandom(8).hex(), "-sha256", "-days", "30",
            "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other_ca")
    for server in ("server", "server2"):
        make_leaf(d, server, "ca", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    make_leaf(d, "client", "ca", "clientAuth")
    make_leaf(d, "stranger", "other_ca", "clientAuth")
    return d


def pem(path):
    return Path(path).read_bytes()


def fp_of_file(path):
    return h.fingerprint(Path(path).read_text())


def fp_of_der(der):
    d = hashlib.sha256(der).hexdigest().upper()
    return ":".join(d[i:i + 2] for i in range(0, len(d), 2))


def tls_dir(tmp_path, pki, name="tls"):
    """A folder with copies of the server certificate and key, and the CA: the files a
    reload reads again."""
    d = tmp_path / name
    d.mkdir()
    shutil.copy(pki / "server.pem", d / "cert.pem")
    shutil.copy(pki / "server.key", d / "key.pem")
    shutil.copy(pki / "ca.pem", d / "ca.pem")
    return d


def replace(path, data):
    """Replaces a file the way deploy tools do: a new file renamed over the old one."""
    tmp = Path(str(path) + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def mtls_server(servers, d, *extra):
    return servers.start(SCRIPT, "--cert_chain_path", str(d / "cert.pem"), "--private_key_path",
                         str(d / "key.pem"), "--client_ca_path", str(d / "ca.pem"), *extra)


# --------------------------------------------------------------------------------------------
# clients
# --------------------------------------------------------------------------------------------

def mtls_channel(server, pki, client="client"):
    """A gRPC channel to the TLS port presenting pki/<client>.pem (None: no certificate)."""
    kw = {}
    if client:
        kw = {"private_key": pem(pki / f"{client}.key"),
              "certificate_chain": pem(pki / f"{client}.pem")}
    creds = grpc.ssl_channel_credentials(root_certificates=pem(pki / "ca.pem"), **kw)
    # a connection of its own: grpc-python shares them between channels unless told not to
    return grpc.secure_channel(server.target("secure"), creds,
                               options=[("grpc.ssl_target_name_override", "localhost"),
                                        ("grpc.use_local_subchannel_pool", 1)])


def answers(channel, timeout=5):
    stub = h.pb_grpc.ExternalProcessorStub(channel)
    responses, code, details = h.process(stub, [REQ], timeout=timeout)
    return code, responses, details


def served_fingerprint(server, pki, client="client", port="secure"):
    """The SHA-256 fingerprint of the certificate a new TLS connection gets."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE   # whatever is served: the test compares fingerprints
    if client:
        ctx.load_cert_chain(str(pki / f"{client}.pem"), str(pki / f"{client}.key"))
    ctx.set_alpn_protocols(["h2"])
    host, p = server.hostport(port)
    with socket.create_connection((host, p), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            return fp_of_der(s.getpeercert(binary_form=True))


def wait_log(server, text, timeout=10):
    return h.wait_for(lambda: text in server.log(), timeout, f"{text!r} in the log")


# --------------------------------------------------------------------------------------------
# mTLS
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mtls(module_servers, pki, tmp_path_factory):
    d = tls_dir(tmp_path_factory.mktemp("mtls"), pki)
    return module_servers.start(SCRIPT, "--threads", "2", "--secure_health_check",
                                "--cert_chain_path", str(d / "cert.pem"),
                                "--private_key_path", str(d / "key.pem"),
                                "--client_ca_path", str(d / "ca.pem"))


def test_good_client_certificate_gets_answers(mtls, pki):
    with mtls_channel(mtls, pki, "client") as ch:
        code, responses, details = answers(ch)
    assert (code, responses) == (OK, [GOOD]), details


def test_client_certificate_of_another_ca_is_refused(mtls, pki):
    with mtls_channel(mtls, pki, "stranger") as ch:
        code, _, details = answers(ch)
    assert code == UNAVAILABLE, (code, details)


def test_no_client_certificate_is_refused(mtls, pki):
    with mtls_channel(mtls, pki, None) as ch:
        code, _, details = answers(ch)
    assert code == UNAVAILABLE, (code, details)


def test_certificate_not_for_client_auth_is_refused(mtls, pki):
    # signed by the right CA, but its extended key usage says serverAuth only
    with mtls_channel(mtls, pki, "server") as ch:
        code, _, details = answers(ch)
    assert code == UNAVAILABLE, (code, details)


def test_tls_port_needs_alpn_h2(mtls, pki):
    # What docs/operations.md tells Envoy users: grpc's server drops a TLS client that does
    # not offer ALPN h2 (the handshake completes, then the connection closes).
    def settings_frame(alpn):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        if alpn:
            ctx.set_alpn_protocols(alpn)
        host, port = mtls.hostport("secure")
        with socket.create_connection((host, port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                # the HTTP/2 preface and an empty SETTINGS frame
                s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
                try:
                    head = s.recv(9)
                except (ssl.SSLError, ConnectionError):
                    head = b""
                return len(head) == 9 and head[3] == 4   # a SETTINGS frame
    assert settings_frame(["h2"])
    assert not settings_frame(None)


def test_refusals_are_per_handshake(mtls, pki):
    # A refused client does not poison the port: the next good one is served.
    with mtls_channel(mtls, pki, None) as ch:
        assert answers(ch)[0] == UNAVAILABLE
    with mtls_channel(mtls, pki, "client") as ch:
        assert answers(ch)[0] == OK


def test_plaintext_port_needs_no_certificate(mtls):
    responses, code, details = h.process(mtls.stub("plaintext"), [REQ], timeout=5)
    assert (code, responses) == (OK, [GOOD]), details


def test_https_health_port_asks_no_client_certificate(mtls, pki):
    # kubelet's probes present no certificate: the health port must not ask for one.
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    host, port = mtls.hostport("health")
    import http.client
    conn = http.client.HTTPSConnection(host, port, timeout=5, context=ctx)
    try:
        conn.request("GET", "/ready")
        r = conn.getresponse()
        assert (r.status, r.read()) == (200, b"")
    finally:
        conn.close()


def test_mtls_logged_at_start(mtls, pki):
    log = mtls.log()
    assert "mTLS: TLS gRPC clients need a certificate from" in log, log
    assert fp_of_file(pki / "server.pem") in log, log


def test_gen_certs_client_certificate_works(servers, tmp_path):
    # scripts/gen-certs.sh makes what docs/operations.md tells users to try mTLS with
    certs = h.gen_certs(tmp_path / "certs")
    srv = servers.start(SCRIPT, "--cert_chain_path", str(certs / "server.pem"),
                        "--private_key_path", str(certs / "server.key"),
                        "--client_ca_path", str(certs / "ca.pem"))
    assert (certs / "client.pem").is_file() and (certs / "client.key").is_file()
    with mtls_channel(srv, certs, "client") as ch:
        assert answers(ch)[0] == OK
    with mtls_channel(srv, certs, None) as ch:
        assert answers(ch)[0] == UNAVAILABLE


# --------------------------------------------------------------------------------------------
# start-up checks
# --------------------------------------------------------------------------------------------

def run(servers, *args):
    script = servers.script(SCRIPT)
    return servers.run_to_exit(["--plaintext_address", f"127.0.0.1:{h.free_port()}",
                                "--secure_address", f"127.0.0.1:{h.free_port()}",
                                "--health_check_address", f"127.0.0.1:{h.free_port()}",
                                *args, script])


def test_missing_client_ca_is_fatal(servers, pki, tmp_path):
    rc, _, err = run(servers, "--client_ca_path", str(tmp_path / "nope.pem"))
    assert rc == 1, err
    assert "cannot read client CA bundle" in err and "nope.pem" in err and \
        "No such file" in err, err


def test_garbage_client_ca_is_fatal(servers, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    rc, _, err = run(servers, "--client_ca_path", str(bad))
    assert rc == 1, err
    assert "client CA bundle" in err and "no PEM certificate" in err, err


def test_truncated_client_ca_is_fatal(servers, pki, tmp_path):
    bad = tmp_path / "cut.pem"
    text = (pki / "ca.pem").read_text()
    bad.write_text(text[:len(text) // 2] + "\n-----END CERTIFICATE-----\n")
    rc, _, err = run(servers, "--client_ca_path", str(bad))
    assert rc == 1, err
    assert "client CA bundle" in err and str(bad) in err, err


def test_client_ca_needs_the_tls_port(servers, pki):
    rc, _, err = run(servers, "--disable_tls", "--client_ca_path", str(pki / "ca.pem"))
    assert rc == 2 and "--client_ca_path" in err and "--disable_tls" in err, err


# --------------------------------------------------------------------------------------------
# reload
# --------------------------------------------------------------------------------------------

def test_sighup_reload_keeps_open_streams_and_serves_the_new_certificate(servers, pki, tmp_path):
    d = tls_dir(tmp_path, pki)
    srv = mtls_server(servers, d, "--threads", "2")
    old_fp, new_fp = fp_of_file(pki / "server.pem"), fp_of_file(pki / "server2.pem")
    assert served_fingerprint(srv, pki) == old_fp

    ch = mtls_channel(srv, pki)
    stream = h.BidiStream(h.pb_grpc.ExternalProcessorStub(ch))
    assert stream.exchange(REQ) == GOOD

    replace(d / "key.pem", pem(pki / "server2.key"))
    replace(d / "cert.pem", pem(pki / "server2.pem"))
    srv.proc.send_signal(signal.SIGHUP)
    wait_log(srv, f"TLS reloaded: new connections get certificate {new_fp}")

    # the stream opened before the reload goes on, on its old connection
    assert stream.exchange(REQ) == GOOD
    rest, code, details = stream.finish()
    assert (rest, code) == ([], OK), details
    # new connections get the new certificate, from every worker
    h.wait_for(lambda: served_fingerprint(srv, pki) == new_fp, 5, "the new certificate")
    assert [served_fingerprint(srv, pki) for _ in range(8)] == [new_fp] * 8
    with mtls_channel(srv, pki) as fresh:
        assert answers(fresh)[0] == OK
    ch.close()


def test_a_restarted_worker_serves_the_reloaded_certificate(servers, pki, tmp_path):
    d = tls_dir(tmp_path, pki)
    srv = mtls_server(servers, d, "--threads", "1")
    new_fp = fp_of_file(pki / "server2.pem")
    replace(d / "key.pem", pem(pki / "server2.key"))
    replace(d / "cert.pem", pem(pki / "server2.pem"))
    srv.proc.send_signal(signal.SIGHUP)
    wait_log(srv, "TLS reloaded")
    [old] = h.wait_for(lambda: h.worker_pids(srv), 5, "the worker")
    os.kill(old, signal.SIGKILL)
    h.wait_for(lambda: h.worker_pids(srv) and h.worker_pids(srv) != [old], 10, "a new worker")
    h.wait_for(lambda: h.can_connect(*srv.hostport("secure")), 10, "the TLS port")

    def served():
        try:
            return served_fingerprint(srv, pki)
        except OSError:
            return None   # the new worker is not listening yet
    assert h.wait_for(served, 10, "a handshake") == new_fp


def test_bad_replacement_is_refused_and_the_old_certificate_serves(servers, pki, tmp_path):
    d = tls_dir(tmp_path, pki)
    srv = mtls_server(servers, d)
    old_fp = fp_of_file(pki / "server.pem")

    # a certificate that does not match the key
    replace(d / "cert.pem", pem(pki / "server2.pem"))
    srv.proc.send_signal(signal.SIGHUP)
    wait_log(srv, "does not match the certificate")
    assert f"TLS reload refused, still serving certificate {old_fp}" in srv.log(), srv.log()
    assert served_fingerprint(srv, pki) == old_fp
    with mtls_channel(srv, pki) as ch:
        assert answers(ch)[0] == OK

    # a client CA bundle that is not one
    replace(d / "cert.pem", pem(pki / "server.pem"))
    replace(d / "ca.pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    srv.proc.send_signal(signal.SIGHUP)
    h.wait_for(lambda: srv.log().count("TLS reload refused") >= 2, 10, "the second refusal")
    assert "client CA bundle" in srv.log().split("does not match")[-1], srv.log()
    with mtls_channel(srv, pki) as ch:
        assert answers(ch)[0] == OK
    with mtls_channel(srv, pki, "stranger") as ch:
        assert answers(ch)[0] == UNAVAILABLE

    # an unreadable key
    replace(d / "ca.pem", pem(pki / "ca.pem"))
    os.remove(d / "key.pem")
    srv.proc.send_signal(signal.SIGHUP)
    h.wait_for(lambda: srv.log().count("TLS reload refused") >= 3, 10, "the third refusal")
    assert "cannot read private key" in srv.log(), srv.log()
    assert served_fingerprint(srv, pki) == old_fp
    assert srv.alive()


def test_reloaded_client_ca_applies_to_new_connections(servers, pki, tmp_path):
    # The client CA reloads too: once it is the other CA, the client it signed gets in and
    # the one the first CA signed does not.
    d = tls_dir(tmp_path, pki)
    srv = mtls_server(servers, d)
    with mtls_channel(srv, pki, "stranger") as ch:
        assert answers(ch)[0] == UNAVAILABLE
    replace(d / "ca.pem", pem(pki / "other_ca.pem"))
    srv.proc.send_signal(signal.SIGHUP)
    wait_log(srv, "TLS reloaded")

    def stranger_in():
        creds = grpc.ssl_channel_credentials(root_certificates=pem(pki / "ca.pem"),
                                             private_key=pem(pki / "stranger.key"),
                                             certificate_chain=pem(pki / "stranger.pem"))
        with grpc.secure_channel(srv.target("secure"), creds,
                                 options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
            return answers(ch)[0] == OK
    h.wait_for(stranger_in, 5, "the client of the new CA to be let in")
    with mtls_channel(srv, pki, "client") as ch:
        assert answers(ch)[0] == UNAVAILABLE


def test_unchanged_files_change_nothing(servers, pki, tmp_path):
    d = tls_dir(tmp_path, pki)
    srv = mtls_server(servers, d)
    srv.proc.send_signal(signal.SIGHUP)
    wait_log(srv, "and client CA unchanged")
    assert "TLS reloaded" not in srv.log()


def test_ephemeral_certificate_survives_sighup(servers):
    srv = servers.start(SCRIPT)
    before = h.fingerprint(h.ephemeral_cert_of(srv))
    srv.proc.send_signal(signal.SIGHUP)
    wait_log(srv, f"TLS: certificate {before} unchanged")
    assert h.fingerprint(h.ephemeral_cert_of(srv)) == before


def test_https_health_port_follows_a_reload(servers, pki, tmp_path):
    d = tls_dir(tmp_path, pki)
    srv = mtls_server(servers, d, "--secure_health_check")
    assert served_fingerprint(srv, pki, None, "health") == fp_of_file(pki / "server.pem")
    replace(d / "key.pem", pem(pki / "server2.key"))
    replace(d / "cert.pem", pem(pki / "server2.pem"))
    srv.proc.send_signal(signal.SIGHUP)
    wait_log(srv, "TLS reloaded")
    assert served_fingerprint(srv, pki, None, "health") == fp_of_file(pki / "server2.pem")


def test_watch_picks_up_a_swapped_certificate(servers, pki, tmp_path):
    # As Kubernetes updates a Secret volume: the files are links through `..data`, which is
    # swapped for a folder with the new files in one rename.
    d = tmp_path / "secret"
    v1, v2 = d / "..v1", d / "..v2"
    for v, name in ((v1, "server"), (v2, "server2")):
        v.mkdir(parents=True)
        shutil.copy(pki / f"{name}.pem", v / "tls.crt")
        shutil.copy(pki / f"{name}.key", v / "tls.key")
        shutil.copy(pki / "ca.pem", v / "ca.crt")
    os.symlink("..v1", d / "..data")
    for f in ("tls.crt", "tls.key", "ca.crt"):
        os.symlink(f"..data/{f}", d / f)
    srv = servers.start(SCRIPT, "--watch", "--cert_chain_path", str(d / "tls.crt"),
                        "--private_key_path", str(d / "tls.key"),
                        "--client_ca_path", str(d / "ca.crt"))
    wait_log(srv, "(TLS files)")
    old_fp, new_fp = fp_of_file(pki / "server.pem"), fp_of_file(pki / "server2.pem")
    assert served_fingerprint(srv, pki) == old_fp
    os.symlink("..v2", d / "..data_tmp")
    os.replace(d / "..data_tmp", d / "..data")
    wait_log(srv, f"TLS reloaded: new connections get certificate {new_fp}")
    h.wait_for(lambda: served_fingerprint(srv, pki) == new_fp, 5, "the new certificate")
    assert "TLS reload refused" not in srv.log(), srv.log()


def test_watch_picks_up_a_rewritten_certificate_file(servers, pki, tmp_path):
    d = tls_dir(tmp_path, pki)
    srv = mtls_server(servers, d, "--watch")
    wait_log(srv, "(TLS files)")
    new_fp = fp_of_file(pki / "server2.pem")
    # rewritten in place, key first: the pair matches again once both are written
    (d / "key.pem").write_bytes(pem(pki / "server2.key"))
    (d / "cert.pem").write_bytes(pem(pki / "server2.pem"))
    wait_log(srv, f"TLS reloaded: new connections get certificate {new_fp}")
    h.wait_for(lambda: served_fingerprint(srv, pki) == new_fp, 5, "the new certificate")


# --------------------------------------------------------------------------------------------
# --cert_hostnames
# --------------------------------------------------------------------------------------------

def sans(pem_text):
    cert = x509.load_pem_x509_certificate(pem_text.encode())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return cn, ext.get_values_for_type(x509.DNSName), ext.get_values_for_type(x509.IPAddress)


def test_default_ephemeral_names(servers):
    srv = servers.start(SCRIPT)
    cn, dns, ips = sans(h.ephemeral_cert_of(srv))
    assert (cn, dns, ips) == ("localhost", ["localhost"],
                              [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")])


def test_cert_hostnames_in_the_ephemeral_certificate(servers):
    names = "10.1.2.3, callout.example.com,*.callout.svc.cluster.local,[fd00::7],127.0.0.1"
    srv = servers.start(SCRIPT, "--cert_hostnames", names)
    cn, dns, ips = sans(h.ephemeral_cert_of(srv))
    assert cn == "callout.example.com"
    assert dns == ["callout.example.com", "*.callout.svc.cluster.local"]
    assert ips == [ipaddress.ip_address(a) for a in ("10.1.2.3", "fd00::7", "127.0.0.1")]
    # a client that checks the name gets through with it, and not with another
    pem_text = h.ephemeral_cert_of(srv).encode()
    for override, want in (("callout.example.com", OK), ("a.callout.svc.cluster.local", OK),
                           ("localhost", UNAVAILABLE)):
        creds = grpc.ssl_channel_credentials(root_certificates=pem_text)
        with grpc.secure_channel(srv.target("secure"), creds,
                                 options=[("grpc.ssl_target_name_override", override)]) as ch:
            assert answers(ch)[0] == want, override
    assert "ephemeral self-signed certificate for " + names in srv.log()


@pytest.mark.parametrize("bad", ["bad name", "a,,b", "-x.example", "x..y", "10.0.0.256", ",",
                                 "a_b.example", "*"])
def test_bad_cert_hostnames_are_fatal(servers, bad):
    rc, _, err = run(servers, "--cert_hostnames", bad)
    assert rc == 1 and "--cert_hostnames" in err, (bad, rc, err)


def test_cert_hostnames_with_a_certificate_file_is_an_error(servers, pki):
    rc, _, err = run(servers, "--cert_hostnames", "x.example", "--cert_chain_path",
                     str(pki / "server.pem"), "--private_key_path", str(pki / "server.key"))
    assert rc == 2 and "--cert_hostnames" in err, err
