//! The access log. Each worker formats its lines into a buffer of its own and
//! hands full buffers (or, every 100 ms, what it has) through a bounded channel to
//! a writer thread, so a slow disk never stalls a request: when the channel is
//! full, the lines are dropped and counted. The request path pays for a few
//! reference-counted clones when the request arrives and the formatting of the
//! line when it ends; no lock, no allocation, no clock read, no wake-up per line.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::{AccessLogTarget, LogFormat};

/// Batches buffered between the workers and the writer.
const QUEUE: usize = 256;

/// A worker hands its buffer over once it holds this much.
const BATCH_BYTES: usize = 16 * 1024;

/// A worker hands over what it has at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// What workers send the writer.
enum Batch {
    /// Formatted lines.
    Lines(String),
    /// Write out everything so far, then say so.
    Sync(std::sync::mpsc::Sender<()>),
}

/// The peers a request was sent to: address, status, time. Inline for two.
pub type Trail = smallvec::SmallVec<[(Arc<str>, u16, Duration); 2]>;

/// One finished request.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Client address.
    pub remote: IpAddr,
    /// When the response ended.
    pub time: SystemTime,
    /// Method.
    pub method: http::Method,
    /// Request target as received.
    pub uri: http::Uri,
    /// Client's HTTP version.
    pub version: http::Version,
    /// Status sent to the client.
    pub status: u16,
    /// Body bytes sent to the client.
    pub bytes: u64,
    /// Referer header.
    pub referer: Option<http::HeaderValue>,
    /// User-Agent header.
    pub user_agent: Option<http::HeaderValue>,
    /// Every peer tried, in order, with its status (0 = no response) and time.
    pub upstreams: Trail,
    /// Time from request head to the end of the response.
    pub request_time: Duration,
    /// Why ferry answered itself (502, 504, 404 ...), if it did.
    pub note: Option<&'static str>,
}

/// The sending side, cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: Option<SyncSender<Batch>>,
    format: LogFormat,
    reopen: Arc<AtomicBool>,
    dropped: prometheus::IntCounter,
}

impl AccessLog {
    /// A log that writes nothing.
    pub fn off() -> AccessLog {
        AccessLog {
            tx: None,
            format: LogFormat::Combined,
            reopen: Arc::new(AtomicBool::new(false)),
            dropped: prometheus::IntCounter::new("unused", "unused").expect("valid metric"),
        }
    }

    /// Start the writer thread for `target`.
    pub fn start(
        target: &AccessLogTarget,
        format: LogFormat,
        dropped: prometheus::IntCounter,
    ) -> std::io::Result<AccessLog> {
        let path = match target {
            AccessLogTarget::Off => return Ok(AccessLog::off()),
            AccessLogTarget::Stdout => None,
            AccessLogTarget::File(p) => Some(p.clone()),
        };
        // Open once here so that a bad path is an error at start, not a silent loss.
        let out = open(path.as_ref())?;
        let (tx, rx) = sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&reopen);
        std::thread::Builder::new()
            .name("ferry-log".into())
            .spawn(move || writer(rx, out, path, flag))?;
        Ok(AccessLog {
            tx: Some(tx),
            format,
            reopen,
            dropped,
        })
    }

    /// Whether requests are logged.
    pub fn is_on(&self) -> bool {
        self.tx.is_some()
    }

    /// The request's part of its log line, taken when it arrives (`None` when
    /// the log is off).
    pub fn request_part(&self, req: &http::Request<impl Sized>) -> Option<RequestPart> {
        self.tx.as_ref()?;
        let h = req.headers();
        let (mut referer, mut user_agent) = (None, None);
        if h.len() <= 8 {
            // A short scan compares names without hashing them; most requests
            // carry few headers and neither of these.
            for (n, v) in h {
                if n == http::header::REFERER {
                    referer.get_or_insert_with(|| v.clone());
                } else if n == http::header::USER_AGENT {
                    user_agent.get_or_insert_with(|| v.clone());
                }
            }
        } else {
            referer = h.get(http::header::REFERER).cloned();
            user_agent = h.get(http::header::USER_AGENT).cloned();
        }
        Some(RequestPart {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            referer,
            user_agent,
        })
    }

    /// Log a finished request: format its line into this worker's buffer.
    pub fn finish(&self, part: &RequestPart, end: &End<'_>) {
        if self.tx.is_none() {
            return;
        }
        let (full, flusher) = LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            let l = &mut *l;
            line(&mut l.buf, self.format, &mut l.clock, part, end);
            l.lines += 1;
            (l.buf.len() >= BATCH_BYTES, l.flusher)
        });
        let flusher = match flusher {
            Some(running) => running,
            None => {
                // First line on this thread: a worker runtime hands its buffer
                // over on a timer too; a thread without one hands over every line.
                let running = tokio::runtime::Handle::try_current().is_ok();
                if running {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let mut tick = tokio::time::interval(FLUSH_EVERY);
                        loop {
                            tick.tick().await;
                            me.hand_over();
                        }
                    });
                }
                LOCAL.with(|l| l.borrow_mut().flusher = Some(running));
                running
            }
        };
        if full || !flusher {
            self.hand_over();
        }
    }

    /// Give this worker's buffered lines to the writer now (a worker that stops).
    pub fn flush(&self) {
        self.hand_over();
    }

    /// Wait (a little) until the writer has written everything handed over.
    pub fn close(&self) {
        let Some(tx) = &self.tx else { return };
        let (ack, done) = std::sync::mpsc::channel();
        if tx.send(Batch::Sync(ack)).is_ok() {
            let _ = done.recv_timeout(Duration::from_secs(2));
        }
    }

    /// Give this worker's buffered lines to the writer (dropped and counted when
    /// the writer is behind).
    fn hand_over(&self) {
        let Some(tx) = &self.tx else { return };
        let batch = LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            if l.lines == 0 {
                return None;
            }
            let buf = std::mem::replace(&mut l.buf, String::with_capacity(BATCH_BYTES + 1024));
            Some((buf, std::mem::take(&mut l.lines)))
        });
        if let Some((buf, lines)) = batch {
            match tx.try_send(Batch::Lines(buf)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.dropped.inc_by(lines);
                }
            }
        }
    }

    /// Ask the writer to reopen its file (SIGUSR1, for logrotate).
    pub fn reopen(&self) {
        self.reopen.store(true, Relaxed);
    }
}

fn open(path: Option<&PathBuf>) -> std::io::Result<Box<dyn std::io::Write + Send>> {
    Ok(match path {
        None => Box::new(std::io::stdout()),
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
    })
}

/// The writer thread: batches queued entries into one write. It wakes at least
/// every 500 ms, so a reopen asked for by SIGUSR1 happens within that even
/// when no request comes.
fn writer(
    rx: Receiver<Batch>,
    mut out: Box<dyn std::io::Write + Send>,
    path: Option<PathBuf>,
    reopen: Arc<AtomicBool>,
) {
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(b) => Some(b),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        if reopen.swap(false, Relaxed) {
            let _ = out.flush();
            match open(path.as_ref()) {
                Ok(o) => {
                    out = o;
                    if let Some(p) = &path {
                        tracing::info!(path = %p.display(), "access log reopened");
                    }
                }
                // Keep writing to the old file rather than losing lines.
                Err(e) => tracing::error!(error = %e, "cannot reopen the access log"),
            }
        }
        let Some(first) = first else { continue };
        let mut next = Some(first);
        while let Some(batch) = next {
            match batch {
                Batch::Lines(buf) => {
                    let _ = out.write_all(buf.as_bytes());
                }
                Batch::Sync(ack) => {
                    let _ = out.flush();
                    let _ = ack.send(());
                }
            }
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
    }
}

/// `$time_local` of the current second, formatted once a second. Lines are
/// stamped with the monotonic instant their request ended (read anyway for
/// `$request_time`), so the wall clock is read once a second, not once a line.
#[derive(Default)]
struct Clock {
    text: String,
    /// The instants for which `text` is right: `[from, until)`.
    valid: Option<(Instant, Instant)>,
}

impl Clock {
    fn local(&mut self, at: Instant) -> &str {
        match self.valid {
            Some((from, until)) if at >= from && at < until => {}
            _ => {
                let wall = SystemTime::now();
                let into = wall.duration_since(UNIX_EPOCH).map_or(Duration::ZERO, |d| {
                    Duration::from_nanos(u64::from(d.subsec_nanos()))
                });
                let now = Instant::now();
                let from = now.checked_sub(into).unwrap_or(now);
                self.text = time_local(wall);
                self.valid = Some((from, from + Duration::from_secs(1)));
            }
        }
        &self.text
    }

    /// A clock that writes `wall` for instants within a second of `at`.
    fn fixed(wall: SystemTime, at: Instant) -> Clock {
        Clock {
            text: time_local(wall),
            valid: Some((at, at + Duration::from_secs(1))),
        }
    }
}

/// This worker's buffered lines.
#[derive(Default)]
struct Local {
    buf: String,
    lines: u64,
    clock: Clock,
    /// Whether a timer hands this thread's buffer over (`None`: not known yet).
    flusher: Option<bool>,
}

thread_local! {
    static LOCAL: std::cell::RefCell<Local> = std::cell::RefCell::new(Local::default());
}

/// Append one formatted line (with newline) for `e`.
pub fn format_entry(buf: &mut String, e: &Entry, format: LogFormat) {
    let part = RequestPart {
        method: e.method.clone(),
        uri: e.uri.clone(),
        version: e.version,
        referer: e.referer.clone(),
        user_agent: e.user_agent.clone(),
    };
    let remote = e.remote.to_string();
    let at = Instant::now();
    let end = End {
        remote: &remote,
        at,
        status: e.status,
        bytes: e.bytes,
        upstreams: &e.upstreams,
        request_time: e.request_time,
        note: e.note,
    };
    line(buf, format, &mut Clock::fixed(e.time, at), &part, &end);
}

/// The part of a line known when the request arrives, kept as the request's
/// own (reference-counted) values and formatted when the line is written.
#[derive(Debug)]
pub struct RequestPart {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    referer: Option<http::HeaderValue>,
    user_agent: Option<http::HeaderValue>,
}

/// Seconds with millisecond resolution, as nginx writes times (`0.012`), without
/// going through floating point.
struct Secs(Duration);

impl std::fmt::Display for Secs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::with_capacity(12);
        push_secs(&mut s, self.0);
        f.write_str(&s)
    }
}

/// The request target as the client wrote it: HTTP/2's `:path` (the URI hyper
/// builds carries `:scheme` and `:authority` too), HTTP/1.1's target as sent.
fn push_target(text: &mut String, uri: &http::Uri, version: http::Version) {
    match uri.path_and_query() {
        Some(pq)
            if version == http::Version::HTTP_2
                || (uri.scheme().is_none() && uri.authority().is_none()) =>
        {
            text.push_str(pq.as_str())
        }
        _ => {
            let _ = write!(text, "{uri}");
        }
    }
}

fn version_str(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

/// Append an integer without the formatting machinery.
fn push_int(buf: &mut String, n: impl itoa::Integer) {
    buf.push_str(itoa::Buffer::new().format(n));
}

/// ".000" to ".999", for the milliseconds of a time.
const MILLIS: &str = {
    const BYTES: [u8; 4000] = {
        let mut b = [0u8; 4000];
        let mut i = 0;
        while i < 1000 {
            b[i * 4] = b'.';
            b[i * 4 + 1] = b'0' + (i / 100) as u8;
            b[i * 4 + 2] = b'0' + (i / 10 % 10) as u8;
            b[i * 4 + 3] = b'0' + (i % 10) as u8;
            i += 1;
        }
        b
    };
    match std::str::from_utf8(&BYTES) {
        Ok(s) => s,
        Err(_) => panic!("ASCII is UTF-8"),
    }
};

/// Append seconds with millisecond resolution (`0.012`), as nginx writes times.
fn push_secs(buf: &mut String, d: Duration) {
    // Rounded to the nearest millisecond, as `{:.3}` of the seconds would be.
    let ms = (d.as_micros() as u64).saturating_add(500) / 1000;
    push_int(buf, ms / 1000);
    let f = (ms % 1000) as usize * 4;
    buf.push_str(&MILLIS[f..f + 4]);
}

fn hv(v: Option<&http::HeaderValue>) -> &str {
    v.and_then(|v| v.to_str().ok()).unwrap_or("-")
}

/// What is known when the response ends.
#[derive(Debug)]
pub struct End<'a> {
    /// Client address, as text.
    pub remote: &'a str,
    /// When the response ended.
    pub at: Instant,
    /// Status sent to the client.
    pub status: u16,
    /// Body bytes sent to the client.
    pub bytes: u64,
    /// Every peer tried, in order, with its status (0 = no response) and time.
    pub upstreams: &'a Trail,
    /// Time from request head to the end of the response.
    pub request_time: Duration,
    /// Why ferry answered itself (502, 504, 404 ...), if it did.
    pub note: Option<&'static str>,
}

fn line(buf: &mut String, format: LogFormat, clock: &mut Clock, part: &RequestPart, end: &End<'_>) {
    match format {
        LogFormat::Combined => combined(buf, clock, part, end),
        LogFormat::Json => json(buf, clock, part, end),
    }
}

fn combined(buf: &mut String, clock: &mut Clock, part: &RequestPart, e: &End<'_>) {
    buf.push_str(e.remote);
    buf.push_str(" - - [");
    buf.push_str(clock.local(e.at));
    buf.push_str("] \"");
    buf.push_str(part.method.as_str());
    buf.push(' ');
    push_target(buf, &part.uri, part.version);
    buf.push(' ');
    buf.push_str(version_str(part.version));
    buf.push_str("\" ");
    push_int(buf, e.status);
    buf.push(' ');
    push_int(buf, e.bytes);
    buf.push_str(" \"");
    buf.push_str(hv(part.referer.as_ref()));
    buf.push_str("\" \"");
    buf.push_str(hv(part.user_agent.as_ref()));
    buf.push_str("\" ");
    if e.upstreams.is_empty() {
        buf.push_str("- - -");
    } else {
        for (i, (addr, _, _)) in e.upstreams.iter().enumerate() {
            buf.push_str(if i > 0 { ", " } else { "" });
            buf.push_str(addr);
        }
        buf.push(' ');
        for (i, (_, status, _)) in e.upstreams.iter().enumerate() {
            buf.push_str(if i > 0 { ", " } else { "" });
            match status {
                0 => buf.push('-'),
                s => push_int(buf, *s),
            }
        }
        buf.push(' ');
        for (i, (_, _, t)) in e.upstreams.iter().enumerate() {
            buf.push_str(if i > 0 { ", " } else { "" });
            push_secs(buf, *t);
        }
    }
    buf.push(' ');
    push_secs(buf, e.request_time);
    if let Some(n) = e.note {
        buf.push_str(" \"");
        buf.push_str(n);
        buf.push('"');
    }
    buf.push('\n');
}

fn json_str(buf: &mut String, s: &str) {
    buf.push('"');
    for c in s.chars() {
        match c {
            '"' => buf.push_str("\\\""),
            '\\' => buf.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(buf, "\\u{:04x}", c as u32);
            }
            c => buf.push(c),
        }
    }
    buf.push('"');
}

fn json(buf: &mut String, clock: &mut Clock, part: &RequestPart, e: &End<'_>) {
    buf.push_str("{\"time\":");
    json_str(buf, clock.local(e.at));
    let _ = write!(buf, ",\"remote_addr\":\"{}\"", e.remote);
    buf.push_str(",\"method\":");
    json_str(buf, part.method.as_str());
    buf.push_str(",\"uri\":");
    json_str(buf, &part.uri.to_string());
    buf.push_str(",\"protocol\":");
    json_str(buf, &format!("{:?}", part.version));
    let _ = write!(
        buf,
        ",\"status\":{},\"body_bytes_sent\":{}",
        e.status, e.bytes
    );
    buf.push_str(",\"http_referer\":");
    json_str(buf, hv(part.referer.as_ref()));
    buf.push_str(",\"http_user_agent\":");
    json_str(buf, hv(part.user_agent.as_ref()));
    buf.push_str(",\"upstreams\":[");
    for (i, (addr, status, t)) in e.upstreams.iter().enumerate() {
        if i > 0 {
            buf.push(',');
        }
        let _ = write!(
            buf,
            "{{\"addr\":\"{addr}\",\"status\":{status},\"response_time\":{}}}",
            Secs(*t)
        );
    }
    let _ = write!(buf, "],\"request_time\":{}", Secs(e.request_time));
    if let Some(n) = e.note {
        buf.push_str(",\"note\":");
        json_str(buf, n);
    }
    buf.push_str("}\n");
}

/// nginx's `$time_local` in UTC: `22/Nov/2026:00:29:32 +0000`.
pub fn time_local(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
        d,
        MON[(m - 1) as usize],
        y,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_local_matches_nginx() {
        // 2026-11-22T00:29:32Z
        let t = UNIX_EPOCH + Duration::from_secs(1_795_307_372);
        assert_eq!(time_local(t), "22/Nov/2026:00:29:32 +0000");
        assert_eq!(time_local(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
    }

    fn entry() -> Entry {
        Entry {
            remote: "127.0.0.1".parse().unwrap(),
            time: UNIX_EPOCH + Duration::from_secs(1_795_307_372),
            method: http::Method::GET,
            uri: "/a?b=1".parse().unwrap(),
            version: http::Version::HTTP_11,
            status: 200,
            bytes: 12,
            referer: None,
            user_agent: Some(http::HeaderValue::from_static("curl/8")),
            upstreams: smallvec::smallvec![
                ("10.0.0.1:80".into(), 0, Duration::from_millis(3)),
                ("10.0.0.2:80".into(), 200, Duration::from_millis(12)),
            ],
            request_time: Duration::from_millis(15),
            note: None,
        }
    }

    #[test]
    fn seconds_have_three_decimals() {
        for (d, want) in [
            (Duration::ZERO, "0.000"),
            (Duration::from_micros(499), "0.000"),
            (Duration::from_micros(500), "0.001"),
            (Duration::from_millis(12), "0.012"),
            (Duration::from_millis(61_234), "61.234"),
        ] {
            assert_eq!(Secs(d).to_string(), want);
        }
    }

    #[test]
    fn combined_line() {
        let mut s = String::new();
        format_entry(&mut s, &entry(), LogFormat::Combined);
        assert_eq!(
            s,
            "127.0.0.1 - - [22/Nov/2026:00:29:32 +0000] \"GET /a?b=1 HTTP/1.1\" 200 12 \"-\" \"curl/8\" 10.0.0.1:80, 10.0.0.2:80 -, 200 0.003, 0.012 0.015\n"
        );
    }

    #[test]
    fn json_line() {
        let mut s = String::new();
        format_entry(&mut s, &entry(), LogFormat::Json);
        assert!(
            s.starts_with("{\"time\":\"22/Nov/2026:00:29:32 +0000\",\"remote_addr\":\"127.0.0.1\"")
        );
        assert!(s.contains("\"upstreams\":[{\"addr\":\"10.0.0.1:80\",\"status\":0,"));
        assert!(s.ends_with("\"request_time\":0.015}\n"));
    }
}
