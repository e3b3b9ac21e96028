//! End-to-end: DNS discovery against a DNS server started by the test (a small
//! hand-written UDP responder for A queries, on 127.0.0.1) whose answers change
//! while a load runs. Backends listen on 127.0.0.2, .3, .4 with one port, so an
//! A record picks a backend. Checks: traffic follows the answers with no failed
//! request; vanished addresses drain; a failing name keeps its last good set; a
//! TTL shorter than `resolve_interval` is honoured; a name that does not resolve
//! at start joins once it does.
mod common;
use common::*;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry::demo::Backend;
use serde_json::Value;

/// What the DNS server answers to every A query.
#[derive(Debug, Clone)]
enum Answer {
    /// These addresses, with this TTL (seconds).
    Addrs(Vec<Ipv4Addr>, u32),
    /// SERVFAIL.
    Fail,
}

/// A DNS server on 127.0.0.1 answering A queries for any name from `answer`
/// (AAAA and other types get an empty NOERROR answer).
struct DnsServer {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    /// A queries answered.
    queries: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DnsServer {
    fn start(answer: Answer) -> DnsServer {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind dns");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let addr = sock.local_addr().expect("addr");
        let answer = Arc::new(Mutex::new(answer));
        let queries = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (answer, queries, stop) =
                (Arc::clone(&answer), Arc::clone(&queries), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Relaxed) {
                    let Ok((n, from)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let now = answer.lock().unwrap().clone();
                    if let Some((reply, is_a)) = respond(&buf[..n], &now) {
                        if is_a {
                            queries.fetch_add(1, Relaxed);
                        }
                        let _ = sock.send_to(&reply, from);
                    }
                }
            })
        };
        DnsServer {
            addr,
            answer,
            queries,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, a: Answer) {
        *self.answer.lock().unwrap() = a;
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The reply to one query, and whether it was an A query; `None` for garbage.
fn respond(q: &[u8], answer: &Answer) -> Option<(Vec<u8>, bool)> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut i = 12;
    while *q.get(i)? != 0 {
        i += 1 + usize::from(q[i]);
    }
    let end = i + 5;
    let qtype = u16::from_be_bytes([*q.get(i + 1)?, *q.get(i + 2)?]);
    q.get(end - 1)?;
    let is_a = qtype == 1;
    let (rcode, records): (u8, Vec<Ipv4Addr>) = match answer {
        Answer::Fail => (2, Vec::new()),
        Answer::Addrs(a, _) if is_a => (0, a.clone()),
        Answer::Addrs(..) => (0, Vec::new()),
    };
    let ttl = match answer {
        Answer::Addrs(_, t) => *t,
        Answer::Fail => 0,
    };
    let mut r = Vec::with_capacity(512);
    r.extend_from_slice(&q[0..2]); // id
    r.push(0x80 | (q[2] & 0x01)); // QR, RD copied
    r.push(0x80 | rcode); // RA, rcode
    r.extend_from_slice(&1u16.to_be_bytes()); // questions
    r.extend_from_slice(&(records.len() as u16).to_be_bytes()); // answers
    r.extend_from_slice(&[0, 0, 0, 0]); // authority, additional
    r.extend_from_slice(&q[12..end]);
    for ip in records {
        r.extend_from_slice(&[0xC0, 0x0C]); // the name: a pointer to the question's
        r.extend_from_slice(&1u16.to_be_bytes()); // A
        r.extend_from_slice(&1u16.to_be_bytes()); // IN
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&4u16.to_be_bytes());
        r.extend_from_slice(&ip.octets());
    }
    Some((r, is_a))
}

/// Three backends on 127.0.0.2, .3 and .4, all on one port.
fn backends_on_one_port() -> (Backends, u16) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    for _ in 0..20 {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.2:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let list: Result<Vec<Backend>, _> = (2..=4u8)
            .map(|i| {
                let addr = SocketAddr::from(([127, 0, 0, i], port));
                rt.block_on(Backend::start(addr, &format!("b{}", i - 1)))
            })
            .collect();
        if let Ok(list) = list {
            return (Backends { rt, list }, port);
        }
    }
    panic!("no port free on 127.0.0.2-4");
}

fn ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + i as u8)
}

/// A ferry resolving `app.test` through `dns`.
fn dns_config(dns: SocketAddr, port: u16, interval: &str) -> String {
    config(
        "strategy = \"round_robin\"\nnext_upstream = [\"error\", \"timeout\"]",
        &format!("[[upstream.server]]\naddr = \"app.test:{port}\"\nresolve = true\n"),
    )
    .replace(
        "[[upstream]]",
        &format!("[resolver]\naddr = \"{dns}\"\nresolve_interval = \"{interval}\"\n\n[[upstream]]"),
    )
}

/// The peer addresses of upstream `app` in `/status`, sorted.
fn peers(f: &Ferry) -> Vec<SocketAddr> {
    let doc: Value = serde_json::from_str(&f.admin_get("/status")).expect("JSON");
    let mut v: Vec<SocketAddr> = doc["upstreams"][0]["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter_map(|p| p["addr"].as_str()?.parse().ok())
        .collect();
    v.sort();
    v
}

fn addrs(port: u16, which: &[usize]) -> Vec<SocketAddr> {
    which
        .iter()
        .map(|i| SocketAddr::from((ip(*i), port)))
        .collect()
}

fn wait_peers(f: &Ferry, want: &[SocketAddr]) {
    assert!(
        wait_until(DEADLINE, || peers(f) == want),
        "peers {:?}, want {want:?}; logs: {:?}",
        peers(f),
        f.logs.lock().unwrap()
    );
}

/// Wait until each backend in `busy` served `n` more requests.
fn wait_traffic(b: &Backends, busy: &[usize], n: u64) {
    let start: Vec<u64> = busy
        .iter()
        .map(|i| b.get(*i).served.load(Relaxed))
        .collect();
    assert!(
        wait_until(DEADLINE, || busy.iter().zip(&start).all(|(i, s)| b
            .get(*i)
            .served
            .load(Relaxed)
            >= s + n)),
        "backends {busy:?} did not get traffic"
    );
}

/// What the backends `idx` have served once requests that arrived before an
/// answer changed have finished: the count no longer moves over 100 ms.
fn settled_served(b: &Backends, idx: &[usize]) -> Vec<u64> {
    let sample = || -> Vec<u64> { idx.iter().map(|i| b.get(*i).served.load(Relaxed)).collect() };
    let mut last = sample();
    let start = Instant::now();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = sample();
        if now == last || start.elapsed() > DEADLINE {
            return now;
        }
        last = now;
    }
}

#[test]
fn traffic_follows_the_answers_under_load_without_a_failure() {
    let (b, port) = backends_on_one_port();
    let dns = DnsServer::start(Answer::Addrs(vec![ip(0), ip(1)], 300));
    let f = Ferry::start(&dns_config(dns.addr, port, "1s"));
    // Resolved before serving.
    assert_eq!(peers(&f), addrs(port, &[0, 1]));
    let url = f.url("/");
    let load = std::thread::spawn(move || {
        let t = Instant::now();
        (wrk(&url, 8, 8), t.elapsed())
    });
    let t = Instant::now();
    wait_traffic(&b, &[0, 1], 100);

    // A new address joins.
    dns.set(Answer::Addrs(vec![ip(0), ip(1), ip(2)], 300));
    wait_peers(&f, &addrs(port, &[0, 1, 2]));
    wait_traffic(&b, &[0, 1, 2], 100);

    // One vanishes: it gets nothing new, the others carry on.
    dns.set(Answer::Addrs(vec![ip(1), ip(2)], 300));
    wait_peers(&f, &addrs(port, &[1, 2]));
    // Requests that arrived before the change finish where they were going.
    let gone = settled_served(&b, &[0]);
    wait_traffic(&b, &[1, 2], 200);
    assert_eq!(
        vec![b.get(0).served.load(Relaxed)],
        gone,
        "a vanished address got requests"
    );

    // The DNS server fails: the last good set stays.
    let asked = dns.queries.load(Relaxed);
    dns.set(Answer::Fail);
    assert!(
        f.wait_log("DNS: cannot resolve; keeping the last good set", DEADLINE)
            .is_some(),
        "{:?}",
        f.logs.lock().unwrap()
    );
    let line = f
        .wait_log("DNS: cannot resolve", DEADLINE)
        .unwrap_or_default();
    assert!(
        line.contains("app.test") && line.contains("kept=2"),
        "{line}"
    );
    wait_traffic(&b, &[1, 2], 100);
    assert_eq!(peers(&f), addrs(port, &[1, 2]));

    // It answers again, with another set.
    dns.set(Answer::Addrs(vec![ip(0)], 300));
    wait_peers(&f, &addrs(port, &[0]));
    let before = settled_served(&b, &[1, 2]);
    wait_traffic(&b, &[0], 200);
    assert_eq!(
        vec![b.get(1).served.load(Relaxed), b.get(2).served.load(Relaxed)],
        before
    );
    let steps = t.elapsed();
    let (report, ran) = load.join().expect("wrk thread");
    println!(
        "answers changed 4 times in {steps:?} under {ran:?} of load: {} requests, {} DNS queries",
        report.requests,
        dns.queries.load(Relaxed) - asked
    );
    assert!(
        steps < ran,
        "the steps ({steps:?}) outlasted the load ({ran:?})"
    );
    assert_eq!(report.non_2xx, 0, "{}", report.output);
    assert_eq!(report.socket_errors, 0, "{}", report.output);
}

#[test]
fn a_vanished_address_finishes_its_requests_in_flight() {
    let (b, port) = backends_on_one_port();
    let dns = DnsServer::start(Answer::Addrs(vec![ip(0)], 300));
    let f = Ferry::start(&dns_config(dns.addr, port, "1s"));
    let mut held = RawConn::connect(f.addr);
    held.send(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(held.read_head().status, 200);
    assert_eq!(held.read_chunk(), b"first part\n");
    dns.set(Answer::Addrs(vec![ip(1)], 300));
    wait_peers(&f, &addrs(port, &[1]));
    let (st, body) = http_get(f.addr, "/", &[]);
    assert_eq!(st, 200);
    assert!(body.starts_with("hello from b2"), "{body}");
    b.get(0).knobs.release.notify_one();
    assert_eq!(held.read_chunk(), b"second part\n");
    assert!(held.read_chunk().is_empty());
}

#[test]
fn a_ttl_shorter_than_the_interval_is_honoured() {
    let (_b, port) = backends_on_one_port();
    // One minute between resolutions, but the answer lives one second.
    let dns = DnsServer::start(Answer::Addrs(vec![ip(0)], 1));
    let f = Ferry::start(&dns_config(dns.addr, port, "60s"));
    assert_eq!(peers(&f), addrs(port, &[0]));
    let t = Instant::now();
    dns.set(Answer::Addrs(vec![ip(0), ip(1)], 1));
    wait_peers(&f, &addrs(port, &[0, 1]));
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}: the TTL was not honoured",
        t.elapsed()
    );
}

#[test]
fn a_name_that_does_not_resolve_at_start_joins_once_it_does() {
    let (b, port) = backends_on_one_port();
    let dns = DnsServer::start(Answer::Fail);
    let f = Ferry::start(&dns_config(dns.addr, port, "5s"));
    let line = f
        .wait_log("DNS: cannot resolve", DEADLINE)
        .expect("the failure is logged");
    assert!(
        line.contains("app.test") && line.contains("kept=0"),
        "{line}"
    );
    assert!(peers(&f).is_empty());
    // No peer: ferry answers 502 itself.
    assert_eq!(http_get(f.addr, "/", &[]).0, 502);
    dns.set(Answer::Addrs(vec![ip(2)], 300));
    // Retried every second until a first answer, not every resolve_interval.
    wait_peers(&f, &addrs(port, &[2]));
    let (st, body) = http_get(f.addr, "/", &[]);
    assert_eq!(st, 200, "{body}");
    assert!(body.starts_with("hello from b3"), "{body}");
    assert!(b.get(2).served.load(Relaxed) >= 1);
}

#[test]
fn a_reload_keeps_the_resolved_peers() {
    let (b, port) = backends_on_one_port();
    let dns = DnsServer::start(Answer::Addrs(vec![ip(0), ip(1)], 300));
    let cfg = dns_config(dns.addr, port, "1s");
    let f = Ferry::start(&cfg);
    assert_eq!(peers(&f), addrs(port, &[0, 1]));
    // Traffic, so the peers have state to keep.
    for _ in 0..10 {
        assert_eq!(http_get(f.addr, "/", &[]).0, 200);
    }
    let before = b.get(0).served.load(Relaxed) + b.get(1).served.load(Relaxed);
    std::fs::write(&f.config, cfg.replace("[log]", "[log]\n# edited")).expect("write");
    f.signal("HUP");
    assert!(wait_until(DEADLINE, || f
        .metric("ferry_config_reloads_total{result=\"ok\"}")
        == 1.0));
    // The same peers, with their counters.
    assert_eq!(peers(&f), addrs(port, &[0, 1]));
    let doc: Value = serde_json::from_str(&f.admin_get("/status")).expect("JSON");
    let total: u64 = doc["upstreams"][0]["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter_map(|p| p["requests"].as_u64())
        .sum();
    assert_eq!(total, before);
}
