//! ferry's own HTTP/1.1 server loop: pipelining, heads split across packets,
//! `Connection: close`, the hand-over to hyper for bodies, HTTP/1.0 and
//! errors on the same connection, response framing and reason phrases, and the
//! memory an idle keep-alive connection holds, and garbage heads.
mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (b, f) = one_backend("");
    let mut c = RawConn::connect(f.addr);
    c.send(
        b"GET /echo?n=1 HTTP/1.1\r\nHost: a\r\n\r\n\
          GET /echo?n=2 HTTP/1.1\r\nHost: a\r\n\r\n\
          HEAD /echo?n=3 HTTP/1.1\r\nHost: a\r\n\r\n\
          GET /echo?n=4 HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    for n in [1, 2] {
        let r = c.read_response(false);
        assert_eq!(r.status, 200, "{}", r.head);
        assert!(
            r.text().starts_with(&format!("GET /echo?n={n} HTTP/1.1")),
            "{}",
            r.text()
        );
    }
    let head = c.read_response(true);
    assert_eq!(head.status, 200, "{}", head.head);
    let last = c.read_response(false);
    assert!(last.text().starts_with("GET /echo?n=4 "), "{}", last.text());
    assert!(c.pending().is_empty(), "stray bytes: {:?}", c.pending());
    assert_eq!(b.get(0).served.load(Relaxed), 4);
}

#[test]
fn a_head_that_arrives_a_byte_at_a_time_is_served() {
    let (_b, f) = one_backend("");
    let mut c = RawConn::connect(f.addr);
    for byte in b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Slow: yes\r\n\r\n" {
        c.send(&[*byte]);
        std::thread::sleep(Duration::from_millis(2));
    }
    let r = c.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(r.text().contains("x-slow: yes"), "{}", r.text());
}

#[test]
fn bodies_http10_and_errors_after_simple_requests_on_one_connection() {
    let (_b, f) = one_backend("");
    let before = stub_accepts(&f.admin_get("/stub_status"));
    let mut c = RawConn::connect(f.addr);
    let r = c.request("GET", "/echo", &[]);
    assert_eq!(r.status, 200, "{}", r.head);

    // A body: served on the same connection, and so is what follows.
    c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello");
    let r = c.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(r.text().contains("body=5"), "{}", r.text());
    c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
    let r = c.read_response(false);
    assert!(r.text().contains("body=3"), "{}", r.text());
    let r = c.request("GET", "/echo", &[]);
    assert!(r.text().starts_with("GET /echo HTTP/1.1"), "{}", r.text());
    assert_eq!(stub_accepts(&f.admin_get("/stub_status")) - before, 1);

    // A zero Content-Length is no body: still the simple path, same answers.
    c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n");
    let r = c.read_response(false);
    assert!(r.text().contains("body=0"), "{}", r.text());

    // HTTP/1.0 on a fresh connection: answered, then closed.
    let mut old = RawConn::connect(f.addr);
    old.send(b"GET /echo HTTP/1.0\r\nHost: a\r\n\r\n");
    let r = old.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(old.wait_closed(DEADLINE).is_some());

    // Heads that do not parse, or are too large, get hyper's answers.
    let mut bad = RawConn::connect(f.addr);
    let r = bad.request("GET", "/echo", &[]);
    assert_eq!(r.status, 200);
    bad.send(b"GET /has space HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(bad.read_head().status, 400);
    let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let mut c = RawConn::connect(f.addr);
    c.send(format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes());
    assert_eq!(c.read_head().status, 431);
}

#[test]
fn connection_close_is_answered_in_kind_and_closes() {
    let (_b, f) = one_backend("");
    let mut c = RawConn::connect(f.addr);
    let r = c.request("GET", "/echo", &[("Connection", "close")]);
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);
    assert!(c.wait_closed(DEADLINE).is_some(), "still open");

    // keepalive_timeout = 0 turns keep-alive off: every answer says close.
    let (_b, f) = one_backend("keepalive_timeout = \"0s\"");
    let mut c = RawConn::connect(f.addr);
    let r = c.request("GET", "/echo", &[]);
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);
    assert!(c.wait_closed(DEADLINE).is_some(), "still open");
}

/// A backend written by hand: answers every request with `answer`, then closes.
fn raw_backend(answer: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(answer);
        }
    });
    addr
}

#[test]
fn framing_and_reason_phrases_come_through() {
    let odd =
        raw_backend(b"HTTP/1.1 299 Quite Fine\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
    let eof = raw_backend(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end");
    let rest = format!(
        "[[upstream]]\nname = \"odd\"\n[[upstream.server]]\naddr = \"{odd}\"\n\n\
         [[upstream]]\nname = \"eof\"\n[[upstream.server]]\naddr = \"{eof}\"\n\n{}{}",
        route("*", "/odd", "odd"),
        route("*", "/eof", "eof"),
    );
    let f = Ferry::start(&ferry_config("", "", &rest));
    let mut c = RawConn::connect(f.addr);
    let r = c.request("GET", "/odd", &[]);
    assert!(r.head.starts_with("HTTP/1.1 299 Quite Fine"), "{}", r.head);
    assert_eq!(r.text(), "ok");
    assert!(r.header("date").is_some(), "{}", r.head);

    // A body delimited by the upstream's close goes to a keep-alive client chunked.
    let r = c.request("GET", "/eof", &[]);
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{}", r.head);
    assert_eq!(r.text(), "until the end");

    // ferry's own answers carry a length and a date, and keep the connection.
    let r = c.request("GET", "/nowhere", &[]);
    assert_eq!(r.status, 404, "{}", r.head);
    assert!(r.header("content-length").is_some(), "{}", r.head);
    assert!(r.header("date").is_some(), "{}", r.head);
    let r = c.request("GET", "/odd", &[]);
    assert_eq!(r.status, 299, "{}", r.head);
}

#[test]
fn idle_keepalive_connections_hold_little_memory() {
    let (_b, f) = one_backend("max_connections = 4096");
    let n = 1000;
    let open = |n: usize| -> Vec<TcpStream> {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect(f.addr).expect("connect");
                s.set_read_timeout(Some(DEADLINE)).expect("timeout");
                s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                    .expect("send");
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while !got.ends_with(b"\n") {
                    let k = s.read(&mut buf).expect("read");
                    assert!(k > 0, "closed");
                    got.extend_from_slice(&buf[..k]);
                }
                s
            })
            .collect()
    };
    // Warm up (allocator arenas, the runtime's slabs, the upstream pool) with
    // connections that stay open, so the ones measured need new memory.
    let warm = open(200);
    let (before, _) = f.rss_kib();
    let conns = open(n);
    let (after, _) = f.rss_kib();
    let per_conn = after.saturating_sub(before) as f64 / n as f64;
    // Each served one request and now waits: hyper's loop held ~30 KiB here.
    eprintln!("{per_conn:.2} KiB per idle connection");
    assert!(per_conn < 8.0, "{per_conn:.2} KiB per idle connection");
    drop((warm, conns));
}

#[test]
fn garbage_heads_close_their_connection_and_nothing_else() {
    let (b, f) = one_backend("client_header_timeout = \"2s\"");
    let mut rng = fastrand::Rng::with_seed(7);
    let pieces: [&[u8]; 12] = [
        b"GET ",
        b"/x",
        b" HTTP/1.1",
        b"\r\n",
        b"Host: a",
        b"Content-Length: ",
        b"0",
        b"-1",
        b"Transfer-Encoding: chunked",
        b":",
        b"\x00\xff\x80",
        b"Connection: upgrade",
    ];
    for _ in 0..200 {
        let mut head = Vec::new();
        for _ in 0..rng.usize(1..24) {
            head.extend_from_slice(pieces[rng.usize(..pieces.len())]);
        }
        head.extend_from_slice(b"\r\n\r\n");
        let mut s = TcpStream::connect(f.addr).expect("connect");
        s.set_read_timeout(Some(DEADLINE)).expect("timeout");
        s.write_all(&head).expect("send");
        let _ = s.shutdown(std::net::Shutdown::Write);
        // An answer or a close, never a hang past the header timeout.
        let mut sink = Vec::new();
        if let Err(e) = s.read_to_end(&mut sink) {
            assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "no answer and no close for {:?}",
                String::from_utf8_lossy(&head)
            );
        }
        if !sink.is_empty() {
            assert!(
                sink.starts_with(b"HTTP/1.1 "),
                "{:?}",
                String::from_utf8_lossy(&sink)
            );
        }
    }
    let mut c = RawConn::connect(f.addr);
    let r = c.request("GET", "/echo", &[]);
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(b.get(0).served.load(Relaxed) >= 1);
}
