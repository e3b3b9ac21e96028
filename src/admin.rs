//! The admin listener: `/metrics`, `/stub_status`, `/status`, `/healthz`, and the
//! runtime API (`/api/upstreams`, peer drain / undrain / down / up, `/reload`).
//! It runs on the control thread, never on a client-facing listener.
//!
//! Reading is open to whoever reaches the listener; calls that change something
//! (`POST`) need `Authorization: Bearer <[admin] token>` when a token is set.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::peer_state;
use crate::peer::{FailReason, Peer, now_ms};
use crate::proxy::Shared;
use crate::runtime::Upstream;

/// Where the answer to one reload request goes: a summary, or what is wrong.
pub type ReloadReply = oneshot::Sender<Result<String, String>>;

/// What the admin listener needs from the rest of ferry.
#[derive(Clone)]
pub struct AdminHandle {
    /// Process-wide state (the running configuration, metrics).
    pub shared: Arc<Shared>,
    /// Asks the control loop to reload the configuration file.
    pub reload: mpsc::Sender<ReloadReply>,
    /// The client-facing listeners' bound addresses, as `/status` shows them.
    pub listeners: Arc<Mutex<Vec<SocketAddr>>>,
}

type Answer = Response<Full<Bytes>>;

/// Serve the admin endpoints on `listener` forever.
pub async fn serve(listener: TcpListener, handle: AdminHandle) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(route(&handle, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, ctype: &'static str, body: String) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn json(status: StatusCode, doc: &serde_json::Value) -> Answer {
    let mut s = serde_json::to_string_pretty(doc).unwrap_or_default();
    s.push('\n');
    text(status, "application/json", s)
}

fn json_error(status: StatusCode, message: String) -> Answer {
    json(status, &serde_json::json!({ "error": message }))
}

fn method_not_allowed(allow: &'static str) -> Answer {
    let mut r = text(
        StatusCode::METHOD_NOT_ALLOWED,
        "text/plain",
        format!("method not allowed (use {allow})\n"),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// What a request path names.
enum Endpoint<'a> {
    /// Read-only pages.
    Healthz,
    StubStatus,
    Metrics,
    Status,
    Upstreams,
    Upstream(String),
    /// `POST /reload`.
    Reload,
    /// `POST /api/upstreams/{upstream}/peers/{peer}/{action}`.
    PeerAction {
        upstream: String,
        peer: String,
        action: &'a str,
    },
    Unknown,
}

fn endpoint(path: &str) -> Endpoint<'_> {
    match path {
        "/healthz" => return Endpoint::Healthz,
        "/stub_status" => return Endpoint::StubStatus,
        "/metrics" => return Endpoint::Metrics,
        "/status" => return Endpoint::Status,
        "/reload" => return Endpoint::Reload,
        "/api/upstreams" | "/api/upstreams/" => return Endpoint::Upstreams,
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/api/upstreams/") else {
        return Endpoint::Unknown;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [name] if !name.is_empty() => Endpoint::Upstream(percent_decode(name)),
        [name, "peers", peer, action] if !name.is_empty() && !peer.is_empty() => {
            Endpoint::PeerAction {
                upstream: percent_decode(name),
                peer: percent_decode(peer),
                action,
            }
        }
        _ => Endpoint::Unknown,
    }
}

async fn route(h: &AdminHandle, req: Request<Incoming>) -> Answer {
    let read = req.method() == Method::GET || req.method() == Method::HEAD;
    let shared = &h.shared;
    match endpoint(req.uri().path()) {
        Endpoint::Unknown => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        Endpoint::Reload | Endpoint::PeerAction { .. } if req.method() != Method::POST => {
            method_not_allowed("POST")
        }
        Endpoint::Reload => match authorize(shared, &req) {
            Err(r) => r,
            Ok(()) => reload(h).await,
        },
        Endpoint::PeerAction {
            upstream,
            peer,
            action,
        } => match authorize(shared, &req) {
            Err(r) => r,
            Ok(()) => peer_action(shared, &upstream, &peer, action),
        },
        _ if !read => method_not_allowed("GET, HEAD"),
        Endpoint::Healthz => text(StatusCode::OK, "text/plain", "ok\n".into()),
        Endpoint::StubStatus => text(StatusCode::OK, "text/plain", shared.metrics.stub_status()),
        Endpoint::Metrics => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            shared.metrics.render(&shared.runtime.load()),
        ),
        Endpoint::Status => text(StatusCode::OK, "application/json", status_json_with(h)),
        Endpoint::Upstreams => {
            let rt = shared.runtime.load();
            let list: Vec<serde_json::Value> =
                rt.upstreams.iter().map(|u| upstream_json(u)).collect();
            json(StatusCode::OK, &serde_json::json!({ "upstreams": list }))
        }
        Endpoint::Upstream(name) => match shared.runtime.load().upstream(&name) {
            Some(u) => json(StatusCode::OK, &upstream_json(u)),
            None => json_error(StatusCode::NOT_FOUND, unknown_upstream(shared, &name)),
        },
    }
}

/// With `[admin] token` set, a mutating call needs `Authorization: Bearer <token>`;
/// the answer otherwise is 401.
#[allow(clippy::result_large_err)]
fn authorize(shared: &Shared, req: &Request<Incoming>) -> Result<(), Answer> {
    let rt = shared.runtime.load();
    let Some(token) = rt.config.admin.token.as_deref() else {
        return Ok(());
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    let why = match given {
        Some(t) if same_secret(t.as_bytes(), token.as_bytes()) => return Ok(()),
        Some(_) => "the bearer token is wrong",
        None => "this call needs `Authorization: Bearer <token>` ([admin] token is set)",
    };
    tracing::warn!(path = %req.uri().path(), "admin API call refused: {why}");
    let mut r = json_error(StatusCode::UNAUTHORIZED, why.to_owned());
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"ferry admin\""),
    );
    Err(r)
}

/// Compare secrets in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `%XX` escapes decoded (an IPv6 peer is `%5B::1%5D:8080` in a URL); anything
/// malformed is kept as written.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|c| hex(*c)),
                b.get(i + 2).and_then(|c| hex(*c)),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_owned())
}

async fn reload(h: &AdminHandle) -> Answer {
    let (tx, rx) = oneshot::channel();
    if h.reload.send(tx).await.is_err() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "ferry is shutting down; not reloaded\n".into(),
        );
    }
    match rx.await {
        Ok(Ok(summary)) => text(StatusCode::OK, "text/plain", format!("{summary}\n")),
        Ok(Err(e)) => text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            format!("reload failed; the running configuration is unchanged: {e}\n"),
        ),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "ferry is shutting down; not reloaded\n".into(),
        ),
    }
}

fn unknown_upstream(shared: &Shared, name: &str) -> String {
    let rt = shared.runtime.load();
    let names: Vec<&str> = rt.upstreams.iter().map(|u| u.cfg.name.as_str()).collect();
    format!(
        "no upstream named {name:?} (upstreams: {})",
        names.join(", ")
    )
}

/// Drain, undrain, down or up the peers of `upstream` whose address (or
/// configured name, for a name that gave several addresses) is `peer`.
fn peer_action(shared: &Shared, upstream: &str, peer: &str, action: &str) -> Answer {
    let apply: fn(&Peer) = match action {
        "drain" => |p| p.set_draining(true),
        "undrain" => |p| p.set_draining(false),
        "down" => |p| p.set_down(true),
        "up" => |p| p.set_down(false),
        _ => {
            return json_error(
                StatusCode::NOT_FOUND,
                format!("unknown action {action:?}: use drain, undrain, down or up"),
            );
        }
    };
    let rt = shared.runtime.load();
    let Some(up) = rt.upstream(upstream) else {
        return json_error(StatusCode::NOT_FOUND, unknown_upstream(shared, upstream));
    };
    let matched: Vec<&Arc<Peer>> = up
        .peers()
        .filter(|p| &*p.addr_str == peer || p.params.name.eq_ignore_ascii_case(peer))
        .collect();
    if matched.is_empty() {
        let addrs: Vec<&str> = up.peers().map(|p| &*p.addr_str).collect();
        return json_error(
            StatusCode::NOT_FOUND,
            format!(
                "upstream {upstream:?} has no peer {peer:?} (peers: {})",
                addrs.join(", ")
            ),
        );
    }
    let checked = up.cfg.health_check.is_some();
    let now = now_ms();
    let mut peers = Vec::with_capacity(matched.len());
    for p in matched {
        apply(p);
        tracing::info!(upstream = %upstream, peer = %p.addr_str, action, state = peer_state(p, now), "admin API: peer changed");
        peers.push(peer_json(p, checked, now));
    }
    json(
        StatusCode::OK,
        &serde_json::json!({ "upstream": upstream, "action": action, "peers": peers }),
    )
}

/// The active health check's verdict on a peer: `"unchecked"` when the upstream
/// has no `[upstream.health_check]`, else `"passing"` or `"failing"`.
fn health_check(checked: bool, healthy: bool) -> &'static str {
    match (checked, healthy) {
        (false, _) => "unchecked",
        (true, true) => "passing",
        (true, false) => "failing",
    }
}

/// One peer as `/status` and the runtime API show it.
fn peer_json(p: &Peer, checked: bool, now: u64) -> serde_json::Value {
    let fails_total: u64 = FailReason::ALL.iter().map(|r| p.stats.fails(*r)).sum();
    serde_json::json!({
        "addr": &*p.addr_str,
        "name": p.params.name,
        "backup": p.params.backup,
        "state": peer_state(p, now),
        "up": p.is_usable(now),
        "down": p.is_down(),
        "draining": p.is_draining(),
        "weight": p.params.weight,
        "in_flight": p.in_flight(),
        "fails": p.fails(),
        "fails_total": fails_total,
        "requests": p.requests(),
        "healthy": p.is_healthy(),
        "health_check": health_check(checked, p.is_healthy()),
        "latency_ewma_ms": p.latency.estimate(now) / 1000.0,
        "connects": p.stats.connects.load(Relaxed),
    })
}

fn upstream_json(u: &Upstream) -> serde_json::Value {
    let checked = u.cfg.health_check.is_some();
    let now = now_ms();
    let peers: Vec<serde_json::Value> = u.peers().map(|p| peer_json(p, checked, now)).collect();
    serde_json::json!({
        "name": u.cfg.name,
        "strategy": format!("{:?}", u.cfg.strategy),
        "retries": u.stats.retries.load(Relaxed),
        "no_peer": u.stats.no_peer.load(Relaxed),
        "peers": peers,
    })
}

/// The `/status` document.
pub fn status_json(shared: &Shared) -> String {
    status_doc(shared, None)
}

fn status_json_with(h: &AdminHandle) -> String {
    let listeners = h.listeners.lock().map(|l| l.clone()).unwrap_or_default();
    status_doc(&h.shared, Some(listeners))
}

fn status_doc(shared: &Shared, listeners: Option<Vec<SocketAddr>>) -> String {
    let rt = shared.runtime.load();
    let upstreams: Vec<serde_json::Value> = rt.upstreams.iter().map(|u| upstream_json(u)).collect();
    let t = shared.metrics.totals();
    let mut doc = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "connections": {
            "active": t.active(),
            "reading": t.reading,
            "writing": t.writing,
            "waiting": t.waiting,
            "accepted": t.accepted,
            "handled": t.handled,
            "requests": t.requests,
        },
        "upstreams": upstreams,
    });
    if let Some(l) = listeners {
        let l: Vec<String> = l.iter().map(ToString::to_string).collect();
        doc["listeners"] = serde_json::json!(l);
    }
    let mut s = serde_json::to_string_pretty(&doc).unwrap_or_default();
    s.push('\n');
    s
}

/// `GET /healthz` on the admin listener of the ferry that runs `cfg` (an
/// unspecified listen address is asked on loopback); the address asked, or why
/// it is not healthy. Blocking, with a 2 s limit per step (`ferry health`).
pub fn probe_healthz(cfg: &crate::config::Config) -> Result<SocketAddr, String> {
    use std::io::{Read, Write};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let limit = std::time::Duration::from_secs(2);
    let Some(mut addr) = cfg.admin.listen else {
        return Err("[admin] listen is \"off\": /healthz needs the admin listener".into());
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let fail = |what: &str, e: std::io::Error| format!("{what} {addr}: {e}");
    let mut s = std::net::TcpStream::connect_timeout(&addr, limit)
        .map_err(|e| fail("cannot connect to the admin listener", e))?;
    s.set_read_timeout(Some(limit))
        .map_err(|e| fail("socket", e))?;
    s.set_write_timeout(Some(limit))
        .map_err(|e| fail("socket", e))?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\n\r\n")
        .map_err(|e| fail("cannot send to", e))?;
    let mut answer = Vec::new();
    let _ = s.take(4096).read_to_end(&mut answer);
    let line = String::from_utf8_lossy(&answer);
    let line = line.lines().next().unwrap_or("");
    match line.split_whitespace().nth(1) {
        Some("200") => Ok(addr),
        Some(_) => Err(format!("http://{addr}/healthz answered {line:?}")),
        None => Err(format!("http://{addr}/healthz gave no HTTP answer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_endpoints() {
        assert!(matches!(endpoint("/api/upstreams"), Endpoint::Upstreams));
        assert!(matches!(endpoint("/api/upstreams/app"), Endpoint::Upstream(n) if n == "app"));
        match endpoint("/api/upstreams/app/peers/%5B::1%5D:8080/drain") {
            Endpoint::PeerAction {
                upstream,
                peer,
                action,
            } => {
                assert_eq!(upstream, "app");
                assert_eq!(peer, "[::1]:8080");
                assert_eq!(action, "drain");
            }
            _ => panic!("not a peer action"),
        }
        assert!(matches!(
            endpoint("/api/upstreams/app/peers"),
            Endpoint::Unknown
        ));
        assert!(matches!(
            endpoint("/api/upstreams//peers/x/drain"),
            Endpoint::Unknown
        ));
        assert!(matches!(endpoint("/nope"), Endpoint::Unknown));
    }

    #[test]
    fn percent_decoding_keeps_what_is_malformed() {
        assert_eq!(percent_decode("10.0.0.1:80"), "10.0.0.1:80");
        assert_eq!(percent_decode("%5b::1%5D:80"), "[::1]:80");
        assert_eq!(percent_decode("%zz%"), "%zz%");
        assert_eq!(percent_decode("%ff"), "%ff");
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cret", b"s3cre"));
        assert!(!same_secret(b"s3cret", b"s3creT"));
        assert!(!same_secret(b"", b"x"));
    }
}
