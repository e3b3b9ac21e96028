//! Observability against the real tools users run: `promtool check metrics`,
//! nginx-prometheus-exporter on /stub_status, a Prometheus server scraping ferry
//! (with every PromQL expression of the shipped Grafana dashboard evaluated on it),
//! /status and /healthz, and the access log's SIGUSR1 reopen and bounded queue.
//!
//! The external binaries (Debian packages `prometheus` and
//! `prometheus-nginx-exporter`) are required: CI installs them, and a test that
//! cannot find one fails rather than skipping.
mod common;
use common::*;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Deadline for anything that waits on Prometheus (startup, scrapes, queries).
const PROM_DEADLINE: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// Helpers: external programs, ports, HTTP.

/// Path of a required external program; panics (fails the test) when missing.
fn need(program: &str, package: &str) -> PathBuf {
    let dirs = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{program}` not found: install it with `apt-get install -y {package}` (CI does)"
            )
        })
}

/// A free loopback port (bound, then released for the program to take).
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local addr")
}

/// A child process killed (and reaped) when dropped, with its output captured.
struct Daemon {
    child: Child,
    out: PathBuf,
}

impl Daemon {
    fn spawn(cmd: &mut Command, out: PathBuf) -> Daemon {
        let log = std::fs::File::create(&out).expect("create daemon log");
        let err = log.try_clone().expect("clone log handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Daemon { child, out }
    }

    /// Its output so far (for failure messages).
    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Panic with its output if it exited.
    fn check_alive(&mut self, what: &str) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("{what} exited with {st}:\n{}", self.output());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encode a query-string value.
fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// GET and parse JSON; (status, document).
fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = http_get(addr, path, &[]);
    let doc = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("GET {path}: {status}, not JSON ({e}): {body}"));
    (status, doc)
}

/// The value of an unlabelled or exactly-labelled sample in exposition text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// Send `n` requests, one connection each; all must answer `status`.
fn requests(f: &Ferry, path: &str, n: usize, status: u16) {
    for _ in 0..n {
        let (st, body) = http_get(f.addr, path, &[]);
        assert_eq!(st, status, "GET {path}: {body}");
    }
}

/// A ferry config with one round-robin upstream "app" over `b` and extra log keys.
fn ferry_with(b: &Backends, log: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[log]\n{log}\n\n[[upstream]]\nname = \"app\"\nstrategy = \"round_robin\"\n\n{}",
        b.servers("")
    )
}

// ---------------------------------------------------------------------------
// A Prometheus server scraping one ferry.

struct Prometheus {
    addr: SocketAddr,
    // Fields drop in order: the process stops before its directory goes.
    daemon: Daemon,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Start Prometheus with the shipped `config/prometheus.yml`, its target
    /// pointed at `admin` and its interval lowered to 1 s.
    fn start(admin: SocketAddr) -> Prometheus {
        let bin = need("prometheus", "prometheus");
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prometheus.yml"),
        )
        .expect("config/prometheus.yml");
        assert!(shipped.contains("127.0.0.1:9180"), "{shipped}");
        assert!(shipped.contains("scrape_interval: 15s"), "{shipped}");
        let cfg = shipped
            .replace("127.0.0.1:9180", &admin.to_string())
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg_path = dir.path().join("prometheus.yml");
        std::fs::write(&cfg_path, cfg).expect("write prometheus.yml");
        let addr = free_addr();
        let mut daemon = Daemon::spawn(
            Command::new(bin)
                .arg(format!("--config.file={}", cfg_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .current_dir(dir.path()),
            dir.path().join("prometheus.log"),
        );
        let start = Instant::now();
        loop {
            daemon.check_alive("prometheus");
            if std::net::TcpStream::connect(addr).is_ok()
                && http_get(addr, "/-/ready", &[]).0 == 200
            {
                break;
            }
            assert!(
                start.elapsed() < PROM_DEADLINE,
                "prometheus not ready:\n{}",
                daemon.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Prometheus {
            addr,
            _dir: dir,
            daemon,
        }
    }

    /// An instant query; the whole API answer (status "success" or "error").
    fn query(&mut self, expr: &str) -> Value {
        self.daemon.check_alive("prometheus");
        let (_, doc) = get_json(
            self.addr,
            &format!("/api/v1/query?query={}", urlencode(expr)),
        );
        doc
    }

    /// Poll `expr` until `ok` accepts its result vector, or fail after the deadline.
    fn wait_for(&mut self, expr: &str, mut ok: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let doc = self.query(expr);
            let result = doc["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if doc["status"] == "success" && ok(&result) {
                return result;
            }
            assert!(
                start.elapsed() < PROM_DEADLINE,
                "{expr}: never as expected; last answer {doc}\nprometheus log:\n{}",
                self.daemon.output()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// A sample's value as a number (Prometheus sends it as a string).
fn value(v: &Value) -> f64 {
    v["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Requests in the background until dropped: mostly 200s, some 404s and 500s
/// from the backends, over one keep-alive connection at a time.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(addr: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            while !flag.load(Relaxed) {
                let mut c = RawConn::connect(addr);
                for _ in 0..10 {
                    i += 1;
                    let path = match i % 10 {
                        3 => "/status/404",
                        7 => "/status/500",
                        _ => "/",
                    };
                    c.request("GET", path, &[]);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Traffic {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// 1. /metrics: every documented family, buckets, process metrics, promtool.

/// Every family ARCHITECTURE.md names (plus the access log and process ones),
/// with its type and the labels its samples carry.
const FAMILIES: &[(&str, &str, &[&str])] = &[
    (
        "ferry_http_requests_total",
        "counter",
        &["upstream", "peer", "code"],
    ),
    (
        "ferry_http_request_duration_seconds",
        "histogram",
        &["upstream"],
    ),
    (
        "ferry_upstream_header_time_seconds",
        "histogram",
        &["upstream", "peer"],
    ),
    ("ferry_upstream_peer_up", "gauge", &["upstream", "peer"]),
    (
        "ferry_upstream_peer_state",
        "gauge",
        &["upstream", "peer", "state"],
    ),
    ("ferry_upstream_in_flight", "gauge", &["upstream", "peer"]),
    (
        "ferry_upstream_fails_total",
        "counter",
        &["upstream", "peer", "reason"],
    ),
    (
        "ferry_upstream_connects_total",
        "counter",
        &["upstream", "peer"],
    ),
    ("ferry_upstream_retries_total", "counter", &["upstream"]),
    ("ferry_upstream_no_peer_total", "counter", &["upstream"]),
    ("ferry_connections_active", "gauge", &[]),
    ("ferry_connections_accepted_total", "counter", &[]),
    ("ferry_connections_handled_total", "counter", &[]),
    ("ferry_connections_reading", "gauge", &[]),
    ("ferry_connections_writing", "gauge", &[]),
    ("ferry_connections_waiting", "gauge", &[]),
    ("ferry_config_reloads_total", "counter", &["result"]),
    ("ferry_build_info", "gauge", &["version"]),
    ("ferry_access_log_dropped_total", "counter", &[]),
    ("process_cpu_seconds_total", "counter", &[]),
    ("process_resident_memory_bytes", "gauge", &[]),
    ("process_open_fds", "gauge", &[]),
    ("process_max_fds", "gauge", &[]),
    ("process_start_time_seconds", "gauge", &[]),
];

/// Label names of one sample line.
fn label_names(line: &str) -> Vec<String> {
    let Some((_, rest)) = line.split_once('{') else {
        return Vec::new();
    };
    let inner = rest.rsplit_once('}').map_or("", |(i, _)| i);
    inner
        .split("\",")
        .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.trim().to_string()))
        .collect()
}

#[test]
fn metrics_expose_every_documented_family_and_pass_promtool() {
    let promtool = need("promtool", "prometheus");
    let b = Backends::start(2);
    let f = Ferry::start(&ferry_with(&b, "access = \"off\""));
    requests(&f, "/", 4, 200);
    requests(&f, "/status/503", 2, 503);
    let text = f.admin_get("/metrics");

    // HELP and TYPE exactly once per family, and the documented type.
    let mut seen: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for l in text.lines() {
        if let Some(r) = l.strip_prefix("# HELP ") {
            seen.entry(r.split(' ').next().unwrap_or("")).or_default().0 += 1;
        } else if let Some(r) = l.strip_prefix("# TYPE ") {
            seen.entry(r.split(' ').next().unwrap_or("")).or_default().1 += 1;
        }
    }
    for (name, n) in &seen {
        assert_eq!(*n, (1, 1), "{name}: HELP/TYPE lines {n:?}\n{text}");
    }
    for (name, kind, labels) in FAMILIES {
        assert!(
            text.lines().any(|l| l == format!("# TYPE {name} {kind}")),
            "no `# TYPE {name} {kind}`:\n{text}"
        );
        let series = if *kind == "histogram" {
            format!("{name}_count")
        } else {
            name.to_string()
        };
        let line = text
            .lines()
            .find(|l| {
                l.strip_prefix(series.as_str())
                    .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
            })
            .unwrap_or_else(|| panic!("no sample of {name}:\n{text}"));
        let mut got = label_names(line);
        got.sort();
        let mut want: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(got, want, "labels of {line}");
    }

    // Histograms resolve 1 ms to 10 s.
    for h in [
        "ferry_http_request_duration_seconds_bucket",
        "ferry_upstream_header_time_seconds_bucket",
    ] {
        for le in ["0.001", "0.005", "0.01", "0.1", "1", "10", "+Inf"] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(h) && l.contains(&format!("le=\"{le}\""))),
                "{h} has no le=\"{le}\" bucket"
            );
        }
    }

    // Values that must be right: the counters, the state gauges, process metrics.
    for be in &b.list {
        let peer = format!("upstream=\"app\",peer=\"{}\"", be.addr);
        assert_eq!(
            sample(
                &text,
                &format!("ferry_http_requests_total{{{peer},code=\"200\"}}")
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                &format!("ferry_http_requests_total{{{peer},code=\"503\"}}")
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, &format!("ferry_upstream_peer_up{{{peer}}}")),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                &format!("ferry_upstream_peer_state{{{peer},state=\"up\"}}")
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                &format!("ferry_upstream_peer_state{{{peer},state=\"down\"}}")
            ),
            Some(0.0)
        );
    }
    assert_eq!(sample(&text, "ferry_connections_accepted_total"), Some(6.0));
    assert_eq!(
        sample(
            &text,
            "ferry_http_request_duration_seconds_count{upstream=\"app\"}"
        ),
        Some(6.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!(
                "ferry_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0)
    );
    let rss = sample(&text, "process_resident_memory_bytes").unwrap_or(0.0);
    assert!(rss > 1e6, "RSS {rss}");
    let fds = sample(&text, "process_open_fds").unwrap_or(0.0);
    assert!(fds >= 3.0, "open fds {fds}");
    let started = sample(&text, "process_start_time_seconds").unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - started).abs() < 600.0,
        "start time {started}, now {now}"
    );

    // The official linter.
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("promtool output");
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{text}"
    );
}

#[test]
fn process_cpu_time_has_sub_second_resolution() {
    let b = Backends::start(1);
    let f = Ferry::start(&ferry_with(&b, "access = \"off\""));
    // The prometheus crate's collector rounds to whole seconds; ferry's must not:
    // after a little work the CPU time is a fraction of a second.
    let start = Instant::now();
    loop {
        requests(&f, "/", 20, 200);
        let cpu = f.metric("process_cpu_seconds_total");
        if cpu > 0.0 && cpu.fract() != 0.0 {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "process_cpu_seconds_total stays {cpu}"
        );
    }
}

// ---------------------------------------------------------------------------
// 2. /stub_status through the real nginx-prometheus-exporter.

/// The exporter's samples, scraped until `nginx_up` is 1 and `ok` accepts them.
fn exporter_until(
    exporter: &mut Daemon,
    addr: SocketAddr,
    mut ok: impl FnMut(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        exporter.check_alive("prometheus-nginx-exporter");
        if std::net::TcpStream::connect(addr).is_ok() {
            let (st, text) = http_get(addr, "/metrics", &[]);
            if st == 200 && sample(&text, "nginx_up") == Some(1.0) && ok(&text) {
                return text;
            }
            assert!(
                start.elapsed() < PROM_DEADLINE,
                "exporter never as expected:\n{text}"
            );
        }
        assert!(
            start.elapsed() < PROM_DEADLINE,
            "exporter not answering:\n{}",
            exporter.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn nginx_prometheus_exporter_reads_stub_status() {
    let bin = need("prometheus-nginx-exporter", "prometheus-nginx-exporter");
    let b = Backends::start(2);
    let f = Ferry::start(&ferry_with(&b, "access = \"off\""));

    // The page is nginx's, byte for byte in shape.
    let stub = f.admin_get("/stub_status");
    let lines: Vec<&str> = stub.split_inclusive('\n').collect();
    assert_eq!(lines.len(), 4, "{stub:?}");
    assert_eq!(lines[0], "Active connections: 0 \n", "{stub:?}");
    assert_eq!(lines[1], "server accepts handled requests\n");
    assert_eq!(lines[2], " 0 0 0 \n");
    assert_eq!(lines[3], "Reading: 0 Writing: 0 Waiting: 0 \n");

    // 7 requests on 7 connections, then 3 on one keep-alive connection left open.
    requests(&f, "/", 7, 200);
    let mut keep = RawConn::connect(f.addr);
    for _ in 0..3 {
        assert_eq!(keep.request("GET", "/", &[]).status, 200);
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let listen = free_addr();
    let mut exporter = Daemon::spawn(
        Command::new(bin)
            .arg(format!(
                "--nginx.scrape-uri=http://{}/stub_status",
                f.admin.expect("admin")
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--nginx.retries=10")
            .arg("--nginx.retry-interval=200ms"),
        dir.path().join("exporter.log"),
    );
    let text = exporter_until(&mut exporter, listen, |t| {
        sample(t, "nginx_connections_waiting") == Some(1.0)
    });
    let get = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("no {name}:\n{text}"));
    assert_eq!(get("nginx_http_requests_total"), 10.0, "{text}");
    assert_eq!(get("nginx_connections_accepted"), 8.0, "{text}");
    assert_eq!(get("nginx_connections_handled"), 8.0, "{text}");
    assert_eq!(get("nginx_connections_active"), 1.0, "{text}");
    assert_eq!(get("nginx_connections_reading"), 0.0, "{text}");
    assert_eq!(get("nginx_connections_writing"), 0.0, "{text}");

    // And they agree with ferry's own counters.
    let metrics = f.admin_get("/metrics");
    assert_eq!(
        sample(&metrics, "ferry_connections_accepted_total"),
        Some(get("nginx_connections_accepted"))
    );
    assert_eq!(
        sample(&metrics, "ferry_connections_handled_total"),
        Some(get("nginx_connections_handled"))
    );
    assert_eq!(
        sample(&metrics, "ferry_connections_active"),
        Some(get("nginx_connections_active"))
    );
    assert_eq!(
        f.metric_sum("ferry_http_requests_total", &[]),
        get("nginx_http_requests_total")
    );
    let status = get_json(f.admin.expect("admin"), "/status").1;
    assert_eq!(status["connections"]["requests"], 10);

    // Counters move with traffic: the exporter sees it on its next scrape.
    drop(keep);
    requests(&f, "/", 5, 200);
    let text = exporter_until(&mut exporter, listen, |t| {
        sample(t, "nginx_http_requests_total") == Some(15.0)
    });
    assert_eq!(
        sample(&text, "nginx_connections_accepted"),
        Some(13.0),
        "{text}"
    );
}

// ---------------------------------------------------------------------------
// 3. A real Prometheus scraping ferry.

#[test]
fn prometheus_scrapes_request_totals_for_every_peer() {
    let b = Backends::start(3);
    let f = Ferry::start(&ferry_with(&b, "access = \"off\""));
    let mut prom = Prometheus::start(f.admin.expect("admin"));

    // Round robin over 3 peers: 30 requests give each 10; 3 more, one 500 each.
    requests(&f, "/", 30, 200);
    requests(&f, "/status/500", 3, 500);

    let want: BTreeMap<(String, String), f64> = b
        .list
        .iter()
        .flat_map(|be| {
            [
                ((be.addr.to_string(), "200".to_string()), 10.0),
                ((be.addr.to_string(), "500".to_string()), 1.0),
            ]
        })
        .collect();
    let got_map = |result: &[Value]| -> BTreeMap<(String, String), f64> {
        result
            .iter()
            .map(|s| {
                (
                    (
                        s["metric"]["peer"].as_str().unwrap_or("").to_string(),
                        s["metric"]["code"].as_str().unwrap_or("").to_string(),
                    ),
                    value(s),
                )
            })
            .collect()
    };
    let result = prom.wait_for(
        "ferry_http_requests_total{job=\"ferry\", upstream=\"app\"}",
        |r| got_map(r) == want,
    );
    for s in &result {
        assert_eq!(s["metric"]["instance"], f.admin.expect("admin").to_string());
    }
    // Prometheus agrees with ferry's own /metrics, series by series.
    let text = f.admin_get("/metrics");
    for ((peer, code), n) in &want {
        let series = format!(
            "ferry_http_requests_total{{upstream=\"app\",peer=\"{peer}\",code=\"{code}\"}}"
        );
        assert_eq!(sample(&text, &series), Some(*n), "{series}");
    }
    let total = prom.wait_for("sum(ferry_http_requests_total)", |r| r.len() == 1);
    assert_eq!(value(&total[0]), 33.0);
    let up = prom.wait_for("up{job=\"ferry\"}", |r| r.len() == 1);
    assert_eq!(value(&up[0]), 1.0);
}

// ---------------------------------------------------------------------------
// 5. The Grafana dashboard: every expression accepted and returning data.

/// Every PromQL expression in the dashboard (panel targets, rows' nested panels,
/// and query variables), with the panel title it belongs to.
fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((title.clone(), e.to_string()));
                }
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dash["panels"], &mut out);
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap_or("");
            out.push((format!("variable {}", v["name"]), q.to_string()));
        }
    }
    out
}

/// Grafana's interpolation, with concrete values: every template variable
/// matches everything, `$__rate_interval` is 1m. `label_values(selector, label)`
/// becomes the selector itself, and the label its results must carry.
fn concrete(expr: &str, vars: &[String]) -> (String, Option<String>) {
    let mut e = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "10s")
        .replace("$__range", "5m");
    for v in vars {
        for form in [format!("${{{v}}}"), format!("[[{v}]]"), format!("${v}")] {
            e = e.replace(&form, ".*");
        }
    }
    if let Some(inner) = e
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        let (selector, label) = inner
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        return (selector.trim().to_string(), Some(label.trim().to_string()));
    }
    (e, None)
}

#[test]
fn grafana_dashboard_is_import_ready_and_every_query_returns_data() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/grafana/ferry-dashboard.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard"))
        .expect("dashboard is JSON");

    // Import-ready: no instance-specific ids, the data source is a variable.
    assert!(dash["id"].is_null(), "a dashboard to import has no id");
    assert!(dash["uid"].is_string() && dash["title"].is_string());
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().unwrap());
    let text = serde_json::to_string(&dash).unwrap();
    for m in text.match_indices("\"uid\":\"") {
        let rest = &text[m.0 + 7..];
        let uid = &rest[..rest.find('"').unwrap()];
        assert!(
            uid == ds_ref || uid == "-- Grafana --" || Some(uid) == dash["uid"].as_str(),
            "hard-coded data source uid {uid}"
        );
    }
    let var_names: Vec<String> = vars
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect();

    // The panels the issue asks for, found by what they query.
    let exprs = dashboard_exprs(&dash);
    let all: String = exprs
        .iter()
        .map(|(_, e)| e.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "rate(ferry_http_requests_total",
        "\"class\"",
        "histogram_quantile(0.5, sum by (upstream, le) (rate(ferry_http_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (upstream, le) (rate(ferry_http_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (upstream, le) (rate(ferry_http_request_duration_seconds_bucket",
        "ferry_upstream_header_time_seconds_bucket",
        "ferry_upstream_peer_state",
        "ferry_upstream_in_flight",
        "1 - sum by (upstream, peer) (rate(ferry_upstream_connects_total",
        "ferry_upstream_retries_total",
        "ferry_connections_active",
        "ferry_connections_reading",
        "ferry_connections_writing",
        "ferry_connections_waiting",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(all.contains(needle), "no dashboard query uses {needle}");
    }
    for p in dash["panels"].as_array().unwrap() {
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"]["uid"],
                ds_ref.as_str(),
                "panel {}",
                p["title"]
            );
            for t in p["targets"].as_array().into_iter().flatten() {
                assert_eq!(
                    t["datasource"]["uid"],
                    ds_ref.as_str(),
                    "panel {}",
                    p["title"]
                );
            }
        }
    }

    // A live Prometheus scraping a busy ferry.
    let b = Backends::start(3);
    let f = Ferry::start(&ferry_with(&b, "access = \"off\""));
    let mut prom = Prometheus::start(f.admin.expect("admin"));
    let _traffic = Traffic::start(f.addr);
    // Several scrapes with traffic between them, so rates and quantiles exist.
    prom.wait_for(
        "count_over_time(ferry_http_requests_total{code=\"500\"}[1m])",
        |r| r.len() == 3 && r.iter().all(|s| value(s) >= 5.0),
    );

    let mut failures = Vec::new();
    for (title, expr) in &exprs {
        let (q, label) = concrete(expr, &var_names);
        assert!(
            !q.contains("$__"),
            "{title}: unreplaced Grafana variable in {q}"
        );
        let start = Instant::now();
        let verdict = loop {
            let doc = prom.query(&q);
            if doc["status"] != "success" {
                break Err(format!("rejected: {doc}"));
            }
            let result = doc["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let labelled = |s: &Value| {
                label
                    .as_ref()
                    .is_none_or(|l| s["metric"][l].as_str().is_some_and(|v| !v.is_empty()))
            };
            if result.iter().any(|s| value(s).is_finite() && labelled(s)) {
                break Ok(());
            }
            if start.elapsed() > Duration::from_secs(30) {
                break Err(format!("no data: {doc}"));
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        if let Err(e) = verdict {
            failures.push(format!("{title}: {q}\n  {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "dashboard queries failing:\n{}",
        failures.join("\n")
    );
    assert!(exprs.len() >= 20, "only {} expressions", exprs.len());
}

// ---------------------------------------------------------------------------
// 4. /status and /healthz.

#[test]
fn status_json_reports_every_upstream_and_peer() {
    let b = Backends::start(2);
    let dead = closed_port();
    let cfg = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[log]\naccess = \"off\"\n\n\
         [[upstream]]\nname = \"app\"\nstrategy = \"round_robin\"\n\n\
         [[upstream.server]]\naddr = \"{}\"\nweight = 3\n\n\
         [[upstream.server]]\naddr = \"{dead}\"\nmax_fails = 1\nfail_timeout = \"60s\"\n\n\
         [[upstream]]\nname = \"checked\"\n\n\
         [[upstream.server]]\naddr = \"{}\"\n\n\
         [upstream.health_check]\npath = \"/\"\ninterval = \"200ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 1\n\n\
         [[route]]\nhost = \"*\"\nupstream = \"app\"\n\n\
         [[route]]\nhost = \"checked.test\"\nupstream = \"checked\"\n",
        b.list[0].addr, b.list[1].addr
    );
    let f = Ferry::start(&cfg);
    let admin = f.admin.expect("admin");
    assert_eq!(http_get(admin, "/healthz", &[]).0, 200);

    // The dead peer fails once (the request is retried on the live one) and is
    // then held out for fail_timeout.
    requests(&f, "/", 6, 200);
    let mut c = RawConn::connect(f.addr);
    for _ in 0..2 {
        c.send(b"GET /x HTTP/1.1\r\nHost: checked.test\r\n\r\n");
        assert_eq!(c.read_response(false).status, 200);
    }
    drop(c);

    // A request in flight on the "checked" upstream's peer.
    let mut held = RawConn::connect(f.addr);
    held.send(b"GET /hold HTTP/1.1\r\nHost: checked.test\r\n\r\n");
    let head = held.read_head();
    assert_eq!(head.status, 200);

    let find = |doc: &Value, up: &str, addr: &str| -> Value {
        let u = doc["upstreams"]
            .as_array()
            .and_then(|a| a.iter().find(|u| u["name"] == up))
            .unwrap_or_else(|| panic!("no upstream {up}: {doc}"))
            .clone();
        u["peers"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["addr"] == addr))
            .unwrap_or_else(|| panic!("no peer {addr} in {up}: {doc}"))
            .clone()
    };
    let (st, doc) = get_json(admin, "/status");
    assert_eq!(st, 200);
    assert_eq!(doc["upstreams"].as_array().map(Vec::len), Some(2), "{doc}");

    let live = find(&doc, "app", &b.list[0].addr.to_string());
    assert_eq!(live["state"], "up", "{live}");
    assert_eq!(live["weight"], 3);
    assert_eq!(live["in_flight"], 0);
    assert_eq!(live["fails"], 0);
    assert_eq!(live["requests"], 6);
    assert_eq!(live["health_check"], "unchecked");
    assert!(
        live["latency_ewma_ms"].as_f64().is_some_and(|v| v > 0.0),
        "{live}"
    );

    let down = find(&doc, "app", &dead.to_string());
    assert_eq!(down["state"], "failed", "{down}");
    assert_eq!(down["up"], false);
    assert_eq!(down["fails"], 1);
    assert_eq!(down["fails_total"], 1);
    assert_eq!(down["requests"], 1);
    assert_eq!(down["weight"], 1);

    let checked = find(&doc, "checked", &b.list[1].addr.to_string());
    assert_eq!(checked["in_flight"], 1, "{checked}");
    assert_eq!(checked["requests"], 3);
    assert_eq!(checked["health_check"], "passing");
    assert_eq!(checked["state"], "up");

    let app = doc["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "app")
        .unwrap()
        .clone();
    assert_eq!(app["retries"], 1, "{app}");
    assert_eq!(doc["connections"]["requests"], 9);
    assert_eq!(doc["version"], env!("CARGO_PKG_VERSION"));

    // The in-flight request ends: the slot is given back.
    assert_eq!(held.read_chunk(), b"first part\n");
    b.list[1].knobs.release.notify_one();
    assert_eq!(held.read_chunk(), b"second part\n");
    assert!(held.read_chunk().is_empty());
    assert!(wait_until(DEADLINE, || {
        find(
            &get_json(admin, "/status").1,
            "checked",
            &b.list[1].addr.to_string(),
        )["in_flight"]
            == 0
    }));

    // A failing health check shows.
    b.list[1].knobs.status.store(500, Relaxed);
    assert!(wait_until(DEADLINE, || {
        let p = find(
            &get_json(admin, "/status").1,
            "checked",
            &b.list[1].addr.to_string(),
        );
        p["health_check"] == "failing" && p["state"] == "unhealthy"
    }));
    let text = f.admin_get("/metrics");
    let series = format!("upstream=\"checked\",peer=\"{}\"", b.list[1].addr);
    assert_eq!(
        sample(&text, &format!("ferry_upstream_peer_up{{{series}}}")),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!("ferry_upstream_peer_state{{{series},state=\"unhealthy\"}}")
        ),
        Some(1.0)
    );
}

// ---------------------------------------------------------------------------
// 6. Access log: SIGUSR1 reopen, and a full queue drops lines instead of waiting.

/// Wait until the file at `path` contains `needle`.
fn wait_file_contains(path: &Path, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{} never contained {needle:?}: {text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn access_log_file_is_reopened_on_sigusr1() {
    let b = Backends::start(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let f = Ferry::start(&ferry_with(
        &b,
        &format!("access = \"{}\"\nformat = \"combined\"", log.display()),
    ));
    requests(&f, "/before-rotation", 3, 200);
    // Workers hand their lines to the writer in batches: wait for all three.
    assert!(wait_until(DEADLINE, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("/before-rotation")
            .count()
            >= 3
    }));
    let old = wait_file_contains(&log, "/before-rotation");
    assert!(
        old.contains(&b.list[0].addr.to_string()),
        "upstream address logged: {old}"
    );

    // What logrotate does: move the file away, then signal.
    std::fs::rename(&log, &rotated).expect("rotate");
    f.signal("USR1");
    assert!(
        f.wait_log("access log reopened", DEADLINE).is_some(),
        "no reopen: {:?}",
        f.logs.lock().unwrap()
    );
    assert!(
        wait_until(DEADLINE, || log.exists()),
        "no new access.log after SIGUSR1"
    );

    requests(&f, "/after-rotation", 3, 200);
    // The writer may flush the three lines in more than one batch.
    let count = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("/after-rotation"))
            .count()
    };
    wait_until(DEADLINE, || count() >= 3);
    let new = wait_file_contains(&log, "/after-rotation");
    assert_eq!(
        new.lines()
            .filter(|l| l.contains("/after-rotation"))
            .count(),
        3,
        "{new}"
    );
    assert!(!new.contains("/before-rotation"), "{new}");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert_eq!(
        old.lines()
            .filter(|l| l.contains("/before-rotation"))
            .count(),
        3,
        "{old}"
    );
    assert!(
        !old.contains("/after-rotation"),
        "lines after the reopen went to the old file: {old}"
    );
}

#[test]
fn a_stalled_access_log_drops_lines_and_never_stalls_requests() {
    let b = Backends::start(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("access.fifo");
    let st = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(st.success());
    // Hold the pipe open without ever reading it (O_RDWR does not wait for a
    // writer on Linux): once the pipe buffer is full, ferry's writer blocks.
    let _pipe = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .expect("open fifo");
    let f = Ferry::start(&ferry_with(&b, &format!("access = \"{}\"", fifo.display())));

    // Far more requests than the queue holds; every one answered, none waits.
    let start = Instant::now();
    let mut total = 0;
    while f.metric("ferry_access_log_dropped_total") == 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no line dropped after {total} requests"
        );
        let r = wrk(&f.url("/"), 8, 2);
        assert_eq!(r.non_2xx, 0, "{}", r.output);
        assert_eq!(r.socket_errors, 0, "{}", r.output);
        total += r.requests;
    }
    // Requests still go through while the writer is stuck.
    let t0 = Instant::now();
    requests(&f, "/", 20, 200);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "requests slowed by the log: {:?}",
        t0.elapsed()
    );
    let dropped = f.metric("ferry_access_log_dropped_total");
    assert!(
        dropped >= 20.0 && dropped <= (total + 20) as f64,
        "dropped {dropped} of {}",
        total + 20
    );
}
