"""A hand-written HTTP/2 client (python3-h2 over a raw socket) for what grpcio will not do:
read the SETTINGS the server advertises, open more streams than allowed, and send requests
while never reading the answers (no WINDOW_UPDATE is ever sent for data received)."""

import select
import socket
import struct
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

import harness as h


def grpc_frame(msg_bytes):
    """One gRPC length-prefixed message (uncompressed)."""
    return struct.pack(">BI", 0, len(msg_bytes)) + msg_bytes


def request_headers(authority):
    return [(":method", "POST"), (":scheme", "http"), (":path", h.METHOD),
            (":authority", authority), ("content-type", "application/grpc"), ("te", "trailers")]


class RawClient:
    """One h2c connection. `pump(t)` exchanges frames for t seconds; data received is never
    acknowledged, so the server's send window to us never reopens."""

    def __init__(self, host, port, initial_window=65535):
        self.sock = socket.create_connection((host, port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.authority = f"{host}:{port}"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8"))
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE:
                                         initial_window})
        self.conn.initiate_connection()
        self.remote_settings = {}
        self.outbox = {}          # stream id -> memoryview of the bytes still to send
        self.repeat = {}          # stream id -> bytes to send again once outbox empties
        self.reset = {}           # stream id -> error code
        self.trailers = {}        # stream id -> dict of trailers (or trailers-only headers)
        self.received = {}        # stream id -> bytes of DATA received
        self.goaway = None        # error code of the server's GOAWAY
        self.closed = False
        self.flush()

    def flush(self):
        data = self.conn.data_to_send()
        if data and not self.closed:
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def open_stream(self, payload=b"", repeat=False, end=False):
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, request_headers(self.authority))
        self.outbox[sid] = memoryview(payload)
        if repeat:
            self.repeat[sid] = memoryview(payload)
        if end and not payload:
            self.conn.end_stream(sid)
        self.flush()
        return sid

    def _send_some(self):
        for sid in list(self.outbox):
            if sid in self.reset or sid in self.trailers:
                self.outbox.pop(sid)
                continue
            while True:
                buf = self.outbox[sid]
                if not buf:
                    if sid in self.repeat:
                        self.outbox[sid] = buf = self.repeat[sid]
                    else:
                        break
                try:
                    window = self.conn.local_flow_control_window(sid)
                except h2.exceptions.StreamClosedError:
                    self.outbox.pop(sid)
                    break
                n = min(window, self.conn.max_outbound_frame_size, len(buf))
                if n <= 0:
                    break
                try:
                    self.conn.send_data(sid, bytes(buf[:n]))
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    self.outbox.pop(sid)
                    break
                self.outbox[sid] = buf[n:]
        self.flush()

    def pump(self, seconds):
        deadline = time.monotonic() + seconds
        while not self.closed:
            self._send_some()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([self.sock], [], [], min(left, 0.05))
            if not r:
                continue
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                self.closed = True
                break
            for ev in self.conn.receive_data(data):
                self._event(ev)
            self.flush()

    def _event(self, ev):
        if isinstance(ev, h2.events.RemoteSettingsChanged):
            for code, change in ev.changed_settings.items():
                self.remote_settings[int(code)] = change.new_value
        elif isinstance(ev, h2.events.StreamReset):
            self.reset[ev.stream_id] = ev.error_code
        elif isinstance(ev, h2.events.ResponseReceived):
            hd = dict(ev.headers)
            if "grpc-status" in hd:       # trailers-only answer
                self.trailers[ev.stream_id] = hd
        elif isinstance(ev, h2.events.TrailersReceived):
            self.trailers[ev.stream_id] = dict(ev.headers)
        elif isinstance(ev, h2.events.DataReceived):
            self.received[ev.stream_id] = self.received.get(ev.stream_id, 0) + len(ev.data)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = ev.error_code
            self.closed = True

    def status(self, sid):
        t = self.trailers.get(sid)
        return None if t is None else int(t.get("grpc-status", "-1"))

    def close(self):
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
