"""A gRPC server or client for ferry's tests, with grpcio's generic handlers and
raw-bytes messages (no protobuf, no generated code).

    python3 peer.py server            # prints the bound port, serves until killed
    python3 peer.py client HOST:PORT  # runs the calls, prints one JSON object
"""

import json
import sys
from concurrent import futures

import grpc


def ident(b):
    return b


def unary(req, ctx):
    ctx.set_trailing_metadata((("x-trailer", "t1"),))
    return b"echo:" + req


def stream(req, ctx):
    for i in range(int(req)):
        yield b"msg%d" % i
    ctx.set_trailing_metadata((("x-count", req.decode()),))


def fail(req, ctx):
    # Before any message: a trailers-only response.
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


def fail_after(req, ctx):
    yield b"one"
    ctx.set_code(grpc.StatusCode.NOT_FOUND)
    ctx.set_details("gone after one")


def client_stream(reqs, ctx):
    return b"+".join(reqs)


def server():
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=ident, response_serializer=ident
        ),
        "Stream": grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=ident, response_serializer=ident
        ),
        "Fail": grpc.unary_unary_rpc_method_handler(
            fail, request_deserializer=ident, response_serializer=ident
        ),
        "FailAfter": grpc.unary_stream_rpc_method_handler(
            fail_after, request_deserializer=ident, response_serializer=ident
        ),
        "Collect": grpc.stream_unary_rpc_method_handler(
            client_stream, request_deserializer=ident, response_serializer=ident
        ),
    }
    s = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    s.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Echo", handlers),)
    )
    port = s.add_insecure_port("127.0.0.1:0")
    s.start()
    print(port, flush=True)
    s.wait_for_termination()


def client(target, repeat):
    out = {}
    with grpc.insecure_channel(target) as ch:
        call = lambda kind, name: getattr(ch, kind)(
            "/test.Echo/" + name, request_serializer=ident, response_deserializer=ident
        )
        resp, c = call("unary_unary", "Unary").with_call(b"hello", timeout=20)
        out["unary"] = resp.decode()
        out["unary_code"] = c.code().value[0]
        out["unary_trailers"] = {k: v for k, v in c.trailing_metadata()}

        it = call("unary_stream", "Stream")(b"5", timeout=20)
        out["stream"] = [m.decode() for m in it]
        out["stream_trailers"] = {k: v for k, v in it.trailing_metadata()}

        try:
            call("unary_unary", "Fail")(b"x", timeout=20)
            out["fail"] = "no error"
        except grpc.RpcError as e:
            out["fail"] = [e.code().value[0], e.details()]

        got = []
        try:
            for m in call("unary_stream", "FailAfter")(b"x", timeout=20):
                got.append(m.decode())
            out["fail_after"] = "no error"
        except grpc.RpcError as e:
            out["fail_after"] = [got, e.code().value[0], e.details()]

        out["collect"] = call("stream_unary", "Collect")(
            iter([b"a", b"b", b"c"]), timeout=20
        ).decode()

        ok = 0
        f = call("unary_unary", "Unary")
        pending = [f.future(b"%d" % i, timeout=20) for i in range(repeat)]
        for i, p in enumerate(pending):
            if p.result() == b"echo:%d" % i:
                ok += 1
        out["repeat_ok"] = ok
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server()
    else:
        client(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
