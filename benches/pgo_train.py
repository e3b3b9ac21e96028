#!/usr/bin/env python3
"""Training load for a profile-guided build of ferry (benches/pgo.sh runs it).

Runs the given ferry binary (built with -Cprofile-generate) in front of three
HTTP/1.1 keep-alive backends on 127.0.0.1, sends it a mix of requests, then
stops it with SIGTERM so that it writes its profile. The mix is mostly what a
proxy does most, keep-alive GETs through ferry's own HTTP/1.1 loop to pooled
upstream connections, with a share of the other paths (request bodies of known
and unknown length, HEAD, chunked responses, fields ferry rewrites, one
request per connection) so that they are not laid out as cold code.

Python's standard library only: nothing else needs installing.

Usage: python3 benches/pgo_train.py --ferry target/pgo-gen/release/ferry [--secs 10]
"""
import argparse, asyncio, os, signal, socket, subprocess, sys, tempfile, time, urllib.request

BODY = b"hello from backend %d ................................................\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def read_body(reader, head):
    """Read (and drop) a request body framed as the head says."""
    lower = head.lower()
    if b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return
            await reader.readexactly(size + 2)
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":", 1)[1]))


def backend(n):
    """A keep-alive HTTP/1.1 backend answering as nginx's `return 200` does."""
    body = BODY % n

    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await read_body(reader, head)
                first = head.split(b"\r\n", 1)[0]
                date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()).encode()
                common = b"Server: pgo-train\r\nDate: " + date + b"\r\nContent-Type: text/plain\r\n"
                if b" /chunked" in first:
                    writer.write(b"HTTP/1.1 200 OK\r\n" + common +
                                 b"Transfer-Encoding: chunked\r\n\r\n" +
                                 b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
                elif first.startswith(b"HEAD "):
                    writer.write(b"HTTP/1.1 200 OK\r\n" + common +
                                 b"Content-Length: %d\r\n\r\n" % len(body))
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\n" + common +
                                 b"Content-Length: %d\r\nConnection: keep-alive\r\n\r\n" % len(body)
                                 + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    return serve


async def read_response(reader, head_request=False):
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if head_request:
        return head
    if b"\r\ntransfer-encoding: chunked" in lower:
        await read_body(reader, lower)
        return head
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":", 1)[1]))
    return head


REQUESTS = [
    # (share of 100, request bytes, whether it is a HEAD)
    (80, b"GET / HTTP/1.1\r\nHost: app.test\r\nUser-Agent: pgo-train\r\nAccept: */*\r\n\r\n", False),
    (4, b"POST /form HTTP/1.1\r\nHost: app.test\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 27\r\n\r\nname=ferry&kind=loadbalancer", False),
    (3, b"PUT /up HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", False),
    (4, b"GET /chunked HTTP/1.1\r\nHost: app.test\r\n\r\n", False),
    (3, b"HEAD / HTTP/1.1\r\nHost: app.test\r\n\r\n", True),
    (4, b"GET /api?x=1 HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 192.0.2.1\r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nCookie: a=1\r\n\r\n", False),
    (2, b"GET /legacy HTTP/1.0\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n", False),
]


async def client(port, deadline, seed, counts):
    schedule = [r for share, *r in REQUESTS for _ in range(share)]
    i = seed
    reader = writer = None
    while time.monotonic() < deadline:
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        req, is_head = schedule[i % len(schedule)]
        i += 7
        writer.write(req)
        head = await read_response(reader, is_head)
        counts[0] += 1
        if b"\r\nconnection: close" in head.lower() or b"HTTP/1.0" in req.split(b"\r\n", 1)[0]:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferry", required=True, help="the instrumented ferry binary")
    ap.add_argument("--secs", type=float, default=10)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()

    servers, addrs = [], []
    for n in (1, 2, 3):
        srv = await asyncio.start_server(backend(n), "127.0.0.1", 0)
        servers.append(srv)
        addrs.append(srv.sockets[0].getsockname()[1])
    port, admin = free_port(), free_port()
    d = tempfile.mkdtemp(prefix="ferry-pgo-")
    cfg = os.path.join(d, "ferry.toml")
    with open(cfg, "w") as f:
        f.write(f"""[server]
listen = ["127.0.0.1:{port}"]
workers = 1

[admin]
listen = "127.0.0.1:{admin}"

[log]
access = "off"

[[upstream]]
name = "app"
strategy = "round_robin"
keepalive = 64
""" + "".join(f'\n[[upstream.server]]\naddr = "127.0.0.1:{a}"\n' for a in addrs))
    proc = subprocess.Popen([args.ferry, "--config", cfg])
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=1).read()
                break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            sys.exit("ferry did not come up")
        counts = [0]
        deadline = time.monotonic() + args.secs
        await asyncio.gather(*(client(port, deadline, s, counts) for s in range(args.connections)))
        # The admin side too: metrics and stub_status, as a scraper reads them.
        for path in ("/metrics", "/stub_status", "/status"):
            for _ in range(20):
                urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=5).read()
        print(f"pgo-train: {counts[0]} requests in {args.secs:.0f}s over {args.connections} connections")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            sys.exit("ferry did not stop within 30 s of SIGTERM: no profile written")
        for srv in servers:
            srv.close()
    if code != 0:
        sys.exit(f"ferry exited with {code}")


if __name__ == "__main__":
    asyncio.run(main())
