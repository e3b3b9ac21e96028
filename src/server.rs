//! Listeners, worker threads, the accept loop, client connections with their
//! timeouts, reload and graceful shutdown.
//!
//! Like nginx, ferry runs one single-threaded runtime per worker thread, each with
//! its own `SO_REUSEPORT` listening socket and its own upstream connection pool,
//! so workers share nothing on the request path but a few atomics.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;

use crate::accesslog::AccessLog;
use crate::config::Config;
use crate::conn::{ClientIo, ConnState, READING, WAITING};
use crate::metrics::Metrics;
use crate::peer::now_ms;
use crate::proxy::{Ctx, Shared, handle};
use crate::runtime::Runtime;

/// Largest request head accepted; larger gets 431.
const MAX_HEAD: usize = 64 * 1024;

/// A startup failure.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// Bind `n` listening sockets sharing one address with `SO_REUSEPORT` (one per
/// worker). With port 0, the first socket picks the port and the rest follow it.
fn bind_reuseport(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n.max(1) {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        if n > 1 {
            s.set_reuse_port(true)?;
        }
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.bind(&addr.into())?;
        s.listen(4096)?;
        s.set_nonblocking(true)?;
        let l: std::net::TcpListener = s.into();
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Number of workers the config asks for.
pub fn worker_count(cfg: &Config) -> usize {
    match cfg.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Per-worker bookkeeping of open connections, for the shutdown wait.
#[derive(Default)]
struct Tracker {
    open: AtomicUsize,
    idle: Notify,
}

/// Run ferry with `cfg` until SIGTERM/SIGINT (or `stop` fires). Blocks.
/// `ready` receives the bound listener addresses once serving.
pub fn run(
    cfg: Config,
    stop: Option<watch::Receiver<bool>>,
    ready: Option<std::sync::mpsc::Sender<Vec<SocketAddr>>>,
) -> Result<(), StartError> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let workers = worker_count(&cfg);
    let metrics: &'static Metrics = Box::leak(Box::new(Metrics::new(workers)));
    let log = AccessLog::start(&cfg.log.access, cfg.log.format, metrics.log_dropped.clone())
        .map_err(|e| StartError(format!("cannot open the access log {:?}: {e}", cfg.log.access)))?;

    let mut per_worker: Vec<Vec<std::net::TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for addr in &cfg.server.listen {
        let socks = bind_reuseport(*addr, workers)
            .map_err(|e| StartError(format!("cannot listen on {addr}: {e}")))?;
        bound.push(socks[0].local_addr().map_err(|e| StartError(e.to_string()))?);
        for (w, s) in socks.into_iter().enumerate() {
            per_worker[w].push(s);
        }
    }
    let admin = match cfg.admin.listen {
        Some(a) => Some(
            std::net::TcpListener::bind(a)
                .and_then(|l| l.set_nonblocking(true).map(|_| l))
                .map_err(|e| StartError(format!("cannot listen on admin address {a}: {e}")))?,
        ),
        None => None,
    };
    let path = cfg.path.clone();
    let cfg = Arc::new(cfg);
    let shared = Arc::new(Shared {
        runtime: ArcSwap::from_pointee(Runtime::build(Arc::clone(&cfg), workers, None, metrics)),
        metrics,
        log,
    });
    let limit = Arc::new(Semaphore::new(cfg.server.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut threads = Vec::new();
    for (w, listeners) in per_worker.into_iter().enumerate() {
        let shared = Arc::clone(&shared);
        let stop = stop_rx.clone();
        let limit = Arc::clone(&limit);
        let t = std::thread::Builder::new()
            .name(format!("ferry-w{w}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start worker runtime");
                        return;
                    }
                };
                rt.block_on(worker(w, listeners, shared, stop, limit));
            })
            .map_err(|e| StartError(format!("cannot start worker thread: {e}")))?;
        threads.push(t);
    }

    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StartError(format!("cannot start runtime: {e}")))?;
    control.block_on(async {
        if let Some(l) = admin {
            match TcpListener::from_std(l) {
                Ok(l) => {
                    if let Ok(a) = l.local_addr() {
                        tracing::info!(addr = %a, "admin listening");
                    }
                    tokio::spawn(crate::admin::serve(l, Arc::clone(&shared), path.clone(), workers));
                }
                Err(e) => tracing::error!(error = %e, "admin listener failed"),
            }
        }
        for a in &bound {
            tracing::info!(addr = %a, workers, "listening");
        }
        if let Some(r) = ready {
            let _ = r.send(bound.clone());
        }
        wait_for_stop(&shared, &path, workers, stop).await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    for t in threads {
        let _ = t.join();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Wait for SIGTERM/SIGINT (or the `stop` channel); handle SIGHUP (reload) and
/// SIGUSR1 (reopen the access log) meanwhile.
async fn wait_for_stop(
    shared: &Arc<Shared>,
    path: &std::path::Path,
    workers: usize,
    stop: Option<watch::Receiver<bool>>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup), Ok(mut usr1)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined1()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    let mut stop = stop;
    let mut checkers = crate::health::start(&shared.runtime.load());
    loop {
        let stop_fut = async {
            match stop.as_mut() {
                Some(s) => {
                    let _ = s.wait_for(|v| *v).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = stop_fut => return,
            _ = hup.recv() => {
                if reload(shared, path, workers).is_ok() {
                    drop(checkers);
                    checkers = crate::health::start(&shared.runtime.load());
                }
            }
            _ = usr1.recv() => shared.log.reopen(),
        }
    }
}

/// Re-read the config file and swap in a new runtime; an invalid file changes nothing.
pub fn reload(shared: &Shared, path: &std::path::Path, workers: usize) -> Result<(), String> {
    let metrics = shared.metrics;
    match Config::load(path) {
        Err(e) => {
            metrics.reloads.with_label_values(&["error"]).inc();
            tracing::error!(error = %e, "reload failed; the running configuration is unchanged");
            Err(e.to_string())
        }
        Ok(new) => {
            let old = shared.runtime.load_full();
            if new.server.listen != old.config.server.listen {
                tracing::warn!("listener changes take effect at restart");
            }
            let rt = Runtime::build(Arc::new(new), workers, Some(&old), metrics);
            shared.runtime.store(Arc::new(rt));
            metrics.reloads.with_label_values(&["ok"]).inc();
            tracing::info!("configuration reloaded");
            Ok(())
        }
    }
}

async fn worker(
    w: usize,
    listeners: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    limit: Arc<Semaphore>,
) {
    let tracker = Arc::new(Tracker::default());
    for l in listeners {
        let l = match TcpListener::from_std(l) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot use listener");
                continue;
            }
        };
        tokio::spawn(accept_loop(
            w,
            l,
            Arc::clone(&shared),
            stop.clone(),
            Arc::clone(&limit),
            Arc::clone(&tracker),
        ));
    }
    let mut stop = stop;
    let _ = stop.wait_for(|v| *v).await;
    let timeout = shared.runtime.load().config.server.shutdown_timeout;
    let deadline = Instant::now() + timeout;
    loop {
        let idle = tracker.idle.notified();
        if tracker.open.load(Relaxed) == 0 {
            break;
        }
        if tokio::time::timeout_at(deadline, idle).await.is_err() {
            tracing::warn!(
                worker = w,
                open = tracker.open.load(Relaxed),
                "shutdown_timeout passed; closing remaining connections"
            );
            break;
        }
    }
}

async fn accept_loop(
    w: usize,
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    limit: Arc<Semaphore>,
    tracker: Arc<Tracker>,
) {
    let counters = shared.metrics.worker(w);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&limit).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.wait_for(|v| *v) => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|v| *v) => return,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        counters.accepted.fetch_add(1, Relaxed);
        counters.handled.fetch_add(1, Relaxed);
        tracker.open.fetch_add(1, Relaxed);
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        let tracker = Arc::clone(&tracker);
        tokio::spawn(async move {
            serve_connection(w, stream, remote, shared, stop).await;
            drop(permit);
            if tracker.open.fetch_sub(1, Relaxed) == 1 {
                tracker.idle.notify_waiters();
            }
        });
    }
}

async fn serve_connection(
    w: usize,
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let server_cfg = shared.runtime.load().config.server.clone();
    let header_ms = server_cfg.client_header_timeout.as_millis() as u64;
    let keepalive_ms = server_cfg.keepalive_timeout.as_millis() as u64;
    let state = Arc::new(ConnState::new(shared.metrics.worker(w)));
    let ctx = Arc::new(Ctx {
        shared,
        worker: w,
        remote,
        state: Arc::clone(&state),
        scheme: "http",
    });
    let io = TokioIo::new(ClientIo::new(stream, Arc::clone(&state)));
    let svc = service_fn(move |req| handle(Arc::clone(&ctx), req));
    let conn = http1::Builder::new()
        .keep_alive(keepalive_ms > 0)
        .max_buf_size(MAX_HEAD + 1024)
        // max_buf_size alone is loose (a read may fill the buffer's whole spare
        // capacity, so a head up to twice as large can parse); this is exact.
        .max_header_size(MAX_HEAD)
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(conn);
    // The timer is not told when the state changes, so while no deadline is due
    // it re-checks this often; no longer than either timeout, so that it always
    // wakes before an idle or header deadline and then re-arms to it exactly.
    let period = match keepalive_ms {
        0 => header_ms,
        k => header_ms.min(k),
    }
    .max(1);
    let sleep = tokio::time::sleep(Duration::from_millis(period));
    tokio::pin!(sleep);
    let mut closing = *stop.borrow();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(client = %remote, error = %e, "client connection ended with an error");
                }
                break;
            }
            _ = &mut sleep => {
                let (st, since) = state.get();
                let now = now_ms();
                let limit = match st {
                    WAITING if state.served_any() => keepalive_ms,
                    WAITING | READING => header_ms,
                    _ => u64::MAX,
                };
                let elapsed = now.saturating_sub(since);
                if elapsed >= limit {
                    if st == READING {
                        // Slow request head: close without an answer, as nginx does.
                        break;
                    }
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                    sleep.as_mut().reset(Instant::now() + Duration::from_secs(3600));
                } else {
                    let wait = if limit == u64::MAX { period } else { limit - elapsed };
                    sleep.as_mut().reset(Instant::now() + Duration::from_millis(wait.max(1)));
                }
            }
            _ = stop.wait_for(|v| *v), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    state.close();
}

/// Where the config file lives, for reloads.
pub fn config_path(cfg: &Config) -> PathBuf {
    cfg.path.clone()
}
