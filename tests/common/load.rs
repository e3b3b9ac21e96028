//! A load generator for the fault tests: `conns` keep-alive HTTP/1.1 client
//! connections (hyper's client conn over a tokio `TcpStream`), each sending
//! requests back to back until `total` requests have been sent. Every request's
//! outcome (status, body complete or not, transport error) and latency is
//! recorded; [`Load::finish`] returns a [`Summary`].
//!
//! Also: killing and restarting backends from a test thread.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{Backends, Ferry};

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Where to (ferry's listener).
    pub addr: SocketAddr,
    /// Requests in all.
    pub total: u64,
    /// Concurrent client connections.
    pub conns: usize,
    /// Request path.
    pub path: String,
    /// Every `post_every`-th request is a POST with a small body (0 = GETs only).
    pub post_every: u64,
    /// Client-side deadline for one request: past it the request counts as hung.
    pub timeout: Duration,
    /// Waves: each time the requests sent (over all connections) pass a
    /// multiple of `pause_every`, every connection pauses once, for a random
    /// time within `pause`, before its next request; the upstream connections
    /// ferry pooled sit idle meanwhile (0 = no pauses).
    pub pause_every: u64,
    /// Bounds of a pause.
    pub pause: (Duration, Duration),
    /// A 2xx body must be the demo backend's hello line, ending with
    /// `body=<bytes sent>`: the request body arrived whole.
    pub check_echo: bool,
}

impl LoadSpec {
    /// `total` GETs of `/` over `conns` connections to `addr`, 30 s deadline each.
    pub fn get(addr: SocketAddr, total: u64, conns: usize) -> LoadSpec {
        LoadSpec {
            addr,
            total,
            conns,
            path: "/".into(),
            post_every: 0,
            timeout: Duration::from_secs(30),
            pause_every: 0,
            pause: (Duration::ZERO, Duration::ZERO),
            check_echo: true,
        }
    }
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// 2xx, body complete.
    Ok,
    /// A complete response with a non-2xx status.
    Status(u16),
    /// No connection to ferry.
    Connect,
    /// The request failed before a response head arrived (closed, reset).
    Send,
    /// The response body was cut short, failed, or is not what was expected.
    Body,
    /// No complete answer within the client-side deadline.
    Hung,
}

/// One request that did not end in [`Outcome::Ok`].
#[derive(Debug, Clone)]
pub struct Failure {
    /// Request number (order of sending).
    pub seq: u64,
    /// When it started, since the load started.
    pub at: Duration,
    /// How long it took.
    pub took: Duration,
    /// GET or POST.
    pub method: Method,
    /// Requests sent before it on the same client connection.
    pub on_conn: u64,
    /// What happened.
    pub outcome: Outcome,
    /// The error or the start of the body.
    pub detail: String,
}

/// What a load run saw.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Requests sent.
    pub requests: u64,
    /// Of which POSTs.
    pub posts: u64,
    /// Outcomes by kind.
    pub outcomes: BTreeMap<Outcome, u64>,
    /// Requests sent a second time because the keep-alive connection they were
    /// to go on turned out closed before they left (not failures: the request
    /// never reached ferry; a real client does the same).
    pub resent: u64,
    /// Client connections opened.
    pub connections: u64,
    /// Latency of every request, sorted.
    pub latencies: Vec<Duration>,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// The first failures, by sequence number (up to 200).
    pub failures: Vec<Failure>,
}

impl Summary {
    /// Requests that did not end in [`Outcome::Ok`].
    pub fn failed(&self) -> u64 {
        self.requests - self.count(Outcome::Ok)
    }

    /// Requests with this outcome.
    pub fn count(&self, o: Outcome) -> u64 {
        self.outcomes.get(&o).copied().unwrap_or(0)
    }

    /// Requests with any non-2xx status.
    pub fn non_2xx(&self) -> u64 {
        self.outcomes
            .iter()
            .filter(|(o, _)| matches!(o, Outcome::Status(_)))
            .map(|(_, n)| n)
            .sum()
    }

    /// The `q` quantile of latency (0.5 = median).
    pub fn quantile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 * q).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[i - 1]
    }

    /// Median latency.
    pub fn p50(&self) -> Duration {
        self.quantile(0.50)
    }

    /// 99th percentile latency.
    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }

    /// Slowest request.
    pub fn max(&self) -> Duration {
        self.latencies.last().copied().unwrap_or_default()
    }

    /// One line: requests, failures by kind, latency.
    pub fn line(&self, name: &str) -> String {
        let statuses: Vec<String> = self
            .outcomes
            .iter()
            .filter_map(|(o, n)| match o {
                Outcome::Status(s) => Some(format!("{s}:{n}")),
                _ => None,
            })
            .collect();
        format!(
            "{name:<34} {:>6} requests ({:>5} POST) | failed {:>5}: status {} [{}] conn {} send {} body {} hung {} | resent {} | p50 {:>7.1?} p99 {:>7.1?} max {:>7.1?} | {:.1?}",
            self.requests,
            self.posts,
            self.failed(),
            self.non_2xx(),
            statuses.join(" "),
            self.count(Outcome::Connect),
            self.count(Outcome::Send),
            self.count(Outcome::Body),
            self.count(Outcome::Hung),
            self.resent,
            self.p50(),
            self.p99(),
            self.max(),
            self.elapsed,
        )
    }

    /// The first `n` failures, one a line.
    pub fn failure_lines(&self, n: usize) -> String {
        let mut out = String::new();
        for f in self.failures.iter().take(n) {
            let _ = writeln!(
                out,
                "  #{} {} at {:.3?} (took {:.1?}, request {} on its connection): {:?} {}",
                f.seq, f.method, f.at, f.took, f.on_conn, f.outcome, f.detail
            );
        }
        out
    }
}

/// A load run in progress, on its own thread and runtime.
pub struct Load {
    completed: Arc<AtomicU64>,
    thread: JoinHandle<Summary>,
}

impl Load {
    /// Start sending.
    pub fn start(spec: LoadSpec) -> Load {
        let completed = Arc::new(AtomicU64::new(0));
        let done = Arc::clone(&completed);
        let thread = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("load runtime")
                .block_on(run(spec, done))
        });
        Load { completed, thread }
    }

    /// Requests answered (or failed) so far.
    pub fn completed(&self) -> u64 {
        self.completed.load(Relaxed)
    }

    /// Wait until `n` requests completed; false after `within` (or when the run
    /// ended before).
    pub fn wait_completed(&self, n: u64, within: Duration) -> bool {
        super::wait_until(within, || {
            self.completed() >= n || self.thread.is_finished()
        }) && self.completed() >= n
    }

    /// Wait for the end of the run.
    pub fn finish(self) -> Summary {
        self.thread.join().expect("load thread")
    }
}

/// What one connection worker recorded.
#[derive(Default)]
struct Record {
    requests: u64,
    posts: u64,
    outcomes: BTreeMap<Outcome, u64>,
    resent: u64,
    connections: u64,
    latencies: Vec<Duration>,
    failures: Vec<Failure>,
}

async fn run(spec: LoadSpec, completed: Arc<AtomicU64>) -> Summary {
    let spec = Arc::new(spec);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..spec.conns {
        let (spec, next, completed) =
            (Arc::clone(&spec), Arc::clone(&next), Arc::clone(&completed));
        tasks.push(tokio::spawn(async move {
            worker(w, &spec, &next, &completed, start).await
        }));
    }
    let mut s = Summary::default();
    for t in tasks {
        let r = t.await.expect("load worker");
        s.requests += r.requests;
        s.posts += r.posts;
        for (o, n) in r.outcomes {
            *s.outcomes.entry(o).or_default() += n;
        }
        s.resent += r.resent;
        s.connections += r.connections;
        s.latencies.extend(r.latencies);
        s.failures.extend(r.failures);
    }
    s.elapsed = start.elapsed();
    s.latencies.sort_unstable();
    s.failures.sort_by_key(|f| f.seq);
    s.failures.truncate(200);
    s
}

/// The client side of one keep-alive connection.
struct Client {
    tx: SendRequest<Full<Bytes>>,
    /// Requests sent on it so far.
    sent: u64,
}

async fn worker(
    w: usize,
    spec: &LoadSpec,
    next: &AtomicU64,
    completed: &AtomicU64,
    start: Instant,
) -> Record {
    let mut rec = Record::default();
    let mut conn: Option<Client> = None;
    let mut rng = fastrand::Rng::with_seed(w as u64 + 1);
    let mut wave = 0u64;
    loop {
        let seq = next.fetch_add(1, Relaxed);
        if seq >= spec.total {
            break;
        }
        if spec.pause_every > 0 && seq / spec.pause_every > wave {
            wave = seq / spec.pause_every;
            let (lo, hi) = spec.pause;
            let span = hi.saturating_sub(lo).as_millis() as u64;
            tokio::time::sleep(lo + Duration::from_millis(rng.u64(0..=span))).await;
        }
        let post = spec.post_every > 0 && seq % spec.post_every == spec.post_every - 1;
        let body = if post {
            // A small form body of varying size.
            let pad = "x".repeat(rng.usize(0..200));
            Bytes::from(format!("order={seq}&pad={pad}"))
        } else {
            Bytes::new()
        };
        let t0 = Instant::now();
        let on_conn = conn.as_ref().map_or(0, |c| c.sent);
        let result = tokio::time::timeout(spec.timeout, one(spec, &mut conn, post, body, &mut rec))
            .await
            .unwrap_or_else(|_| {
                conn = None;
                (
                    Outcome::Hung,
                    format!("no complete answer within {:?}", spec.timeout),
                )
            });
        let took = t0.elapsed();
        rec.requests += 1;
        rec.posts += u64::from(post);
        *rec.outcomes.entry(result.0).or_default() += 1;
        rec.latencies.push(took);
        if result.0 != Outcome::Ok && rec.failures.len() < 200 {
            rec.failures.push(Failure {
                seq,
                at: t0.duration_since(start),
                took,
                method: if post { Method::POST } else { Method::GET },
                on_conn,
                outcome: result.0,
                detail: result.1,
            });
        }
        completed.fetch_add(1, Relaxed);
    }
    rec
}

/// Open a client connection.
async fn connect(addr: SocketAddr) -> Result<Client, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (tx, driver) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = driver.await;
    });
    Ok(Client { tx, sent: 0 })
}

/// Send one request, on the open connection or a new one; its outcome.
async fn one(
    spec: &LoadSpec,
    conn: &mut Option<Client>,
    post: bool,
    body: Bytes,
    rec: &mut Record,
) -> (Outcome, String) {
    let sent_len = body.len();
    let mut req = Request::builder()
        .method(if post { Method::POST } else { Method::GET })
        .uri(spec.path.as_str())
        .header(header::HOST, "faults.test");
    if post {
        req = req.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    }
    let mut req = req.body(Full::new(body)).expect("request");
    let resp = loop {
        let fresh = conn.is_none();
        let c = match conn {
            Some(c) => c,
            None => match connect(spec.addr).await {
                Ok(c) => {
                    rec.connections += 1;
                    conn.insert(c)
                }
                Err(e) => return (Outcome::Connect, e),
            },
        };
        if c.tx.ready().await.is_err() {
            *conn = None;
            if fresh {
                return (Outcome::Connect, "connection closed before use".into());
            }
            rec.resent += 1;
            continue;
        }
        c.sent += 1;
        match c.tx.try_send_request(req).await {
            Ok(r) => break r,
            Err(mut e) => {
                *conn = None;
                match e.take_message() {
                    Some(back) if !fresh => {
                        // Closed before the request left: send it on a new one.
                        rec.resent += 1;
                        req = back;
                    }
                    _ => return (Outcome::Send, e.into_error().to_string()),
                }
            }
        }
    };
    let status = resp.status();
    let close = resp
        .headers()
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let length: Option<usize> = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            *conn = None;
            return (Outcome::Body, format!("status {status}, body: {e}"));
        }
    };
    if close {
        *conn = None;
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
    if length.is_some_and(|n| n != body.len()) {
        return (
            Outcome::Body,
            format!("status {status}, {} of {length:?} body bytes", body.len()),
        );
    }
    if !status.is_success() {
        return (Outcome::Status(status.as_u16()), text.trim_end().to_owned());
    }
    if spec.check_echo {
        let want = format!("body={sent_len}\n");
        if !(body.starts_with(b"hello from ") && body.ends_with(want.as_bytes())) {
            return (
                Outcome::Body,
                format!("status {status}, unexpected body (want …{want:?}): {text:?}"),
            );
        }
    }
    (Outcome::Ok, String::new())
}

impl Backends {
    /// Kill backend `i` ([`ferry::demo::Backend::kill`]): connects refused,
    /// open connections closed. Returns when done.
    pub fn kill(&self, i: usize) {
        self.rt.block_on(self.list[i].kill());
    }

    /// Restart backend `i` on the same port.
    pub fn restart(&self, i: usize) {
        self.rt
            .block_on(self.list[i].restart())
            .unwrap_or_else(|e| panic!("restart {}: {e}", self.list[i].addr));
    }
}

impl Ferry {
    /// ferry's warning and error lines, grouped by message (timestamps and
    /// per-request fields dropped), most frequent first, with a count.
    pub fn warnings(&self) -> Vec<(usize, String)> {
        let mut by: BTreeMap<String, usize> = BTreeMap::new();
        for l in self.logs.lock().unwrap().iter() {
            if !(l.contains("WARN") || l.contains("ERROR")) {
                continue;
            }
            // Drop the timestamp: everything up to the level.
            let l = l
                .find("WARN")
                .or_else(|| l.find("ERROR"))
                .map_or(l.as_str(), |i| &l[i..]);
            *by.entry(l.to_owned()).or_default() += 1;
        }
        let mut v: Vec<(usize, String)> = by.into_iter().map(|(l, n)| (n, l)).collect();
        v.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        v
    }
}
