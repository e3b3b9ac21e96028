//! End-to-end: what clients get when peers refuse, hang or fail, and nginx's
//! retry (`next_upstream`) and passive-health (`max_fails`) rules.
mod common;
use common::*;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// One request through curl, guarded by `--max-time 10`: (status, body, elapsed).
fn request(extra: &[&str], url: &str) -> (u16, String, Duration) {
    let mut args = vec!["--max-time", "10", "-w", "\n%{http_code}"];
    args.extend_from_slice(extra);
    args.push(url);
    let (code, out, err, took) = curl_timed(&args);
    assert_eq!(code, 0, "curl {args:?} failed after {took:?}: {err}");
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", &out));
    (status.trim().parse().unwrap_or(0), body.to_string(), took)
}

fn get(url: &str) -> (u16, String, Duration) {
    request(&[], url)
}

fn post(url: &str, data: &str) -> (u16, String, Duration) {
    request(&["--data-binary", data], url)
}

/// `[[upstream.server]]` for an address, with extra keys.
fn server(addr: std::net::SocketAddr, extra: &str) -> String {
    format!("[[upstream.server]]\naddr = \"{addr}\"\n{extra}\n")
}

/// A refused connection sends an idempotent request on to the next peer.
#[test]
fn refused_connection_passes_get_to_the_next_peer() {
    let b = Backends::start(1);
    let dead = closed_port();
    // The refusing peer is listed first, so round-robin tries it first.
    let f = Ferry::start(&config(
        "strategy = \"round_robin\"\nconnect_timeout = \"5s\"",
        &(server(dead, "") + &server(b.get(0).addr, "")),
    ));
    let (status, body, took) = get(&f.url("/"));
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("hello from b1"), "{body}");
    assert!(took < Duration::from_secs(2), "the retry took {took:?}");
    let dead_label = format!("peer=\"{dead}\"");
    assert!(
        f.metric_sum(
            "ferry_upstream_fails_total",
            &[&dead_label, "reason=\"connect\""]
        ) > 0.0,
        "the refused connect is counted"
    );
    assert_eq!(f.metric_sum("ferry_upstream_retries_total", &[]), 1.0);
    for _ in 0..5 {
        assert_eq!(get(&f.url("/")).0, 200);
    }
    assert_eq!(b.get(0).served.load(Relaxed), 6);
}

/// No reachable peer: 502 at once (a refused connect does not wait for
/// connect_timeout), with a short body.
#[test]
fn no_reachable_peer_answers_502_quickly() {
    let (d1, d2) = (closed_port(), closed_port());
    let f = Ferry::start(&config(
        "connect_timeout = \"5s\"",
        &(server(d1, "") + &server(d2, "")),
    ));
    // First: both peers are tried and refuse. Second: both are now failed (max_fails = 1):
    // "no live upstreams", and nginx's reset lets the third try them again.
    for round in 0..3 {
        let (status, body, took) = get(&f.url("/"));
        assert_eq!(status, 502, "round {round}: {body}");
        assert!(body.contains("502"), "round {round}: {body:?}");
        assert!(
            body.len() < 100,
            "round {round}: a short body, not {} bytes",
            body.len()
        );
        assert!(
            took < Duration::from_secs(1),
            "round {round}: 502 after {took:?} (connect_timeout is 5s)"
        );
    }
    assert!(f.metric_sum("ferry_upstream_fails_total", &["reason=\"connect\""]) >= 4.0);
    assert_eq!(
        f.metric_sum("ferry_http_requests_total", &["code=\"502\""]),
        3.0
    );
    // POST gets the same answer: a refused connect sent nothing.
    let (status, _, took) = post(&f.url("/"), "x");
    assert_eq!(status, 502);
    assert!(took < Duration::from_secs(1), "{took:?}");
}

/// A read_timeout longer than the client timeouts, whose timer the connection's
/// loop also serves: the 504 comes after read_timeout, neither at the first
/// tick of the client timer nor later.
#[test]
fn read_timeout_longer_than_client_timeouts() {
    let b = Backends::start(1);
    b.get(0).knobs.hang.store(1, Relaxed);
    let cfg = config("read_timeout = \"1500ms\"", &b.servers("")).replace(
        "workers = 1\n",
        "workers = 1\nclient_header_timeout = \"400ms\"\nkeepalive_timeout = \"400ms\"\n",
    );
    let f = Ferry::start(&cfg);
    let (status, body, took) = get(&f.url("/"));
    assert_eq!(status, 504, "{body}");
    assert!(
        took >= Duration::from_millis(1450) && took < Duration::from_secs(4),
        "504 after {took:?}, read_timeout = 1500ms"
    );
}

/// A peer that accepts but never answers: 504 after read_timeout, not later.
#[test]
fn hanging_peer_answers_504_after_read_timeout() {
    let b = Backends::start(1);
    b.get(0).knobs.hang.store(1, Relaxed);
    let f = Ferry::start(&config("read_timeout = \"1s\"", &b.servers("")));
    for send in [get as fn(&str) -> (u16, String, Duration), |u: &str| {
        post(u, "body")
    }] {
        let (status, body, took) = send(&f.url("/"));
        assert_eq!(status, 504, "{body}");
        assert!(body.contains("504"), "{body:?}");
        assert!(
            took >= Duration::from_millis(950) && took < Duration::from_secs(3),
            "504 after {took:?}, read_timeout = 1s"
        );
    }
    assert_eq!(
        f.metric_sum("ferry_upstream_fails_total", &["reason=\"timeout\""]),
        2.0
    );
    assert_eq!(
        f.metric_sum("ferry_http_requests_total", &["code=\"504\""]),
        2.0
    );
    assert_eq!(f.metric_sum("ferry_upstream_retries_total", &[]), 0.0);
}

/// Two peers, one hanging: GET times out on it and is passed to the other
/// (default next_upstream = ["error", "timeout"]); a POST that was sent is not.
#[test]
fn timeout_passes_get_to_the_next_peer_but_not_a_sent_post() {
    let b = Backends::start(2);
    b.get(0).knobs.hang.store(1, Relaxed);
    // max_fails = 0: the hanging peer stays in rotation, so POSTs reach it too.
    let f = Ferry::start(&config(
        "strategy = \"round_robin\"\nread_timeout = \"1s\"",
        &b.servers("max_fails = 0"),
    ));
    // Round-robin starts with the first peer: the hanging one.
    let (status, body, took) = get(&f.url("/"));
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("hello from b2"), "{body}");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(3),
        "GET answered after {took:?}"
    );
    assert_eq!(f.metric_sum("ferry_upstream_retries_total", &[]), 1.0);

    // POSTs alternate between the peers; one sent to the hanging peer gets 504.
    // Both with a body and without one: an empty POST could be replayed, so
    // only the method keeps it from the next peer.
    let (mut ok, mut ok_bytes) = (0, 0);
    for data in [Some("order=1"), None] {
        let mut timed_out = false;
        for _ in 0..3 {
            let (status, body, took) = match data {
                Some(d) => post(&f.url("/"), d),
                None => request(&["-X", "POST"], &f.url("/")),
            };
            match status {
                504 => {
                    timed_out = true;
                    assert!(
                        took >= Duration::from_millis(950) && took < Duration::from_secs(3),
                        "POST 504 after {took:?}"
                    );
                    break;
                }
                200 => {
                    ok += 1;
                    ok_bytes += data.map_or(0, str::len) as u64;
                    assert!(body.starts_with("hello from b2"), "{body}");
                }
                _ => panic!("POST {data:?}: {status} {body}"),
            }
        }
        assert!(timed_out, "no POST {data:?} reached the hanging peer");
    }
    assert_eq!(
        f.metric_sum("ferry_upstream_retries_total", &[]),
        1.0,
        "a sent POST is not passed to the next peer"
    );
    assert_eq!(b.get(1).served.load(Relaxed), 1 + ok);
    assert_eq!(b.get(1).received.load(Relaxed), ok_bytes);
}

/// nginx's passive health: with max_fails = 1 a refusing peer is left out for
/// fail_timeout after its first failure.
#[test]
fn failed_peer_is_skipped_for_fail_timeout() {
    let b = Backends::start(1);
    let dead = closed_port();
    let f = Ferry::start(&config(
        "strategy = \"round_robin\"",
        &(server(dead, "max_fails = 1\nfail_timeout = \"10s\"")
            + &server(b.get(0).addr, "max_fails = 1\nfail_timeout = \"10s\"")),
    ));
    let dead_label = format!("peer=\"{dead}\"");
    let connect_fails = || {
        f.metric_sum(
            "ferry_upstream_fails_total",
            &[&dead_label, "reason=\"connect\""],
        )
    };
    assert_eq!(get(&f.url("/")).0, 200);
    assert_eq!(connect_fails(), 1.0);
    assert_eq!(f.metric_sum("ferry_upstream_peer_up", &[&dead_label]), 0.0);
    for i in 0..20 {
        let (status, body, _) = get(&f.url("/"));
        assert_eq!(status, 200, "request {i}: {body}");
    }
    assert_eq!(
        connect_fails(),
        1.0,
        "the failed peer was tried again within fail_timeout"
    );
    assert_eq!(f.metric_sum("ferry_upstream_retries_total", &[]), 1.0);
    assert_eq!(b.get(0).served.load(Relaxed), 21);
}

/// A listener whose accept queue is full and never drained: the kernel drops
/// further SYNs, so a connect to it neither succeeds nor fails (a black hole).
fn black_hole() -> (
    Vec<std::net::TcpStream>,
    socket2::Socket,
    std::net::SocketAddr,
) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
    s.bind(&any.into()).expect("bind");
    s.listen(0).expect("listen");
    let addr = s.local_addr().expect("addr").as_socket().expect("inet");
    // Fill the accept queue (backlog 0 still queues one or two connections).
    let mut fill = Vec::new();
    for _ in 0..8 {
        let probe = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        match probe.connect_timeout(&addr.into(), Duration::from_millis(200)) {
            Ok(()) => fill.push(probe.into()),
            Err(_) => return (fill, s, addr),
        }
    }
    panic!("the accept queue of {addr} does not fill up");
}

/// connect_timeout: a peer that does not complete the TCP handshake gets 504
/// after connect_timeout; a second peer gets the request instead.
#[test]
fn connect_timeout_answers_504_or_passes_to_the_next_peer() {
    let (_fill, _listener, hole) = black_hole();
    let f = Ferry::start(&config("connect_timeout = \"1s\"", &server(hole, "")));
    let (status, body, took) = get(&f.url("/"));
    assert_eq!(status, 504, "{body}");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(3),
        "504 after {took:?}, connect_timeout = 1s"
    );
    assert_eq!(
        f.metric_sum("ferry_upstream_fails_total", &["reason=\"timeout\""]),
        1.0
    );
    drop(f);

    // With a live second peer, even a POST goes on: nothing was sent.
    let b = Backends::start(1);
    let f = Ferry::start(&config(
        "strategy = \"round_robin\"\nconnect_timeout = \"1s\"",
        &(server(hole, "") + &server(b.get(0).addr, "")),
    ));
    let (status, body, took) = post(&f.url("/"), "data");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("hello from b1"), "{body}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(f.metric_sum("ferry_upstream_retries_total", &[]), 1.0);
    assert_eq!(b.get(0).received.load(Relaxed), 4);
}

/// A peer that sends the response head and then stalls the body: the client's
/// response is cut after read_timeout (the head already went out, so no retry
/// and no 504), and the upstream connection is not pooled.
#[test]
fn body_stall_is_cut_after_read_timeout() {
    let b = Backends::start(2);
    let f = Ferry::start(&config(
        "strategy = \"round_robin\"\nread_timeout = \"1s\"",
        &b.servers("max_fails = 0"),
    ));
    let (code, out, err, took) =
        curl_timed(&["--max-time", "10", "-w", "\n%{http_code}", &f.url("/hold")]);
    assert_ne!(code, 0, "the cut response looks complete to curl: {out}");
    assert_ne!(
        code, 28,
        "curl's --max-time fired, not ferry's read_timeout: {err}"
    );
    assert!(out.starts_with("first part\n"), "{out:?}");
    assert!(out.ends_with("\n200"), "{out:?}");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(3),
        "cut after {took:?}, read_timeout = 1s"
    );
    assert_eq!(f.metric_sum("ferry_upstream_retries_total", &[]), 0.0);
    assert_eq!(
        b.get(0).served.load(Relaxed) + b.get(1).served.load(Relaxed),
        1
    );
    // The stalled upstream connection was dropped, not kept for reuse.
    assert!(
        wait_until(DEADLINE, || b.get(0).open.load(Relaxed)
            + b.get(1).open.load(Relaxed)
            == 0),
        "the stalled upstream connection is still open"
    );
}
