//! The TOML configuration: serde structs, defaults, validation into a typed [`Config`].
//!
//! Errors name the file, line and column and the offending key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[admin]`.
    pub admin: AdminConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[[upstream]]`, in file order.
    pub upstreams: Vec<UpstreamConfig>,
    /// `[[route]]`, in file order (a single upstream with no routes gets a `*` `/` route).
    pub routes: Vec<RouteConfig>,
}

/// `[server]`: the client-facing listeners.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Addresses to listen on.
    pub listen: Vec<SocketAddr>,
    /// Worker threads, each with its own runtime and listener socket; 0 = one per CPU.
    pub workers: usize,
    /// Time to receive the request headers.
    pub client_header_timeout: Duration,
    /// Idle client keep-alive.
    pub keepalive_timeout: Duration,
    /// Largest request body; 0 = unlimited.
    pub client_max_body_size: u64,
    /// Client connections accepted at once.
    pub max_connections: usize,
    /// Longest wait for in-flight requests at shutdown.
    pub shutdown_timeout: Duration,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Admin listener address; `None` = no admin listener.
    pub listen: Option<SocketAddr>,
    /// Bearer token for mutating calls.
    pub token: Option<String>,
}

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq)]
pub enum AccessLogTarget {
    /// Standard output.
    Stdout,
    /// No access log.
    Off,
    /// Appended to this file.
    File(PathBuf),
}

/// Access log line format.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LogFormat {
    /// nginx combined plus upstream fields.
    Combined,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Destination.
    pub access: AccessLogTarget,
    /// Format.
    pub format: LogFormat,
}

/// Balancing method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyKind {
    /// Smooth weighted round-robin.
    RoundRobin,
    /// Fewest in-flight per weight.
    LeastConn,
    /// nginx ip_hash.
    IpHash,
    /// nginx hash KEY [consistent].
    Hash,
    /// Weighted random [two].
    Random,
    /// Response time EWMA x (1 + in-flight).
    LeastTime,
}

/// `next_upstream`: when a failed attempt may go to the next peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NextUpstream {
    /// Connection errors.
    pub error: bool,
    /// Timeouts.
    pub timeout: bool,
    /// Invalid response header.
    pub invalid_header: bool,
    /// Statuses listed (500, 502, 503, 504, 403, 404, 429).
    pub http_500: bool,
    /// See `http_500`.
    pub http_502: bool,
    /// See `http_500`.
    pub http_503: bool,
    /// See `http_500`.
    pub http_504: bool,
    /// See `http_500`.
    pub http_403: bool,
    /// See `http_500`.
    pub http_404: bool,
    /// See `http_500`.
    pub http_429: bool,
    /// Retry POST/PATCH/LOCK after they were sent.
    pub non_idempotent: bool,
    /// `["off"]`: never retry.
    pub off: bool,
}

/// `[upstream.health_check]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    /// Path requested.
    pub path: String,
    /// Host header; default the peer address.
    pub host: Option<String>,
    /// Time between checks.
    pub interval: Duration,
    /// Time a check may take.
    pub timeout: Duration,
    /// Passes to become healthy.
    pub rise: u32,
    /// Failures to become unhealthy.
    pub fall: u32,
    /// Inclusive accepted status range.
    pub expect_status: (u16, u16),
    /// Substring the body must contain.
    pub expect_body: Option<String>,
    /// New peers start unhealthy until a check passes.
    pub mandatory: bool,
}

/// One `[[upstream.server]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerEntry {
    /// As written: `host:port`.
    pub addr: String,
    /// What it resolved to at load time (an IP literal gives exactly one).
    pub addrs: Vec<SocketAddr>,
    /// Weight, >= 1.
    pub weight: u32,
    /// nginx max_fails; 0 disables passive health.
    pub max_fails: u32,
    /// nginx fail_timeout.
    pub fail_timeout: Duration,
    /// Backup server.
    pub backup: bool,
    /// Marked down.
    pub down: bool,
    /// Most requests in flight; 0 = unlimited.
    pub max_conns: u32,
    /// Ramp-up time.
    pub slow_start: Duration,
    /// Re-resolve the name periodically.
    pub resolve: bool,
}

/// One `[[upstream]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Unique name.
    pub name: String,
    /// Balancing method.
    pub strategy: StrategyKind,
    /// Key template for `hash`.
    pub hash_key: Option<String>,
    /// Ketama ring for `hash`.
    pub consistent: bool,
    /// Power of two choices for `random`.
    pub random_two: bool,
    /// Idle pooled connections kept per peer.
    pub keepalive: usize,
    /// Idle pooled connection lifetime.
    pub keepalive_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Time to response headers, and between body reads.
    pub read_timeout: Duration,
    /// Retry conditions.
    pub next_upstream: NextUpstream,
    /// Most attempts per request; 0 = number of peers.
    pub next_upstream_tries: u32,
    /// Time limit for all attempts; zero = none.
    pub next_upstream_timeout: Duration,
    /// Servers, in file order.
    pub servers: Vec<ServerEntry>,
    /// Active checks.
    pub health_check: Option<HealthCheckConfig>,
}

/// How a route matches the Host header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// `*`.
    Any,
    /// Exact host, lower-case, without port.
    Exact(String),
    /// `*.example.com`: stores `.example.com`, lower-case.
    Suffix(String),
}

/// One `[[route]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Host match.
    pub host: HostMatch,
    /// Path prefix (starts with `/`).
    pub path: String,
    /// Index into `Config::upstreams`.
    pub upstream: usize,
}

/// A configuration error: where and what.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// File.
    pub file: PathBuf,
    /// 1-based line (0 when not tied to a place, e.g. the file cannot be read).
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// Dotted key path, e.g. `upstream[1].server[0].weight`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.col)?;
        } else {
            write!(f, "{}: ", self.file.display())?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Read and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            col: 0,
            key: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Validate text as if read from `path`.
    pub fn parse(_text: &str, _path: &Path) -> Result<Config, ConfigError> {
        todo!("parsing")
    }

    /// One-screen human summary (`ferry check`).
    pub fn summary(&self) -> String {
        String::new()
    }
}
