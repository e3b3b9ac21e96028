//! End-to-end: the runtime API on the admin listener. Listing upstreams and
//! peers; drain (in-flight requests finish, no new ones), undrain, down, up, each
//! visible in `/status` and `ferry_upstream_peer_state`; the bearer token; 404s
//! that say what exists; API state surviving a reload; and the README's
//! zero-downtime deploy recipe (drain, wait for in-flight 0, redeploy, undrain)
//! run under load without a failed request.
mod common;
use common::*;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use serde_json::Value;

const TOKEN: &str = "s3cret-token";

/// A request on the admin listener; (status, head, body).
fn admin(f: &Ferry, method: &str, path: &str, token: Option<&str>) -> (u16, String, String) {
    let mut c = RawConn::connect(f.admin.expect("admin listener"));
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let r = c.request(method, path, &headers);
    (r.status, r.head.clone(), r.text())
}

/// `POST` a peer action with the token; the JSON answer (must be 200).
fn act(f: &Ferry, upstream: &str, peer: SocketAddr, action: &str) -> Value {
    let path = format!("/api/upstreams/{upstream}/peers/{peer}/{action}");
    let (st, _, body) = admin(f, "POST", &path, Some(TOKEN));
    assert_eq!(st, 200, "{path}: {body}");
    serde_json::from_str(&body).expect("JSON answer")
}

fn status(f: &Ferry) -> Value {
    serde_json::from_str(&f.admin_get("/status")).expect("/status is JSON")
}

fn peer(doc: &Value, up: &str, addr: SocketAddr) -> Value {
    doc["upstreams"]
        .as_array()
        .and_then(|a| a.iter().find(|u| u["name"] == up))
        .and_then(|u| u["peers"].as_array())
        .and_then(|a| a.iter().find(|p| p["addr"] == addr.to_string()))
        .cloned()
        .unwrap_or_else(|| panic!("no peer {addr} in {up}: {doc}"))
}

/// The peer's state as `/status` and the metrics report it; they must agree.
fn state(f: &Ferry, addr: SocketAddr) -> String {
    let s = peer(&status(f), "app", addr)["state"]
        .as_str()
        .expect("state")
        .to_owned();
    let series =
        format!("ferry_upstream_peer_state{{upstream=\"app\",peer=\"{addr}\",state=\"{s}\"}}");
    assert_eq!(f.metric(&series), 1.0, "{series} should be 1");
    s
}

fn with_token(cfg: String) -> String {
    cfg.replace(
        "listen = \"127.0.0.1:0\"\n",
        &format!("listen = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"),
    )
}

/// Send `n` requests to `/`; how many each backend answered (by name b1, b2 ...).
fn spread(f: &Ferry, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for _ in 0..n {
        let (st, body) = http_get(f.addr, "/", &[]);
        assert_eq!(st, 200, "{body}");
        let name = body.split_whitespace().nth(2).unwrap_or("?").to_owned();
        *out.entry(name).or_insert(0) += 1;
    }
    out
}

#[test]
fn lists_upstreams_and_peers() {
    let b = Backends::start(3);
    let cfg = ferry_config(
        "",
        "",
        &(upstream("app", &[b.get(0), b.get(1)])
            + &upstream("api", &[b.get(2)])
            + &route("*", "/", "app")
            + &route("*", "/api/", "api")),
    );
    let f = Ferry::start(&with_token(cfg));
    // Reading needs no token.
    let (st, head, body) = admin(&f, "GET", "/api/upstreams", None);
    assert_eq!(st, 200, "{body}");
    assert!(
        head.to_ascii_lowercase().contains("application/json"),
        "{head}"
    );
    let doc: Value = serde_json::from_str(&body).expect("JSON");
    let ups = doc["upstreams"].as_array().expect("upstreams");
    assert_eq!(ups.len(), 2);
    assert_eq!(ups[0]["name"], "app");
    assert_eq!(ups[0]["strategy"], "RoundRobin");
    let addrs: Vec<&str> = ups[0]["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter_map(|p| p["addr"].as_str())
        .collect();
    assert_eq!(
        addrs,
        [b.get(0).addr.to_string(), b.get(1).addr.to_string()]
    );
    let p = &ups[0]["peers"][0];
    for key in [
        "state",
        "up",
        "down",
        "draining",
        "weight",
        "in_flight",
        "requests",
        "health_check",
    ] {
        assert!(!p[key].is_null(), "peer lacks {key}: {p}");
    }
    assert_eq!(p["state"], "up");
    assert_eq!(p["draining"], false);
    assert_eq!(p["down"], false);

    let (st, _, body) = admin(&f, "GET", "/api/upstreams/api", None);
    assert_eq!(st, 200, "{body}");
    let api: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(api["name"], "api");
    assert_eq!(api["peers"][0]["addr"], b.get(2).addr.to_string());

    let (st, _, body) = admin(&f, "GET", "/api/upstreams/nope", None);
    assert_eq!(st, 404, "{body}");
    assert!(
        body.contains("no upstream named \\\"nope\\\" (upstreams: app, api)"),
        "{body}"
    );
}

#[test]
fn drain_finishes_in_flight_and_sends_nothing_new_then_undrain() {
    let b = Backends::start(2);
    let f = Ferry::start(&with_token(config("", &b.servers(""))));
    // A request in flight: `/hold` answers a first chunk, then waits.
    let mut held = RawConn::connect(f.addr);
    held.send(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(held.read_head().status, 200);
    assert_eq!(held.read_chunk(), b"first part\n");
    let (busy, other) = if b.get(0).served.load(Relaxed) == 1 {
        (0, 1)
    } else {
        (1, 0)
    };
    let addr = b.get(busy).addr;
    assert_eq!(peer(&status(&f), "app", addr)["in_flight"], 1);

    let answer = act(&f, "app", addr, "drain");
    assert_eq!(answer["action"], "drain");
    assert_eq!(answer["peers"][0]["addr"], addr.to_string());
    assert_eq!(answer["peers"][0]["state"], "draining");
    assert_eq!(state(&f, addr), "draining");
    assert_eq!(
        f.metric(&format!(
            "ferry_upstream_peer_up{{upstream=\"app\",peer=\"{addr}\"}}"
        )),
        0.0
    );
    assert!(f.wait_log("admin API: peer changed", DEADLINE).is_some());

    // Nothing new reaches the draining peer...
    let served = b.get(busy).served.load(Relaxed);
    let got = spread(&f, 10);
    assert_eq!(got.get(&format!("b{}", other + 1)), Some(&10), "{got:?}");
    assert_eq!(b.get(busy).served.load(Relaxed), served);
    // ...while its request in flight finishes.
    assert_eq!(peer(&status(&f), "app", addr)["in_flight"], 1);
    b.get(busy).knobs.release.notify_one();
    assert_eq!(held.read_chunk(), b"second part\n");
    assert!(held.read_chunk().is_empty());
    assert!(wait_until(
        DEADLINE,
        || peer(&status(&f), "app", addr)["in_flight"] == 0
    ));
    let series = format!("ferry_upstream_in_flight{{upstream=\"app\",peer=\"{addr}\"}}");
    assert_eq!(f.metric(&series), 0.0);

    let answer = act(&f, "app", addr, "undrain");
    assert_eq!(answer["peers"][0]["state"], "up");
    assert_eq!(state(&f, addr), "up");
    let got = spread(&f, 10);
    assert_eq!(got.len(), 2, "both peers serve again: {got:?}");
}

#[test]
fn down_and_up() {
    let b = Backends::start(2);
    let f = Ferry::start(&with_token(config("", &b.servers(""))));
    let addr = b.get(0).addr;
    let answer = act(&f, "app", addr, "down");
    assert_eq!(answer["peers"][0]["down"], true);
    assert_eq!(state(&f, addr), "down");
    let got = spread(&f, 10);
    assert_eq!(got.get("b2"), Some(&10), "{got:?}");
    // Repeating a call is harmless.
    act(&f, "app", addr, "down");
    act(&f, "app", addr, "up");
    assert_eq!(state(&f, addr), "up");
    assert_eq!(peer(&status(&f), "app", addr)["down"], false);
    let got = spread(&f, 10);
    assert!(got.get("b1").is_some_and(|n| *n >= 4), "{got:?}");
}

#[test]
fn mutating_calls_need_the_token() {
    let b = Backends::start(1);
    let f = Ferry::start(&with_token(config("", &b.servers(""))));
    let addr = b.get(0).addr;
    let drain = format!("/api/upstreams/app/peers/{addr}/drain");
    for (path, token) in [
        (drain.as_str(), None),
        (drain.as_str(), Some("wrong")),
        (drain.as_str(), Some("s3cret-toke")),
        ("/reload", None),
        ("/reload", Some("wrong")),
    ] {
        let (st, head, body) = admin(&f, "POST", path, token);
        assert_eq!(st, 401, "{path} with {token:?}: {body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{head}"
        );
        assert!(body.contains("token"), "{body}");
    }
    // Also unknown targets answer 401 without the token: nothing is revealed.
    let (st, _, _) = admin(&f, "POST", "/api/upstreams/nope/peers/x/drain", None);
    assert_eq!(st, 401);
    // Nothing changed.
    assert_eq!(state(&f, addr), "up");
    assert_eq!(f.metric("ferry_config_reloads_total{result=\"ok\"}"), 0.0);
    // Reading stays open.
    for path in [
        "/status",
        "/metrics",
        "/api/upstreams",
        "/healthz",
        "/stub_status",
    ] {
        assert_eq!(admin(&f, "GET", path, None).0, 200, "{path}");
    }
    // With the token, both work; the scheme is case-insensitive.
    let (st, _, body) = admin(&f, "POST", &drain, Some(TOKEN));
    assert_eq!(st, 200, "{body}");
    assert_eq!(state(&f, addr), "draining");
    let mut c = RawConn::connect(f.admin.expect("admin"));
    let auth = format!("bearer {TOKEN}");
    let r = c.request("POST", "/reload", &[("Authorization", auth.as_str())]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(f.metric("ferry_config_reloads_total{result=\"ok\"}"), 1.0);
}

#[test]
fn unknown_upstream_peer_or_action_is_404_and_wrong_methods_405() {
    let b = Backends::start(2);
    let f = Ferry::start(&with_token(config("", &b.servers(""))));
    let (a1, a2) = (b.get(0).addr, b.get(1).addr);
    let cases = [
        (
            format!("/api/upstreams/nope/peers/{a1}/drain"),
            "no upstream named \\\"nope\\\" (upstreams: app)".to_owned(),
        ),
        (
            "/api/upstreams/app/peers/127.0.0.1:1/drain".to_owned(),
            format!("upstream \\\"app\\\" has no peer \\\"127.0.0.1:1\\\" (peers: {a1}, {a2})"),
        ),
        (
            format!("/api/upstreams/app/peers/{a1}/explode"),
            "unknown action \\\"explode\\\": use drain, undrain, down or up".to_owned(),
        ),
    ];
    for (path, want) in cases {
        let (st, _, body) = admin(&f, "POST", &path, Some(TOKEN));
        assert_eq!(st, 404, "{path}: {body}");
        assert!(body.contains(&want), "{path}: {body}");
    }
    assert_eq!(admin(&f, "POST", "/api/nothing", Some(TOKEN)).0, 404);
    let (st, head, _) = admin(
        &f,
        "GET",
        &format!("/api/upstreams/app/peers/{a1}/drain"),
        None,
    );
    assert_eq!(st, 405);
    assert!(head.to_ascii_lowercase().contains("allow: post"), "{head}");
    assert_eq!(admin(&f, "GET", "/reload", None).0, 405);
    let (st, head, _) = admin(&f, "POST", "/status", Some(TOKEN));
    assert_eq!(st, 405);
    assert!(
        head.to_ascii_lowercase().contains("allow: get, head"),
        "{head}"
    );
    // Nothing changed.
    assert_eq!(state(&f, a1), "up");
    assert_eq!(state(&f, a2), "up");
}

#[test]
fn api_state_survives_a_reload() {
    let b = Backends::start(3);
    let (a1, a2, a3) = (b.get(0).addr, b.get(1).addr, b.get(2).addr);
    let file = |w1: u32, down3: bool| {
        with_token(config(
            "",
            &format!(
                "[[upstream.server]]\naddr = \"{a1}\"\nweight = {w1}\n\n\
                 [[upstream.server]]\naddr = \"{a2}\"\n\n\
                 [[upstream.server]]\naddr = \"{a3}\"\ndown = {down3}\n"
            ),
        ))
    };
    let f = Ferry::start(&file(1, true));
    assert_eq!(state(&f, a3), "down");
    act(&f, "app", a1, "drain");
    act(&f, "app", a2, "down");
    act(&f, "app", a3, "up");
    let reload = |cfg: String| {
        std::fs::write(&f.config, cfg).expect("write");
        let (st, _, body) = admin(&f, "POST", "/reload", Some(TOKEN));
        assert_eq!(st, 200, "{body}");
    };

    // The same file: every peer object is re-used, so nothing moves.
    reload(file(1, true));
    assert_eq!(state(&f, a1), "draining");
    assert_eq!(state(&f, a2), "down");
    assert_eq!(
        state(&f, a3),
        "up",
        "the API's `up` outlives a reload of an unchanged file"
    );

    // b1's weight changes (a new peer object): the drain carries over.
    reload(file(2, true));
    assert_eq!(peer(&status(&f), "app", a1)["weight"], 2);
    assert_eq!(state(&f, a1), "draining");
    assert_eq!(state(&f, a2), "down");
    let got = spread(&f, 6);
    assert_eq!(got.get("b3"), Some(&6), "{got:?}");

    // The file changes b3's `down`: the file wins.
    reload(file(2, false));
    assert_eq!(state(&f, a3), "up");
    reload(file(2, true));
    assert_eq!(state(&f, a3), "down");
}

#[test]
fn the_zero_downtime_deploy_recipe_drops_nothing_under_load() {
    let b = Backends::start(2);
    let f = Ferry::start(&with_token(config("", &b.servers(""))));
    let url = f.url("/");
    let load = std::thread::spawn(move || wrk(&url, 8, 6));
    for i in 0..2 {
        let addr = b.get(i).addr;
        let before = b.get(i).served.load(Relaxed);
        assert!(wait_until(DEADLINE, || b.get(i).served.load(Relaxed) > before + 100));
        // 1. Drain; 2. wait until nothing is in flight to it.
        act(&f, "app", addr, "drain");
        assert!(wait_until(
            DEADLINE,
            || peer(&status(&f), "app", addr)["in_flight"] == 0
        ));
        let series = format!("ferry_upstream_in_flight{{upstream=\"app\",peer=\"{addr}\"}}");
        assert_eq!(f.metric(&series), 0.0);
        // 3. Deploy: the old process goes away, the new one comes up on the same port.
        b.rt.block_on(b.get(i).restart())
            .unwrap_or_else(|e| panic!("restart {addr}: {e}"));
        // 4. Undrain.
        act(&f, "app", addr, "undrain");
        let after = b.get(i).served.load(Relaxed);
        assert!(
            wait_until(DEADLINE, || b.get(i).served.load(Relaxed) > after + 100),
            "the redeployed peer gets traffic again"
        );
    }
    let report = load.join().expect("wrk thread");
    println!("deploy under load: {} requests", report.requests);
    assert_eq!(report.non_2xx, 0, "{}", report.output);
    assert_eq!(report.socket_errors, 0, "{}", report.output);
}
