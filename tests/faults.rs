//! Fault scenarios under load (issue 3, point 6): 20,000 requests over three
//! peers while one peer is killed, hangs, restarts, answers 503, or closes
//! keep-alive connections; then all peers down. Every failed request is counted
//! (a non-2xx status, a connection error, a truncated body).
//!
//! `cargo test --test faults -- --nocapture --test-threads=1` prints a line per
//! scenario, in order: the README's reliability table. The scenarios run one at
//! a time in any case (they measure latency, and share the CPUs with ferry and
//! the backends).
mod common;
use common::*;

use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Requests per scenario.
const TOTAL: u64 = 20_000;
/// Concurrent client connections.
const CONNS: usize = 24;
/// Deadline for a whole load run to reach a trigger point.
const RUN: Duration = Duration::from_secs(120);

static SERIAL: Mutex<()> = Mutex::new(());

/// ferry over the three backends: round-robin, one worker, access log off.
fn ferry(b: &Backends, upstream_extra: &str, server_extra: &str) -> Ferry {
    Ferry::start(&config(
        &format!("strategy = \"round_robin\"\n{upstream_extra}"),
        &b.servers(server_extra),
    ))
}

/// Print the scenario's line, and on failures what they were and what ferry
/// logged, for the assertion message.
fn report(name: &str, s: &Summary, f: &Ferry, b: &Backends, started: Instant) -> String {
    println!("\n{}  (scenario {:.1?})", s.line(name), started.elapsed());
    let ferry_side = ferry_line(f, b);
    println!("{ferry_side}");
    let mut why = format!("{}\n{ferry_side}", s.line(name));
    if s.failed() > 0 {
        why.push_str("\nfirst failures:\n");
        why.push_str(&s.failure_lines(20));
    }
    let warnings = f.warnings();
    if !warnings.is_empty() {
        why.push_str("ferry's warnings (count, line):\n");
        for (n, l) in warnings.iter().take(20) {
            why.push_str(&format!("  {n:>6} {l}\n"));
        }
    }
    why
}

/// ferry's view, one line: retries, failed attempts per peer and reason, new
/// upstream connections.
fn ferry_line(f: &Ferry, b: &Backends) -> String {
    let mut fails = Vec::new();
    for (i, x) in b.list.iter().enumerate() {
        let peer = format!("peer=\"{}\"", x.addr);
        let mut reasons = Vec::new();
        for r in [
            "connect",
            "timeout",
            "error",
            "invalid_header",
            "http_status",
        ] {
            let n = f.metric_sum(
                "ferry_upstream_fails_total",
                &[&peer, &format!("reason=\"{r}\"")],
            );
            if n > 0.0 {
                reasons.push(format!("{r} {n}"));
            }
        }
        if !reasons.is_empty() {
            fails.push(format!("b{}: {}", i + 1, reasons.join(", ")));
        }
    }
    format!(
        "{:<34} ferry: retries {}, failed attempts [{}], upstream connects {}, served {:?}",
        "",
        f.metric_sum("ferry_upstream_retries_total", &[]),
        fails.join("; "),
        f.metric_sum("ferry_upstream_connects_total", &[]),
        served(b),
    )
}

/// Requests served per backend, for messages.
fn served(b: &Backends) -> Vec<u64> {
    b.list.iter().map(|x| x.served.load(Relaxed)).collect()
}

/// a) One peer killed mid-load (listener closed, every connection dropped,
/// requests in progress on it unanswered): no request fails.
#[test]
fn a_peer_killed_mid_load_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let b = Backends::start(3);
    let f = ferry(&b, "", "");
    let load = Load::start(LoadSpec::get(f.addr, TOTAL, CONNS));
    assert!(load.wait_completed(TOTAL / 3, RUN), "load stalled");
    b.kill(0);
    let s = load.finish();
    let why = report("a) one peer killed mid-load", &s, &f, &b, started);
    assert_eq!(s.requests, TOTAL);
    assert_eq!(s.failed(), 0, "{why}");
    let peer = format!("peer=\"{}\"", b.get(0).addr);
    assert!(
        f.metric_sum("ferry_upstream_fails_total", &[&peer]) >= 1.0,
        "the kill went unnoticed: {why}"
    );
}

/// b) One peer hangs (reads requests, never answers, on open keep-alive
/// connections too), read_timeout = 1s: no request fails, the peer is out of
/// rotation after max_fails (1) timeouts, apart from one probe per fail_timeout,
/// and p99 stays within the timeout.
#[test]
fn b_hanging_peer_is_timed_out_and_left_out() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let b = Backends::start(3);
    let fail_timeout = Duration::from_secs(10);
    let f = ferry(
        &b,
        "read_timeout = \"1s\"",
        "max_fails = 1\nfail_timeout = \"10s\"",
    );
    let load = Load::start(LoadSpec::get(f.addr, TOTAL, CONNS));
    assert!(load.wait_completed(TOTAL / 4, RUN), "load stalled");
    // Its pooled keep-alive connections in ferry are open: they hang too.
    assert!(b.get(0).open.load(Relaxed) > 0);
    b.get(0).knobs.hang.store(1, Relaxed);
    let hang_at = Instant::now();
    let before = load.completed();
    let s = load.finish();
    let hanging_for = hang_at.elapsed();
    let why = report("b) one peer hangs, read_timeout 1s", &s, &f, &b, started);
    let peer = format!("peer=\"{}\"", b.get(0).addr);
    let timeouts = f.metric_sum("ferry_upstream_fails_total", &[&peer, "reason=\"timeout\""]);
    let hung = b.get(0).hung.load(Relaxed);
    println!(
        "{:<34} hung peer: {hung} requests reached it in the {hanging_for:.1?} it hung ({:.2}% of the {} sent meanwhile), {timeouts} timeouts",
        "",
        100.0 * hung as f64 / (TOTAL - before) as f64,
        TOTAL - before,
    );
    assert_eq!(s.requests, TOTAL);
    assert_eq!(s.failed(), 0, "{why}");
    assert!(timeouts >= 1.0, "no timeout counted: {why}");
    // Every request that reached the hanging peer timed out (and was passed on).
    assert_eq!(timeouts, hung as f64, "{why}");
    // Out of rotation after the first timeout: at most the requests already on
    // their way (one per client connection), then one probe per fail_timeout.
    let probes = 1 + (hanging_for.as_secs_f64() / fail_timeout.as_secs_f64()) as u64;
    assert!(
        hung <= CONNS as u64 + probes,
        "{hung} requests reached the hanging peer in {hanging_for:?}: {why}"
    );
    assert!(
        s.p99() <= Duration::from_millis(1500),
        "p99 {:?}: {why}",
        s.p99()
    );
    assert!(
        s.max() < Duration::from_millis(2500),
        "a request waited for more than one read_timeout: {:?}: {why}",
        s.max()
    );
}

/// c) Rolling restart: each peer in turn killed and started again on the same
/// port: no request fails.
#[test]
fn c_rolling_restart_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let b = Backends::start(3);
    let f = ferry(&b, "", "");
    let load = Load::start(LoadSpec::get(f.addr, TOTAL, CONNS));
    let mut at_restart = Vec::new();
    for i in 0..3u64 {
        assert!(
            load.wait_completed(TOTAL * (2 * i + 1) / 8, RUN),
            "load stalled"
        );
        b.kill(i as usize);
        assert!(
            load.wait_completed(TOTAL * (2 * i + 2) / 8, RUN),
            "load stalled"
        );
        b.restart(i as usize);
        at_restart.push(b.get(i as usize).served.load(Relaxed));
    }
    let s = load.finish();
    let why = report("c) rolling restart of the 3 peers", &s, &f, &b, started);
    let after: Vec<u64> = b
        .list
        .iter()
        .zip(&at_restart)
        .map(|(x, at)| x.served.load(Relaxed) - at)
        .collect();
    println!("{:<34} served after their restart: {after:?}", "");
    assert_eq!(s.requests, TOTAL);
    assert_eq!(s.failed(), 0, "{why}");
}

/// d) A peer answers 503 while it drains, http_503 in next_upstream: no client
/// sees a 503.
#[test]
fn d_draining_peer_503s_are_passed_on() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let b = Backends::start(3);
    let f = ferry(
        &b,
        "next_upstream = [\"error\", \"timeout\", \"http_503\"]",
        "",
    );
    let load = Load::start(LoadSpec::get(f.addr, TOTAL, CONNS));
    assert!(load.wait_completed(TOTAL / 4, RUN), "load stalled");
    b.get(0).knobs.status.store(503, Relaxed);
    assert!(load.wait_completed(TOTAL * 3 / 4, RUN), "load stalled");
    b.get(0).knobs.status.store(0, Relaxed);
    let s = load.finish();
    let why = report("d) one peer answers 503 (draining)", &s, &f, &b, started);
    let peer = format!("peer=\"{}\"", b.get(0).addr);
    let upstream_503 = f.metric_sum("ferry_http_requests_total", &[&peer, "code=\"503\""]);
    assert_eq!(s.requests, TOTAL);
    assert_eq!(s.count(Outcome::Status(503)), 0, "{why}");
    assert_eq!(s.failed(), 0, "{why}");
    assert!(
        upstream_503 >= 1.0,
        "the draining peer answered no 503: {why}"
    );
}

/// e) Peers close keep-alive connections after every 100th request
/// (`Connection: close`) and, unannounced, after 1 s idle (ferry's upstream
/// keepalive_timeout stays at its 15 s default); 20% of the requests are POSTs
/// with small bodies. The load comes in waves: every 2,500 requests all client
/// connections pause for 0.98-1.02 s, so the upstream connections ferry pooled
/// sit idle for about as long as the peers keep them, and some requests go out
/// on a connection just as its peer closes it: no request fails.
#[test]
fn e_peers_closing_keepalive_connections_lose_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let b = Backends::start(3);
    for x in &b.list {
        x.knobs.close_every.store(100, Relaxed);
        x.knobs.idle_close_ms.store(1000, Relaxed);
    }
    let f = ferry(&b, "", "");
    let mut spec = LoadSpec::get(f.addr, TOTAL, CONNS);
    spec.post_every = 5;
    spec.pause_every = 2500;
    spec.pause = (Duration::from_millis(980), Duration::from_millis(1020));
    let s = Load::start(spec).finish();
    let why = report("e) keep-alive closes, 20% POST", &s, &f, &b, started);
    let sum = |c: fn(&ferry::demo::Backend) -> u64| b.list.iter().map(c).sum::<u64>();
    let accepted = sum(|x| x.connections.load(Relaxed));
    let idle_closed = sum(|x| x.idle_closed.load(Relaxed));
    println!(
        "{:<34} peers: {accepted} connections accepted, {idle_closed} closed after 1 s idle, the others every 100 requests",
        ""
    );
    assert_eq!(s.requests, TOTAL);
    assert_eq!(s.posts, TOTAL / 5);
    assert_eq!(s.failed(), 0, "{why}");
    assert!(idle_closed > 0, "no connection was closed idle: {why}");
}

/// f) All peers down (connects refused): every request is answered 502 at
/// once, well within connect_timeout; none hangs.
#[test]
fn f_all_peers_down_answers_502_at_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let b = Backends::start(3);
    for i in 0..3 {
        b.kill(i);
    }
    let connect_timeout = Duration::from_secs(1);
    let f = ferry(&b, "connect_timeout = \"1s\"", "");
    let mut spec = LoadSpec::get(f.addr, TOTAL, CONNS);
    spec.timeout = Duration::from_secs(10);
    let s = Load::start(spec).finish();
    let why = report("f) all peers down (refusing)", &s, &f, &b, started);
    println!(
        "{:<34} answered 502: {} of {}, slowest {:.1?} (connect_timeout {connect_timeout:?})",
        "",
        s.count(Outcome::Status(502)),
        s.requests,
        s.max(),
    );
    assert_eq!(s.requests, TOTAL);
    assert_eq!(s.count(Outcome::Status(502)), TOTAL, "{why}");
    assert!(s.max() < connect_timeout, "a 502 took {:?}: {why}", s.max());
}
