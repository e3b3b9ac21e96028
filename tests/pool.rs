//! End-to-end: the pooled keep-alive upstream client (src/client.rs).
mod common;
use common::*;

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Sum of the backends' open-connection gauges.
fn open_total(b: &Backends) -> u64 {
    b.list.iter().map(|x| x.open.load(Relaxed)).sum()
}

/// 50 client connections for 10 s: upstream connections are reused, so ferry
/// opens at most one new upstream connection per 1,000 requests.
#[test]
fn keepalive_reuses_upstream_connections_under_load() {
    let b = Backends::start(2);
    // keepalive is left at its default: it must be on without configuration.
    let f = Ferry::start(&config("", &b.servers("")));
    let r = wrk(&f.url("/"), 50, 10);
    assert_eq!(r.non_2xx, 0, "{}", r.output);
    let connects = f.metric_sum("ferry_upstream_connects_total", &[]);
    let responses = f.metric_sum("ferry_http_requests_total", &["code=\"200\""]);
    let accepted: u64 = b.list.iter().map(|x| x.connections.load(Relaxed)).sum();
    let served: u64 = b.list.iter().map(|x| x.served.load(Relaxed)).sum();
    println!(
        "wrk: {} requests; ferry: {responses} responses, {connects} upstream connects \
         (1 per {:.0} requests); backends accepted {accepted} connections",
        r.requests,
        r.requests as f64 / connects.max(1.0)
    );
    // wrk counts only the requests it saw complete; ferry may have served a few more.
    assert!(responses >= r.requests as f64, "ferry counted {responses}, wrk saw {}", r.requests);
    assert_eq!(served as f64, responses, "every response came from a backend");
    assert!(connects >= 1.0);
    assert_eq!(connects, accepted as f64, "connects_total counts every upstream TCP connection");
    assert!(
        connects * 1000.0 <= responses && connects * 1000.0 <= r.requests as f64,
        "{connects} upstream connections for {} requests: more than 1 per 1,000\n{}",
        r.requests,
        r.output
    );
}

/// Idle pooled connections close after the upstream's keepalive_timeout, not before.
#[test]
fn idle_pooled_connections_close_after_keepalive_timeout() {
    let b = Backends::start(2);
    let f = Ferry::start(&config("keepalive_timeout = \"1s\"", &b.servers("")));
    // Load from several connections so that several upstream connections are pooled.
    let r = wrk(&f.url("/"), 8, 1);
    let stopped = Instant::now();
    assert_eq!(r.non_2xx, 0, "{}", r.output);
    let open_after_load = open_total(&b);
    assert!(open_after_load > 0, "the pool keeps idle connections after the load");
    // Still pooled well before keepalive_timeout has passed.
    std::thread::sleep(Duration::from_millis(300));
    let open_soon = open_total(&b);
    let elapsed_soon = stopped.elapsed();
    assert!(
        elapsed_soon >= Duration::from_millis(900) || open_soon > 0,
        "idle connections closed after {elapsed_soon:?}, before keepalive_timeout = 1s"
    );
    assert!(
        wait_until(DEADLINE, || open_total(&b) == 0),
        "idle connections still open {:?} after the load: {}",
        stopped.elapsed(),
        open_total(&b)
    );
    let closed_after = stopped.elapsed();
    println!(
        "{open_after_load} pooled connections after the load, all closed {closed_after:?} after it"
    );
    assert!(closed_after >= Duration::from_millis(900), "closed after {closed_after:?}");
    // The next request works on a new connection.
    let before = f.metric_sum("ferry_upstream_connects_total", &[]);
    assert_eq!(http_get(f.addr, "/", &[]).0, 200);
    assert_eq!(f.metric_sum("ferry_upstream_connects_total", &[]), before + 1.0);
}

/// At most `keepalive` idle connections are kept per peer.
#[test]
fn pool_keeps_at_most_keepalive_idle_connections_per_peer() {
    let b = Backends::start(2);
    for x in &b.list {
        x.knobs.latency_ms.store(500, Relaxed);
    }
    let f = Ferry::start(&config("keepalive = 2\nkeepalive_timeout = \"30s\"", &b.servers("")));
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let addr = f.addr;
            std::thread::spawn(move || http_get(addr, "/", &[]))
        })
        .collect();
    // All 20 requests are in flight at once, each on its own upstream connection.
    assert!(
        wait_until(DEADLINE, || open_total(&b) == 20),
        "expected 20 upstream connections at once, saw {}",
        open_total(&b)
    );
    for t in threads {
        let (status, body) = t.join().expect("client thread");
        assert_eq!(status, 200, "{body}");
    }
    for x in &b.list {
        assert!(
            wait_until(DEADLINE, || x.open.load(Relaxed) <= 2),
            "{} keeps {} connections open with keepalive = 2",
            x.name,
            x.open.load(Relaxed)
        );
    }
    assert_eq!(f.metric_sum("ferry_upstream_connects_total", &[]), 20.0);
    // The kept connections stay open (keepalive_timeout = 30s) and are reused.
    for x in &b.list {
        x.knobs.latency_ms.store(0, Relaxed);
        assert_eq!(x.open.load(Relaxed), 2, "{} keeps exactly 2 idle connections", x.name);
    }
    for _ in 0..10 {
        assert_eq!(http_get(f.addr, "/", &[]).0, 200);
    }
    assert_eq!(f.metric_sum("ferry_upstream_connects_total", &[]), 20.0, "idle connections reused");
}

/// A pooled connection the backend closed (without `Connection: close`) before
/// it is reused costs nothing: GET and POST with a body both succeed, and no
/// failure is counted against the peer.
#[test]
fn connection_closed_by_backend_while_idle_is_replaced_transparently() {
    let b = Backends::start(1);
    b.get(0).knobs.idle_close_ms.store(20, Relaxed);
    let f = Ferry::start(&config("keepalive_timeout = \"60s\"", &b.servers("max_fails = 1")));
    for i in 0..10 {
        let (code, out, err) = if i % 2 == 0 {
            curl(&["-s", "-o", "/dev/null", "-w", "%{http_code}", &f.url("/get")])
        } else {
            curl(&[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--data-binary",
                "payload-of-the-post",
                &f.url("/post"),
            ])
        };
        assert_eq!((code, out.as_str()), (0, "200"), "request {i}: {err}");
        // Spaced so that the backend closes the idle connection in between (that
        // close is the behaviour under test).
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(b.get(0).served.load(Relaxed), 10);
    assert_eq!(b.get(0).received.load(Relaxed), 5 * "payload-of-the-post".len() as u64);
    assert_eq!(f.metric_sum("ferry_upstream_fails_total", &[]), 0.0);
    assert_eq!(f.metric_sum("ferry_upstream_retries_total", &[]), 0.0);
    assert_eq!(f.metric_sum("ferry_http_requests_total", &["code=\"200\""]), 10.0);
    assert_eq!(
        b.get(0).connections.load(Relaxed),
        10,
        "every request needed a new connection: the backend closed each one"
    );
}
