//! End-to-end: resilience (issue 3, points 1-5). nginx's passive health rules
//! (`max_fails`, `fail_timeout`, which statuses count), retries (`next_upstream`,
//! tries, timeout, non-idempotent methods, `retry_buffer`), active health checks,
//! `backup`, `down`, `max_conns` with its queue, `slow_start`, and panic mode.
//! tests/failures.rs covers refused, hanging and black-holed peers already.
mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use ferry::demo::Backend;

// ---------------------------------------------------------------------------
// Helpers.

/// `[[upstream.server]]` for an address, with extra keys.
fn server(addr: SocketAddr, extra: &str) -> String {
    format!("[[upstream.server]]\naddr = \"{addr}\"\n{extra}\n")
}

/// An `[[upstream]]` named `name` with `extra` keys over `servers`, routed from
/// Host `<name>.test`.
fn upstream_at(name: &str, extra: &str, servers: &str) -> String {
    format!(
        "[[upstream]]\nname = \"{name}\"\nstrategy = \"round_robin\"\n{extra}\n{servers}\n\
         [[route]]\nhost = \"{name}.test\"\nupstream = \"{name}\"\n\n"
    )
}

/// ferry over these upstreams (each from [`upstream_at`]).
fn ferry(upstreams: &[String]) -> Ferry {
    Ferry::start(&ferry_config("", "", &upstreams.concat()))
}

/// A request body and how it is framed.
#[derive(Clone, Copy)]
enum Body<'a> {
    None,
    Length(&'a [u8]),
    Chunked(&'a [u8]),
}

/// One request on a new connection to `Host: <host>`: the response and how
/// long it took.
fn send(f: &Ferry, method: &str, host: &str, path: &str, body: Body) -> (RawResponse, Duration) {
    let start = Instant::now();
    let mut c = RawConn::connect(f.addr);
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    let mut bytes = Vec::new();
    match body {
        Body::None => req.push_str("\r\n"),
        Body::Length(b) => {
            req.push_str(&format!("Content-Length: {}\r\n\r\n", b.len()));
            bytes.extend_from_slice(b);
        }
        Body::Chunked(b) => {
            req.push_str("Transfer-Encoding: chunked\r\n\r\n");
            for part in b.chunks(512) {
                bytes.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                bytes.extend_from_slice(part);
                bytes.extend_from_slice(b"\r\n");
            }
            bytes.extend_from_slice(b"0\r\n\r\n");
        }
    }
    let mut all = req.into_bytes();
    all.extend_from_slice(&bytes);
    c.send(&all);
    let r = c.read_response(method == "HEAD");
    (r, start.elapsed())
}

/// GET `/` for `Host: <host>`.
fn get(f: &Ferry, host: &str) -> RawResponse {
    send(f, "GET", host, "/", Body::None).0
}

/// The backend that answered (its `X-Backend` header), or "" for ferry itself.
fn by(r: &RawResponse) -> String {
    r.header("x-backend").unwrap_or("").to_owned()
}

/// `ferry_upstream_peer_state{upstream,peer,state}`.
fn state(f: &Ferry, up: &str, peer: SocketAddr, st: &str) -> f64 {
    f.metric_sum(
        "ferry_upstream_peer_state",
        &[
            &format!("upstream=\"{up}\""),
            &format!("peer=\"{peer}\""),
            &format!("state=\"{st}\""),
        ],
    )
}

/// `ferry_upstream_peer_up{upstream,peer}`.
fn up(f: &Ferry, up: &str, peer: SocketAddr) -> f64 {
    f.metric_sum(
        "ferry_upstream_peer_up",
        &[&format!("upstream=\"{up}\""), &format!("peer=\"{peer}\"")],
    )
}

/// `ferry_upstream_fails_total` of one peer (every reason when `reason` is "").
fn fails(f: &Ferry, up: &str, peer: SocketAddr, reason: &str) -> f64 {
    let (u, p, r) = (
        format!("upstream=\"{up}\""),
        format!("peer=\"{peer}\""),
        format!("reason=\"{reason}\""),
    );
    let mut labels = vec![u.as_str(), p.as_str()];
    if !reason.is_empty() {
        labels.push(&r);
    }
    f.metric_sum("ferry_upstream_fails_total", &labels)
}

/// `ferry_upstream_retries_total{upstream}`.
fn retries(f: &Ferry, up: &str) -> f64 {
    f.metric_sum(
        "ferry_upstream_retries_total",
        &[&format!("upstream=\"{up}\"")],
    )
}

/// Client requests a backend answered (health checks not counted).
fn served(b: &Backend) -> u64 {
    b.served.load(Relaxed)
}

/// ferry's log lines (stderr) containing every one of `needles`.
fn log_lines(f: &Ferry, needles: &[&str]) -> Vec<String> {
    f.logs
        .lock()
        .unwrap()
        .iter()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .cloned()
        .collect()
}

/// ferry's log lines containing `message` and naming peer `addr`.
fn peer_log_lines(f: &Ferry, message: &str, addr: SocketAddr) -> Vec<String> {
    let field = format!("peer={addr}");
    log_lines(f, &[message])
        .into_iter()
        .filter(|l| l.split_whitespace().any(|w| w == field))
        .collect()
}

/// Run `n` copies of `job` at once, one thread each; their results in order.
fn concurrently<T: Send>(n: usize, job: impl Fn(usize) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                s.spawn({
                    let job = &job;
                    move || job(i)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect()
    })
}

/// A peer speaking bytes instead of a server: reads each request head, writes
/// `answer` and closes. Counts the requests it read.
struct RawPeer {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
}

fn raw_peer(answer: &'static [u8]) -> RawPeer {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let requests = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&requests);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let count = Arc::clone(&count);
            std::thread::spawn(move || answer_raw(s, answer, &count));
        }
    });
    RawPeer { addr, requests }
}

fn answer_raw(mut s: TcpStream, answer: &[u8], count: &AtomicU64) {
    let _ = s.set_read_timeout(Some(DEADLINE));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    count.fetch_add(1, Relaxed);
    let _ = s.write_all(answer);
    // Close our side, then wait for ferry's close: no reset can overtake the answer.
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut sink = [0u8; 1024];
    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
}

/// Stop (kill) or start again a backend of `b`, as a process crash / restart.
fn kill(b: &Backends, i: usize) {
    b.rt.block_on(b.get(i).kill());
}

fn restart(b: &Backends, i: usize) {
    b.rt.block_on(b.get(i).restart()).expect("restart backend");
}

const RETRY_503: &str = "next_upstream = [\"error\", \"timeout\", \"http_503\"]";

// ---------------------------------------------------------------------------
// 1. Passive health, nginx semantics.

/// HTTP 500/502/503/504/429 count as failures only when listed in next_upstream:
/// unlisted, the answer goes to the client and the peer stays up; listed, the
/// request goes to the next peer and the peer is marked failed.
#[test]
fn statuses_count_as_failures_only_when_listed() {
    let codes = [500u16, 502, 503, 504, 429];
    // One failing backend per code (b1..b5), and b6 that answers 200.
    let b = Backends::start(codes.len() + 1);
    let good = b.get(codes.len());
    let mut ups = Vec::new();
    for (i, code) in codes.iter().enumerate() {
        b.get(i).knobs.status.store(*code, Relaxed);
        let servers = server(b.get(i).addr, "") + &server(good.addr, "");
        ups.push(upstream_at(&format!("plain{code}"), "", &servers));
        ups.push(upstream_at(
            &format!("listed{code}"),
            &format!("next_upstream = [\"error\", \"timeout\", \"http_{code}\"]"),
            &servers,
        ));
    }
    let f = ferry(&ups);
    for (i, code) in codes.iter().enumerate() {
        let bad = b.get(i);
        // Default next_upstream: the status is the peer's answer, not a failure.
        let plain = format!("plain{code}");
        let mut passed_through = 0;
        for _ in 0..6 {
            let r = get(&f, &format!("{plain}.test"));
            match r.status {
                200 => assert_eq!(by(&r), "b6"),
                s => {
                    assert_eq!(s, *code, "{}", r.text());
                    assert_eq!(by(&r), bad.name);
                    passed_through += 1;
                }
            }
        }
        assert_eq!(passed_through, 3, "{code}: round-robin over two peers");
        assert_eq!(
            fails(&f, &plain, bad.addr, ""),
            0.0,
            "{code} is not a failure"
        );
        assert_eq!(up(&f, &plain, bad.addr), 1.0);
        assert_eq!(state(&f, &plain, bad.addr, "up"), 1.0);
        assert_eq!(retries(&f, &plain), 0.0);

        // Listed: passed to the next peer, and a failure (max_fails = 1).
        let listed = format!("listed{code}");
        let before = served(bad);
        for _ in 0..6 {
            let r = get(&f, &format!("{listed}.test"));
            assert_eq!((r.status, by(&r)), (200, "b6".to_owned()), "{code}");
        }
        assert_eq!(
            served(bad) - before,
            1,
            "{code}: the failed peer was skipped after"
        );
        assert_eq!(fails(&f, &listed, bad.addr, "http_status"), 1.0);
        assert_eq!(up(&f, &listed, bad.addr), 0.0);
        assert_eq!(state(&f, &listed, bad.addr, "failed"), 1.0);
        assert_eq!(retries(&f, &listed), 1.0);
    }
}

/// Errors and invalid response heads count as failures whatever next_upstream
/// says; an invalid head is passed to the next peer only when `invalid_header`
/// is listed (nginx), an error whenever `error` is.
#[test]
fn errors_and_invalid_headers_count_as_failures() {
    let b = Backends::start(1);
    let good = b.get(0);
    let garbage = raw_peer(b"THIS IS NOT HTTP\r\n\r\n");
    let hangup = raw_peer(b"");
    let f = ferry(&[
        upstream_at(
            "hdr",
            "",
            &(server(garbage.addr, "") + &server(good.addr, "")),
        ),
        upstream_at(
            "hdrlisted",
            "next_upstream = [\"error\", \"timeout\", \"invalid_header\"]",
            &(server(garbage.addr, "") + &server(good.addr, "")),
        ),
        upstream_at(
            "err",
            "",
            &(server(hangup.addr, "") + &server(good.addr, "")),
        ),
        upstream_at(
            "erroff",
            "next_upstream = [\"timeout\"]",
            &(server(hangup.addr, "") + &server(good.addr, "")),
        ),
    ]);

    // Invalid head, not listed: 502, not passed on, but the peer is marked failed.
    let r = get(&f, "hdr.test");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        served(good),
        0,
        "an invalid header went to the next peer unlisted"
    );
    assert_eq!(garbage.requests.load(Relaxed), 1);
    assert_eq!(fails(&f, "hdr", garbage.addr, "invalid_header"), 1.0);
    assert_eq!(state(&f, "hdr", garbage.addr, "failed"), 1.0);
    assert_eq!(retries(&f, "hdr"), 0.0);
    // Now out of rotation: the next requests go to the good peer only.
    for _ in 0..3 {
        assert_eq!(by(&get(&f, "hdr.test")), "b1");
    }
    assert_eq!(garbage.requests.load(Relaxed), 1);

    // Listed: the next peer answers.
    let r = get(&f, "hdrlisted.test");
    assert_eq!((r.status, by(&r)), (200, "b1".to_owned()), "{}", r.text());
    assert_eq!(fails(&f, "hdrlisted", garbage.addr, "invalid_header"), 1.0);
    assert_eq!(retries(&f, "hdrlisted"), 1.0);

    // A peer that closes without answering: an error, passed on by default.
    let r = get(&f, "err.test");
    assert_eq!((r.status, by(&r)), (200, "b1".to_owned()), "{}", r.text());
    assert_eq!(fails(&f, "err", hangup.addr, "error"), 1.0);
    assert_eq!(state(&f, "err", hangup.addr, "failed"), 1.0);
    // ... and counted even when `error` is not listed.
    let before = served(good);
    let r = get(&f, "erroff.test");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(served(good), before);
    assert_eq!(fails(&f, "erroff", hangup.addr, "error"), 1.0);
    assert_eq!(state(&f, "erroff", hangup.addr, "failed"), 1.0);
}

/// After fail_timeout, one request is let through as a probe (others keep
/// avoiding the peer while it runs); a failed probe takes the peer out again,
/// a successful one resets its failure count.
#[test]
fn after_fail_timeout_one_probe_goes_through_and_success_resets() {
    let b = Backends::start(2);
    let a = b.get(0);
    let f = ferry(&[upstream_at(
        "app",
        RETRY_503,
        &b.servers("max_fails = 1\nfail_timeout = \"2s\""),
    )]);
    a.knobs.status.store(503, Relaxed);
    // The first request goes to b1 (first in the list), fails, and is passed on.
    let r = get(&f, "app.test");
    let failed_at = Instant::now();
    assert_eq!((r.status, by(&r)), (200, "b2".to_owned()));
    assert_eq!(served(a), 1);
    assert_eq!(state(&f, "app", a.addr, "failed"), 1.0);
    // Inside fail_timeout nothing reaches it.
    for _ in 0..5 {
        assert_eq!(by(&get(&f, "app.test")), "b2");
    }
    assert!(
        failed_at.elapsed() < Duration::from_secs(2),
        "too slow to test"
    );
    assert_eq!(
        served(a),
        1,
        "a failed peer got requests inside fail_timeout"
    );

    // The window passes: the peer counts as up again, until a request probes it.
    assert!(wait_until(DEADLINE, || up(&f, "app", a.addr) == 1.0));
    // The probe is slow and fails; requests arriving meanwhile avoid the peer.
    a.knobs.latency_ms.store(500, Relaxed);
    let answers = concurrently(8, |_| get(&f, "app.test"));
    for r in &answers {
        assert_eq!((r.status, by(r)), (200, "b2".to_owned()), "{}", r.text());
    }
    assert_eq!(served(a), 2, "exactly one probe while the peer was failed");
    assert_eq!(
        state(&f, "app", a.addr, "failed"),
        1.0,
        "a failed probe keeps it out"
    );

    // Healthy again: the next probe succeeds and the failure count is reset,
    // so the peer takes its share at once.
    a.knobs.status.store(0, Relaxed);
    a.knobs.latency_ms.store(0, Relaxed);
    assert!(wait_until(DEADLINE, || up(&f, "app", a.addr) == 1.0));
    let before = served(a);
    for _ in 0..10 {
        assert_eq!(get(&f, "app.test").status, 200);
    }
    assert!(
        served(a) - before >= 4,
        "the recovered peer got {} of 10",
        served(a) - before
    );
    assert_eq!(state(&f, "app", a.addr, "up"), 1.0);
    let status = f.admin_get("/status");
    let doc: serde_json::Value = serde_json::from_str(&status).expect("json");
    let peer = doc["upstreams"][0]["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["addr"] == a.addr.to_string()))
        .cloned()
        .expect("peer in /status");
    assert_eq!(peer["fails"], 0, "{peer}");
}

/// `max_fails = 0` disables passive health: a failing peer keeps its share.
/// An upstream with a single server never marks it down.
#[test]
fn max_fails_zero_and_a_single_server_are_never_marked_down() {
    let b = Backends::start(3);
    let (a, good, single) = (b.get(0), b.get(1), b.get(2));
    a.knobs.status.store(503, Relaxed);
    single.knobs.status.store(503, Relaxed);
    let f = ferry(&[
        upstream_at(
            "nofail",
            RETRY_503,
            &(server(a.addr, "max_fails = 0") + &server(good.addr, "max_fails = 0")),
        ),
        upstream_at("single", RETRY_503, &server(single.addr, "max_fails = 1")),
    ]);
    for _ in 0..10 {
        let r = get(&f, "nofail.test");
        assert_eq!((r.status, by(&r)), (200, "b2".to_owned()));
    }
    assert!(
        served(a) >= 4,
        "max_fails = 0: the failing peer got {} of 10",
        served(a)
    );
    assert_eq!(fails(&f, "nofail", a.addr, "http_status"), served(a) as f64);
    assert_eq!(state(&f, "nofail", a.addr, "up"), 1.0);

    // One server: every request reaches it, whether it answers 503 or refuses.
    for i in 0..5 {
        let r = get(&f, "single.test");
        assert_eq!((r.status, by(&r)), (503, "b3".to_owned()), "request {i}");
    }
    assert_eq!(served(single), 5);
    assert_eq!(state(&f, "single", single.addr, "up"), 1.0);
    kill(&b, 2);
    for i in 0..3 {
        let r = get(&f, "single.test");
        assert_eq!(r.status, 502, "request {i}: {}", r.text());
        assert!(!r.text().contains("no live upstreams"), "{}", r.text());
    }
    assert_eq!(fails(&f, "single", single.addr, "connect"), 3.0);
    restart(&b, 2);
    single.knobs.status.store(0, Relaxed);
    let r = get(&f, "single.test");
    assert_eq!(
        (r.status, by(&r)),
        (200, "b3".to_owned()),
        "at once after recovery"
    );
    assert_eq!(
        f.metric_sum("ferry_upstream_no_peer_total", &["upstream=\"single\""]),
        0.0
    );
}

// ---------------------------------------------------------------------------
// 2. Retries.

/// next_upstream_tries bounds the attempts; without it every peer is tried.
#[test]
fn next_upstream_tries_limits_attempts() {
    let b = Backends::start(3);
    for x in &b.list {
        x.knobs.status.store(503, Relaxed);
    }
    let (d1, d2, d3) = (closed_port(), closed_port(), closed_port());
    let refusing =
        server(d1, "max_fails = 0") + &server(d2, "max_fails = 0") + &server(d3, "max_fails = 0");
    let f = ferry(&[
        upstream_at(
            "two",
            &format!("{RETRY_503}\nnext_upstream_tries = 2"),
            &b.servers("max_fails = 0"),
        ),
        upstream_at("all", RETRY_503, &b.servers("max_fails = 0")),
        upstream_at("tworefused", "next_upstream_tries = 2", &refusing),
    ]);
    let total = || b.list.iter().map(served).sum::<u64>();
    let r = get(&f, "two.test");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(total(), 2, "tries = 2: two attempts");
    assert_eq!(retries(&f, "two"), 1.0);

    let r = get(&f, "all.test");
    assert_eq!(r.status, 503);
    assert_eq!(total(), 2 + 3, "tries = 0: every peer once");
    assert_eq!(retries(&f, "all"), 2.0);

    let r = get(&f, "tworefused.test");
    assert_eq!(r.status, 502, "{}", r.text());
    let refused: f64 = [d1, d2, d3]
        .iter()
        .map(|d| fails(&f, "tworefused", *d, "connect"))
        .sum();
    assert_eq!(refused, 2.0);
    assert_eq!(retries(&f, "tworefused"), 1.0);
}

/// next_upstream_timeout: no new attempt starts once it has passed.
#[test]
fn next_upstream_timeout_bounds_the_attempts() {
    let b = Backends::start(4);
    for x in &b.list {
        x.knobs.status.store(503, Relaxed);
        x.knobs.latency_ms.store(500, Relaxed);
    }
    // Attempts end at ~0.5, ~1.0 and ~1.5 s: the third starts before the 1.25 s
    // limit, a fourth would not.
    let f = ferry(&[upstream_at(
        "app",
        &format!("{RETRY_503}\nnext_upstream_timeout = \"1250ms\""),
        &b.servers("max_fails = 0"),
    )]);
    let (r, took) = send(&f, "GET", "app.test", "/", Body::None);
    assert_eq!(r.status, 503);
    assert_eq!(b.list.iter().map(served).sum::<u64>(), 3);
    assert!(
        took >= Duration::from_millis(1450) && took < Duration::from_millis(2400),
        "answered after {took:?}"
    );
    assert_eq!(retries(&f, "app"), 2.0);
}

/// POST, PATCH and LOCK are not passed on once sent unless `non_idempotent`
/// is listed; other methods are.
#[test]
fn non_idempotent_methods_are_not_resent_unless_listed() {
    let b = Backends::start(2);
    for x in &b.list {
        x.knobs.status.store(503, Relaxed);
    }
    let f = ferry(&[
        upstream_at("strict", RETRY_503, &b.servers("max_fails = 0")),
        upstream_at(
            "lenient",
            "next_upstream = [\"error\", \"timeout\", \"http_503\", \"non_idempotent\"]",
            &b.servers("max_fails = 0"),
        ),
    ]);
    let total = || b.list.iter().map(served).sum::<u64>();
    for (method, resent_strict) in [
        ("POST", false),
        ("PATCH", false),
        ("LOCK", false),
        ("GET", true),
        ("PUT", true),
        ("DELETE", true),
    ] {
        for (host, resent) in [("strict.test", resent_strict), ("lenient.test", true)] {
            let before = total();
            let (r, _) = send(&f, method, host, "/", Body::Length(b"k=v"));
            assert_eq!(r.status, 503, "{method} {host}: {}", r.text());
            let attempts = total() - before;
            assert_eq!(attempts, if resent { 2 } else { 1 }, "{method} to {host}");
        }
    }
    assert_eq!(retries(&f, "strict"), 3.0);
    assert_eq!(retries(&f, "lenient"), 6.0);
}

/// Once the response head went to the client, nothing is passed on: a peer
/// that sends part of a body and closes leaves the client a cut response.
#[test]
fn nothing_is_retried_once_the_response_started() {
    let b = Backends::start(1);
    let cut = raw_peer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly the first part");
    let f = ferry(&[upstream_at(
        "app",
        "next_upstream = [\"error\", \"timeout\", \"invalid_header\", \"http_502\"]",
        &(server(cut.addr, "") + &server(b.get(0).addr, "")),
    )]);
    let raw = raw_exchange(
        f.addr,
        b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    );
    let (status, body) = parse_response(&raw);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(
        body, "only the first part",
        "a cut body, not another peer's"
    );
    assert_eq!(cut.requests.load(Relaxed), 1);
    assert_eq!(served(b.get(0)), 0, "a second peer was asked");
    assert_eq!(retries(&f, "app"), 0.0);
}

/// retry_buffer: a body of known length up to it is kept and resent whole; a
/// larger or chunked one streams and is resent only when nothing was sent (a
/// refused connection). Every retry is counted and logged with its reason.
#[test]
fn retry_buffer_keeps_small_bodies_for_resending() {
    let b = Backends::start(2);
    let (a, good) = (b.get(0), b.get(1));
    a.knobs.status.store(503, Relaxed);
    let dead = closed_port();
    let all = "next_upstream = [\"error\", \"timeout\", \"http_503\", \"non_idempotent\"]";
    let big = format!("{all}\nretry_buffer = \"1KiB\"");
    let to_503 = server(a.addr, "") + &server(good.addr, "");
    let to_dead = server(dead, "") + &server(good.addr, "");
    let f = ferry(&[
        upstream_at("small503", all, &to_503),
        upstream_at("smalldead", "", &to_dead),
        upstream_at("chunk503", all, &to_503),
        upstream_at("chunkdead", "", &to_dead),
        upstream_at("big503", &big, &to_503),
        upstream_at("bigdead", &big, &to_dead),
    ]);
    let kib2: Vec<u8> = (0..2048u32).map(|i| b'a' + (i % 26) as u8).collect();
    let kib4: Vec<u8> = (0..4096u32).map(|i| b'a' + (i % 26) as u8).collect();
    let (a_got, good_got) = (|| a.received.load(Relaxed), || good.received.load(Relaxed));

    // Each case is the first request of its upstream: round-robin asks the
    // first listed peer (the 503 or the refusing one) first.
    let cases: [(&str, Body, u16, u64, u64); 6] = [
        // (upstream, body, status, bytes b1 got, bytes b2 got)
        ("small503", Body::Length(&kib2), 200, 2048, 2048),
        ("smalldead", Body::Length(&kib2), 200, 0, 2048),
        ("chunk503", Body::Chunked(&kib2), 503, 2048, 0),
        ("chunkdead", Body::Chunked(&kib2), 200, 0, 2048),
        ("big503", Body::Length(&kib4), 503, 4096, 0),
        ("bigdead", Body::Length(&kib4), 200, 0, 4096),
    ];
    for (name, body, status, want_a, want_good) in cases {
        let (a0, g0) = (a_got(), good_got());
        let (r, _) = send(&f, "POST", &format!("{name}.test"), "/", body);
        assert_eq!(r.status, status, "{name}: {}", r.text());
        if status == 200 {
            assert_eq!(by(&r), "b2", "{name}");
            let len = match body {
                Body::Length(x) | Body::Chunked(x) => x.len(),
                Body::None => 0,
            };
            assert!(
                r.text().ends_with(&format!("body={len}\n")),
                "{name}: {}",
                r.text()
            );
        }
        assert_eq!(a_got() - a0, want_a, "{name}: bytes the first peer got");
        assert_eq!(
            good_got() - g0,
            want_good,
            "{name}: bytes the next peer got"
        );
        assert_eq!(
            retries(&f, name),
            f64::from(u8::from(status == 200)),
            "{name}"
        );
    }
    // Each retry is logged with why.
    let status_retry = log_lines(
        &f,
        &[
            "passing the request to the next peer",
            "upstream=small503",
            "status=503",
        ],
    );
    assert_eq!(status_retry.len(), 1, "{:?}", f.logs.lock().unwrap());
    for name in ["smalldead", "chunkdead", "bigdead"] {
        let lines = log_lines(
            &f,
            &[
                "passing the request to the next peer",
                &format!("upstream={name} "),
                "connect failed",
            ],
        );
        assert_eq!(lines.len(), 1, "{name}: {:?}", f.logs.lock().unwrap());
    }
}

// ---------------------------------------------------------------------------
// 3. Active health checks.

/// A peer failing its check is taken out after `fall` failures and back after
/// `rise` passes; each transition is logged once and exported; the checks use
/// their own connections, with the configured Host.
#[test]
fn active_checks_take_a_peer_out_and_back() {
    let b = Backends::start(2);
    let (a, other) = (b.get(0), b.get(1));
    let f = ferry(&[upstream_at(
        "app",
        "[upstream.health_check]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"1s\"\n\
         rise = 2\nfall = 3\nhost = \"health.internal\"",
        &b.servers("max_fails = 0"),
    )]);
    assert!(wait_until(DEADLINE, || a.checks.load(Relaxed) >= 2
        && other.checks.load(Relaxed) >= 2));
    assert_eq!(*a.check_host.lock().unwrap(), "health.internal");

    // Client traffic on one pooled connection per peer; checks open their own.
    for _ in 0..20 {
        assert_eq!(get(&f, "app.test").status, 200);
    }
    let checks = a.checks.load(Relaxed);
    let pooled = f.metric_sum(
        "ferry_upstream_connects_total",
        &[&format!("peer=\"{}\"", a.addr)],
    );
    assert_eq!(pooled, 1.0, "client requests reuse one pooled connection");
    assert!(
        a.connections.load(Relaxed) > checks,
        "{} connections for {checks} checks: checks share connections",
        a.connections.load(Relaxed)
    );

    // Failing checks: out after `fall` of them.
    let c0 = a.checks.load(Relaxed);
    a.knobs.status.store(503, Relaxed);
    assert!(wait_until(DEADLINE, || state(
        &f,
        "app",
        a.addr,
        "unhealthy"
    ) == 1.0));
    // (A check already under way when the knob flipped may still have passed.)
    assert!(
        a.checks.load(Relaxed) - c0 >= 2,
        "out after fewer than fall checks"
    );
    assert_eq!(up(&f, "app", a.addr), 0.0);
    let client = served(a);
    for _ in 0..10 {
        let r = get(&f, "app.test");
        assert_eq!((r.status, by(&r)), (200, "b2".to_owned()));
    }
    assert_eq!(served(a), client, "an unhealthy peer got client requests");
    // More failing checks: still one log line for the transition.
    let c1 = a.checks.load(Relaxed);
    assert!(wait_until(DEADLINE, || a.checks.load(Relaxed) >= c1 + 3));
    assert_eq!(peer_log_lines(&f, "peer is unhealthy", a.addr).len(), 1);
    assert!(peer_log_lines(&f, "peer is unhealthy", other.addr).is_empty());

    // Passing again: back after `rise` passes, logged once.
    let c2 = a.checks.load(Relaxed);
    a.knobs.status.store(0, Relaxed);
    assert!(wait_until(DEADLINE, || state(&f, "app", a.addr, "up") == 1.0));
    assert!(a.checks.load(Relaxed) - c2 >= 1, "back before rise checks");
    let c3 = a.checks.load(Relaxed);
    assert!(wait_until(DEADLINE, || a.checks.load(Relaxed) >= c3 + 3));
    assert_eq!(peer_log_lines(&f, "peer is healthy", a.addr).len(), 1);
    assert_eq!(peer_log_lines(&f, "peer is unhealthy", a.addr).len(), 1);
    for _ in 0..10 {
        assert_eq!(get(&f, "app.test").status, 200);
    }
    assert!(
        served(a) >= client + 4,
        "the healthy peer got no share back"
    );
}

/// mandatory = true: a new peer gets no client traffic until its first check
/// passes. expect_body: a body without the substring fails the check.
#[test]
fn mandatory_checks_and_expect_body() {
    let b = Backends::start(2);
    let (a, wrong_body) = (b.get(0), b.get(1));
    a.knobs.status.store(503, Relaxed);
    let f = ferry(&[upstream_at(
        "app",
        "[upstream.health_check]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"1s\"\n\
         rise = 2\nfall = 2\nexpect_body = \"hello from b1\"\nmandatory = true",
        &b.servers(""),
    )]);
    // From the start, and until a check passes, no peer takes requests: ferry
    // answers itself without contacting them.
    for _ in 0..5 {
        let (r, took) = send(&f, "GET", "app.test", "/", Body::None);
        assert_eq!(r.status, 502, "{}", r.text());
        assert!(r.text().contains("no live upstreams"), "{}", r.text());
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
    assert!(wait_until(DEADLINE, || a.checks.load(Relaxed) >= 2
        && wrong_body.checks.load(Relaxed) >= 2));
    assert_eq!(state(&f, "app", a.addr, "unhealthy"), 1.0);
    assert_eq!(state(&f, "app", wrong_body.addr, "unhealthy"), 1.0);
    assert_eq!(get(&f, "app.test").status, 502);
    assert_eq!((served(a), served(wrong_body)), (0, 0));

    // b1's check passes: one pass admits a new peer. b2's body never matches.
    a.knobs.status.store(0, Relaxed);
    assert!(wait_until(DEADLINE, || up(&f, "app", a.addr) == 1.0));
    for _ in 0..10 {
        let r = get(&f, "app.test");
        assert_eq!((r.status, by(&r)), (200, "b1".to_owned()));
    }
    // More checks of b2 (its body still wrong): it stays out.
    let seen = wrong_body.checks.load(Relaxed);
    assert!(wait_until(DEADLINE, || wrong_body.checks.load(Relaxed) >= seen + 2));
    assert_eq!(state(&f, "app", wrong_body.addr, "unhealthy"), 1.0);
    assert_eq!(get(&f, "app.test").status, 200);
    assert_eq!(served(wrong_body), 0);
}

// ---------------------------------------------------------------------------
// 4. Server parameters.

/// Backup peers serve only while no primary is usable; `down` peers never.
#[test]
fn backup_serves_only_without_primaries_and_down_never() {
    let b = Backends::start(4);
    let (p1, p2, spare, off) = (b.get(0), b.get(1), b.get(2), b.get(3));
    let ft = "max_fails = 1\nfail_timeout = \"1s\"";
    let f = ferry(&[upstream_at(
        "app",
        "",
        &(server(p1.addr, ft)
            + &server(p2.addr, ft)
            + &server(off.addr, "down = true")
            + &server(spare.addr, "backup = true")),
    )]);
    let round = |n: usize| -> Vec<String> {
        (0..n)
            .map(|_| {
                let r = get(&f, "app.test");
                assert_eq!(r.status, 200, "{}", r.text());
                by(&r)
            })
            .collect()
    };
    assert!(round(6).iter().all(|n| n == "b1" || n == "b2"));
    assert_eq!(served(spare), 0);
    assert_eq!(state(&f, "app", off.addr, "down"), 1.0);

    // Primaries refuse: the backup answers (the first request after trying both).
    kill(&b, 0);
    kill(&b, 1);
    assert!(round(6).iter().all(|n| n == "b3"));
    assert_eq!(served(spare), 6);
    assert_eq!(state(&f, "app", p1.addr, "failed"), 1.0);
    assert_eq!(retries(&f, "app"), 2.0);

    // Primaries back: once fail_timeout passed they take the traffic again.
    restart(&b, 0);
    restart(&b, 1);
    assert!(wait_until(DEADLINE, || up(&f, "app", p1.addr) == 1.0
        && up(&f, "app", p2.addr) == 1.0));
    let names = round(6);
    assert!(names.iter().all(|n| n == "b1" || n == "b2"), "{names:?}");
    assert_eq!(
        served(spare),
        6,
        "the backup got requests with primaries up"
    );

    // No primary and no backup: `down` still holds.
    kill(&b, 0);
    kill(&b, 1);
    kill(&b, 2);
    for _ in 0..3 {
        assert_eq!(get(&f, "app.test").status, 502);
    }
    assert_eq!(served(off), 0, "a peer marked down got requests");
    assert_eq!(off.connections.load(Relaxed), 0);
}

/// max_conns with a queue: requests over the limit wait for a slot; 503 when
/// the queue is full or the wait exceeds queue_timeout.
#[test]
fn max_conns_queue_waits_then_answers_503() {
    let b = Backends::start(3);
    let (q, full, slow) = (b.get(0), b.get(1), b.get(2));
    q.knobs.latency_ms.store(300, Relaxed);
    full.knobs.latency_ms.store(500, Relaxed);
    slow.knobs.latency_ms.store(1000, Relaxed);
    let f = ferry(&[
        upstream_at(
            "queue",
            "queue = 10\nqueue_timeout = \"2s\"",
            &server(q.addr, "max_conns = 2"),
        ),
        upstream_at(
            "full",
            "queue = 1\nqueue_timeout = \"10s\"",
            &server(full.addr, "max_conns = 2"),
        ),
        upstream_at(
            "short",
            "queue = 10\nqueue_timeout = \"200ms\"",
            &server(slow.addr, "max_conns = 1"),
        ),
    ]);

    // 10 at once, 2 at a time, 300 ms each: all served, in five waves.
    let start = Instant::now();
    let answers = concurrently(10, |_| send(&f, "GET", "queue.test", "/", Body::None));
    let took = start.elapsed();
    for (r, _) in &answers {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(served(q), 10);
    assert_eq!(q.peak_in_flight.load(Relaxed), 2, "max_conns = 2 exceeded");
    assert!(
        took >= Duration::from_millis(1400),
        "10 requests in {took:?}"
    );

    // Queue of 1: of 5 at once, 2 run, 1 waits, the rest get 503 at once.
    let answers = concurrently(5, |_| send(&f, "GET", "full.test", "/", Body::None));
    let rejected: Vec<_> = answers.iter().filter(|(r, _)| r.status == 503).collect();
    assert!(!rejected.is_empty(), "the queue of 1 held 3 requests");
    for (r, took) in &rejected {
        assert!(r.text().contains("max_conns"), "{}", r.text());
        assert!(*took < Duration::from_millis(400), "503 after {took:?}");
    }
    assert!(
        answers
            .iter()
            .all(|(r, _)| r.status == 200 || r.status == 503)
    );
    assert_eq!(full.peak_in_flight.load(Relaxed), 2);

    // queue_timeout: waiting requests give up after 200 ms.
    let answers = concurrently(3, |_| send(&f, "GET", "short.test", "/", Body::None));
    let mut statuses: Vec<u16> = answers.iter().map(|(r, _)| r.status).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 503, 503]);
    for (r, took) in &answers {
        if r.status == 503 {
            assert!(
                *took >= Duration::from_millis(180) && *took < Duration::from_millis(800),
                "503 after {took:?}, queue_timeout = 200ms"
            );
        } else {
            assert!(*took >= Duration::from_millis(950), "{took:?}");
        }
    }
    assert_eq!(slow.peak_in_flight.load(Relaxed), 1);
}

/// slow_start: a peer whose health check passes again gets a small share at
/// first, growing over the ramp.
#[test]
fn slow_start_ramps_a_recovered_peer_up() {
    let b = Backends::start(3);
    let c = b.get(2);
    let f = ferry(&[upstream_at(
        "app",
        "[upstream.health_check]\npath = \"/\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 1",
        &b.servers("slow_start = \"4s\"\nmax_fails = 0"),
    )]);
    c.knobs.status.store(503, Relaxed);
    assert!(wait_until(DEADLINE, || state(
        &f,
        "app",
        c.addr,
        "unhealthy"
    ) == 1.0));
    c.knobs.status.store(0, Relaxed);
    assert!(wait_until(DEADLINE, || up(&f, "app", c.addr) == 1.0));
    let t0 = Instant::now();
    // Steady sequential load over the 4 s ramp, on one keep-alive connection.
    let mut conn = RawConn::connect(f.addr);
    let mut seen: Vec<(Duration, bool)> = Vec::new();
    while t0.elapsed() < Duration::from_millis(3950) {
        conn.send(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n");
        let r = conn.read_response(false);
        assert_eq!(r.status, 200);
        seen.push((t0.elapsed(), by(&r) == "b3"));
    }
    let share = |from: u64, to: u64| {
        let window: Vec<bool> = seen
            .iter()
            .filter(|(t, _)| *t >= Duration::from_millis(from) && *t < Duration::from_millis(to))
            .map(|(_, c)| *c)
            .collect();
        assert!(
            window.len() >= 30,
            "only {} requests in {from}..{to} ms",
            window.len()
        );
        window.iter().filter(|c| **c).count() as f64 / window.len() as f64
    };
    let (first, last) = (share(0, 1000), share(2950, 3950));
    assert!(
        first < 0.15,
        "share in the first second {first:.3} (full: 0.33)"
    );
    assert!(
        last > first + 0.1,
        "share did not grow: {first:.3} -> {last:.3}"
    );
}

// ---------------------------------------------------------------------------
// 5. Panic mode.

/// Every peer failed on passive evidence only: ferry tries them anyway (they
/// may have recovered) instead of answering 502 "no live upstreams".
#[test]
fn passively_failed_peers_are_tried_anyway() {
    let b = Backends::start(2);
    let f = ferry(&[upstream_at(
        "app",
        "",
        &b.servers("max_fails = 1\nfail_timeout = \"30s\""),
    )]);
    assert_eq!(get(&f, "app.test").status, 200);
    // Both refuse once: both are failed for 30 s ...
    kill(&b, 0);
    kill(&b, 1);
    let r = get(&f, "app.test");
    assert_eq!(r.status, 502, "{}", r.text());
    for x in &b.list {
        assert_eq!(state(&f, "app", x.addr, "failed"), 1.0);
    }
    // ... and recover at once: the next request is served, not failed fast.
    restart(&b, 0);
    restart(&b, 1);
    let r = get(&f, "app.test");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(f.metric_sum("ferry_upstream_no_peer_total", &[]), 0.0);
    assert!(log_lines(&f, &["no live upstreams"]).is_empty());
}

/// ... but when active checks say every peer is unhealthy, ferry answers 502
/// at once without contacting them.
#[test]
fn unhealthy_peers_are_not_tried() {
    let b = Backends::start(2);
    let f = ferry(&[upstream_at(
        "app",
        "[upstream.health_check]\npath = \"/\"\ninterval = \"200ms\"\nrise = 1\nfall = 1",
        &b.servers(""),
    )]);
    assert_eq!(get(&f, "app.test").status, 200);
    for x in &b.list {
        x.knobs.status.store(503, Relaxed);
    }
    assert!(wait_until(DEADLINE, || b.list.iter().all(|x| state(
        &f,
        "app",
        x.addr,
        "unhealthy"
    ) == 1.0)));
    let before: u64 = b.list.iter().map(served).sum();
    let (r, took) = send(&f, "GET", "app.test", "/", Body::None);
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("no live upstreams"), "{}", r.text());
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(b.list.iter().map(served).sum::<u64>(), before);
    assert_eq!(
        f.metric_sum("ferry_upstream_no_peer_total", &["upstream=\"app\""]),
        1.0
    );
}
