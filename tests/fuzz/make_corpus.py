#!/usr/bin/python3
"""Writes the seed corpora of the fuzz targets into tests/fuzz/corpus/<target>/.

Requests are real encodings, built with the python protobuf stubs the end-to-end tests use
(tests/e2e/harness.py generates them from proto/). Run it again after changing a target's
input format; the files it writes are committed so that the fuzzers start from them.

  fuzz_wire      encoded ProcessingRequests of every phase (attributes, metadata_context,
                 protocol_config, observability_mode) and encoded ProcessingResponses
  fuzz_dispatch  byte 0 = script (0 handlers, 1 process), then length-prefixed requests of
                 one stream; the x-fuzz header (or a body's first bytes) spells the answer
  fuzz_outputs   programs of the table interpreter in fuzz_outputs.c that build every
                 return shape docs/lua-api.md describes, for on_* handlers and process()
"""

import shutil
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e"))

import harness as h  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

pb, base_pb2 = h.pb, h.base_pb2
CORPUS = HERE / "corpus"


def struct_of(d):
    s = struct_pb2.Struct()
    s.update(d)
    return s


def extras():
    """What Envoy sends besides the phase, in the combinations seen on a first message."""
    attrs = {"envoy.filters.http.ext_proc": struct_of(
        {"request.path": "/x", "request.size": 12, "source.address": "10.0.0.1:5",
         "nested": {"list": [1, "two", True, None], "deep": {"a": {"b": {}}}}})}
    md = base_pb2.Metadata(filter_metadata={"ns": struct_of({"k": "v", "n": -1.5})})
    full_duplex = pb.ProtocolConfiguration(request_body_mode=4, response_body_mode=4,
                                           send_body_without_waiting_for_header_response=True)
    buffered = pb.ProtocolConfiguration(request_body_mode=2, response_body_mode=1)
    return [
        {},
        {"attributes": attrs},
        {"metadata_context": md},
        {"protocol_config": full_duplex},
        {"protocol_config": buffered, "attributes": attrs, "metadata_context": md},
        {"observability_mode": True},
    ]


def requests(ops=""):
    """One request of each phase (x-fuzz carries ops for the dispatch scripts)."""
    hdrs = [(":path", "/p"), (":method", "GET"), ("x-fuzz", ops), ("x-dup", "1"), ("x-dup", "2"),
            ("content-type", "text/plain")]
    body = (ops.encode() + b" " * 24)[:24] + b"payload\x00\xff"
    return {
        "request_headers": h.headers_req("request_headers", hdrs),
        "response_headers": h.headers_req("response_headers", [(":status", "200")] + hdrs[2:],
                                          end_of_stream=True),
        "request_body": h.body_req("request_body", body),
        "response_body": h.body_req("response_body", body, end_of_stream=True),
        "request_trailers": h.trailers_req("request_trailers", [("x-t", "1"), ("x-fuzz", ops)]),
        "response_trailers": h.trailers_req("response_trailers", [("grpc-status", "0")]),
    }


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def wire():
    for phase, req in requests("acb").items():
        for i, extra in enumerate(extras()):
            if i in (0, 1, 4) or phase == "request_headers":
                r = pb.ProcessingRequest()
                r.CopyFrom(req)
                for k, v in extra.items():
                    if isinstance(v, dict):
                        for kk, vv in v.items():
                            getattr(r, k)[kk].CopyFrom(vv)
                    elif isinstance(v, bool):
                        setattr(r, k, v)
                    else:
                        getattr(r, k).CopyFrom(v)
                write("fuzz_wire", f"req-{phase}-{i}", r.SerializeToString())
    hv = h.hvo(":path", "/new", 1)  # ADD_IF_ABSENT
    resps = [
        pb.ProcessingResponse(request_headers=h.add_header_mutation(
            add=[("x-a", "1"), ("x-b", b"\x00\xff")], remove=["x-c"], clear_route_cache=True)),
        pb.ProcessingResponse(response_body=h.add_body_mutation(body="new body")),
        pb.ProcessingResponse(request_body=h.add_body_mutation(clear_body=True)),
        pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
            status={"code": 403}, body=b"denied", details="why", grpc_status={"status": 7},
            headers=pb.HeaderMutation(set_headers=[hv]))),
        pb.ProcessingResponse(request_trailers=pb.TrailersResponse(
            header_mutation=pb.HeaderMutation(set_headers=[hv], remove_headers=["x"])),
            dynamic_metadata=struct_of({"ns": {"k": [1, {"x": None}]}}),
            override_message_timeout={"seconds": 3, "nanos": 5},
            mode_override={"request_body_mode": 4, "response_header_mode": 2}),
        pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
            body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(
                body=b"chunk", end_of_stream=True))))),
    ]
    # Envoy's newest protocol: GRPC body flags, streamed immediate pieces, request_drain
    for phase in ("request_body", "response_body"):
        r = pb.ProcessingRequest(**{phase: pb.HttpBody(
            body=b"\x00\x00\x00\x00\x02\x08\x01", grpc_message_compressed=True)})
        write("fuzz_wire", f"req-{phase}-grpc", r.SerializeToString())
        r = pb.ProcessingRequest(**{phase: pb.HttpBody(end_of_stream=True,
                                                       end_of_stream_without_message=True)})
        write("fuzz_wire", f"req-{phase}-grpc-eos", r.SerializeToString())
    write("fuzz_wire", "req-request_headers-grpc-config", with_extra(
        requests("acb")["request_headers"],
        protocol_config=pb.ProtocolConfiguration(request_body_mode=5)).SerializeToString())
    sir = pb.StreamedImmediateResponse
    resps += [
        pb.ProcessingResponse(streamed_immediate_response=sir(headers_response=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=h.header_values([(":status", "200"), ("x", "1")])),
            end_of_stream=True))),
        pb.ProcessingResponse(streamed_immediate_response=sir(
            body_response=pb.StreamedBodyResponse(body=b"local", end_of_stream=True,
                                                  grpc_message_compressed=True))),
        pb.ProcessingResponse(streamed_immediate_response=sir(
            trailers_response=base_pb2.HeaderMap(headers=h.header_values([("x-t", "v")])))),
        pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
            body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(
                end_of_stream=True, end_of_stream_without_message=True)))), request_drain=True),
    ]
    for i, r in enumerate(resps):
        write("fuzz_wire", f"resp-{i}", r.SerializeToString())


def stream(script, reqs):
    out = bytearray([script])
    for r in reqs:
        b = r.SerializeToString()
        out += struct.pack(">H", len(b)) + b
    return bytes(out)


def with_extra(req, **extra):
    r = pb.ProcessingRequest()
    r.CopyFrom(req)
    for k, v in extra.items():
        if k == "attributes":
            for kk, vv in v.items():
                r.attributes[kk].CopyFrom(vv)
        elif isinstance(v, bool):
            setattr(r, k, v)
        else:
            getattr(r, k).CopyFrom(v)
    return r


def dispatch():
    ex = extras()
    order = ["request_headers", "request_body", "request_trailers", "response_headers",
             "response_body", "response_trailers"]
    # every letter the handlers script knows, alone and in a few combinations
    handler_ops = ["", "a", "p", "A", "r", "c", "b", "s", "sb", "k", "i", "I", "d", "m", "M",
                   "j", "o", "t", "x", "X", "SR", "e", "E", "n", "acrmjot", "arck"]
    for i, ops in enumerate(handler_ops):
        reqs = requests(ops)
        first = with_extra(reqs["request_headers"], **ex[1 + i % 4])
        msgs = [first] + [reqs[p] for p in order[1:]]
        write("fuzz_dispatch", f"handlers-{i:02d}", stream(0, msgs))
    process_ops = ["", "a", "r", "b", "k", "x", "s", "N", "c", "i", "m", "M", "o", "t", "w",
                   "W", "e", "n", "arbcmot"]
    for i, ops in enumerate(process_ops):
        reqs = requests(ops)
        first = with_extra(reqs["request_headers"], **ex[1 + i % 4])
        msgs = [first] + [reqs[p] for p in order[1:]]
        write("fuzz_dispatch", f"process-{i:02d}", stream(1, msgs))
    # observability mode, and a stream of one malformed message
    reqs = requests("a")
    write("fuzz_dispatch", "observe", stream(0, [with_extra(reqs[p], observability_mode=True)
                                                 for p in order]))
    write("fuzz_dispatch", "malformed", bytes([0, 0, 3, 0x12, 0x05, 0x0a]))
    # the newest protocol: GRPC bodies with their flags, request_drain then echoed chunks,
    # streamed immediate responses (complete, and open then continued by body chunks)
    grpc_cfg = pb.ProtocolConfiguration(request_body_mode=5, response_body_mode=5)
    fd_cfg = pb.ProtocolConfiguration(request_body_mode=4)
    for name, cfg, ops, body_ops in [("grpc-flags", grpc_cfg, "", ["g", "n", "D", "g", "x"]),
                                     ("grpc-drain", grpc_cfg, "", ["D", "x", "g"]),
                                     ("local-full", None, "L", []),
                                     ("local-open", fd_cfg, "O", ["x", "n", "b"])]:
        reqs = requests(ops)
        first = reqs["request_headers"] if cfg is None else with_extra(
            reqs["request_headers"], protocol_config=cfg)
        msgs = [first]
        for k, bops in enumerate(body_ops):
            last = k == len(body_ops) - 1
            msgs.append(pb.ProcessingRequest(request_body=pb.HttpBody(
                body=(bops.encode() + b" " * 24)[:24] + b"msg", end_of_stream=last,
                grpc_message_compressed=k % 2 == 1)))
        msgs.append(reqs["request_trailers"])
        write("fuzz_dispatch", f"newest-{name}", stream(0, msgs))


# --- fuzz_outputs: the interpreter's encoding of a Lua value (see push_value) -------------

def enc(v):
    if v is None:
        return bytes([7])                       # callout.null
    if isinstance(v, bool):
        return bytes([6 | (16 if v else 0)])
    if isinstance(v, int):
        return bytes([5, 3]) + struct.pack(">q", v)
    if isinstance(v, float):
        return bytes([4, 2]) + struct.pack(">d", v)
    if isinstance(v, (str, bytes)):
        b = v.encode() if isinstance(v, str) else v
        assert len(b) < 256
        return bytes([3, len(b)]) + b
    if isinstance(v, list):
        assert len(v) < 8
        return bytes([10, len(v)]) + b"".join(enc(x) for x in v)
    if isinstance(v, dict):
        assert len(v) < 8
        out = bytearray([8, len(v)])
        for k, x in v.items():
            if isinstance(k, int):
                assert 0 <= k < 6
                out += bytes([224 + k]) + enc(x)
            else:
                kb = k.encode()
                out += bytes([192, len(kb)]) + kb + enc(x)
        return bytes(out)
    raise TypeError(v)


PHASE = {p: i for i, p in enumerate(h.PHASES)}


def outputs():
    imm = {"status": 403, "headers": [["x-i", "1"]], "body": "no", "details": "why",
           "grpc_status": 7, "append_action": "OVERWRITE_IF_EXISTS"}
    md = {"ns": {"s": "v", "n": 1.5, "l": [1, "two", False, None], "t": {}}}
    mode = {"request_body_mode": "STREAMED", "response_header_mode": "SKIP"}
    header_tables = [
        {"add": [[":path", "/"], ["x-a", "1", ]], "remove": ["foo"], "clear_route_cache": True},
        {"add": {"x-map": "v", "x-n": 3}, "append_action": "ADD_IF_ABSENT"},
        {"add": [{1: "x-a", 2: "v", "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]},
        {"status": "CONTINUE_AND_REPLACE", "body": "new"},
        {"immediate": imm},
        {"deny": "no"},
        {"deny": True},
        {"dynamic_metadata": md, "mode_override": mode, "override_message_timeout": 1.5},
        {"adx": 1},
    ]
    body_tables = [
        {"body": "replaced", "clear_route_cache": True},
        {"clear_body": True},
        {"status": "CONTINUE_AND_REPLACE", "body": "b"},
        {"immediate": {"status": 200}},
        {"dynamic_metadata": md},
    ]
    stream_tables = [
        {"chunks": ["a", "b"], "end_of_stream": True},
        {"chunks": []},
        {"body": "whole"},
        {"chunks": ["a", {"body": "b"}], "request_drain": True},
    ]
    grpc_tables = [
        {"chunks": [{"body": "m", "grpc_message_compressed": True},
                    {"end_of_stream_without_message": True}], "end_of_stream": True},
        {"request_drain": True},
        {"chunks": [{"body": "x", "end_of_stream_without_message": True}]},
    ]
    local_tables = [  # an open streamed immediate response, continued
        {"immediate": {"chunks": ["c1", "c2"], "end_of_stream": False}},
        {"immediate": {"body": "b", "trailers": [["x-t", "1"]]}},
        {"immediate": {"status": 200}},
    ]
    streamed_imm = [  # request headers: streamed immediate responses
        {"immediate": {"status": 201, "headers": [["x-a", "1"]], "chunks": ["a", "b"],
                       "trailers": {"x-t": "v"}}},
        {"immediate": {"stream": True, "end_of_stream": False}},
        {"immediate": {"stream": True, "headers": [[":status", "500"]]}},
    ]
    trailer_tables = [
        {"add": [["x-t", "1"]], "remove": ["x"]},
        {"immediate": {"status": 599, "body": "late"}},
        {"override_message_timeout": 315576000000.0},
    ]
    n = 0
    for phase, i in PHASE.items():
        tables = (header_tables if "headers" in phase else
                  body_tables if "body" in phase else trailer_tables)
        for t in tables:
            write("fuzz_outputs", f"on-{n:02d}", bytes([i]) + enc(t))
            n += 1
        if "body" in phase:
            for t in stream_tables:
                write("fuzz_outputs", f"on-{n:02d}", bytes([i | 8 | 16]) + enc(t) + b"chunk")
                n += 1
            for t in grpc_tables:
                write("fuzz_outputs", f"on-{n:02d}", bytes([i | 8 | 16 | 64]) + enc(t) + b"\x03m")
                n += 1
            for t in local_tables:
                write("fuzz_outputs", f"on-{n:02d}", bytes([i | 8 | 128]) + enc(t) + b"chunk")
                n += 1
        if phase == "request_headers":
            for t in streamed_imm:
                write("fuzz_outputs", f"on-{n:02d}", bytes([i | 128]) + enc(t))
                n += 1
    raw = [
        {"request_headers": {"response": {"header_mutation": {
            "set_headers": [{"header": {"key": "x-raw", "raw_value": "1"},
                             "append_action": "ADD_IF_ABSENT"}],
            "remove_headers": ["x-old"]}, "clear_route_cache": True,
            "status": "CONTINUE_AND_REPLACE", "body_mutation": {"body": "b"}}}},
        {"response_body": {"response": {"body_mutation": {
            "streamed_response": {"body": "c", "end_of_stream": True}}}}},
        {"request_trailers": {"header_mutation": {"remove_headers": ["x"]}}},
        {"immediate_response": {"status": {"code": "Forbidden"}, "body": "no", "details": "d",
                                "grpc_status": {"status": 7}}},
        {"request_headers": {}, "dynamic_metadata": md,
         "mode_override": {"request_body_mode": "FULL_DUPLEX_STREAMED"},
         "override_message_timeout": 2.5},
        {"streamed_immediate_response": {"headers_response": {"headers": {"headers": [
            {"key": ":status", "raw_value": "200"}]}, "end_of_stream": False}}},
        {"streamed_immediate_response": {"body_response": {
            "body": "b", "end_of_stream": True, "grpc_message_compressed": True,
            "end_of_stream_without_message": False}}, "request_drain": True},
        {"streamed_immediate_response": {"trailers_response": {"headers": [
            {"key": "x-t", "raw_value": "v"}]}}},
    ]
    for k, t in enumerate(raw):
        write("fuzz_outputs", f"process-{k:02d}", bytes([32]) + enc(t))


def main():
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    wire()
    dispatch()
    outputs()
    for d in sorted(CORPUS.iterdir()):
        print(f"{d.name}: {len(list(d.iterdir()))} files")


if __name__ == "__main__":
    main()
