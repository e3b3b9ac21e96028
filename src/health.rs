//! Active health checks: one task per peer of every upstream that has a
//! `[upstream.health_check]`, each on its own connection (never the pool).
//!
//! The consecutive pass/fail counters stay private to the checker; the peer only
//! learns the verdict, and only transitions are logged.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::config::{HealthCheckConfig, UpstreamScheme, UpstreamTls};
use crate::peer::Peer;
use crate::runtime::Runtime;

/// Largest body read when `expect_body` is set.
const MAX_BODY: usize = 64 * 1024;

/// The running checkers; dropping this stops them.
#[derive(Debug, Default)]
pub struct Checkers {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Checkers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Start a checker for every peer of every upstream with a health check.
pub fn start(rt: &Runtime) -> Checkers {
    let mut tasks = Vec::new();
    for up in &rt.upstreams {
        let Some(hc) = &up.cfg.health_check else {
            continue;
        };
        let hc = Arc::new(hc.clone());
        let scheme = up.cfg.scheme;
        let tls = up.cfg.tls.clone().map(Arc::new);
        for peer in up.peers() {
            let (peer, hc, name) = (Arc::clone(peer), Arc::clone(&hc), up.cfg.name.clone());
            let tls = tls.clone();
            tasks.push(tokio::spawn(check_forever(name, peer, hc, scheme, tls)));
        }
    }
    Checkers { tasks }
}

/// Consecutive results, turned into transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    healthy: bool,
    passes: u32,
    fails: u32,
}

impl Counter {
    /// Start from the peer's current verdict.
    pub fn new(healthy: bool) -> Counter {
        Counter {
            healthy,
            passes: 0,
            fails: 0,
        }
    }

    /// Record one result; returns the new verdict when it changed.
    pub fn record(&mut self, pass: bool, rise: u32, fall: u32) -> Option<bool> {
        if pass {
            self.fails = 0;
            self.passes = self.passes.saturating_add(1);
            if !self.healthy && self.passes >= rise.max(1) {
                self.healthy = true;
                return Some(true);
            }
        } else {
            self.passes = 0;
            self.fails = self.fails.saturating_add(1);
            if self.healthy && self.fails >= fall.max(1) {
                self.healthy = false;
                return Some(false);
            }
        }
        None
    }
}

/// `interval` ± 10%, so checks of many peers do not beat in step.
fn jittered(interval: Duration) -> Duration {
    let ms = interval.as_millis() as u64;
    let spread = ms / 10;
    if spread == 0 {
        return interval;
    }
    Duration::from_millis(ms - spread + fastrand::u64(0..=2 * spread))
}

async fn check_forever(
    upstream: String,
    peer: Arc<Peer>,
    hc: Arc<HealthCheckConfig>,
    scheme: UpstreamScheme,
    tls: Option<Arc<UpstreamTls>>,
) {
    let mut counter = Counter::new(peer.is_healthy());
    // A peer that starts unhealthy (mandatory checks) needs one pass to join.
    let mut first_rise = if peer.is_healthy() { hc.rise } else { 1 };
    // Spread the first checks over one interval.
    tokio::time::sleep(Duration::from_millis(fastrand::u64(
        0..=hc.interval.as_millis() as u64 / 2,
    )))
    .await;
    loop {
        let result = check_once(&peer, &hc, scheme, tls.as_deref()).await;
        let pass = result.is_ok();
        if let Some(healthy) = counter.record(pass, first_rise, hc.fall) {
            first_rise = hc.rise;
            peer.set_healthy(healthy);
            if healthy {
                tracing::info!(upstream = %upstream, peer = %peer.addr_str, "health check passed: peer is healthy");
            } else {
                tracing::warn!(upstream = %upstream, peer = %peer.addr_str, error = %result.err().unwrap_or_default(), "health check failed: peer is unhealthy");
            }
        }
        tokio::time::sleep(jittered(hc.interval)).await;
    }
}

/// One check: connect (with TLS for `https` and `h2` upstreams), GET (in the
/// upstream's protocol), compare status (and body). `Err` says why it failed.
pub async fn check_once(
    peer: &Peer,
    hc: &HealthCheckConfig,
    scheme: UpstreamScheme,
    tls: Option<&UpstreamTls>,
) -> Result<(), String> {
    match tokio::time::timeout(hc.timeout, probe(peer, hc, scheme, tls)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {:?}", hc.timeout)),
    }
}

/// Send the check's request on a new connection; the response and the
/// connection's task.
async fn send_probe(
    peer: &Peer,
    hc: &HealthCheckConfig,
    scheme: UpstreamScheme,
    tls: Option<&UpstreamTls>,
) -> Result<(http::Response<hyper::body::Incoming>, JoinHandle<()>), String> {
    let stream = TcpStream::connect(peer.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    match tls {
        None => exchange(stream, peer, hc, scheme).await,
        Some(t) => {
            let t = t.loaded.as_ref().ok_or("TLS client settings not loaded")?;
            let s = t
                .connect(&peer.params.name, stream)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            exchange(s, peer, hc, scheme).await
        }
    }
}

/// The check's request and response on a connected stream.
async fn exchange<I>(
    io: I,
    peer: &Peer,
    hc: &HealthCheckConfig,
    scheme: UpstreamScheme,
) -> Result<(http::Response<hyper::body::Incoming>, JoinHandle<()>), String>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let host = hc.host.clone().unwrap_or_else(|| peer.addr_str.to_string());
    let req = Request::get(hc.path.as_str()).header(header::USER_AGENT, "ferry-health-check");
    if scheme.is_h2() {
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let uri_scheme = if scheme.is_tls() { "https" } else { "http" };
        let req = req
            .uri(format!("{uri_scheme}://{host}{}", hc.path))
            .version(http::Version::HTTP_2)
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("bad request: {e}"))?;
        let resp = tx.send_request(req).await;
        Ok((resp.map_err(|e| format!("request: {e}"))?, conn))
    } else {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = req
            .header(header::HOST, host)
            .header(header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("bad request: {e}"))?;
        let resp = tx.send_request(req).await;
        Ok((resp.map_err(|e| format!("request: {e}"))?, conn))
    }
}

async fn probe(
    peer: &Peer,
    hc: &HealthCheckConfig,
    scheme: UpstreamScheme,
    tls: Option<&UpstreamTls>,
) -> Result<(), String> {
    let (resp, conn) = send_probe(peer, hc, scheme, tls).await?;
    let status = resp.status().as_u16();
    let (lo, hi) = hc.expect_status;
    if status < lo || status > hi {
        conn.abort();
        return Err(format!("status {status} outside {lo}-{hi}"));
    }
    if let Some(want) = &hc.expect_body {
        let mut body = resp.into_body();
        let mut seen = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("body: {e}"))?;
            if let Some(d) = frame.data_ref() {
                seen.extend_from_slice(d);
            }
            if seen.len() >= MAX_BODY {
                break;
            }
        }
        conn.abort();
        if !seen
            .windows(want.len().max(1))
            .any(|w| w == want.as_bytes())
        {
            return Err(format!("body does not contain {want:?}"));
        }
    } else {
        conn.abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_needs_fall_then_rise_in_a_row() {
        let mut c = Counter::new(true);
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.record(true, 2, 3), None); // a pass resets the fail run
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), Some(false));
        assert_eq!(c.record(false, 2, 3), None); // reported once
        assert_eq!(c.record(true, 2, 3), None);
        assert_eq!(c.record(true, 2, 3), Some(true));
        assert_eq!(c.record(true, 2, 3), None);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..1000 {
            let j = jittered(Duration::from_secs(2));
            assert!(j >= Duration::from_millis(1800) && j <= Duration::from_millis(2200));
        }
    }

    fn hc(path: &str) -> HealthCheckConfig {
        HealthCheckConfig {
            path: path.into(),
            host: None,
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 3,
            expect_status: (200, 399),
            expect_body: None,
            mandatory: false,
        }
    }

    fn peer(addr: std::net::SocketAddr) -> Peer {
        Peer::new(
            addr,
            crate::peer::PeerParams {
                name: addr.to_string(),
                weight: 1,
                max_fails: 1,
                fail_timeout: Duration::from_secs(10),
                max_conns: 0,
                backup: false,
                down: false,
                slow_start: Duration::ZERO,
            },
        )
    }

    #[tokio::test]
    async fn checks_status_and_body_against_a_real_server() {
        let b = crate::demo::Backend::start("127.0.0.1:0".parse().unwrap(), "hc")
            .await
            .unwrap();
        let p = peer(b.addr);
        assert_eq!(
            check_once(&p, &hc("/"), UpstreamScheme::Http, None).await,
            Ok(())
        );
        let e = check_once(&p, &hc("/status/503"), UpstreamScheme::Http, None)
            .await
            .unwrap_err();
        assert!(e.contains("status 503"), "{e}");
        let mut want = hc("/");
        want.expect_body = Some("hello from hc".into());
        assert_eq!(
            check_once(&p, &want, UpstreamScheme::Http, None).await,
            Ok(())
        );
        want.expect_body = Some("nope".into());
        assert!(
            check_once(&p, &want, UpstreamScheme::Http, None)
                .await
                .unwrap_err()
                .contains("body")
        );
    }

    #[tokio::test]
    async fn a_closed_port_or_a_hang_fails() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = l.local_addr().unwrap();
        drop(l);
        assert!(
            check_once(&peer(closed), &hc("/"), UpstreamScheme::Http, None)
                .await
                .unwrap_err()
                .contains("connect")
        );
        let b = crate::demo::Backend::start("127.0.0.1:0".parse().unwrap(), "hang")
            .await
            .unwrap();
        b.knobs.hang.store(1, std::sync::atomic::Ordering::Relaxed);
        let mut quick = hc("/");
        quick.timeout = Duration::from_millis(300);
        assert!(
            check_once(&peer(b.addr), &quick, UpstreamScheme::Http, None)
                .await
                .unwrap_err()
                .contains("timed out")
        );
    }
}
