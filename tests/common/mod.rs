//! Test harness: real ferry processes in front of real backends, on loopback.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry::demo::Backend;

mod kit;
// Not every test file uses the kit.
#[allow(unused_imports)]
pub use kit::*;
mod load;
#[allow(unused_imports)]
pub use load::*;
mod pki;
#[allow(unused_imports)]
pub use pki::*;

/// Generous deadline for anything that waits on I/O.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Backends running on their own runtime, alive while this value lives.
pub struct Backends {
    pub rt: tokio::runtime::Runtime,
    pub list: Vec<Backend>,
}

impl Backends {
    /// Start `n` backends on 127.0.0.1 with free ports.
    pub fn start(n: usize) -> Backends {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let list = (0..n)
            .map(|i| {
                rt.block_on(Backend::start(
                    "127.0.0.1:0".parse().unwrap(),
                    &format!("b{}", i + 1),
                ))
                .expect("backend")
            })
            .collect();
        Backends { rt, list }
    }

    /// `[[upstream.server]]` blocks for every backend, with extra keys.
    pub fn servers(&self, extra: &str) -> String {
        self.list
            .iter()
            .map(|b| format!("[[upstream.server]]\naddr = \"{}\"\n{extra}\n", b.addr))
            .collect()
    }
}

/// A ferry process.
pub struct Ferry {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

/// Path of the ferry binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

fn collect(r: impl Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            into.lock().unwrap().push(line);
        }
    });
}

impl Ferry {
    /// Start ferry with this config text. The config must listen on
    /// 127.0.0.1:0 (and admin on 127.0.0.1:0 or "off"): the bound ports are read
    /// from ferry's log.
    pub fn start(config: &str) -> Ferry {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, config).expect("write config");
        let mut child = Command::new(bin())
            .arg("--config")
            .arg(&path)
            .env("FERRY_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        collect(child.stderr.take().unwrap(), Arc::clone(&logs));
        collect(child.stdout.take().unwrap(), Arc::clone(&stdout));
        let wants_admin = !config.contains("listen = \"off\"");
        let start = Instant::now();
        let (mut addr, mut admin) = (None, None);
        while start.elapsed() < DEADLINE {
            for line in logs.lock().unwrap().iter() {
                let grab = |l: &str| {
                    l.split("addr=")
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next())
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                };
                if line.contains("admin listening") {
                    admin = grab(line);
                } else if line.contains(" listening") && addr.is_none() {
                    addr = grab(line);
                }
            }
            if addr.is_some() && (admin.is_some() || !wants_admin) {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("ferry exited with {st}: {:?}", logs.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let addr =
            addr.unwrap_or_else(|| panic!("ferry did not start: {:?}", logs.lock().unwrap()));
        Ferry {
            child,
            addr,
            admin,
            logs,
            stdout,
            dir,
            config: path,
        }
    }

    /// `http://addr/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `http://admin/path`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin.expect("admin listener"), path)
    }

    /// GET on the admin listener, body as text.
    pub fn admin_get(&self, path: &str) -> String {
        let (status, body) = http_get(self.admin.expect("admin listener"), path, &[]);
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    /// Value of one sample in /metrics (exact series text before the value), or 0.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.admin_get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Sum of every sample of a metric family whose labels contain all `labels`.
    pub fn metric_sum(&self, name: &str, labels: &[&str]) -> f64 {
        let text = self.admin_get("/metrics");
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter(|l| labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }

    /// Send a signal.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(st.success());
    }

    /// Wait for the process to exit; its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Wait until a log line (stderr or stdout) contains `needle`.
    pub fn wait_log(&self, needle: &str, within: Duration) -> Option<String> {
        let start = Instant::now();
        while start.elapsed() < within {
            for src in [&self.logs, &self.stdout] {
                if let Some(l) = src.lock().unwrap().iter().find(|l| l.contains(needle)) {
                    return Some(l.clone());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Resident set size of the process, in KiB (VmRSS), and its peak (VmHWM).
    pub fn rss_kib(&self) -> (u64, u64) {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |k: &str| {
            s.lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal blocking HTTP/1.1 GET with `Connection: close`; (status, body).
pub fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let raw = raw_exchange(addr, req.as_bytes());
    parse_response(&raw)
}

/// Write bytes, read until the server closes (or the deadline); the raw answer.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(bytes).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// Status and body (de-chunked when chunked) of a raw response.
pub fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_string()
    };
    (status, body)
}

/// Run curl with these arguments; (exit code, stdout, stderr).
pub fn curl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .output()
        .expect("curl installed");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A config with one upstream over `servers`, listening on free ports.
pub fn config(upstream_extra: &str, servers: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[log]\naccess = \"off\"\n\n[[upstream]]\nname = \"app\"\n{upstream_extra}\n{servers}"
    )
}

// ---------------------------------------------------------------------------
// Helpers for the pool, failure, streaming and CLI tests.

/// An address on loopback where nothing listens: connecting to it is refused.
///
/// The port stays bound (to a socket that never listens) for the rest of the
/// test process, so that no other test's listener or connection can take it
/// meanwhile and answer in its place.
pub fn closed_port() -> SocketAddr {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let a = s
        .local_addr()
        .expect("local addr")
        .as_socket()
        .expect("an IP address");
    std::mem::forget(s);
    a
}

/// Poll `cond` every 10 ms until it holds or `within` passes; whether it held.
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What `wrk` reports.
#[derive(Debug, Clone, Default)]
pub struct WrkReport {
    /// Completed requests.
    pub requests: u64,
    /// Responses that were not 2xx or 3xx.
    pub non_2xx: u64,
    /// Socket errors (connect + read + write + timeout).
    pub socket_errors: u64,
    /// The whole output, for messages.
    pub output: String,
}

/// Run `wrk -t1 -c<conns> -d<secs>s <url>` and parse its report.
pub fn wrk(url: &str, conns: u32, secs: u32) -> WrkReport {
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--timeout",
            "10s",
            url,
        ])
        .output()
        .expect("wrk installed (apt-get install -y wrk)");
    let output =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "wrk failed: {output}");
    let mut r = WrkReport {
        output: output.clone(),
        ..WrkReport::default()
    };
    for line in output.lines().map(str::trim) {
        if line.contains(" requests in ") {
            r.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = rest.trim().parse().unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            r.socket_errors = rest
                .split(',')
                .filter_map(|kv| {
                    kv.split_whitespace()
                        .last()
                        .and_then(|n| n.parse::<u64>().ok())
                })
                .sum();
        }
    }
    assert!(r.requests > 0, "cannot parse wrk's report: {output}");
    r
}

/// Run curl with these arguments, timing it; (exit code, stdout, stderr, elapsed).
pub fn curl_timed(args: &[&str]) -> (i32, String, String, Duration) {
    let start = Instant::now();
    let (code, out, err) = curl(args);
    (code, out, err, start.elapsed())
}

impl Backends {
    /// Backend `i` (0-based).
    pub fn get(&self, i: usize) -> &Backend {
        &self.list[i]
    }
}

impl Ferry {
    /// The ferry process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}
