#!/usr/bin/env python3
"""One worker against two: how ferry's throughput scales with worker threads, next to
nginx with one and two worker processes, on the same backends and load.

On a 2-core machine there is no third core for the load generator and the backends,
so the two-worker runs share both cores with them. To account for that, every run
also reports where the CPU went: the proxy's own CPU time (cores busy) and the
whole machine's, from /proc/stat. Requests per proxy core-second shows whether a
worker does the same work per request when there are two.

Runs (each candidate in turn, every round):
  <name>-1w   one worker, proxy pinned to CPU 0, wrk and backends on CPU 1
  <name>-2w   two workers, nothing pinned

Usage (from the repository root, after cargo build --release):
  python3 benches/scaling.py --rounds 5
"""
import argparse, os, re, signal, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the backends, configs and helpers of the side-by-side benchmark)

ROOT = compare.ROOT


def machine_ticks():
    """(busy, total) jiffies of all CPUs."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def start(cmd, cpus):
    if compare.port_busy(8080):
        sys.exit("port 8080 is already in use: stop whatever listens there first")
    pin = ["taskset", "-c", cpus] if cpus else []
    return subprocess.Popen(pin + ["sh", "-c", "exec " + cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def run(cmd, proxy_cpus, load_cpus, secs, conns, url):
    proc = start(cmd, proxy_cpus)
    pin = ["taskset", "-c", load_cpus] if load_cpus else []
    try:
        if not compare.wait_up(url):
            return None
        subprocess.run(pin + ["wrk", "-t1", f"-c{conns}", "-d2s", url], capture_output=True)
        t0, m0, w0 = compare.cpu_ticks(proc.pid), machine_ticks(), time.time()
        out = subprocess.run(pin + ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--latency", url],
                             capture_output=True, text=True).stdout
        t1, m1, w1 = compare.cpu_ticks(proc.pid), machine_ticks(), time.time()
    finally:
        compare.stop(proc)
    hz = os.sysconf("SC_CLK_TCK")
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    wall = w1 - w0
    proxy_cores = (t1 - t0) / hz / wall
    machine_cores = (m1[0] - m0[0]) / hz / wall
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return {
        "rps": rps,
        "us_per_req": (t1 - t0) / hz / reqs * 1e6,
        "proxy_cores": proxy_cores,
        "machine_cores": machine_cores,
        "rps_per_core": rps / max(proxy_cores, 1e-9),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--conns", type=int, default=50)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="ferry-scaling-")
    open(f"{d}/backend.conf", "w").write(compare.BACKEND.format(d=d))
    nginx1 = compare.NGINX.format(d=d)
    open(f"{d}/nginx1.conf", "w").write(nginx1)
    open(f"{d}/nginx2.conf", "w").write(nginx1.replace("worker_processes 1;", "worker_processes 2;"))
    ferry = f"{ROOT}/target/release/ferry --config"
    open(f"{d}/ferry2.toml", "w").write(
        open(f"{ROOT}/benches/ferry-bench.toml").read().replace("workers = 1", "workers = 2"))
    busy = [p for p in (8080, 9001, 9002, 9003) if compare.port_busy(p)]
    if busy:
        sys.exit(f"ports already in use: {busy}; stop whatever listens there first")
    url = "http://127.0.0.1:8080/"
    cands = [
        ("nginx-1w", f"nginx -c {d}/nginx1.conf", "0", "1"),
        ("nginx-2w", f"nginx -c {d}/nginx2.conf", "", ""),
        ("ferry-1w", f"{ferry} {ROOT}/benches/ferry-bench.toml", "0", "1"),
        ("ferry-2w", f"{ferry} {d}/ferry2.toml", "", ""),
    ]
    res = {n: [] for n, *_ in cands}
    for r in range(a.rounds):
        for n, cmd, pcpu, lcpu in cands:
            # The backends follow the load generator's placement.
            bpin = ["taskset", "-c", lcpu] if lcpu else []
            backend = subprocess.Popen(bpin + ["nginx", "-c", f"{d}/backend.conf"], start_new_session=True)
            try:
                if not compare.wait_up("http://127.0.0.1:9001/"):
                    sys.exit("backends did not start (is nginx installed? is 9001 free?)")
                m = run(cmd, pcpu, lcpu, a.secs, a.conns, url)
            finally:
                os.killpg(backend.pid, signal.SIGTERM)
                backend.wait()
                end = time.time() + 5
                while compare.port_busy(9001) and time.time() < end:
                    time.sleep(0.05)
            if m is None:
                sys.exit(f"{n} did not answer on {url}")
            res[n].append(m)
            print(f"round {r+1} {n:9} rps={m['rps']:.0f} cpu={m['us_per_req']:.2f}us/req "
                  f"proxy={m['proxy_cores']:.2f} cores machine={m['machine_cores']:.2f} cores "
                  f"rps/proxy-core={m['rps_per_core']:.0f}", flush=True)
    keys = ("rps", "us_per_req", "proxy_cores", "machine_cores", "rps_per_core")
    med = {n: {k: statistics.median(x[k] for x in v) for k in keys} for n, v in res.items()}
    print(f"\nmedians over {a.rounds} rounds ({a.conns} connections, {a.secs}s each)\n")
    print("| run | req/s | CPU µs/req | proxy cores | machine cores | req/s per proxy core |")
    print("|---|---|---|---|---|---|")
    for n, m in med.items():
        print(f"| {n} | {m['rps']:.0f} | {m['us_per_req']:.2f} | {m['proxy_cores']:.2f} | "
              f"{m['machine_cores']:.2f} | {m['rps_per_core']:.0f} |")
    for p in ("nginx", "ferry"):
        one, two = med[f"{p}-1w"], med[f"{p}-2w"]
        print(f"\n{p}: 2 workers / 1 worker: req/s {two['rps'] / one['rps']:.2f}x, "
              f"CPU per request {two['us_per_req'] / one['us_per_req']:.2f}x, "
              f"proxy cores {two['proxy_cores'] / one['proxy_cores']:.2f}x")


if __name__ == "__main__":
    main()
