//! End-to-end HTTP/1.1 semantics through a real ferry: bodies stream both ways,
//! hop-by-hop headers stay on their hop, X-Forwarded-* are set, 100-continue,
//! bodiless responses keep the connection usable, WebSocket upgrades tunnel.
mod common;
use common::*;

use std::sync::atomic::Ordering::Relaxed;

/// A file of `n` bytes in `dir`.
fn body_file(dir: &std::path::Path, n: usize) -> String {
    let path = dir.join(format!("body-{n}"));
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, data).expect("write body file");
    path.display().to_string()
}

#[test]
fn request_bodies_arrive_whole_with_content_length_and_chunked() {
    let (b, f) = one_backend("client_max_body_size = \"64MiB\"");
    let n = 20 * 1024 * 1024;
    let file = format!("@{}", body_file(f.dir.path(), n));

    let (code, out, err) = curl(&["--data-binary", &file, &f.url("/upload")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("body={n}")), "{out}");
    assert_eq!(b.get(0).received.load(Relaxed), n as u64);

    let (code, out, err) = curl(&[
        "--data-binary",
        &file,
        "-H",
        "Transfer-Encoding: chunked",
        &f.url("/upload"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("body={n}")), "{out}");
    assert_eq!(b.get(0).received.load(Relaxed), 2 * n as u64);
}

#[test]
fn a_chunked_request_body_is_forwarded_before_it_ends() {
    let (b, f) = one_backend("");
    let mut c = RawConn::connect(f.addr);
    let first = vec![b'a'; 1000];
    c.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    c.send(format!("{:x}\r\n", first.len()).as_bytes());
    c.send(&first);
    c.send(b"\r\n");
    // The backend sees the first chunk while the client has not finished.
    let received = &b.get(0).received;
    assert!(
        wait_until(DEADLINE, || received.load(Relaxed) >= 1000),
        "the first chunk did not reach the backend before the body ended: {}",
        received.load(Relaxed)
    );
    c.send(b"5\r\nhello\r\n0\r\n\r\n");
    let r = c.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(r.text().contains("body=1005"), "{}", r.text());
}

#[test]
fn a_response_body_streams_before_the_backend_finishes() {
    let (b, f) = one_backend("");
    let mut c = RawConn::connect(f.addr);
    c.send(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n");
    let head = c.read_head();
    assert_eq!(head.status, 200, "{}", head.head);
    assert_eq!(
        head.header("transfer-encoding"),
        Some("chunked"),
        "{}",
        head.head
    );
    // The first chunk arrives while the backend still holds the rest back.
    assert_eq!(c.read_chunk(), b"first part\n");
    b.get(0).knobs.release.notify_one();
    assert_eq!(c.read_chunk(), b"second part\n");
    assert_eq!(c.read_chunk(), b"");
}

#[test]
fn large_response_bodies_arrive_whole() {
    let (_b, f) = one_backend("");
    let n = 30 * 1024 * 1024;
    let (code, out, err) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        &f.url(&format!("/bytes/{n}")),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("200 {n}"));
}

#[test]
fn hop_by_hop_request_headers_are_not_forwarded() {
    let (_b, f) = one_backend("");
    let mut c = RawConn::connect(f.addr);
    let r = c.request(
        "GET",
        "/echo",
        &[
            ("Connection", "keep-alive, X-Drop-Me"),
            ("X-Drop-Me", "secret"),
            ("Keep-Alive", "timeout=300"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Upgrade", "h2c"),
            ("X-Keep-Me", "yes"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.head);
    let echo = r.text().to_ascii_lowercase();
    for gone in [
        "connection:",
        "x-drop-me:",
        "keep-alive:",
        "proxy-connection:",
        "proxy-authorization:",
        "te:",
        "trailer:",
        "upgrade:",
    ] {
        assert!(
            !echo.lines().any(|l| l.starts_with(gone)),
            "{gone} was forwarded:\n{echo}"
        );
    }
    assert!(echo.contains("\nx-keep-me: yes\n"), "{echo}");
    // The connection is still good for another request.
    let again = c.request("GET", "/echo", &[]);
    assert_eq!(again.status, 200);
}

#[test]
fn hop_by_hop_response_headers_are_not_returned() {
    let (b, f) = one_backend("");
    *b.get(0).knobs.extra_headers.lock().unwrap() = vec![
        ("Connection".into(), "X-Backend-Hop".into()),
        ("X-Backend-Hop".into(), "1".into()),
        ("Keep-Alive".into(), "timeout=5, max=100".into()),
        ("Proxy-Connection".into(), "keep-alive".into()),
        ("Proxy-Authenticate".into(), "Basic".into()),
        ("Trailer".into(), "X-Checksum".into()),
        ("Upgrade".into(), "h2c".into()),
        ("X-End-To-End".into(), "kept".into()),
    ];
    let mut c = RawConn::connect(f.addr);
    let r = c.request("GET", "/", &[]);
    assert_eq!(r.status, 200, "{}", r.head);
    for gone in [
        "x-backend-hop",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "trailer",
        "upgrade",
    ] {
        assert!(r.header(gone).is_none(), "{gone} came back:\n{}", r.head);
    }
    if let Some(conn) = r.header("connection") {
        assert!(
            !conn.to_ascii_lowercase().contains("x-backend-hop"),
            "{}",
            r.head
        );
    }
    assert_eq!(r.header("x-end-to-end"), Some("kept"), "{}", r.head);
    assert!(r.text().starts_with("hello from b1"), "{}", r.text());
    // Still usable: the backend's Connection header did not leak into ours.
    assert_eq!(c.request("GET", "/", &[]).status, 200);
}

#[test]
fn forwarded_headers_are_set_and_host_passes_through() {
    let (_b, f) = one_backend("");
    let mut c = RawConn::connect(f.addr);
    c.send(
        b"GET /echo?a=1 HTTP/1.1\r\nHost: shop.example.test:8443\r\n\
          X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 198.51.100.2\r\n\
          X-Forwarded-Proto: https\r\nX-Real-IP: 10.9.9.9\r\n\r\n",
    );
    let r = c.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head);
    let echo = r.text();
    let get = |name: &str| -> Vec<String> {
        echo.lines()
            .filter_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(str::to_owned)
            .collect()
    };
    assert!(echo.starts_with("GET /echo?a=1 HTTP/1.1\n"), "{echo}");
    assert_eq!(get("host"), ["shop.example.test:8443"], "{echo}");
    assert_eq!(
        get("x-forwarded-for"),
        ["203.0.113.7, 198.51.100.2, 127.0.0.1"],
        "{echo}"
    );
    assert_eq!(get("x-forwarded-proto"), ["http"], "{echo}");
    assert_eq!(
        get("x-forwarded-host"),
        ["shop.example.test:8443"],
        "{echo}"
    );
    assert_eq!(get("x-real-ip"), ["127.0.0.1"], "{echo}");

    // Without an incoming X-Forwarded-For, ferry starts one.
    let r = c.request("GET", "/echo", &[]);
    assert!(
        r.text().contains("\nx-forwarded-for: 127.0.0.1\n"),
        "{}",
        r.text()
    );
}

#[test]
fn expect_100_continue_works_end_to_end() {
    let (b, f) = one_backend("");
    let n = 200_000;
    let file = format!("@{}", body_file(f.dir.path(), n));
    let (code, out, err) = curl(&[
        "-v",
        "--expect100-timeout",
        "15",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &file,
        &f.url("/upload"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("HTTP/1.1 100 Continue"),
        "no 100 Continue:\n{err}"
    );
    assert!(err.contains("HTTP/1.1 200"), "{err}");
    assert!(out.contains(&format!("body={n}")), "{out}");
    assert_eq!(b.get(0).received.load(Relaxed), n as u64);
}

#[test]
fn head_204_and_304_have_no_body_and_keep_the_connection() {
    let (_b, f) = one_backend("");
    let before = stub_accepts(&f.admin_get("/stub_status"));
    let mut c = RawConn::connect(f.addr);

    let head = c.request("HEAD", "/bytes/5000", &[]);
    assert_eq!(head.status, 200, "{}", head.head);
    assert_eq!(head.header("content-length"), Some("5000"), "{}", head.head);
    let r204 = c.request("GET", "/status/204", &[]);
    assert_eq!(r204.status, 204, "{}", r204.head);
    let r304 = c.request("GET", "/status/304", &[("If-None-Match", "\"v1\"")]);
    assert_eq!(r304.status, 304, "{}", r304.head);
    // A body after any of them would show up here as garbage before this answer.
    let last = c.request("GET", "/echo", &[]);
    assert_eq!(last.status, 200, "{}", last.head);
    assert!(
        last.text().starts_with("GET /echo HTTP/1.1"),
        "{}",
        last.text()
    );
    assert!(c.pending().is_empty(), "stray bytes: {:?}", c.pending());

    // All four on one client connection.
    let after = stub_accepts(&f.admin_get("/stub_status"));
    assert_eq!(after - before, 1);

    // curl agrees: two URLs, one connection.
    let (code, _out, err) = curl(&["-v", &f.url("/status/204"), &f.url("/status/304")]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("Re-using existing connection"), "{err}");
    let (code, out, err) = curl(&["-I", &f.url("/bytes/5000")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[test]
fn websocket_upgrade_tunnels_bytes_both_ways() {
    let (_b, f) = one_backend("");
    let mut c = RawConn::connect(f.addr);
    c.send(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    let head = c.read_head();
    assert_eq!(head.status, 101, "{}", head.head);
    assert!(
        head.header("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "{}",
        head.head
    );
    for msg in [&b"hello over the tunnel"[..], &[0u8, 1, 2, 255, 254][..]] {
        c.send(msg);
        assert_eq!(c.read_bytes(msg.len()), msg);
    }
    // A large write comes back whole as well.
    let big: Vec<u8> = (0..300_000).map(|i| (i % 256) as u8).collect();
    let mut w = c.s.try_clone().expect("clone");
    let sent = big.clone();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        w.write_all(&sent).expect("write");
    });
    assert_eq!(c.read_bytes(big.len()), big);
    writer.join().expect("writer");
}

#[test]
fn an_upgrade_the_backend_declines_is_a_normal_exchange() {
    let (_b, f) = one_backend("");
    let mut c = RawConn::connect(f.addr);
    let r = c.request(
        "GET",
        "/echo",
        &[
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.head);
    // The backend saw the upgrade asked for ...
    assert!(r.text().contains("\nupgrade: websocket\n"), "{}", r.text());
    // ... declined it, and the connection goes on as plain HTTP/1.1.
    let again = c.request("GET", "/echo", &[]);
    assert_eq!(again.status, 200, "{}", again.head);
    assert!(!again.text().contains("upgrade:"), "{}", again.text());
}
