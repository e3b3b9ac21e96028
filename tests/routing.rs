//! End-to-end routing: `[[route]]` by exact host, `*.suffix` and `*`, the longest
//! path prefix wins, and a request no route takes gets ferry's own 404.
mod common;
use common::*;

use std::sync::atomic::Ordering::Relaxed;

/// Three backends b1, b2, b3, each the only server of upstream a, b, c.
fn three() -> (Backends, String) {
    let b = Backends::start(3);
    let ups =
        upstream("a", &[b.get(0)]) + &upstream("b", &[b.get(1)]) + &upstream("c", &[b.get(2)]);
    (b, ups)
}

/// GET `target` with this Host header; (status, body).
fn get(f: &Ferry, host: &str, target: &str) -> (u16, String) {
    let req = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    parse_response(&raw_exchange(f.addr, req.as_bytes()))
}

/// Which backend answered GET `target` with this Host: "b1", "b2" ... or the status.
fn who(f: &Ferry, host: &str, target: &str) -> String {
    let (status, body) = get(f, host, target);
    match body.strip_prefix("hello from ") {
        Some(rest) if status == 200 => rest.split_whitespace().next().unwrap_or("").to_owned(),
        _ => format!("{status}"),
    }
}

#[test]
fn exact_host_beats_suffix_beats_wildcard() {
    let (_b, ups) = three();
    let routes = route("api.example.test", "/", "a")
        + &route("*.example.test", "/", "b")
        + &route("*", "/", "c");
    let f = Ferry::start(&ferry_config("", "", &(ups + &routes)));

    assert_eq!(who(&f, "api.example.test", "/"), "b1");
    assert_eq!(who(&f, "api.example.test:8080", "/x"), "b1", "port ignored");
    assert_eq!(who(&f, "API.Example.TEST", "/"), "b1", "case ignored");
    assert_eq!(
        who(&f, "api.example.test.", "/"),
        "b1",
        "trailing dot ignored"
    );
    assert_eq!(who(&f, "www.example.test", "/"), "b2");
    assert_eq!(who(&f, "a.b.example.test:443", "/"), "b2");
    assert_eq!(
        who(&f, "example.test", "/"),
        "b3",
        "*.example.test needs a label before"
    );
    assert_eq!(who(&f, "notexample.test", "/"), "b3");
    assert_eq!(who(&f, "other.test", "/"), "b3");
    // An absolute-form target names the host, as in nginx.
    assert_eq!(who(&f, "other.test", "http://api.example.test/x"), "b1");
}

#[test]
fn longest_path_prefix_wins() {
    let (_b, ups) = three();
    let routes = route("*", "/", "a") + &route("*", "/api/", "b") + &route("*", "/api/v2/", "c");
    let f = Ferry::start(&ferry_config("", "", &(ups + &routes)));

    assert_eq!(who(&f, "x.test", "/"), "b1");
    assert_eq!(who(&f, "x.test", "/apix"), "b1");
    assert_eq!(who(&f, "x.test", "/api"), "b1");
    assert_eq!(who(&f, "x.test", "/api/"), "b2");
    assert_eq!(who(&f, "x.test", "/api/users?id=3"), "b2");
    assert_eq!(who(&f, "x.test", "/api/v2"), "b2");
    assert_eq!(who(&f, "x.test", "/api/v2/users"), "b3");
}

#[test]
fn host_and_path_combine() {
    let (_b, ups) = three();
    // Listed in an order unlike their precedence, to show file order does not matter.
    let routes = route("*", "/static/", "c")
        + &route("*.example.test", "/", "b")
        + &route("shop.example.test", "/admin/", "c")
        + &route("shop.example.test", "/", "a");
    let f = Ferry::start(&ferry_config("", "", &(ups + &routes)));

    assert_eq!(who(&f, "shop.example.test", "/cart"), "b1");
    assert_eq!(who(&f, "shop.example.test", "/admin/users"), "b3");
    assert_eq!(who(&f, "www.example.test", "/admin/users"), "b2");
    assert_eq!(who(&f, "other.test", "/static/app.js"), "b3");
}

#[test]
fn ipv6_literal_host_routes() {
    let (_b, ups) = three();
    let routes = route("[::1]", "/", "a") + &route("127.0.0.1", "/", "b") + &route("*", "/", "c");
    let f = Ferry::start(&ferry_config("", "", &(ups + &routes)));

    assert_eq!(who(&f, "[::1]:8080", "/"), "b1");
    assert_eq!(who(&f, "[::1]", "/"), "b1");
    assert_eq!(who(&f, "127.0.0.1:8080", "/"), "b2");
    assert_eq!(who(&f, "[::2]", "/"), "b3");
}

#[test]
fn no_route_is_a_404_from_ferry() {
    let (b, ups) = three();
    let routes = route("api.example.test", "/", "a") + &route("*.example.test", "/v1/", "b");
    let f = Ferry::start(&ferry_config("", "", &(ups + &routes)));

    for (host, path) in [
        ("other.test", "/"),
        ("www.example.test", "/"),
        ("www.example.test", "/v2/x"),
    ] {
        let (status, body) = get(&f, host, path);
        assert_eq!(status, 404, "{host}{path}: {body}");
        assert_eq!(body, "404 Not Found: no route\n", "{host}{path}");
    }
    // A request with no Host at all (HTTP/1.0) is not routed either.
    let (status, body) = parse_response(&raw_exchange(f.addr, b"GET / HTTP/1.0\r\n\r\n"));
    assert_eq!((status, body.as_str()), (404, "404 Not Found: no route\n"));

    assert_eq!(who(&f, "www.example.test", "/v1/x"), "b2");
    // Only the routed request reached a backend.
    let served: Vec<u64> = b.list.iter().map(|b| b.served.load(Relaxed)).collect();
    assert_eq!(served, [0, 1, 0]);
}

#[test]
fn ferrys_own_errors_keep_a_bodyless_connection_alive() {
    let b = Backends::start(1);
    let dead = closed_port();
    let cfg = ferry_config(
        "",
        "",
        &(upstream("a", &[&b.list[0]])
            + &format!("[[upstream]]\nname = \"dead\"\n[[upstream.server]]\naddr = \"{dead}\"\n")
            + &route("ferry.test", "/a", "a")
            + &route("ferry.test", "/dead", "dead")),
    );
    let f = Ferry::start(&cfg);
    let mut c = RawConn::connect(f.addr);
    // 404 (no route), then 502 (refused), then a 200 — all on one connection,
    // as nginx keeps it: nothing of a request body is left unread.
    let r = c.request("GET", "/nowhere", &[]);
    assert_eq!(r.status, 404);
    assert_ne!(r.header("connection"), Some("close"));
    let r = c.request("GET", "/dead", &[]);
    assert_eq!(r.status, 502);
    assert_ne!(r.header("connection"), Some("close"));
    let r = c.request("GET", "/a", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(stub_accepts(&f.admin_get("/stub_status")), 1);
}
