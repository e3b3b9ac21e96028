#!/usr/bin/env python3
"""Side-by-side benchmark: ferry (one or more configurations) against nginx and HAProxy.

Topology (2 cores): the proxy under test runs pinned to CPU 0 with one worker; wrk and
three nginx backends (127.0.0.1:9001-9003) share CPU 1. Every round runs every
candidate once, in turn, so drift in machine speed hits all of them alike. Reports
medians of requests/s, p50, p99 and the proxy's own CPU time per request (user+sys
of its process tree), each as a ratio to nginx measured in the same rounds.

  --idle N   instead of throughput, open N idle keep-alive client connections (each
             after one request) and report the proxy's memory per connection (RSS).
  --tls      every proxy terminates TLS on 127.0.0.1:8443 with one self-signed ECDSA
             P-256 certificate (made with the openssl CLI) in front of the same plain
             backends, and three loads run: (a) keep-alive requests over https (wrk),
             (b) one request per connection (wrk with `Connection: close`; wrk resumes
             the TLS session of its previous connection, so these are mostly resumed
             handshakes), (c) new full handshakes, nothing else (`openssl s_time -new`,
             two clients): handshakes/s and the proxy's CPU time per handshake.

Needs nginx and wrk (apt-get install -y nginx haproxy wrk); HAProxy when installed.
Without --ferry it runs target/release/ferry and, when benches/pgo.sh has built it,
the profile-guided target/pgo/release/ferry as `ferry-pgo`.

Usage (from the repository root, after cargo build --release):
  python3 benches/compare.py --rounds 5
  python3 benches/compare.py --rounds 5 --ferry off=... --ferry on=...   # several ferry configs
  python3 benches/compare.py --idle 3000
  python3 benches/compare.py --tls --rounds 5
"""
import argparse, os, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = """worker_processes 1; daemon off; pid {d}/backend.pid; error_log {d}/backend.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:9001; location / {{ return 200 "hello from backend 1 ................................................\\n"; }} }}
  server {{ listen 127.0.0.1:9002; location / {{ return 200 "hello from backend 2 ................................................\\n"; }} }}
  server {{ listen 127.0.0.1:9003; location / {{ return 200 "hello from backend 3 ................................................\\n"; }} }}
}}"""
NGINX = """worker_processes 1; daemon off; pid {d}/lb.pid; error_log {d}/lb.err warn;
events {{ worker_connections 8192; }}
worker_rlimit_nofile 20000;
http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  upstream app {{ server 127.0.0.1:9001; server 127.0.0.1:9002; server 127.0.0.1:9003; keepalive 64; }}
  server {{ listen 127.0.0.1:8080; location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
}}"""
HAPROXY = """global
  nbthread 1
  maxconn 9000
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 30s
  timeout http-keep-alive 300s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:8080
  default_backend app
backend app
  balance roundrobin
  http-reuse always
  server s1 127.0.0.1:9001
  server s2 127.0.0.1:9002
  server s3 127.0.0.1:9003
"""
# TLS mode: the same proxies, terminating TLS (see --tls).
NGINX_TLS_SERVER = """server {{ listen 127.0.0.1:8443 ssl; ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}"""
FERRY_TLS = """
[tls]
listen = ["127.0.0.1:8443"]
[[tls.certificate]]
cert = "{d}/cert.pem"
key = "{d}/key.pem"
"""

# The port the proxies listen on (8443 with --tls).
PORT = 8080


def make_cert(d):
    """A self-signed ECDSA P-256 certificate for bench.test and 127.0.0.1 (certbot's default key type)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", f"{d}/key.pem", "-out", f"{d}/cert.pem", "-days", "2",
                    "-subj", "/CN=bench.test", "-addext", "subjectAltName=DNS:bench.test,IP:127.0.0.1"],
                   check=True, capture_output=True)
    with open(f"{d}/combined.pem", "w") as out:
        out.write(open(f"{d}/cert.pem").read() + open(f"{d}/key.pem").read())


def tls_configs(d):
    """nginx, HAProxy and ferry configs that terminate TLS on 8443 (and listen on nothing else)."""
    nginx = re.sub(r"server \{ listen 127\.0\.0\.1:8080;.*\} \}", lambda _: NGINX_TLS_SERVER.format(d=d),
                   NGINX.format(d=d))
    haproxy = HAPROXY.replace("bind 127.0.0.1:8080", f"bind 127.0.0.1:8443 ssl crt {d}/combined.pem alpn http/1.1")
    ferry = open(f"{ROOT}/benches/ferry-bench.toml").read().replace(
        'listen = ["127.0.0.1:8080"]', "listen = []") + FERRY_TLS.format(d=d)
    return nginx, haproxy, ferry


def tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except OSError:
            pass
    return out


def cpu_ticks(pid, user_only=False):
    """CPU ticks of a process tree: user + system, or user alone."""
    total = 0
    for p in tree(pid):
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += int(f[11]) + (0 if user_only else int(f[12]))
        except OSError:
            pass
    return total


def rss_kib(pid):
    total = 0
    for p in tree(pid):
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def wait_up(url, secs=10):
    import ssl
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    end = time.time() + secs
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=1, context=insecure).read()
            return True
        except Exception:
            time.sleep(0.1)
    return False


def port_busy(port):
    try:
        socket.create_connection(("127.0.0.1", port), 0.3).close()
        return True
    except OSError:
        return False


def to_ms(s):
    m = re.match(r"([\d.]+)(us|ms|s)", s)
    v = float(m.group(1))
    return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v


def start(cmd):
    if port_busy(PORT):
        sys.exit(f"port {PORT} is already in use: stop whatever listens there first")
    return subprocess.Popen(["taskset", "-c", "0", "sh", "-c", "exec " + cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    end = time.time() + 5
    while port_busy(PORT) and time.time() < end:
        time.sleep(0.05)


def run_load(cmd, secs, conns, url, extra=()):
    proc = start(cmd)
    try:
        if not wait_up(url):
            return None
        wrk = ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", *extra]
        subprocess.run(wrk + ["-d2s", url], capture_output=True)
        t0, u0 = cpu_ticks(proc.pid), cpu_ticks(proc.pid, user_only=True)
        out = subprocess.run(wrk + [f"-d{secs}s", "--latency", url], capture_output=True, text=True).stdout
        t1, u1 = cpu_ticks(proc.pid), cpu_ticks(proc.pid, user_only=True)
    finally:
        stop(proc)
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.findall(r"(Non-2xx or 3xx responses: \d+|Socket errors: .*)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": to_ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1)),
        "p99": to_ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1)),
        "us_per_req": (t1 - t0) / os.sysconf("SC_CLK_TCK") / reqs * 1e6,
        "user_us_per_req": (u1 - u0) / os.sysconf("SC_CLK_TCK") / reqs * 1e6,
        "errors": errors,
    }


def run_handshakes(cmd, secs, url, clients=2):
    """Full TLS handshakes per second (openssl s_time -new, `clients` at once) and CPU per handshake."""
    proc = start(cmd)
    try:
        if not wait_up(url):
            return None
        s_time = ["taskset", "-c", "1", "openssl", "s_time", "-connect", f"127.0.0.1:{PORT}", "-new"]
        subprocess.run(s_time + ["-time", "2"], capture_output=True)
        t0, w0 = cpu_ticks(proc.pid), time.time()
        runs = [subprocess.Popen(s_time + ["-time", str(secs)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True) for _ in range(clients)]
        outs = [r.communicate()[0] for r in runs]
        t1, w1 = cpu_ticks(proc.pid), time.time()
    finally:
        stop(proc)
    n = sum(int(re.search(r"(\d+) connections in [\d.]+s", o).group(1)) for o in outs)
    return {"rps": n / (w1 - w0), "p50": 0.0, "p99": 0.0,
            "us_per_req": (t1 - t0) / os.sysconf("SC_CLK_TCK") / max(n, 1) * 1e6, "user_us_per_req": 0.0,
            "errors": []}


def run_idle(cmd, n, url):
    """KiB of proxy RSS per idle keep-alive client connection (n connections)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 1000)), hard))
    proc = start(cmd)
    socks = []
    try:
        if not wait_up(url):
            return None
        time.sleep(0.5)
        before = rss_kib(proc.pid)
        req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", 8080))
            s.sendall(req)
            socks.append(s)
        for s in socks:
            s.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError("connection closed")
                data += chunk
        time.sleep(1.0)
        after = rss_kib(proc.pid)
        return {"kib_per_conn": (after - before) / n, "rss_before": before, "rss_after": after}
    finally:
        for s in socks:
            s.close()
        stop(proc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferry", action="append", default=[],
                    help="NAME=COMMAND starting a ferry on 127.0.0.1:8080 (repeatable); "
                         "default: ferry with benches/ferry-bench.toml")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--idle", type=int, default=0, help="measure memory per idle connection with N connections")
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument("--tls", action="store_true", help="terminate TLS: keep-alive req/s and handshakes/s over https")
    a = ap.parse_args()
    global PORT
    d = tempfile.mkdtemp(prefix="ferry-bench-")
    # By default ferry as `cargo build --release` builds it, and as benches/pgo.sh
    # builds it (profile-guided) when that build is there.
    builds = [("ferry", f"{ROOT}/target/release/ferry")]
    if os.path.exists(f"{ROOT}/target/pgo/release/ferry"):
        builds.append(("ferry-pgo", f"{ROOT}/target/pgo/release/ferry"))
    ferries = [f.split("=", 1) for f in a.ferry] or [
        [name, f"{binary} --config {ROOT}/benches/ferry-bench.toml"] for name, binary in builds]
    configs = [("backend.conf", BACKEND.format(d=d)), ("nginx.conf", NGINX.format(d=d)), ("haproxy.cfg", HAPROXY)]
    if a.tls:
        PORT = 8443
        make_cert(d)
        nginx, haproxy, ferry = tls_configs(d)
        configs = [("backend.conf", BACKEND.format(d=d)), ("nginx.conf", nginx), ("haproxy.cfg", haproxy),
                   ("ferry.toml", ferry)]
        if not a.ferry:
            ferries = [[name, f"{binary} --config {d}/ferry.toml"] for name, binary in builds]
    for name, text in configs:
        open(f"{d}/{name}", "w").write(text)
    busy = [p for p in (PORT, 9001, 9002, 9003) if port_busy(p)]
    if busy:
        sys.exit(f"ports already in use: {busy}; stop whatever listens there first")
    backend = subprocess.Popen(["taskset", "-c", "1", "nginx", "-c", f"{d}/backend.conf"], start_new_session=True)
    url = "https://127.0.0.1:8443/" if a.tls else "http://127.0.0.1:8080/"
    try:
        if not wait_up("http://127.0.0.1:9001/"):
            sys.exit("backends did not start (is nginx installed? is 9001 free?)")
        cands = [("nginx", f"nginx -c {d}/nginx.conf")]
        if not a.no_haproxy and shutil.which("haproxy"):
            cands.append(("haproxy", f"haproxy -f {d}/haproxy.cfg"))
        cands += [(n, c) for n, c in ferries]
        if a.idle:
            res = {n: [] for n, _ in cands}
            for r in range(a.rounds):
                for n, c in cands:
                    m = run_idle(c, a.idle, url)
                    if m is None:
                        sys.exit(f"{n} did not answer on {url}")
                    res[n].append(m)
                    print(f"round {r+1} {n:10} {m['kib_per_conn']:.2f} KiB/conn "
                          f"(rss {m['rss_before']} -> {m['rss_after']} KiB)", flush=True)
            print(f"\nmedians over {a.rounds} rounds ({a.idle} idle keep-alive connections)")
            print(f"{'proxy':10} {'KiB/conn':>9} | vs nginx")
            base = statistics.median(x["kib_per_conn"] for x in res["nginx"])
            for n, v in res.items():
                m = statistics.median(x["kib_per_conn"] for x in v)
                print(f"{n:10} {m:9.2f} | {m / max(base, 1e-9):8.2f}")
            return
        # (label, extra wrk arguments): with --tls, keep-alive requests and new handshakes.
        loads = [("keep-alive", ())]
        if a.tls:
            loads = [("https keep-alive", ()),
                     ("https one request per connection (wrk: resumed sessions)", ("-H", "Connection: close")),
                     ("full TLS handshakes (openssl s_time -new; no p50/p99)", None)]
        res = {(l, n): [] for l, _ in loads for n, _ in cands}
        for r in range(a.rounds):
            for label, extra in loads:
                for n, c in cands:
                    m = (run_load(c, a.secs, a.conns, url, extra) if extra is not None
                         else run_handshakes(c, a.secs, url))
                    if m is None:
                        sys.exit(f"{n} did not answer on {url}")
                    res[(label, n)].append(m)
                    print(f"round {r+1} {label[:10]:10} {n:10} rps={m['rps']:.0f} p50={m['p50']:.2f}ms "
                          f"p99={m['p99']:.2f}ms cpu={m['us_per_req']:.2f}us/req "
                          f"(user {m['user_us_per_req']:.2f}) {' '.join(m['errors'])}",
                          flush=True)
        for label, _ in loads:
            med = {n: {k: statistics.median(x[k] for x in res[(label, n)])
                       for k in ("rps", "p50", "p99", "us_per_req", "user_us_per_req")} for n, _ in cands}
            print(f"\n{label}: medians over {a.rounds} rounds ({a.conns} connections, {a.secs}s each)")
            print(f"{'proxy':10} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'cpu us/req':>10} {'user':>6} "
                  f"| vs nginx: req/s  cpu/req    p99   user")
            b = med["nginx"]
            for n, m in med.items():
                print(f"{n:10} {m['rps']:9.0f} {m['p50']:7.2f} {m['p99']:7.2f} {m['us_per_req']:10.2f} "
                      f"{m['user_us_per_req']:6.2f} | "
                      f"{m['rps'] / b['rps']:14.2f} {m['us_per_req'] / max(b['us_per_req'], 1e-9):8.2f} "
                      f"{m['p99'] / max(b['p99'], 1e-9):6.2f} "
                      f"{m['user_us_per_req'] / max(b['user_us_per_req'], 1e-9):6.2f}")
            # How much the CPU ratio moves between rounds: each round's CPU per
            # request against nginx's in the same round.
            print(f"\n{label}: CPU/req against nginx's in the same round")
            base = [x["us_per_req"] for x in res[(label, "nginx")]]
            for n, _ in cands:
                if n == "nginx":
                    continue
                rs = [x["us_per_req"] / max(y, 1e-9) for x, y in zip(res[(label, n)], base)]
                print(f"{n:10} rounds {' '.join(f'{r:.2f}' for r in rs)} | "
                      f"median {statistics.median(rs):.2f}, min {min(rs):.2f}, max {max(rs):.2f}")
    finally:
        os.killpg(backend.pid, signal.SIGTERM)
        backend.wait()


if __name__ == "__main__":
    main()
