"""Shared machinery of the end-to-end tests: python stubs generated from proto/, the server
process, gRPC channels, and helpers that build requests and expected responses.

Everything here talks to the real binary over real sockets; nothing is mocked.

Environment (set by ctest, see CMakeLists.txt):
  LUACALLOUT_BIN  the server binary
  LUACALLOUT_SRC  the repository root
  LUACALLOUT_GEN  a build-dir folder for the generated python stubs (a tmp dir when unset)
"""

import hashlib
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
SRC = Path(os.environ.get("LUACALLOUT_SRC") or HERE.parent.parent).resolve()
PROTO_DIR = SRC / "proto"
BIN = os.environ.get("LUACALLOUT_BIN") or str(SRC / "build" / "luacallout")

START_TIMEOUT = 10.0   # seconds for the listeners to accept connections
STOP_TIMEOUT = 10.0    # seconds for a graceful exit after SIGTERM
RPC_TIMEOUT = 10.0     # deadline of every test stream

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


# --------------------------------------------------------------------------------------------
# Python stubs, generated once from proto/ (envoy/** and grpc/health/v1: google/protobuf
# comes from the protobuf package itself; the health stubs are top-level modules,
# health_pb2 and health_pb2_grpc, so that they cannot clash with the grpc package). Keyed by a hash of the protos so a proto change regenerates;
# generated into a private tmp dir and renamed into place, so concurrent ctest runs never see
# a half-written tree.
# --------------------------------------------------------------------------------------------

def _envoy_protos():
    return sorted(p.relative_to(PROTO_DIR).as_posix() for p in (PROTO_DIR / "envoy").rglob("*.proto"))


def _stub_dir():
    import grpc_tools
    h = hashlib.sha256()
    h.update(getattr(grpc, "__version__", "").encode())
    h.update(str(Path(grpc_tools.__file__).resolve()).encode())
    for p in sorted(PROTO_DIR.rglob("*.proto")):
        h.update(p.relative_to(PROTO_DIR).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    gen_root = os.environ.get("LUACALLOUT_GEN")
    if gen_root:
        base = Path(gen_root)
    else:
        base = Path(tempfile.gettempdir()) / f"luacallout-pystubs-{os.getuid()}"
    return base, base / f"py-{h.hexdigest()[:16]}"


def ensure_stubs():
    base, final = _stub_dir()
    if not (final / "COMPLETE").exists():
        from grpc_tools import protoc
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=base))
        try:
            files = _envoy_protos()
            assert files, f"no envoy protos under {PROTO_DIR}"
            rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={tmp}",
                              f"--grpc_python_out={tmp}", *files])
            if rc != 0:
                raise RuntimeError(f"grpc_tools.protoc failed ({rc}) on {files}")
            health = PROTO_DIR / "grpc" / "health" / "v1"
            rc = protoc.main(["grpc_tools.protoc", f"-I{health}", f"--python_out={tmp}",
                              f"--grpc_python_out={tmp}", "health.proto"])
            if rc != 0:
                raise RuntimeError(f"grpc_tools.protoc failed ({rc}) on {health}/health.proto")
            # Regular packages, so that no other 'envoy' on sys.path can shadow ours.
            for d in [tmp / "envoy", *(p for p in (tmp / "envoy").rglob("*") if p.is_dir())]:
                (d / "__init__.py").touch()
            (tmp / "COMPLETE").write_text("ok\n")
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "COMPLETE").exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if str(final) not in sys.path:
        sys.path.insert(0, str(final))
    return final


STUB_DIR = ensure_stubs()

from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2  # noqa: E402,F401
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc  # noqa: E402
from envoy.type.v3 import http_status_pb2  # noqa: E402,F401
from google.protobuf import struct_pb2  # noqa: E402,F401
import health_pb2  # noqa: E402
import health_pb2_grpc  # noqa: E402

assert pb.ProcessingRequest.DESCRIPTOR.fields_by_name["metadata_context"].message_type \
    is base_pb2.Metadata.DESCRIPTOR

PHASES = ("request_headers", "response_headers", "request_body", "response_body",
          "request_trailers", "response_trailers")
HEADER_PHASES = PHASES[0:2]
BODY_PHASES = PHASES[2:4]
TRAILER_PHASES = PHASES[4:6]
HANDLERS = {p: "on_" + p for p in PHASES}


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------

def header_values(pairs):
    """pairs of (key, value): a str value goes in raw_value as UTF-8, bytes as is; a
    HeaderValue is taken as it is."""
    out = []
    for item in pairs:
        if isinstance(item, base_pb2.HeaderValue):
            out.append(item)
            continue
        k, v = item
        out.append(base_pb2.HeaderValue(key=k, raw_value=v if isinstance(v, bytes) else v.encode()))
    return out


def headers_req(phase, pairs=(), end_of_stream=False, **extra):
    assert phase in HEADER_PHASES
    hh = pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=header_values(pairs)),
                        end_of_stream=end_of_stream)
    return pb.ProcessingRequest(**{phase: hh}, **extra)


def body_req(phase, data=b"", end_of_stream=False, **extra):
    assert phase in BODY_PHASES
    if isinstance(data, str):
        data = data.encode()
    return pb.ProcessingRequest(**{phase: pb.HttpBody(body=data, end_of_stream=end_of_stream)},
                                **extra)


def trailers_req(phase, pairs=(), **extra):
    assert phase in TRAILER_PHASES
    tr = pb.HttpTrailers(trailers=base_pb2.HeaderMap(headers=header_values(pairs)))
    return pb.ProcessingRequest(**{phase: tr}, **extra)


def any_req(phase, **extra):
    """A plausible request for any phase."""
    if phase in HEADER_PHASES:
        return headers_req(phase, [(":path", "/"), ("x-test", "1")], **extra)
    if phase in BODY_PHASES:
        return body_req(phase, b"some body", end_of_stream=True, **extra)
    return trailers_req(phase, [("x-trailer", "t")], **extra)


# --------------------------------------------------------------------------------------------
# Expected responses, built the way the Google Python SDK's callout_tools builds them.
# --------------------------------------------------------------------------------------------

def hvo(key, value, append_action=None):
    opt = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value if isinstance(value, bytes) else value.encode()))
    if append_action:
        opt.append_action = append_action
    return opt


def add_header_mutation(add=None, remove=None, clear_route_cache=False, append_action=None):
    """Same shape as callout_tools.add_header_mutation: a HeadersResponse."""
    resp = pb.HeadersResponse()
    if add:
        for k, v in add:
            resp.response.header_mutation.set_headers.append(hvo(k, v, append_action))
    if remove is not None:
        resp.response.header_mutation.remove_headers.extend(remove)
    if clear_route_cache:
        resp.response.clear_route_cache = True
    return resp


def add_body_mutation(body=None, clear_body=False, clear_route_cache=False):
    """Same shape as callout_tools.add_body_mutation: a BodyResponse."""
    resp = pb.BodyResponse()
    if body:
        resp.response.body_mutation.body = body if isinstance(body, bytes) else body.encode()
    else:
        resp.response.body_mutation.clear_body = clear_body
    if clear_route_cache:
        resp.response.clear_route_cache = True
    return resp


def trailers_mutation(add=None, remove=None):
    resp = pb.TrailersResponse()
    for k, v in add or ():
        resp.header_mutation.set_headers.append(hvo(k, v))
    if remove:
        resp.header_mutation.remove_headers.extend(remove)
    return resp


def immediate(status=200, headers=None, body=None, details=None, grpc_status=None):
    imm = pb.ImmediateResponse()
    imm.status.code = status
    if headers:
        for k, v in headers:
            imm.headers.set_headers.append(hvo(k, v))
    if body is not None:
        imm.body = body if isinstance(body, bytes) else body.encode()
    if details is not None:
        imm.details = details
    if grpc_status is not None:
        imm.grpc_status.status = grpc_status
    return pb.ProcessingResponse(immediate_response=imm)


def wrap(phase, inner):
    return pb.ProcessingResponse(**{phase: inner})


def strip_empty(msg):
    """A copy of msg where every present-but-empty sub-message is cleared, recursively:
    the wire difference between 'absent' and 'present, empty' is not what the empty-response
    tests are about."""
    out = type(msg)()
    out.CopyFrom(msg)

    def walk(m):
        for fd, val in list(m.ListFields()):
            if fd.type != fd.TYPE_MESSAGE:
                continue
            if fd.label == fd.LABEL_REPEATED:
                if fd.message_type.GetOptions().map_entry:
                    vfd = fd.message_type.fields_by_name["value"]
                    items = list(val.values()) if vfd.type == vfd.TYPE_MESSAGE else []
                else:
                    items = list(val)
                for item in items:
                    walk(item)
            else:
                walk(val)
                if val.ByteSize() == 0 and fd.containing_oneof is None:
                    m.ClearField(fd.name)
    walk(out)
    return out


def assert_empty_response(resp, phase):
    assert resp.WhichOneof("response") == phase, f"expected an empty {phase} response, got:\n{resp}"
    inner = getattr(resp, phase)
    assert strip_empty(inner).ByteSize() == 0, f"{phase} response is not empty:\n{resp}"
    assert not resp.HasField("dynamic_metadata") and not resp.HasField("mode_override"), str(resp)


def header_map(mutation):
    """set_headers of a HeaderMutation as a list of (key, raw_value bytes)."""
    return [(o.header.key, o.header.raw_value) for o in mutation.set_headers]


# --------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------

def process(stub, requests, timeout=RPC_TIMEOUT):
    """Runs one Process stream: sends all requests, half-closes, reads everything.
    Returns (responses, status code, details)."""
    call = stub.Process(iter(list(requests)), timeout=timeout)
    responses = []
    try:
        for r in call:
            responses.append(r)
        return responses, call.code(), call.details()
    except grpc.RpcError as e:
        return responses, e.code(), e.details()


_END = object()


class BidiStream:
    """A lock-step stream: send one request, wait for its response."""

    def __init__(self, stub, timeout=RPC_TIMEOUT):
        self._q = queue.Queue()
        self.call = stub.Process(self._requests(), timeout=timeout)

    def _requests(self):
        while True:
            item = self._q.get()
            if item is _END:
                return
            yield item

    def send(self, req):
        self._q.put(req)

    def recv(self):
        return next(self.call)

    def exchange(self, req):
        self.send(req)
        return self.recv()

    def finish(self):
        """Half-closes and drains: (remaining responses, code, details)."""
        self._q.put(_END)
        rest = []
        try:
            for r in self.call:
                rest.append(r)
            return rest, self.call.code(), self.call.details()
        except grpc.RpcError as e:
            return rest, e.code(), e.details()

    def cancel(self):
        self.call.cancel()
        self._q.put(_END)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()


# --------------------------------------------------------------------------------------------
# Sockets and TLS
# --------------------------------------------------------------------------------------------

def free_port(host="127.0.0.1"):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ipv6_loopback_works():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def can_connect(host, port, timeout=1.0):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def connect_error(host, port, timeout=2.0):
    """None if a TCP connection succeeds, else the exception."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e


def fetch_cert_pem(host, port):
    return ssl.get_server_certificate((host, port), timeout=5)


def fingerprint(pem):
    d = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    return ":".join(d[i:i + 2] for i in range(0, len(d), 2))


FINGERPRINT_RE = re.compile(r"\b([0-9A-F]{2}(?::[0-9A-F]{2}){31})\b")


def split_hostport(addr):
    m = re.fullmatch(r"\[(.*)\]:(\d+)", addr) or re.fullmatch(r"([^:]*):(\d+)", addr)
    assert m, addr
    return m.group(1), int(m.group(2))


# --------------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------------

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "ERROR: ThreadSanitizer",
                     "WARNING: ThreadSanitizer", "SUMMARY: UndefinedBehaviorSanitizer")
UBSAN_RE = re.compile(r"\.[ch]:\d+:\d+: runtime error:")


def _is_sanitized():
    try:
        with open(BIN, "rb") as f:
            return b"__asan_init" in f.read()
    except OSError:
        return False


# An ASan build holds freed memory in quarantine and ignores malloc_trim: tests skip their
# assertions on RSS there and keep the behaviour ones.
SANITIZED = _is_sanitized()


def process_tree(pid):
    """pid and every process descended from it (the supervisor and its workers)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def rss_mb(server):
    """Resident memory of the server's processes (supervisor and workers), in MiB."""
    total = 0
    for pid in process_tree(server.proc.pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


def metrics_text(server):
    """The server's /metrics, as text."""
    with urllib.request.urlopen(f"http://{server.target('health')}/metrics", timeout=5) as r:
        return r.read().decode()


def worker_pids(server):
    """The server's worker processes (its children named luacallout:wN), sorted."""
    out = []
    for pid in process_tree(server.proc.pid)[1:]:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().startswith("luacallout:w"):
                    out.append(pid)
        except OSError:
            pass
    return sorted(out)


def wait_for(pred, timeout, what):
    """pred()'s first true value within timeout seconds; fails the test otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def sanitizer_report(text):
    for m in SANITIZER_MARKERS:
        if m in text:
            return m
    m = UBSAN_RE.search(text)
    return m.group(0) if m else None


def flag(name, dashed=False):
    return "--" + (name.replace("_", "-") if dashed else name)


def _norm_flag(arg):
    return arg.split("=", 1)[0].lstrip("-").replace("-", "_")


class Server:
    def __init__(self, argv, log_path, addresses, enabled, cwd, preexec_fn=None):
        self.argv = argv
        self.log_path = Path(log_path)
        self.addresses = addresses      # listener -> "host:port"
        self.enabled = enabled          # listeners expected to accept connections
        self._log = open(self.log_path, "ab")   # O_APPEND: every writer appends
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log, cwd=cwd, preexec_fn=preexec_fn)
        self._channels = []
        self._stopped = False
        self._exit_code = None

    # -- addresses --
    def hostport(self, listener):
        return split_hostport(self.addresses[listener])

    def port(self, listener):
        return self.hostport(listener)[1]

    def target(self, listener):
        host, port = self.hostport(listener)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -- logs --
    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout=START_TIMEOUT):
        deadline = time.monotonic() + timeout
        pending = set(self.enabled)
        while pending:
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(f"server exited with {rc} during start-up: {self.argv}\n"
                                     f"--- server log ---\n{self.log()}")
            for l in list(pending):
                host, port = self.hostport(l)
                if can_connect(host, port, timeout=0.2):
                    pending.discard(l)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"listeners {sorted(pending)} not accepting after {timeout}s: "
                                     f"{self.argv}\n--- server log ---\n{self.log()}")
            time.sleep(0.02)
        # The health port opens before the script is loaded and a gRPC port accepts once
        # the first worker listens: ready means /ready says so (every worker serves).
        while "health" in self.enabled and self.ready_status() != 200:
            rc = self.proc.poll()
            if rc is not None or time.monotonic() > deadline:
                raise AssertionError(f"/ready not 200 after {timeout}s (exit code {rc}): "
                                     f"{self.argv}\n--- server log ---\n{self.log()}")
            time.sleep(0.02)
        return self

    def ready_status(self):
        """GET /ready on the health port: its status code, or None when it does not answer."""
        import http.client
        host, port = self.hostport("health")
        if any(_norm_flag(a) == "secure_health_check" for a in self.argv if a.startswith("--")):
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            conn = http.client.HTTPSConnection(host, port, timeout=2, context=ctx)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=2)
        try:
            conn.request("GET", "/ready")
            return conn.getresponse().status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    # -- channels --
    def channel(self, kind="plaintext", root_pem=None, override="localhost", options=()):
        if kind == "plaintext":
            ch = grpc.insecure_channel(self.target("plaintext"), options=list(options))
        else:
            if root_pem is None:
                host, port = self.hostport("secure")
                root_pem = fetch_cert_pem(host, port)
            if isinstance(root_pem, str):
                root_pem = root_pem.encode()
            creds = grpc.ssl_channel_credentials(root_certificates=root_pem)
            opts = list(options)
            if override:
                opts.append(("grpc.ssl_target_name_override", override))
            ch = grpc.secure_channel(self.target("secure"), creds, options=opts)
        self._channels.append(ch)
        return ch

    def stub(self, kind="plaintext", **kw):
        return pb_grpc.ExternalProcessorStub(self.channel(kind, **kw))

    def health_stub(self, kind="plaintext", **kw):
        """grpc.health.v1.Health on the plaintext or the TLS ("tls") gRPC port."""
        return health_pb2_grpc.HealthStub(self.channel(kind, **kw))

    def alive(self):
        return self.proc.poll() is None

    # -- shutdown --
    def signal_and_wait(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT, send=True,
                        close_channels=True):
        """Sends sig (unless send is False or it already exited), waits for the exit and
        returns the exit code (None if it had to be killed). Our client channels are closed
        first unless close_channels is False (then after the exit)."""
        if close_channels:
            for ch in self._channels:
                ch.close()
            self._channels = []
        if send and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        for ch in self._channels:
            ch.close()
        self._channels = []
        self._stopped = True
        self._exit_code = rc
        if not self._log.closed:
            self._log.close()
        return rc

    def stop_and_check(self):
        """Teardown: SIGTERM → exit 0 within STOP_TIMEOUT, and no sanitizer report."""
        problems = []
        if self._stopped:
            rc = self._exit_code
        else:
            already_dead = self.proc.poll()
            rc = self.signal_and_wait(signal.SIGTERM)
            if already_dead is not None:
                problems.append(f"server died before teardown with exit code {already_dead}")
        text = self.log()
        if not problems:
            if rc is None:
                problems.append(f"server did not exit within {STOP_TIMEOUT}s of the signal")
            elif rc != 0:
                problems.append(f"server exited with {rc} after the signal (expected 0)")
        san = sanitizer_report(text)
        if san:
            problems.append(f"sanitizer report in server log: {san!r}")
        if problems:
            raise AssertionError("; ".join(problems) + f"\n{self.argv}\n--- server log ---\n{text}")


class ServerFactory:
    """Starts servers on free loopback ports; every server is stopped and checked at
    teardown (SIGTERM → exit 0, no sanitizer report)."""

    def __init__(self, tmpdir):
        self.tmpdir = Path(tmpdir)
        self.servers = []
        self._n = 0

    def script(self, source, name=None):
        self._n += 1
        path = self.tmpdir / (name or f"script{self._n}.lua")
        path.write_text(source)
        return path

    def argv(self, script, *extra, addresses=None, dashed=False, equals=False, default_addresses=True):
        """Builds argv; returns (argv, addresses used, listeners expected enabled)."""
        norm = {_norm_flag(a) for a in extra if a.startswith("--")}
        addrs = {}
        if default_addresses:
            addrs = {"plaintext": f"127.0.0.1:{free_port()}",
                     "secure": f"127.0.0.1:{free_port()}",
                     "health": f"127.0.0.1:{free_port()}"}
        addrs.update(addresses or {})
        names = {"plaintext": "plaintext_address", "secure": "secure_address",
                 "health": "health_check_address"}
        args = [BIN]
        for l, a in addrs.items():
            if a is None:          # listener left at the server's default address
                continue
            f = flag(names[l], dashed)
            args += [f"{f}={a}"] if equals else [f, a]
        # No drain grace and a short drain timeout unless a test asks: teardown SIGTERMs
        # every server and expects a quick exit.
        for name, value in (("drain_grace_ms", "0"), ("drain_timeout_ms", "5000")):
            if name not in norm:
                args += [flag(name, dashed), value]
        args += list(extra)
        args.append(str(script))
        addrs = {l: a for l, a in addrs.items() if a is not None}
        enabled = {"plaintext", "secure", "health"} & set(addrs)
        if "disable_plaintext" in norm:
            enabled.discard("plaintext")
        if "disable_tls" in norm:
            enabled.discard("secure")
        if "combined_health_check" in norm:
            enabled.discard("health")
        return args, addrs, enabled

    def start(self, script, *extra, wait=True, preexec_fn=None, **kw):
        """script: a Path, or Lua source text (written to a tmp file). preexec_fn runs in
        the child before exec (e.g. to set its resource limits)."""
        if not isinstance(script, Path):
            script = self.script(script)
        for attempt in range(3):
            argv, addrs, enabled = self.argv(script, *extra, **kw)
            self._n += 1
            srv = Server(argv, self.tmpdir / f"server{self._n}.log", addrs, enabled,
                         cwd=self.tmpdir, preexec_fn=preexec_fn)
            if not wait:
                self.servers.append(srv)
                return srv
            try:
                srv.wait_ready()
            except AssertionError:
                # A free port picked here can be taken by a concurrent test before the server
                # binds it: then (and only then) try again with new ports.
                if (srv.proc.poll() is not None and "in use" in srv.log()
                        and kw.get("default_addresses", True) and attempt < 2):
                    srv.signal_and_wait()
                    continue
                self.servers.append(srv)
                raise
            self.servers.append(srv)
            return srv

    def run_to_exit(self, args, timeout=15.0):
        """Runs the binary with args (no defaults added) and waits for it to exit:
        (exit code, stdout, stderr)."""
        p = subprocess.run([BIN, *map(str, args)], stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=timeout, cwd=self.tmpdir)
        return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")

    def close(self):
        errors = []
        for s in self.servers:
            try:
                s.stop_and_check()
            except AssertionError as e:
                errors.append(str(e))
        self.servers = []
        if errors:
            raise AssertionError("\n\n".join(errors))


def ephemeral_cert_of(server):
    host, port = server.hostport("secure")
    return fetch_cert_pem(host, port)


def gen_certs(outdir):
    script = SRC / "scripts" / "gen-certs.sh"
    p = subprocess.run(["bash", str(script), str(outdir)], capture_output=True, timeout=60)
    if p.returncode != 0:
        raise AssertionError(f"{script} {outdir} failed with {p.returncode}:\n"
                             f"{p.stdout.decode(errors='replace')}{p.stderr.decode(errors='replace')}")
    for f in ("ca.pem", "ca.key", "server.pem", "server.key"):
        assert (Path(outdir) / f).is_file(), f"gen-certs.sh did not create {f}"
    return Path(outdir)


def run_in_threads(fn, args_list, max_workers=None):
    """Runs fn(*args) for each args in parallel threads, released together by a barrier;
    returns results in order (re-raising the first exception)."""
    from concurrent.futures import ThreadPoolExecutor
    n = len(args_list)
    barrier = threading.Barrier(n)

    def wrapped(args):
        barrier.wait(timeout=30)
        return fn(*args)

    with ThreadPoolExecutor(max_workers=max_workers or n) as ex:
        futs = [ex.submit(wrapped, a) for a in args_list]
        return [f.result() for f in futs]
