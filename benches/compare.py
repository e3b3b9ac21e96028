#!/usr/bin/env python3
"""Side-by-side benchmark: ferry (one or more configurations) against nginx and HAProxy.

Topology (2 cores): the proxy under test runs pinned to CPU 0 with one worker; wrk and
three nginx backends (127.0.0.1:9001-9003) share CPU 1. Every round runs every
candidate once, in turn, so drift in machine speed hits all of them alike. Reports
medians of requests/s, p50, p99 and the proxy's own CPU time per request (user+sys
of its process tree), each as a ratio to nginx measured in the same rounds.

  --idle N   instead of throughput, open N idle keep-alive client connections (each
             after one request) and report the proxy's memory per connection (RSS).

Needs nginx and wrk (apt-get install -y nginx haproxy wrk); HAProxy when installed.

Usage (from the repository root, after cargo build --release):
  python3 benches/compare.py --rounds 5
  python3 benches/compare.py --rounds 5 --ferry off=... --ferry on=...   # several ferry configs
  python3 benches/compare.py --idle 3000
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


def cpu_ticks(pid):
    total = 0
    for p in tree(pid):
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
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
    end = time.time() + secs
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=1).read()
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
    if port_busy(8080):
        sys.exit("port 8080 is already in use: stop whatever listens there first")
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
    while port_busy(8080) and time.time() < end:
        time.sleep(0.05)


def run_load(cmd, secs, conns, url):
    proc = start(cmd)
    try:
        if not wait_up(url):
            return None
        subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", "-d2s", url], capture_output=True)
        t0 = cpu_ticks(proc.pid)
        out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--latency", url],
                             capture_output=True, text=True).stdout
        t1 = cpu_ticks(proc.pid)
    finally:
        stop(proc)
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.findall(r"(Non-2xx or 3xx responses: \d+|Socket errors: .*)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": to_ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1)),
        "p99": to_ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1)),
        "us_per_req": (t1 - t0) / os.sysconf("SC_CLK_TCK") / reqs * 1e6,
        "errors": errors,
    }


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
    a = ap.parse_args()
    ferries = [f.split("=", 1) for f in a.ferry] or [
        ["ferry", f"{ROOT}/target/release/ferry --config {ROOT}/benches/ferry-bench.toml"]]
    d = tempfile.mkdtemp(prefix="ferry-bench-")
    for name, text in [("backend.conf", BACKEND), ("nginx.conf", NGINX), ("haproxy.cfg", HAPROXY)]:
        open(f"{d}/{name}", "w").write(text.format(d=d) if name != "haproxy.cfg" else text)
    busy = [p for p in (8080, 9001, 9002, 9003) if port_busy(p)]
    if busy:
        sys.exit(f"ports already in use: {busy}; stop whatever listens there first")
    backend = subprocess.Popen(["taskset", "-c", "1", "nginx", "-c", f"{d}/backend.conf"], start_new_session=True)
    url = "http://127.0.0.1:8080/"
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
        res = {n: [] for n, _ in cands}
        for r in range(a.rounds):
            for n, c in cands:
                m = run_load(c, a.secs, a.conns, url)
                if m is None:
                    sys.exit(f"{n} did not answer on {url}")
                res[n].append(m)
                print(f"round {r+1} {n:10} rps={m['rps']:.0f} p50={m['p50']:.2f}ms p99={m['p99']:.2f}ms "
                      f"cpu={m['us_per_req']:.2f}us/req {' '.join(m['errors'])}", flush=True)
        med = {n: {k: statistics.median(x[k] for x in v) for k in ("rps", "p50", "p99", "us_per_req")}
               for n, v in res.items()}
        print(f"\nmedians over {a.rounds} rounds ({a.conns} connections, {a.secs}s each)")
        print(f"{'proxy':10} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'cpu us/req':>10} | vs nginx: req/s  cpu/req    p99")
        b = med["nginx"]
        for n, m in med.items():
            print(f"{n:10} {m['rps']:9.0f} {m['p50']:7.2f} {m['p99']:7.2f} {m['us_per_req']:10.2f} | "
                  f"{m['rps'] / b['rps']:14.2f} {m['us_per_req'] / max(b['us_per_req'], 1e-9):8.2f} "
                  f"{m['p99'] / max(b['p99'], 1e-9):6.2f}")
    finally:
        os.killpg(backend.pid, signal.SIGTERM)
        backend.wait()


if __name__ == "__main__":
    main()
