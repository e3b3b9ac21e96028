"""A gRPC server or client for ferry's tests, with grpcio's generic handlers and
raw-bytes messages (no protobuf, no generated code).

    python3 peer.py server [--tls CERT KEY]       # prints the bound port, serves until killed
    python3 peer.py client HOST:PORT [REPEAT] [--tls CA NAME]
                                                  # runs the calls, prints one JSON object

With --tls the server speaks TLS with that certificate and key (PEM files), and
the client verifies against that CA file, expecting that name in the certificate.
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


def server(tls=None):
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
    if tls:
        cert, key = (open(f, "rb").read() for f in tls)
        creds = grpc.ssl_server_credentials(((key, cert),))
        port = s.add_secure_port("127.0.0.1:0", creds)
    else:
        port = s.add_insecure_port("127.0.0.1:0")
    s.start()
    print(port, flush=True)
    s.wait_for_termination()


def channel(target, tls):
    if not tls:
        return grpc.insecure_channel(target)
    ca, name = tls
    creds = grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read())
    return grpc.secure_channel(target, creds, options=(("grpc.ssl_target_name_override", name),))


def client(target, repeat, tls=None):
    out = {}
    with channel(target, tls) as ch:
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
    args = sys.argv[1:]
    tls = None
    if "--tls" in args:
        i = args.index("--tls")
        tls = (args[i + 1], args[i + 2])
        del args[i : i + 3]
    if args[0] == "server":
        server(tls)
    else:
        client(args[1], int(args[2]) if len(args) > 2 else 0, tls)
