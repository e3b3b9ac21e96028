//! `ferry demo`, and the backend it runs: a small hyper server with knobs
//! (latency, status, body size, closing, hanging) that the tests use too.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Knobs of a [`Backend`], changeable while it runs.
#[derive(Debug, Default)]
pub struct Knobs {
    /// Delay before answering, in milliseconds.
    pub latency_ms: AtomicU64,
    /// Status to answer with (0 = 200).
    pub status: AtomicU16,
    /// Close the connection after this many requests on it (0 = never).
    pub close_every: AtomicU64,
    /// Accept connections and read requests but never answer them while it is
    /// 1, on new and already-open (keep-alive) connections alike. A request
    /// that arrived while hanging is answered only once this is back to 0.
    pub hang: AtomicU16,
    /// Close each connection this many milliseconds after its last response
    /// ended, without announcing it (`Connection: close` is not sent), like an
    /// app server whose idle timeout is shorter than ferry's (0 = never).
    pub idle_close_ms: AtomicU64,
    /// Extra headers put on every response (hop-by-hop ones included, for tests).
    pub extra_headers: std::sync::Mutex<Vec<(String, String)>>,
    /// `/hold` sends its first chunk, then waits for this before the rest.
    pub release: tokio::sync::Notify,
}

/// A running demo/test backend.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its name, echoed in every response.
    pub name: String,
    /// Knobs.
    pub knobs: Arc<Knobs>,
    /// Requests served (health checks are counted in `checks` instead).
    pub served: Arc<AtomicU64>,
    /// Connections accepted.
    pub connections: Arc<AtomicU64>,
    /// Connections open now.
    pub open: Arc<AtomicU64>,
    /// Request body bytes received.
    pub received: Arc<AtomicU64>,
    /// Requests that arrived while `knobs.hang` was on (not counted in `served`).
    pub hung: Arc<AtomicU64>,
    /// Connections closed by the `idle_close_ms` knob.
    pub idle_closed: Arc<AtomicU64>,
    /// Health checks answered: requests with `User-Agent: ferry-health-check`
    /// (not counted in `served`).
    pub checks: Arc<AtomicU64>,
    /// The `Host` header of the last health check.
    pub check_host: Arc<std::sync::Mutex<String>>,
    /// Requests in progress now, from the request head to the end of the response.
    pub in_flight: Arc<AtomicU64>,
    /// The most requests ever in progress at once (high-water mark of `in_flight`).
    pub peak_in_flight: Arc<AtomicU64>,
    /// The listener's life: [`Backend::kill`] and [`Backend::restart`].
    life: Arc<Life>,
    /// Speak TLS with these settings (an `https` upstream), or plain HTTP.
    tls: Option<BackendTls>,
}

/// A backend's TLS settings.
#[derive(Clone)]
struct BackendTls(tokio_rustls::TlsAcceptor);

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackendTls")
    }
}

/// What [`Backend::kill`] acts on.
#[derive(Debug)]
struct Life {
    /// Bumped by a kill: the accept loop and every connection of an older
    /// generation end at once.
    generation: tokio::sync::watch::Sender<u64>,
    /// The accept loop (it owns the listener), while the backend runs.
    accept: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Resolves once `rx` moves past generation `generation` (never if it cannot).
async fn killed(mut rx: tokio::sync::watch::Receiver<u64>, generation: u64) {
    if rx.wait_for(|g| *g != generation).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Decrements the open-connection gauge when a connection task ends.
struct OpenGuard(Arc<AtomicU64>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// A body of `n` bytes produced in 64 KiB chunks, never held whole in memory.
struct Zeros {
    left: u64,
    chunk: Bytes,
}

impl http_body::Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64);
        self.left -= n;
        let data = self.chunk.slice(..n as usize);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(data))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

/// Requests in progress on one backend connection and when the last one ended.
#[derive(Debug, Default)]
struct Activity {
    busy: std::sync::Mutex<(u32, Option<tokio::time::Instant>)>,
}

impl Activity {
    /// How long the connection has been idle since its last response ended;
    /// `None` while a request is in progress or before the first one ended.
    fn idle_for(&self) -> Option<Duration> {
        let g = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        match *g {
            (0, Some(t)) => Some(t.elapsed()),
            _ => None,
        }
    }
}

/// Marks a request in progress until its response body is dropped.
struct BusyGuard(Arc<Activity>);

impl BusyGuard {
    fn start(a: Arc<Activity>) -> BusyGuard {
        a.busy.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        BusyGuard(a)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut g = self.0.busy.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = g.0.saturating_sub(1);
        g.1 = Some(tokio::time::Instant::now());
    }
}

/// Counts a request in [`Backend::in_flight`] (and its high-water mark) until dropped.
struct Flight(Arc<AtomicU64>);

impl Flight {
    fn start(b: &Backend) -> Flight {
        let now = b.in_flight.fetch_add(1, Relaxed) + 1;
        b.peak_in_flight.fetch_max(now, Relaxed);
        Flight(Arc::clone(&b.in_flight))
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// A response body that holds a [`BusyGuard`] (and the request's [`Flight`])
/// until hyper is done with it.
struct Tracked<B> {
    inner: B,
    _busy: BusyGuard,
    _flight: Flight,
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A body fed from a channel: `/hold` sends part of it, then waits.
struct Chunks(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|c| c.map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// What a backend answers with.
type Reply = Response<http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>>;

fn reply(status: StatusCode, text: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(text)).boxed_unsync());
    *r.status_mut() = status;
    r
}

impl Backend {
    /// Start a backend on `addr` (port 0 for any) in the current tokio runtime.
    pub async fn start(addr: SocketAddr, name: &str) -> std::io::Result<Backend> {
        Backend::start_with(addr, name, None).await
    }

    /// Start a backend that speaks HTTPS with `tls` (an `https` upstream for tests).
    pub async fn start_tls(
        addr: SocketAddr,
        name: &str,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<Backend> {
        Backend::start_with(addr, name, Some(BackendTls(tls.into()))).await
    }

    async fn start_with(
        addr: SocketAddr,
        name: &str,
        tls: Option<BackendTls>,
    ) -> std::io::Result<Backend> {
        let listener = TcpListener::bind(addr).await?;
        let b = Backend {
            addr: listener.local_addr()?,
            name: name.to_owned(),
            knobs: Arc::new(Knobs::default()),
            served: Arc::new(AtomicU64::new(0)),
            connections: Arc::new(AtomicU64::new(0)),
            open: Arc::new(AtomicU64::new(0)),
            received: Arc::new(AtomicU64::new(0)),
            hung: Arc::new(AtomicU64::new(0)),
            idle_closed: Arc::new(AtomicU64::new(0)),
            checks: Arc::new(AtomicU64::new(0)),
            check_host: Arc::new(std::sync::Mutex::new(String::new())),
            in_flight: Arc::new(AtomicU64::new(0)),
            peak_in_flight: Arc::new(AtomicU64::new(0)),
            life: Arc::new(Life {
                generation: tokio::sync::watch::Sender::new(0),
                accept: std::sync::Mutex::new(None),
            }),
            tls,
        };
        b.spawn_accept(listener);
        Ok(b)
    }

    /// Kill the backend as a crashed process dies: the listener is dropped (new
    /// connects are refused) and every open connection is closed at once, with
    /// requests in progress unanswered. Returns once the listener is gone and
    /// every connection closed (or after 10 s). Counters and knobs are kept.
    pub async fn kill(&self) {
        self.life.generation.send_modify(|g| *g += 1);
        let accept = self
            .life
            .accept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = accept {
            let _ = task.await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.open.load(Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Start again on the same address (killing the running instance first, if
    /// any), as a restarted process does. Binding is retried for up to 10 s
    /// while the port is still taken.
    pub async fn restart(&self) -> std::io::Result<()> {
        self.kill().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.spawn_accept(listener);
        Ok(())
    }

    /// True while the backend listens (not killed).
    pub fn is_running(&self) -> bool {
        self.life
            .accept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Run the accept loop on `listener` until the next kill.
    fn spawn_accept(&self, listener: TcpListener) {
        let me = self.clone();
        let generation = *self.life.generation.borrow();
        let task = tokio::spawn(async move {
            let stop = killed(me.life.generation.subscribe(), generation);
            tokio::pin!(stop);
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = &mut stop => return,
                };
                let Ok((stream, _)) = accepted else {
                    continue;
                };
                me.connections.fetch_add(1, Relaxed);
                me.open.fetch_add(1, Relaxed);
                let _ = stream.set_nodelay(true);
                let stop = killed(me.life.generation.subscribe(), generation);
                let me = me.clone();
                tokio::spawn(async move {
                    let _open = OpenGuard(Arc::clone(&me.open));
                    let serve = async {
                        match &me.tls {
                            None => me.serve(stream).await,
                            Some(BackendTls(acceptor)) => {
                                // A failed handshake just ends the connection.
                                if let Ok(s) = acceptor.accept(stream).await {
                                    me.serve(s).await;
                                }
                            }
                        }
                    };
                    tokio::select! {
                        _ = serve => {}
                        // Dropping the connection closes the socket.
                        _ = stop => {}
                    }
                });
            }
        });
        *self.life.accept.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }

    /// Serve one accepted connection until it ends.
    async fn serve<I>(&self, stream: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let me = self.clone();
        let idle_close = me.knobs.idle_close_ms.load(Relaxed);
        let on_conn = Arc::new(AtomicU64::new(0));
        let activity = Arc::new(Activity::default());
        let act = Arc::clone(&activity);
        let svc = service_fn(move |req| {
            let me = me.clone();
            let on_conn = Arc::clone(&on_conn);
            let busy = BusyGuard::start(Arc::clone(&act));
            let flight = Flight::start(&me);
            async move {
                let r = me.answer(req, &on_conn).await;
                Ok::<_, Infallible>(r.map(|inner| {
                    Tracked {
                        inner,
                        _busy: busy,
                        _flight: flight,
                    }
                    .boxed_unsync()
                }))
            }
        });
        let conn = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades();
        if idle_close == 0 {
            let _ = conn.await;
            return;
        }
        tokio::pin!(conn);
        let idle_close = Duration::from_millis(idle_close);
        loop {
            let wait = activity
                .idle_for()
                .map_or(idle_close, |idle| idle_close.saturating_sub(idle));
            if wait.is_zero() {
                // Drop the connection: the socket closes with no notice.
                self.idle_closed.fetch_add(1, Relaxed);
                return;
            }
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Paths: `/echo` answers the request head as text (`name: value` lines);
    /// `/bytes/N` streams N bytes; `/hold` streams a first chunk and the rest
    /// only after `knobs.release` is notified; `/status/N` answers status N; `/ws` accepts a
    /// protocol upgrade and echoes bytes; anything else says hello. The request
    /// body is always read and counted.
    async fn answer(&self, mut req: Request<Incoming>, on_conn: &AtomicU64) -> Reply {
        if self.knobs.hang.load(Relaxed) == 1 {
            // Hung: the request was read, no answer while the knob stays on.
            self.hung.fetch_add(1, Relaxed);
            while self.knobs.hang.load(Relaxed) == 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let check = req
            .headers()
            .get(header::USER_AGENT)
            .is_some_and(|v| v.as_bytes() == b"ferry-health-check");
        let n = if check {
            if let Ok(mut h) = self.check_host.lock() {
                let host = req.headers().get(header::HOST);
                *h = host.and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            }
            self.checks.fetch_add(1, Relaxed) + 1
        } else {
            self.served.fetch_add(1, Relaxed) + 1
        };
        let here = on_conn.fetch_add(1, Relaxed) + 1;
        let latency = self.knobs.latency_ms.load(Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        if req.uri().path() == "/ws" && req.headers().contains_key(header::UPGRADE) {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            let mut r = reply(StatusCode::SWITCHING_PROTOCOLS, String::new());
            r.headers_mut().insert(
                header::CONNECTION,
                http::HeaderValue::from_static("upgrade"),
            );
            r.headers_mut()
                .insert(header::UPGRADE, http::HeaderValue::from_static("websocket"));
            return r;
        }
        let (parts, body) = req.into_parts();
        // Read (and count) the request body.
        let mut body_len = 0u64;
        let mut body = body;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(d) = frame.data_ref() {
                body_len += d.len() as u64;
                // Counted as it arrives, so a test can see a body stream through.
                self.received.fetch_add(d.len() as u64, Relaxed);
            }
        }
        let mut status = match self.knobs.status.load(Relaxed) {
            0 => StatusCode::OK,
            s => StatusCode::from_u16(s).unwrap_or(StatusCode::OK),
        };
        let path = parts.uri.path();
        if let Some(code) = path.strip_prefix("/status/").and_then(|c| c.parse().ok()) {
            status = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
        }
        let mut r = if path == "/echo" {
            let mut text = format!("{} {} {:?}\n", parts.method, parts.uri, parts.version);
            for (k, v) in &parts.headers {
                text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
            }
            text.push_str(&format!("body={body_len}\n"));
            reply(status, text)
        } else if let Some(n) = path.strip_prefix("/bytes/").and_then(|c| c.parse().ok()) {
            let mut r = Response::new(
                Zeros {
                    left: n,
                    chunk: Bytes::from(vec![b'x'; 64 * 1024]),
                }
                .boxed_unsync(),
            );
            *r.status_mut() = status;
            r
        } else if path == "/hold" {
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            let knobs = Arc::clone(&self.knobs);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"first part\n")).await;
                knobs.release.notified().await;
                let _ = tx.send(Bytes::from_static(b"second part\n")).await;
            });
            let mut r = Response::new(Chunks(rx).boxed_unsync());
            *r.status_mut() = status;
            r
        } else if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            reply(status, String::new())
        } else {
            let text = format!(
                "hello from {} ({}) request {} {} {} body={}\n",
                self.name, self.addr, n, parts.method, parts.uri, body_len
            );
            reply(status, text)
        };
        r.headers_mut().insert(
            "x-backend",
            http::HeaderValue::from_str(&self.name).unwrap_or(http::HeaderValue::from_static("?")),
        );
        if let Ok(extra) = self.knobs.extra_headers.lock() {
            for (k, v) in extra.iter() {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.as_bytes()),
                    http::HeaderValue::from_str(v),
                ) {
                    r.headers_mut().append(k, v);
                }
            }
        }
        let close_every = self.knobs.close_every.load(Relaxed);
        if close_every > 0 && here.is_multiple_of(close_every) {
            r.headers_mut()
                .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        r
    }
}

/// The demo: three backends on 127.0.0.1:9001-9003 (the third answers 100 ms
/// late) and ferry in front of them on 127.0.0.1:8080, admin on 127.0.0.1:9180.
pub fn run() -> Result<(), String> {
    let backends_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut addrs = Vec::new();
    for (i, port) in [9001u16, 9002, 9003].into_iter().enumerate() {
        let want: SocketAddr = ([127, 0, 0, 1], port).into();
        let b = backends_rt
            .block_on(async {
                match Backend::start(want, &format!("backend-{}", i + 1)).await {
                    Ok(b) => Ok(b),
                    // Port taken: any free port will do for a demo.
                    Err(_) => {
                        Backend::start(([127, 0, 0, 1], 0).into(), &format!("backend-{}", i + 1))
                            .await
                    }
                }
            })
            .map_err(|e| format!("cannot start a demo backend: {e}"))?;
        if i == 2 {
            b.knobs.latency_ms.store(100, Relaxed);
        }
        addrs.push(b.addr);
    }
    let toml = format!(
        r#"[server]
listen = ["127.0.0.1:8080"]
workers = 1

[admin]
listen = "127.0.0.1:9180"

[log]
access = "stdout"

[[upstream]]
name = "demo"
strategy = "least_time"

[[upstream.server]]
addr = "{}"

[[upstream.server]]
addr = "{}"

[[upstream.server]]
addr = "{}"
"#,
        addrs[0], addrs[1], addrs[2]
    );
    let cfg = crate::config::Config::parse(&toml, std::path::Path::new("<demo>"))
        .map_err(|e| e.to_string())?;
    println!(
        "ferry demo: three backends at {}, {}, {} (the last answers 100 ms late)\n\
         ferry listens on http://127.0.0.1:8080 (least_time), admin on http://127.0.0.1:9180\n\n\
         Try:\n  \
         curl -s http://127.0.0.1:8080/\n  \
         for i in $(seq 20); do curl -s http://127.0.0.1:8080/ ; done | cut -d' ' -f3 | sort | uniq -c\n  \
         curl -s http://127.0.0.1:9180/stub_status\n  \
         curl -s http://127.0.0.1:9180/status\n  \
         curl -s http://127.0.0.1:9180/metrics | grep ferry_http_requests_total\n\n\
         Ctrl-C stops it.\n",
        addrs[0], addrs[1], addrs[2]
    );
    let r = crate::server::run(cfg, None, None).map_err(|e| e.to_string());
    backends_rt.shutdown_timeout(Duration::from_millis(100));
    r
}
