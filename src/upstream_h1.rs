//! ferry's own HTTP/1.1 client for upstream connections.
//!
//! A pooled connection belongs to the request that uses it: the request head
//! is written straight from the header map (with a body read whole, in the
//! same write), the response head is parsed with httparse, and the response
//! body reads from the connection itself and gives the connection back to the
//! pool the moment the body ends cleanly. There is no task per connection and
//! no channel between a request and its connection.
//!
//! Framing follows RFC 9112: no body after `HEAD`, 1xx, 204 and 304; then
//! `Transfer-Encoding` (chunked last, or read to the close), then
//! `Content-Length`, then read to the close. Interim 1xx answers are skipped;
//! a connection is reused only after a complete, well-framed response that
//! did not ask to close.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_util::io::poll_read_buf;

use crate::body::{BoxError, ReqBody};
// The same limits as for request heads: at most 100 fields, 64 KiB (also the
// longest chunk-size or trailer line).
use crate::h1::{
    MAX_HEADERS, ReqFields, Span, field_at, header_at, is, parse_length, put_chunk_size,
    put_header, record_spans, write_all_vectored,
};
use crate::peer::Peer;
use crate::server::MAX_HEAD;

/// Room kept free in the read buffer before each read.
const READ_BUF: usize = 8 * 1024;

/// Request body data up to this size is copied behind the head, so both go
/// out in one write.
const COPY_BODY: usize = 16 * 1024;

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The fields ferry sets on every request it forwards (the request's own
/// copies of them were removed).
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// `X-Forwarded-For`: the incoming chain, then the client.
    pub for_chain: HeaderValue,
    /// `X-Real-IP`: the client.
    pub real_ip: HeaderValue,
    /// `X-Forwarded-Proto`: `http` or `https`.
    pub proto: &'static str,
    /// `X-Forwarded-Host`: the request's Host, when it has one.
    pub host: Option<HeaderValue>,
}

impl Forwarded {
    /// Add the fields to a header map (for an HTTP/2 upstream).
    pub fn insert_into(&self, h: &mut HeaderMap) {
        h.insert(&X_FORWARDED_FOR, self.for_chain.clone());
        h.insert(&X_REAL_IP, self.real_ip.clone());
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(self.proto));
        if let Some(host) = &self.host {
            h.insert(&X_FORWARDED_HOST, host.clone());
        }
    }

    /// Write the fields into a request head.
    fn put(&self, out: &mut Vec<u8>) {
        put_header(
            out,
            X_FORWARDED_FOR.as_str().as_bytes(),
            self.for_chain.as_bytes(),
        );
        put_header(out, X_REAL_IP.as_str().as_bytes(), self.real_ip.as_bytes());
        put_header(
            out,
            X_FORWARDED_PROTO.as_str().as_bytes(),
            self.proto.as_bytes(),
        );
        if let Some(host) = &self.host {
            put_header(out, X_FORWARDED_HOST.as_str().as_bytes(), host.as_bytes());
        }
    }
}

/// The transport under an upstream HTTP/1.1 connection.
pub enum UpIo {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (an `https` upstream).
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpIo::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpIo::Plain(s) => crate::sock::poll_send(s, cx, buf),
            UpIo::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpIo::Plain(s) => crate::sock::poll_sendv(s, cx, bufs),
            UpIo::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpIo::Plain(s) => s.is_write_vectored(),
            UpIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpIo::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpIo::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// An upstream HTTP/1.1 connection, checked out of the pool (or new).
pub struct Conn {
    io: UpIo,
    /// True when it was opened for this request (not reused).
    pub fresh: bool,
    /// How long it sat idle in the pool before this use.
    pub idle: Duration,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("fresh", &self.fresh)
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// A connection just opened.
    pub fn new(io: UpIo) -> Conn {
        Conn {
            io,
            fresh: true,
            idle: Duration::ZERO,
        }
    }

    /// Whether an idle connection can carry a request: still open, with
    /// nothing to read. Never waits: the socket's readiness is already known
    /// to the runtime, so a connection with nothing new costs no system call.
    /// A close, an error or unasked-for bytes all make it unusable.
    pub fn is_usable(&mut self) -> bool {
        if let UpIo::Plain(s) = &self.io {
            // Known not readable: no system call, and no waker to register.
            let mut b = [0u8; 64];
            return matches!(s.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut b = [MaybeUninit::<u8>::uninit(); 64];
        let mut rb = ReadBuf::uninit(&mut b);
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut rb)
            .is_pending()
    }
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum SendError {
    /// Writing failed before any byte of the request went out: the request is
    /// intact and can go to another connection.
    NotSent(io::Error),
    /// The client's request body failed, or was over its limit.
    Body(BoxError),
    /// The connection failed after the request (or part of it) went out;
    /// `answered` tells whether any byte of a response had come.
    Io {
        /// What failed.
        error: io::Error,
        /// Whether any response bytes arrived first.
        answered: bool,
    },
    /// The response head did not parse or its framing was invalid.
    Invalid(String),
}

impl SendError {
    /// The peer closed (or reset) the connection before any byte of a
    /// response: a reused connection it was closing just as the request went
    /// out.
    pub fn closed_before_response(&self) -> bool {
        match self {
            SendError::NotSent(_) => true,
            SendError::Io { error, answered } => {
                !answered
                    && matches!(
                        error.kind(),
                        io::ErrorKind::ConnectionReset
                            | io::ErrorKind::BrokenPipe
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::UnexpectedEof
                    )
            }
            _ => false,
        }
    }

    /// Whether the response head was invalid (nginx's `invalid_header`).
    pub fn is_invalid(&self) -> bool {
        matches!(self, SendError::Invalid(_))
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::NotSent(e) => {
                write!(f, "connection closed before the request was sent: {e}")
            }
            SendError::Body(e) => write!(f, "request body failed: {e}"),
            SendError::Io { error, answered } if error.kind() == io::ErrorKind::UnexpectedEof => {
                if *answered {
                    f.write_str("upstream closed the connection in the middle of the response head")
                } else {
                    f.write_str("upstream closed the connection before sending a response")
                }
            }
            SendError::Io { error, .. } => write!(f, "upstream connection failed: {error}"),
            SendError::Invalid(why) => write!(f, "invalid response head from upstream: {why}"),
        }
    }
}

impl std::error::Error for SendError {}

/// A parsed response head, the body bytes read with it, and how the body is
/// framed.
pub struct Head {
    parts: http::response::Parts,
    /// The fields as the upstream wrote them, when they are not in `parts`.
    fields: Option<RawFields>,
    state: State,
    reuse: bool,
    buf: BytesMut,
}

/// The header fields of a response as the upstream wrote them: its head, and
/// where each field ferry passes on lies in it. Writing these to an HTTP/1.1
/// client is a copy per field; building a header map of them (for HTTP/2
/// clients, and hyper's HTTP/1.1 server) is done only where one is needed.
/// Names keep the upstream's case, as from nginx.
#[derive(Debug)]
pub struct RawFields {
    head: Bytes,
    /// Where each field passed on lies in `head`, then, when `lines` is
    /// known, the runs of whole lines they make (start and end).
    spans: Vec<Span>,
    /// How many of `spans` are fields.
    fields: u32,
    /// Known when each field is written in `head` exactly as ferry would
    /// write it (`name: value` and CRLF) and none is one a client's head
    /// leaves out: a copy per run of lines then writes them all.
    lines: Option<Lines>,
}

/// What a writer of a head needs to know of fields it copies as whole lines.
#[derive(Debug, Clone, Copy)]
pub struct Lines {
    /// A `Content-Length` is among them.
    pub length: bool,
    /// A `Date` is among them.
    pub date: bool,
}

/// Runs of consecutive field lines in a response head (start, end), while
/// the head is parsed.
struct Runs {
    runs: [(u32, u32); MAX_RUNS],
    n: usize,
    lines: Lines,
}

/// Runs of lines kept inline: more (fields the proxy leaves out between
/// others) and the fields are written one by one.
const MAX_RUNS: usize = 4;

impl Runs {
    /// Note the field at `s`, kept in the head's order. `false`: not written
    /// as ferry would, or one run too many.
    fn add(&mut self, head: &[u8], s: &Span) -> bool {
        let [name_end, value_start, value_end] = [s[1], s[2], s[3]].map(|v| v as usize);
        let written_as_is = value_start == name_end + 2
            && head.get(name_end..value_start) == Some(&b": "[..])
            && head.get(value_end..value_end + 2) == Some(&b"\r\n"[..]);
        if !written_as_is {
            return false;
        }
        let end = s[3] + 2;
        match self.n {
            n if n > 0 && self.runs[n - 1].1 == s[0] => self.runs[n - 1].1 = end,
            MAX_RUNS => return false,
            n => {
                self.runs[n] = (s[0], end);
                self.n += 1;
            }
        }
        true
    }
}

impl RawFields {
    /// The fields as runs of whole lines of the head, when they can be
    /// written so (see [`RawFields::lines`]), with what is known of them.
    pub fn lines(&self) -> Option<(impl Iterator<Item = &[u8]>, Lines)> {
        let lines = self.lines?;
        let runs = self.spans[self.fields as usize..]
            .iter()
            .map(|s| &self.head[s[0] as usize..s[1] as usize]);
        Some((runs, lines))
    }

    /// The fields, name and value, in the order the upstream sent them.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans[..self.fields as usize]
            .iter()
            .map(|s| field_at(&self.head, s))
    }

    /// The fields in a header map. Each was checked when the head was
    /// parsed, so none is left out.
    pub fn into_map(self) -> HeaderMap {
        let fields = &self.spans[..self.fields as usize];
        let mut map = HeaderMap::with_capacity(fields.len());
        for s in fields {
            if let Ok((name, value)) = header_at(&self.head, s) {
                map.append(name, value);
            }
        }
        map
    }
}

impl std::fmt::Debug for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Head")
            .field("status", &self.parts.status)
            .finish_non_exhaustive()
    }
}

/// Where a connection goes back to when its response ends cleanly.
#[derive(Debug)]
pub struct Home {
    /// The peer it is a connection to.
    pub peer: Arc<Peer>,
    /// Most idle connections to keep to that peer (`keepalive`).
    pub max_idle: usize,
    /// How long an idle connection stays (`keepalive_timeout`).
    pub timeout: Duration,
}

impl Head {
    /// The response status.
    pub fn status(&self) -> StatusCode {
        self.parts.status
    }

    /// The response, its body reading from `conn`, which goes back to `home`
    /// once the body has been read to its end. `now`: when the head was read.
    pub fn into_response(self, conn: Conn, home: Option<Home>, now: Instant) -> Response<H1Body> {
        let mut body = H1Body {
            fields: self.fields,
            conn: Some(conn),
            buf: self.buf,
            state: self.state,
            reuse: self.reuse,
            home,
        };
        // After `101` the connection carries another protocol: it stays with
        // the body, for `into_upgraded`.
        if self.parts.status != StatusCode::SWITCHING_PROTOCOLS {
            match body.state {
                State::Done => body.finish(|| now),
                // The whole body came with the head: the connection goes back
                // now, and the body is served from what was read.
                State::Length(n) if n == body.buf.len() as u64 => {
                    let data = std::mem::take(&mut body.buf);
                    body.finish(|| now);
                    body.buf = data;
                    body.state = State::Length(n);
                }
                _ => {}
            }
        }
        Response::from_parts(self.parts, body)
    }
}

/// How far a response body has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes to go (`Content-Length`).
    Length(u64),
    /// Chunked: at a chunk-size line.
    ChunkSize,
    /// Chunked: this many bytes of the current chunk to go.
    ChunkData(u64),
    /// Chunked: the CRLF after a chunk's data.
    ChunkEnd,
    /// Chunked: trailer lines, up to the empty line (trailers are dropped).
    Trailers,
    /// Everything until the peer closes.
    Eof,
    /// Read to its end.
    Done,
}

/// Send `req` on `conn` and read the response head. The request body is
/// streamed from `req` (which keeps its parts); a response that starts before
/// the body is all sent stops the sending, as nginx does, and the connection
/// is then not reused.
///
/// `fields`: the request's header fields as the client wrote them, when they
/// are not in its map (see [`ReqFields`]).
pub(crate) async fn send(
    conn: &mut Conn,
    req: &mut Request<ReqBody>,
    fields: Option<&ReqFields>,
    fwd: &Forwarded,
) -> Result<Head, SendError> {
    let is_head = req.method() == Method::HEAD;
    let mut out = Vec::with_capacity(512);
    let chunked = encode_request(req, fields, Some(fwd), &mut out);
    let io = &mut conn.io;
    let mut reuse = true;
    let mut buf = BytesMut::new();
    match req.body_mut() {
        ReqBody::Full(b) => {
            // A copy (shared, not copied): the request keeps its body in
            // case it goes to another connection.
            let data = b.clone().unwrap_or_default();
            if data.len() <= COPY_BODY {
                out.extend_from_slice(&data);
                write_first(io, &out, &[]).await?;
            } else {
                write_first(io, &out, &data).await?;
            }
        }
        ReqBody::Empty => write_first(io, &out, &[]).await?,
        body => {
            write_first(io, &out, &[]).await?;
            reuse = send_stream(io, body, &mut buf, chunked).await?;
        }
    }
    io.flush().await.map_err(|error| SendError::Io {
        error,
        answered: false,
    })?;
    let mut head = read_head(io, &mut buf, is_head).await?;
    head.reuse &= reuse;
    head.buf = buf;
    Ok(head)
}

/// The request line and headers into `out`, then `fwd`'s fields, with the
/// body's framing. Returns whether the body is sent chunked. `Content-Length`
/// and `Transfer-Encoding` from the client are replaced by the framing of the
/// body ferry sends.
fn encode_request(
    req: &Request<ReqBody>,
    fields: Option<&ReqFields>,
    fwd: Option<&Forwarded>,
    out: &mut Vec<u8>,
) -> bool {
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut had_length = false;
    if let Some(fields) = fields {
        for (name, value) in fields.iter() {
            if is(name, b"content-length") {
                had_length = true;
            } else if !is_hop_by_hop(name) {
                put_header(out, name, value);
            }
        }
    }
    for (name, value) in req.headers() {
        if name == http::header::CONTENT_LENGTH {
            had_length = true;
            continue;
        }
        if name == http::header::TRANSFER_ENCODING {
            continue;
        }
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(fwd) = fwd {
        fwd.put(out);
    }
    let mut chunked = false;
    let length = match req.body() {
        ReqBody::Empty => {
            (had_length || matches!(req.method().as_str(), "POST" | "PUT" | "PATCH")).then_some(0)
        }
        ReqBody::Full(b) => Some(b.as_ref().map_or(0, |b| b.len() as u64)),
        body => match body.size_hint().exact() {
            Some(n) => Some(n),
            None => {
                chunked = true;
                None
            }
        },
    };
    if let Some(n) = length {
        let mut b = itoa::Buffer::new();
        put_header(out, b"content-length", b.format(n).as_bytes());
    } else if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    chunked
}

/// Write the head (and `more` after it). A failure before any byte went out
/// is [`SendError::NotSent`].
async fn write_first(io: &mut UpIo, head: &[u8], more: &[u8]) -> Result<(), SendError> {
    let mut bufs = [IoSlice::new(head), IoSlice::new(more)];
    let mut bufs = &mut bufs[..];
    IoSlice::advance_slices(&mut bufs, 0);
    let mut written = 0usize;
    while !bufs.is_empty() {
        let r = poll_fn(|cx| Pin::new(&mut *io).poll_write_vectored(cx, bufs)).await;
        let error = match r {
            Ok(0) => io::Error::from(io::ErrorKind::WriteZero),
            Ok(n) => {
                written += n;
                IoSlice::advance_slices(&mut bufs, n);
                continue;
            }
            Err(e) => e,
        };
        return Err(if written == 0 {
            SendError::NotSent(error)
        } else {
            SendError::Io {
                error,
                answered: false,
            }
        });
    }
    Ok(())
}

/// Stream the request body. Returns whether it was all sent: `false` when the
/// response began first (its bytes are left in `buf`).
async fn send_stream(
    io: &mut UpIo,
    body: &mut ReqBody,
    buf: &mut BytesMut,
    chunked: bool,
) -> Result<bool, SendError> {
    let failed = |error| SendError::Io {
        error,
        answered: false,
    };
    loop {
        let frame = tokio::select! {
            biased;
            r = poll_fn(|cx| poll_fill(io, buf, cx)) => {
                match r {
                    Ok(0) => return Err(failed(io::ErrorKind::UnexpectedEof.into())),
                    Ok(_) => {
                        skip_interim(buf)?;
                        if buf.is_empty() {
                            continue;
                        }
                        return Ok(false);
                    }
                    Err(e) => return Err(failed(e)),
                }
            }
            f = poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)) => f,
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => return Err(SendError::Body(e)),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) if !d.is_empty() => d,
                // Trailers are not forwarded; empty data says nothing.
                _ => continue,
            },
        };
        if chunked {
            let mut size = Vec::with_capacity(18);
            put_chunk_size(&mut size, data.len());
            let mut parts = [
                IoSlice::new(&size),
                IoSlice::new(&data),
                IoSlice::new(b"\r\n"),
            ];
            write_all_vectored(io, &mut parts).await.map_err(failed)?;
        } else {
            io.write_all(&data).await.map_err(failed)?;
        }
        if body.is_end_stream() {
            break;
        }
    }
    if chunked {
        io.write_all(b"0\r\n\r\n").await.map_err(failed)?;
    }
    Ok(true)
}

/// Drop complete interim (1xx, not 101) heads from the front of `buf`.
fn skip_interim(buf: &mut BytesMut) -> Result<(), SendError> {
    while !buf.is_empty() {
        let mut raw = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut raw)
        {
            Ok(httparse::Status::Complete(len))
                if resp
                    .code
                    .is_some_and(|c| (100..200).contains(&c) && c != 101) =>
            {
                buf.advance(len);
            }
            Ok(_) => return Ok(()),
            Err(e) => return Err(SendError::Invalid(e.to_string())),
        }
    }
    Ok(())
}

/// Read until a final response head is complete, skipping interim ones.
async fn read_head(io: &mut UpIo, buf: &mut BytesMut, is_head: bool) -> Result<Head, SendError> {
    let mut answered = false;
    loop {
        while !buf.is_empty() {
            answered = true;
            let before = buf.len();
            if let Some(head) = parse_head(buf, is_head)? {
                return Ok(head);
            }
            if buf.len() == before {
                // Not complete yet.
                break;
            }
        }
        let n = poll_fn(|cx| poll_fill(io, buf, cx))
            .await
            .map_err(|error| SendError::Io { error, answered })?;
        if n == 0 {
            return Err(SendError::Io {
                error: io::ErrorKind::UnexpectedEof.into(),
                answered,
            });
        }
    }
}

/// Read what the upstream sent into `buf`; `Ok(0)` at its close. The first
/// read goes through a buffer on the stack and `buf` takes just what came, so
/// that a response read whole in it costs a small allocation rather than a
/// read buffer's. Later reads (a larger head, or a body read on) go straight
/// into `buf`, with room made for them.
fn poll_fill(io: &mut UpIo, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if buf.capacity() == 0 {
        return match io {
            UpIo::Plain(s) => crate::sock::poll_recv(s, cx, buf),
            UpIo::Tls(s) => crate::sock::poll_read_into(&mut **s, cx, buf),
        };
    }
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_BUF);
    }
    poll_read_buf(Pin::new(io), cx, buf)
}

/// Parse a response head at the start of `buf`. `Ok(None)`: not complete yet,
/// or an interim head that was taken off `buf`.
fn parse_head(buf: &mut BytesMut, is_head: bool) -> Result<Option<Head>, SendError> {
    // Where each field lies; those passed on are kept at its front.
    let mut spans: Vec<Span> = Vec::new();
    let (len, code, minor, reason) = {
        let mut raw = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let base = buf.as_ptr() as usize;
        let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut raw)
        {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
            Ok(_) => return Err(SendError::Invalid("head larger than 64 KiB".into())),
            Err(e) => return Err(SendError::Invalid(e.to_string())),
        };
        let (Some(code), Some(minor)) = (resp.code, resp.version) else {
            return Err(SendError::Invalid("no status line".into()));
        };
        let reason = resp
            .reason
            .filter(|r| !r.is_empty())
            .map(|r| (at(r.as_bytes()), at(r.as_bytes()) + r.len() as u32));
        // Room for the runs of lines too (see `RawFields`).
        spans.reserve_exact(resp.headers.len() + MAX_RUNS);
        spans.resize(resp.headers.len(), [0; 4]);
        record_spans(&mut spans, resp.headers, base);
        (len, code, minor, reason)
    };
    if (100..200).contains(&code) && code != 101 {
        buf.advance(len);
        return Ok(None);
    }
    let status = StatusCode::from_u16(code)
        .map_err(|_| SendError::Invalid(format!("status code {code}")))?;
    let head = buf.split_to(len).freeze();
    // The fields passed on. They stay in the head (see `RawFields`) unless one
    // needs the header map's handling: after 101, or with a hop-by-hop field
    // the proxy strips from the map (`Connection` naming others, `Upgrade`,
    // `TE`, `Trailer`, `Proxy-*`).
    let mut kept = 0;
    let mut raw = code != 101;
    let mut lines = Some(Runs {
        runs: [(0, 0); MAX_RUNS],
        n: 0,
        lines: Lines {
            length: false,
            date: false,
        },
    });
    let mut length: Option<u64> = None;
    let (mut te, mut te_chunked) = (false, false);
    let (mut close, mut keep_alive) = (false, false);
    for i in 0..spans.len() {
        let s = &spans[i];
        let (name, value) = field_at(&head, s);
        if is(name, b"content-length") {
            for v in value.split(|&b| b == b',') {
                let v = parse_length(v.trim_ascii())
                    .ok_or_else(|| SendError::Invalid("invalid Content-Length".into()))?;
                if length.is_some_and(|l| l != v) {
                    return Err(SendError::Invalid("conflicting Content-Length".into()));
                }
                length = Some(v);
            }
            // A list ("5, 5") is one a client's head leaves out (see
            // `h1::encode_head`): those fields are written one by one.
            match &mut lines {
                Some(l) if parse_length(value).is_some() => l.lines.length = true,
                _ => lines = None,
            }
        } else if is(name, b"transfer-encoding") {
            te = true;
            // Only the last coding counts: chunked must be last to frame the body.
            te_chunked = value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .rfind(|t| !t.is_empty())
                .is_some_and(|t| is(t, b"chunked"));
            if code != 101 {
                // Framing of this hop only: ferry frames the client's copy.
                continue;
            }
        } else if is(name, b"connection") {
            let mut names_others = false;
            for t in value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                if is(t, b"close") {
                    close = true;
                } else if is(t, b"keep-alive") {
                    keep_alive = true;
                } else if !t.is_empty() {
                    names_others = true;
                }
            }
            if code != 101 && !names_others {
                // Said of this hop only, and naming no other field to drop:
                // left out here rather than removed later.
                continue;
            }
            raw = false;
        } else if code != 101 && is(name, b"keep-alive") {
            continue;
        } else if is_stripped_later(name) {
            raw = false;
        } else if is(name, b"date")
            && let Some(l) = &mut lines
        {
            l.lines.date = true;
        }
        if lines.as_mut().is_some_and(|l| !l.add(&head, s)) {
            lines = None;
        }
        spans[kept] = spans[i];
        kept += 1;
    }
    spans.truncate(kept);
    let lines = lines.map(|l| {
        spans.extend(l.runs[..l.n].iter().map(|&(a, b)| [a, b, 0, 0]));
        l.lines
    });
    // A reason phrase other than the usual one goes to the client as it is.
    let reason_phrase = reason.and_then(|(a, b)| {
        let text = &head[a as usize..b as usize];
        if status.canonical_reason().map(str::as_bytes) == Some(text) {
            return None;
        }
        hyper::ext::ReasonPhrase::try_from(head.slice(a as usize..b as usize)).ok()
    });
    // httparse took only token names and values of visible characters, spaces
    // and tabs: what a header map takes too.
    let (headers, fields) = if raw {
        (
            None,
            Some(RawFields {
                head,
                spans,
                fields: kept as u32,
                lines,
            }),
        )
    } else {
        let mut headers = HeaderMap::with_capacity(kept);
        for s in &spans[..kept] {
            let (name, value) = header_at(&head, s).map_err(|e| SendError::Invalid(e.into()))?;
            headers.append(name, value);
        }
        (Some(headers), None)
    };
    let bodiless = is_head || code == 101 || code == 204 || code == 304;
    let state = if bodiless {
        State::Done
    } else if te {
        if te_chunked {
            State::ChunkSize
        } else {
            State::Eof
        }
    } else {
        match length {
            Some(0) => State::Done,
            Some(n) => State::Length(n),
            None => State::Eof,
        }
    };
    let version = if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    // A head with both framings may be an attempt at smuggling: no reuse.
    let reuse = code != 101
        && state != State::Eof
        && !(te && length.is_some())
        && if minor == 1 {
            !close
        } else {
            keep_alive && !close
        };
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    if let Some(headers) = headers {
        *resp.headers_mut() = headers;
    }
    if let Some(r) = reason_phrase {
        resp.extensions_mut().insert(r);
    }
    let (parts, ()) = resp.into_parts();
    Ok(Some(Head {
        parts,
        fields,
        state,
        reuse,
        buf: BytesMut::new(),
    }))
}

/// Whether a field is said of one hop only (RFC 9110's, the legacy ones, and
/// the framing): a request read as it was written leaves these out. The same
/// names as `proxy::HOP_BY_HOP`, which strips them from a header map.
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    match name.len() {
        2 => is(name, b"te"),
        7 => is(name, b"trailer"),
        10 => is(name, b"connection") || is(name, b"keep-alive"),
        16 => is(name, b"proxy-connection"),
        17 => is(name, b"transfer-encoding"),
        18 => is(name, b"proxy-authenticate"),
        19 => is(name, b"proxy-authorization"),
        _ => false,
    }
}

/// Whether a response field is one the proxy strips from a header map of the
/// response (other than those `parse_head` leaves out itself).
fn is_stripped_later(name: &[u8]) -> bool {
    [
        &b"upgrade"[..],
        b"te",
        b"trailer",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    ]
    .iter()
    .any(|n| is(name, n))
}

/// A response body read from an upstream HTTP/1.1 connection. When it has
/// been read to its end cleanly, the connection goes back to the pool.
pub struct H1Body {
    /// The response's header fields, when they are not in its header map.
    fields: Option<RawFields>,
    conn: Option<Conn>,
    buf: BytesMut,
    state: State,
    reuse: bool,
    home: Option<Home>,
}

impl std::fmt::Debug for H1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Body")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// The upstream connection ended a response body early or framed it wrongly.
fn body_error(what: &'static str) -> BoxError {
    Box::new(io::Error::new(io::ErrorKind::InvalidData, what))
}

impl H1Body {
    /// The response's header fields as the upstream wrote them, when they are
    /// not in the response's header map (see [`RawFields`]).
    pub fn fields(&self) -> Option<&RawFields> {
        self.fields.as_ref()
    }

    /// Take the fields [`H1Body::fields`] gives, to put them in a header map.
    pub fn take_fields(&mut self) -> Option<RawFields> {
        self.fields.take()
    }

    /// The connection and the bytes read past the head, for a `101 Switching
    /// Protocols` answer: from here on the connection carries the new protocol.
    pub fn into_upgraded(mut self) -> Option<(UpIo, Bytes)> {
        let conn = self.conn.take()?;
        Some((conn.io, std::mem::take(&mut self.buf).freeze()))
    }

    /// The body was read to its end: the connection goes home when it can
    /// carry another request (`now` reads the clock for its return, only
    /// then). Once gone, the connection stays gone.
    fn finish(&mut self, now: impl FnOnce() -> Instant) {
        self.state = State::Done;
        let conn = self.conn.take();
        if let (Some(conn), Some(home), true) = (conn, self.home.take(), self.reuse)
            && self.buf.is_empty()
        {
            crate::client::checkin(&home.peer, conn, home.max_idle, home.timeout, now());
        }
        self.buf = BytesMut::new();
    }

    /// Read more from the connection into `buf`; `Ok(0)` at its close.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_BUF * 2);
        }
        poll_read_buf(Pin::new(&mut conn.io), cx, &mut self.buf)
    }

    /// Up to `left` bytes from `buf`, as one frame.
    fn take(&mut self, left: u64) -> Bytes {
        let n = self
            .buf
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        self.buf.split_to(n).freeze()
    }

    /// The next line in `buf` (without its line end), taken off; `None` when
    /// no full line is there yet.
    fn line(&mut self) -> Result<Option<Bytes>, BoxError> {
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let mut line = self.buf.split_to(i + 1);
                line.truncate(i);
                if line.last() == Some(&b'\r') {
                    line.truncate(i - 1);
                }
                Ok(Some(line.freeze()))
            }
            None if self.buf.len() > MAX_HEAD => Err(body_error("chunk line too long")),
            None => Ok(None),
        }
    }
}

/// The size on a chunk-size line (extensions after `;` ignored).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        let d = (b as char).to_digit(16)?;
        Some(n * 16 + u64::from(d))
    })
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match this.state {
                State::Done => return Poll::Ready(None),
                State::Length(0) => {
                    this.finish(Instant::now);
                    return Poll::Ready(None);
                }
                State::Length(left) | State::ChunkData(left) if !this.buf.is_empty() => {
                    let data = this.take(left);
                    let rest = left - data.len() as u64;
                    match (this.state, rest) {
                        (State::Length(_), 0) => this.finish(Instant::now),
                        (State::Length(_), _) => this.state = State::Length(rest),
                        (_, 0) => this.state = State::ChunkEnd,
                        _ => this.state = State::ChunkData(rest),
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Eof if !this.buf.is_empty() => {
                    let data = this.take(u64::MAX);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::ChunkSize if !this.buf.is_empty() => {
                    if let Some(line) = this.line()? {
                        match chunk_size(&line) {
                            Some(0) => this.state = State::Trailers,
                            Some(n) => this.state = State::ChunkData(n),
                            None => {
                                this.conn = None;
                                return Poll::Ready(Some(Err(body_error("invalid chunk size"))));
                            }
                        }
                        continue;
                    }
                }
                State::ChunkEnd if !this.buf.is_empty() => match this.line()? {
                    Some(line) if line.is_empty() => {
                        this.state = State::ChunkSize;
                        continue;
                    }
                    Some(_) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(body_error(
                            "chunk data longer than its size",
                        ))));
                    }
                    None => {}
                },
                State::Trailers if !this.buf.is_empty() => match this.line()? {
                    Some(line) if line.is_empty() => {
                        this.finish(Instant::now);
                        return Poll::Ready(None);
                    }
                    // Trailer fields are not forwarded.
                    Some(_) => continue,
                    None => {}
                },
                _ => {}
            }
            // `buf` lacks what the state needs: read more.
            let had = this.buf.len();
            match ready!(this.poll_fill(cx)) {
                Ok(0) if this.state == State::Eof => {
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(body_error(
                        "upstream closed the connection before the end of the body",
                    ))));
                }
                Ok(_) => debug_assert!(this.buf.len() > had),
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8], is_head: bool) -> Result<Option<Head>, SendError> {
        let mut buf = BytesMut::from(raw);
        let mut head = parse_head(&mut buf, is_head)?;
        // As `send` does: what follows the head stays with it.
        if let Some(h) = head.as_mut() {
            h.buf = buf;
        }
        Ok(head)
    }

    fn state_of(raw: &[u8]) -> (State, bool) {
        let h = parse(raw, false).expect("parses").expect("complete");
        (h.state, h.reuse)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        assert_eq!(
            state_of(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            (State::Length(5), true)
        );
        assert_eq!(
            state_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            (State::ChunkSize, true)
        );
        // Chunked not last: read to the close.
        assert_eq!(
            state_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            (State::Eof, false)
        );
        // Both framings: Transfer-Encoding wins, and the connection is not reused.
        assert_eq!(
            state_of(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            (State::ChunkSize, false)
        );
        assert_eq!(state_of(b"HTTP/1.1 200 OK\r\n\r\n"), (State::Eof, false));
        assert_eq!(
            state_of(b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"),
            (State::Done, true)
        );
        assert_eq!(
            state_of(b"HTTP/1.1 304 Not Modified\r\n\r\n"),
            (State::Done, true)
        );
        assert_eq!(
            state_of(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
            (State::Done, false)
        );
        assert_eq!(
            state_of(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n"),
            (State::Length(2), false)
        );
        assert_eq!(
            state_of(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n"),
            (State::Length(2), true)
        );
        let h = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true)
            .expect("parses")
            .expect("complete");
        assert_eq!(h.state, State::Done, "no body after HEAD");
    }

    #[test]
    fn this_hops_fields_are_left_out() {
        let h = parse(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
              Transfer-Encoding: chunked\r\nX-App: 1\r\n\r\n",
            false,
        )
        .expect("parses")
        .expect("complete");
        // Kept as the upstream wrote them, out of the header map.
        assert!(h.parts.headers.is_empty());
        let fields = h.fields.as_ref().expect("raw fields");
        let kept: Vec<(&[u8], &[u8])> = fields.iter().collect();
        assert_eq!(kept, [(&b"X-App"[..], &b"1"[..])]);
        assert_eq!(h.state, State::ChunkSize);
        // A field the proxy strips from a map sends the head to one.
        for field in [
            "Upgrade: h2c",
            "TE: trailers",
            "Trailer: x",
            "Proxy-Connection: x",
        ] {
            let text =
                format!("HTTP/1.1 200 OK\r\n{field}\r\nX-App: 1\r\nContent-Length: 0\r\n\r\n");
            let h = parse(text.as_bytes(), false)
                .expect("parses")
                .expect("complete");
            assert!(h.fields.is_none(), "{field}");
            assert_eq!(h.parts.headers.len(), 3, "{field}");
        }
        // A Connection that names other fields stays, for the proxy to drop them.
        let h = parse(
            b"HTTP/1.1 200 OK\r\nConnection: close, x-secret\r\nX-Secret: s\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .expect("parses")
        .expect("complete");
        assert!(h.parts.headers.contains_key("connection"));
        assert!(!h.reuse);
        // After 101 everything stays: the client needs Connection and Upgrade.
        let h = parse(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            false,
        )
        .expect("parses")
        .expect("complete");
        assert!(h.parts.headers.contains_key("connection"));
        assert!(h.parts.headers.contains_key("upgrade"));
    }

    #[test]
    fn bad_lengths_are_invalid() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"SMTP ready\r\n\r\n",
        ] {
            assert!(
                parse(raw, false).is_err_and(|e| e.is_invalid()),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        // Repeated equal lengths are one length.
        assert_eq!(
            state_of(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n").0,
            State::Length(5)
        );
    }

    #[test]
    fn interim_heads_are_skipped_and_reasons_kept() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 Fine\r\nContent-Length: 2\r\n\r\nhi"[..],
        );
        assert!(parse_head(&mut buf, false).expect("parses").is_none());
        assert!(parse_head(&mut buf, false).expect("parses").is_none());
        let h = parse_head(&mut buf, false).expect("parses").expect("final");
        assert_eq!(h.status(), StatusCode::OK);
        let reason = h.parts.extensions.get::<hyper::ext::ReasonPhrase>();
        assert_eq!(reason.map(|r| r.as_bytes()), Some(&b"Fine"[..]));
        assert_eq!(&buf[..], b"hi");
        let h = parse(b"HTTP/1.1 200 OK\r\n\r\n", false)
            .expect("parses")
            .expect("complete");
        assert!(
            h.parts
                .extensions
                .get::<hyper::ext::ReasonPhrase>()
                .is_none()
        );
        // Incomplete: wait for more.
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Le", false).is_ok_and(|h| h.is_none()));
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"0"), Some(0));
        assert_eq!(chunk_size(b"A;name=value"), Some(10));
        assert_eq!(chunk_size(b"  ff "), Some(255));
        assert_eq!(chunk_size(b""), None);
        assert_eq!(chunk_size(b"-1"), None);
        assert_eq!(chunk_size(b"0x10"), None);
        assert_eq!(chunk_size(b"1234567890abcdef0"), None);
    }

    #[test]
    fn request_framing() {
        let encode = |method: &str, body: ReqBody, headers: &[(&str, &str)]| {
            let mut req = Request::new(body);
            *req.method_mut() = method.parse().expect("method");
            *req.uri_mut() = "/p?q=1".parse().expect("uri");
            for (n, v) in headers {
                req.headers_mut().append(
                    HeaderName::from_bytes(n.as_bytes()).expect("name"),
                    HeaderValue::from_str(v).expect("value"),
                );
            }
            let mut out = Vec::new();
            let chunked = encode_request(&req, None, None, &mut out);
            (String::from_utf8(out).expect("text"), chunked)
        };
        let (get, chunked) = encode("GET", ReqBody::Empty, &[("host", "a")]);
        assert_eq!(get, "GET /p?q=1 HTTP/1.1\r\nhost: a\r\n\r\n");
        assert!(!chunked);
        let mut req = Request::new(ReqBody::Empty);
        *req.uri_mut() = "/".parse().expect("uri");
        req.headers_mut()
            .insert("host", HeaderValue::from_static("a"));
        let fwd = Forwarded {
            for_chain: HeaderValue::from_static("10.0.0.1, 127.0.0.1"),
            real_ip: HeaderValue::from_static("127.0.0.1"),
            proto: "https",
            host: Some(HeaderValue::from_static("a")),
        };
        let mut out = Vec::new();
        encode_request(&req, None, Some(&fwd), &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "GET / HTTP/1.1\r\nhost: a\r\nx-forwarded-for: 10.0.0.1, 127.0.0.1\r\n\
             x-real-ip: 127.0.0.1\r\nx-forwarded-proto: https\r\nx-forwarded-host: a\r\n\r\n"
        );
        let (post, _) = encode("POST", ReqBody::Empty, &[]);
        assert_eq!(post, "POST /p?q=1 HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        let (put, _) = encode(
            "PUT",
            ReqBody::Full(Some(Bytes::from_static(b"abc"))),
            &[("content-length", "3"), ("transfer-encoding", "chunked")],
        );
        assert_eq!(put, "PUT /p?q=1 HTTP/1.1\r\ncontent-length: 3\r\n\r\n");
    }

    /// A connection to `peer` over real loopback sockets, and the far end.
    async fn conn_pair() -> (Conn, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let near = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (far, _) = l.accept().await.expect("accept");
        (Conn::new(UpIo::Plain(near)), far)
    }

    fn home(peer: &Arc<Peer>) -> Home {
        Home {
            peer: Arc::clone(peer),
            max_idle: 4,
            timeout: Duration::from_secs(60),
        }
    }

    async fn body_of(mut b: H1Body) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(f) = poll_fn(|cx| Pin::new(&mut b).poll_frame(cx)).await {
            out.extend_from_slice(&f.expect("frame").into_data().expect("data"));
        }
        assert!(b.is_end_stream());
        out
    }

    #[tokio::test]
    async fn a_body_read_whole_with_its_head_frees_the_connection_at_once() {
        let peer = Arc::new(Peer::new(
            "127.0.0.1:1".parse().expect("addr"),
            crate::balance::testutil::params("p", 1),
        ));
        let idle = || peer.idle_conns.load(std::sync::atomic::Ordering::Relaxed);

        // Head and whole body in one read: the connection goes back before
        // the body is served, and the body is still all there.
        let head = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false)
            .expect("parses")
            .expect("complete");
        let (conn, _far) = conn_pair().await;
        let resp = head.into_response(conn, Some(home(&peer)), Instant::now());
        assert_eq!(idle(), 1, "pooled as soon as the head is taken");
        assert_eq!(body_of(resp.into_body()).await, b"hello");
        assert_eq!(idle(), 1, "pooled once, not twice");

        // Part of the body: the connection stays with it until the rest is read.
        let head = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", false)
            .expect("parses")
            .expect("complete");
        let (conn, mut far) = conn_pair().await;
        let resp = head.into_response(conn, Some(home(&peer)), Instant::now());
        assert_eq!(idle(), 1, "the first connection only");
        far.write_all(b"world").await.expect("write");
        assert_eq!(body_of(resp.into_body()).await, b"helloworld");
        assert_eq!(idle(), 2, "pooled when the body ended");

        // More than the body: the peer is out of step, the connection closes.
        let head = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhello", false)
            .expect("parses")
            .expect("complete");
        let (conn, _far) = conn_pair().await;
        let resp = head.into_response(conn, Some(home(&peer)), Instant::now());
        assert_eq!(body_of(resp.into_body()).await, b"he");
        assert_eq!(idle(), 2, "not pooled");
    }
}
