//! ferry's own HTTP/1.1 server loop for client connections.
//!
//! The common request, HTTP/1.1 without a body or a protocol upgrade, is parsed
//! here with httparse and its response head is written directly, in one write
//! with the start of the body when that is ready. Between requests a connection
//! holds no buffer: it waits for the next bytes with a buffer on the stack, so
//! an idle keep-alive connection costs a few hundred bytes instead of a read
//! and a write buffer.
//!
//! Any other request (one with a body, `Expect`, `Upgrade` or `TE`, HTTP/1.0,
//! `CONNECT`, a head that does not parse or is too large) hands the connection,
//! with the bytes read so far, to hyper's HTTP/1.1 server for the rest of its
//! life: hyper then answers errors (400, 431) and serves bodies and upgrades
//! exactly as before.

use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::body::ClientBody;
use crate::conn::{ClientIo, ConnState, Due, StopWatch};
use crate::proxy::{Ctx, Exchange, RespBody};
use crate::server::{Client, H2_PREFACE, MAX_HEAD, serve_h1_hyper, serve_h2};
use crate::sock::Wire;

/// Most header fields in a request head (hyper's limit too); more goes to
/// hyper, which answers 431.
pub(crate) const MAX_HEADERS: usize = 100;

/// Body data up to this size is copied behind the response head, so both go out
/// in one write; larger data is written from where it lies.
const COPY_BODY: usize = 16 * 1024;

/// Serve HTTP/1.1 on `io` until the client or a timeout ends the connection;
/// with `h2c`, serve HTTP/2 instead when the client opens with the HTTP/2
/// prior-knowledge preface.
pub fn serve<I>(io: I, client: Client, h2c: bool) -> impl Future<Output = ()> + Send
where
    I: Wire + Send + 'static,
{
    // Wrapped before the future is made, so that the future holds the socket
    // once, not also as an argument.
    let mut io = ClientIo::new(io, Arc::clone(&client.state));
    async move {
        match serve_simple(&mut io, &client, h2c).await {
            Outcome::Closed => {}
            Outcome::Close => {
                let _ = io.shutdown().await;
            }
            Outcome::Http2(read) => {
                // The preface is not a request: the connection waits again,
                // with HTTP/2's own timers.
                client.state.waiting();
                let io = Rewind {
                    pre: read.freeze(),
                    inner: io.into_inner(),
                };
                let h2 = Box::pin(serve_h2(io, client));
                return h2.await;
            }
            Outcome::HandOff(read) => {
                let io = Rewind {
                    pre: read.freeze(),
                    inner: io,
                };
                // Boxed, and in a statement of its own: a temporary in the
                // awaited expression would keep its unboxed size in this future.
                let hyper = Box::pin(serve_h1_hyper(io, client));
                return hyper.await;
            }
        }
        client.state.close();
    }
}

/// How [`serve_simple`] ended.
enum Outcome {
    /// The connection is gone or timed out: drop it.
    Closed,
    /// Close it gracefully (FIN, lingering if needed).
    Close,
    /// A request this loop does not serve arrived: hyper takes over, starting
    /// with these bytes.
    HandOff(BytesMut),
    /// The client opened with the HTTP/2 preface: serve HTTP/2, starting with
    /// these bytes.
    Http2(BytesMut),
}

/// The client timeouts, as configured when the connection opened (ms).
struct Limits {
    header_ms: u64,
    keepalive_ms: u64,
}

/// Serve requests while they are simple ones.
async fn serve_simple<I>(io: &mut ClientIo<I>, client: &Client, mut h2c: bool) -> Outcome
where
    I: Wire + Send + 'static,
{
    let ctx = client.ctx(false, true);
    let limits = {
        let rt = client.shared.runtime.load();
        Limits {
            header_ms: rt.config.server.client_header_timeout.as_millis() as u64,
            keepalive_ms: rt.config.server.keepalive_timeout.as_millis() as u64,
        }
    };
    let stop = &client.stop;
    let mut watch = StopWatch::default();
    // One timer for the connection's life, re-armed only when it fires (see
    // `wait_for_bytes`): serving a request costs no timer work.
    let timer = tokio::time::sleep(Duration::from_millis(limits.period()));
    tokio::pin!(timer);
    let mut timer = ConnTimer {
        sleep: timer,
        armed: false,
    };
    let mut buf = BytesMut::new();
    loop {
        let (req, fields, mut close) = loop {
            if h2c && !buf.is_empty() {
                // HTTP/2 with prior knowledge starts with the preface; only the
                // first bytes of a connection can be it.
                let n = buf.len().min(H2_PREFACE.len());
                if buf[..n] != H2_PREFACE[..n] {
                    h2c = false;
                } else if n == H2_PREFACE.len() {
                    return Outcome::Http2(buf);
                }
            }
            if !h2c && !buf.is_empty() {
                match take_request(&mut buf) {
                    Take::Request(req, fields, close) => break (req, fields, close),
                    Take::Partial => {}
                    Take::Other => {
                        client.state.on_read();
                        return Outcome::HandOff(buf);
                    }
                }
            }
            if !buf.is_empty() {
                // Part of a head (or of the HTTP/2 preface): the connection
                // is reading a request.
                client.state.on_read();
            }
            let more = wait_for_bytes(
                io,
                &mut buf,
                &client.state,
                &mut timer,
                stop,
                &mut watch,
                &limits,
            )
            .await;
            if !matches!(more, Ok(true)) {
                return Outcome::Closed;
            }
        };
        close |= limits.keepalive_ms == 0;
        // Boxed: the request's state exists only while it is served, and an
        // idle connection keeps just what waiting needs.
        let serving = Box::pin(serve_one(io, &ctx, req, fields, close, stop));
        match with_ticks(serving, &mut timer, &ctx.read_deadline, &limits).await {
            Ok(false) => {}
            Ok(true) => return Outcome::Close,
            Err(_) => return Outcome::Closed,
        }
        if buf.is_empty() {
            // Hold no buffer while idle.
            buf = BytesMut::new();
        }
    }
}

/// Serve one request and write its response. `Ok(true)`: close the
/// connection after it (the client, the response or a shutdown said so).
///
/// Routing and preparing the request happen here, before the future exists:
/// it then holds the request once, in its [`Exchange`], and each stage works
/// on that in place.
fn serve_one<'a, I: AsyncWrite + Unpin>(
    io: &'a mut I,
    ctx: &'a Arc<Ctx>,
    req: Request<ClientBody>,
    fields: ReqFields,
    mut close: bool,
    stop: &'a tokio::sync::watch::Receiver<bool>,
) -> impl Future<Output = io::Result<bool>> + 'a {
    let is_head = req.method() == Method::HEAD;
    let mut x = Exchange::begin(ctx, req, Some(fields));
    async move {
        let resp = x.answer(ctx).await;
        // The response stays where it is made; its head is written from there.
        let mut resp = x.end(ctx, resp);
        close |= *stop.borrow();
        let (out, framing) = encode_response(&resp, is_head, &mut close);
        match framing {
            Framing::None => {
                io.write_all(&out).await?;
                drop(resp);
            }
            Framing::Length | Framing::Chunked => {
                let chunked = framing == Framing::Chunked;
                send_body(io, resp.body_mut(), out, chunked).await?;
            }
        }
        io.flush().await?;
        Ok(close)
    }
}

/// Drive `serving` and, while its request waits for a response head, the
/// connection's timer: armed to fire by the deadline the request stores in
/// `deadline` ([`crate::proxy::Ctx::read_deadline`]), so that the request can
/// see its `read_timeout` pass without a timer of its own.
async fn with_ticks<F: Future>(
    mut serving: Pin<Box<F>>,
    timer: &mut ConnTimer<'_>,
    deadline: &AtomicU64,
    limits: &Limits,
) -> F::Output {
    deadline.store(0, Relaxed);
    std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(r) = serving.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            let due = deadline.load(Relaxed);
            if due == 0 {
                return Poll::Pending;
            }
            let at = crate::peer::instant_at_ms(due);
            if timer.sleep.deadline() > at {
                timer.reset(at);
            }
            if timer.poll_fired(cx).is_pending() {
                return Poll::Pending;
            }
            // Fired: the request looks at its deadline again; the timer goes
            // back to its usual period (the request re-arms it if it waits on).
            timer.reset(Instant::now() + Duration::from_millis(limits.period()));
        }
    })
    .await
}

/// A connection's one timer. Polling a `Sleep` registers the task's waker
/// with it each time; here it is polled once after each setting, and after
/// that whether it fired is a look at its state: the wheel wakes the task
/// with the waker it holds.
struct ConnTimer<'a> {
    sleep: Pin<&'a mut tokio::time::Sleep>,
    /// Polled (holding the task's waker) since it was last set.
    armed: bool,
}

impl ConnTimer<'_> {
    fn reset(&mut self, at: Instant) {
        self.sleep.as_mut().reset(at);
        self.armed = false;
    }

    /// Ready once the timer fired.
    fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.armed {
            return if self.sleep.is_elapsed() {
                Poll::Ready(())
            } else {
                Poll::Pending
            };
        }
        // Out of budget, a poll returns `Pending` without taking the waker:
        // the next poll (soon: the task is woken again) arms it then.
        let budget = tokio::task::coop::has_budget_remaining();
        let r = self.sleep.as_mut().poll(cx);
        self.armed = budget && r.is_pending();
        r
    }
}

impl Limits {
    /// How often the connection's timer looks at its state while no deadline
    /// is known: no longer than either timeout, so it always wakes before one.
    fn period(&self) -> u64 {
        match self.keepalive_ms {
            0 => self.header_ms,
            k => self.header_ms.min(k),
        }
        .max(1)
    }
}

/// Wait for more request bytes and append them to `buf`. `Ok(false)`: the
/// client closed, a timeout passed (`client_header_timeout` for a first
/// request or a head begun, `keepalive_timeout` between requests), or ferry is
/// stopping; the connection closes without an answer, as nginx's does.
async fn wait_for_bytes<I: Wire>(
    io: &mut ClientIo<I>,
    buf: &mut BytesMut,
    state: &ConnState,
    timer: &mut ConnTimer<'_>,
    stop: &tokio::sync::watch::Receiver<bool>,
    watch: &mut StopWatch,
    limits: &Limits,
) -> io::Result<bool> {
    loop {
        tokio::select! {
            biased;
            r = std::future::poll_fn(|cx| io.poll_fill(cx, buf)) => return r.map(|n| n > 0),
            _ = std::future::poll_fn(|cx| timer.poll_fired(cx)) => {
                match state.due(limits.header_ms, limits.keepalive_ms, limits.period()) {
                    Due::Passed(_) => return Ok(false),
                    Due::In(ms) => timer.reset(Instant::now() + Duration::from_millis(ms)),
                }
            }
            _ = std::future::poll_fn(|cx| watch.poll_stop(cx, stop)) => return Ok(false),
        }
    }
}

/// What the bytes read so far hold.
// Returned once per request and unpacked at once: boxing the request would
// cost an allocation for nothing.
#[allow(clippy::large_enum_variant)]
enum Take {
    /// A request this loop serves (its fields apart, as written), and whether
    /// the client asked to close after it.
    Request(Request<ClientBody>, ReqFields, bool),
    /// A head not complete yet.
    Partial,
    /// Something for hyper: a body, an upgrade, HTTP/1.0, an error to answer.
    Other,
}

/// Where a header's name and value lie in the head: name start, name end,
/// value start, value end.
pub(crate) type Span = [u32; 4];

/// A field's name and value, where `s` says they lie in `head`.
pub(crate) fn field_at<'h>(head: &'h [u8], s: &Span) -> (&'h [u8], &'h [u8]) {
    (
        &head[s[0] as usize..s[1] as usize],
        &head[s[2] as usize..s[3] as usize],
    )
}

/// The field at `s` in `head` as a header map takes it, its value sharing the
/// head's memory. `Err` says which part a map refuses.
pub(crate) fn header_at(head: &Bytes, s: &Span) -> Result<(HeaderName, HeaderValue), &'static str> {
    let name = HeaderName::from_bytes(&head[s[0] as usize..s[1] as usize])
        .map_err(|_| "invalid header name")?;
    let value = HeaderValue::from_maybe_shared(head.slice(s[2] as usize..s[3] as usize))
        .map_err(|_| "invalid header value")?;
    Ok((name, value))
}

/// Record where each parsed header's name and value lie in the head that
/// starts at `base`, so the head can be frozen and the fields taken from it
/// without copies.
pub(crate) fn record_spans(spans: &mut [Span], headers: &[httparse::Header<'_>], base: usize) {
    let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
    for (span, h) in spans.iter_mut().zip(headers) {
        let name = at(h.name.as_bytes());
        let value = at(h.value);
        *span = [
            name,
            name + h.name.len() as u32,
            value,
            value + h.value.len() as u32,
        ];
    }
}

/// Parse a request head at the start of `buf` and, when it is one this loop
/// serves, take it out of `buf` as a request whose header values share the
/// head's memory.
fn take_request(buf: &mut BytesMut) -> Take {
    // Room for the fields of most heads, left unset until they are parsed.
    let mut spans: smallvec::SmallVec<[Span; 16]> = smallvec::SmallVec::new();
    let (len, method, target, n) = {
        let mut raw = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let base = buf.as_ptr() as usize;
        let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
        let len = match req.parse_with_uninit_headers(buf, &mut raw) {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Take::Partial,
            _ => return Take::Other,
        };
        if req.version != Some(1) {
            return Take::Other;
        }
        let (Some(method), Some(path)) = (req.method, req.path) else {
            return Take::Other;
        };
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            return Take::Other;
        };
        if method == Method::CONNECT {
            return Take::Other;
        }
        let start = at(path.as_bytes());
        let target = (start, start + path.len() as u32);
        spans.resize(req.headers.len(), [0; 4]);
        record_spans(&mut spans, req.headers, base);
        (len, method, target, req.headers.len())
    };
    let mut close = false;
    // An origin-form target goes upstream as it is; another is rewritten.
    let mut plain = buf.get(target.0 as usize) == Some(&b'/');
    let mut host = None;
    for s in &spans[..n] {
        let (name, value) = field_at(buf, s);
        if is(name, b"content-length") {
            if value != b"0" {
                return Take::Other;
            }
        } else if is(name, b"host") {
            host.get_or_insert((s[2], s[3]));
        } else if is(name, b"connection") {
            for t in value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                if is(t, b"close") {
                    close = true;
                } else if is(t, b"upgrade") {
                    return Take::Other;
                } else if !t.is_empty() && !is(t, b"keep-alive") {
                    // Names a field to drop before forwarding.
                    plain = false;
                }
            }
        } else if is(name, b"transfer-encoding")
            || is(name, b"upgrade")
            || is(name, b"expect")
            || is(name, b"te")
        {
            return Take::Other;
        } else if is_forwarding_field(name) {
            plain = false;
        }
    }
    let head = buf.split_to(len).freeze();
    match build(&head, method, target) {
        Some(req) => Take::Request(
            req,
            ReqFields {
                head,
                spans: spans[..n].to_vec(),
                host,
                plain,
            },
            close,
        ),
        None => {
            // Not one for this loop after all (a target http refuses): give
            // the bytes back for hyper to answer.
            let mut all = BytesMut::with_capacity(head.len() + buf.len());
            all.extend_from_slice(&head);
            all.extend_from_slice(buf);
            *buf = all;
            Take::Other
        }
    }
}

/// The request for a parsed head: method, target and version. Its fields stay
/// in the [`ReqFields`] beside it.
fn build(head: &Bytes, method: Method, target: (u32, u32)) -> Option<Request<ClientBody>> {
    let uri = Uri::from_maybe_shared(head.slice(target.0 as usize..target.1 as usize)).ok()?;
    let mut req = Request::new(ClientBody::Empty);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    Some(req)
}

/// The proxy's own request fields (`X-Forwarded-*`, `X-Real-IP`): ferry
/// replaces a client's.
fn is_forwarding_field(name: &[u8]) -> bool {
    match name.len() {
        9 => is(name, b"x-real-ip"),
        15 => is(name, b"x-forwarded-for"),
        16 => is(name, b"x-forwarded-host"),
        17 => is(name, b"x-forwarded-proto"),
        _ => false,
    }
}

/// The header fields of a request ferry's loop read, as the client wrote
/// them. A request whose fields the proxy only passes on ([`ReqFields::plain`])
/// goes upstream from these, with no header map built; anything that looks
/// fields up by name (a hash key, the access log, an HTTP/2 upstream, the
/// listener's own answers) first has them put in the request's map
/// ([`ReqFields::fill`]). Routing by host reads the `Host` field from here.
/// Names keep the client's case, as from nginx.
#[derive(Debug)]
pub(crate) struct ReqFields {
    head: Bytes,
    /// Where each field lies in `head`.
    spans: Vec<Span>,
    /// The first `Host` field's value (start, end).
    host: Option<(u32, u32)>,
    /// The target is in origin form and no field is one the proxy replaces
    /// (`X-Forwarded-*`, `X-Real-IP`) or a `Connection` naming others: the
    /// fields can go upstream as they are, less this hop's.
    plain: bool,
}

impl ReqFields {
    /// Whether the fields can be forwarded as they are (see [`ReqFields`]).
    pub(crate) fn plain(&self) -> bool {
        self.plain
    }

    /// The fields, name and value, in the order the client sent them.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans.iter().map(|s| field_at(&self.head, s))
    }

    /// The first `Host` field's value.
    pub(crate) fn host(&self) -> Option<HeaderValue> {
        let (a, b) = self.host?;
        HeaderValue::from_maybe_shared(self.head.slice(a as usize..b as usize)).ok()
    }

    /// The first `Host` field's value as text, when it is visible ASCII (as
    /// [`HeaderValue::to_str`] takes it).
    pub(crate) fn host_str(&self) -> Option<&str> {
        let (a, b) = self.host?;
        let v = &self.head[a as usize..b as usize];
        if !v.iter().all(|&c| (32..127).contains(&c) || c == b'\t') {
            return None;
        }
        std::str::from_utf8(v).ok()
    }

    /// Put the fields in `map`. `false` when one is not a valid field after
    /// all (httparse checks names and values as a header map does, so this
    /// is not expected).
    pub(crate) fn fill(self, map: &mut HeaderMap) -> bool {
        map.reserve(self.spans.len());
        for s in &self.spans {
            let Ok((name, value)) = header_at(&self.head, s) else {
                return false;
            };
            map.append(name, value);
        }
        true
    }
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body follows the head (HEAD, 1xx, 204, 304, or an empty body).
    None,
    /// `Content-Length` bytes.
    Length,
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Encode a response's head for the wire, and say how the body is
/// delimited. `close` comes in as whether the connection closes after it, and
/// is set when the response says so.
fn encode_response(
    resp: &Response<RespBody>,
    is_head: bool,
    close: &mut bool,
) -> (Vec<u8>, Framing) {
    if resp
        .headers()
        .get(header::CONNECTION)
        .is_some_and(|v| has_token(v.as_bytes(), b"close"))
    {
        *close = true;
    }
    let mut out = Vec::with_capacity(512);
    let framing = encode_head(resp, is_head, *close, &mut out);
    (out, framing)
}

/// Whether a comma-separated header value lists `token`.
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Write the status line and headers into `out`, adding the framing header,
/// `Date` when missing, and `Connection: close` when closing.
fn encode_head(
    resp: &Response<RespBody>,
    is_head: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Framing {
    let body = resp.body();
    let status = resp.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    match resp.extensions().get::<hyper::ext::ReasonPhrase>() {
        Some(r) => out.extend_from_slice(r.as_bytes()),
        None => out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    let mut seen = Seen::default();
    match body.raw_fields() {
        // An upstream's fields as it wrote them (none are in the map), whole
        // lines at a time when they are written as ferry would write them.
        // None of them is a `Connection` or `Transfer-Encoding` (see
        // `upstream_h1::parse_head`).
        Some(fields) if let Some((runs, lines)) = fields.lines() => {
            for run in runs {
                out.extend_from_slice(run);
            }
            seen.length = lines.length;
            seen.has_date = lines.date;
        }
        Some(fields) => {
            for (name, value) in fields.iter() {
                seen.put(out, name, value);
            }
        }
        None => {
            for (name, value) in resp.headers() {
                seen.put(out, name.as_str().as_bytes(), value.as_bytes());
            }
        }
    }
    let Seen {
        length,
        has_date,
        has_connection,
    } = seen;
    let bodiless = is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if bodiless {
        Framing::None
    } else if length {
        if body.is_end_stream() {
            Framing::None
        } else {
            Framing::Length
        }
    } else if body.is_end_stream() {
        out.extend_from_slice(b"content-length: 0\r\n");
        Framing::None
    } else if let Some(n) = body.size_hint().exact() {
        let mut b = itoa::Buffer::new();
        put_header(out, b"content-length", b.format(n).as_bytes());
        Framing::Length
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if !has_date {
        put_date(out);
    }
    if close && !has_connection {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// What [`encode_head`] learns of a response's own fields as it writes them.
#[derive(Default)]
struct Seen {
    /// A valid `Content-Length`.
    length: bool,
    has_date: bool,
    has_connection: bool,
}

impl Seen {
    /// Write one field of the response, unless it is framing ferry chooses
    /// itself (`Transfer-Encoding`, an unusable `Content-Length`).
    #[inline]
    fn put(&mut self, out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
        if is(name, b"content-length") {
            if parse_length(value).is_none() {
                return;
            }
            self.length = true;
        } else if is(name, b"transfer-encoding") {
            // Framing is chosen below.
            return;
        } else if is(name, b"date") {
            self.has_date = true;
        } else if is(name, b"connection") {
            self.has_connection = true;
        }
        put_header(out, name, value);
    }
}

/// A `Content-Length` value: digits only, at most `u64::MAX`.
pub(crate) fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        let d = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// Whether `s` is `lower` (lowercase letters, digits and `-`) but for ASCII
/// case, eight bytes at a time. For names and tokens as httparse takes them:
/// with no control characters, case is the only difference it lets through.
#[inline]
pub(crate) fn is(s: &[u8], lower: &[u8]) -> bool {
    const CASE: u64 = 0x2020_2020_2020_2020;
    if s.len() != lower.len() {
        return false;
    }
    let (mut a, mut b) = (s, lower);
    while let (Some((x, ra)), Some((y, rb))) =
        (a.split_first_chunk::<8>(), b.split_first_chunk::<8>())
    {
        if u64::from_ne_bytes(*x) | CASE != u64::from_ne_bytes(*y) | CASE {
            return false;
        }
        (a, b) = (ra, rb);
    }
    a.iter().zip(b).all(|(x, y)| x | 0x20 == y | 0x20)
}

/// `name: value` and a line end, into a head being written.
#[inline(always)]
pub(crate) fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// This thread's `Date` header value and the second it is for.
    static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
}

/// A `Date` header for now, formatted once a second per thread.
fn put_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs || text.is_empty() {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        put_header(out, b"date", text.as_bytes());
    });
}

/// Write the body after the head in `out`: the first data goes out with the
/// head when it is ready by then.
async fn send_body<I: AsyncWrite + Unpin>(
    io: &mut I,
    body: &mut RespBody,
    mut out: Vec<u8>,
    chunked: bool,
) -> io::Result<()> {
    loop {
        let frame = if out.is_empty() {
            std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
        } else {
            match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await
            {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    // Nothing more yet: send what there is (through TLS too),
                    // then wait.
                    io.write_all(&out).await?;
                    io.flush().await?;
                    out.clear();
                    continue;
                }
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                // The peer failed mid-body: the client sees the response cut
                // short (the connection closes), as from nginx.
                let _ = io.write_all(&out).await;
                return Err(io::Error::other(e));
            }
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                // Trailers: HTTP/1.1 clients get none (a client that asks for
                // them with `TE: trailers` is served by hyper).
                Err(_) => continue,
            },
        };
        if !data.is_empty() {
            if chunked {
                put_chunk_size(&mut out, data.len());
            }
            if data.len() <= COPY_BODY {
                out.extend_from_slice(&data);
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
            } else {
                let tail: &[u8] = if chunked { b"\r\n" } else { b"" };
                write_all_vectored(
                    io,
                    &mut [IoSlice::new(&out), IoSlice::new(&data), IoSlice::new(tail)],
                )
                .await?;
                out.clear();
            }
        }
        if body.is_end_stream() {
            break;
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        io.write_all(&out).await?;
    }
    Ok(())
}

/// A chunk-size line (hex) for `n` bytes of chunked data.
pub(crate) fn put_chunk_size(out: &mut Vec<u8>, n: usize) {
    use std::io::Write as _;
    let _ = write!(out, "{n:x}\r\n");
}

/// Write all of `bufs`, in as few calls as the socket allows.
pub(crate) async fn write_all_vectored<I: AsyncWrite + Unpin>(
    io: &mut I,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = std::future::poll_fn(|cx| Pin::new(&mut *io).poll_write_vectored(cx, bufs)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// A connection handed to hyper with the bytes already read from it put back
/// in front.
struct Rewind<T> {
    pre: Bytes,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::{ConnTimer, Take, is, parse_length, take_request};
    use bytes::BytesMut;
    use std::future::poll_fn;
    use std::task::Poll;
    use std::time::Duration;
    use tokio::time::{Instant, timeout};

    /// The connection timer fires after each setting, also when the poll that
    /// was to hand it the task's waker came with the task's budget spent.
    #[tokio::test(start_paused = true)]
    async fn the_connection_timer_fires_after_each_setting() {
        let sleep = tokio::time::sleep(Duration::from_millis(100));
        tokio::pin!(sleep);
        let mut t = ConnTimer {
            sleep,
            armed: false,
        };
        let start = Instant::now();
        let fired = timeout(Duration::from_secs(10), poll_fn(|cx| t.poll_fired(cx))).await;
        assert!(fired.is_ok(), "the first setting never fired");
        assert_eq!(start.elapsed(), Duration::from_millis(100));

        t.reset(Instant::now() + Duration::from_millis(50));
        let start = Instant::now();
        let mut spent = false;
        let waited = poll_fn(|cx| {
            if !spent {
                spent = true;
                while let Poll::Ready(r) = tokio::task::coop::poll_proceed(cx) {
                    r.made_progress();
                }
                // Out of budget: the poll takes no waker, so it arms nothing
                // (the runtime polls the task again, with a new budget).
                assert!(t.poll_fired(cx).is_pending());
                assert!(!t.armed);
                return Poll::Pending;
            }
            t.poll_fired(cx)
        });
        let fired = timeout(Duration::from_secs(10), waited).await;
        assert!(fired.is_ok(), "the second setting never fired");
        assert_eq!(start.elapsed(), Duration::from_millis(50));
        // Once it fired, it says so without a poll.
        assert!(t.armed && t.sleep.is_elapsed());
    }

    /// The request and fields `take_request` makes of a head.
    fn take(head: impl AsRef<[u8]>) -> (http::Request<crate::body::ClientBody>, super::ReqFields) {
        let head = head.as_ref();
        let mut buf = BytesMut::from(head);
        match take_request(&mut buf) {
            Take::Request(req, fields, _) => {
                assert!(buf.is_empty());
                (req, fields)
            }
            _ => panic!("not taken: {:?}", String::from_utf8_lossy(head)),
        }
    }

    #[test]
    fn fields_stay_as_written_until_a_map_is_asked_for() {
        let (req, f) = take("GET /a?b HTTP/1.1\r\nHost: Ex.test:81\r\nX-A: 1\r\nx-a:2\r\n\r\n");
        assert_eq!(req.uri(), "/a?b");
        assert!(req.headers().is_empty());
        assert!(f.plain());
        assert_eq!(f.host_str(), Some("Ex.test:81"));
        assert_eq!(
            f.host().as_ref().map(|h| h.as_bytes()),
            Some(&b"Ex.test:81"[..])
        );
        let fields: Vec<_> = f.iter().collect();
        assert_eq!(
            fields,
            [
                (&b"Host"[..], &b"Ex.test:81"[..]),
                (b"X-A", b"1"),
                (b"x-a", b"2")
            ]
        );
        let mut map = http::HeaderMap::new();
        assert!(f.fill(&mut map));
        assert_eq!(map.len(), 3);
        let a: Vec<_> = map.get_all("x-a").iter().collect();
        assert_eq!(a, ["1", "2"]);
    }

    #[test]
    fn fields_the_proxy_rewrites_are_not_passed_as_they_are() {
        for head in [
            "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nx-real-ip: 192.0.2.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Proto: https\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-FORWARDED-HOST: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(!take(head).1.plain(), "{head:?}");
        }
        for head in [
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Forwarded: x\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
        ] {
            assert!(take(head).1.plain(), "{head:?}");
        }
        // A Host of other than visible ASCII is no host to route by.
        assert_eq!(
            take(b"GET / HTTP/1.1\r\nHost: a\x80b\r\n\r\n").1.host_str(),
            None
        );
    }

    #[test]
    fn names_but_for_case() {
        for name in [
            &b"content-length"[..],
            b"Content-Length",
            b"CONTENT-LENGTH",
            b"cOnTeNt-LeNgTh",
        ] {
            assert!(is(name, b"content-length"), "{name:?}");
        }
        assert!(is(b"TE", b"te"));
        assert!(is(b"", b""));
        assert!(is(b"Transfer-Encoding", b"transfer-encoding"));
        // A difference in each place, the 8-byte part and the rest alike.
        let good = b"transfer-encoding";
        for i in 0..good.len() {
            let mut bad = good.to_vec();
            bad[i] = if bad[i] == b'-' { b'_' } else { b'-' };
            assert!(!is(&bad, good), "{:?}", String::from_utf8_lossy(&bad));
        }
        assert!(!is(b"content-lengt", b"content-length"));
        assert!(!is(b"content-lengthh", b"content-length"));
        // Characters one case bit away from a letter are not that letter.
        assert!(!is(b"c@nnection", b"connection"));
        assert!(!is(b"[eep-alive", b"keep-alive"));
        assert!(!is(b"d\xe1te", b"date"));
    }

    #[test]
    fn lengths() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"615"), Some(615));
        assert_eq!(parse_length(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"18446744073709551616",
            b"+5",
            b"-1",
            b"5 ",
            b"1,1",
            b"0x10",
        ] {
            assert_eq!(
                parse_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
