//! Reads and writes on plain TCP sockets by direct system calls.
//!
//! glibc's `recv`, `send` and `writev` are thread cancellation points: each
//! call switches the thread's cancellation state on and off around the system
//! call, two atomic operations per call. ferry never cancels a thread, so the
//! request path calls the kernel itself (through rustix) and keeps tokio's
//! readiness handling: wait until the socket is ready, try, and on
//! `WouldBlock` clear the readiness and wait again.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use rustix::net::{RecvFlags, SendFlags};
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::TcpStream;

/// At most this much is read by one call of [`poll_recv`]. A request head is
/// usually far smaller; a larger one takes several reads.
pub const READ_CHUNK: usize = 4096;

/// A client or upstream connection's byte stream, and the plain TCP socket
/// under it when there is no TLS in between.
pub trait Wire: AsyncRead + AsyncWrite + Unpin {
    /// The plain TCP socket, when the stream is one.
    fn tcp(&self) -> Option<&TcpStream>;
}

impl Wire for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl Wire for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

/// Read what has arrived on `s`, at most [`READ_CHUNK`] bytes, onto the end of
/// `buf`, through a buffer on the stack: `buf` grows by what came, not by a
/// read buffer's size. `Ok(0)`: the peer closed.
pub fn poll_recv(
    s: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
    loop {
        ready!(s.poll_read_ready(cx))?;
        let mut n = 0;
        let r = s.try_io(Interest::READABLE, || {
            let ((got, _), _) = rustix::net::recv(s, &mut stack[..], RecvFlags::empty())?;
            buf.extend_from_slice(got);
            n = got.len();
            if n > 0 && n < READ_CHUNK {
                // Less than asked for: the socket is drained. Said as
                // `WouldBlock`, which has tokio clear the readiness (unless
                // more arrived meanwhile), as its own reads do, so that the
                // next read waits for data rather than calling to learn
                // there is none.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match r {
            // Bytes came: the error is the drained socket's (see above).
            Err(_) if n > 0 => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return Poll::Ready(r),
        }
    }
}

/// What [`poll_recv`] does, for a stream that is not plain TCP (TLS): read
/// at most [`READ_CHUNK`] bytes through a buffer on the stack onto the end of
/// `buf`. `Ok(0)`: the peer closed.
pub fn poll_read_into<R: AsyncRead + Unpin>(
    r: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
    let mut rb = tokio::io::ReadBuf::uninit(&mut stack);
    ready!(std::pin::Pin::new(r).poll_read(cx, &mut rb))?;
    buf.extend_from_slice(rb.filled());
    Poll::Ready(Ok(rb.filled().len()))
}

/// Send `data` on `s` (without SIGPIPE if the peer is gone).
///
/// A socket is nearly always writable, and tokio remembers when it last was
/// not: the send is tried first, and only a socket not known writable (or
/// one the kernel finds full) has the task wait for readiness. Reads, which
/// wait for the peer, still count against tokio's cooperative budget.
#[inline]
pub fn poll_send(s: &TcpStream, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
    loop {
        let r = s.try_io(Interest::WRITABLE, || {
            Ok(rustix::net::send(s, data, SendFlags::NOSIGNAL)?)
        });
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return Poll::Ready(r),
        }
        ready!(s.poll_write_ready(cx))?;
    }
}

/// Send `bufs` on `s` in one call (without SIGPIPE if the peer is gone).
pub fn poll_sendv(
    s: &TcpStream,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    // A single slice with bytes (empty ones carry nothing) goes by `send`,
    // which costs the kernel less than `sendmsg`.
    let mut full = bufs.iter().filter(|b| !b.is_empty());
    match (full.next(), full.next()) {
        (None, _) => return Poll::Ready(Ok(0)),
        (Some(one), None) => return poll_send(s, cx, one),
        _ => {}
    }
    // Tried first, as in `poll_send`.
    loop {
        let r = s.try_io(Interest::WRITABLE, || {
            Ok(rustix::net::sendmsg(
                s,
                bufs,
                &mut rustix::net::SendAncillaryBuffer::default(),
                SendFlags::NOSIGNAL,
            )?)
        });
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return Poll::Ready(r),
        }
        ready!(s.poll_write_ready(cx))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    async fn recv(s: &TcpStream, buf: &mut BytesMut) -> usize {
        let read = poll_fn(|cx| poll_recv(s, cx, buf));
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("data within 10 s")
            .expect("recv")
    }

    #[tokio::test]
    async fn reads_what_came_in_chunks_and_wakes_for_more() {
        let (mut client, server) = pair().await;
        let sent: Vec<u8> = (0..READ_CHUNK + 100).map(|i| i as u8).collect();
        client.write_all(&sent).await.expect("write");
        let mut buf = BytesMut::new();
        while buf.len() < sent.len() {
            let n = recv(&server, &mut buf).await;
            assert!(n > 0 && n <= READ_CHUNK, "{n}");
        }
        assert_eq!(&buf[..], &sent[..]);
        // Drained, its readiness cleared: new bytes still wake the reader.
        client.write_all(b"x").await.expect("write");
        assert_eq!(recv(&server, &mut buf).await, 1);
        assert_eq!(buf.last(), Some(&b'x'));
        drop(client);
        assert_eq!(recv(&server, &mut buf).await, 0);
    }

    #[tokio::test]
    async fn a_full_socket_waits_for_room_then_sends_the_rest() {
        let (mut client, server) = pair().await;
        let chunk = vec![7u8; 64 * 1024];
        // Fill the socket until the kernel takes no more: the send is pending.
        let mut sent = 0usize;
        let mut filled = false;
        for _ in 0..10_000 {
            match poll_fn(|cx| Poll::Ready(poll_send(&server, cx, &chunk))).await {
                Poll::Ready(r) => sent += r.expect("send"),
                Poll::Pending => {
                    filled = true;
                    break;
                }
            }
        }
        assert!(filled, "the socket never filled");
        // The peer reads everything; the waiting send then goes through.
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            client.read_to_end(&mut all).await.expect("read");
            all
        });
        let last = tokio::time::timeout(
            Duration::from_secs(10),
            poll_fn(|cx| poll_send(&server, cx, &chunk)),
        )
        .await
        .expect("room within 10 s")
        .expect("send");
        assert!(last > 0);
        drop(server);
        let all = reader.await.expect("reader");
        assert_eq!(all.len(), sent + last);
        assert!(all.iter().all(|&b| b == 7));
    }

    #[tokio::test]
    async fn sends_slices_in_order_and_fails_to_a_closed_peer() {
        let (mut client, server) = pair().await;
        let parts = [
            IoSlice::new(b"head "),
            IoSlice::new(b""),
            IoSlice::new(b"body"),
        ];
        let n = poll_fn(|cx| poll_sendv(&server, cx, &parts))
            .await
            .expect("send");
        assert_eq!(n, 9);
        // One slice with bytes among empty ones.
        let parts = [IoSlice::new(b""), IoSlice::new(b" one "), IoSlice::new(b"")];
        let n = poll_fn(|cx| poll_sendv(&server, cx, &parts))
            .await
            .expect("send");
        assert_eq!(n, 5);
        let n = poll_fn(|cx| poll_sendv(&server, cx, &[IoSlice::new(b"")]))
            .await
            .expect("send");
        assert_eq!(n, 0);
        let n = poll_fn(|cx| poll_send(&server, cx, b"!"))
            .await
            .expect("send");
        assert_eq!(n, 1);
        let mut got = [0u8; 15];
        let read = client.read_exact(&mut got);
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("all within 10 s")
            .expect("read");
        assert_eq!(&got, b"head body one !");
        drop(client);
        // The peer is gone: sending fails (EPIPE or a reset), without SIGPIPE.
        let mut failed = false;
        for _ in 0..100 {
            if poll_fn(|cx| poll_send(&server, cx, b"more")).await.is_err() {
                failed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(failed, "sending to a closed peer kept succeeding");
    }
}
