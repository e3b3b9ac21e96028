//! Listeners, worker threads, the accept loop, client connections with their
//! timeouts, reload and graceful shutdown.
//!
//! Like nginx, ferry runs one single-threaded runtime per worker thread, each with
//! its own `SO_REUSEPORT` listening socket and its own upstream connection pool,
//! so workers share nothing on the request path but a few atomics.
//!
//! The control thread owns the signals, the admin listener and reloads. A reload
//! swaps the [`Runtime`] (requests in flight keep the one they started with) and
//! moves listeners: it binds new addresses itself, hands each worker its socket
//! over a command channel, and tells the workers to close the sockets of removed
//! addresses, whose open connections carry on to their end. With one worker
//! there is no second thread: the worker runs on the control thread's runtime.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use std::future::Future;
use std::pin::Pin;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::accesslog::AccessLog;
use crate::admin::{AdminHandle, ReloadReply};
use crate::body::ClientBody;
use crate::config::Config;
use crate::conn::{ConnState, Due, READING};
use crate::discovery::{self, Dns, Target};
use crate::metrics::Metrics;
use crate::proxy::{Ctx, Shared, handle};
use crate::runtime::Runtime;
use http::Request;
use hyper::body::Incoming;

/// Largest request head accepted; larger gets 431.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

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
#[derive(Debug, Default)]
struct Tracker {
    open: AtomicUsize,
    idle: Notify,
}

/// A change to one worker's listening sockets, sent by the control thread.
#[derive(Debug)]
enum ListenerCmd {
    /// Start accepting on this socket (the worker's member of an `SO_REUSEPORT`
    /// group), known by the group's bound address; TLS or plain.
    Add(SocketAddr, std::net::TcpListener, Kind),
    /// Stop accepting on the socket of this bound address and close it; the
    /// connections it accepted carry on to their natural end.
    Remove(SocketAddr),
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Plain HTTP (`[server] listen`).
    Plain,
    /// TLS (`[tls] listen`).
    Tls,
}

/// A listener as the configuration asks for it.
type Want = (SocketAddr, Kind);

/// The listeners `cfg` asks for: the plain ones, then the TLS ones.
fn wanted(cfg: &Config) -> Vec<Want> {
    let plain = cfg.server.listen.iter().map(|a| (*a, Kind::Plain));
    let tls = cfg
        .tls
        .iter()
        .flat_map(|t| t.listen.iter().map(|a| (*a, Kind::Tls)));
    plain.chain(tls).collect()
}

/// The client-facing listeners, owned by the control thread: which configured
/// address each is bound to, and the channels that hand sockets to the workers.
struct Listeners {
    /// (configured, bound) per listener, in config order.
    bound: Vec<(Want, SocketAddr)>,
    /// One command channel per worker.
    workers: Vec<mpsc::UnboundedSender<ListenerCmd>>,
    /// The bound addresses, as `/status` shows them.
    shown: Arc<Mutex<Vec<SocketAddr>>>,
}

/// What moving to a new `[server] listen` list takes. Nothing changes until it
/// is applied; dropping it closes the sockets it bound.
struct ListenerPlan {
    /// The new (configured, bound) list.
    bound: Vec<(Want, SocketAddr)>,
    /// Newly bound groups: the bound address, its kind and one socket per worker.
    added: Vec<(SocketAddr, Kind, Vec<std::net::TcpListener>)>,
    /// Bound addresses no longer wanted.
    removed: Vec<SocketAddr>,
}

impl Listeners {
    /// Bind what `want` adds to the current set (an address already bound under the
    /// same configured address is kept as is, sockets, queue and all).
    fn plan(&self, want: &[Want]) -> Result<ListenerPlan, String> {
        let mut old: Vec<Option<(Want, SocketAddr)>> =
            self.bound.iter().copied().map(Some).collect();
        let mut plan = ListenerPlan {
            bound: Vec::with_capacity(want.len()),
            added: Vec::new(),
            removed: Vec::new(),
        };
        for &(addr, kind) in want {
            // The same configured address keeps its socket; so does the address a
            // socket is bound to (`127.0.0.1:0` bound to port 40001, now written
            // `127.0.0.1:40001`). A socket never changes kind.
            let kept = match old
                .iter()
                .position(|o| o.is_some_and(|(conf, _)| conf == (addr, kind)))
            {
                Some(i) => old[i].take(),
                None => old
                    .iter_mut()
                    .find(|o| o.is_some_and(|((_, k), bound)| bound == addr && k == kind))
                    .and_then(Option::take),
            };
            match kept {
                Some((_, bound)) => plan.bound.push(((addr, kind), bound)),
                None => {
                    let socks = bind_reuseport(addr, self.workers.len())
                        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
                    let local = socks
                        .first()
                        .and_then(|s| s.local_addr().ok())
                        .ok_or_else(|| format!("cannot listen on {addr}: no socket"))?;
                    plan.bound.push(((addr, kind), local));
                    plan.added.push((local, kind, socks));
                }
            }
        }
        plan.removed = old.into_iter().flatten().map(|(_, b)| b).collect();
        Ok(plan)
    }

    /// Hand the new sockets to the workers and tell them which to close.
    fn apply(&mut self, plan: ListenerPlan) {
        for (addr, kind, socks) in plan.added {
            for (tx, s) in self.workers.iter().zip(socks) {
                // A worker that is gone (its runtime failed to start) takes nothing.
                let _ = tx.send(ListenerCmd::Add(addr, s, kind));
            }
            match kind {
                Kind::Plain => {
                    tracing::info!(addr = %addr, workers = self.workers.len(), "listening")
                }
                Kind::Tls => {
                    tracing::info!(addr = %addr, workers = self.workers.len(), "listening (TLS)")
                }
            }
        }
        for addr in plan.removed {
            for tx in &self.workers {
                let _ = tx.send(ListenerCmd::Remove(addr));
            }
            tracing::info!(addr = %addr, "stopped listening; open connections finish");
        }
        self.bound = plan.bound;
        if let Ok(mut shown) = self.shown.lock() {
            *shown = self.bound.iter().map(|(_, b)| *b).collect();
        }
    }
}

/// Run ferry with `cfg` until SIGTERM/SIGINT (or `stop` fires). Blocks.
/// `ready` receives the bound listener addresses once serving.
pub fn run(
    cfg: Config,
    stop: Option<watch::Receiver<bool>>,
    ready: Option<std::sync::mpsc::Sender<Vec<SocketAddr>>>,
) -> Result<(), StartError> {
    let mut cfg = cfg;
    // Certificates and CA files are read before anything starts.
    crate::tls::load(&mut cfg).map_err(|e| StartError(e.to_string()))?;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let workers = worker_count(&cfg);
    let metrics: &'static Metrics = Box::leak(Box::new(Metrics::new(workers)));
    let log = AccessLog::start(&cfg.log.access, cfg.log.format, metrics.log_dropped.clone())
        .map_err(|e| {
            StartError(format!(
                "cannot open the access log {:?}: {e}",
                cfg.log.access
            ))
        })?;

    let mut cmd_rx = Vec::with_capacity(workers);
    let mut listeners = Listeners {
        bound: Vec::new(),
        workers: Vec::with_capacity(workers),
        shown: Arc::new(Mutex::new(Vec::new())),
    };
    for _ in 0..workers {
        let (tx, rx) = mpsc::unbounded_channel();
        listeners.workers.push(tx);
        cmd_rx.push(rx);
    }
    let plan = listeners.plan(&wanted(&cfg)).map_err(StartError)?;
    let admin = match cfg.admin.listen {
        Some(a) => Some(
            std::net::TcpListener::bind(a)
                .and_then(|l| l.set_nonblocking(true).map(|_| l))
                .map_err(|e| StartError(format!("cannot listen on admin address {a}: {e}")))?,
        ),
        None => None,
    };
    if let Some(a) = cfg.admin.listen
        && !a.ip().is_loopback()
        && cfg.admin.token.is_none()
    {
        tracing::warn!(addr = %a, "the admin listener is not on loopback and [admin] token is not set: anyone who reaches it can drain peers and reload");
    }
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StartError(format!("cannot start runtime: {e}")))?;
    // Names with `resolve = true` are resolved before serving.
    let (mut discovery, resolved) = Discovery::new();
    let cfg = control
        .block_on(discovery.prepare(&cfg))
        .map_err(StartError)?;
    let path = cfg.path.clone();
    let cfg = Arc::new(cfg);
    let shared = Arc::new(Shared {
        runtime: ArcSwap::from_pointee(Runtime::build(Arc::clone(&cfg), workers, None, metrics)),
        metrics,
        log,
    });
    let limit = Arc::new(Semaphore::new(cfg.server.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);

    // With one worker, the worker runs on this thread, beside the control
    // tasks, as one nginx worker process does: a single-threaded process
    // makes every socket call cheaper (the kernel takes no reference on the
    // file when the file table is not shared) and needs one event loop, not two.
    let mut inline = (workers == 1).then(|| cmd_rx.pop()).flatten();
    let mut threads = Vec::new();
    for (w, cmds) in cmd_rx.into_iter().enumerate() {
        let shared = Arc::clone(&shared);
        let stop = stop_rx.clone();
        let limit = Arc::clone(&limit);
        let t = std::thread::Builder::new()
            .name(format!("ferry-w{w}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start worker runtime");
                        return;
                    }
                };
                let log = shared.log.clone();
                rt.block_on(worker(w, cmds, shared, stop, limit));
                // Connections cut at shutdown log their lines as the runtime drops them.
                drop(rt);
                log.flush();
            })
            .map_err(|e| StartError(format!("cannot start worker thread: {e}")))?;
        threads.push(t);
    }

    control.block_on(async {
        let local = inline.take().map(|cmds| {
            tokio::spawn(worker(
                0,
                cmds,
                Arc::clone(&shared),
                stop_rx.clone(),
                Arc::clone(&limit),
            ))
        });
        let (reload_tx, reload_rx) = mpsc::channel(8);
        if let Some(l) = admin {
            match TcpListener::from_std(l) {
                Ok(l) => {
                    if let Ok(a) = l.local_addr() {
                        tracing::info!(addr = %a, "admin listening");
                    }
                    let handle = AdminHandle {
                        shared: Arc::clone(&shared),
                        reload: reload_tx,
                        listeners: Arc::clone(&listeners.shown),
                    };
                    tokio::spawn(crate::admin::serve(l, handle));
                }
                Err(e) => tracing::error!(error = %e, "admin listener failed"),
            }
        }
        listeners.apply(plan);
        if let Some(r) = ready {
            let _ = r.send(listeners.bound.iter().map(|(_, b)| *b).collect());
        }
        let mut control = Control {
            checkers: crate::health::start(&shared.runtime.load()),
            shared: Arc::clone(&shared),
            path,
            workers,
            listeners,
            discovery,
        };
        control.wait_for_stop(stop, reload_rx, resolved).await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        let _ = stop_tx.send(true);
        if let Some(local) = local {
            let _ = local.await;
        }
    });
    // Connections cut at shutdown log their lines as the runtime drops them.
    drop(control);
    for t in threads {
        let _ = t.join();
    }
    shared.log.close();
    tracing::info!("stopped");
    Ok(())
}

/// The control thread's state: everything a reload changes.
struct Control {
    shared: Arc<Shared>,
    path: PathBuf,
    workers: usize,
    listeners: Listeners,
    /// The active health checkers of the running configuration.
    checkers: crate::health::Checkers,
    /// DNS discovery for `resolve = true` names.
    discovery: Discovery,
}

impl Control {
    /// Wait for SIGTERM/SIGINT (or the `stop` channel); meanwhile reload on
    /// SIGHUP and on the admin's `POST /reload`, and reopen the access log on
    /// SIGUSR1. Reloads run here one at a time, whatever asked for them.
    async fn wait_for_stop(
        &mut self,
        stop: Option<watch::Receiver<bool>>,
        mut reloads: mpsc::Receiver<ReloadReply>,
        mut resolved: mpsc::UnboundedReceiver<Resolved>,
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
        loop {
            let stop_fut = async {
                match stop.as_mut() {
                    Some(s) => {
                        let _ = s.wait_for(|v| *v).await;
                    }
                    None => std::future::pending().await,
                }
            };
            let due = self.discovery.next_due();
            let resolve_due = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = stop_fut => return,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    let _ = self.reload().await;
                }
                Some(reply) = reloads.recv() => {
                    tracing::info!("admin API: reloading the configuration");
                    let _ = reply.send(self.reload().await);
                }
                _ = usr1.recv() => self.shared.log.reopen(),
                _ = resolve_due => self.discovery.start_due(),
                Some((target, result)) = resolved.recv() => {
                    if self.discovery.record(target, result) {
                        self.apply_discovered();
                    }
                }
            }
        }
    }

    /// Re-read the config file and apply it: listeners, then a new runtime (peers
    /// that stay keep their state), then the health checkers. An invalid file, or
    /// a new listen address that cannot be bound, changes nothing.
    async fn reload(&mut self) -> Result<String, String> {
        let metrics = self.shared.metrics;
        let fail = |e: String| {
            metrics.reloads.with_label_values(&["error"]).inc();
            tracing::error!(error = %e, "reload failed; the running configuration is unchanged");
            Err(e)
        };
        // Reading the files and resolving names without `resolve = true`
        // block, so they run off this thread: with one worker, it is also the
        // thread that proxies. New certificates are read now; a file that
        // cannot be used keeps the old ones (and the whole old configuration).
        let path = self.path.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut new = Config::load(&path).map_err(|e| e.to_string())?;
            crate::tls::load(&mut new).map_err(|e| e.to_string())?;
            Ok::<Config, String>(new)
        });
        let new = match read.await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return fail(e),
            Err(e) => return fail(format!("reading the configuration failed: {e}")),
        };
        let plan = match self.listeners.plan(&wanted(&new)) {
            Ok(p) => p,
            Err(e) => return fail(e),
        };
        // New `resolve = true` names are resolved before the file applies.
        let new = match self.discovery.prepare(&new).await {
            Ok(c) => c,
            Err(e) => return fail(e),
        };
        let old = self.shared.runtime.load_full();
        warn_restart_only(&old.config, &new, self.workers);
        let rt = Runtime::build(Arc::new(new), self.workers, Some(&old), metrics);
        drain_removed(&old, &rt);
        let peers: usize = rt.upstreams.iter().map(|u| u.peers().count()).sum();
        let summary = format!(
            "configuration reloaded: {} upstreams, {peers} peers, listeners +{} -{}",
            rt.upstreams.len(),
            plan.added.len(),
            plan.removed.len()
        );
        self.shared.runtime.store(Arc::new(rt));
        self.listeners.apply(plan);
        // Checkers of the old peer set stop; the new set's start from each peer's
        // current verdict.
        self.checkers = crate::health::start(&self.shared.runtime.load());
        metrics.reloads.with_label_values(&["ok"]).inc();
        tracing::info!("{summary}");
        Ok(summary)
    }
}

impl Control {
    /// The addresses of a `resolve = true` name changed: swap in a runtime with
    /// the new set. Addresses that stay keep their peers; new ones ramp up
    /// (`slow_start`); vanished ones are drained.
    fn apply_discovered(&mut self) {
        let old = self.shared.runtime.load_full();
        let cfg = discovery::fill(&old.config, &self.discovery.found);
        let rt = Runtime::build(Arc::new(cfg), self.workers, Some(&old), self.shared.metrics);
        drain_removed(&old, &rt);
        self.shared.runtime.store(Arc::new(rt));
        self.checkers = crate::health::start(&self.shared.runtime.load());
    }
}

/// Peers of `old` whose address is gone from their upstream in `new` drain:
/// requests still running on the old snapshot finish, and none of its retries
/// go there.
fn drain_removed(old: &Runtime, new: &Runtime) {
    for u in &old.upstreams {
        let Some(nu) = new.upstream(&u.cfg.name) else {
            continue;
        };
        for p in u.peers() {
            if !nu.peers().any(|q| q.addr == p.addr) {
                p.set_draining(true);
            }
        }
    }
}

/// A resolution's result, sent back to the control loop.
type Resolved = (Target, Result<(Vec<SocketAddr>, Duration), String>);

/// How soon a name that has never resolved is asked again.
const FIRST_ANSWER_RETRY: Duration = Duration::from_secs(1);

/// The control thread's side of DNS discovery: the last good addresses of each
/// name, and when each is due again.
struct Discovery {
    dns: Option<Arc<Dns>>,
    /// Last good answer per name.
    found: HashMap<Target, Vec<SocketAddr>>,
    /// Next resolution per name (every name the configuration asks for is here).
    due: HashMap<Target, Instant>,
    /// Names with a resolution under way.
    pending: HashSet<Target>,
    tx: mpsc::UnboundedSender<Resolved>,
}

impl Discovery {
    fn new() -> (Discovery, mpsc::UnboundedReceiver<Resolved>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let d = Discovery {
            dns: None,
            found: HashMap::new(),
            due: HashMap::new(),
            pending: HashSet::new(),
            tx,
        };
        (d, rx)
    }

    /// Get ready for the names `cfg` asks to resolve: set up the DNS client (again
    /// when `[resolver]` changed), forget names no longer asked for, and resolve
    /// the new ones (all of them with a new client) now. Returns `cfg` with the
    /// addresses filled in. A name that does not resolve is not an error: it is
    /// logged, keeps its last good set, and is asked again soon.
    async fn prepare(&mut self, cfg: &Config) -> Result<Config, String> {
        let targets = discovery::targets(cfg);
        if targets.is_empty() {
            self.dns = None;
            self.found.clear();
            self.due.clear();
            return Ok(cfg.clone());
        }
        let fresh = self.dns.as_ref().is_none_or(|d| d.settings != cfg.resolver);
        let dns = match &self.dns {
            Some(d) if !fresh => Arc::clone(d),
            _ => Arc::new(Dns::new(&cfg.resolver)?),
        };
        self.dns = Some(Arc::clone(&dns));
        self.found.retain(|t, _| targets.contains(t));
        self.due.retain(|t, _| targets.contains(t));
        let mut lookups = tokio::task::JoinSet::new();
        for t in &targets {
            if fresh || !self.found.contains_key(t) {
                let (dns, t) = (Arc::clone(&dns), t.clone());
                lookups.spawn(async move {
                    let r = dns.resolve(&t).await;
                    (t, r)
                });
            }
        }
        while let Some(done) = lookups.join_next().await {
            if let Ok((t, r)) = done {
                self.due.insert(t.clone(), Instant::now());
                self.record(t, r);
            }
        }
        for t in targets {
            self.due.entry(t).or_insert_with(Instant::now);
        }
        Ok(discovery::fill(cfg, &self.found))
    }

    /// When the next resolution is due (none while there is nothing to resolve).
    fn next_due(&self) -> Option<Instant> {
        self.due
            .iter()
            .filter(|(t, _)| !self.pending.contains(*t))
            .map(|(_, at)| *at)
            .min()
    }

    /// Start the resolutions that are due; results come back on the channel.
    fn start_due(&mut self) {
        let Some(dns) = &self.dns else {
            return;
        };
        let now = Instant::now();
        for (t, at) in &self.due {
            if *at <= now && self.pending.insert(t.clone()) {
                let (dns, t, tx) = (Arc::clone(dns), t.clone(), self.tx.clone());
                tokio::spawn(async move {
                    let r = dns.resolve(&t).await;
                    let _ = tx.send((t, r));
                });
            }
        }
    }

    /// Take in a resolution's result and schedule the next; whether the name's
    /// set of addresses changed. A failure keeps the last good set.
    fn record(&mut self, t: Target, r: Result<(Vec<SocketAddr>, Duration), String>) -> bool {
        self.pending.remove(&t);
        if !self.due.contains_key(&t) {
            // No longer asked for (a reload removed it meanwhile).
            return false;
        }
        let interval = self
            .dns
            .as_ref()
            .map_or(Duration::from_secs(5), |d| d.settings.resolve_interval);
        match r {
            Ok((addrs, next)) => {
                self.due.insert(t.clone(), Instant::now() + next);
                if self.found.get(&t) == Some(&addrs) {
                    return false;
                }
                let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                let before = self.found.insert(t.clone(), addrs).map_or(0, |v| v.len());
                tracing::info!(name = %t, addresses = %list.join(" "), before, "DNS: the set of addresses changed");
                true
            }
            Err(e) => {
                let kept = self.found.get(&t).map_or(0, Vec::len);
                let retry = if kept == 0 {
                    FIRST_ANSWER_RETRY.min(interval)
                } else {
                    interval
                };
                self.due.insert(t.clone(), Instant::now() + retry);
                tracing::warn!(name = %t, error = %e, kept, "DNS: cannot resolve; keeping the last good set of addresses");
                false
            }
        }
    }
}

/// Log the changes a reload cannot apply to a running process.
fn warn_restart_only(old: &Config, new: &Config, workers: usize) {
    let mut keys = Vec::new();
    if worker_count(new) != workers {
        keys.push("server.workers");
    }
    if new.server.max_connections != old.server.max_connections {
        keys.push("server.max_connections");
    }
    if new.admin.listen != old.admin.listen {
        keys.push("admin.listen");
    }
    if new.log.access != old.log.access || new.log.format != old.log.format {
        keys.push("log");
    }
    if !keys.is_empty() {
        tracing::warn!(
            keys = %keys.join(", "),
            "these changes take effect at restart; the rest of the configuration is applied"
        );
    }
}

/// One worker: accept on the sockets the control thread hands over until
/// shutdown, then wait (up to `shutdown_timeout`) for its connections to end.
async fn worker(
    w: usize,
    mut cmds: mpsc::UnboundedReceiver<ListenerCmd>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    limit: Arc<Semaphore>,
) {
    let tracker = Arc::new(Tracker::default());
    // Dropping a listener's sender stops its accept loop.
    let mut accepting: Vec<(SocketAddr, oneshot::Sender<()>)> = Vec::new();
    let mut stopping = stop.clone();
    let mut commands_open = true;
    loop {
        tokio::select! {
            _ = stopping.wait_for(|v| *v) => break,
            cmd = cmds.recv(), if commands_open => match cmd {
                Some(ListenerCmd::Add(addr, l, kind)) => {
                    let l = match TcpListener::from_std(l) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(worker = w, addr = %addr, error = %e, "cannot use listener");
                            continue;
                        }
                    };
                    let (close_tx, close_rx) = oneshot::channel();
                    accepting.push((addr, close_tx));
                    tokio::spawn(accept_loop(
                        w,
                        l,
                        kind,
                        Arc::clone(&shared),
                        stop.clone(),
                        close_rx,
                        Arc::clone(&limit),
                        Arc::clone(&tracker),
                    ));
                }
                Some(ListenerCmd::Remove(addr)) => accepting.retain(|(a, _)| *a != addr),
                None => commands_open = false,
            },
        }
    }
    drop(accepting);
    // Connections waiting for a request close now.
    crate::conn::wake_stop_watchers();
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

#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    w: usize,
    listener: TcpListener,
    kind: Kind,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    mut close: oneshot::Receiver<()>,
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
            _ = &mut close => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|v| *v) => return,
            _ = &mut close => return,
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
        // One accept per turn, as nginx without `multi_accept`: the connections
        // accepted so far read their requests first, so a burst of new clients
        // finds pooled upstream connections free again instead of opening a
        // new one each (and holding their memory) all at once.
        tokio::task::yield_now().await;
        counters.handled.fetch_add(1, Relaxed);
        tracker.open.fetch_add(1, Relaxed);
        let open = Open {
            _permit: permit,
            tracker: Arc::clone(&tracker),
        };
        let scheme = match kind {
            Kind::Plain => "http",
            Kind::Tls => "https",
        };
        let client = Client::new(w, remote, Arc::clone(&shared), stop.clone(), scheme, open);
        match kind {
            Kind::Plain => {
                tokio::spawn(serve_connection(stream, client));
            }
            // Boxed, as HTTP/2 is: inline, the larger state of the rarer kinds
            // of connection would be held by every plain HTTP/1.1 one.
            Kind::Tls => {
                tokio::spawn(Box::pin(serve_tls(stream, client)));
            }
        }
    }
}

/// A connection's hold on the `max_connections` limit and on the count that
/// graceful shutdown waits for; released when the connection ends.
#[derive(Debug)]
pub struct Open {
    _permit: tokio::sync::OwnedSemaphorePermit,
    tracker: Arc<Tracker>,
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.tracker.open.fetch_sub(1, Relaxed) == 1 {
            self.tracker.idle.notify_waiters();
        }
    }
}

/// The first bytes of an HTTP/2 connection with prior knowledge (RFC 9113 3.4).
pub(crate) const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Streams a client may reset before ferry accepted them, per connection; the
/// next one ends the connection with GOAWAY `ENHANCE_YOUR_CALM`. This is the
/// "rapid reset" defence (CVE-2023-44487): a flood of opened-and-reset streams
/// is all pending-accept resets, since the h2 state machine reads whole
/// batches of frames before the server takes the streams (h2's own default).
const H2_MAX_PENDING_ACCEPT_RESETS: usize = 20;

/// Streams ferry itself may reset for a client's protocol errors, per
/// connection, before closing it with `ENHANCE_YOUR_CALM` (h2's default; it
/// bounds the "MadeYouReset" variant of the same attack).
const H2_MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// An accepted client connection before its protocol is chosen: what serving it
/// needs besides the byte stream. A TLS listener makes one per connection and
/// calls [`crate::h1::serve`] or [`serve_h2`] by the ALPN result.
pub struct Client {
    /// The worker serving it.
    pub worker: usize,
    /// The client's address.
    pub remote: SocketAddr,
    /// Process-wide state.
    pub shared: Arc<Shared>,
    /// Fires at shutdown.
    pub stop: watch::Receiver<bool>,
    /// `http` or `https`, for X-Forwarded-Proto.
    pub scheme: &'static str,
    /// stub_status state; counted as Waiting from here on.
    pub state: Arc<ConnState>,
    /// Released when the connection ends.
    pub open: Open,
}

impl Client {
    /// A new client connection, counted as Waiting.
    pub fn new(
        worker: usize,
        remote: SocketAddr,
        shared: Arc<Shared>,
        stop: watch::Receiver<bool>,
        scheme: &'static str,
        open: Open,
    ) -> Client {
        let state = Arc::new(ConnState::new(shared.metrics.worker(worker)));
        Client {
            worker,
            remote,
            shared,
            stop,
            scheme,
            state,
            open,
        }
    }

    fn keepalive_ms(&self) -> u64 {
        self.shared
            .runtime
            .load()
            .config
            .server
            .keepalive_timeout
            .as_millis() as u64
    }

    /// The context of the connection's requests; `ticked`: the connection's
    /// loop wakes a request by its [`Ctx::read_deadline`].
    pub(crate) fn ctx(&self, multiplexed: bool, ticked: bool) -> Arc<Ctx> {
        Arc::new(Ctx {
            shared: Arc::clone(&self.shared),
            worker: self.worker,
            remote: self.remote,
            state: Arc::clone(&self.state),
            scheme: self.scheme,
            multiplexed,
            client_ip: http::HeaderValue::from_str(&self.remote.ip().to_string())
                .unwrap_or(http::HeaderValue::from_static("")),
            ticked,
            read_deadline: std::sync::atomic::AtomicU64::new(0),
        })
    }
}

/// Serve a plain-TCP client: HTTP/2 when it opens with the prior-knowledge
/// preface (and `http2` is on), HTTP/1.1 otherwise. The loop in [`crate::h1`]
/// reads the first bytes and tells which.
fn serve_connection(
    stream: tokio::net::TcpStream,
    client: Client,
) -> impl Future<Output = ()> + Send + 'static {
    let _ = stream.set_nodelay(true);
    let http2 = client.shared.runtime.load().config.server.http2;
    crate::h1::serve(stream, client, http2)
}

/// A connection on a TLS listener: the TLS handshake (within
/// `client_header_timeout`, as nginx times it), then HTTP/2 or HTTP/1.1 over the
/// decrypted stream, as ALPN chose. The connection counts as open (Waiting) from
/// the accept on. A failed handshake ends this connection only: it is counted in
/// `ferry_tls_handshake_errors_total` and logged at debug level.
async fn serve_tls(stream: tokio::net::TcpStream, mut client: Client) {
    let _ = stream.set_nodelay(true);
    let (acceptor, timeout) = {
        let rt = client.shared.runtime.load();
        let tls = rt.config.tls.as_ref().and_then(|t| t.loaded.as_ref());
        (
            tls.map(|t| t.acceptor.clone()),
            rt.config.server.client_header_timeout,
        )
    };
    // None: a reload removed [tls] just as this connection was accepted.
    let Some(acceptor) = acceptor else {
        return;
    };
    let metrics = client.shared.metrics;
    let remote = client.remote;
    let handshake = tokio::time::timeout(timeout, acceptor.accept(stream));
    let done = tokio::select! {
        r = handshake => r,
        _ = client.stop.wait_for(|v| *v) => return,
    };
    let tls = match done {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            metrics.tls_handshake_errors.inc();
            tracing::debug!(client = %remote, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics.tls_handshake_errors.inc();
            tracing::debug!(client = %remote, "TLS handshake timed out");
            return;
        }
    };
    match tls.get_ref().1.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => metrics.tls_handshakes_resumed.inc(),
        _ => metrics.tls_handshakes_full.inc(),
    }
    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
        serve_h2(tls, client).await
    } else {
        crate::h1::serve(tls, client, false).await
    }
}

/// Serve HTTP/1.1 with hyper on `io` (already wrapped in [`crate::conn::ClientIo`]) until the
/// client or a timeout ends the connection: requests with bodies, upgrades,
/// HTTP/1.0 clients, and the errors hyper answers.
pub(crate) async fn serve_h1_hyper<I>(io: I, client: Client)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = client.ctx(false, false);
    let svc = service_fn(move |req: Request<Incoming>| {
        let answer = handle(Arc::clone(&ctx), req.map(ClientBody::Incoming));
        async move { answer.await.map(crate::proxy::with_header_map) }
    });
    let conn = http1::Builder::new()
        .keep_alive(client.keepalive_ms() > 0)
        .max_buf_size(MAX_HEAD + 1024)
        // max_buf_size alone is loose (a read may fill the buffer's whole spare
        // capacity, so a head up to twice as large can parse); this is exact.
        .max_header_size(MAX_HEAD)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    drive(conn, |c| c.graceful_shutdown(), client, false).await;
}

/// Serve HTTP/2 on `io` (after the h2c preface, or a TLS handshake that chose
/// `h2`). Each stream is a request of its own, forwarded like an HTTP/1.1 one;
/// the stream tasks run on this worker's runtime, so they use its upstream pool.
pub async fn serve_h2<I>(io: I, client: Client)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = client.ctx(true, false);
    let (streams, header_size) = {
        let rt = client.shared.runtime.load();
        let s = &rt.config.server;
        (s.http2_max_concurrent_streams, s.http2_max_header_size)
    };
    let svc = service_fn(move |req: Request<Incoming>| {
        let answer = handle(Arc::clone(&ctx), req.map(ClientBody::Incoming));
        async move { answer.await.map(crate::proxy::with_header_map) }
    });
    // Tokio's spawn on a current-thread runtime keeps the stream tasks on this
    // worker's thread, with its thread-local upstream pool.
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.max_concurrent_streams(streams)
        .max_header_list_size(header_size)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS);
    let conn = b.serve_connection(TokioIo::new(io), svc);
    drive(conn, |c| c.graceful_shutdown(), client, true).await;
}

/// Run a client connection to its end, enforcing `client_header_timeout` and
/// `keepalive_timeout` and closing gracefully at shutdown (HTTP/2: GOAWAY, the
/// streams in progress finish).
async fn drive<C, E>(conn: C, shutdown: impl Fn(Pin<&mut C>), mut client: Client, multiplexed: bool)
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let state = Arc::clone(&client.state);
    let remote = client.remote;
    let (header_ms, keepalive_ms) = {
        let rt = client.shared.runtime.load();
        (
            rt.config.server.client_header_timeout.as_millis() as u64,
            rt.config.server.keepalive_timeout.as_millis() as u64,
        )
    };
    let stop = &mut client.stop;
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
    let mut idle_closed = false;
    if closing {
        shutdown(conn.as_mut());
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
                if idle_closed {
                    // An idle HTTP/2 client that does not finish the GOAWAY
                    // exchange (answer its PING, close) within the header timeout.
                    break;
                }
                match state.due(header_ms, keepalive_ms, period) {
                    // Slow request head: close without an answer, as nginx does.
                    Due::Passed(READING) => break,
                    Due::Passed(_) => {
                        shutdown(conn.as_mut());
                        closing = true;
                        idle_closed = true;
                        sleep.as_mut().reset(Instant::now() + Duration::from_millis(header_ms));
                    }
                    Due::In(ms) => sleep.as_mut().reset(Instant::now() + Duration::from_millis(ms)),
                }
            }
            _ = state.abusive(), if multiplexed => {
                tracing::warn!(client = %remote, "client resets most of its HTTP/2 streams; closing the connection");
                break;
            }
            _ = stop.wait_for(|v| *v), if !closing => {
                closing = true;
                shutdown(conn.as_mut());
            }
        }
    }
    state.close();
}
