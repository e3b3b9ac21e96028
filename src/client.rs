//! The pooled keep-alive upstream client.
//!
//! Each worker thread runs its own single-threaded runtime and keeps its own pool
//! of HTTP/1.1 connections per peer, like an nginx worker: no lock and no
//! cross-thread traffic on the request path. The number of idle connections per
//! peer is bounded across all workers by a counter on the peer.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::ReqBody;
use crate::config::UpstreamTls;
use crate::peer::Peer;
use crate::tls::ClientTls;

/// How often a worker sweeps its pool for expired or closed idle connections.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// An upstream connection, checked out of the pool (or new).
#[derive(Debug)]
pub struct Conn {
    /// The request sender.
    pub tx: SendRequest<ReqBody>,
    /// True when it was opened for this request (not reused).
    pub fresh: bool,
    /// How long it sat idle in the pool before this use.
    pub idle: Duration,
}

struct Idle {
    tx: SendRequest<ReqBody>,
    since: Instant,
    peer: Arc<Peer>,
    timeout: Duration,
}

#[derive(Default)]
struct Pool {
    idle: HashMap<usize, Vec<Idle>>,
    sweeper: bool,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
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
    /// The HTTP handshake failed.
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

/// Take an idle connection to `peer` from this worker's pool, newest first.
pub fn checkout(peer: &Peer) -> Option<Conn> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let list = pool.idle.get_mut(&peer.id)?;
        let now = Instant::now();
        while let Some(idle) = list.pop() {
            peer.idle_conns.fetch_sub(1, Relaxed);
            if idle.tx.is_closed() || now.duration_since(idle.since) >= idle.timeout {
                continue;
            }
            return Some(Conn {
                tx: idle.tx,
                fresh: false,
                idle: now.duration_since(idle.since),
            });
        }
        None
    })
}

/// Give a connection back after its response ended. It is closed instead when the
/// peer already has `max_idle` idle connections or keep-alive is off.
pub fn checkin(peer: &Arc<Peer>, tx: SendRequest<ReqBody>, max_idle: usize, timeout: Duration) {
    if tx.is_closed() || max_idle == 0 || timeout.is_zero() {
        return;
    }
    if peer.idle_conns.fetch_add(1, Relaxed) as usize >= max_idle {
        peer.idle_conns.fetch_sub(1, Relaxed);
        return;
    }
    let start_sweeper = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        pool.idle.entry(peer.id).or_default().push(Idle {
            tx,
            since: Instant::now(),
            peer: Arc::clone(peer),
            timeout,
        });
        !std::mem::replace(&mut pool.sweeper, true)
    });
    if start_sweeper {
        tokio::spawn(sweep_forever());
    }
}

/// Close expired and dead idle connections of this worker.
fn sweep() {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let now = Instant::now();
        pool.idle.retain(|_, list| {
            list.retain(|idle| {
                let keep = !idle.tx.is_closed() && now.duration_since(idle.since) < idle.timeout;
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
    let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(peer.addr)).await {
        Err(_) => return Err(ConnectError::Timeout),
        Ok(Err(e)) => return Err(ConnectError::Io(e)),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    peer.stats.connects.fetch_add(1, Relaxed);
    let tx = match tls {
        None => handshake(stream).await?,
        Some(tls) => {
            // Settings are loaded with the file; never fall back to plain text.
            let tls: &ClientTls = tls.loaded.as_ref().ok_or_else(|| {
                ConnectError::Tls(io::Error::other("TLS client settings not loaded"))
            })?;
            let hello = tls.connect(&peer.params.name, stream);
            match tokio::time::timeout_at(deadline, hello).await {
                Err(_) => return Err(ConnectError::Timeout),
                Ok(Err(e)) => return Err(ConnectError::Tls(e)),
                Ok(Ok(s)) => handshake(s).await?,
            }
        }
    };
    Ok(Conn {
        tx,
        fresh: true,
        idle: Duration::ZERO,
    })
}

/// Start HTTP/1.1 on a connected stream; its connection task runs on this worker.
async fn handshake<I>(io: I) -> Result<SendRequest<ReqBody>, ConnectError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = http1::Builder::new()
        .preserve_header_case(false)
        .handshake(TokioIo::new(io))
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(tx)
}
