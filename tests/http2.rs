//! HTTP/2 from clients: h2c with prior knowledge on a plain listener, with curl,
//! h2load and raw frames (limits, rapid reset, shutdown, stub_status).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;

/// curl with HTTP/2 prior knowledge, the body discarded: (exit code, what
/// `-w write_out` printed, stderr).
fn h2c_curl_out(url: &str, write_out: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        write_out,
    ];
    args.extend_from_slice(extra);
    args.push(url);
    curl(&args)
}

fn h2_ferry(server_extra: &str, b: &Backends) -> Ferry {
    Ferry::start(&ferry_config(
        server_extra,
        "",
        &upstream("app", &b.list.iter().collect::<Vec<_>>()),
    ))
}

// ---------------------------------------------------------------------------
// Raw HTTP/2 frames, enough to drive ferry where curl cannot.

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const CANCEL: u32 = 0x8;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A GET for `path` as an HPACK block of literals that never touch the dynamic
/// table (so blocks can be sent in any order).
fn get_block(path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86]; // :method GET, :scheme http
    for (idx, value) in [(4u8, path), (1u8, "ferry.test")] {
        // Literal without indexing, indexed name (:path, :authority).
        b.push(idx);
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
    }
    b
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// A raw HTTP/2 client connection.
struct H2Raw {
    s: TcpStream,
    buf: Vec<u8>,
    /// Answer PINGs (as real clients do).
    pong: bool,
}

impl H2Raw {
    /// Connect and send the preface and an empty SETTINGS.
    fn connect(addr: SocketAddr) -> H2Raw {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        s.write_all(&hello).expect("preface");
        H2Raw {
            s,
            buf: Vec::new(),
            pong: true,
        }
    }

    /// The next frame; `None` at EOF or a reset.
    fn next(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let n = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + n {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([
                            self.buf[5],
                            self.buf[6],
                            self.buf[7],
                            self.buf[8],
                        ]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + n].to_vec(),
                    };
                    self.buf.drain(..9 + n);
                    if f.kind == PING && f.flags & ACK == 0 && self.pong {
                        let _ = self.s.write_all(&frame(PING, ACK, 0, &f.payload));
                    }
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Read until the server's SETTINGS; ACK them; their (id, value) pairs.
    fn settings(&mut self) -> Vec<(u16, u32)> {
        loop {
            let f = self.next().expect("server SETTINGS");
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                self.s
                    .write_all(&frame(SETTINGS, ACK, 0, &[]))
                    .expect("ack");
                return f
                    .payload
                    .chunks(6)
                    .map(|c| {
                        (
                            u16::from_be_bytes([c[0], c[1]]),
                            u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                        )
                    })
                    .collect();
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes)
    }
}

fn error_code(f: &Frame) -> u32 {
    let at = if f.kind == GOAWAY { 4 } else { 0 };
    u32::from_be_bytes([
        f.payload[at],
        f.payload[at + 1],
        f.payload[at + 2],
        f.payload[at + 3],
    ])
}

/// One stub_status line's numbers (line index as in nginx's format).
fn stub_line(stub: &str, i: usize) -> Vec<u64> {
    stub.lines()
        .nth(i)
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// Reading, Writing, Waiting.
fn stub_rww(stub: &str) -> Vec<u64> {
    stub_line(stub, 3)
}

// ---------------------------------------------------------------------------

#[test]
fn curl_with_prior_knowledge_gets_http2() {
    let b = Backends::start(1);
    let f = h2_ferry("", &b);
    let (code, out, err) = curl(&[
        "--http2-prior-knowledge",
        "-i",
        &f.url("/echo?x=1"),
        "-H",
        "X-Custom: yes",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    // The backend saw an HTTP/1.1 request with the authority as Host.
    let lower = out.to_ascii_lowercase();
    assert!(lower.contains("x-custom: yes"), "{out}");
    assert!(
        lower.contains(&format!("host: {}", f.addr)),
        "Host from :authority: {out}"
    );
    // HTTP/1.1 still works on the same listener.
    let (st, body) = http_get(f.addr, "/", &[]);
    assert_eq!(st, 200);
    assert!(body.starts_with("hello from b1"), "{body}");
}

#[test]
fn request_body_and_big_response_through_h2() {
    let b = Backends::start(1);
    let f = h2_ferry("", &b);
    let body = "x".repeat(300_000);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body");
    std::fs::write(&file, &body).unwrap();
    let (code, out, err) = curl(&[
        "--http2-prior-knowledge",
        "--data-binary",
        &format!("@{}", file.display()),
        &f.url("/upload"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("body=300000"), "{out}");
    let (code, out, err) = h2c_curl_out(
        &f.url("/bytes/5000000"),
        "%{http_version} %{size_download}",
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "2 5000000");
}

#[test]
fn parallel_streams_share_one_connection() {
    let b = Backends::start(1);
    let f = h2_ferry("", &b);
    // nghttp sends all its URIs as concurrent streams of one connection (curl
    // 7.88 fails multiplexing with --http2-prior-knowledge, before any frame).
    let urls: Vec<String> = (0..20).map(|i| f.url(&format!("/p{i}"))).collect();
    let out = Command::new("nghttp")
        .arg("-nv")
        .args(&urls)
        .output()
        .expect("nghttp installed (nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches(":status: 200").count(), 20, "{text}");
    let stub = f.admin_get("/stub_status");
    assert_eq!(stub_accepts(&stub), 1, "one connection: {stub}");
    assert_eq!(stub_line(&stub, 2)[2], 20, "20 requests: {stub}");
    // curl with prior knowledge, one stream.
    let (code, out, err) = h2c_curl_out(&f.url("/"), "%{http_version} %{response_code}", &[]);
    assert_eq!((code, out.as_str()), (0, "2 200"), "{err}");
}

#[test]
fn h2load_all_requests_succeed() {
    let b = Backends::start(2);
    let f = h2_ferry("", &b);
    let out = Command::new("h2load")
        .args(["-n", "2000", "-c", "4", "-m", "10", &f.url("/")])
        .output()
        .expect("h2load installed (nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored"),
        "{text}"
    );
    assert!(text.contains("status codes: 2000 2xx"), "{text}");
    let served: u64 = b.list.iter().map(|x| x.served.load(Relaxed)).sum();
    assert_eq!(served, 2000);
    // Streams of four client connections ride the HTTP/1.1 upstream pool.
    let conns: u64 = b.list.iter().map(|x| x.connections.load(Relaxed)).sum();
    assert!(conns <= 4 * 10 + 2, "{conns} upstream connections");
}

#[test]
fn settings_carry_the_limits_and_excess_streams_are_refused() {
    let b = Backends::start(1);
    let f = h2_ferry(
        "http2_max_concurrent_streams = 4\nhttp2_max_header_size = \"8KiB\"",
        &b,
    );
    let mut c = H2Raw::connect(f.addr);
    let settings = c.settings();
    assert!(settings.contains(&(0x3, 4)), "{settings:?}");
    assert!(settings.contains(&(0x6, 8192)), "{settings:?}");
    // Wait for our ACK to be applied (the server answers a PING after it).
    c.send(&frame(PING, 0, 0, &[1; 8])).unwrap();
    while c
        .next()
        .is_some_and(|f| f.kind != PING || f.flags & ACK == 0)
    {}
    // Five streams held open (no END_STREAM): the fifth is refused.
    for i in 0..5u32 {
        let block = get_block("/hold");
        c.send(&frame(HEADERS, END_HEADERS, 2 * i + 1, &block))
            .unwrap();
    }
    let refused = loop {
        let f = c.next().expect("RST_STREAM for the fifth stream");
        if f.kind == RST_STREAM {
            break f;
        }
    };
    assert_eq!(refused.stream, 9);
    assert_eq!(error_code(&refused), REFUSED_STREAM);
    b.list[0].knobs.release.notify_waiters();
}

#[test]
fn header_list_over_the_limit_is_rejected() {
    let b = Backends::start(1);
    let f = h2_ferry("http2_max_header_size = \"16KiB\"", &b);
    let big = format!("X-Big: {}", "a".repeat(20_000));
    let (code, out, _) = h2c_curl_out(&f.url("/"), "%{response_code}", &["-H", &big]);
    // 431, as for an HTTP/1.1 head over its limit; the backend never sees it.
    assert_eq!((code, out.as_str()), (0, "431"));
    assert_eq!(b.list[0].served.load(Relaxed), 0);
    let small = format!("X-Big: {}", "a".repeat(10_000));
    let (code, out, err) = h2c_curl_out(&f.url("/"), "%{response_code}", &["-H", &small]);
    assert_eq!((code, out.as_str()), (0, "200"), "{err}");
}

#[test]
fn rapid_reset_flood_closes_the_connection() {
    let b = Backends::start(1);
    let f = h2_ferry("", &b);
    let mut c = H2Raw::connect(f.addr);
    c.settings();
    let streams = 10_000u32;
    let mut sent = 0u32;
    let block = get_block("/");
    'flood: for batch in 0..streams / 100 {
        let mut out = Vec::new();
        for i in 0..100 {
            let id = 2 * (batch * 100 + i) + 1;
            out.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &block));
            out.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
        }
        if c.send(&out).is_err() {
            break 'flood;
        }
        sent += 100;
    }
    // The connection ends with GOAWAY ENHANCE_YOUR_CALM (or is simply closed).
    let mut goaway = None;
    let start = Instant::now();
    while let Some(fr) = c.next() {
        if fr.kind == GOAWAY {
            goaway = Some(error_code(&fr));
        }
        assert!(start.elapsed() < DEADLINE, "connection still open");
    }
    assert_eq!(goaway, Some(ENHANCE_YOUR_CALM), "sent {sent} streams");
    let served = b.list[0].served.load(Relaxed);
    assert!(
        served < 200,
        "{served} requests reached the backend out of {sent} streams"
    );
    // Other clients are served as before.
    let (code, out, err) = h2c_curl_out(&f.url("/"), "%{http_version}", &[]);
    assert_eq!((code, out.as_str()), (0, "2"), "{err}");
    let (st, _) = http_get(f.addr, "/", &[]);
    assert_eq!(st, 200);
}

#[test]
fn paced_reset_flood_of_accepted_streams_closes_the_connection() {
    // Each batch of streams reaches the backend before its resets are sent, so
    // h2's pending-accept limit does not apply; ferry's own count of streams cut
    // short does.
    let b = Backends::start(1);
    let f = h2_ferry("", &b);
    let mut c = H2Raw::connect(f.addr);
    c.settings();
    let block = get_block("/hold");
    let mut opened = 0u32;
    let mut closed = false;
    for batch in 0..200u32 {
        let ids: Vec<u32> = (0..50).map(|i| 2 * (batch * 50 + i) + 1).collect();
        let mut out = Vec::new();
        for id in &ids {
            out.extend(frame(HEADERS, END_STREAM | END_HEADERS, *id, &block));
        }
        if c.send(&out).is_err() {
            closed = true;
            break;
        }
        opened += 50;
        let seen = u64::from(opened);
        if !wait_until(Duration::from_secs(5), || {
            b.list[0].served.load(Relaxed) >= seen
        }) {
            // ferry stopped passing streams on: the connection is being closed.
            closed = true;
            break;
        }
        let mut out = Vec::new();
        for id in &ids {
            out.extend(frame(RST_STREAM, 0, *id, &CANCEL.to_be_bytes()));
        }
        if c.send(&out).is_err() {
            closed = true;
            break;
        }
    }
    let start = Instant::now();
    while c.next().is_some() {
        assert!(start.elapsed() < DEADLINE, "connection still open");
    }
    assert!(
        closed || opened < 10_000,
        "all {opened} streams were accepted"
    );
    assert!(
        opened <= 500,
        "{opened} streams before the connection closed"
    );
    assert!(
        f.wait_log("resets most of its HTTP/2 streams", DEADLINE)
            .is_some()
    );
    // A well-behaved client on another connection is served.
    let (code, out, err) = h2c_curl_out(&f.url("/"), "%{http_version}", &[]);
    assert_eq!((code, out.as_str()), (0, "2"), "{err}");
}

#[test]
fn stub_status_counts_h2_streams_and_states() {
    let b = Backends::start(1);
    let f = h2_ferry("", &b);
    let mut c = H2Raw::connect(f.addr);
    c.settings();
    c.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &get_block("/hold"),
    ))
    .unwrap();
    // A stream in progress: the connection is Writing.
    assert!(
        wait_until(DEADLINE, || stub_rww(&f.admin_get("/stub_status"))
            == vec![0, 1, 0]),
        "{}",
        f.admin_get("/stub_status")
    );
    b.list[0].knobs.release.notify_one();
    // Read the whole response (DATA with END_STREAM).
    loop {
        let fr = c.next().expect("response");
        if fr.kind == DATA && fr.flags & END_STREAM != 0 && fr.stream == 1 {
            break;
        }
    }
    for id in [3u32, 5] {
        c.send(&frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            id,
            &get_block("/"),
        ))
        .unwrap();
    }
    let mut ended = 0;
    while ended < 2 {
        let fr = c.next().expect("responses");
        if fr.flags & END_STREAM != 0 && (fr.kind == DATA || fr.kind == HEADERS) {
            ended += 1;
        }
    }
    // Idle with no stream: Waiting; three streams are three requests.
    assert!(
        wait_until(DEADLINE, || stub_rww(&f.admin_get("/stub_status"))
            == vec![0, 0, 1]),
        "{}",
        f.admin_get("/stub_status")
    );
    let stub = f.admin_get("/stub_status");
    assert_eq!(stub_line(&stub, 2), vec![1, 1, 3], "{stub}");
}

#[test]
fn idle_h2_connection_gets_goaway_after_keepalive_timeout() {
    let b = Backends::start(1);
    let f = h2_ferry("keepalive_timeout = \"300ms\"", &b);
    let mut c = H2Raw::connect(f.addr);
    c.settings();
    c.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &get_block("/"),
    ))
    .unwrap();
    let start = Instant::now();
    let mut goaway = false;
    while let Some(fr) = c.next() {
        goaway |= fr.kind == GOAWAY;
    }
    assert!(goaway, "closed without GOAWAY");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn idle_h2_client_that_ignores_goaway_is_closed_anyway() {
    let b = Backends::start(1);
    let f = h2_ferry(
        "keepalive_timeout = \"300ms\"\nclient_header_timeout = \"1s\"",
        &b,
    );
    let mut c = H2Raw::connect(f.addr);
    c.pong = false;
    c.settings();
    c.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &get_block("/"),
    ))
    .unwrap();
    let start = Instant::now();
    while c.next().is_some() {}
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn h2_connection_without_a_stream_is_closed_after_client_header_timeout() {
    let b = Backends::start(1);
    let f = h2_ferry("client_header_timeout = \"300ms\"", &b);
    let mut c = H2Raw::connect(f.addr);
    c.settings();
    let start = Instant::now();
    while c.next().is_some() {}
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn shutdown_lets_an_h2_stream_in_flight_finish() {
    let b = Backends::start(1);
    let mut f = h2_ferry("", &b);
    let mut c = H2Raw::connect(f.addr);
    c.settings();
    c.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &get_block("/hold"),
    ))
    .unwrap();
    // The first part arrived: the stream is in flight.
    loop {
        let fr = c.next().expect("first part");
        if fr.kind == DATA {
            assert_eq!(fr.payload, b"first part\n");
            break;
        }
    }
    f.signal("TERM");
    // GOAWAY first, then the rest of the stream.
    let mut goaway = false;
    let mut rest = Vec::new();
    let mut released = false;
    let mut ended = false;
    while let Some(fr) = c.next() {
        if fr.kind == GOAWAY {
            goaway = true;
            if !released {
                b.list[0].knobs.release.notify_waiters();
                released = true;
            }
        }
        if fr.kind == DATA && fr.stream == 1 {
            rest.extend_from_slice(&fr.payload);
            if fr.flags & END_STREAM != 0 {
                ended = true;
            }
        }
    }
    assert!(goaway, "no GOAWAY");
    assert!(ended, "stream did not finish");
    assert_eq!(rest, b"second part\n");
    assert_eq!(f.wait_exit(DEADLINE), Some(0));
}

#[test]
fn http2_off_leaves_h2c_unanswered() {
    let b = Backends::start(1);
    let f = h2_ferry("http2 = false", &b);
    let (code, _, _) = curl(&["--http2-prior-knowledge", &f.url("/")]);
    assert_ne!(code, 0);
    let (st, _) = http_get(f.addr, "/", &[]);
    assert_eq!(st, 200);
}

#[test]
fn access_log_shows_the_h2_request_line_as_nginx_does() {
    let b = Backends::start(1);
    let f = Ferry::start(&ferry_config(
        "",
        "access = \"stdout\"",
        &upstream("app", &b.list.iter().collect::<Vec<_>>()),
    ));
    let (code, _, err) = curl(&[
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        &f.url("/logged?q=1"),
    ]);
    assert_eq!(code, 0, "{err}");
    let line = f.wait_log("/logged", DEADLINE).expect("access log line");
    assert!(line.contains("\"GET /logged?q=1 HTTP/2.0\" 200"), "{line}");
}

/// A `[tls]` listener with a certificate for `h2.test` from a fresh CA, over
/// these backends, with `server_extra` in `[server]`; ferry, its TLS address
/// and the CA file.
fn tls_h2_ferry(
    dir: &std::path::Path,
    server_extra: &str,
    b: &Backends,
) -> (Ferry, SocketAddr, std::path::PathBuf) {
    let ca = Ca::new("ferry test CA");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write ca");
    let files = ca.leaf(&["h2.test"]).write(dir, "h2");
    let cfg = format!(
        "{}\n{}",
        ferry_config(
            server_extra,
            "",
            &upstream("app", &b.list.iter().collect::<Vec<_>>())
        ),
        tls_section(&[files])
    );
    let f = Ferry::start(&cfg);
    let addr = tls_addr(&f);
    (f, addr, ca_file)
}

#[test]
fn http2_over_tls_with_curl_and_h2load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = Backends::start(2);
    let (f, addr, ca) = tls_h2_ferry(dir.path(), "", &b);
    // curl offers h2 and http/1.1 by ALPN and gets HTTP/2.
    let (code, out, err) = curl_https(addr, "h2.test", &ca, "/echo", &["-v", "-i", "--http2"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("ALPN: server accepted h2"), "{err}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.contains("x-forwarded-proto: https"), "{out}");
    // h2load over TLS: 2,000 requests, 10 streams at a time on each of 4
    // connections, all answered, on a few upstream connections.
    let out = Command::new("h2load")
        .args(["-n", "2000", "-c", "4", "-m", "10"])
        .arg(format!("https://127.0.0.1:{}/", addr.port()))
        .output()
        .expect("h2load installed (nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Application protocol: h2"), "{text}");
    assert!(
        text.contains("2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored"),
        "{text}"
    );
    let conns: u64 = b.list.iter().map(|x| x.connections.load(Relaxed)).sum();
    assert!(conns <= 4 * 10 + 2, "{conns} upstream connections");
    // The TLS connections are all counted out again.
    assert!(
        wait_until(DEADLINE, || stub_active(&f.admin_get("/stub_status")) == 0),
        "{}",
        f.admin_get("/stub_status")
    );
}

#[test]
fn http2_off_keeps_tls_clients_on_http1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = Backends::start(1);
    let (_f, addr, ca) = tls_h2_ferry(dir.path(), "http2 = false", &b);
    let (code, out, err) = curl_https(addr, "h2.test", &ca, "/", &["-v", "-i", "--http2"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("ALPN: server accepted http/1.1"), "{err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}
