//! Metrics: a Prometheus registry for histograms and process metrics, plus
//! counters kept in plain atomics (per worker, per peer) that are read at scrape
//! time, so the request path never looks up a label.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use crate::peer::FailReason;
use crate::runtime::Runtime;

/// Client-connection counters of one worker (padded to its own cache lines).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerCounters {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections handled (accepted and not refused).
    pub handled: AtomicU64,
    /// Requests received.
    pub requests: AtomicU64,
    /// Connections reading a request head.
    pub reading: AtomicI64,
    /// Connections with a request in progress.
    pub writing: AtomicI64,
    /// Idle keep-alive connections.
    pub waiting: AtomicI64,
}

/// Sums of the worker counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConnTotals {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections handled.
    pub handled: u64,
    /// Requests received.
    pub requests: u64,
    /// Reading request heads.
    pub reading: i64,
    /// Requests in progress.
    pub writing: i64,
    /// Idle keep-alive.
    pub waiting: i64,
}

impl ConnTotals {
    /// Open client connections.
    pub fn active(&self) -> i64 {
        self.reading + self.writing + self.waiting
    }
}

/// All of ferry's metrics.
pub struct Metrics {
    /// The registry (histograms, reload counters, process metrics).
    pub registry: Registry,
    workers: Box<[WorkerCounters]>,
    /// `ferry_http_request_duration_seconds{upstream}`.
    pub request_duration: HistogramVec,
    /// `ferry_upstream_header_time_seconds{upstream,peer}`.
    pub header_time: HistogramVec,
    /// `ferry_config_reloads_total{result}`.
    pub reloads: IntCounterVec,
    /// Access log lines dropped because the writer fell behind.
    pub log_dropped: IntCounter,
    /// Requests no route matched.
    pub unrouted: AtomicU64,
    /// `ferry_tls_handshakes_total{kind="full"}`: completed full TLS handshakes
    /// on TLS listeners.
    pub tls_handshakes_full: IntCounter,
    /// `ferry_tls_handshakes_total{kind="resumed"}`: completed ones that resumed
    /// a session (ticket or session id).
    pub tls_handshakes_resumed: IntCounter,
    /// `ferry_tls_handshake_errors_total`: failed or timed-out ones.
    pub tls_handshake_errors: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Buckets from 1 ms to 10 s.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Metrics {
    /// Metrics for `workers` worker threads.
    pub fn new(workers: usize) -> Metrics {
        let registry = Registry::new();
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "ferry_http_request_duration_seconds",
                "Time from request head to the end of the response, by upstream.",
            )
            .buckets(BUCKETS.to_vec()),
            &["upstream"],
        )
        .expect("valid metric");
        let header_time = HistogramVec::new(
            HistogramOpts::new(
                "ferry_upstream_header_time_seconds",
                "Time to the upstream's response headers, by peer.",
            )
            .buckets(BUCKETS.to_vec()),
            &["upstream", "peer"],
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new(
                "ferry_config_reloads_total",
                "Configuration reloads by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let log_dropped = IntCounter::new(
            "ferry_access_log_dropped_total",
            "Access log lines dropped because the writer could not keep up.",
        )
        .expect("valid metric");
        let build = IntGaugeVec::new(
            Opts::new(
                "ferry_build_info",
                "Always 1; the version ferry was built from.",
            ),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let tls_handshakes = IntCounterVec::new(
            Opts::new(
                "ferry_tls_handshakes_total",
                "TLS handshakes completed on the TLS listeners, full or resumed.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let tls_handshake_errors = IntCounter::new(
            "ferry_tls_handshake_errors_total",
            "TLS handshakes on the TLS listeners that failed or timed out.",
        )
        .expect("valid metric");
        for c in [
            Box::new(request_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(tls_handshakes.clone()),
            Box::new(tls_handshake_errors.clone()),
            Box::new(header_time.clone()),
            Box::new(reloads.clone()),
            Box::new(log_dropped.clone()),
            Box::new(build),
        ] {
            let _ = registry.register(c);
        }
        for r in ["ok", "error"] {
            reloads.with_label_values(&[r]);
        }
        Metrics {
            registry,
            workers: (0..workers.max(1))
                .map(|_| WorkerCounters::default())
                .collect(),
            request_duration,
            header_time,
            reloads,
            log_dropped,
            unrouted: AtomicU64::new(0),
            tls_handshakes_full: tls_handshakes.with_label_values(&["full"]),
            tls_handshakes_resumed: tls_handshakes.with_label_values(&["resumed"]),
            tls_handshake_errors,
        }
    }

    /// The counters of worker `w`.
    #[inline]
    pub fn worker(&self, w: usize) -> &WorkerCounters {
        &self.workers[w.min(self.workers.len() - 1)]
    }

    /// Sums over all workers.
    pub fn totals(&self) -> ConnTotals {
        let mut t = ConnTotals::default();
        for w in self.workers.iter() {
            t.accepted += w.accepted.load(Relaxed);
            t.handled += w.handled.load(Relaxed);
            t.requests += w.requests.load(Relaxed);
            t.reading += w.reading.load(Relaxed);
            t.writing += w.writing.load(Relaxed);
            t.waiting += w.waiting.load(Relaxed);
        }
        // Transitions are counted on different lines; never show a negative gauge.
        t.reading = t.reading.max(0);
        t.writing = t.writing.max(0);
        t.waiting = t.waiting.max(0);
        t
    }

    /// nginx's stub_status page, byte for byte.
    pub fn stub_status(&self) -> String {
        let t = self.totals();
        format!(
            "Active connections: {} \nserver accepts handled requests\n {} {} {} \nReading: {} Writing: {} Waiting: {} \n",
            t.active(),
            t.accepted,
            t.handled,
            t.requests,
            t.reading,
            t.writing,
            t.waiting
        )
    }

    /// Prometheus text exposition: the registry plus per-peer and connection families.
    pub fn render(&self, rt: &Runtime) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let t = self.totals();
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: i64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        gauge(
            &mut out,
            "ferry_connections_active",
            "Open client connections.",
            "gauge",
            t.active(),
        );
        gauge(
            &mut out,
            "ferry_connections_accepted_total",
            "Client connections accepted.",
            "counter",
            t.accepted as i64,
        );
        gauge(
            &mut out,
            "ferry_connections_handled_total",
            "Client connections handled.",
            "counter",
            t.handled as i64,
        );
        gauge(
            &mut out,
            "ferry_connections_reading",
            "Client connections reading a request head.",
            "gauge",
            t.reading,
        );
        gauge(
            &mut out,
            "ferry_connections_writing",
            "Client connections with a request in progress.",
            "gauge",
            t.writing,
        );
        gauge(
            &mut out,
            "ferry_connections_waiting",
            "Idle client keep-alive connections.",
            "gauge",
            t.waiting,
        );

        let family = |out: &mut String, name: &str, help: &str, kind: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            &mut out,
            "ferry_http_requests_total",
            "Responses by upstream, peer and status.",
            "counter",
        );
        for u in &rt.upstreams {
            let name = esc(&u.cfg.name);
            for p in u.peers() {
                for (code, n) in p.stats.statuses() {
                    let _ = writeln!(
                        out,
                        "ferry_http_requests_total{{upstream=\"{name}\",peer=\"{}\",code=\"{code}\"}} {n}",
                        p.addr_str
                    );
                }
            }
            for (code, n) in [(502, &u.stats.local_502), (504, &u.stats.local_504)] {
                let n = n.load(Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "ferry_http_requests_total{{upstream=\"{name}\",peer=\"\",code=\"{code}\"}} {n}"
                    );
                }
            }
        }
        family(
            &mut out,
            "ferry_upstream_peer_up",
            "1 when the peer can be picked, 0 when not.",
            "gauge",
        );
        let now = crate::peer::now_ms();
        for u in &rt.upstreams {
            let name = esc(&u.cfg.name);
            for p in u.peers() {
                let _ = writeln!(
                    out,
                    "ferry_upstream_peer_up{{upstream=\"{name}\",peer=\"{}\"}} {}",
                    p.addr_str,
                    u8::from(p.is_usable(now))
                );
            }
        }
        family(
            &mut out,
            "ferry_upstream_peer_state",
            "Peer state (1 for the current one).",
            "gauge",
        );
        for u in &rt.upstreams {
            let name = esc(&u.cfg.name);
            for p in u.peers() {
                let cur = peer_state(p, now);
                for s in PEER_STATES {
                    let _ = writeln!(
                        out,
                        "ferry_upstream_peer_state{{upstream=\"{name}\",peer=\"{}\",state=\"{s}\"}} {}",
                        p.addr_str,
                        u8::from(cur == s)
                    );
                }
            }
        }
        family(
            &mut out,
            "ferry_upstream_in_flight",
            "Requests in flight to the peer.",
            "gauge",
        );
        for u in &rt.upstreams {
            let name = esc(&u.cfg.name);
            for p in u.peers() {
                let _ = writeln!(
                    out,
                    "ferry_upstream_in_flight{{upstream=\"{name}\",peer=\"{}\"}} {}",
                    p.addr_str,
                    p.in_flight()
                );
            }
        }
        family(
            &mut out,
            "ferry_upstream_fails_total",
            "Failed attempts by peer and reason.",
            "counter",
        );
        for u in &rt.upstreams {
            let name = esc(&u.cfg.name);
            for p in u.peers() {
                for r in FailReason::ALL {
                    let _ = writeln!(
                        out,
                        "ferry_upstream_fails_total{{upstream=\"{name}\",peer=\"{}\",reason=\"{}\"}} {}",
                        p.addr_str,
                        r.as_str(),
                        p.stats.fails(r)
                    );
                }
            }
        }
        family(
            &mut out,
            "ferry_upstream_connects_total",
            "New TCP connections opened to the peer.",
            "counter",
        );
        for u in &rt.upstreams {
            let name = esc(&u.cfg.name);
            for p in u.peers() {
                let _ = writeln!(
                    out,
                    "ferry_upstream_connects_total{{upstream=\"{name}\",peer=\"{}\"}} {}",
                    p.addr_str,
                    p.stats.connects.load(Relaxed)
                );
            }
        }
        family(
            &mut out,
            "ferry_upstream_retries_total",
            "Attempts passed to the next peer.",
            "counter",
        );
        for u in &rt.upstreams {
            let _ = writeln!(
                out,
                "ferry_upstream_retries_total{{upstream=\"{}\"}} {}",
                esc(&u.cfg.name),
                u.stats.retries.load(Relaxed)
            );
        }
        family(
            &mut out,
            "ferry_upstream_no_peer_total",
            "Requests answered 502 because no peer was usable.",
            "counter",
        );
        for u in &rt.upstreams {
            let _ = writeln!(
                out,
                "ferry_upstream_no_peer_total{{upstream=\"{}\"}} {}",
                esc(&u.cfg.name),
                u.stats.no_peer.load(Relaxed)
            );
        }
        gauge(
            &mut out,
            "ferry_http_unrouted_total",
            "Requests no route matched (answered 404).",
            "counter",
            self.unrouted.load(Relaxed) as i64,
        );

        let mut buf = Vec::new();
        if prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_ok()
        {
            out.push_str(&String::from_utf8_lossy(&buf));
        }
        process_metrics(&mut out);
        out
    }
}

/// The states `ferry_upstream_peer_state` reports.
pub const PEER_STATES: [&str; 5] = ["up", "down", "draining", "unhealthy", "failed"];

/// The one state a peer is in, most administrative first.
pub fn peer_state(p: &crate::peer::Peer, now: u64) -> &'static str {
    if p.is_down() {
        "down"
    } else if p.is_draining() {
        "draining"
    } else if !p.is_healthy() {
        "unhealthy"
    } else if p.is_failed(now) {
        "failed"
    } else {
        "up"
    }
}

/// Linux's `USER_HZ`: the unit of the tick counts in `/proc/<pid>/stat`. It is part
/// of the kernel ABI and 100 on every architecture Rust targets for Linux.
#[cfg(target_os = "linux")]
const USER_HZ: f64 = 100.0;

/// The standard `process_*` families (same names and meaning as the Go client's),
/// read from `/proc/self`. Written by hand rather than with the prometheus crate's
/// collector because that one rounds CPU time down to whole seconds, which makes
/// `rate(process_cpu_seconds_total[1m])` useless on a lightly loaded proxy.
#[cfg(target_os = "linux")]
fn process_metrics(out: &mut String) {
    let family = |out: &mut String, name: &str, help: &str, kind: &str, v: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    // Fields after the command name (which is in parentheses and may hold spaces):
    // state is field 3, so field n is at index n - 3.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let field = |n: usize| -> f64 {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    if fields.len() > 20 {
        family(
            out,
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            "counter",
            (field(14) + field(15)) / USER_HZ,
        );
        let boot = std::fs::read_to_string("/proc/stat")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if let Some(boot) = boot {
            family(
                out,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                "gauge",
                boot + field(22) / USER_HZ,
            );
        }
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    if let Some(rss) = kib("VmRSS:") {
        family(
            out,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            "gauge",
            rss * 1024.0,
        );
    }
    if let Some(vm) = kib("VmSize:") {
        family(
            out,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            "gauge",
            vm * 1024.0,
        );
    }
    if let Some(threads) = kib("Threads:") {
        family(
            out,
            "process_threads",
            "Number of OS threads in the process.",
            "gauge",
            threads,
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // The directory handle itself is one of the entries.
        let open = dir.count().saturating_sub(1);
        family(
            out,
            "process_open_fds",
            "Number of open file descriptors.",
            "gauge",
            open as f64,
        );
    }
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok());
    if let Some(max) = max_fds {
        family(
            out,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            "gauge",
            max,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn process_metrics(_out: &mut String) {}

/// Escape a label value.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_read_proc() {
        let mut out = String::new();
        process_metrics(&mut out);
        let value = |name: &str| -> f64 {
            out.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {out}"))
        };
        assert!(value("process_cpu_seconds_total") >= 0.0);
        assert!(value("process_resident_memory_bytes") > 0.0);
        assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_threads") >= 1.0);
        assert!(value("process_start_time_seconds") > 1.0e9);
        assert!(out.contains("# TYPE process_cpu_seconds_total counter\n"));
    }

    #[test]
    fn build_info_is_a_gauge() {
        let m = Metrics::new(1);
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&m.registry.gather(), &mut buf)
            .unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains("# TYPE ferry_build_info gauge\n"), "{text}");
        assert!(text.contains(&format!(
            "ferry_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn stub_status_is_nginx_format() {
        let m = Metrics::new(2);
        m.worker(0).accepted.fetch_add(3, Relaxed);
        m.worker(1).accepted.fetch_add(2, Relaxed);
        m.worker(0).handled.fetch_add(5, Relaxed);
        m.worker(1).requests.fetch_add(7, Relaxed);
        m.worker(0).writing.fetch_add(1, Relaxed);
        m.worker(1).waiting.fetch_add(2, Relaxed);
        assert_eq!(
            m.stub_status(),
            "Active connections: 3 \nserver accepts handled requests\n 5 5 7 \nReading: 0 Writing: 1 Waiting: 2 \n"
        );
    }
}
