//! The pooled keep-alive upstream client.
//!
//! Each worker thread runs its own single-threaded runtime and keeps its own pool
//! of HTTP/1.1 connections per peer, like an nginx worker: no lock and no
//! cross-thread traffic on the request path. The number of idle connections per
//! peer is bounded across all workers by a counter on the peer.
//!
//! Peers of `scheme = "h2c"` upstreams get one multiplexed HTTP/2 connection
//! per worker instead, shared by all of that worker's requests to the peer.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::ReqBody;
use crate::config::UpstreamTls;
use crate::peer::Peer;
use crate::tls::ClientTls;
pub use crate::upstream_h1::Conn;
use crate::upstream_h1::UpIo;

/// How often a worker sweeps its pool for expired or closed idle connections.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

struct Idle {
    conn: Conn,
    since: Instant,
    peer: Arc<Peer>,
    timeout: Duration,
}

/// Hashes a peer id (a small counter) with one multiply: the pool is looked
/// up twice per request, and SipHash's resistance to chosen keys buys nothing
/// for ids ferry makes itself.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_usize(&mut self, n: usize) {
        // Fibonacci hashing: spreads consecutive ids over the high bits the
        // table uses.
        self.0 = (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type ById<V> = HashMap<usize, V, std::hash::BuildHasherDefault<IdHasher>>;

#[derive(Default)]
struct Pool {
    idle: ById<Vec<Idle>>,
    sweeper: bool,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
    static H2: RefCell<ById<Arc<H2Slot>>> = RefCell::new(ById::default());
}

/// This worker's HTTP/2 connection to one peer. The lock is held while
/// connecting, so requests arriving meanwhile wait for that connection rather
/// than each opening their own.
#[derive(Default)]
struct H2Slot(tokio::sync::Mutex<H2State>);

#[derive(Default)]
struct H2State {
    conn: Option<H2Conn>,
    /// The last connect that failed: when, and how. Requests that waited for
    /// it fail the same way at once instead of each trying (and perhaps
    /// timing out) in turn.
    failed: Option<(Instant, FailedConnect)>,
}

#[derive(Clone)]
enum FailedConnect {
    Timeout,
    Other(String),
}

struct H2Conn {
    tx: http2::SendRequest<ReqBody>,
    /// Last time a request was sent on it.
    used: Instant,
    /// Closed after this long unused (the upstream's `keepalive_timeout`).
    timeout: Duration,
}

/// Why a connection could not be had.
#[derive(Debug)]
pub enum ConnectError {
    /// `connect_timeout` passed.
    Timeout,
    /// The connect failed.
    Io(io::Error),
    /// The TLS handshake with an `https` peer failed (its certificate did not
    /// verify, say).
    Tls(io::Error),
    /// The HTTP/2 handshake failed.
    Handshake(hyper::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Timeout => f.write_str("connect timed out"),
            ConnectError::Io(e) => write!(f, "connect failed: {e}"),
            ConnectError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            ConnectError::Handshake(e) => write!(f, "handshake failed: {e}"),
        }
    }
}

/// Take an idle connection to `peer` from this worker's pool, newest first;
/// `now` is the time (the caller's clock reading).
pub fn checkout(peer: &Peer, now: Instant) -> Option<Conn> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let list = pool.idle.get_mut(&peer.id)?;
        while let Some(mut idle) = list.pop() {
            peer.idle_conns.fetch_sub(1, Relaxed);
            let idle_for = now.saturating_duration_since(idle.since);
            if idle_for >= idle.timeout || !idle.conn.is_usable() {
                continue;
            }
            idle.conn.fresh = false;
            idle.conn.idle = idle_for;
            return Some(idle.conn);
        }
        None
    })
}

/// Give a connection back after its response ended (`now`: a clock reading
/// taken then). It is closed instead when the peer already has `max_idle` idle
/// connections or keep-alive is off.
pub fn checkin(peer: &Arc<Peer>, conn: Conn, max_idle: usize, timeout: Duration, now: Instant) {
    if max_idle == 0 || timeout.is_zero() {
        return;
    }
    if peer.idle_conns.fetch_add(1, Relaxed) as usize >= max_idle {
        peer.idle_conns.fetch_sub(1, Relaxed);
        return;
    }
    let start_sweeper = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        pool.idle.entry(peer.id).or_default().push(Idle {
            conn,
            since: now,
            peer: Arc::clone(peer),
            timeout,
        });
        !std::mem::replace(&mut pool.sweeper, true)
    });
    if start_sweeper {
        tokio::spawn(sweep_forever());
    }
}

/// A request sender on this worker's HTTP/2 connection to `peer`, opened (within
/// `timeout`) when there is none or it closed. The flag is true when it was
/// opened for this request.
pub async fn h2_sender(
    peer: &Peer,
    connect_timeout: Duration,
    idle_timeout: Duration,
    tls: Option<&UpstreamTls>,
) -> Result<(http2::SendRequest<ReqBody>, bool), ConnectError> {
    let slot = H2.with(|m| Arc::clone(m.borrow_mut().entry(peer.id).or_default()));
    let asked = Instant::now();
    let mut st = slot.0.lock().await;
    if let Some(c) = st.conn.as_mut()
        && !c.tx.is_closed()
    {
        c.used = Instant::now();
        return Ok((c.tx.clone(), false));
    }
    st.conn = None;
    if let Some((at, how)) = &st.failed
        && *at >= asked
    {
        return Err(match how {
            FailedConnect::Timeout => ConnectError::Timeout,
            FailedConnect::Other(e) => ConnectError::Io(io::Error::other(e.clone())),
        });
    }
    let tx = match connect_h2(peer, connect_timeout, tls).await {
        Ok(tx) => tx,
        Err(e) => {
            let how = match &e {
                ConnectError::Timeout => FailedConnect::Timeout,
                other => FailedConnect::Other(other.to_string()),
            };
            st.failed = Some((Instant::now(), how));
            return Err(e);
        }
    };
    st.failed = None;
    st.conn = Some(H2Conn {
        tx: tx.clone(),
        used: Instant::now(),
        timeout: idle_timeout,
    });
    drop(st);
    let start_sweeper = POOL.with(|pool| !std::mem::replace(&mut pool.borrow_mut().sweeper, true));
    if start_sweeper {
        tokio::spawn(sweep_forever());
    }
    Ok((tx, true))
}

/// Forget this worker's HTTP/2 connection to `peer` (it failed); the next
/// request opens a new one. Streams still running on it finish.
pub fn h2_forget(peer: &Peer) {
    let slot = H2.with(|m| m.borrow_mut().remove(&peer.id));
    if let Some(slot) = slot
        && let Ok(mut st) = slot.0.try_lock()
    {
        st.conn = None;
    }
}

async fn connect_h2(
    peer: &Peer,
    timeout: Duration,
    tls: Option<&UpstreamTls>,
) -> Result<http2::SendRequest<ReqBody>, ConnectError> {
    let deadline = Instant::now() + timeout;
    let stream = dial(peer, deadline).await?;
    match tls {
        None => h2_handshake(stream, deadline).await,
        Some(tls) => {
            let s = tls_hello(tls, peer, stream, deadline).await?;
            if s.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(ConnectError::Tls(io::Error::other(
                    "the server did not agree to HTTP/2 (ALPN h2)",
                )));
            }
            h2_handshake(s, deadline).await
        }
    }
}

/// A TCP connection to `peer`, made by `deadline` (counted in its connects).
async fn dial(peer: &Peer, deadline: Instant) -> Result<TcpStream, ConnectError> {
    let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(peer.addr)).await {
        Err(_) => return Err(ConnectError::Timeout),
        Ok(Err(e)) => return Err(ConnectError::Io(e)),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    peer.stats.connects.fetch_add(1, Relaxed);
    Ok(stream)
}

/// The TLS client handshake on `stream`, by `deadline`.
async fn tls_hello(
    tls: &UpstreamTls,
    peer: &Peer,
    stream: TcpStream,
    deadline: Instant,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    // Settings are loaded with the file; never fall back to plain text.
    let tls: &ClientTls = tls
        .loaded
        .as_ref()
        .ok_or_else(|| ConnectError::Tls(io::Error::other("TLS client settings not loaded")))?;
    let hello = tls.connect(&peer.params.name, stream);
    match tokio::time::timeout_at(deadline, hello).await {
        Err(_) => Err(ConnectError::Timeout),
        Ok(Err(e)) => Err(ConnectError::Tls(e)),
        Ok(Ok(s)) => Ok(s),
    }
}

/// Start HTTP/2 on a connected stream, by `deadline`; its connection task runs
/// on this worker.
async fn h2_handshake<I>(
    io: I,
    deadline: Instant,
) -> Result<http2::SendRequest<ReqBody>, ConnectError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Tokio's spawn on the worker's current-thread runtime keeps the
    // connection's task on this thread.
    let handshake = http2::Builder::new(TokioExecutor::new()).handshake(TokioIo::new(io));
    let (tx, conn) = match tokio::time::timeout_at(deadline, handshake).await {
        Err(_) => return Err(ConnectError::Timeout),
        Ok(r) => r.map_err(ConnectError::Handshake)?,
    };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(tx)
}

/// Close expired and dead idle connections of this worker.
fn sweep() {
    H2.with(|m| {
        let now = Instant::now();
        m.borrow_mut().retain(|_, slot| match slot.0.try_lock() {
            // Being connected right now.
            Err(_) => true,
            Ok(mut st) => {
                let keep = st
                    .conn
                    .as_ref()
                    .is_some_and(|c| !c.tx.is_closed() && now.duration_since(c.used) < c.timeout);
                if !keep {
                    // Dropping the last sender closes the connection once its
                    // streams end.
                    st.conn = None;
                }
                keep
            }
        });
    });
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let now = Instant::now();
        pool.idle.retain(|_, list| {
            list.retain_mut(|idle| {
                let keep = now.duration_since(idle.since) < idle.timeout && idle.conn.is_usable();
                if !keep {
                    idle.peer.idle_conns.fetch_sub(1, Relaxed);
                }
                keep
            });
            !list.is_empty()
        });
    });
}

async fn sweep_forever() {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sweep();
    }
}

/// Open a new connection to `peer` within `timeout` (the TCP connect and, for
/// an `https` upstream, the TLS handshake). TLS connections are pooled exactly
/// as plain ones: the pool holds the HTTP sender, whatever runs beneath it.
pub async fn connect(
    peer: &Peer,
    timeout: Duration,
    tls: Option<&UpstreamTls>,
) -> Result<Conn, ConnectError> {
    let deadline = Instant::now() + timeout;
    let stream = dial(peer, deadline).await?;
    let io = match tls {
        None => UpIo::Plain(stream),
        Some(tls) => UpIo::Tls(Box::new(tls_hello(tls, peer, stream, deadline).await?)),
    };
    Ok(Conn::new(io))
}
