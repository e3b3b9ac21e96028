//! End-to-end: what tests/cli.rs does not already cover of graceful shutdown —
//! on SIGTERM, idle keep-alive connections are closed at once, while a request in
//! flight on another keep-alive connection finishes with `Connection: close`.
mod common;
use common::*;

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

#[test]
fn sigterm_closes_idle_keepalive_connections_while_a_request_finishes() {
    let b = Backends::start(1);
    let mut f = Ferry::start(&config("", &b.servers("")));
    // Two idle keep-alive connections, each having served a request.
    let mut idle = idle_connections(&f, 2);
    // A keep-alive connection with a 2 s request in flight.
    b.get(0).knobs.latency_ms.store(2000, Relaxed);
    let mut busy = RawConn::connect(f.addr);
    busy.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(wait_until(DEADLINE, || b.get(0).served.load(Relaxed) == 3));

    let t = Instant::now();
    f.signal("TERM");
    for c in &mut idle {
        assert_closed_promptly(c);
        assert!(c.pending().is_empty(), "nothing is sent on an idle close");
    }
    assert!(
        f.child.try_wait().expect("try_wait").is_none(),
        "ferry exited with a request in flight"
    );
    let r = busy.read_response(false);
    let answered = t.elapsed();
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("hello from b1"), "{}", r.text());
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);
    assert!(
        busy.wait_closed(DEADLINE).is_some(),
        "closed after the answer"
    );
    assert_eq!(
        f.wait_exit(DEADLINE),
        Some(0),
        "{:?}",
        f.logs.lock().unwrap()
    );
    assert!(answered >= Duration::from_millis(1000), "{answered:?}");
}

#[test]
fn sigterm_closes_idle_connections_on_every_worker() {
    let b = Backends::start(1);
    let cfg = config("", &b.servers("")).replace("workers = 1", "workers = 2");
    let mut f = Ferry::start(&cfg);
    // Enough connections that both workers hold some of them.
    let mut idle = idle_connections(&f, 16);
    f.signal("TERM");
    for c in &mut idle {
        assert_closed_promptly(c);
    }
    assert_eq!(
        f.wait_exit(DEADLINE),
        Some(0),
        "{:?}",
        f.logs.lock().unwrap()
    );
}

/// `n` keep-alive connections to `f`, each idle after one answered request.
fn idle_connections(f: &Ferry, n: usize) -> Vec<RawConn> {
    let mut idle: Vec<RawConn> = (0..n).map(|_| RawConn::connect(f.addr)).collect();
    for c in &mut idle {
        assert_eq!(c.request("GET", "/", &[]).status, 200);
    }
    idle
}

/// `c` is closed by ferry within a second.
fn assert_closed_promptly(c: &mut RawConn) {
    let closed = c.wait_closed(DEADLINE);
    assert!(
        closed.is_some_and(|d| d < Duration::from_millis(1000)),
        "an idle keep-alive connection was not closed promptly: {closed:?}"
    );
}
