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

/// A request body sent upstream.
#[derive(Debug)]
pub enum ReqBody {
    /// No body.
    Empty,
    /// The client's body, streamed, with a size limit (0 = none).
    Stream {
        /// The client's body.
        inner: Incoming,
        /// Bytes still allowed; `u64::MAX` = unlimited.
        left: u64,
        /// When the last data frame went out ([`crate::peer::now_ms`]; 0 = none yet):
        /// a started body cannot be replayed, and progress re-arms the read timeout.
        progress: Arc<AtomicU64>,
    },
}

impl ReqBody {
    /// Wrap a client body with a limit (`0` = unlimited).
    pub fn stream(inner: Incoming, limit: u64, progress: Arc<AtomicU64>) -> ReqBody {
        ReqBody::Stream {
            inner,
            left: if limit == 0 { u64::MAX } else { limit },
            progress,
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
            ReqBody::Stream {
                inner,
                left,
                progress,
            } => {
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
            ReqBody::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Stream { inner, .. } => inner.size_hint(),
        }
    }
}
