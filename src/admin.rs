//! The admin listener: `/metrics`, `/stub_status`, `/status`, `/healthz`.
//! It runs on the control thread, never on a client-facing listener.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::peer_state;
use crate::peer::{FailReason, now_ms};
use crate::proxy::Shared;

/// Serve the admin endpoints on `listener` forever.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, _path: PathBuf, _workers: usize) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(route(&shared, req)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
    r
}

fn route(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/stub_status" => text(StatusCode::OK, "text/plain", shared.metrics.stub_status()),
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            shared.metrics.render(&shared.runtime.load()),
        ),
        "/status" => text(StatusCode::OK, "application/json", status_json(shared)),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
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

/// The `/status` document.
pub fn status_json(shared: &Shared) -> String {
    let rt = shared.runtime.load();
    let now = now_ms();
    let upstreams: Vec<serde_json::Value> = rt
        .upstreams
        .iter()
        .map(|u| {
            let checked = u.cfg.health_check.is_some();
            let peers: Vec<serde_json::Value> = u
                .peers()
                .map(|p| {
                    let fails_total: u64 = FailReason::ALL.iter().map(|r| p.stats.fails(*r)).sum();
                    serde_json::json!({
                        "addr": p.addr_str,
                        "name": p.params.name,
                        "backup": p.params.backup,
                        "state": peer_state(p, now),
                        "up": p.is_usable(now),
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
                })
                .collect();
            serde_json::json!({
                "name": u.cfg.name,
                "strategy": format!("{:?}", u.cfg.strategy),
                "retries": u.stats.retries.load(Relaxed),
                "no_peer": u.stats.no_peer.load(Relaxed),
                "peers": peers,
            })
        })
        .collect();
    let t = shared.metrics.totals();
    let doc = serde_json::json!({
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
    let mut s = serde_json::to_string_pretty(&doc).unwrap_or_default();
    s.push('\n');
    s
}
