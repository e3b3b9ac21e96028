//! Request and response bodies as they pass through ferry.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Boxed error passed through bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body was larger than `client_max_body_size`.
#[derive(Debug)]
pub struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body larger than client_max_body_size")
    }
}

impl std::error::Error for BodyTooLarge {}

/// Whether an error (or anything in its source chain) is a [`BodyTooLarge`].
pub fn is_body_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyTooLarge>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A client's request body, as a server loop hands the request over.
#[derive(Debug)]
pub enum ClientBody {
    /// No body: ferry's own HTTP/1.1 loop serves only such requests itself.
    Empty,
    /// A body read by hyper's HTTP/1.1 or HTTP/2 server.
    Incoming(Incoming),
}

impl ClientBody {
    /// Whether no body bytes will come.
    pub fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Incoming(b) => b.is_end_stream(),
        }
    }

    /// The body to stream, when there is one.
    pub fn into_incoming(self) -> Option<Incoming> {
        match self {
            ClientBody::Incoming(b) if !b.is_end_stream() => Some(b),
            _ => None,
        }
    }
}

/// A request body sent upstream.
#[derive(Debug)]
pub enum ReqBody {
    /// No body.
    Empty,
    /// A body read whole (up to `retry_buffer`): it can be sent again.
    Full(Option<Bytes>),
    /// The client's body, streamed, after an optional part already read, with a
    /// size limit.
    Stream {
        /// Bytes read ahead while buffering, sent first.
        head: Option<Bytes>,
        /// The rest of the client's body.
        inner: Incoming,
        /// Bytes still allowed; `u64::MAX` = unlimited.
        left: u64,
        /// When the last data frame went out ([`crate::peer::now_ms`]; 0 = none yet):
        /// a started body cannot be replayed, and progress re-arms the read timeout.
        progress: Arc<AtomicU64>,
    },
}

/// Why a request body could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// Over `client_max_body_size`.
    TooLarge,
    /// The client failed or went away mid-body.
    Client(hyper::Error),
}

impl ReqBody {
    /// Wrap a client body with a limit (`0` = unlimited).
    pub fn stream(inner: Incoming, limit: u64, progress: Arc<AtomicU64>) -> ReqBody {
        ReqBody::Stream {
            head: None,
            inner,
            left: if limit == 0 { u64::MAX } else { limit },
            progress,
        }
    }

    /// Whether the body is empty or was read whole, so it can be sent again.
    pub fn replayable(&self) -> bool {
        matches!(self, ReqBody::Empty | ReqBody::Full(_))
    }

    /// A copy that can be sent again, when the body is empty or was read whole.
    pub fn replayable_copy(&self) -> Option<ReqBody> {
        match self {
            ReqBody::Empty => Some(ReqBody::Empty),
            ReqBody::Full(Some(b)) => Some(ReqBody::Full(Some(b.clone()))),
            _ => None,
        }
    }

    /// Read a streamed body ahead, up to `max` bytes: when it ends within that, it
    /// becomes [`ReqBody::Full`] and can be replayed on another peer; otherwise
    /// what was read is sent first and the rest streams.
    pub async fn buffer(self, max: usize) -> Result<ReqBody, ReadError> {
        let ReqBody::Stream {
            head: None,
            mut inner,
            mut left,
            progress,
        } = self
        else {
            return Ok(self);
        };
        if inner.size_hint().lower() > max as u64 {
            return Ok(ReqBody::Stream {
                head: None,
                inner,
                left,
                progress,
            });
        }
        let mut buf = bytes::BytesMut::new();
        loop {
            if inner.is_end_stream() {
                return Ok(ReqBody::Full(Some(buf.freeze())));
            }
            match std::future::poll_fn(|cx| Pin::new(&mut inner).poll_frame(cx)).await {
                None => return Ok(ReqBody::Full(Some(buf.freeze()))),
                Some(Err(e)) => return Err(ReadError::Client(e)),
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers are not forwarded
                    };
                    let n = data.len() as u64;
                    if n > left {
                        return Err(ReadError::TooLarge);
                    }
                    left -= n;
                    buf.extend_from_slice(&data);
                    if buf.len() > max {
                        return Ok(ReqBody::Stream {
                            head: Some(buf.freeze()),
                            inner,
                            left,
                            progress,
                        });
                    }
                }
            }
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ReqBody::Stream {
                head,
                inner,
                left,
                progress,
            } => {
                if let Some(h) = head.take() {
                    progress.store(crate::peer::now_ms().max(1), Relaxed);
                    return Poll::Ready(Some(Ok(Frame::data(h))));
                }
                let frame = ready!(Pin::new(inner).poll_frame(cx));
                match frame {
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            let n = d.len() as u64;
                            if n > *left {
                                return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                            }
                            *left -= n;
                            progress.store(crate::peer::now_ms().max(1), Relaxed);
                        }
                        Poll::Ready(Some(Ok(f)))
                    }
                    Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Full(b) => b.is_none(),
            ReqBody::Stream { head, inner, .. } => head.is_none() && inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty | ReqBody::Full(None) => SizeHint::with_exact(0),
            ReqBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ReqBody::Stream { head, inner, .. } => {
                let extra = head.as_ref().map_or(0, |h| h.len() as u64);
                let mut h = inner.size_hint();
                let lower = h.lower() + extra;
                match h.upper() {
                    Some(u) => h.set_exact_or(lower, u + extra),
                    None => h.set_lower(lower),
                }
                h
            }
        }
    }
}

trait SetExact {
    fn set_exact_or(&mut self, lower: u64, upper: u64);
}

impl SetExact for SizeHint {
    fn set_exact_or(&mut self, lower: u64, upper: u64) {
        if lower == upper {
            self.set_exact(lower);
        } else {
            // Upper first: a lower bound above the old upper one would panic.
            self.set_upper(upper);
            self.set_lower(lower);
        }
    }
}
