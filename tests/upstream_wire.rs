//! ferry's HTTP/1.1 client against upstreams that answer byte for byte as
//! scripted: chunked bodies split anywhere (extensions, trailers), bodies read
//! to the close, interim 1xx answers, a broken chunk, an answer that comes
//! before the upload ends, `HEAD`, and a pooled connection the upstream closed.
//! Each case also checks whether the upstream connection was reused.
mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, mpsc};
use std::time::Duration;

/// What a scripted upstream does after reading a request head.
enum Step {
    /// Read the request body (by its Content-Length or chunked framing).
    ReadBody,
    /// Send these bytes.
    Send(Vec<u8>),
    /// Wait this many milliseconds (to split what ferry reads).
    Pause(u64),
    /// Read and drop whatever comes until the peer closes.
    Drain,
    /// Close the connection (and report it).
    Close,
    /// Answer 200 with the request head, as it came, for the body.
    EchoHead,
}

fn send(b: &[u8]) -> Step {
    Step::Send(b.to_vec())
}

/// An upstream that answers its `n`th request (from 0, over all connections)
/// as `script(n, head)` says.
struct Scripted {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    closed: mpsc::Receiver<()>,
}

impl Scripted {
    fn start(script: fn(usize, &str) -> Vec<Step>) -> Scripted {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let accepts = Arc::new(AtomicUsize::new(0));
        let (tx, closed) = mpsc::channel();
        let count = Arc::clone(&accepts);
        let requests = Arc::new(AtomicUsize::new(0));
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                count.fetch_add(1, SeqCst);
                let tx = tx.clone();
                let requests = Arc::clone(&requests);
                std::thread::spawn(move || serve(s, script, &requests, tx));
            }
        });
        Scripted {
            addr,
            accepts,
            closed,
        }
    }

    fn accepts(&self) -> usize {
        self.accepts.load(SeqCst)
    }
}

fn serve(
    mut s: TcpStream,
    script: fn(usize, &str) -> Vec<Step>,
    requests: &AtomicUsize,
    closed: mpsc::Sender<()>,
) {
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut buf = Vec::new();
    loop {
        let Some(end) = read_until(&mut s, &mut buf, b"\r\n\r\n") else {
            return;
        };
        let n = requests.fetch_add(1, SeqCst);
        let raw = String::from_utf8_lossy(&buf[..end]).into_owned();
        let head = raw.to_lowercase();
        buf.drain(..end);
        for step in script(n, &head) {
            match step {
                Step::ReadBody => read_body(&mut s, &mut buf, &head),
                Step::Send(b) => {
                    if s.write_all(&b).is_err() {
                        return;
                    }
                }
                Step::Pause(ms) => std::thread::sleep(Duration::from_millis(ms)),
                Step::Drain => {
                    let mut sink = [0u8; 65536];
                    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                }
                Step::EchoHead => {
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{raw}",
                        raw.len()
                    );
                    if s.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
                Step::Close => {
                    drop(s);
                    let _ = closed.send(());
                    return;
                }
            }
        }
    }
}

/// Read until `buf` holds `end`; the index just past it.
fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, end: &[u8]) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(end.len()).position(|w| w == end) {
            return Some(i + end.len());
        }
        let mut chunk = [0u8; 65536];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn read_body(s: &mut TcpStream, buf: &mut Vec<u8>, head: &str) {
    if head.contains("transfer-encoding: chunked") {
        if let Some(end) = read_until(s, buf, b"0\r\n\r\n") {
            buf.drain(..end);
        }
        return;
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < len {
        let mut chunk = [0u8; 65536];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.drain(..len);
}

fn ferry_for(up: &Scripted) -> Ferry {
    Ferry::start(&ferry_config(
        "",
        "",
        &format!(
            "[[upstream]]\nname = \"app\"\nread_timeout = \"10s\"\n\
             [[upstream.server]]\naddr = \"{}\"\n",
            up.addr
        ),
    ))
}

#[test]
fn chunked_bodies_split_anywhere_arrive_whole_and_the_connection_is_reused() {
    let up = Scripted::start(|_, _| {
        vec![
            Step::ReadBody,
            send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1"),
            Step::Pause(20),
            send(b"\r\nhel"),
            Step::Pause(20),
            send(b"lo\r"),
            Step::Pause(20),
            send(b"\n6\r\n world\r\n0\r\nX-Trailer: t\r\n"),
            Step::Pause(20),
            send(b"\r\n"),
        ]
    });
    let f = ferry_for(&up);
    let mut c = RawConn::connect(f.addr);
    for _ in 0..3 {
        let r = c.request("GET", "/", &[]);
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(r.text(), "hello world");
    }
    assert_eq!(up.accepts(), 1, "the upstream connection was not reused");
}

#[test]
fn a_body_read_to_the_close_arrives_whole_and_the_connection_is_not_reused() {
    let up = Scripted::start(|_, _| {
        vec![
            Step::ReadBody,
            send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nabc"),
            Step::Pause(30),
            send(b"def"),
            Step::Close,
        ]
    });
    let f = ferry_for(&up);
    let mut c = RawConn::connect(f.addr);
    for i in 1..=2 {
        let r = c.request("GET", "/", &[]);
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(r.text(), "abcdef");
        assert_eq!(up.accepts(), i);
    }
}

#[test]
fn interim_answers_are_skipped_and_the_reason_phrase_is_kept() {
    let up = Scripted::start(|_, _| {
        vec![
            Step::ReadBody,
            send(b"HTTP/1.1 100 Continue\r\n\r\n"),
            Step::Pause(20),
            send(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 Fine Thanks\r\n"),
            send(b"Content-Length: 2\r\n\r\nok"),
        ]
    });
    let f = ferry_for(&up);
    let mut c = RawConn::connect(f.addr);
    for _ in 0..2 {
        let r = c.request("GET", "/", &[]);
        assert!(
            r.head.starts_with("HTTP/1.1 200 Fine Thanks\n"),
            "{}",
            r.head
        );
        assert_eq!(r.text(), "ok");
    }
    assert_eq!(up.accepts(), 1);
}

#[test]
fn a_broken_chunk_cuts_the_response_and_the_next_request_gets_a_new_connection() {
    let up = Scripted::start(|n, _| {
        if n == 0 {
            vec![
                Step::ReadBody,
                send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"),
                Step::Drain,
            ]
        } else {
            vec![
                Step::ReadBody,
                send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood"),
            ]
        }
    });
    let f = ferry_for(&up);
    let mut c = RawConn::connect(f.addr);
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    let head = c.read_head();
    assert_eq!(head.status, 200, "{}", head.head);
    assert_eq!(c.read_chunk(), b"abc");
    assert!(
        c.wait_closed(Duration::from_secs(10)).is_some(),
        "the cut response did not close the client connection"
    );
    let mut c = RawConn::connect(f.addr);
    let r = c.request("GET", "/", &[]);
    assert_eq!((r.status, r.text().as_str()), (200, "good"), "{}", r.head);
    assert_eq!(
        up.accepts(),
        2,
        "a connection with a broken body was reused"
    );
}

#[test]
fn an_answer_before_the_upload_ends_reaches_the_client() {
    let up = Scripted::start(|_, _| {
        vec![
            send(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig!"),
            Step::Drain,
            Step::Close,
        ]
    });
    let f = ferry_for(&up);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("body");
    // Larger than `retry_buffer`: it streams, and ferry is still sending when
    // the answer comes.
    std::fs::write(&file, vec![b'x'; 1 << 20]).expect("write body");
    let (code, out, err) = curl(&[
        "-o",
        "-",
        "-w",
        " %{http_code}",
        "--data-binary",
        &format!("@{}", file.display()),
        &f.url("/upload"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "big! 413");
    assert!(
        up.closed.recv_timeout(Duration::from_secs(10)).is_ok(),
        "ferry kept the upstream connection of the unfinished upload"
    );
}

#[test]
fn head_answers_have_no_body_and_keep_the_connection() {
    let up = Scripted::start(|_, head| {
        if head.starts_with("head ") {
            vec![send(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n",
            )]
        } else {
            vec![send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")]
        }
    });
    let f = ferry_for(&up);
    let mut c = RawConn::connect(f.addr);
    let h = c.request("HEAD", "/", &[]);
    assert_eq!(h.status, 200, "{}", h.head);
    assert_eq!(h.header("content-length"), Some("1000"));
    let g = c.request("GET", "/", &[]);
    assert_eq!(g.text(), "get");
    assert!(c.pending().is_empty(), "stray bytes: {:?}", c.pending());
    assert_eq!(up.accepts(), 1);
}

#[test]
fn a_pooled_connection_the_upstream_closed_is_not_used() {
    // The first connection is closed by the upstream right after its answer
    // (without saying so); a POST, which is never sent twice, must go on a new
    // connection rather than fail on the dead one.
    let up = Scripted::start(|_, _| {
        vec![
            Step::ReadBody,
            send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            Step::Close,
        ]
    });
    let f = ferry_for(&up);
    let mut c = RawConn::connect(f.addr);
    let r = c.request("GET", "/", &[]);
    assert_eq!(r.text(), "ok");
    up.closed
        .recv_timeout(Duration::from_secs(10))
        .expect("the upstream closed its connection");
    c.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc");
    let r = c.read_response(false);
    assert_eq!((r.status, r.text().as_str()), (200, "ok"), "{}", r.head);
    assert_eq!(up.accepts(), 2);
}

#[test]
fn field_lines_go_whole_only_when_written_as_ferry_would() {
    // Fields written `name: value` with CRLF pass as whole lines; spacing of
    // another kind, a bare LF, a listed Content-Length or too many gaps left
    // by this hop's own fields have them written one by one, normalised, and
    // the head stays the same either way.
    const HEADS: [&[u8]; 5] = [
        b"HTTP/1.1 200 OK\r\nA: 1\r\nKeep-Alive: x\r\nB: 2\r\nDate: Tue, 01 Jan 2030 00:00:00 GMT\r\n\
          Content-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nA:1\r\nB:  2  \r\nDate: Tue, 01 Jan 2030 00:00:00 GMT\r\n\
          Content-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\nA: 1\nB: 2\nDate: Tue, 01 Jan 2030 00:00:00 GMT\nContent-Length: 2\n\nok",
        b"HTTP/1.1 200 OK\r\nA: 1\r\nKeep-Alive: x\r\nB: 2\r\nKeep-Alive: x\r\n\
          Date: Tue, 01 Jan 2030 00:00:00 GMT\r\nKeep-Alive: x\r\nConnection: keep-alive\r\n\
          Content-Length: 2\r\nKeep-Alive: x\r\nX-Last: z\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nA: 1\r\nContent-Length: 2, 2\r\n\r\nok",
    ];
    let up = Scripted::start(|n, _| vec![Step::ReadBody, send(HEADS[n.min(4)])]);
    let f = ferry_for(&up);
    let mut c = RawConn::connect(f.addr);
    for i in 0..4 {
        let r = c.request("GET", "/", &[]);
        assert_eq!(r.text(), "ok", "head {i}");
        assert!(
            r.head
                .contains("\nA: 1\nB: 2\nDate: Tue, 01 Jan 2030 00:00:00 GMT\n"),
            "head {i}: {}",
            r.head
        );
        for name in ["date", "content-length"] {
            let n = r.headers.iter().filter(|(k, _)| k == name).count();
            assert_eq!(n, 1, "head {i}: {name} once: {}", r.head);
        }
        assert!(
            !r.head.to_ascii_lowercase().contains("keep-alive"),
            "head {i}: {}",
            r.head
        );
        if i == 3 {
            assert_eq!(r.header("x-last"), Some("z"));
        }
    }
    // A listed Content-Length of one value frames the body; the client gets
    // one number.
    let r = c.request("GET", "/", &[]);
    assert_eq!(r.text(), "ok");
    assert_eq!(r.header("content-length"), Some("2"), "{}", r.head);
    assert_eq!(
        r.headers
            .iter()
            .filter(|(k, _)| k == "content-length")
            .count(),
        1,
        "{}",
        r.head
    );
}

#[test]
fn fields_pass_as_written_without_this_hops_own() {
    let up = Scripted::start(|_, _| {
        vec![
            Step::ReadBody,
            send(
                b"HTTP/1.1 200 OK\r\nX-Mixed-Case: v 1\r\nConnection: keep-alive\r\n\
                  Keep-Alive: timeout=5\r\nSet-Cookie: a=1\r\nContent-Length: 2\r\n\
                  Set-Cookie: b=2\r\n\r\nok",
            ),
        ]
    });
    let f = ferry_for(&up);
    let mut c = RawConn::connect(f.addr);
    // ferry's own loop writes the upstream's fields as they came, name case
    // and order kept; this hop's Connection and Keep-Alive stay behind.
    let r = c.request("GET", "/", &[]);
    assert_eq!(r.text(), "ok");
    assert!(
        r.head
            .contains("\nX-Mixed-Case: v 1\nSet-Cookie: a=1\nContent-Length: 2\nSet-Cookie: b=2\n"),
        "{}",
        r.head
    );
    assert!(
        !r.head.to_ascii_lowercase().contains("keep-alive"),
        "{}",
        r.head
    );
    // A request with a body goes through hyper's server, which writes from a
    // header map: the same fields, both cookies.
    c.send(b"POST / HTTP/1.1\r\nHost: ferry.test\r\nContent-Length: 3\r\n\r\nabc");
    let r = c.read_response(false);
    assert_eq!(r.text(), "ok");
    assert_eq!(r.header("x-mixed-case"), Some("v 1"));
    let cookies: Vec<&str> = r
        .headers
        .iter()
        .filter(|(k, _)| k == "set-cookie")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert!(
        !r.head.to_ascii_lowercase().contains("keep-alive"),
        "{}",
        r.head
    );
    assert_eq!(up.accepts(), 1);
}

#[test]
fn request_fields_go_upstream_as_written_without_this_hops_own() {
    let up = Scripted::start(|_, _| vec![Step::EchoHead]);
    let f = ferry_for(&up);
    let mut c = RawConn::connect(f.addr);
    // Read by ferry's own loop and passed on from where it lies: name case and
    // order kept, this hop's fields left behind, ferry's own added.
    c.send(
        b"GET /p?q=1 HTTP/1.1\r\nHost: Ferry.Test:8080\r\nX-Mixed-Case: a\r\n\
          Connection: keep-alive\r\nKeep-Alive: 300\r\nProxy-Connection: keep-alive\r\n\
          Proxy-Authorization: Basic eA==\r\nTrailer: X-C\r\nContent-Length: 0\r\n\
          Cookie: a=1\r\nAccept: */*\r\nCookie: b=2\r\n\r\n",
    );
    let r = c.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(
        r.text(),
        "GET /p?q=1 HTTP/1.1\r\nHost: Ferry.Test:8080\r\nX-Mixed-Case: a\r\n\
         Cookie: a=1\r\nAccept: */*\r\nCookie: b=2\r\n\
         x-forwarded-for: 127.0.0.1\r\nx-real-ip: 127.0.0.1\r\n\
         x-forwarded-proto: http\r\nx-forwarded-host: Ferry.Test:8080\r\n\
         content-length: 0\r\n\r\n"
    );
    // Fields the proxy rewrites (an incoming X-Forwarded-For, a Connection
    // naming another field) go through the header map: the chain is extended
    // and the named field dropped.
    c.send(
        b"GET /q HTTP/1.1\r\nHost: ferry.test\r\nX-Forwarded-For: 192.0.2.7\r\n\
          Connection: X-Drop\r\nX-Drop: 1\r\nX-Keep: 2\r\n\r\n",
    );
    let r = c.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head);
    let echo = r.text().to_ascii_lowercase();
    assert!(echo.starts_with("get /q http/1.1\r\n"), "{echo}");
    assert!(
        echo.contains("\r\nx-forwarded-for: 192.0.2.7, 127.0.0.1\r\n"),
        "{echo}"
    );
    assert!(echo.contains("\r\nx-keep: 2\r\n"), "{echo}");
    assert!(!echo.contains("x-drop"), "{echo}");
    assert!(!echo.contains("\r\nconnection:"), "{echo}");
    assert_eq!(up.accepts(), 1);
}
