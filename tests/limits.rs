//! End-to-end limits: slow request heads and idle keep-alive connections are
//! closed on time, oversized heads get 431, oversized bodies 413 (Content-Length
//! and chunked), and `max_connections` holds without taking the daemon down.
mod common;
use common::*;

use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Asserts `took` is within [lo, hi]: the timeout fired, not too early, not much late.
fn assert_between(took: Option<Duration>, lo: Duration, hi: Duration, what: &str) {
    let took = took.unwrap_or_else(|| panic!("{what}: still open after {hi:?}"));
    assert!(
        took >= lo && took <= hi,
        "{what}: closed after {took:?}, expected {lo:?}..{hi:?}"
    );
}

#[test]
fn a_partial_request_head_is_closed_after_client_header_timeout() {
    let (b, f) = one_backend("client_header_timeout = \"1s\"");
    let mut partial = RawConn::connect(f.addr);
    partial.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ");
    let mut silent = RawConn::connect(f.addr);
    assert_between(
        partial.wait_closed(Duration::from_secs(6)),
        Duration::from_millis(700),
        Duration::from_secs(5),
        "partial head",
    );
    // A connection that never sends a byte is cut by the same timer.
    assert_between(
        silent.wait_closed(Duration::from_secs(6)),
        Duration::ZERO,
        Duration::from_secs(5),
        "silent connection",
    );
    assert_eq!(b.get(0).served.load(Relaxed), 0);
}

#[test]
fn a_trickled_request_head_does_not_reset_the_header_timer() {
    let (_b, f) = one_backend("client_header_timeout = \"1s\"");
    let mut c = RawConn::connect(f.addr);
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n");
    // Slowloris: one header byte every 200 ms, forever.
    let mut w = c.s.try_clone().expect("clone");
    let trickle = std::thread::spawn(move || {
        use std::io::Write;
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(200));
            if w.write_all(b"a").is_err() {
                return;
            }
        }
    });
    assert_between(
        c.wait_closed(Duration::from_secs(6)),
        Duration::from_millis(700),
        Duration::from_secs(5),
        "trickled head",
    );
    drop(c);
    trickle.join().expect("trickle thread");
}

#[test]
fn a_head_begun_after_an_idle_spell_gets_the_whole_client_header_timeout() {
    let (_b, f) = one_backend("keepalive_timeout = \"10s\"\nclient_header_timeout = \"1s\"");
    // Keep-alive connections go idle after a request; one begins a head 0.5 s
    // later, the others 1.5 s later (after the connection timer's first turn).
    // Each is closed about 1 s after its first byte: not sooner (the idle
    // spell does not count) and not at the 10 s keep-alive mark. A request
    // with a body (`posted`) is served on the general HTTP/1.1 path, which
    // keeps the connection from then on.
    let mut early = RawConn::connect(f.addr);
    let mut late = RawConn::connect(f.addr);
    let mut posted = RawConn::connect(f.addr);
    assert_eq!(early.request("GET", "/", &[]).status, 200);
    assert_eq!(late.request("GET", "/", &[]).status, 200);
    posted.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi");
    assert_eq!(posted.read_response(false).status, 200);
    let partial = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    std::thread::sleep(Duration::from_millis(500));
    early.send(partial);
    let early_sent = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    late.send(partial);
    posted.send(partial);
    let late_sent = Instant::now();
    for (c, sent, what) in [
        (&mut early, early_sent, "head begun after 0.5 s idle"),
        (&mut late, late_sent, "head begun after 1.5 s idle"),
        (
            &mut posted,
            late_sent,
            "head begun after 1.5 s idle, after a request with a body",
        ),
    ] {
        let closed = c
            .wait_closed(Duration::from_secs(6))
            .map(|_| sent.elapsed());
        assert_between(
            closed,
            Duration::from_millis(700),
            Duration::from_secs(5),
            what,
        );
    }
}

#[test]
fn an_idle_keepalive_connection_is_closed_after_keepalive_timeout() {
    let (_b, f) = one_backend("keepalive_timeout = \"1s\"\nclient_header_timeout = \"10s\"");
    let mut c = RawConn::connect(f.addr);
    // Requests 400 ms apart keep it open well past 1 s: the timer is per idle spell.
    let start = Instant::now();
    for _ in 0..4 {
        assert_eq!(c.request("GET", "/", &[]).status, 200);
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(start.elapsed() > Duration::from_millis(1500));
    assert_eq!(c.request("GET", "/", &[]).status, 200);
    assert_between(
        c.wait_closed(Duration::from_secs(8)),
        Duration::from_millis(700),
        Duration::from_secs(5),
        "idle keep-alive",
    );
    // Closed cleanly between requests: no stray bytes.
    assert!(
        c.pending().is_empty(),
        "{:?}",
        String::from_utf8_lossy(c.pending())
    );
}

#[test]
fn a_request_head_over_64_kib_gets_431() {
    let (b, f) = one_backend("");
    let big = "a".repeat(70 * 1024);
    let (status, body) = http_get(f.addr, "/", &[("X-Big", &big)]);
    assert_eq!(status, 431, "{body}");
    assert_eq!(b.get(0).served.load(Relaxed), 0);

    // Under the limit is fine.
    let fits = "a".repeat(60 * 1024);
    let (status, body) = http_get(f.addr, "/echo", &[("X-Big", &fits)]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&fits));
}

/// POST `n` bytes with curl (chunked or with Content-Length): (status, body).
fn post(f: &Ferry, n: usize, chunked: bool) -> (String, String) {
    let path = f.dir.path().join(format!("body-{n}"));
    std::fs::write(&path, vec![b'z'; n]).expect("write body");
    let file = format!("@{}", path.display());
    let mut args = vec!["-w", "\n%{http_code}", "--data-binary", &file];
    if chunked {
        args.extend(["-H", "Transfer-Encoding: chunked"]);
    }
    let url = f.url("/upload");
    args.push(&url);
    let (code, out, err) = curl(&args);
    assert_eq!(code, 0, "curl {n} bytes, chunked={chunked}: {err}");
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", &out));
    (status.to_owned(), body.to_owned())
}

#[test]
fn a_body_over_client_max_body_size_gets_413() {
    let (b, f) = one_backend("client_max_body_size = \"1KiB\"");
    let backend = b.get(0);
    for chunked in [false, true] {
        let (status, body) = post(&f, 1024, chunked);
        assert_eq!(status, "200", "1024 bytes, chunked={chunked}: {body}");
        assert!(body.contains("body=1024"), "{body}");

        for n in [1025, 32 * 1024 * 1024] {
            let (served, received) = (backend.served.load(Relaxed), backend.received.load(Relaxed));
            let (status, body) = post(&f, n, chunked);
            assert_eq!(status, "413", "{n} bytes, chunked={chunked}: {body}");
            assert_eq!(body, "413 Request Entity Too Large\n");
            let forwarded = backend.received.load(Relaxed) - received;
            if chunked {
                // Streamed: the backend may have seen the start, never past the limit.
                assert!(forwarded <= 1024, "{forwarded} bytes forwarded");
            } else {
                // Content-Length says it all: refused before anything is forwarded.
                assert_eq!(backend.served.load(Relaxed), served);
                assert_eq!(forwarded, 0);
            }
        }
    }
    // ferry is fine afterwards.
    assert_eq!(http_get(f.addr, "/", &[]).0, 200);
}

#[test]
fn a_client_that_sends_its_whole_body_before_reading_still_gets_the_413() {
    let (b, f) = one_backend("client_max_body_size = \"1KiB\"");
    for chunked in [false, true] {
        let n = 16 * 1024 * 1024;
        let mut c = RawConn::connect(f.addr);
        let head = if chunked {
            "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned()
        } else {
            format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n")
        };
        c.send(head.as_bytes());
        // A naive client: write everything first, read afterwards. If ferry
        // closed without draining, the unread body would make the close an RST,
        // and the RST would take the 413 with it.
        let mut w = c.s.try_clone().expect("clone");
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let block = vec![b'z'; 64 * 1024];
            for _ in 0..n / block.len() {
                if chunked {
                    w.write_all(format!("{:x}\r\n", block.len()).as_bytes())?;
                }
                w.write_all(&block)?;
                if chunked {
                    w.write_all(b"\r\n")?;
                }
            }
            if chunked {
                w.write_all(b"0\r\n\r\n")?;
            }
            Ok::<(), std::io::Error>(())
        });
        let sent = writer.join().expect("writer");
        assert!(
            sent.is_ok(),
            "chunked={chunked}: the upload was cut: {sent:?}"
        );
        let r = c.read_response(false);
        assert_eq!(r.status, 413, "chunked={chunked}: {}", r.head);
        assert_eq!(r.text(), "413 Request Entity Too Large\n");
        assert!(
            c.wait_closed(DEADLINE).is_some(),
            "ferry closes after the 413"
        );
    }
    assert_eq!(http_get(f.addr, "/", &[]).0, 200);
    assert!(b.get(0).received.load(Relaxed) <= 1024);
}

#[test]
fn max_connections_holds_and_the_daemon_survives() {
    let (_b, f) = one_backend("max_connections = 50");
    let admin = f.admin.expect("admin");
    let held: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(f.addr).expect("connect (backlog)"))
        .collect();
    // ferry takes exactly its 50 and leaves the rest waiting in the backlog.
    let stub = || f.admin_get("/stub_status");
    assert!(
        wait_until(DEADLINE, || stub_active(&stub()) == 50),
        "{}",
        stub()
    );
    for _ in 0..5 {
        assert_eq!(
            http_get(admin, "/healthz", &[]).0,
            200,
            "admin answers while full"
        );
        let s = stub();
        assert_eq!(stub_active(&s), 50, "{s}");
        assert!(stub_accepts(&s) <= 50, "{s}");
    }
    assert!(
        !f.logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("panicked")),
        "{:?}",
        f.logs.lock().unwrap()
    );
    drop(held);

    // The backlog drains and a normal request is served.
    let start = Instant::now();
    let (status, body) = http_get(f.addr, "/", &[]);
    assert_eq!(status, 200, "{body}");
    assert!(start.elapsed() < DEADLINE);
    assert_eq!(http_get(admin, "/healthz", &[]).0, 200);
    assert!(
        wait_until(DEADLINE, || stub_active(&stub()) == 0),
        "{}",
        stub()
    );
    let mut f = f;
    assert!(matches!(f.child.try_wait(), Ok(None)), "ferry exited");
}
