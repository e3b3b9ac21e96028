//! Per-client-connection state: what stub_status calls Reading, Writing and
//! Waiting, and the timestamps the idle and header timeouts are measured from.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, watch};
use tokio::time::Sleep;

use crate::metrics::WorkerCounters;
use crate::peer::now_ms;
use crate::sock::{self, Wire};

/// Idle keep-alive, waiting for the first byte of a request.
pub const WAITING: u8 = 0;
/// Reading a request head.
pub const READING: u8 = 1;
/// A request in progress.
pub const WRITING: u8 = 2;
/// Closed (counted out).
const CLOSED: u8 = 3;

/// See [`ConnState::due`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// The timeout of this state (`WAITING` or `READING`) passed.
    Passed(u8),
    /// Look again in this many milliseconds.
    In(u64),
}

/// State shared by a connection's IO wrapper, its requests and its timer.
#[derive(Debug)]
pub struct ConnState {
    state: AtomicU8,
    /// When the current state began (ms, [`now_ms`]).
    since: AtomicU64,
    /// Responses still being written (a pipelined request may start before the
    /// previous response ended).
    active: AtomicU32,
    /// At least one request was received.
    served: std::sync::atomic::AtomicBool,
    /// ferry answered before reading the whole request body: linger at close.
    linger: AtomicBool,
    /// HTTP/2: streams ended, and how many of them the client cut short.
    streams_ended: AtomicU32,
    streams_cut: AtomicU32,
    /// HTTP/2: the client cuts most of its streams short; close the connection.
    abusive: Notify,
    counters: &'static WorkerCounters,
}

/// HTTP/2 streams a client may cut short (reset before the response ended)
/// before the share of cut streams is looked at.
const CUT_STREAMS_ALLOWED: u32 = 100;

impl ConnState {
    /// A new connection starts waiting for its first request.
    pub fn new(counters: &'static WorkerCounters) -> ConnState {
        counters.waiting.fetch_add(1, Relaxed);
        ConnState {
            state: AtomicU8::new(WAITING),
            since: AtomicU64::new(now_ms()),
            active: AtomicU32::new(0),
            served: std::sync::atomic::AtomicBool::new(false),
            linger: AtomicBool::new(false),
            streams_ended: AtomicU32::new(0),
            streams_cut: AtomicU32::new(0),
            abusive: Notify::new(),
            counters,
        }
    }

    fn gauge(&self, s: u8) -> Option<&std::sync::atomic::AtomicI64> {
        match s {
            WAITING => Some(&self.counters.waiting),
            READING => Some(&self.counters.reading),
            WRITING => Some(&self.counters.writing),
            _ => None,
        }
    }

    fn set(&self, to: u8) {
        self.set_at(to, None);
    }

    /// Enter state `to` (if not in it), which began at `at_ms` ([`now_ms`]
    /// when not given).
    fn set_at(&self, to: u8, at_ms: Option<u64>) {
        let from = self.state.swap(to, Relaxed);
        if from != to {
            if let Some(g) = self.gauge(from) {
                g.fetch_sub(1, Relaxed);
            }
            if let Some(g) = self.gauge(to) {
                g.fetch_add(1, Relaxed);
            }
            self.since.store(at_ms.unwrap_or_else(now_ms), Relaxed);
        }
    }

    /// Current state and since when (ms).
    pub fn get(&self) -> (u8, u64) {
        (self.state.load(Relaxed), self.since.load(Relaxed))
    }

    /// Bytes of a request arrived.
    #[inline]
    pub fn on_read(&self) {
        if self.state.load(Relaxed) == WAITING {
            self.set(READING);
        }
    }

    /// What the connection's timer finds when it fires: whether the current
    /// state's timeout passed (`client_header_timeout` for a first request or
    /// a head begun, `keepalive_timeout` between requests), else when to look
    /// again. The timer is not told when the state changes, so while waiting
    /// it looks again at least every `header_ms`: a head begun meanwhile then
    /// gets its whole `header_ms` from its first byte, however far off the
    /// keep-alive deadline is.
    pub fn due(&self, header_ms: u64, keepalive_ms: u64, period: u64) -> Due {
        let (st, since) = self.get();
        let limit = match st {
            WAITING if self.served_any() => keepalive_ms,
            WAITING | READING => header_ms,
            _ => return Due::In(period.max(1)),
        };
        let elapsed = now_ms().saturating_sub(since);
        if elapsed >= limit {
            return Due::Passed(st);
        }
        let left = limit - elapsed;
        Due::In(
            if st == WAITING {
                left.min(header_ms)
            } else {
                left
            }
            .max(1),
        )
    }

    /// Back to Waiting, when the bytes read so far turned out not to be a
    /// request (the HTTP/2 preface).
    pub fn waiting(&self) {
        self.set(WAITING);
    }

    /// A request head was parsed and is being served, from `at_ms` ([`now_ms`]).
    #[inline]
    pub fn request_started(&self, at_ms: u64) {
        self.served.store(true, Relaxed);
        self.active.fetch_add(1, Relaxed);
        self.set_at(WRITING, Some(at_ms));
    }

    /// A response ended, at `at_ms` ([`now_ms`]).
    #[inline]
    pub fn request_finished(&self, at_ms: u64) {
        if self.active.fetch_sub(1, Relaxed) == 1 && self.state.load(Relaxed) == WRITING {
            self.set_at(WAITING, Some(at_ms));
        }
    }

    /// ferry answers (and closes) without reading the whole request body: the
    /// close will linger so the client can finish sending and read the answer.
    pub fn linger_on_close(&self) {
        self.linger.store(true, Relaxed);
    }

    /// An HTTP/2 stream ended; `cut`: before its response did (the client
    /// reset it). A client that cuts more than [`CUT_STREAMS_ALLOWED`] streams,
    /// and most of its streams, is flooding resets (CVE-2023-44487 with the
    /// streams accepted before the resets arrive): its connection is closed.
    pub fn stream_ended(&self, cut: bool) {
        let ended = self.streams_ended.fetch_add(1, Relaxed) + 1;
        if cut {
            let n = self.streams_cut.fetch_add(1, Relaxed) + 1;
            if n > CUT_STREAMS_ALLOWED && n * 2 > ended {
                self.abusive.notify_one();
            }
        }
    }

    /// Resolves when the client turned out to flood stream resets.
    pub async fn abusive(&self) {
        self.abusive.notified().await
    }

    /// Whether any request arrived on this connection.
    pub fn served_any(&self) -> bool {
        self.served.load(Relaxed)
    }

    /// The connection closed.
    pub fn close(&self) {
        self.set(CLOSED);
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        self.close();
    }
}

/// Longest a close lingers (nginx's `lingering_time`, shortened).
const LINGER: Duration = Duration::from_secs(5);

/// The client socket, noting when request bytes arrive.
#[derive(Debug)]
pub struct ClientIo<T> {
    inner: T,
    state: Arc<ConnState>,
    /// The write side is shut (FIN sent).
    shut: bool,
    /// Deadline of a lingering close in progress.
    linger: Option<Pin<Box<Sleep>>>,
}

impl<T> ClientIo<T> {
    /// The socket, unwrapped.
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// Wrap a socket.
    pub fn new(inner: T, state: Arc<ConnState>) -> ClientIo<T> {
        ClientIo {
            inner,
            state,
            shut: false,
            linger: None,
        }
    }
}

impl<T: Wire> ClientIo<T> {
    /// Read what the client sent onto the end of `buf`, through a buffer on
    /// the stack: while waiting, the connection holds no memory for reading.
    /// `Ok(0)`: the client closed.
    ///
    /// Unlike reads through [`AsyncRead`], this leaves the connection's state
    /// to the caller: bytes that make a whole request head start a request
    /// ([`ConnState::request_started`]) at once, and only a partial head calls
    /// for [`ConnState::on_read`] (and its clock reading).
    pub fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        let n = match self.inner.tcp() {
            Some(s) => ready!(sock::poll_recv(s, cx, buf))?,
            None => ready!(sock::poll_read_into(&mut self.inner, cx, buf))?,
        };
        Poll::Ready(Ok(n))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_read();
        }
        r
    }
}

impl<T: Wire> AsyncWrite for ClientIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.inner.tcp() {
            Some(s) => sock::poll_send(s, cx, buf),
            None => Pin::new(&mut self.inner).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.inner.tcp() {
            Some(s) => sock::poll_sendv(s, cx, bufs),
            None => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Send FIN; then, when ferry answered without reading the whole request body
    /// (a 413 to an upload), read and discard until the client closes too, for at
    /// most [`LINGER`] (nginx's lingering close). Closing with unread bytes
    /// would send an RST, and an RST can destroy the answer before the client
    /// reads it.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.shut {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.shut = true;
        }
        if !this.state.linger.load(Relaxed) {
            return Poll::Ready(Ok(()));
        }
        let deadline = this
            .linger
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
        let mut scratch = [0u8; 16 * 1024];
        for _ in 0..64 {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {}
                // The client is gone; nothing more to protect.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        // A fast sender: let the worker's other connections run, then go on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

thread_local! {
    /// The tasks of this worker's connections that wait for a request, woken
    /// all at once when ferry stops ([`wake_stop_watchers`]). Each worker runs
    /// its connections on its own thread.
    static STOP_WATCHERS: RefCell<slab::Slab<Waker>> = const { RefCell::new(slab::Slab::new()) };
}

/// Whether ferry is stopping, as a connection waiting for its next request
/// watches it: the connection's task is registered once with its worker
/// ([`STOP_WATCHERS`]), so a wait costs one atomic load instead of a `watch`
/// waiter added and removed each time, and holds no waiter state.
#[derive(Default)]
pub struct StopWatch {
    slot: Option<usize>,
}

impl StopWatch {
    /// Ready once `stop` says ferry is stopping, or its sender is gone.
    pub fn poll_stop(&mut self, cx: &mut Context<'_>, stop: &watch::Receiver<bool>) -> Poll<()> {
        let stopping = if self.slot.is_none() {
            // Registered with the task's waker, which stays the same for the
            // connection's life; the value as it is now covers a stop that
            // came before.
            self.slot = Some(STOP_WATCHERS.with(|w| w.borrow_mut().insert(cx.waker().clone())));
            stop.has_changed().is_err() || *stop.borrow()
        } else {
            // A stop is a new version of the value.
            match stop.has_changed() {
                Ok(false) => false,
                Ok(true) => *stop.borrow(),
                Err(_) => true,
            }
        };
        if stopping {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for StopWatch {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            // `try_with`: at the thread's end the registry may be gone already.
            let _ = STOP_WATCHERS.try_with(|w| w.borrow_mut().try_remove(slot));
        }
    }
}

/// Wake this worker's connections that wait for a request: ferry stops, and
/// they close (see [`StopWatch`]).
pub fn wake_stop_watchers() {
    STOP_WATCHERS.with(|w| {
        for (_, waker) in w.borrow().iter() {
            waker.wake_by_ref();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[tokio::test(start_paused = true)]
    async fn a_head_begun_while_waiting_gets_the_whole_header_timeout() {
        let counters: &'static WorkerCounters = Box::leak(Box::default());
        let (header, keepalive) = (1_000, 10_000);
        let s = ConnState::new(counters);
        // A new connection has `header` for its first request.
        assert_eq!(s.due(header, keepalive, header), Due::In(1_000));
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(s.due(header, keepalive, header), Due::In(600));
        // Served at 0.4 s: waiting between requests is under `keepalive`, but
        // the timer looks again within `header`.
        s.request_started(now_ms());
        s.request_finished(now_ms());
        tokio::time::advance(Duration::from_millis(1_000)).await;
        assert_eq!(s.due(header, keepalive, header), Due::In(1_000));
        // A head begins at 1.4 s: it has 1 s from then, not from the wait.
        tokio::time::advance(Duration::from_millis(100)).await;
        s.on_read();
        tokio::time::advance(Duration::from_millis(900)).await;
        assert_eq!(s.due(header, keepalive, header), Due::In(100));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(s.due(header, keepalive, header), Due::Passed(READING));
        // A connection waiting longer than `keepalive` is done too.
        let idle = ConnState::new(counters);
        idle.request_started(now_ms());
        idle.request_finished(now_ms());
        tokio::time::advance(Duration::from_millis(10_000)).await;
        assert_eq!(idle.due(header, keepalive, header), Due::Passed(WAITING));
        // While a request is served, no timeout of these applies.
        idle.request_started(now_ms());
        tokio::time::advance(Duration::from_millis(60_000)).await;
        assert_eq!(idle.due(header, keepalive, header), Due::In(1_000));
    }

    fn registered() -> usize {
        STOP_WATCHERS.with(|w| w.borrow().len())
    }

    #[tokio::test]
    async fn a_waiting_connection_is_woken_when_ferry_stops() {
        let (tx, rx) = watch::channel(false);
        let before = registered();
        let waiting = tokio::spawn(async move {
            let mut w = StopWatch::default();
            poll_fn(|cx| w.poll_stop(cx, &rx)).await;
        });
        // The task runs on this thread: it registers at its first poll.
        for _ in 0..100 {
            if registered() > before {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(registered(), before + 1);
        // Nothing wakes it until its worker does.
        tx.send(true).expect("send");
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished());
        wake_stop_watchers();
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("woken within 10 s")
            .expect("task");
        // Gone from the registry with its connection.
        assert_eq!(registered(), before);
    }

    #[test]
    fn a_stop_that_came_before_the_first_wait_is_seen() {
        let (tx, rx) = watch::channel(false);
        tx.send(true).expect("send");
        let mut w = StopWatch::default();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(w.poll_stop(&mut cx, &rx).is_ready());
        // So is a sender that is gone.
        let (tx, rx) = watch::channel(false);
        drop(tx);
        let mut w = StopWatch::default();
        assert!(w.poll_stop(&mut cx, &rx).is_ready());
    }
}
