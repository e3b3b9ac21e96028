//! End-to-end: reloading the configuration (SIGHUP and `POST /reload`) under
//! load drops nothing; peers that stay keep their state and pool; requests in
//! flight finish on the old configuration; listeners come and go without a
//! restart; an invalid file (or an address that cannot be bound) changes nothing
//! and is counted as an error.
mod common;
use common::*;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use serde_json::Value;

/// `POST` on the admin listener with an optional bearer token; (status, body).
fn admin_post(f: &Ferry, path: &str, token: Option<&str>) -> (u16, String) {
    let mut c = RawConn::connect(f.admin.expect("admin listener"));
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let r = c.request("POST", path, &headers);
    (r.status, r.text())
}

/// `/status` as JSON.
fn status(f: &Ferry) -> Value {
    serde_json::from_str(&f.admin_get("/status")).expect("/status is JSON")
}

/// The `/status` entry of the peer at `addr` in upstream `up`.
fn peer(doc: &Value, up: &str, addr: SocketAddr) -> Option<Value> {
    doc["upstreams"]
        .as_array()?
        .iter()
        .find(|u| u["name"] == up)?["peers"]
        .as_array()?
        .iter()
        .find(|p| p["addr"] == addr.to_string())
        .cloned()
}

fn reloads(f: &Ferry, result: &str) -> f64 {
    f.metric(&format!(
        "ferry_config_reloads_total{{result=\"{result}\"}}"
    ))
}

/// Replace the config file, send SIGHUP and wait until the reload is counted.
fn sighup_reload(f: &Ferry, cfg: &str) {
    let before = reloads(f, "ok");
    std::fs::write(&f.config, cfg).expect("write config");
    f.signal("HUP");
    assert!(
        wait_until(DEADLINE, || reloads(f, "ok") > before),
        "the reload was not applied: {:?}",
        f.logs.lock().unwrap()
    );
}

/// A config over `servers` (`(backend address, weight)`), `workers` workers.
fn weighted(workers: usize, servers: &[(SocketAddr, u32)]) -> String {
    let list: String = servers
        .iter()
        .map(|(a, w)| format!("[[upstream.server]]\naddr = \"{a}\"\nweight = {w}\n\n"))
        .collect();
    config("", &list).replace("workers = 1\n", &format!("workers = {workers}\n"))
}

#[test]
fn twenty_reloads_under_load_drop_no_request() {
    let b = Backends::start(3);
    let (a1, a2, a3) = (b.get(0).addr, b.get(1).addr, b.get(2).addr);
    // b1 is the same in both files, so its peer (state, pool) must carry over;
    // b2 changes weight; b3 comes and goes.
    let one = weighted(2, &[(a1, 1), (a2, 1)]);
    let two = weighted(2, &[(a1, 1), (a2, 3), (a3, 1)]);
    let f = Ferry::start(&one);
    let url = f.url("/");
    let load = std::thread::spawn(move || {
        let started = Instant::now();
        let report = wrk(&url, 16, 8);
        (report, started.elapsed())
    });
    let t = Instant::now();
    assert!(
        wait_until(DEADLINE, || b.get(0).served.load(Relaxed) > 200),
        "the load did not start"
    );
    let mut b1_requests = 0;
    for i in 0..20 {
        let cfg = if i % 2 == 0 { &two } else { &one };
        if i % 4 < 2 {
            sighup_reload(&f, cfg);
        } else {
            std::fs::write(&f.config, cfg).expect("write config");
            let (st, body) = admin_post(&f, "/reload", None);
            assert_eq!(st, 200, "{body}");
            assert!(body.contains("configuration reloaded"), "{body}");
        }
        // b1's peer is never replaced: its request count only grows.
        let doc = status(&f);
        let p1 = peer(&doc, "app", a1).expect("b1 stays");
        let n = p1["requests"].as_u64().expect("requests");
        assert!(
            n >= b1_requests,
            "b1's counters restarted: {n} < {b1_requests}"
        );
        b1_requests = n;
        assert_eq!(peer(&doc, "app", a3).is_some(), i % 2 == 0, "{doc}");
        // Let some traffic pass on each configuration.
        let served = b.get(0).served.load(Relaxed);
        assert!(wait_until(DEADLINE, || b.get(0).served.load(Relaxed) > served + 20));
    }
    let reloading = t.elapsed();
    let (report, ran) = load.join().expect("wrk thread");
    println!(
        "20 reloads in {reloading:?} during {ran:?} of load: {} requests, b1 {} b2 {} b3 {}",
        report.requests,
        b.get(0).served.load(Relaxed),
        b.get(1).served.load(Relaxed),
        b.get(2).served.load(Relaxed)
    );
    assert!(
        reloading < ran,
        "the reloads ({reloading:?}) outlasted the load ({ran:?}): make wrk run longer"
    );
    assert_eq!(report.non_2xx, 0, "{}", report.output);
    assert_eq!(report.socket_errors, 0, "{}", report.output);
    assert_eq!(reloads(&f, "ok"), 20.0);
    assert_eq!(reloads(&f, "error"), 0.0);
    // The added peer took traffic while it was configured.
    assert!(b.get(2).served.load(Relaxed) > 0);
    // b1's pooled connections survived the reloads: it was not reconnected to
    // for every configuration (16 client connections, 2 workers).
    let doc = status(&f);
    let connects = peer(&doc, "app", a1).expect("b1")["connects"]
        .as_u64()
        .expect("connects");
    assert!(
        connects <= 40,
        "b1 was connected to {connects} times across 20 reloads"
    );
}

#[test]
fn an_invalid_file_keeps_the_running_config_and_counts_an_error() {
    let b = Backends::start(2);
    let good = config("", &b.servers(""));
    let f = Ferry::start(&good);
    assert_eq!(http_get(f.addr, "/", &[]).0, 200);
    // Line 7, column 10: weight = 0.
    let bad = "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[[upstream]]\nname = \"app\"\n[[upstream.server]]\nweight = 0\naddr = \"127.0.0.1:1\"\n";
    std::fs::write(&f.config, bad).expect("write");
    let place = format!("{}:7:10", f.config.display());

    f.signal("HUP");
    let line = f
        .wait_log("reload failed", DEADLINE)
        .unwrap_or_else(|| panic!("no error logged: {:?}", f.logs.lock().unwrap()));
    assert!(line.contains(&place), "{line}");
    assert!(line.contains("weight must be at least 1"), "{line}");
    assert!(wait_until(DEADLINE, || reloads(&f, "error") == 1.0));

    let (st, body) = admin_post(&f, "/reload", None);
    assert_eq!(st, 400, "{body}");
    assert!(body.contains(&place) && body.contains("weight"), "{body}");
    assert!(body.contains("unchanged"), "{body}");
    assert_eq!(reloads(&f, "error"), 2.0);
    assert_eq!(reloads(&f, "ok"), 0.0);

    // Still the old configuration: both backends, nothing else.
    for _ in 0..4 {
        let (st, body) = http_get(f.addr, "/", &[]);
        assert_eq!(st, 200, "{body}");
    }
    assert!(b.get(0).served.load(Relaxed) >= 2 && b.get(1).served.load(Relaxed) >= 2);
    let doc = status(&f);
    assert!(peer(&doc, "app", b.get(0).addr).is_some(), "{doc}");

    // A missing file is an error too, naming the file.
    std::fs::remove_file(&f.config).expect("rm");
    let (st, body) = admin_post(&f, "/reload", None);
    assert_eq!(st, 400, "{body}");
    assert!(body.contains(&f.config.display().to_string()), "{body}");

    // Fixed, it applies.
    std::fs::write(&f.config, good.replace("[log]", "[log]\n# edited")).expect("write");
    let (st, body) = admin_post(&f, "/reload", None);
    assert_eq!(st, 200, "{body}");
    assert_eq!(reloads(&f, "ok"), 1.0);
    assert_eq!(http_get(f.addr, "/", &[]).0, 200);
}

#[test]
fn a_listen_address_that_cannot_be_bound_changes_nothing() {
    let b = Backends::start(1);
    let cfg = config("", &b.servers(""));
    let f = Ferry::start(&cfg);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr");
    // A second listener on a taken port, and a new peer: neither may apply.
    let b2 = Backends::start(1);
    let new = config("", &(b.servers("") + &b2.servers(""))).replace(
        "[\"127.0.0.1:0\"]",
        &format!("[\"127.0.0.1:0\", \"{taken_addr}\"]"),
    );
    std::fs::write(&f.config, new).expect("write");
    let (st, body) = admin_post(&f, "/reload", None);
    assert_eq!(st, 400, "{body}");
    assert!(
        body.contains(&format!("cannot listen on {taken_addr}")),
        "{body}"
    );
    assert_eq!(reloads(&f, "error"), 1.0);
    let doc = status(&f);
    assert!(peer(&doc, "app", b2.get(0).addr).is_none(), "{doc}");
    assert_eq!(doc["listeners"].as_array().map(Vec::len), Some(1), "{doc}");
    assert_eq!(http_get(f.addr, "/", &[]).0, 200);
    drop(taken);
}

#[test]
fn a_request_in_flight_finishes_on_the_old_config() {
    let b = Backends::start(2);
    let (a1, a2) = (b.get(0).addr, b.get(1).addr);
    let f = Ferry::start(&weighted(1, &[(a1, 1)]));
    // `/hold` sends a first chunk, then waits for the backend's release knob.
    let mut held = RawConn::connect(f.addr);
    held.send(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n");
    let head = held.read_head();
    assert_eq!(head.status, 200);
    assert_eq!(held.read_chunk(), b"first part\n");

    // The new configuration no longer has b1.
    sighup_reload(&f, &weighted(1, &[(a2, 1)]));
    let doc = status(&f);
    assert!(peer(&doc, "app", a1).is_none(), "{doc}");
    let (st, body) = http_get(f.addr, "/", &[]);
    assert_eq!(st, 200);
    assert!(body.starts_with("hello from b2"), "{body}");

    // The held request still completes, from b1.
    b.get(0).knobs.release.notify_one();
    assert_eq!(held.read_chunk(), b"second part\n");
    assert!(held.read_chunk().is_empty(), "the body ends properly");
    // And its keep-alive connection now goes to the new configuration.
    let r = held.request("GET", "/", &[]);
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("hello from b2"), "{}", r.text());
}

#[test]
fn listeners_are_added_and_removed_without_a_restart() {
    let b = Backends::start(1);
    let cfg = config("", &b.servers("")).replace("workers = 1\n", "workers = 2\n");
    let f = Ferry::start(&cfg);
    let first = f.addr;

    // Add a second listener (any free port), keeping the first by its bound address.
    let two = cfg.replace(
        "[\"127.0.0.1:0\"]",
        &format!("[\"{first}\", \"127.0.0.1:0\"]"),
    );
    sighup_reload(&f, &two);
    let listeners: Vec<SocketAddr> = status(&f)["listeners"]
        .as_array()
        .expect("listeners in /status")
        .iter()
        .filter_map(|v| v.as_str()?.parse().ok())
        .collect();
    assert_eq!(listeners.len(), 2, "{listeners:?}");
    assert_eq!(listeners[0], first);
    let second = listeners[1];
    assert!(
        f.wait_log(&format!("listening addr={second}"), DEADLINE)
            .is_some()
    );
    // Both serve, over many connections (so both workers' sockets answer).
    for addr in [first, second] {
        for _ in 0..20 {
            let (st, body) = http_get(addr, "/", &[]);
            assert_eq!(st, 200, "{addr}: {body}");
        }
    }

    // A request in progress on the first listener, then the first is removed.
    let mut held = RawConn::connect(first);
    held.send(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(held.read_head().status, 200);
    assert_eq!(held.read_chunk(), b"first part\n");
    let only_second = cfg.replace("[\"127.0.0.1:0\"]", &format!("[\"{second}\"]"));
    sighup_reload(&f, &only_second);
    assert!(
        wait_until(DEADLINE, || std::net::TcpStream::connect(first).is_err()),
        "{first} still accepts after it was removed"
    );
    assert!(
        f.wait_log(
            &format!("stopped listening; open connections finish addr={first}"),
            DEADLINE
        )
        .is_some()
    );
    assert_eq!(http_get(second, "/", &[]).0, 200);
    // The open connection on the removed listener finishes its request, and
    // even serves the next one.
    b.get(0).knobs.release.notify_one();
    assert_eq!(held.read_chunk(), b"second part\n");
    assert!(held.read_chunk().is_empty());
    assert_eq!(held.request("GET", "/", &[]).status, 200);
    let doc = status(&f);
    assert_eq!(doc["listeners"], serde_json::json!([second.to_string()]));
}

/// Threads of process `pid`.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

#[test]
fn with_one_worker_a_reload_stuck_on_its_file_does_not_stall_proxying() {
    let b = Backends::start(1);
    let cfg = config("", &b.servers(""));
    let f = Ferry::start(&cfg);
    // One worker: one thread proxies and runs the signals, admin and reloads.
    assert_eq!(threads(f.child.id()), 1);
    // The config file becomes a FIFO: reading it blocks until a writer comes.
    std::fs::remove_file(&f.config).expect("remove config");
    let made = std::process::Command::new("mkfifo")
        .arg(&f.config)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    f.signal("HUP");
    assert!(
        f.wait_log("SIGHUP: reloading", DEADLINE).is_some(),
        "{:?}",
        f.logs.lock().unwrap()
    );
    // The reload waits on the file; requests and the admin API go on.
    for _ in 0..20 {
        let (st, body) = http_get(f.addr, "/", &[]);
        assert_eq!(st, 200, "{body}");
    }
    assert_eq!(reloads(&f, "ok"), 0.0);
    // A writer comes: the reload reads the file and applies it.
    std::fs::write(&f.config, &cfg).expect("write the FIFO");
    assert!(
        wait_until(DEADLINE, || reloads(&f, "ok") == 1.0),
        "{:?}",
        f.logs.lock().unwrap()
    );
    assert_eq!(http_get(f.addr, "/", &[]).0, 200);
}
