//! The access log: entries go through a bounded channel to a writer thread, so a
//! slow disk never stalls a request; when the channel is full the line is dropped
//! and counted.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{AccessLogTarget, LogFormat};

/// Lines buffered between the request path and the writer.
const QUEUE: usize = 16 * 1024;

/// The peers a request was sent to: address, status, time. Inline for two.
pub type Trail = smallvec::SmallVec<[(std::net::SocketAddr, u16, Duration); 2]>;

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
    tx: Option<SyncSender<Entry>>,
    reopen: Arc<AtomicBool>,
    dropped: prometheus::IntCounter,
}

impl AccessLog {
    /// A log that writes nothing.
    pub fn off() -> AccessLog {
        AccessLog {
            tx: None,
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
            .spawn(move || writer(rx, out, path, format, flag))?;
        Ok(AccessLog {
            tx: Some(tx),
            reopen,
            dropped,
        })
    }

    /// Whether entries are wanted at all (skip building them when off).
    #[inline]
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queue an entry; drop it (and count it) when the writer is behind.
    pub fn log(&self, e: Entry) {
        if let Some(tx) = &self.tx {
            match tx.try_send(e) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.dropped.inc();
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
    rx: Receiver<Entry>,
    mut out: Box<dyn std::io::Write + Send>,
    path: Option<PathBuf>,
    format: LogFormat,
    reopen: Arc<AtomicBool>,
) {
    let mut buf = String::with_capacity(64 * 1024);
    let mut clock = Clock::default();
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(e) => Some(e),
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
        // Let a batch gather: while the writer sleeps, queuing a line costs the
        // request path no wake-up.
        std::thread::sleep(BATCH_WAIT);
        buf.clear();
        format_with(&mut buf, &first, format, &mut clock);
        loop {
            match rx.try_recv() {
                Ok(e) => format_with(&mut buf, &e, format, &mut clock),
                Err(_) => break,
            }
            if buf.len() >= 60 * 1024 {
                let _ = out.write_all(buf.as_bytes());
                buf.clear();
            }
        }
        let _ = out.write_all(buf.as_bytes());
        let _ = out.flush();
    }
}

/// How long the writer lets lines gather before writing a batch.
const BATCH_WAIT: Duration = Duration::from_millis(20);

/// `$time_local` of the last second formatted, reused within that second.
#[derive(Default)]
struct Clock {
    secs: u64,
    text: String,
}

impl Clock {
    fn local(&mut self, t: SystemTime) -> &str {
        let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if secs != self.secs || self.text.is_empty() {
            self.secs = secs;
            self.text = time_local(t);
        }
        &self.text
    }
}

fn format_with(buf: &mut String, e: &Entry, format: LogFormat, clock: &mut Clock) {
    match format {
        LogFormat::Combined => combined(buf, e, clock),
        LogFormat::Json => json(buf, e, clock),
    }
}

/// Append one formatted line (with newline).
pub fn format_entry(buf: &mut String, e: &Entry, format: LogFormat) {
    format_with(buf, e, format, &mut Clock::default());
}

fn hv(v: &Option<http::HeaderValue>) -> &str {
    v.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-")
}

fn combined(buf: &mut String, e: &Entry, clock: &mut Clock) {
    let _ = write!(
        buf,
        "{} - - [{}] \"{} {} {:?}\" {} {} \"{}\" \"{}\" ",
        e.remote,
        clock.local(e.time),
        e.method,
        e.uri,
        e.version,
        e.status,
        e.bytes,
        hv(&e.referer),
        hv(&e.user_agent),
    );
    if e.upstreams.is_empty() {
        buf.push_str("- - -");
    } else {
        for (i, (addr, _, _)) in e.upstreams.iter().enumerate() {
            let _ = write!(buf, "{}{addr}", if i > 0 { ", " } else { "" });
        }
        buf.push(' ');
        for (i, (_, status, _)) in e.upstreams.iter().enumerate() {
            buf.push_str(if i > 0 { ", " } else { "" });
            match status {
                0 => buf.push('-'),
                s => {
                    let _ = write!(buf, "{s}");
                }
            }
        }
        buf.push(' ');
        for (i, (_, _, t)) in e.upstreams.iter().enumerate() {
            let sep = if i > 0 { ", " } else { "" };
            let _ = write!(buf, "{sep}{:.3}", t.as_secs_f64());
        }
    }
    let _ = write!(buf, " {:.3}", e.request_time.as_secs_f64());
    if let Some(n) = e.note {
        let _ = write!(buf, " \"{n}\"");
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

fn json(buf: &mut String, e: &Entry, clock: &mut Clock) {
    buf.push_str("{\"time\":");
    json_str(buf, clock.local(e.time));
    buf.push_str(",\"remote_addr\":");
    json_str(buf, &e.remote.to_string());
    buf.push_str(",\"method\":");
    json_str(buf, e.method.as_str());
    buf.push_str(",\"uri\":");
    json_str(buf, &e.uri.to_string());
    buf.push_str(",\"protocol\":");
    json_str(buf, &format!("{:?}", e.version));
    let _ = write!(
        buf,
        ",\"status\":{},\"body_bytes_sent\":{}",
        e.status, e.bytes
    );
    buf.push_str(",\"http_referer\":");
    json_str(buf, hv(&e.referer));
    buf.push_str(",\"http_user_agent\":");
    json_str(buf, hv(&e.user_agent));
    buf.push_str(",\"upstreams\":[");
    for (i, (addr, status, t)) in e.upstreams.iter().enumerate() {
        if i > 0 {
            buf.push(',');
        }
        let _ = write!(buf, "{{\"addr\":\"{addr}\"");
        let _ = write!(
            buf,
            ",\"status\":{},\"response_time\":{:.3}}}",
            status,
            t.as_secs_f64()
        );
    }
    let _ = write!(
        buf,
        "],\"request_time\":{:.3}",
        e.request_time.as_secs_f64()
    );
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
                ("10.0.0.1:80".parse().unwrap(), 0, Duration::from_millis(3)),
                (
                    "10.0.0.2:80".parse().unwrap(),
                    200,
                    Duration::from_millis(12)
                ),
            ],
            request_time: Duration::from_millis(15),
            note: None,
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
