//! The proxy service: route a request, pick a peer, forward over a pooled
//! connection, retry by the `next_upstream` rules, and stream the response back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, Sleep};

use crate::accesslog::{AccessLog, End, RequestPart, Trail};
use crate::balance::RequestKey;
use crate::body::{BoxError, ClientBody, ReadError, ReqBody, is_body_too_large};
use crate::client::{self, Conn, ConnectError};
use crate::config::UpstreamScheme;
use crate::conn::ConnState;
use crate::h1::ReqFields;
use crate::metrics::Metrics;
use crate::peer::{FailReason, InFlight, Peer, Tried, ms_at, now_ms};
use crate::runtime::{Runtime, Upstream, reset_all_fails};
use crate::upstream_h1::{self, Forwarded, H1Body, Home, SendError};

/// What every connection of the process shares.
#[derive(Debug)]
pub struct Shared {
    /// The running configuration.
    pub runtime: ArcSwap<Runtime>,
    /// Metrics.
    pub metrics: &'static Metrics,
    /// Access log.
    pub log: AccessLog,
}

/// What one client connection's requests share.
#[derive(Debug)]
pub struct Ctx {
    /// Process-wide state.
    pub shared: Arc<Shared>,
    /// The worker serving the connection.
    pub worker: usize,
    /// The client's address.
    pub remote: SocketAddr,
    /// Connection state (stub_status, timeouts).
    pub state: Arc<ConnState>,
    /// `http` or `https`, for X-Forwarded-Proto.
    pub scheme: &'static str,
    /// HTTP/2: requests are streams of one connection.
    pub multiplexed: bool,
    /// The client's address as a header value (X-Real-IP, X-Forwarded-For), made
    /// once per connection.
    pub client_ip: HeaderValue,
    /// Whether the connection's loop keeps a timer that wakes its request by
    /// [`Ctx::read_deadline`] (ferry's own HTTP/1.1 loop does); otherwise an
    /// attempt arms a timer of its own for `read_timeout`.
    pub ticked: bool,
    /// When the request waiting for a response head times out (ms, as
    /// [`now_ms`]; 0 = none waits), for the loop's timer to wake it by then.
    pub read_deadline: AtomicU64,
}

/// Headers never forwarded (RFC 9110 hop-by-hop, plus the legacy ones).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

use crate::upstream_h1::{
    RawFields, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REAL_IP,
};

/// What [`strip_hop_by_hop`] found among the headers it removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Stripped {
    /// A protocol upgrade was asked for (`Connection: upgrade` + `Upgrade`); the
    /// `Upgrade` header is kept.
    upgrade: bool,
    /// `TE` listed `trailers`: the client accepts trailer fields (gRPC needs it
    /// passed on).
    te_trailers: bool,
}

/// Remove hop-by-hop headers, including those named by `Connection`.
fn strip_hop_by_hop(h: &mut HeaderMap) -> Stripped {
    // One pass over the names first: most messages carry none of these, or only
    // `Connection`, and every lookup or removal hashes a name.
    let mut found = 0u16;
    let mut has_upgrade = false;
    for name in h.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|n| n == name) {
            found |= 1 << i;
        } else if name == header::UPGRADE {
            has_upgrade = true;
        }
    }
    if found == 0 && !has_upgrade {
        return Stripped::default();
    }
    let mut upgrade = false;
    // HOP_BY_HOP[5] is TE.
    let te_trailers = found & (1 << 5) != 0
        && h.get_all(header::TE).iter().any(|v| {
            v.to_str().unwrap_or("").split(',').any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
    if found & 1 != 0 {
        // HOP_BY_HOP[0] is Connection: remove the headers it names too.
        let mut named: smallvec::SmallVec<[HeaderName; 2]> = smallvec::SmallVec::new();
        for v in h.get_all(header::CONNECTION) {
            for t in v.to_str().unwrap_or("").split(',') {
                let t = t.trim();
                if t.eq_ignore_ascii_case("upgrade") {
                    upgrade = true;
                } else if !t.is_empty()
                    && !t.eq_ignore_ascii_case("keep-alive")
                    && !t.eq_ignore_ascii_case("close")
                    && let Ok(n) = HeaderName::from_bytes(t.as_bytes())
                {
                    named.push(n);
                }
            }
        }
        for n in named {
            h.remove(n);
        }
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if found & (1 << i) != 0 {
            h.remove(n);
        }
    }
    upgrade &= has_upgrade;
    if has_upgrade && !upgrade {
        h.remove(header::UPGRADE);
    }
    Stripped {
        upgrade,
        te_trailers,
    }
}

/// The Host a request is for, as routes name it: without port or trailing dot.
fn request_host(req: &Request<ClientBody>) -> &str {
    let raw = req
        .uri()
        .host()
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
        })
        .unwrap_or("");
    strip_port(raw)
}

/// `host[:port]` -> `host`, and `host.` -> `host`. An IPv6 literal keeps its
/// brackets, as the config's routes store it (`[::1]`).
fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        return h.find(']').map_or("", |i| &h[..=i]);
    }
    let h = match h.rfind(':') {
        Some(i) if h[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &h[..i],
        _ => h,
    };
    h.strip_suffix('.').unwrap_or(h)
}

/// A response body: streamed from a peer, or written by ferry.
pub struct RespBody {
    kind: Kind,
    done: Option<Done>,
}

// The large variant is the usual one: boxing it would cost an allocation per
// request.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Kind {
    Upstream {
        body: UpBody,
        read_timeout: Duration,
        timer: Option<Pin<Box<Sleep>>>,
        progress: bool,
    },
    Full(Option<Bytes>),
}

impl RespBody {
    /// The upstream's header fields as it wrote them, when they are not in the
    /// response's header map (see [`RawFields`]).
    pub(crate) fn raw_fields(&self) -> Option<&RawFields> {
        match &self.kind {
            Kind::Upstream {
                body: UpBody::H1(b),
                ..
            } => b.fields(),
            _ => None,
        }
    }
}

/// The response with all its fields in its header map, for a server that
/// writes heads from the map (hyper's): ferry's HTTP/1.1 loop writes an
/// upstream's fields from the upstream's head instead.
pub fn with_header_map(mut resp: Response<RespBody>) -> Response<RespBody> {
    let fields = match &mut resp.body_mut().kind {
        Kind::Upstream {
            body: UpBody::H1(b),
            ..
        } => b.take_fields(),
        _ => None,
    };
    if let Some(fields) = fields {
        let map = fields.into_map();
        let h = resp.headers_mut();
        if h.is_empty() {
            *h = map;
        } else {
            for (name, value) in &map {
                h.append(name, value.clone());
            }
        }
    }
    resp
}

impl std::fmt::Debug for RespBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RespBody").finish_non_exhaustive()
    }
}

/// A response body from an upstream: read by ferry's HTTP/1.1 client, or by
/// hyper's HTTP/2 client.
pub(crate) enum UpBody {
    H1(H1Body),
    H2(Incoming),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpBody::H1(b) => Pin::new(b).poll_frame(cx),
            UpBody::H2(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::H1(b) => b.is_end_stream(),
            UpBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::H1(b) => b.size_hint(),
            UpBody::H2(b) => b.size_hint(),
        }
    }
}

/// The upstream stopped sending the body for longer than `read_timeout`.
#[derive(Debug)]
struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream timed out while sending the response body")
    }
}

impl std::error::Error for BodyTimeout {}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Full(b) => match b.take() {
                Some(b) => {
                    if let Some(d) = this.done.as_mut() {
                        d.bytes += b.len() as u64;
                    }
                    Poll::Ready(Some(Ok(Frame::data(b))))
                }
                None => {
                    this.finish(true);
                    Poll::Ready(None)
                }
            },
            Kind::Upstream {
                body,
                read_timeout,
                timer,
                progress,
            } => match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => {
                    *progress = true;
                    if let (Some(d), Some(data)) = (this.done.as_mut(), f.data_ref()) {
                        d.bytes += data.len() as u64;
                    }
                    if body.is_end_stream() {
                        this.finish(true);
                    }
                    Poll::Ready(Some(Ok(f)))
                }
                Poll::Ready(Some(Err(e))) => {
                    this.finish(false);
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Ready(None) => {
                    this.finish(true);
                    Poll::Ready(None)
                }
                Poll::Pending => {
                    let deadline = Instant::now() + *read_timeout;
                    match timer {
                        None => *timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                        Some(t) if *progress => t.as_mut().reset(deadline),
                        Some(_) => {}
                    }
                    *progress = false;
                    if let Some(t) = timer.as_mut()
                        && t.as_mut().poll(cx).is_ready()
                    {
                        if let Some(d) = this.done.as_mut() {
                            d.note = Some("upstream timed out sending the body");
                        }
                        this.finish(false);
                        return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
                    }
                    Poll::Pending
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream { body, .. } => body.size_hint(),
        }
    }
}

impl RespBody {
    fn finish(&mut self, complete: bool) {
        if let Some(mut d) = self.done.take() {
            d.complete = complete;
        }
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        let complete = self.is_end_stream();
        self.finish(complete);
    }
}

use std::future::Future as _;

/// Bookkeeping when a response ends (complete or not): in-flight slot
/// released, metrics, access log, connection state. (A pooled upstream
/// connection goes back as soon as its response body has been read.)
pub(crate) struct Done {
    ctx: Arc<Ctx>,
    up: Option<Arc<Upstream>>,
    _guard: Option<InFlight>,
    start: Instant,
    /// `start` as [`ms_at`] reads it.
    start_ms: u64,
    status: u16,
    bytes: u64,
    complete: bool,
    /// With the access log on: the request's part of the entry, and the
    /// upstreams tried. Boxed: a request without a log carries 8 bytes, not
    /// some 300, through every move of its response.
    log: Option<Box<(RequestPart, Trail)>>,
    note: Option<&'static str>,
}

impl Drop for Done {
    fn drop(&mut self) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.start);
        // `ms_at(now)`, to the millisecond, without a second subtraction.
        let now_ms = self.start_ms + elapsed.as_millis() as u64;
        if let Some(up) = &self.up
            && let Some(h) = &up.request_hist
        {
            h.observe(elapsed.as_secs_f64());
        }
        if let Some(log) = &self.log {
            let (part, trail) = &**log;
            self.ctx.shared.log.finish(
                part,
                &End {
                    remote: self.ctx.client_ip.to_str().unwrap_or("-"),
                    at: now.into_std(),
                    status: self.status,
                    bytes: self.bytes,
                    upstreams: trail,
                    request_time: elapsed,
                    note: self.note,
                },
            );
        }
        if self.ctx.multiplexed {
            self.ctx
                .state
                .stream_ended(self.status == 0 || !self.complete);
        }
        self.ctx.state.request_finished(now_ms);
    }
}

pub(crate) fn full(status: StatusCode, text: &'static str) -> Response<Kind> {
    let mut r = Response::new(Kind::Full(Some(Bytes::from_static(text.as_bytes()))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// How one attempt ended, when it did not produce a usable response.
#[derive(Debug)]
enum AttemptError {
    Connect(ConnectError),
    /// No response headers within `read_timeout`.
    Timeout,
    /// The connection failed after (part of) the request was sent.
    Io(UpError),
    /// The request body exceeded `client_max_body_size`.
    TooLarge,
    /// The client's request body failed (client went away).
    ClientBody,
}

impl AttemptError {
    fn reason(&self) -> FailReason {
        match self {
            AttemptError::Connect(ConnectError::Timeout) | AttemptError::Timeout => {
                FailReason::Timeout
            }
            AttemptError::Connect(_) => FailReason::Connect,
            AttemptError::Io(e) if e.is_invalid() => FailReason::InvalidHeader,
            _ => FailReason::Error,
        }
    }

    fn counts_against_peer(&self) -> bool {
        !matches!(self, AttemptError::TooLarge | AttemptError::ClientBody)
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Connect(e) => e.fmt(f),
            AttemptError::Timeout => f.write_str("timed out waiting for response headers"),
            AttemptError::Io(e) => write!(f, "{e}"),
            AttemptError::TooLarge => f.write_str("request body too large"),
            AttemptError::ClientBody => f.write_str("client request body failed"),
        }
    }
}

/// How an exchange with an upstream failed, by the client that ran it.
#[derive(Debug)]
enum UpError {
    H1(SendError),
    H2(hyper::Error),
}

impl UpError {
    /// The response head was invalid (nginx's `invalid_header`).
    fn is_invalid(&self) -> bool {
        match self {
            UpError::H1(e) => e.is_invalid(),
            UpError::H2(e) => e.is_parse(),
        }
    }
}

impl std::fmt::Display for UpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpError::H1(e) => e.fmt(f),
            UpError::H2(e) => e.fmt(f),
        }
    }
}

fn is_idempotent(m: &Method) -> bool {
    !matches!(m.as_str(), "POST" | "PATCH" | "LOCK")
}

/// One client request on its way to an answer: its accounting ([`Done`]) and
/// what is to be done with it. [`Exchange::begin`] does all that needs no
/// waiting; [`Exchange::answer`] then works on it in place, so that the
/// request is not copied into each future that handles it.
pub(crate) struct Exchange {
    done: Done,
    had_body: bool,
    step: Step,
}

/// What is left to do for a request.
// Held in place in its `Exchange` for the request's life, not moved about:
// boxing the large variant would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Step {
    /// A plain listener may answer it itself (ACME, redirect to https).
    Local(Request<ClientBody>),
    /// Answered without an upstream.
    Ready(Response<Kind>),
    /// To forward to this upstream.
    Forward(Arc<Upstream>, Outbound),
    /// Answered already.
    Taken,
}

impl Exchange {
    /// Count and time a request, route it, and prepare what goes upstream.
    ///
    /// `fields`: the request's header fields when they are not in its map yet
    /// (ferry's HTTP/1.1 loop); they go there only if something here looks
    /// them up by name.
    pub(crate) fn begin(
        ctx: &Arc<Ctx>,
        mut req: Request<ClientBody>,
        mut fields: Option<ReqFields>,
    ) -> Exchange {
        // One look at the configuration serves the whole start.
        let rt = ctx.shared.runtime.load();
        let local = may_answer_locally(ctx, &rt);
        if (local || ctx.shared.log.is_on())
            && let Some(f) = fields.take()
            && !f.fill(req.headers_mut())
        {
            return Exchange::refused(ctx, &req);
        }
        let (mut done, had_body) = begin(ctx, &req);
        let step = if local {
            Step::Local(req)
        } else {
            routed(ctx, &rt, req, fields, &mut done)
        };
        Exchange {
            done,
            had_body,
            step,
        }
    }

    /// A request whose fields do not go into a header map after all.
    #[cold]
    fn refused(ctx: &Arc<Ctx>, req: &Request<ClientBody>) -> Exchange {
        let (mut done, had_body) = begin(ctx, req);
        let step = invalid_fields(&mut done);
        Exchange {
            done,
            had_body,
            step,
        }
    }

    /// The answer to the request: ferry's own, or the upstream's.
    pub(crate) async fn answer(&mut self, ctx: &Arc<Ctx>) -> Response<Kind> {
        if let Step::Local(req) = &self.step {
            if let Some(resp) = answered_locally(req, ctx, &mut self.done).await {
                self.step = Step::Taken;
                return resp;
            }
            if let Step::Local(req) = std::mem::replace(&mut self.step, Step::Taken) {
                let rt = ctx.shared.runtime.load();
                self.step = routed(ctx, &rt, req, None, &mut self.done);
            }
        }
        match &mut self.step {
            Step::Forward(up, out) => forward(ctx, up, out, &mut self.done).await,
            step => match std::mem::replace(step, Step::Taken) {
                Step::Ready(resp) => resp,
                // Answered twice: a bug, not the client's doing.
                _ => full(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "500 Internal Server Error\n",
                ),
            },
        }
    }

    /// The response for the client, which finishes the request when its body
    /// ends. What was kept for sending the request again goes now.
    #[inline]
    pub(crate) fn end(self, ctx: &Ctx, resp: Response<Kind>) -> Response<RespBody> {
        end(ctx, resp, self.done, self.had_body)
    }
}

/// The step for a request that goes to an upstream, or the answer that says
/// why it does not.
fn routed(
    ctx: &Arc<Ctx>,
    rt: &Runtime,
    mut req: Request<ClientBody>,
    mut fields: Option<ReqFields>,
    done: &mut Done,
) -> Step {
    match route(ctx, rt, &req, fields.as_ref(), done) {
        Err((status, text)) => Step::Ready(full(status, text)),
        Ok((up, body_limit)) => {
            // A hash key, an HTTP/2 upstream and a request whose fields the
            // proxy rewrites work on the header map.
            let as_is = fields
                .as_ref()
                .is_some_and(|f| f.plain() && up.hash_key.is_none() && !up.cfg.scheme.is_h2());
            if !as_is
                && let Some(f) = fields.take()
                && !f.fill(req.headers_mut())
            {
                return invalid_fields(done);
            }
            let out = match fields {
                Some(f) => prepare_as_is(ctx, req, f),
                None => prepare(ctx, &up, req, body_limit),
            };
            Step::Forward(up, out)
        }
    }
}

/// The answer to a request whose fields do not go into a header map after
/// all (httparse let through what a map refuses): 400.
#[cold]
fn invalid_fields(done: &mut Done) -> Step {
    done.note = Some("invalid header field");
    Step::Ready(full(
        StatusCode::BAD_REQUEST,
        "400 Bad Request: invalid header field\n",
    ))
}

/// Serve one client request.
pub fn handle(
    ctx: Arc<Ctx>,
    req: Request<ClientBody>,
) -> impl Future<Output = Result<Response<RespBody>, Infallible>> + Send {
    let mut x = Exchange::begin(&ctx, req, None);
    async move {
        let resp = x.answer(&ctx).await;
        Ok(x.end(&ctx, resp))
    }
}

/// Whether the listener may answer a request itself ([`plain_listener_answer`]).
fn may_answer_locally(ctx: &Ctx, rt: &Runtime) -> bool {
    ctx.scheme == "http" && {
        let server = &rt.config.server;
        server.redirect_https || server.acme_webroot.is_some()
    }
}

/// The start of a request: counted and timed. Returns its [`Done`] and
/// whether it has a body.
fn begin(ctx: &Arc<Ctx>, req: &Request<ClientBody>) -> (Done, bool) {
    let start = Instant::now();
    let start_ms = ms_at(start);
    ctx.state.request_started(start_ms);
    ctx.shared
        .metrics
        .worker(ctx.worker)
        .requests
        .fetch_add(1, Relaxed);
    let log = ctx
        .shared
        .log
        .request_part(req)
        .map(|part| Box::new((part, Trail::new())));
    let done = Done {
        ctx: Arc::clone(ctx),
        up: None,
        _guard: None,
        start,
        start_ms,
        status: 0,
        bytes: 0,
        complete: false,
        log,
        note: None,
    };
    let had_body = !req.body().is_end_stream();
    (done, had_body)
}

/// The answer of [`plain_listener_answer`], if any, noted in `done`.
async fn answered_locally(
    req: &Request<ClientBody>,
    ctx: &Ctx,
    done: &mut Done,
) -> Option<Response<Kind>> {
    // Boxed: inline, this rare path's state (a file read) would make every
    // request's future larger.
    let answer = Box::pin(plain_listener_answer(req, ctx));
    let (resp, note) = answer.await?;
    done.note = Some(note);
    Some(resp)
}

/// The upstream a request goes to, and the body size limit; or the status
/// and text of the answer when it must not be forwarded.
fn route(
    ctx: &Ctx,
    rt: &Runtime,
    req: &Request<ClientBody>,
    fields: Option<&ReqFields>,
    done: &mut Done,
) -> Result<(Arc<Upstream>, u64), (StatusCode, &'static str)> {
    match check_request(req, fields, rt) {
        Err((status, text, note)) => {
            if status == StatusCode::NOT_FOUND {
                ctx.shared.metrics.unrouted.fetch_add(1, Relaxed);
            }
            done.note = Some(note);
            Err((status, text))
        }
        Ok(ui) => {
            let up = Arc::clone(&rt.upstreams[ui]);
            done.up = Some(Arc::clone(&up));
            Ok((up, rt.config.server.client_max_body_size))
        }
    }
}

/// The response for the client, which finishes the request's [`Done`] when
/// its body ends.
fn end(ctx: &Ctx, resp: Response<Kind>, mut done: Done, had_body: bool) -> Response<RespBody> {
    let (mut parts, kind) = resp.into_parts();
    done.status = parts.status.as_u16();
    if let Kind::Full(_) = kind
        && had_body
        && !ctx.multiplexed
        && (parts.status.is_server_error() || parts.status.is_client_error())
    {
        // ferry's own error page to a request whose body may be unread: close
        // the connection, but let the client finish sending first, or it may
        // see a reset instead of this answer. Without a body, keep-alive stays.
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        ctx.state.linger_on_close();
    }
    Response::from_parts(
        parts,
        RespBody {
            kind,
            done: Some(done),
        },
    )
}

/// Where certbot's webroot plugin puts HTTP-01 challenge files, under the
/// webroot, and the path Let's Encrypt asks for.
const ACME_CHALLENGE: &str = "/.well-known/acme-challenge/";

/// Largest challenge file served (a token's key authorization is ~90 bytes).
const ACME_MAX_FILE: u64 = 64 * 1024;

/// What a plain listener answers itself, without an upstream: ACME HTTP-01
/// challenges from `acme_webroot`, and with `redirect_https` a 301 to the same
/// host and URI over https (nginx's `return 301 https://$host$request_uri;`).
/// The access log note says which.
async fn plain_listener_answer(
    req: &Request<ClientBody>,
    ctx: &Ctx,
) -> Option<(Response<Kind>, &'static str)> {
    let rt = ctx.shared.runtime.load_full();
    let server = &rt.config.server;
    if let Some(webroot) = &server.acme_webroot
        && let Some(token) = req.uri().path().strip_prefix(ACME_CHALLENGE)
    {
        return Some(acme_challenge(req.method(), webroot, token).await);
    }
    if !server.redirect_https {
        return None;
    }
    let host = request_host(req).to_ascii_lowercase();
    let uri = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let uri = if uri.starts_with('/') {
        uri
    } else {
        "/".to_owned()
    };
    let location = is_redirect_host(&host)
        .then(|| HeaderValue::from_str(&format!("https://{host}{uri}")).ok())
        .flatten();
    let Some(location) = location else {
        return Some((
            full(
                StatusCode::BAD_REQUEST,
                "400 Bad Request: no valid Host to redirect to\n",
            ),
            "redirect_https: no valid Host",
        ));
    };
    let mut r = full(StatusCode::MOVED_PERMANENTLY, "301 Moved Permanently\n");
    r.headers_mut().insert(header::LOCATION, location);
    Some((r, "redirect to https"))
}

/// A host that may go into a redirect's Location: a DNS name or IP address
/// (bracketed IPv6), nothing that could change the URL's meaning.
fn is_redirect_host(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

/// An ACME token as certbot writes it: one path segment of base64url characters.
fn is_acme_token(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 256
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `GET /.well-known/acme-challenge/<token>`: the file
/// `<webroot>/.well-known/acme-challenge/<token>` as text/plain, 404 when it is
/// missing or the token is not a single safe segment.
async fn acme_challenge(
    method: &Method,
    webroot: &std::path::Path,
    token: &str,
) -> (Response<Kind>, &'static str) {
    if method != Method::GET && method != Method::HEAD {
        let mut r = full(StatusCode::METHOD_NOT_ALLOWED, "405 Method Not Allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return (r, "acme challenge: method not allowed");
    }
    let not_found = || {
        (
            full(StatusCode::NOT_FOUND, "404 Not Found\n"),
            "acme challenge: no such token",
        )
    };
    if !is_acme_token(token) {
        return not_found();
    }
    let path = webroot.join(".well-known/acme-challenge").join(token);
    let small_file = tokio::fs::metadata(&path)
        .await
        .is_ok_and(|m| m.is_file() && m.len() <= ACME_MAX_FILE);
    if !small_file {
        return not_found();
    }
    match tokio::fs::read(&path).await {
        Ok(data) => {
            let mut r = Response::new(Kind::Full(Some(Bytes::from(data))));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            (r, "acme challenge")
        }
        Err(_) => not_found(),
    }
}

/// Reject what must not be forwarded; otherwise the upstream index.
fn check_request(
    req: &Request<ClientBody>,
    fields: Option<&ReqFields>,
    rt: &Runtime,
) -> Result<usize, (StatusCode, &'static str, &'static str)> {
    let h = req.headers();
    // A request ferry's HTTP/1.1 loop read itself has no body and neither
    // field (a `Content-Length: 0` at most): nothing to look up.
    let bodiless = matches!(req.body(), ClientBody::Empty);
    if !bodiless
        && h.contains_key(header::TRANSFER_ENCODING)
        && h.contains_key(header::CONTENT_LENGTH)
    {
        return Err((
            StatusCode::BAD_REQUEST,
            "400 Bad Request: both Content-Length and Transfer-Encoding\n",
            "content-length with transfer-encoding",
        ));
    }
    let limit = rt.config.server.client_max_body_size;
    if limit > 0
        && !bodiless
        && let Some(n) = h
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        && n > limit
    {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            "413 Request Entity Too Large\n",
            "request body larger than client_max_body_size",
        ));
    }
    // With one catch-all route, the Host is not even looked at. An
    // absolute-form target names the host, else the Host field (from the
    // fields not in the map yet, if they are not).
    let host = || match (req.uri().host(), fields) {
        (None, Some(f)) => strip_port(f.host_str().unwrap_or("")),
        _ => request_host(req),
    };
    rt.router
        .catch_all()
        .or_else(|| rt.router.route(host(), req.uri().path()))
        .ok_or((
            StatusCode::NOT_FOUND,
            "404 Not Found: no route\n",
            "no route",
        ))
}

/// Build the request sent upstream: origin-form target, HTTP/1.1, hop-by-hop
/// headers and `Expect` removed, and the X-Forwarded-* and X-Real-IP fields to
/// set. Those go in the header map for an HTTP/2 upstream; the HTTP/1.1 client
/// writes them after the map's fields, which saves four insertions per
/// request. Returns the request, those fields, and whether it is an upgrade.
fn upstream_request(
    ctx: &Ctx,
    req: Request<ClientBody>,
    limit: u64,
    started: Option<&Arc<AtomicU64>>,
    scheme: UpstreamScheme,
) -> (Request<ReqBody>, Forwarded, bool) {
    let (mut parts, body) = req.into_parts();
    let found = strip_hop_by_hop(&mut parts.headers);
    let upgrade = found.upgrade && !scheme.is_h2();
    let h = &mut parts.headers;
    // One pass over the names: most requests carry none of the fields ferry
    // replaces, and every lookup or removal hashes a name.
    let (mut host, mut replaced) = (None, false);
    for (name, value) in h.iter() {
        if name == header::HOST {
            if host.is_none() {
                host = Some(value.clone());
            }
        } else if name == header::EXPECT
            || name == X_FORWARDED_FOR
            || name == X_REAL_IP
            || name == X_FORWARDED_PROTO
            || name == X_FORWARDED_HOST
        {
            replaced = true;
        }
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if found.te_trailers && scheme.is_h2() {
        // The one TE value HTTP/2 allows; gRPC servers insist on it. (An
        // HTTP/1.1 hop gets none, as from nginx.)
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let ip_value = ctx.client_ip.clone();
    // Every incoming X-Forwarded-For line, joined, then the client (nginx's
    // $proxy_add_x_forwarded_for): a second line must not drop the chain.
    let mut chain: Vec<u8> = Vec::new();
    if replaced {
        for v in h.get_all(&X_FORWARDED_FOR).iter().filter(|v| !v.is_empty()) {
            chain.extend_from_slice(v.as_bytes());
            chain.extend_from_slice(b", ");
        }
        for name in [
            &header::EXPECT,
            &X_FORWARDED_FOR,
            &X_REAL_IP,
            &X_FORWARDED_PROTO,
            &X_FORWARDED_HOST,
        ] {
            h.remove(name);
        }
    }
    let xff = if chain.is_empty() {
        ip_value.clone()
    } else {
        chain.extend_from_slice(ip_value.as_bytes());
        HeaderValue::from_bytes(&chain).unwrap_or(ip_value.clone())
    };
    let host = if host.is_some() {
        host
    } else {
        let host = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        if let Some(host) = &host {
            h.insert(header::HOST, host.clone());
        }
        host
    };
    let fwd = Forwarded {
        for_chain: xff,
        real_ip: ip_value,
        proto: ctx.scheme,
        host,
    };
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let pq = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        parts.uri = pq.parse().unwrap_or_else(|_| Uri::from_static("/"));
    }
    parts.version = Version::HTTP_11;
    if scheme.is_h2() {
        fwd.insert_into(&mut parts.headers);
        into_h2(&mut parts, scheme.is_tls());
    }
    let body = match body.into_incoming() {
        None => ReqBody::Empty,
        Some(b) => ReqBody::stream(b, limit, started.cloned().unwrap_or_default()),
    };
    (Request::from_parts(parts, body), fwd, upgrade)
}

/// Turn an HTTP/1.1-shaped upstream request into an HTTP/2 one: the target in
/// absolute form (`:scheme` and `:authority` come from it) and no `Host`.
fn into_h2(parts: &mut http::request::Parts, tls: bool) {
    parts.version = Version::HTTP_2;
    let authority = parts
        .headers
        .remove(header::HOST)
        .and_then(|v| http::uri::Authority::try_from(v.as_bytes()).ok());
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(if tls {
        http::uri::Scheme::HTTPS
    } else {
        http::uri::Scheme::HTTP
    });
    uri.authority = Some(authority.unwrap_or(http::uri::Authority::from_static("localhost")));
    uri.path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .or(Some(http::uri::PathAndQuery::from_static("/")));
    if let Ok(u) = Uri::from_parts(uri) {
        parts.uri = u;
    }
}

/// A copy of a request whose body is empty or was read whole, for sending it again.
fn replay_copy(req: &Request<ReqBody>) -> Option<Request<ReqBody>> {
    let mut r = Request::new(req.body().replayable_copy()?);
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    Some(r)
}

fn status_retryable(up: &Upstream, s: StatusCode) -> bool {
    let n = &up.cfg.next_upstream;
    match s.as_u16() {
        500 => n.http_500,
        502 => n.http_502,
        503 => n.http_503,
        504 => n.http_504,
        403 => n.http_403,
        404 => n.http_404,
        429 => n.http_429,
        _ => false,
    }
}

/// Statuses that count as a peer failure when listed (nginx: 403/404 never do).
fn status_is_failure(s: StatusCode) -> bool {
    matches!(s.as_u16(), 500 | 502 | 503 | 504 | 429)
}

/// Choose the next peer: primaries first, backups when no primary is usable.
/// A peer in its slow-start ramp takes only its share of picks; when it declines,
/// the strategy picks again without it (and it is used anyway if nothing else is
/// usable). Returns the peer and its position in [`Upstream::peers`] order.
fn pick(
    up: &Upstream,
    worker: usize,
    key: &RequestKey<'_>,
    tried: &mut (Tried, Tried),
    now: u64,
) -> Option<(Arc<Peer>, usize)> {
    let b = up.balancers(worker);
    let choose = |s: &dyn crate::balance::Strategy, peers: &[Arc<Peer>], t: &mut Tried| {
        let i = s.pick(peers, key, t, now)?;
        if peers[i].admit_while_ramping(now) {
            return Some(i);
        }
        t.insert(i);
        let other = s.pick(peers, key, t, now);
        t.remove(i);
        Some(other.unwrap_or(i))
    };
    let (pos, peer) = if let Some(i) = choose(&*b.primary, &up.primary, &mut tried.0) {
        tried.0.insert(i);
        (i, &up.primary[i])
    } else {
        let i = choose(&*b.backup, &up.backup, &mut tried.1)?;
        tried.1.insert(i);
        (up.primary.len() + i, &up.backup[i])
    };
    // The strategy already committed the pick (Peer::on_pick), as nginx's get_peer does.
    Some((Arc::clone(peer), pos))
}

/// A request made ready to go upstream: what [`forward`] needs that is built
/// before anything is awaited ([`prepare`]). It stays in place while the
/// attempts borrow it, rather than moving with every future that carries it.
pub(crate) struct Outbound {
    /// The request to send next, when there is one.
    pending: Option<Request<ReqBody>>,
    fwd: Forwarded,
    /// The rendered `hash` key, when the upstream balances by one.
    key: Vec<u8>,
    /// The client's side of an upgrade the upstream may accept.
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// When the request body last moved (ms; 0 = not yet): only a body that
    /// streams has one.
    started: Option<Arc<AtomicU64>>,
    /// The request's fields as the client wrote them, when they go upstream
    /// from there rather than from its header map (see [`ReqFields`]).
    fields: Option<ReqFields>,
}

/// Build what [`forward`] sends to `up` from a client request.
fn prepare(ctx: &Ctx, up: &Upstream, mut req: Request<ClientBody>, body_limit: u64) -> Outbound {
    let mut key = Vec::new();
    if let Some(t) = &up.hash_key {
        t.render(req.uri(), req.headers(), ctx.remote.ip(), &mut key);
    }
    let mut client_upgrade = None;
    // Only hyper hands over upgrades: ferry's own loop passes any request
    // with an `Upgrade` field to it (and its requests have no body).
    if !matches!(req.body(), ClientBody::Empty) && req.headers().contains_key(header::UPGRADE) {
        client_upgrade = Some(hyper::upgrade::on(&mut req));
    }
    let started = (!req.body().is_end_stream()).then(|| Arc::new(AtomicU64::new(0)));
    let (r, fwd, upgrade) = upstream_request(ctx, req, body_limit, started.as_ref(), up.cfg.scheme);
    if !upgrade {
        client_upgrade = None;
    }
    Outbound {
        pending: Some(r),
        fwd,
        key,
        client_upgrade,
        started,
        fields: None,
    }
}

/// What [`forward`] sends for a request read by ferry's HTTP/1.1 loop whose
/// fields go upstream as they are ([`ReqFields::plain`]): no body, no
/// upgrade, an origin-form target, none of the fields the proxy sets.
fn prepare_as_is(ctx: &Ctx, req: Request<ClientBody>, fields: ReqFields) -> Outbound {
    let (parts, _) = req.into_parts();
    let fwd = Forwarded {
        for_chain: ctx.client_ip.clone(),
        real_ip: ctx.client_ip.clone(),
        proto: ctx.scheme,
        host: fields.host(),
    };
    Outbound {
        pending: Some(Request::from_parts(parts, ReqBody::Empty)),
        fwd,
        key: Vec::new(),
        client_upgrade: None,
        started: None,
        fields: Some(fields),
    }
}

/// Send a prepared request to `up`, passing it to the next peer as the
/// upstream's `next_upstream` rules allow, and give the response for the client.
pub(crate) async fn forward(
    ctx: &Arc<Ctx>,
    up: &Arc<Upstream>,
    out: &mut Outbound,
    done: &mut Done,
) -> Response<Kind> {
    let cfg = &up.cfg;
    let key = RequestKey {
        client_ip: ctx.remote.ip(),
        hash_key: &out.key,
    };
    let Outbound {
        pending,
        fwd,
        client_upgrade,
        started,
        fields,
        ..
    } = out;
    let fields = fields.as_ref();
    let Some(req) = pending.as_mut() else {
        return full(StatusCode::BAD_GATEWAY, "502 Bad Gateway\n");
    };
    // Read small bodies of known length whole first, so that a retry can send
    // them again. A body of unknown length (chunked) streams at once: holding it
    // back could stall a client that sends a little and waits for an answer.
    let small = || {
        req.headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n <= cfg.retry_buffer)
    };
    if matches!(req.body(), ReqBody::Stream { .. }) && small() {
        let body = std::mem::replace(req.body_mut(), ReqBody::Empty);
        match body.buffer(cfg.retry_buffer as usize).await {
            Ok(body) => *req.body_mut() = body,
            Err(ReadError::TooLarge) => {
                done.note = Some("request body larger than client_max_body_size");
                return full(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "413 Request Entity Too Large\n",
                );
            }
            Err(ReadError::Client(_)) => {
                done.note = Some("client closed the request body");
                return full(
                    StatusCode::BAD_REQUEST,
                    "400 Bad Request: request body incomplete\n",
                );
            }
        }
    }
    let idempotent = is_idempotent(req.method());
    let n_peers = up.primary.len() + up.backup.len();
    let max_tries = match cfg.next_upstream_tries {
        0 => n_peers,
        n => (n as usize).min(n_peers.max(1)),
    };
    let deadline =
        (!cfg.next_upstream_timeout.is_zero()).then(|| done.start + cfg.next_upstream_timeout);
    // A copy to send again, when a retry could happen and the body allows it.
    let may_pass_on = !cfg.next_upstream.off && max_tries > 1;
    // An HTTP/1.1 attempt leaves the request whole (it only reads it), so a body
    // read whole can go again as it is; an HTTP/2 attempt hands its request to
    // the stream, so it needs a copy made before.
    let keeps = !cfg.scheme.is_h2();
    // Boxed: only HTTP/2 upstreams need it, and inline it would take room in
    // every request's future.
    let template = if may_pass_on && !keeps {
        replay_copy(req).map(Box::new)
    } else {
        None
    };

    let mut tried = (Tried::new(), Tried::new());
    let mut attempts = 0usize;
    let mut panicked = false;
    // The answer for the client if no attempt succeeds: the last failure's.
    let mut last: Option<(StatusCode, &'static str)> = None;

    loop {
        // The first attempt starts with the request (a few microseconds of
        // routing apart): one clock reading for both.
        let (mut t0, mut t0_ms) = if attempts == 0 {
            (done.start, done.start_ms)
        } else {
            let t = Instant::now();
            (t, ms_at(t))
        };
        let mut waited = false;
        let picked = match pick(up, ctx.worker, &key, &mut tried, t0_ms) {
            Some(p) => Some(p),
            None if attempts == 0 && superseded(ctx, up) => {
                // A reload (or new DNS answers) replaced this request's
                // configuration between its arrival and this pick, and drained
                // the peers it knows: they are alive and finish what arrived
                // before the change, and so does this request.
                drained_for_stale(up, &mut tried)
            }
            None if !panicked && rescue_passively_failed(up, &tried) => {
                // Every untried peer is out on passive evidence alone: try them
                // anyway rather than fail (Envoy's panic mode). Active checks and
                // `down`/draining are respected.
                panicked = true;
                continue;
            }
            None if attempts == 0 => {
                if up.peers().any(|p| held_out_by_max_conns_only(p)) {
                    let queued = Box::pin(wait_in_queue(up, ctx.worker, &key, &mut tried));
                    match queued.await {
                        Ok(p) => {
                            // The attempt starts now, not with the request.
                            waited = true;
                            Some(p)
                        }
                        Err(why) => {
                            up.stats.local_503.fetch_add(1, Relaxed);
                            done.note = Some(why);
                            return full(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "503 Service Unavailable: every server is at max_conns\n",
                            );
                        }
                    }
                } else {
                    None
                }
            }
            None => None,
        };
        let Some((peer, pos)) = picked else {
            if attempts == 0 {
                // nginx: no live upstreams; forget failures so the next request tries again.
                up.stats.no_peer.fetch_add(1, Relaxed);
                up.stats.local_502.fetch_add(1, Relaxed);
                reset_all_fails(up);
                tracing::warn!(upstream = %cfg.name, "no live upstreams");
                done.note = Some("no live upstreams");
                return full(
                    StatusCode::BAD_GATEWAY,
                    "502 Bad Gateway: no live upstreams\n",
                );
            }
            tracing::warn!(upstream = %cfg.name, attempts, "no peer left to try; answering with the last error");
            break;
        };
        attempts += 1;
        if waited {
            t0 = Instant::now();
            t0_ms = ms_at(t0);
        }
        if pending.is_none() {
            *pending = template.as_deref().and_then(replay_copy);
        }
        let Some(req) = pending.as_mut() else {
            break;
        };
        if attempts > 1 {
            up.stats.retries.fetch_add(1, Relaxed);
        }
        let guard = peer.start_request();
        let clock = Clock {
            t0,
            t0_ms,
            progress: started.as_deref(),
            ticker: ctx.ticked.then_some(&ctx.read_deadline),
        };
        let mut head_at = None;
        let with = With { fields, fwd };
        let result = attempt(&peer, cfg, req, with, idempotent, &clock, &mut head_at).await;
        let resendable = template.is_some() || (keeps && req.body().replayable());
        let answered = head_at.unwrap_or_else(Instant::now);
        let took = answered.saturating_duration_since(t0);
        // `ms_at(answered)`, to the millisecond.
        let now = t0_ms + took.as_millis() as u64;
        match result {
            Ok(resp) => {
                let status = resp.status();
                peer.stats.count_status(status.as_u16());
                if let Some(log) = &mut done.log {
                    log.1
                        .push((Arc::clone(&peer.addr_str), status.as_u16(), took));
                }
                if let Some(h) = up.header_hists.get(pos) {
                    h.observe(took.as_secs_f64());
                }
                peer.latency.record(took, now);
                let listed = status_retryable(up, status);
                let can_retry = listed
                    && attempts < max_tries
                    && deadline.is_none_or(|d| Instant::now() < d)
                    && (idempotent || cfg.next_upstream.non_idempotent)
                    && resendable;
                // nginx counts a listed status against the peer only when it passes
                // the request on; the answer that goes to the client is a success.
                if can_retry && status_is_failure(status) {
                    peer.record_failure(now);
                    peer.stats.count_fail(FailReason::Status);
                } else {
                    peer.record_success();
                }
                if can_retry {
                    if !keeps {
                        // Handed to the stream: the next attempt sends a copy.
                        *pending = None;
                    }
                    tracing::info!(upstream = %cfg.name, peer = %peer.addr_str, status = status.as_u16(), "passing the request to the next peer");
                    continue;
                }
                return respond(up, guard, resp, client_upgrade.take(), done);
            }
            Err(e) => {
                if let AttemptError::TooLarge = e {
                    done.note = Some("request body larger than client_max_body_size");
                    return full(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "413 Request Entity Too Large\n",
                    );
                }
                if let AttemptError::ClientBody = e {
                    done.note = Some("client closed the request body");
                    return full(
                        StatusCode::BAD_REQUEST,
                        "400 Bad Request: request body incomplete\n",
                    );
                }
                let reason = e.reason();
                let is_timeout = reason == FailReason::Timeout;
                let (status, text, note) = if is_timeout {
                    (
                        StatusCode::GATEWAY_TIMEOUT,
                        "504 Gateway Timeout\n",
                        "upstream timed out",
                    )
                } else if let AttemptError::Connect(ConnectError::Tls(_)) = e {
                    (
                        StatusCode::BAD_GATEWAY,
                        "502 Bad Gateway\n",
                        "upstream TLS handshake failed",
                    )
                } else {
                    (
                        StatusCode::BAD_GATEWAY,
                        "502 Bad Gateway\n",
                        "upstream error",
                    )
                };
                if let Some(log) = &mut done.log {
                    log.1
                        .push((Arc::clone(&peer.addr_str), status.as_u16(), took));
                }
                peer.stats.count_fail(reason);
                if e.counts_against_peer() && peer.record_failure(now) {
                    tracing::warn!(upstream = %cfg.name, peer = %peer.addr_str, "peer marked unavailable for {:?}", peer.params.fail_timeout);
                }
                done.note = Some(note);
                last = Some((status, text));
                // nginx: each kind of failure passes to the next peer only when its
                // own condition is listed (an invalid head is not an `error`).
                let listed = match reason {
                    FailReason::Timeout => cfg.next_upstream.timeout,
                    FailReason::InvalidHeader => cfg.next_upstream.invalid_header,
                    _ => cfg.next_upstream.error,
                };
                let sent = !matches!(e, AttemptError::Connect(_));
                let replayable = resendable;
                let may_retry = listed
                    && !cfg.next_upstream.off
                    && attempts < max_tries
                    && deadline.is_none_or(|d| Instant::now() < d)
                    && (!sent || idempotent || cfg.next_upstream.non_idempotent)
                    && (replayable
                        || (!sent && started.as_ref().is_none_or(|s| s.load(Relaxed) == 0)));
                if !may_retry {
                    tracing::warn!(upstream = %cfg.name, peer = %peer.addr_str, error = %e, "upstream attempt failed");
                    break;
                }
                tracing::warn!(upstream = %cfg.name, peer = %peer.addr_str, error = %e, "upstream attempt failed; passing the request to the next peer");
                if sent && !(keeps && resendable) {
                    // Gone (or partly gone) with the attempt; a request that
                    // never left, or that an HTTP/1.1 attempt only read, stays
                    // ours to send elsewhere.
                    *pending = None;
                }
            }
        }
    }
    let (status, text) = last.unwrap_or((StatusCode::BAD_GATEWAY, "502 Bad Gateway\n"));
    let resp = full(status, text);
    match resp.status().as_u16() {
        504 => up.stats.local_504.fetch_add(1, Relaxed),
        _ => up.stats.local_502.fetch_add(1, Relaxed),
    };
    resp
}

/// Wait (up to `queue_timeout`, with at most `queue` others) for a slot on a
/// peer under `max_conns`. `Err` says why the wait ended without one.
async fn wait_in_queue(
    up: &Upstream,
    worker: usize,
    key: &RequestKey<'_>,
    tried: &mut (Tried, Tried),
) -> Result<(Arc<Peer>, usize), &'static str> {
    let cfg = &up.cfg;
    if cfg.queue == 0 {
        return Err("every server is at max_conns (no queue)");
    }
    if up.stats.queued.fetch_add(1, Relaxed) >= cfg.queue as u64 {
        up.stats.queued.fetch_sub(1, Relaxed);
        return Err("the max_conns queue is full");
    }
    let deadline = Instant::now() + cfg.queue_timeout;
    let got = loop {
        let freed = up.stats.slot_freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if let Some(p) = pick(up, worker, key, tried, now_ms()) {
            break Ok(p);
        }
        if tokio::time::timeout_at(deadline, freed).await.is_err() {
            break Err("timed out in the max_conns queue");
        }
    };
    up.stats.queued.fetch_sub(1, Relaxed);
    got
}

/// Forget the failures of the peers not yet tried for this request that only
/// passive failure accounting keeps out. True when there was any.
fn rescue_passively_failed(up: &Upstream, tried: &(Tried, Tried)) -> bool {
    let mut any = false;
    let lists = [(&up.primary, &tried.0), (&up.backup, &tried.1)];
    for (peers, t) in lists {
        for (i, p) in peers.iter().enumerate() {
            if !t.contains(i) && held_out_by_passive_checks_only(p) {
                p.reset_fails();
                any = true;
            }
        }
    }
    any
}

/// Whether the running configuration no longer has `up` (a reload or new DNS
/// answers replaced it since the request took its snapshot).
fn superseded(ctx: &Ctx, up: &Arc<Upstream>) -> bool {
    !ctx.shared
        .runtime
        .load()
        .upstreams
        .iter()
        .any(|u| Arc::ptr_eq(u, up))
}

/// An untried peer of `up` that only draining keeps out: the first, primaries
/// before backups.
fn drained_for_stale(up: &Upstream, tried: &mut (Tried, Tried)) -> Option<(Arc<Peer>, usize)> {
    let now = now_ms();
    let (pos, peer) = up.peers().enumerate().find(|(i, p)| {
        let t = if *i < up.primary.len() {
            tried.0.contains(*i)
        } else {
            tried.1.contains(*i - up.primary.len())
        };
        !t && p.is_draining()
            && !p.is_down()
            && p.is_healthy()
            && !p.is_failed(now)
            && (p.params.max_conns == 0 || p.in_flight() < p.params.max_conns)
    })?;
    if pos < up.primary.len() {
        tried.0.insert(pos);
    } else {
        tried.1.insert(pos - up.primary.len());
    }
    Some((Arc::clone(peer), pos))
}

/// A peer that only passive failure accounting keeps out of rotation.
fn held_out_by_passive_checks_only(p: &Peer) -> bool {
    !p.is_down()
        && !p.is_draining()
        && p.is_healthy()
        && (p.params.max_conns == 0 || p.in_flight() < p.params.max_conns)
        && p.is_failed(now_ms())
}

/// A peer that only its `max_conns` limit keeps out right now.
fn held_out_by_max_conns_only(p: &Peer) -> bool {
    p.params.max_conns > 0
        && p.in_flight() >= p.params.max_conns
        && !p.is_down()
        && !p.is_draining()
        && p.is_healthy()
        && !p.is_failed(now_ms())
}

/// What goes upstream with a request besides its header map.
#[derive(Clone, Copy)]
struct With<'a> {
    /// The fields as the client wrote them, when they are not in the map
    /// (see [`ReqFields`]).
    fields: Option<&'a ReqFields>,
    /// ferry's own fields (`X-Forwarded-*`, `X-Real-IP`).
    fwd: &'a Forwarded,
}

/// A reused connection that sat idle this long and then failed before any
/// response byte was most likely closed by the peer for idleness just as the
/// request went out: the peer never read the request, so even a POST (whose body
/// ferry kept) is sent again, once, on a new connection.
const IDLE_CLOSE_SUSPECT: Duration = Duration::from_millis(250);

/// One attempt on one peer: a pooled connection (or a new one), the request, the
/// response head. A pooled connection that turns out closed before the request
/// left is replaced by a fresh one transparently; so is one the peer closed just
/// as the request was written, when the request can be sent again (see
/// [`IDLE_CLOSE_SUSPECT`]).
async fn attempt(
    peer: &Arc<Peer>,
    cfg: &crate::config::UpstreamConfig,
    req: &mut Request<ReqBody>,
    with: With<'_>,
    idempotent: bool,
    clock: &Clock<'_>,
    head_at: &mut Option<Instant>,
) -> Result<Response<UpBody>, AttemptError> {
    let With { fields, fwd } = with;
    if cfg.scheme.is_h2() {
        // Boxed: inline, its state would grow this future, which HTTP/1.1
        // requests move around too.
        let h2 = Box::pin(attempt_h2(peer, cfg, req, clock));
        return h2.await.map(|r| r.map(UpBody::H2));
    }
    let mut pooled = client::checkout(peer, clock.t0);
    let mut resent = false;
    loop {
        let mut conn: Conn = match pooled.take() {
            Some(c) => c,
            // Boxed: a new connection (TCP, maybe TLS) is the rare case, and its
            // state inline would be moved with every request's future.
            None => {
                let connecting =
                    Box::pin(client::connect(peer, cfg.connect_timeout, cfg.tls.as_ref()));
                connecting.await.map_err(AttemptError::Connect)?
            }
        };
        let waited = {
            let sent = upstream_h1::send(&mut conn, req, fields, fwd);
            tokio::pin!(sent);
            with_read_timeout(sent, cfg.read_timeout, clock).await
        };
        let err = match waited {
            None => return Err(AttemptError::Timeout),
            Some(Ok(head)) => {
                let home = Home {
                    peer: Arc::clone(peer),
                    max_idle: cfg.keepalive,
                    timeout: cfg.keepalive_timeout,
                };
                // One clock reading for the response time and, when the
                // response came whole with its head, the connection's return.
                let now = Instant::now();
                *head_at = Some(now);
                return Ok(head.into_response(conn, Some(home), now).map(UpBody::H1));
            }
            Some(Err(e)) => e,
        };
        match err {
            SendError::NotSent(e) if conn.fresh => {
                return Err(AttemptError::Connect(ConnectError::Io(e)));
            }
            SendError::NotSent(_) => {
                // A reused connection the peer closed: nothing was written.
                pooled = client::checkout(peer, Instant::now());
                continue;
            }
            SendError::Body(e) if is_body_too_large(&*e) => return Err(AttemptError::TooLarge),
            SendError::Body(_) => return Err(AttemptError::ClientBody),
            e => {
                if !conn.fresh
                    && !resent
                    && e.closed_before_response()
                    && (idempotent || conn.idle >= IDLE_CLOSE_SUSPECT)
                    && req.body().replayable()
                {
                    // Sending only read the request: it goes again as it is.
                    tracing::debug!(peer = %peer.addr_str, error = %e, "pooled connection closed under the request; sending it again on a new connection");
                    resent = true;
                    continue;
                }
                return Err(AttemptError::Io(UpError::H1(e)));
            }
        }
    }
}

/// One attempt on an HTTP/2 peer: a stream on this worker's connection to it
/// (opened if there is none). A connection that turns out closed before the
/// request left is replaced once.
async fn attempt_h2(
    peer: &Arc<Peer>,
    cfg: &crate::config::UpstreamConfig,
    req: &mut Request<ReqBody>,
    clock: &Clock<'_>,
) -> Result<Response<Incoming>, AttemptError> {
    let mut replaced = false;
    loop {
        let (mut tx, fresh) = client::h2_sender(
            peer,
            cfg.connect_timeout,
            cfg.keepalive_timeout,
            cfg.tls.as_ref(),
        )
        .await
        .map_err(AttemptError::Connect)?;
        if tx.ready().await.is_err() {
            client::h2_forget(peer);
            if fresh || replaced {
                return Err(AttemptError::Connect(ConnectError::Io(
                    std::io::Error::other("connection closed before the request was sent"),
                )));
            }
            replaced = true;
            continue;
        }
        let out = std::mem::replace(req, Request::new(ReqBody::Empty));
        let fut = tx.try_send_request(out);
        drop(tx);
        tokio::pin!(fut);
        match with_read_timeout(fut, cfg.read_timeout, clock).await {
            None => return Err(AttemptError::Timeout),
            Some(Ok(resp)) => return Ok(resp),
            Some(Err(mut e)) => {
                let back = e.take_message();
                let err = e.into_error();
                if std::error::Error::source(&err).is_some_and(is_body_too_large) {
                    return Err(AttemptError::TooLarge);
                }
                if err.is_user() {
                    return Err(AttemptError::ClientBody);
                }
                // A closed connection is replaced by the next request; a
                // stream's own failure leaves the connection to the others.
                if let Some(back) = back {
                    // Never sent: the connection was going away.
                    *req = back;
                    if !fresh && !replaced {
                        replaced = true;
                        continue;
                    }
                    return Err(AttemptError::Connect(ConnectError::Handshake(err)));
                }
                return Err(AttemptError::Io(UpError::H2(err)));
            }
        }
    }
}

/// When an attempt began, and what moves its read timeout.
struct Clock<'a> {
    /// When the attempt began, and that as [`now_ms`] reads it.
    t0: Instant,
    t0_ms: u64,
    /// When the request body last moved (ms; 0 = not yet), for a body that
    /// streams.
    progress: Option<&'a AtomicU64>,
    /// Where the connection's loop takes the deadline its timer wakes the
    /// request by ([`Ctx::read_deadline`]), when it has such a timer.
    ticker: Option<&'a AtomicU64>,
}

/// Await response headers (`fut`), or `None` once `read_timeout` passed since
/// the later of the attempt's start and the request body's last progress, so
/// that a long upload is not cut. With a ticker ([`Clock::ticker`]), the
/// connection's loop wakes the request by the deadline stored there and no
/// timer is armed here: serving a request then costs no timer work.
async fn with_read_timeout<F: Future>(
    mut fut: Pin<&mut F>,
    timeout: Duration,
    clock: &Clock<'_>,
) -> Option<F::Output> {
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    // Boxed: only requests served by hyper arm it, and inline it would take
    // room in every request's future.
    let mut sleep = clock
        .ticker
        .is_none()
        .then(|| Box::pin(tokio::time::sleep_until(clock.t0 + timeout)));
    let mut first = true;
    let got = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        let moved = clock.progress.map_or(0, |p| p.load(Relaxed));
        let due = clock.t0_ms.max(moved).saturating_add(timeout_ms);
        // On the first poll the attempt has just begun: no need to look at
        // the clock.
        let waited = !std::mem::replace(&mut first, false);
        match (clock.ticker, sleep.as_mut()) {
            (Some(deadline), _) => {
                if waited && now_ms() >= due {
                    return Poll::Ready(None);
                }
                deadline.store(due, Relaxed);
            }
            (None, Some(sleep)) => {
                while sleep.as_mut().poll(cx).is_ready() {
                    if now_ms() >= due {
                        return Poll::Ready(None);
                    }
                    sleep.as_mut().reset(crate::peer::instant_at_ms(due));
                }
            }
            (None, None) => {}
        }
        Poll::Pending
    })
    .await;
    if let Some(deadline) = clock.ticker {
        deadline.store(0, Relaxed);
    }
    got
}

fn respond(
    up: &Arc<Upstream>,
    guard: InFlight,
    resp: Response<UpBody>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    done: &mut Done,
) -> Response<Kind> {
    let (mut parts, body) = resp.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_up) = client_upgrade
        && let UpBody::H1(body) = body
    {
        let name = up.cfg.name.clone();
        if let Some((upstream, early)) = body.into_upgraded() {
            tokio::spawn(tunnel(client_up, upstream, early, guard, name));
        }
        return Response::from_parts(parts, Kind::Full(None));
    }
    strip_hop_by_hop(&mut parts.headers);
    done._guard = Some(guard);
    Response::from_parts(
        parts,
        Kind::Upstream {
            body,
            read_timeout: up.cfg.read_timeout,
            timer: None,
            progress: false,
        },
    )
}

/// Carry bytes both ways between a client and an upstream after `101
/// Switching Protocols`; `early` is what the upstream sent right after its
/// head. The peer's in-flight slot is held until the tunnel closes.
async fn tunnel(
    client_up: hyper::upgrade::OnUpgrade,
    mut upstream: upstream_h1::UpIo,
    early: Bytes,
    _guard: InFlight,
    name: String,
) {
    use tokio::io::AsyncWriteExt as _;
    let client = match client_up.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(upstream = %name, error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    if !early.is_empty()
        && let Err(e) = client.write_all(&early).await
    {
        tracing::debug!(upstream = %name, error = %e, "upgraded connection ended");
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(upstream = %name, error = %e, "upgraded connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::TRAILER, HeaderValue::from_static("x"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        let found = strip_hop_by_hop(&mut h);
        assert_eq!(
            found,
            Stripped {
                upgrade: false,
                te_trailers: true
            }
        );
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn hop_by_hop_fields_are_the_same_for_maps_and_raw_fields() {
        for n in &HOP_BY_HOP {
            assert!(
                crate::upstream_h1::is_hop_by_hop(n.as_str().as_bytes()),
                "{n}"
            );
            let upper = n.as_str().to_ascii_uppercase();
            assert!(
                crate::upstream_h1::is_hop_by_hop(upper.as_bytes()),
                "{upper}"
            );
        }
        for n in ["upgrade", "host", "x-te", "trailers", "connections", ""] {
            assert!(!crate::upstream_h1::is_hop_by_hop(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn keeps_upgrade_when_upgrading() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(strip_hop_by_hop(&mut h).upgrade);
        assert!(h.contains_key(header::UPGRADE));
        assert!(!h.contains_key(header::CONNECTION));
    }

    #[test]
    fn acme_tokens_are_one_safe_segment() {
        assert!(is_acme_token("Xy_-09abcDEF"));
        for bad in ["", "..", "a/b", "../x", "a.b", "a%2fb", "a b"] {
            assert!(!is_acme_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn redirect_hosts() {
        assert!(is_redirect_host("shop.example.com"));
        assert!(is_redirect_host("10.0.0.1"));
        assert!(is_redirect_host("[::1]"));
        for bad in ["", "evil.com/x", "a@b", "[zz]", "a b"] {
            assert!(!is_redirect_host(bad), "{bad:?}");
        }
    }

    #[test]
    fn h2_upstream_request_takes_authority_from_host() {
        let mut req = Request::get("/svc/Method?x=1")
            .header(header::HOST, "api.example:8080")
            .header("x-keep", "1")
            .body(())
            .unwrap();
        let (mut parts, _) = req.into_parts();
        into_h2(&mut parts, false);
        assert_eq!(parts.version, Version::HTTP_2);
        assert_eq!(parts.uri, "http://api.example:8080/svc/Method?x=1");
        assert!(!parts.headers.contains_key(header::HOST));
        assert!(parts.headers.contains_key("x-keep"));
        req = Request::new(());
        let (mut parts, _) = req.into_parts();
        into_h2(&mut parts, false);
        assert_eq!(parts.uri, "http://localhost/");
    }

    #[test]
    fn te_trailers_is_noticed_among_other_codings() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers;q=1"));
        assert!(strip_hop_by_hop(&mut h).te_trailers);
        assert!(h.is_empty());
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        assert!(!strip_hop_by_hop(&mut h).te_trailers);
    }

    #[test]
    fn host_without_port() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("example.com.:80"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
