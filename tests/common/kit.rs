//! Helpers for the HTTP semantics, routing, limits and access log tests: a raw
//! HTTP/1.1 client on one TCP connection (for what curl hides: keep-alive reuse,
//! partial heads, idle timeouts, upgrades) and config builders.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ferry::demo::Backend;

use super::{Backends, DEADLINE, Ferry};

/// One response read off a [`RawConn`].
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// The head as text (status line and headers, without the blank line).
    pub head: String,
    /// Header (lower-cased name, value) pairs, in order.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// First value of a header (name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client connection speaking HTTP/1.1 by hand.
pub struct RawConn {
    /// The socket.
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    /// Connect; reads give up after [`DEADLINE`].
    pub fn connect(addr: SocketAddr) -> RawConn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(DEADLINE)).expect("read timeout");
        s.set_nodelay(true).expect("nodelay");
        RawConn { s, buf: Vec::new() }
    }

    /// Write raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write to ferry");
    }

    /// Send `METHOD path` with a Host header and `headers`, no body; read the answer.
    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> RawResponse {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: ferry.test\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.send(req.as_bytes());
        self.read_response(method == "HEAD")
    }

    /// Read more bytes into the buffer; panics on EOF or after the deadline.
    fn fill(&mut self) {
        let mut chunk = [0u8; 64 * 1024];
        match self.s.read(&mut chunk) {
            Ok(0) => panic!(
                "ferry closed the connection; unparsed: {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!(
                "read from ferry failed: {e}; unparsed: {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            self.fill();
        }
        self.buf.drain(..n).collect()
    }

    fn take_line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.take(i + 2);
                return String::from_utf8_lossy(&line[..i]).into_owned();
            }
            self.fill();
        }
    }

    /// Read one response head (1xx included), leaving the body unread.
    pub fn read_head(&mut self) -> RawResponse {
        let status_line = self.take_line();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
        let mut head = status_line;
        let mut headers = Vec::new();
        loop {
            let line = self.take_line();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
            head.push('\n');
            head.push_str(&line);
        }
        RawResponse {
            status,
            head,
            headers,
            body: Vec::new(),
        }
    }

    /// Read one final response (skipping 100 Continue) with its body, framed the
    /// way HTTP/1.1 says: none for HEAD, 1xx, 204 and 304; chunked; Content-Length;
    /// or up to the close.
    pub fn read_response(&mut self, head_request: bool) -> RawResponse {
        let mut r = self.read_head();
        while r.status == 100 {
            r = self.read_head();
        }
        if head_request || r.status < 200 || r.status == 204 || r.status == 304 {
            return r;
        }
        if r.header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let chunk = self.read_chunk();
                if chunk.is_empty() {
                    break;
                }
                r.body.extend_from_slice(&chunk);
            }
        } else if let Some(n) = r.header("content-length") {
            let n: usize = n.parse().expect("content-length");
            r.body = self.take(n);
        } else {
            r.body = std::mem::take(&mut self.buf);
            let _ = self.s.read_to_end(&mut r.body);
        }
        r
    }

    /// Read one chunk of a chunked body; empty for the last chunk.
    pub fn read_chunk(&mut self) -> Vec<u8> {
        let size = self.take_line();
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size line {size:?}"));
        if n == 0 {
            while !self.take_line().is_empty() {}
            return Vec::new();
        }
        let data = self.take(n);
        assert_eq!(self.take_line(), "", "chunk not followed by CRLF");
        data
    }

    /// Read exactly `n` more bytes (e.g. after an upgrade).
    pub fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        self.take(n)
    }

    /// Bytes received but not yet consumed.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Wait up to `within` for the peer to close (read returns 0 or an error);
    /// how long that took, or `None` if still open. Bytes that arrive meanwhile
    /// (say, an error response) are kept in the buffer.
    pub fn wait_closed(&mut self, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        let mut chunk = [0u8; 16 * 1024];
        let result = loop {
            let left = within.saturating_sub(start.elapsed());
            if left.is_zero() {
                break None;
            }
            self.s
                .set_read_timeout(Some(left.min(Duration::from_millis(200))))
                .expect("read timeout");
            match self.s.read(&mut chunk) {
                Ok(0) => break Some(start.elapsed()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break Some(start.elapsed()),
            }
        };
        self.s
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        result
    }
}

/// A ferry config: one worker, free ports, admin on, `server_extra` lines in
/// `[server]`, `log` lines in `[log]` (access off when empty), then `rest`
/// (upstreams and routes).
pub fn ferry_config(server_extra: &str, log: &str, rest: &str) -> String {
    let log = if log.is_empty() {
        "access = \"off\""
    } else {
        log
    };
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n{server_extra}\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n[log]\n{log}\n\n{rest}\n"
    )
}

/// One backend and a ferry in front of it, with `server_extra` lines in `[server]`.
pub fn one_backend(server_extra: &str) -> (Backends, Ferry) {
    let b = Backends::start(1);
    let f = Ferry::start(&ferry_config(
        server_extra,
        "",
        &upstream("app", &[b.get(0)]),
    ));
    (b, f)
}

/// An `[[upstream]]` named `name` over these backends.
pub fn upstream(name: &str, backends: &[&Backend]) -> String {
    let mut s = format!("[[upstream]]\nname = \"{name}\"\n");
    for b in backends {
        s.push_str(&format!("[[upstream.server]]\naddr = \"{}\"\n", b.addr));
    }
    s.push('\n');
    s
}

/// A `[[route]]`.
pub fn route(host: &str, path: &str, upstream: &str) -> String {
    format!("[[route]]\nhost = \"{host}\"\npath = \"{path}\"\nupstream = \"{upstream}\"\n\n")
}

/// The `accepts` total of a stub_status text.
pub fn stub_accepts(stub: &str) -> u64 {
    stub.lines()
        .nth(2)
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse stub_status: {stub:?}"))
}

/// The `Active connections` value of a stub_status text.
pub fn stub_active(stub: &str) -> u64 {
    stub.lines()
        .next()
        .and_then(|l| l.strip_prefix("Active connections:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("cannot parse stub_status: {stub:?}"))
}
