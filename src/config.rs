//! The TOML configuration: serde structs, defaults, validation into a typed [`Config`].
//!
//! Errors name the file, line and column and the offending key.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

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
    /// `[resolver]`: DNS for servers with `resolve = true`.
    pub resolver: ResolverConfig,
    /// `[[upstream]]`, in file order.
    pub upstreams: Vec<UpstreamConfig>,
    /// `[[route]]`, in file order (a single upstream with no routes gets a `*` `/` route).
    pub routes: Vec<RouteConfig>,
    /// `[tls]`: TLS listeners and their certificates.
    pub tls: Option<TlsConfig>,
}

/// Where a value was written, for errors found after parsing (say, a file it
/// names cannot be used).
#[derive(Debug, Clone, PartialEq)]
pub struct Place {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// Dotted key path.
    pub key: String,
}

/// A file named in the configuration, and where it was named.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRef {
    /// The path, relative ones taken from the config file's directory.
    pub path: PathBuf,
    /// Where the file was named.
    pub place: Place,
}

/// One `[[tls.certificate]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CertificateConfig {
    /// The certificate chain (PEM, leaf first: certbot's `fullchain.pem`).
    pub cert: FileRef,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1; certbot's `privkey.pem`).
    pub key: FileRef,
}

/// `[tls]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// Addresses to accept TLS connections on.
    pub listen: Vec<SocketAddr>,
    /// Certificates, chosen by SNI; the first is the default.
    pub certificates: Vec<CertificateConfig>,
    /// The certificates loaded (by [`crate::tls::load`]); `None` until then.
    pub loaded: Option<crate::tls::ServerTls>,
}

/// How ferry talks to an upstream's servers (`scheme`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamScheme {
    /// HTTP/1.1 over TCP, on pooled keep-alive connections.
    #[default]
    Http,
    /// HTTP/1.1 over TLS, pooled the same way.
    Https,
    /// HTTP/2 over TCP with prior knowledge (gRPC backends): a few multiplexed
    /// connections per server and worker instead of the HTTP/1.1 pool.
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`), multiplexed like `h2c`.
    H2,
}

impl UpstreamScheme {
    /// Spoken over TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, UpstreamScheme::Https | UpstreamScheme::H2)
    }

    /// Spoken as HTTP/2.
    pub fn is_h2(self) -> bool {
        matches!(self, UpstreamScheme::H2c | UpstreamScheme::H2)
    }

    /// The configuration value.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamScheme::Http => "http",
            UpstreamScheme::Https => "https",
            UpstreamScheme::H2c => "h2c",
            UpstreamScheme::H2 => "h2",
        }
    }
}

/// TLS towards an upstream (`scheme = "https"`).
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTls {
    /// Verify the server's certificate chain and name.
    pub verify: bool,
    /// CA certificates to verify against instead of the built-in roots.
    pub ca_file: Option<FileRef>,
    /// SNI and the name verified; default: the host part of each server's `addr`.
    pub server_name: Option<String>,
    /// The client settings built (by [`crate::tls::load`]); `None` until then.
    pub loaded: Option<crate::tls::ClientTls>,
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
    /// Plain listeners answer 301 to `https://host/uri` (nginx's `return 301
    /// https://$host$request_uri;`).
    pub redirect_https: bool,
    /// Plain listeners serve `/.well-known/acme-challenge/<token>` from
    /// `<acme_webroot>/.well-known/acme-challenge/<token>` (certbot's webroot).
    pub acme_webroot: Option<PathBuf>,
    /// Accept HTTP/2 with prior knowledge (h2c) on the plain listeners.
    pub http2: bool,
    /// Streams one HTTP/2 connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// Largest HTTP/2 header list (names, values and 32 bytes per field).
    pub http2_max_header_size: u32,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Admin listener address; `None` = no admin listener.
    pub listen: Option<SocketAddr>,
    /// Bearer token for mutating calls.
    pub token: Option<String>,
    /// Record latency histograms on the request path (counters are always kept).
    pub metrics: bool,
}

/// `[resolver]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolverConfig {
    /// DNS server asked; `None` = the system's (`/etc/resolv.conf`).
    pub addr: Option<SocketAddr>,
    /// Time between resolutions of a `resolve = true` name (sooner when the
    /// answer's TTL is shorter).
    pub resolve_interval: Duration,
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
    /// Request bodies up to this size are kept so a retry can resend them.
    pub retry_buffer: u64,
    /// Requests that may wait for a peer under `max_conns`; 0 = none wait (503 at once).
    pub queue: usize,
    /// Longest wait in that queue.
    pub queue_timeout: Duration,
    /// `http` or `https`.
    pub scheme: UpstreamScheme,
    /// TLS settings, with `scheme = "https"`.
    pub tls: Option<UpstreamTls>,
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
    /// An error about a value written at `place` (e.g. a file it names is unusable).
    pub fn error_at(&self, place: &Place, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.path.clone(),
            line: place.line,
            col: place.col,
            key: place.key.clone(),
            message: message.into(),
        }
    }

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
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cx = Ctx { text, file: path };
        let raw: RawConfig = toml::from_str(text).map_err(|e| cx.toml_error(&e))?;
        cx.validate(raw)
    }

    /// One-screen human summary (`ferry check`).
    pub fn summary(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = self.write_summary(&mut out);
        out
    }
}

// ---------------------------------------------------------------------------
// Raw serde mirror of the file. Every table denies unknown keys; values that
// are checked after deserialization keep their span for error locations.
// ---------------------------------------------------------------------------

/// The whole file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    resolver: RawResolver,
    #[serde(default)]
    upstream: Vec<Spanned<RawUpstream>>,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
    tls: Option<Spanned<RawTls>>,
}

/// `[tls]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    certificate: Vec<Spanned<RawCertificate>>,
}

/// `[[tls.certificate]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: Spanned<String>,
    key: Spanned<String>,
}

/// `[server]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<Vec<Spanned<String>>>>,
    workers: Option<usize>,
    client_header_timeout: Option<Spanned<Dur>>,
    keepalive_timeout: Option<Dur>,
    client_max_body_size: Option<Size>,
    max_connections: Option<Spanned<usize>>,
    shutdown_timeout: Option<Dur>,
    redirect_https: Option<bool>,
    acme_webroot: Option<Spanned<String>>,
    http2: Option<bool>,
    http2_max_concurrent_streams: Option<Spanned<u32>>,
    http2_max_header_size: Option<Spanned<Size>>,
}

/// `[admin]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    metrics: Option<bool>,
}

/// `[log]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    access: Option<Spanned<String>>,
    format: Option<Spanned<String>>,
}

/// `[resolver]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawResolver {
    addr: Option<Spanned<String>>,
    resolve_interval: Option<Spanned<Dur>>,
}

/// `[[upstream]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: Spanned<String>,
    strategy: Option<Spanned<String>>,
    hash_key: Option<Spanned<String>>,
    consistent: Option<Spanned<bool>>,
    random_two: Option<Spanned<bool>>,
    keepalive: Option<usize>,
    keepalive_timeout: Option<Dur>,
    connect_timeout: Option<Spanned<Dur>>,
    read_timeout: Option<Spanned<Dur>>,
    next_upstream: Option<Spanned<Vec<Spanned<String>>>>,
    next_upstream_tries: Option<u32>,
    next_upstream_timeout: Option<Dur>,
    retry_buffer: Option<Size>,
    queue: Option<usize>,
    queue_timeout: Option<Dur>,
    scheme: Option<Spanned<String>>,
    tls_verify: Option<Spanned<bool>>,
    tls_ca_file: Option<Spanned<String>>,
    tls_server_name: Option<Spanned<String>>,
    #[serde(default)]
    server: Vec<Spanned<RawServerEntry>>,
    health_check: Option<RawHealthCheck>,
}

/// `[[upstream.server]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerEntry {
    addr: Spanned<String>,
    weight: Option<Spanned<u32>>,
    max_fails: Option<u32>,
    fail_timeout: Option<Dur>,
    backup: Option<Spanned<bool>>,
    down: Option<bool>,
    max_conns: Option<u32>,
    slow_start: Option<Dur>,
    resolve: Option<bool>,
}

/// `[upstream.health_check]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    path: Spanned<String>,
    host: Option<Spanned<String>>,
    interval: Option<Spanned<Dur>>,
    timeout: Option<Spanned<Dur>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
    expect_status: Option<Spanned<StrOrInt>>,
    expect_body: Option<Spanned<String>>,
    mandatory: Option<bool>,
}

/// `[[route]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    upstream: Spanned<String>,
}

/// A duration written as a humantime string ("500ms", "10s", "1m").
#[derive(Clone, Copy)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration string such as \"500ms\", \"10s\" or \"1m\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Dur, E> {
                parse_duration(s).map(Dur).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Dur, E> {
                Err(E::custom(bare_number_duration(v)))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Dur, E> {
                Err(E::custom(bare_number_duration(v)))
            }
        }
        d.deserialize_any(V)
    }
}

/// The message for a duration written as a bare number.
fn bare_number_duration(v: impl std::fmt::Display) -> String {
    format!("a duration needs a unit: write \"{v}s\" or \"{v}ms\", not the bare number {v}")
}

/// A byte size: a string with an optional unit, or an integer of bytes.
#[derive(Clone, Copy)]
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size such as \"512KiB\", \"10MiB\" or an integer of bytes")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Size, E> {
                parse_size(s).map(Size).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A value that may be written as a string or an integer.
enum StrOrInt {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
}

impl<'de> Deserialize<'de> for StrOrInt {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = StrOrInt;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an integer")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<StrOrInt, E> {
                Ok(StrOrInt::Str(s.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<StrOrInt, E> {
                Ok(StrOrInt::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<StrOrInt, E> {
                Ok(StrOrInt::Int(i64::try_from(v).unwrap_or(i64::MAX)))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------
// Scalar parsers.
// ---------------------------------------------------------------------------

/// Parses a humantime duration, with a message that shows how to write one.
fn parse_duration(s: &str) -> Result<Duration, String> {
    use humantime::DurationError as E;
    humantime::parse_duration(s.trim()).map_err(|e| {
        let why = match e {
            E::Empty => "it is empty".to_owned(),
            E::UnknownUnit { unit, .. } if unit.is_empty() => "the unit is missing".to_owned(),
            E::UnknownUnit { unit, .. } => format!("unknown unit `{unit}`"),
            E::NumberOverflow => "it is too large".to_owned(),
            _ => "expected a number followed by a unit".to_owned(),
        };
        format!("invalid duration \"{s}\": {why} (write e.g. \"500ms\", \"10s\", \"1m\")")
    })
}

/// Parses a byte size: "512KiB", "10MiB", "1GiB", "100KB", "1MB", nginx's "1k"/"1m"/"1g"
/// (binary), plain digits = bytes. Units are case-insensitive.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = |why: &str| {
        format!(
            "invalid size \"{s}\": {why} (write e.g. \"512KiB\", \"10MiB\", \"1m\", or \"0\" for unlimited)"
        )
    };
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    if num.is_empty() {
        return Err(bad("it must start with a number"));
    }
    let n: u64 = num.parse().map_err(|_| bad("the number is too large"))?;
    let unit = unit.trim();
    if unit.starts_with('.') {
        return Err(bad("fractions are not supported"));
    }
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad(&format!("unknown unit `{unit}`"))),
    };
    n.checked_mul(mult).ok_or_else(|| bad("it is too large"))
}

/// A `host:port` as written in a server `addr`.
enum AddrSpec {
    /// An IP literal with a port.
    Ip(SocketAddr),
    /// A host name with a port, resolved now or later.
    Name(String, u16),
}

/// Parses `ip:port`, `[v6]:port` or `name:port`.
fn parse_addr(s: &str) -> Result<AddrSpec, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(format!("invalid address \"{s}\": port 0 is not allowed"));
        }
        return Ok(AddrSpec::Ip(sa));
    }
    if s.is_empty() {
        return Err("the address is empty (expected host:port)".to_owned());
    }
    if s.contains("://") {
        return Err(format!(
            "invalid address \"{s}\": write host:port without a scheme, e.g. \"10.0.0.1:8080\""
        ));
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return Err(format!(
                "invalid address \"{s}\": `[` without a closing `]`"
            ));
        };
        if ip.parse::<Ipv6Addr>().is_err() {
            return Err(format!(
                "invalid address \"{s}\": `{ip}` is not an IPv6 address"
            ));
        }
        let Some(port) = after.strip_prefix(':') else {
            return Err(format!(
                "invalid address \"{s}\": the port is missing (expected [ipv6]:port)"
            ));
        };
        (ip, port)
    } else {
        if s.parse::<Ipv6Addr>().is_ok() {
            return Err(format!(
                "invalid address \"{s}\": the port is missing, and an IPv6 address needs brackets, e.g. \"[{s}]:8080\""
            ));
        }
        if s.parse::<IpAddr>().is_ok() || is_hostname(s) {
            return Err(format!(
                "invalid address \"{s}\": the port is missing (expected host:port, e.g. \"{s}:8080\")"
            ));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!("invalid address \"{s}\": expected host:port"));
        };
        if host.contains(':') {
            return Err(format!(
                "invalid address \"{s}\": an IPv6 address needs brackets, e.g. \"[::1]:8080\""
            ));
        }
        (host, port)
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
        _ => {
            return Err(format!(
                "invalid address \"{s}\": bad port `{port}` (expected a number from 1 to 65535)"
            ));
        }
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(AddrSpec::Ip(SocketAddr::new(ip, port)));
    }
    if !is_hostname(host) {
        return Err(format!(
            "invalid address \"{s}\": `{host}` is neither an IP address nor a host name"
        ));
    }
    Ok(AddrSpec::Name(host.to_owned(), port))
}

/// Whether `s` looks like a DNS host name (letters, digits, `-`, `_`, dot-separated labels).
fn is_hostname(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Parses a listener address: an IP literal with a port.
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse::<SocketAddr>().map_err(|_| {
        format!(
            "invalid listen address \"{s}\": expected ip:port such as \"0.0.0.0:8080\" or \"[::]:8080\""
        )
    })
}

/// Parses `expect_status`: "200", "200-399", "2xx", or an integer.
fn parse_status_range(v: &StrOrInt) -> Result<(u16, u16), String> {
    let text = match v {
        StrOrInt::Int(n) => n.to_string(),
        StrOrInt::Str(s) => s.trim().to_owned(),
    };
    let bad = |why: &str| {
        format!(
            "invalid expect_status \"{text}\": {why} (write e.g. \"200\", \"200-399\" or \"2xx\")"
        )
    };
    let code = |s: &str| -> Result<u16, String> {
        match s.trim().parse::<u16>() {
            Ok(c) if (100..=599).contains(&c) => Ok(c),
            _ => Err(bad(&format!(
                "`{}` is not a status code from 100 to 599",
                s.trim()
            ))),
        }
    };
    if let Some(d) = text.to_ascii_lowercase().strip_suffix("xx") {
        let lo = code(&format!("{d}00"))?;
        return Ok((lo, lo + 99));
    }
    let (lo, hi) = match text.split_once('-') {
        Some((a, b)) => (code(a)?, code(b)?),
        None => {
            let c = code(&text)?;
            (c, c)
        }
    };
    if lo > hi {
        return Err(bad("the range is empty (the first code is larger)"));
    }
    Ok((lo, hi))
}

/// The variables a `hash_key` template may use.
const HASH_KEY_VARIABLES: &str =
    "$remote_addr $request_uri $uri $args $host $http_<name> $cookie_<name> $arg_<name>";

/// Whether `name` (without `$`) is a variable the hash key template knows: names are
/// case-insensitive and made of letters, digits and `_`, as `balance::key` parses them
/// (which also takes nginx's aliases `$document_uri` and `$query_string`).
fn known_variable(name: &str) -> bool {
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    if matches!(
        lower.as_str(),
        "remote_addr" | "request_uri" | "uri" | "document_uri" | "args" | "query_string" | "host"
    ) {
        return true;
    }
    ["http_", "cookie_", "arg_"].iter().any(|prefix| {
        lower
            .strip_prefix(prefix)
            .is_some_and(|rest| !rest.is_empty())
    })
}

/// Checks a `hash_key` template; on error gives the byte index of the bad `$` and why.
fn check_template(t: &str) -> Result<(), (usize, String)> {
    let bytes = t.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        // `$` and `{` are ASCII, so i + 1 and i + 2 are char boundaries.
        let (name, next) = if bytes.get(i + 1) == Some(&b'{') {
            let inner = &t[i + 2..];
            match inner.find('}') {
                Some(end) => (&inner[..end], i + 2 + end + 1),
                None => return Err((i, "`${` is not closed by `}`".to_owned())),
            }
        } else {
            let rest = &t[i + 1..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (&rest[..end], i + 1 + end)
        };
        if name.is_empty() {
            return Err((
                i,
                format!("`$` is not followed by a variable name (allowed: {HASH_KEY_VARIABLES})"),
            ));
        }
        if !known_variable(name) {
            return Err((
                i,
                format!("unknown variable `${name}` (allowed: {HASH_KEY_VARIABLES})"),
            ));
        }
        i = next;
    }
    Ok(())
}

/// Parses a route `host`: `*`, `*.example.com`, or an exact host (port dropped, lower-cased).
fn parse_host_match(s: &str) -> Result<HostMatch, String> {
    let t = s.trim();
    let bad =
        || format!("invalid host \"{s}\": expected \"*\", \"*.example.com\" or an exact host name");
    if t == "*" {
        return Ok(HostMatch::Any);
    }
    if let Some(rest) = t.strip_prefix("*.") {
        if !is_hostname(rest) {
            return Err(bad());
        }
        let rest = rest.strip_suffix('.').unwrap_or(rest);
        return Ok(HostMatch::Suffix(format!(".{}", rest.to_ascii_lowercase())));
    }
    // Bracketed IPv6, with or without a port.
    if let Some(rest) = t.strip_prefix('[') {
        let (ip, after) = rest.split_once(']').ok_or_else(bad)?;
        let port_ok = after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok());
        if ip.parse::<Ipv6Addr>().is_err() || !port_ok {
            return Err(bad());
        }
        return Ok(HostMatch::Exact(format!("[{}]", ip.to_ascii_lowercase())));
    }
    let host = match t.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        Some(_) => return Err(bad()),
        None => t,
    };
    if host.parse::<IpAddr>().is_err() && !is_hostname(host) {
        return Err(bad());
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    Ok(HostMatch::Exact(host.to_ascii_lowercase()))
}

/// Converts a byte offset into a 1-based line and a 1-based column (in characters).
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut off = offset.min(text.len());
    while !text.is_char_boundary(off) {
        off -= 1;
    }
    let before = &text[..off];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// Whether a span covers a byte offset (an empty span covers its start).
fn span_covers(span: &Range<usize>, pos: usize) -> bool {
    span.start == pos || (span.start <= pos && pos < span.end)
}

/// Appends a key to a dotted path, quoting keys that are not bare.
fn join_key(prefix: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let key = if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if prefix.is_empty() {
        key
    } else {
        format!("{prefix}.{key}")
    }
}

/// The dotted key path of the deepest key or value at byte offset `pos`.
fn key_path_in_table(table: &toml::de::DeTable<'_>, pos: usize, prefix: &str) -> Option<String> {
    for (k, v) in table.iter() {
        let here = join_key(prefix, k.get_ref());
        if let Some(p) = key_path_in_value(v, pos, &here) {
            return Some(p);
        }
        if span_covers(&k.span(), pos) || span_covers(&v.span(), pos) {
            return Some(here);
        }
    }
    None
}

/// See [`key_path_in_table`]; descends into tables and arrays.
fn key_path_in_value(
    value: &Spanned<toml::de::DeValue<'_>>,
    pos: usize,
    prefix: &str,
) -> Option<String> {
    match value.get_ref() {
        toml::de::DeValue::Table(t) => key_path_in_table(t, pos, prefix),
        toml::de::DeValue::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let here = format!("{prefix}[{i}]");
            key_path_in_value(item, pos, &here)
                .or_else(|| span_covers(&item.span(), pos).then_some(here))
        }),
        _ => None,
    }
}

/// Name of a strategy, as written in the file.
fn strategy_name(s: StrategyKind) -> &'static str {
    match s {
        StrategyKind::RoundRobin => "round_robin",
        StrategyKind::LeastConn => "least_conn",
        StrategyKind::IpHash => "ip_hash",
        StrategyKind::Hash => "hash",
        StrategyKind::Random => "random",
        StrategyKind::LeastTime => "least_time",
    }
}

/// The `next_upstream` conditions as written in the file.
fn next_upstream_names(n: &NextUpstream) -> Vec<&'static str> {
    let all = [
        (n.error, "error"),
        (n.timeout, "timeout"),
        (n.invalid_header, "invalid_header"),
        (n.http_500, "http_500"),
        (n.http_502, "http_502"),
        (n.http_503, "http_503"),
        (n.http_504, "http_504"),
        (n.http_403, "http_403"),
        (n.http_404, "http_404"),
        (n.http_429, "http_429"),
        (n.non_idempotent, "non_idempotent"),
        (n.off, "off"),
    ];
    all.iter().filter(|(on, _)| *on).map(|(_, s)| *s).collect()
}

/// Formats a duration the way the file writes it ("10s", "1m 30s", "0s").
fn fmt_duration(d: Duration) -> String {
    if d.is_zero() {
        "0s".to_owned()
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// Formats a size with the largest exact binary unit.
fn fmt_size(n: u64) -> String {
    match n {
        0 => "unlimited".to_owned(),
        n if n % (1 << 30) == 0 => format!("{}GiB", n >> 30),
        n if n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
        n if n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
        n => format!("{n}B"),
    }
}

/// Formats a host match as written in the file.
fn fmt_host(h: &HostMatch) -> String {
    match h {
        HostMatch::Any => "*".to_owned(),
        HostMatch::Exact(s) => s.clone(),
        HostMatch::Suffix(s) => format!("*{s}"),
    }
}

/// Lays out rows as left-aligned columns, two spaces apart, each line indented.
fn write_table(out: &mut String, indent: &str, rows: &[Vec<String>]) -> std::fmt::Result {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::from(indent);
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let w = widths.get(c).copied().unwrap_or(0);
                write!(line, "{cell:<w$}  ")?;
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

impl Config {
    /// Writes [`Config::summary`].
    fn write_summary(&self, out: &mut String) -> std::fmt::Result {
        let s = &self.server;
        let mut listen: Vec<String> = s.listen.iter().map(ToString::to_string).collect();
        if listen.is_empty() {
            listen.push("(no plain listener)".to_owned());
        }
        let workers = if s.workers == 0 {
            "auto".to_owned()
        } else {
            s.workers.to_string()
        };
        let admin = match &self.admin.listen {
            Some(a) => a.to_string(),
            None => "off".to_owned(),
        };
        let token = if self.admin.token.is_some() {
            "set"
        } else {
            "none"
        };
        let access = match &self.log.access {
            AccessLogTarget::Stdout => "stdout".to_owned(),
            AccessLogTarget::Off => "off".to_owned(),
            AccessLogTarget::File(p) => p.display().to_string(),
        };
        let format = match self.log.format {
            LogFormat::Combined => "combined",
            LogFormat::Json => "json",
        };
        let mut rows = vec![
            vec!["file".to_owned(), self.path.display().to_string()],
            vec![
                "listen".to_owned(),
                format!(
                    "{}  workers {workers}  max_connections {}",
                    listen.join(", "),
                    s.max_connections
                ),
            ],
            vec![
                "client".to_owned(),
                format!(
                    "header_timeout {}  keepalive_timeout {}  max_body_size {}  shutdown_timeout {}",
                    fmt_duration(s.client_header_timeout),
                    fmt_duration(s.keepalive_timeout),
                    fmt_size(s.client_max_body_size),
                    fmt_duration(s.shutdown_timeout)
                ),
            ],
            vec![
                "http2".to_owned(),
                if s.http2 {
                    format!(
                        "h2c on  streams {}  header_size {}",
                        s.http2_max_concurrent_streams,
                        fmt_size(u64::from(s.http2_max_header_size))
                    )
                } else {
                    "off".to_owned()
                },
            ],
            vec!["admin".to_owned(), format!("{admin}  token {token}")],
            vec![
                "log".to_owned(),
                format!("access {access}  format {format}"),
            ],
        ];
        let resolves = self
            .upstreams
            .iter()
            .flat_map(|u| &u.servers)
            .any(|e| e.resolve);
        if resolves || self.resolver.addr.is_some() {
            let server = match self.resolver.addr {
                Some(a) => a.to_string(),
                None => "system (/etc/resolv.conf)".to_owned(),
            };
            rows.push(vec![
                "resolver".to_owned(),
                format!(
                    "{server}  every {}",
                    fmt_duration(self.resolver.resolve_interval)
                ),
            ]);
        }
        if let Some(t) = &self.tls {
            let listen: Vec<String> = t.listen.iter().map(ToString::to_string).collect();
            rows.push(vec!["tls".to_owned(), listen.join(", ")]);
            for (i, c) in t.certificates.iter().enumerate() {
                let names = t
                    .loaded
                    .as_ref()
                    .and_then(|l| l.names.get(i))
                    .filter(|n| !n.is_empty())
                    .map(|n| format!("  ({})", n.join(" ")))
                    .unwrap_or_default();
                let default = if i == 0 { "  default" } else { "" };
                rows.push(vec![
                    String::new(),
                    format!(
                        "cert {}  key {}{names}{default}",
                        c.cert.path.display(),
                        c.key.path.display()
                    ),
                ]);
            }
        }
        if s.redirect_https || s.acme_webroot.is_some() {
            let mut plain = Vec::new();
            if s.redirect_https {
                plain.push("redirect to https".to_owned());
            }
            if let Some(w) = &s.acme_webroot {
                plain.push(format!("acme challenges from {}", w.display()));
            }
            rows.push(vec!["plain".to_owned(), plain.join(", ")]);
        }
        write_table(out, "", &rows)?;
        for u in &self.upstreams {
            writeln!(out)?;
            let mut strategy = strategy_name(u.strategy).to_owned();
            if let Some(k) = &u.hash_key {
                write!(strategy, " {k}")?;
            }
            if u.consistent {
                strategy.push_str(" consistent");
            }
            if u.random_two {
                strategy.push_str(" two");
            }
            let scheme = match u.scheme {
                UpstreamScheme::Http | UpstreamScheme::Https => String::new(),
                s => format!("  {}", s.as_str()),
            };
            writeln!(out, "upstream {}  {strategy}{scheme}", u.name)?;
            if let Some(t) = &u.tls {
                let verify = match (&t.ca_file, t.verify) {
                    (_, false) => "off".to_owned(),
                    (Some(f), true) => format!("against {}", f.path.display()),
                    (None, true) => "against the built-in roots".to_owned(),
                };
                let name = t
                    .server_name
                    .as_ref()
                    .map(|n| format!("  server name {n}"))
                    .unwrap_or_default();
                writeln!(out, "  {}  verify {verify}{name}", u.scheme.as_str())?;
            }
            let tries = if u.next_upstream_tries == 0 {
                "auto".to_owned()
            } else {
                u.next_upstream_tries.to_string()
            };
            let retry_timeout = if u.next_upstream_timeout.is_zero() {
                "none".to_owned()
            } else {
                fmt_duration(u.next_upstream_timeout)
            };
            writeln!(
                out,
                "  keepalive {} for {}  connect {}  read {}",
                u.keepalive,
                fmt_duration(u.keepalive_timeout),
                fmt_duration(u.connect_timeout),
                fmt_duration(u.read_timeout)
            )?;
            writeln!(
                out,
                "  next_upstream {}  tries {tries}  timeout {retry_timeout}",
                next_upstream_names(&u.next_upstream).join(",")
            )?;
            let mut rows = vec![vec![
                "SERVER".to_owned(),
                "WEIGHT".to_owned(),
                "MAX_FAILS".to_owned(),
                "FAIL_TIMEOUT".to_owned(),
                "FLAGS".to_owned(),
            ]];
            for e in &u.servers {
                let mut flags = Vec::new();
                if e.backup {
                    flags.push("backup".to_owned());
                }
                if e.down {
                    flags.push("down".to_owned());
                }
                if e.max_conns > 0 {
                    flags.push(format!("max_conns={}", e.max_conns));
                }
                if !e.slow_start.is_zero() {
                    flags.push(format!("slow_start={}", fmt_duration(e.slow_start)));
                }
                if e.resolve {
                    flags.push("resolve".to_owned());
                }
                let ip_literal = e.addr.parse::<SocketAddr>().is_ok();
                if !e.resolve && !ip_literal {
                    let addrs: Vec<String> = e.addrs.iter().map(ToString::to_string).collect();
                    flags.push(format!("-> {}", addrs.join(" ")));
                }
                if flags.is_empty() {
                    flags.push("-".to_owned());
                }
                rows.push(vec![
                    e.addr.clone(),
                    e.weight.to_string(),
                    e.max_fails.to_string(),
                    fmt_duration(e.fail_timeout),
                    flags.join(" "),
                ]);
            }
            write_table(out, "  ", &rows)?;
            if let Some(h) = &u.health_check {
                let (lo, hi) = h.expect_status;
                let expect = if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                };
                write!(
                    out,
                    "  health_check GET {}  every {}  timeout {}  rise {}  fall {}  expect {expect}",
                    h.path,
                    fmt_duration(h.interval),
                    fmt_duration(h.timeout),
                    h.rise,
                    h.fall
                )?;
                if let Some(host) = &h.host {
                    write!(out, "  host {host}")?;
                }
                if let Some(body) = &h.expect_body {
                    write!(out, "  body contains {body:?}")?;
                }
                if h.mandatory {
                    out.push_str("  mandatory");
                }
                writeln!(out)?;
            }
        }
        writeln!(out)?;
        writeln!(out, "routes")?;
        let mut rows = vec![vec![
            "HOST".to_owned(),
            "PATH".to_owned(),
            "UPSTREAM".to_owned(),
        ]];
        for r in &self.routes {
            let name = self
                .upstreams
                .get(r.upstream)
                .map_or("?", |u| u.name.as_str());
            rows.push(vec![fmt_host(&r.host), r.path.clone(), name.to_owned()]);
        }
        write_table(out, "  ", &rows)
    }
}

// ---------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------

/// Upstream names seen so far: name -> (index, span of its header).
type Names = HashMap<String, (usize, Range<usize>)>;

/// The text being validated and its file name, for building located errors.
struct Ctx<'a> {
    /// The file contents.
    text: &'a str,
    /// The file name.
    file: &'a Path,
}

impl Ctx<'_> {
    /// An error at the start of `span`.
    fn err(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        self.err_at(span.start, key, message)
    }

    /// An error at byte offset `pos`.
    fn err_at(
        &self,
        pos: usize,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, col) = line_col(self.text, pos);
        ConfigError {
            file: self.file.to_path_buf(),
            line,
            col,
            key: key.into(),
            message: message.into(),
        }
    }

    /// Converts a toml syntax or serde error, finding the key path from its span.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let mut message = e.message().trim().to_owned();
        if let Some(rest) = message.strip_prefix("unknown field") {
            message = format!("unknown key{rest}");
        }
        if message.ends_with("expected a sequence") {
            message.push_str(" (write a list, e.g. [\"...\"])");
        }
        let Some(span) = e.span() else {
            return ConfigError {
                file: self.file.to_path_buf(),
                line: 0,
                col: 0,
                key: String::new(),
                message,
            };
        };
        let mut key = toml::de::DeTable::parse(self.text)
            .ok()
            .and_then(|root| key_path_in_table(root.get_ref(), span.start, ""))
            .unwrap_or_default();
        // serde's "missing field `name`" is located at the table that lacks it.
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|r| r.strip_suffix('`'))
        {
            key = join_key(&key, field);
            message = format!("missing required key `{field}`");
        }
        self.err(span, key, message)
    }

    /// Byte offset of `idx` inside the string value at `span` when it is written
    /// plainly (one quote, no escapes); otherwise the start of the value.
    fn offset_in_string(&self, span: &Range<usize>, value: &str, idx: usize) -> usize {
        let raw = self.text.get(span.clone()).unwrap_or("");
        let triple = raw.starts_with("\"\"\"") || raw.starts_with("'''");
        let plain = (raw.starts_with('"') || raw.starts_with('\''))
            && !triple
            && raw.get(1..).is_some_and(|r| r.starts_with(value));
        if plain {
            span.start + 1 + idx
        } else {
            span.start
        }
    }

    /// Validates the raw file into a [`Config`].
    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let (server, listen_spans) = self.server(raw.server, raw.tls.is_some())?;
        let admin = self.admin(raw.admin, &server.listen, &listen_spans)?;
        let tls = match raw.tls {
            Some(t) => Some(self.tls(t, &server.listen, admin.listen)?),
            None => None,
        };
        let log = self.log(raw.log)?;
        let resolver = self.resolver(raw.resolver)?;
        if raw.upstream.is_empty() {
            return Err(self.err_at(
                0,
                "upstream",
                "no [[upstream]] is defined; at least one is required",
            ));
        }
        let mut upstreams: Vec<UpstreamConfig> = Vec::with_capacity(raw.upstream.len());
        let mut names: Names = HashMap::new();
        let mut upstream_spans = Vec::with_capacity(raw.upstream.len());
        for (i, up) in raw.upstream.into_iter().enumerate() {
            let span = up.span();
            let u = self.upstream(i, span.clone(), up.into_inner(), &names)?;
            names.insert(u.name.clone(), (i, span.clone()));
            upstream_spans.push(span);
            upstreams.push(u);
        }
        let routes = if !raw.route.is_empty() {
            self.routes(raw.route, &names)?
        } else if upstreams.len() == 1 {
            vec![RouteConfig {
                host: HostMatch::Any,
                path: "/".to_owned(),
                upstream: 0,
            }]
        } else {
            let span = upstream_spans.get(1).cloned().unwrap_or(0..0);
            return Err(self.err(
                span,
                "route",
                format!(
                    "there are {} upstreams but no [[route]] says which upstream serves which requests",
                    upstreams.len()
                ),
            ));
        };
        Ok(Config {
            path: self.file.to_path_buf(),
            server,
            admin,
            log,
            resolver,
            upstreams,
            routes,
            tls,
        })
    }

    /// A path named in the file: relative ones are taken from the file's directory.
    fn file_ref(&self, value: &Spanned<String>, key: String) -> Result<FileRef, ConfigError> {
        let text = value.get_ref().trim();
        if text.is_empty() {
            return Err(self.err(
                value.span(),
                key,
                "must not be empty (expected a file path)",
            ));
        }
        let (line, col) = line_col(self.text, value.span().start);
        let path = Path::new(text);
        let path = match self.file.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        };
        Ok(FileRef {
            path,
            place: Place { line, col, key },
        })
    }

    /// `[tls]`: its listeners must not overlap the plain or admin ones.
    fn tls(
        &self,
        t: Spanned<RawTls>,
        server_listen: &[SocketAddr],
        admin: Option<SocketAddr>,
    ) -> Result<TlsConfig, ConfigError> {
        let span = t.span();
        let t = t.into_inner();
        let list_span = t.listen.span();
        let items = t.listen.into_inner();
        if items.is_empty() {
            return Err(self.err(
                list_span,
                "tls.listen",
                "needs at least one address, e.g. [\"0.0.0.0:443\"]",
            ));
        }
        let overlaps = |a: SocketAddr, b: SocketAddr| {
            a.port() != 0
                && a.port() == b.port()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        };
        let mut listen: Vec<SocketAddr> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let key = format!("tls.listen[{i}]");
            let addr =
                parse_listen(item.get_ref()).map_err(|m| self.err(item.span(), key.as_str(), m))?;
            if addr.port() != 0 && listen.contains(&addr) {
                return Err(self.err(item.span(), key, format!("{addr} is listed twice")));
            }
            if let Some(s) = server_listen.iter().find(|s| overlaps(addr, **s)) {
                return Err(self.err(
                    item.span(),
                    key,
                    format!("{addr} overlaps server.listen {s}; a port is either plain or TLS"),
                ));
            }
            if let Some(a) = admin.filter(|a| overlaps(addr, *a)) {
                return Err(self.err(
                    item.span(),
                    key,
                    format!("{addr} overlaps the admin listener {a}"),
                ));
            }
            listen.push(addr);
        }
        if t.certificate.is_empty() {
            return Err(self.err(
                span,
                "tls.certificate",
                "[tls] needs at least one [[tls.certificate]] with cert and key",
            ));
        }
        let mut certificates = Vec::with_capacity(t.certificate.len());
        for (i, c) in t.certificate.iter().enumerate() {
            let c = c.get_ref();
            certificates.push(CertificateConfig {
                cert: self.file_ref(&c.cert, format!("tls.certificate[{i}].cert"))?,
                key: self.file_ref(&c.key, format!("tls.certificate[{i}].key"))?,
            });
        }
        Ok(TlsConfig {
            listen,
            certificates,
            loaded: None,
        })
    }

    /// `scheme` and the `tls_*` keys of one upstream.
    fn upstream_scheme(
        &self,
        key: &str,
        u: &RawUpstream,
    ) -> Result<(UpstreamScheme, Option<UpstreamTls>), ConfigError> {
        let scheme = match &u.scheme {
            None => UpstreamScheme::Http,
            Some(s) => match s.get_ref().as_str() {
                "http" => UpstreamScheme::Http,
                "https" => UpstreamScheme::Https,
                "h2c" => UpstreamScheme::H2c,
                "h2" => UpstreamScheme::H2,
                other => {
                    return Err(self.err(
                        s.span(),
                        format!("{key}.scheme"),
                        format!(
                            "unknown scheme \"{other}\"; expected \"http\", \"https\", \"h2c\" or \"h2\""
                        ),
                    ));
                }
            },
        };
        if !scheme.is_tls() {
            let stray = [
                ("tls_verify", u.tls_verify.as_ref().map(Spanned::span)),
                ("tls_ca_file", u.tls_ca_file.as_ref().map(Spanned::span)),
                (
                    "tls_server_name",
                    u.tls_server_name.as_ref().map(Spanned::span),
                ),
            ];
            if let Some((name, Some(at))) = stray.into_iter().find(|(_, s)| s.is_some()) {
                return Err(self.err(
                    at,
                    format!("{key}.{name}"),
                    format!(
                        "{name} only applies to scheme = \"https\" or \"h2\" (this upstream uses \"{}\")",
                        scheme.as_str()
                    ),
                ));
            }
            return Ok((scheme, None));
        }
        let verify = u.tls_verify.as_ref().is_none_or(|v| *v.get_ref());
        let ca_file = match &u.tls_ca_file {
            Some(f) if !verify => {
                return Err(self.err(
                    f.span(),
                    format!("{key}.tls_ca_file"),
                    "tls_ca_file is for verifying, and tls_verify = false turns verifying off; remove one of them",
                ));
            }
            Some(f) => Some(self.file_ref(f, format!("{key}.tls_ca_file"))?),
            None => None,
        };
        let server_name = match &u.tls_server_name {
            Some(n) => {
                let text = n.get_ref().trim();
                let name = text.strip_suffix('.').unwrap_or(text);
                if name.parse::<IpAddr>().is_err() && !is_hostname(name) {
                    return Err(self.err(
                        n.span(),
                        format!("{key}.tls_server_name"),
                        format!("invalid server name \"{text}\": expected a DNS name such as \"api.internal\" or an IP address"),
                    ));
                }
                Some(name.to_ascii_lowercase())
            }
            None => None,
        };
        Ok((
            scheme,
            Some(UpstreamTls {
                verify,
                ca_file,
                server_name,
                loaded: None,
            }),
        ))
    }

    /// `[resolver]`: `addr` is an IP with an optional port (53).
    fn resolver(&self, r: RawResolver) -> Result<ResolverConfig, ConfigError> {
        let addr = match r.addr {
            None => None,
            Some(a) => {
                let text = a.get_ref().trim();
                let parsed = text.parse::<SocketAddr>().ok().or_else(|| {
                    text.parse::<IpAddr>()
                        .ok()
                        .map(|ip| SocketAddr::new(ip, 53))
                });
                match parsed {
                    Some(sa) if sa.port() != 0 => Some(sa),
                    _ => {
                        return Err(self.err(
                            a.span(),
                            "resolver.addr",
                            format!(
                                "invalid DNS server \"{text}\": expected an IP address with an optional port, e.g. \"127.0.0.11\" or \"10.0.0.2:53\""
                            ),
                        ));
                    }
                }
            }
        };
        let resolve_interval = self.positive(
            r.resolve_interval,
            Duration::from_secs(5),
            "resolver.resolve_interval",
        )?;
        Ok(ResolverConfig {
            addr,
            resolve_interval,
        })
    }

    /// `[server]`, and the spans of the listen addresses when written.
    fn server(
        &self,
        r: RawServer,
        has_tls: bool,
    ) -> Result<(ServerConfig, Vec<Range<usize>>), ConfigError> {
        let mut spans = Vec::new();
        let listen = match r.listen {
            None => vec![SocketAddr::from(([0, 0, 0, 0], 8080))],
            Some(list) => {
                let span = list.span();
                let items = list.into_inner();
                // With TLS listeners, no plain one is needed.
                if items.is_empty() && !has_tls {
                    return Err(self.err(
                        span,
                        "server.listen",
                        "needs at least one address, e.g. [\"0.0.0.0:8080\"]",
                    ));
                }
                let mut out: Vec<SocketAddr> = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let key = format!("server.listen[{i}]");
                    let addr = parse_listen(item.get_ref())
                        .map_err(|m| self.err(item.span(), key.as_str(), m))?;
                    // Port 0 asks the kernel for a free port: never a duplicate.
                    if addr.port() != 0 && out.contains(&addr) {
                        return Err(self.err(item.span(), key, format!("{addr} is listed twice")));
                    }
                    out.push(addr);
                    spans.push(item.span());
                }
                out
            }
        };
        let client_header_timeout = self.positive(
            r.client_header_timeout,
            Duration::from_secs(10),
            "server.client_header_timeout",
        )?;
        let acme_webroot = match &r.acme_webroot {
            Some(w) => Some(self.file_ref(w, "server.acme_webroot".to_owned())?.path),
            None => None,
        };
        let max_connections = match r.max_connections {
            Some(n) if *n.get_ref() == 0 => {
                return Err(self.err(n.span(), "server.max_connections", "must be at least 1"));
            }
            Some(n) => n.into_inner(),
            None => 10_000,
        };
        let http2_max_concurrent_streams = match r.http2_max_concurrent_streams {
            Some(n) if *n.get_ref() == 0 => {
                return Err(self.err(
                    n.span(),
                    "server.http2_max_concurrent_streams",
                    "must be at least 1",
                ));
            }
            Some(n) => n.into_inner(),
            None => 128,
        };
        let http2_max_header_size = match r.http2_max_header_size {
            None => 64 * 1024,
            Some(n) => match u32::try_from(n.get_ref().0) {
                Ok(v) if v >= 1024 => v,
                _ => {
                    return Err(self.err(
                        n.span(),
                        "server.http2_max_header_size",
                        "must be between 1KiB and 4GiB",
                    ));
                }
            },
        };
        let server = ServerConfig {
            listen,
            workers: r.workers.unwrap_or(0),
            client_header_timeout,
            keepalive_timeout: r.keepalive_timeout.map_or(Duration::from_secs(75), |d| d.0),
            client_max_body_size: r.client_max_body_size.map_or(10 << 20, |s| s.0),
            max_connections,
            shutdown_timeout: r.shutdown_timeout.map_or(Duration::from_secs(30), |d| d.0),
            redirect_https: r.redirect_https.unwrap_or(false),
            acme_webroot,
            http2: r.http2.unwrap_or(true),
            http2_max_concurrent_streams,
            http2_max_header_size,
        };
        Ok((server, spans))
    }

    /// `[admin]`; the admin listener must not overlap a server listener
    /// (`listen_spans` locate the written server listen addresses).
    fn admin(
        &self,
        r: RawAdmin,
        server_listen: &[SocketAddr],
        listen_spans: &[Range<usize>],
    ) -> Result<AdminConfig, ConfigError> {
        let (listen, span) = match r.listen {
            None => (Some(SocketAddr::from(([127, 0, 0, 1], 9180))), None),
            Some(l) if l.get_ref().trim() == "off" => (None, Some(l.span())),
            Some(l) => {
                let addr =
                    parse_listen(l.get_ref()).map_err(|m| self.err(l.span(), "admin.listen", m))?;
                (Some(addr), Some(l.span()))
            }
        };
        if let Some(addr) = listen {
            // Port 0 asks the kernel for a free port: it never clashes.
            let clash = server_listen.iter().position(|s| {
                addr.port() != 0
                    && s.port() == addr.port()
                    && (s.ip() == addr.ip()
                        || s.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            });
            if let Some(i) = clash {
                let s = server_listen.get(i).copied().unwrap_or(addr);
                return Err(match span {
                    Some(span) => self.err(
                        span,
                        "admin.listen",
                        format!("{addr} overlaps server.listen {s}; the admin listener must be separate"),
                    ),
                    None => self.err(
                        listen_spans.get(i).cloned().unwrap_or(0..0),
                        format!("server.listen[{i}]"),
                        format!(
                            "{s} overlaps the admin listener ({addr} by default); use another port or set [admin] listen"
                        ),
                    ),
                });
            }
        }
        let token = match r.token {
            Some(t) if t.get_ref().is_empty() => {
                return Err(self.err(
                    t.span(),
                    "admin.token",
                    "must not be empty (remove the key for no token)",
                ));
            }
            Some(t) => Some(t.into_inner()),
            None => None,
        };
        Ok(AdminConfig {
            listen,
            token,
            metrics: r.metrics.unwrap_or(true),
        })
    }

    /// `[log]`.
    fn log(&self, r: RawLog) -> Result<LogConfig, ConfigError> {
        let access = match r.access {
            None => AccessLogTarget::Stdout,
            Some(a) => match a.get_ref().as_str() {
                "stdout" => AccessLogTarget::Stdout,
                "off" => AccessLogTarget::Off,
                "" => {
                    return Err(self.err(
                        a.span(),
                        "log.access",
                        "must be \"stdout\", \"off\" or a file path",
                    ));
                }
                p => AccessLogTarget::File(PathBuf::from(p)),
            },
        };
        let format = match r.format {
            None => LogFormat::Combined,
            Some(f) => match f.get_ref().as_str() {
                "combined" => LogFormat::Combined,
                "json" => LogFormat::Json,
                other => {
                    return Err(self.err(
                        f.span(),
                        "log.format",
                        format!("unknown format \"{other}\"; expected \"combined\" or \"json\""),
                    ));
                }
            },
        };
        Ok(LogConfig { access, format })
    }

    /// One `[[upstream]]` at index `i`; `span` is its header.
    fn upstream(
        &self,
        i: usize,
        span: Range<usize>,
        u: RawUpstream,
        names: &Names,
    ) -> Result<UpstreamConfig, ConfigError> {
        let key = format!("upstream[{i}]");
        let name = u.name.get_ref().clone();
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.err(
                u.name.span(),
                format!("{key}.name"),
                format!("invalid upstream name {name:?}: must be non-empty, without spaces"),
            ));
        }
        if let Some((first, first_span)) = names.get(&name) {
            let (line, _) = line_col(self.text, first_span.start);
            return Err(self.err(
                u.name.span(),
                format!("{key}.name"),
                format!(
                    "duplicate upstream name \"{name}\" (already used by upstream[{first}] at line {line})"
                ),
            ));
        }
        let strategy = match &u.strategy {
            None => StrategyKind::RoundRobin,
            Some(s) => match s.get_ref().as_str() {
                "round_robin" => StrategyKind::RoundRobin,
                "least_conn" => StrategyKind::LeastConn,
                "ip_hash" => StrategyKind::IpHash,
                "hash" => StrategyKind::Hash,
                "random" => StrategyKind::Random,
                "least_time" => StrategyKind::LeastTime,
                other => {
                    return Err(self.err(
                        s.span(),
                        format!("{key}.strategy"),
                        format!(
                            "unknown strategy \"{other}\"; expected one of round_robin, least_conn, ip_hash, hash, random, least_time"
                        ),
                    ));
                }
            },
        };
        let hash_key = self.hash_key(&key, &span, &u, strategy)?;
        let (scheme, tls) = self.upstream_scheme(&key, &u)?;
        let consistent = self.strategy_flag(
            &u.consistent,
            strategy,
            StrategyKind::Hash,
            &key,
            "consistent",
        )?;
        let random_two = self.strategy_flag(
            &u.random_two,
            strategy,
            StrategyKind::Random,
            &key,
            "random_two",
        )?;
        let connect_timeout = self.positive(
            u.connect_timeout,
            Duration::from_secs(3),
            &format!("{key}.connect_timeout"),
        )?;
        let read_timeout = self.positive(
            u.read_timeout,
            Duration::from_secs(60),
            &format!("{key}.read_timeout"),
        )?;
        let next_upstream = self.next_upstream(u.next_upstream, &format!("{key}.next_upstream"))?;
        if u.server.is_empty() {
            return Err(self.err(
                span,
                format!("{key}.server"),
                format!("upstream \"{name}\" has no servers; add at least one [[upstream.server]]"),
            ));
        }
        let mut servers: Vec<ServerEntry> = Vec::with_capacity(u.server.len());
        let mut first_backup: Option<(usize, Range<usize>)> = None;
        for (j, s) in u.server.into_iter().enumerate() {
            let skey = format!("{key}.server[{j}]");
            let s = s.into_inner();
            if let Some(b) = &s.backup
                && *b.get_ref()
                && first_backup.is_none()
            {
                first_backup = Some((j, b.span()));
            }
            let addr_span = s.addr.span();
            let entry = self.server_entry(&skey, s)?;
            let same = servers.iter().position(|p| {
                p.addr.eq_ignore_ascii_case(&entry.addr)
                    || (!entry.addrs.is_empty() && p.addrs == entry.addrs)
            });
            if let Some(prev) = same {
                return Err(self.err(
                    addr_span,
                    format!("{skey}.addr"),
                    format!(
                        "\"{}\" is the same server as {key}.server[{prev}]",
                        entry.addr
                    ),
                ));
            }
            servers.push(entry);
        }
        if servers.iter().all(|s| s.backup) {
            let (j, at) = first_backup.unwrap_or((0, span));
            return Err(self.err(
                at,
                format!("{key}.server[{j}].backup"),
                format!(
                    "every server of upstream \"{name}\" is backup = true; at least one must be a primary server"
                ),
            ));
        }
        let health_check = match u.health_check {
            Some(h) => Some(self.health_check(&format!("{key}.health_check"), h)?),
            None => None,
        };
        Ok(UpstreamConfig {
            name,
            strategy,
            hash_key,
            consistent,
            random_two,
            keepalive: u.keepalive.unwrap_or(64),
            keepalive_timeout: u.keepalive_timeout.map_or(Duration::from_secs(15), |d| d.0),
            connect_timeout,
            read_timeout,
            next_upstream,
            next_upstream_tries: u.next_upstream_tries.unwrap_or(0),
            next_upstream_timeout: u.next_upstream_timeout.map_or(Duration::ZERO, |d| d.0),
            retry_buffer: u.retry_buffer.map_or(64 * 1024, |s| s.0),
            queue: u.queue.unwrap_or(0),
            queue_timeout: u.queue_timeout.map_or(Duration::from_secs(60), |d| d.0),
            scheme,
            tls,
            servers,
            health_check,
        })
    }

    /// `hash_key`: required for and only allowed with `strategy = "hash"`, and a valid template.
    fn hash_key(
        &self,
        key: &str,
        span: &Range<usize>,
        u: &RawUpstream,
        strategy: StrategyKind,
    ) -> Result<Option<String>, ConfigError> {
        match (&u.hash_key, strategy) {
            (None, StrategyKind::Hash) => {
                let at = u.strategy.as_ref().map_or(span.clone(), Spanned::span);
                Err(self.err(
                    at,
                    format!("{key}.hash_key"),
                    "strategy = \"hash\" needs hash_key, e.g. hash_key = \"$remote_addr\"",
                ))
            }
            (None, _) => Ok(None),
            (Some(k), StrategyKind::Hash) => {
                let text = k.get_ref();
                if text.is_empty() {
                    return Err(self.err(k.span(), format!("{key}.hash_key"), "must not be empty"));
                }
                if let Err((idx, why)) = check_template(text) {
                    let at = self.offset_in_string(&k.span(), text, idx);
                    return Err(self.err_at(
                        at,
                        format!("{key}.hash_key"),
                        format!("invalid hash_key \"{text}\": {why}"),
                    ));
                }
                Ok(Some(text.clone()))
            }
            (Some(k), other) => Err(self.err(
                k.span(),
                format!("{key}.hash_key"),
                format!(
                    "hash_key only applies to strategy = \"hash\" (this upstream uses \"{}\")",
                    strategy_name(other)
                ),
            )),
        }
    }

    /// A boolean that may only be true with one strategy (`consistent`, `random_two`).
    fn strategy_flag(
        &self,
        flag: &Option<Spanned<bool>>,
        strategy: StrategyKind,
        needs: StrategyKind,
        key: &str,
        name: &str,
    ) -> Result<bool, ConfigError> {
        match flag {
            Some(f) if *f.get_ref() && strategy != needs => Err(self.err(
                f.span(),
                format!("{key}.{name}"),
                format!(
                    "{name} only applies to strategy = \"{}\" (this upstream uses \"{}\")",
                    strategy_name(needs),
                    strategy_name(strategy)
                ),
            )),
            Some(f) => Ok(*f.get_ref()),
            None => Ok(false),
        }
    }

    /// A duration that must be non-zero, or its default.
    fn positive(
        &self,
        d: Option<Spanned<Dur>>,
        default: Duration,
        key: &str,
    ) -> Result<Duration, ConfigError> {
        match d {
            Some(d) if d.get_ref().0.is_zero() => {
                Err(self.err(d.span(), key, "must be greater than zero"))
            }
            Some(d) => Ok(d.into_inner().0),
            None => Ok(default),
        }
    }

    /// `next_upstream`.
    fn next_upstream(
        &self,
        list: Option<Spanned<Vec<Spanned<String>>>>,
        key: &str,
    ) -> Result<NextUpstream, ConfigError> {
        let Some(list) = list else {
            return Ok(NextUpstream {
                error: true,
                timeout: true,
                ..NextUpstream::default()
            });
        };
        let span = list.span();
        let items = list.into_inner();
        if items.is_empty() {
            return Err(self.err(
                span,
                key,
                "must not be empty; write [\"off\"] to disable retries",
            ));
        }
        let mut n = NextUpstream::default();
        for (i, item) in items.iter().enumerate() {
            let flag = match item.get_ref().as_str() {
                "error" => &mut n.error,
                "timeout" => &mut n.timeout,
                "invalid_header" => &mut n.invalid_header,
                "http_500" => &mut n.http_500,
                "http_502" => &mut n.http_502,
                "http_503" => &mut n.http_503,
                "http_504" => &mut n.http_504,
                "http_403" => &mut n.http_403,
                "http_404" => &mut n.http_404,
                "http_429" => &mut n.http_429,
                "non_idempotent" => &mut n.non_idempotent,
                "off" if items.len() > 1 => {
                    return Err(self.err(
                        item.span(),
                        format!("{key}[{i}]"),
                        "\"off\" must be the only value",
                    ));
                }
                "off" => &mut n.off,
                other => {
                    return Err(self.err(
                        item.span(),
                        format!("{key}[{i}]"),
                        format!(
                            "unknown value \"{other}\"; expected error, timeout, invalid_header, http_500, http_502, http_503, http_504, http_403, http_404, http_429, non_idempotent or off"
                        ),
                    ));
                }
            };
            *flag = true;
        }
        Ok(n)
    }

    /// One `[[upstream.server]]`; `key` is its path.
    fn server_entry(&self, key: &str, s: RawServerEntry) -> Result<ServerEntry, ConfigError> {
        let addr_key = format!("{key}.addr");
        let addr = s.addr.get_ref().trim().to_owned();
        let resolve = s.resolve.unwrap_or(false);
        let spec = parse_addr(&addr).map_err(|m| self.err(s.addr.span(), addr_key.as_str(), m))?;
        let addrs = match spec {
            AddrSpec::Ip(sa) => vec![sa],
            AddrSpec::Name(_, _) if resolve => Vec::new(),
            AddrSpec::Name(host, port) => {
                let found = (host.as_str(), port).to_socket_addrs().map_err(|e| {
                    self.err(
                        s.addr.span(),
                        addr_key.as_str(),
                        format!(
                            "cannot resolve \"{host}\": {e} (or set resolve = true to resolve it at run time)"
                        ),
                    )
                })?;
                let mut out: Vec<SocketAddr> = Vec::new();
                for a in found {
                    if !out.contains(&a) {
                        out.push(a);
                    }
                }
                if out.is_empty() {
                    return Err(self.err(
                        s.addr.span(),
                        addr_key,
                        format!("\"{host}\" resolves to no address"),
                    ));
                }
                out
            }
        };
        let weight = match s.weight {
            Some(w) if *w.get_ref() == 0 => {
                return Err(self.err(
                    w.span(),
                    format!("{key}.weight"),
                    "weight must be at least 1",
                ));
            }
            Some(w) => w.into_inner(),
            None => 1,
        };
        Ok(ServerEntry {
            addr,
            addrs,
            weight,
            max_fails: s.max_fails.unwrap_or(1),
            fail_timeout: s.fail_timeout.map_or(Duration::from_secs(10), |d| d.0),
            backup: s.backup.is_some_and(Spanned::into_inner),
            down: s.down.unwrap_or(false),
            max_conns: s.max_conns.unwrap_or(0),
            slow_start: s.slow_start.map_or(Duration::ZERO, |d| d.0),
            resolve,
        })
    }

    /// `[upstream.health_check]`; `key` is its path.
    fn health_check(&self, key: &str, h: RawHealthCheck) -> Result<HealthCheckConfig, ConfigError> {
        let path = h.path.get_ref().clone();
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.err(
                h.path.span(),
                format!("{key}.path"),
                format!("invalid path \"{path}\": must start with `/` and contain no spaces"),
            ));
        }
        let host = match h.host {
            Some(s) if s.get_ref().trim().is_empty() => {
                return Err(self.err(s.span(), format!("{key}.host"), "must not be empty"));
            }
            Some(s) => Some(s.into_inner()),
            None => None,
        };
        let interval = self.positive(
            h.interval,
            Duration::from_secs(2),
            &format!("{key}.interval"),
        )?;
        let timeout =
            self.positive(h.timeout, Duration::from_secs(1), &format!("{key}.timeout"))?;
        let count = |v: Option<Spanned<u32>>, default: u32, name: &str| match v {
            Some(n) if *n.get_ref() == 0 => {
                Err(self.err(n.span(), format!("{key}.{name}"), "must be at least 1"))
            }
            Some(n) => Ok(n.into_inner()),
            None => Ok(default),
        };
        let rise = count(h.rise, 2, "rise")?;
        let fall = count(h.fall, 3, "fall")?;
        let expect_status = match h.expect_status {
            Some(s) => parse_status_range(s.get_ref())
                .map_err(|m| self.err(s.span(), format!("{key}.expect_status"), m))?,
            None => (200, 399),
        };
        let expect_body = match h.expect_body {
            Some(b) if b.get_ref().is_empty() => {
                return Err(self.err(
                    b.span(),
                    format!("{key}.expect_body"),
                    "must not be empty (remove the key to not check the body)",
                ));
            }
            Some(b) => Some(b.into_inner()),
            None => None,
        };
        Ok(HealthCheckConfig {
            path,
            host,
            interval,
            timeout,
            rise,
            fall,
            expect_status,
            expect_body,
            mandatory: h.mandatory.unwrap_or(false),
        })
    }

    /// `[[route]]`s, with upstream names looked up in `names`.
    fn routes(
        &self,
        raw: Vec<Spanned<RawRoute>>,
        names: &Names,
    ) -> Result<Vec<RouteConfig>, ConfigError> {
        let mut routes: Vec<RouteConfig> = Vec::with_capacity(raw.len());
        // (host, path, route index, span of its header) of the routes seen so far.
        let mut seen: Vec<(HostMatch, String, usize, Range<usize>)> = Vec::new();
        for (i, r) in raw.into_iter().enumerate() {
            let key = format!("route[{i}]");
            let span = r.span();
            let r = r.into_inner();
            let host = match &r.host {
                Some(h) => parse_host_match(h.get_ref())
                    .map_err(|m| self.err(h.span(), format!("{key}.host"), m))?,
                None => HostMatch::Any,
            };
            let path = match &r.path {
                Some(p) => {
                    let text = p.get_ref();
                    if !text.starts_with('/') {
                        return Err(self.err(
                            p.span(),
                            format!("{key}.path"),
                            format!("invalid path \"{text}\": must start with `/`"),
                        ));
                    }
                    let bad_char =
                        |c: char| c.is_whitespace() || c.is_control() || c == '?' || c == '#';
                    if text.chars().any(bad_char) {
                        return Err(self.err(
                            p.span(),
                            format!("{key}.path"),
                            format!(
                                "invalid path \"{text}\": a path prefix has no spaces, query or fragment"
                            ),
                        ));
                    }
                    text.clone()
                }
                None => "/".to_owned(),
            };
            let Some((upstream, _)) = names.get(r.upstream.get_ref()) else {
                let mut known: Vec<&str> = names.keys().map(String::as_str).collect();
                known.sort_unstable();
                return Err(self.err(
                    r.upstream.span(),
                    format!("{key}.upstream"),
                    format!(
                        "unknown upstream \"{}\" (defined: {})",
                        r.upstream.get_ref(),
                        known.join(", ")
                    ),
                ));
            };
            if let Some((_, _, first, first_span)) =
                seen.iter().find(|(h, p, _, _)| *h == host && *p == path)
            {
                let (line, _) = line_col(self.text, first_span.start);
                // Point at the path if written, else the host, else the [[route]] header.
                let at = r
                    .path
                    .as_ref()
                    .or(r.host.as_ref())
                    .map_or(span.clone(), Spanned::span);
                return Err(self.err(
                    at,
                    key,
                    format!(
                        "duplicate route: host \"{}\" path \"{path}\" is already routed by route[{first}] at line {line}",
                        fmt_host(&host)
                    ),
                ));
            }
            seen.push((host.clone(), path.clone(), i, span));
            routes.push(RouteConfig {
                host,
                path,
                upstream: *upstream,
            });
        }
        Ok(routes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `text` as `t.toml`, panicking with the error when it is invalid.
    fn ok(text: &str) -> Config {
        Config::parse(text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Parses `text` as `t.toml`, expecting an error.
    fn err(text: &str) -> ConfigError {
        match Config::parse(text, Path::new("t.toml")) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e,
        }
    }

    /// Asserts the error's place and key, and that its message mentions `needle`.
    #[track_caller]
    fn check(e: &ConfigError, line: usize, col: usize, key: &str, needle: &str) {
        assert_eq!((e.line, e.col), (line, col), "place of: {e}");
        assert_eq!(e.key, key, "key of: {e}");
        assert!(e.message.contains(needle), "{needle:?} not in: {e}");
        assert_eq!(e.file, Path::new("t.toml"));
    }

    /// One upstream with one server; tests append to it.
    const ONE: &str = "[[upstream]]\nname = \"a\"\n[[upstream.server]]\naddr = \"127.0.0.1:81\"\n";

    #[test]
    fn example_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ferry.example.toml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.server.listen,
            vec![SocketAddr::from(([0, 0, 0, 0], 8080))]
        );
        assert_eq!(c.server.client_max_body_size, 10 * 1024 * 1024);
        assert_eq!(c.server.keepalive_timeout, Duration::from_secs(75));
        assert_eq!(
            c.admin.listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 9180)))
        );
        assert_eq!(c.log.access, AccessLogTarget::Stdout);
        assert_eq!(c.upstreams.len(), 1);
        let u = &c.upstreams[0];
        assert_eq!(u.name, "payment");
        assert_eq!(u.strategy, StrategyKind::RoundRobin);
        assert_eq!(u.servers.len(), 3);
        assert_eq!(u.servers[1].weight, 2);
        assert_eq!(
            u.servers[1].addrs,
            vec![SocketAddr::from(([10, 0, 0, 12], 8080))]
        );
        assert!(u.servers[2].backup && !u.servers[0].backup);
        let h = u
            .health_check
            .as_ref()
            .map(|h| (h.path.as_str(), h.expect_status));
        assert_eq!(h, Some(("/actuator/health", (200, 399))));
        assert_eq!(
            c.routes,
            vec![RouteConfig {
                host: HostMatch::Any,
                path: "/".into(),
                upstream: 0
            }]
        );
    }

    #[test]
    fn missing_file_is_an_error_without_place() {
        let e = Config::load(Path::new("/nonexistent/ferry.toml")).err();
        let e = e.unwrap_or_else(|| panic!("expected an error"));
        assert_eq!(e.line, 0);
        assert!(
            e.to_string()
                .starts_with("/nonexistent/ferry.toml: cannot read")
        );
    }

    #[test]
    fn http2_keys() {
        let c = ok(
            "[server]\nhttp2 = false\nhttp2_max_concurrent_streams = 16\n\
             http2_max_header_size = \"32KiB\"\n\
             [[upstream]]\nname = \"a\"\nscheme = \"h2c\"\n\
             [[upstream.server]]\naddr = \"127.0.0.1:81\"\n",
        );
        assert!(!c.server.http2);
        assert_eq!(c.server.http2_max_concurrent_streams, 16);
        assert_eq!(c.server.http2_max_header_size, 32 * 1024);
        assert_eq!(c.upstreams[0].scheme, UpstreamScheme::H2c);
        let e = err("[server]\nhttp2_max_concurrent_streams = 0\n");
        check(
            &e,
            2,
            32,
            "server.http2_max_concurrent_streams",
            "at least 1",
        );
        let e = err("[server]\nhttp2_max_header_size = \"100\"\n");
        check(&e, 2, 25, "server.http2_max_header_size", "between 1KiB");
        let e = err(
            "[[upstream]]\nname = \"a\"\nscheme = \"grpc\"\n[[upstream.server]]\naddr = \"127.0.0.1:81\"\n",
        );
        check(
            &e,
            3,
            10,
            "upstream[0].scheme",
            "expected \"http\", \"https\", \"h2c\" or \"h2\"",
        );
    }

    #[test]
    fn defaults() {
        let c = ok(ONE);
        let s = &c.server;
        assert_eq!(s.listen, vec![SocketAddr::from(([0, 0, 0, 0], 8080))]);
        assert_eq!(s.workers, 0);
        assert_eq!(s.client_header_timeout, Duration::from_secs(10));
        assert_eq!(s.keepalive_timeout, Duration::from_secs(75));
        assert_eq!(s.client_max_body_size, 10 << 20);
        assert_eq!(s.max_connections, 10_000);
        assert_eq!(s.shutdown_timeout, Duration::from_secs(30));
        assert!(s.http2);
        assert_eq!(s.http2_max_concurrent_streams, 128);
        assert_eq!(s.http2_max_header_size, 64 * 1024);
        assert_eq!(c.upstreams[0].scheme, UpstreamScheme::Http);
        assert_eq!(
            c.admin.listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 9180)))
        );
        assert_eq!(c.admin.token, None);
        assert_eq!(c.log.access, AccessLogTarget::Stdout);
        assert_eq!(c.log.format, LogFormat::Combined);
        let u = &c.upstreams[0];
        assert_eq!(u.strategy, StrategyKind::RoundRobin);
        assert_eq!(u.hash_key, None);
        assert!(!u.consistent && !u.random_two);
        assert_eq!(u.keepalive, 64);
        assert_eq!(u.keepalive_timeout, Duration::from_secs(15));
        assert_eq!(u.connect_timeout, Duration::from_secs(3));
        assert_eq!(u.read_timeout, Duration::from_secs(60));
        assert_eq!(
            u.next_upstream,
            NextUpstream {
                error: true,
                timeout: true,
                ..NextUpstream::default()
            }
        );
        assert_eq!(u.next_upstream_tries, 0);
        assert_eq!(u.next_upstream_timeout, Duration::ZERO);
        assert_eq!(u.health_check, None);
        let e = &u.servers[0];
        assert_eq!(e.addr, "127.0.0.1:81");
        assert_eq!(e.addrs, vec![SocketAddr::from(([127, 0, 0, 1], 81))]);
        assert_eq!((e.weight, e.max_fails, e.max_conns), (1, 1, 0));
        assert_eq!(e.fail_timeout, Duration::from_secs(10));
        assert_eq!(e.slow_start, Duration::ZERO);
        assert!(!e.backup && !e.down && !e.resolve);
    }

    #[test]
    fn every_key_is_read() {
        let c = ok(r#"[server]
listen = ["127.0.0.1:8080", "[::1]:8081"]
workers = 4
client_header_timeout = "5s"
keepalive_timeout = "0s"
client_max_body_size = 1024
max_connections = 50
shutdown_timeout = "1m"
[admin]
listen = "off"
token = "s3cret"
[log]
access = "/var/log/ferry/access.log"
format = "json"
[[upstream]]
name = "api"
strategy = "hash"
hash_key = "${host}-$cookie_session"
consistent = true
keepalive = 8
keepalive_timeout = "30s"
connect_timeout = "250ms"
read_timeout = "2m"
next_upstream = ["error", "http_502", "non_idempotent"]
next_upstream_tries = 3
next_upstream_timeout = "10s"
[[upstream.server]]
addr = "10.0.0.1:80"
weight = 5
max_fails = 0
fail_timeout = "30s"
down = true
max_conns = 100
slow_start = "30s"
[[upstream.server]]
addr = "app.internal:80"
resolve = true
[upstream.health_check]
path = "/healthz"
host = "api.example.com"
interval = "5s"
timeout = "2s"
rise = 1
fall = 5
expect_status = "204"
expect_body = "UP"
mandatory = true
"#);
        let s = &c.server;
        assert_eq!(s.listen.len(), 2);
        assert_eq!(
            s.listen[1],
            "[::1]:8081"
                .parse::<SocketAddr>()
                .unwrap_or_else(|e| panic!("{e}"))
        );
        assert_eq!(
            (s.workers, s.max_connections, s.client_max_body_size),
            (4, 50, 1024)
        );
        assert_eq!(s.keepalive_timeout, Duration::ZERO);
        assert_eq!(s.shutdown_timeout, Duration::from_secs(60));
        assert_eq!(c.admin.listen, None);
        assert_eq!(c.admin.token.as_deref(), Some("s3cret"));
        assert_eq!(
            c.log.access,
            AccessLogTarget::File("/var/log/ferry/access.log".into())
        );
        assert_eq!(c.log.format, LogFormat::Json);
        let u = &c.upstreams[0];
        assert_eq!(u.strategy, StrategyKind::Hash);
        assert_eq!(u.hash_key.as_deref(), Some("${host}-$cookie_session"));
        assert!(u.consistent);
        assert_eq!((u.keepalive, u.next_upstream_tries), (8, 3));
        assert_eq!(u.connect_timeout, Duration::from_millis(250));
        assert_eq!(u.read_timeout, Duration::from_secs(120));
        assert_eq!(u.next_upstream_timeout, Duration::from_secs(10));
        let a = &u.servers[0];
        assert_eq!((a.weight, a.max_fails, a.max_conns), (5, 0, 100));
        assert!(a.down);
        assert_eq!(a.slow_start, Duration::from_secs(30));
        let b = &u.servers[1];
        assert!(b.resolve);
        assert!(b.addrs.is_empty(), "resolve = true defers resolution");
        let h = u
            .health_check
            .clone()
            .unwrap_or_else(|| panic!("health_check"));
        assert_eq!(
            h,
            HealthCheckConfig {
                path: "/healthz".into(),
                host: Some("api.example.com".into()),
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
                rise: 1,
                fall: 5,
                expect_status: (204, 204),
                expect_body: Some("UP".into()),
                mandatory: true,
            }
        );
    }

    #[test]
    fn durations() {
        for (text, want) in [
            ("500ms", Duration::from_millis(500)),
            ("10s", Duration::from_secs(10)),
            ("1m", Duration::from_secs(60)),
            ("1m 30s", Duration::from_secs(90)),
            ("2h", Duration::from_secs(7200)),
            ("0s", Duration::ZERO),
            ("0", Duration::ZERO),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in ["", "10", "ten seconds", "10x", "-1s", "1.5.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let c = ok(&format!(
            "{ONE}fail_timeout = \"1m\"\nslow_start = \"1500ms\"\n"
        ));
        assert_eq!(
            c.upstreams[0].servers[0].fail_timeout,
            Duration::from_secs(60)
        );
        assert_eq!(
            c.upstreams[0].servers[0].slow_start,
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn sizes() {
        for (text, want) in [
            ("0", 0),
            ("123", 123),
            ("512KiB", 512 << 10),
            ("10MiB", 10 << 20),
            ("1GiB", 1 << 30),
            ("100KB", 100_000),
            ("1MB", 1_000_000),
            ("1GB", 1_000_000_000),
            ("1k", 1024),
            ("1K", 1024),
            ("8m", 8 << 20),
            ("1g", 1 << 30),
            ("10 MiB", 10 << 20),
            ("0MiB", 0),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "MiB",
            "1.5MiB",
            "10 apples",
            "-1",
            "99999999999999999999",
            "17179869184GiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        let c = ok(&format!("[server]\nclient_max_body_size = \"0\"\n{ONE}"));
        assert_eq!(c.server.client_max_body_size, 0);
        let c = ok(&format!("[server]\nclient_max_body_size = 4096\n{ONE}"));
        assert_eq!(c.server.client_max_body_size, 4096);
    }

    #[test]
    fn implicit_route_for_a_single_upstream() {
        let c = ok(ONE);
        assert_eq!(
            c.routes,
            vec![RouteConfig {
                host: HostMatch::Any,
                path: "/".into(),
                upstream: 0
            }]
        );
    }

    #[test]
    fn explicit_routes_are_used_as_written() {
        let c = ok(&format!(
            "{ONE}[[upstream]]\nname = \"b\"\n[[upstream.server]]\naddr = \"127.0.0.1:82\"\n\
             [[route]]\nhost = \"API.Example.com:8443\"\nupstream = \"b\"\n\
             [[route]]\nhost = \"*.Example.com\"\npath = \"/static/\"\nupstream = \"a\"\n\
             [[route]]\nupstream = \"a\"\n"
        ));
        assert_eq!(
            c.routes,
            vec![
                RouteConfig {
                    host: HostMatch::Exact("api.example.com".into()),
                    path: "/".into(),
                    upstream: 1
                },
                RouteConfig {
                    host: HostMatch::Suffix(".example.com".into()),
                    path: "/static/".into(),
                    upstream: 0
                },
                RouteConfig {
                    host: HostMatch::Any,
                    path: "/".into(),
                    upstream: 0
                },
            ]
        );
    }

    #[test]
    fn host_matches() {
        for (text, want) in [
            ("*", HostMatch::Any),
            ("example.com", HostMatch::Exact("example.com".into())),
            ("Example.COM", HostMatch::Exact("example.com".into())),
            ("example.com:8080", HostMatch::Exact("example.com".into())),
            ("example.com.", HostMatch::Exact("example.com".into())),
            ("10.0.0.1:80", HostMatch::Exact("10.0.0.1".into())),
            ("[::1]:8080", HostMatch::Exact("[::1]".into())),
            ("[::1]", HostMatch::Exact("[::1]".into())),
            ("*.Example.com", HostMatch::Suffix(".example.com".into())),
        ] {
            assert_eq!(parse_host_match(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "a*.example.com",
            "*example.com",
            "exa mple.com",
            "example.com:port",
            "a/b",
            "[zz]",
        ] {
            assert!(parse_host_match(bad).is_err(), "{bad:?}");
        }
        let e = err(&format!(
            "{ONE}[[route]]\nhost = \"www.*.com\"\nupstream = \"a\"\n"
        ));
        check(&e, 6, 8, "route[0].host", "www.*.com");
        let e = err(&format!(
            "{ONE}[[route]]\npath = \"api\"\nupstream = \"a\"\n"
        ));
        check(&e, 6, 8, "route[0].path", "must start with `/`");
    }

    #[test]
    fn next_upstream_parsing() {
        let nu = |list: &str| {
            ok(&format!("[[upstream]]\nname = \"a\"\nnext_upstream = {list}\n[[upstream.server]]\naddr = \"127.0.0.1:1\"\n"))
                .upstreams[0]
                .next_upstream
        };
        assert_eq!(
            nu("[\"off\"]"),
            NextUpstream {
                off: true,
                ..NextUpstream::default()
            }
        );
        assert_eq!(
            nu("[\"error\"]"),
            NextUpstream {
                error: true,
                ..NextUpstream::default()
            }
        );
        let all = nu(
            r#"["error", "timeout", "invalid_header", "http_500", "http_502", "http_503",
            "http_504", "http_403", "http_404", "http_429", "non_idempotent"]"#,
        );
        assert!(
            all.error
                && all.timeout
                && all.invalid_header
                && all.http_500
                && all.http_502
                && all.http_503
                && all.http_504
                && all.http_403
                && all.http_404
                && all.http_429
                && all.non_idempotent
                && !all.off
        );
        assert_eq!(next_upstream_names(&all).len(), 11);
    }

    #[test]
    fn addresses() {
        assert!(matches!(parse_addr("10.0.0.1:80"), Ok(AddrSpec::Ip(_))));
        assert!(matches!(parse_addr("[::1]:80"), Ok(AddrSpec::Ip(a)) if a.port() == 80));
        assert!(
            matches!(parse_addr("app-1.internal:8080"), Ok(AddrSpec::Name(h, 8080)) if h == "app-1.internal")
        );
        for bad in [
            "10.0.0.1",
            "app",
            "[::1]",
            "::1:80",
            "app:0",
            "app:65536",
            "app:http",
            "http://app:80",
            "a b:80",
            "",
            ":80",
            "[zz]:80",
        ] {
            assert!(parse_addr(bad).is_err(), "{bad:?}");
        }
        // A name is resolved at load time unless resolve = true.
        let c = ok("[[upstream]]\nname = \"a\"\n[[upstream.server]]\naddr = \"localhost:8080\"\n");
        let addrs = &c.upstreams[0].servers[0].addrs;
        assert!(
            !addrs.is_empty()
                && addrs
                    .iter()
                    .all(|a| a.port() == 8080 && a.ip().is_loopback())
        );
    }

    #[test]
    fn summary_lists_everything() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ferry.example.toml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let s = c.summary();
        for needle in [
            "ferry.example.toml",
            "0.0.0.0:8080",
            "127.0.0.1:9180",
            "access stdout  format combined",
            "max_body_size 10MiB",
            "upstream payment  round_robin",
            "next_upstream error,timeout",
            "10.0.0.12:8080  2",
            "backup",
            "health_check GET /actuator/health",
            "expect 200-399",
            "HOST  PATH  UPSTREAM",
            "*     /     payment",
        ] {
            assert!(s.contains(needle), "{needle:?} not in:\n{s}");
        }
    }

    #[test]
    fn parse_never_panics_on_mangled_input() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ferry.example.toml");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{e}"));
        let cuts: Vec<usize> = (0..=text.len())
            .filter(|i| text.is_char_boundary(*i))
            .collect();
        for &cut in &cuts {
            let _ = Config::parse(&text[..cut], Path::new("t.toml"));
        }
        for &at in cuts.iter().step_by(13) {
            for junk in ["\"", "$", "0", "]", "=", "\u{e9}", "\n"] {
                let mut t = text.clone();
                t.insert_str(at, junk);
                if let Err(e) = Config::parse(&t, Path::new("t.toml")) {
                    assert!(e.line >= 1 || e.message.contains("cannot"), "{e}");
                }
            }
        }
    }

    // ----- one test per error case -----

    #[test]
    fn error_syntax() {
        let e = err("[[upstream]\nname = \"a\"\n");
        assert_eq!((e.line, e.col), (1, 12));
        assert!(e.message.contains("expected `]`"), "{e}");
    }

    #[test]
    fn error_unknown_key() {
        let e = err(&format!("{ONE}bogus = 1\n"));
        check(
            &e,
            5,
            1,
            "upstream[0].server[0].bogus",
            "unknown key `bogus`",
        );
        let e = err("[server]\nlisten = [\"0.0.0.0:80\"]\n  tiemout = \"1s\"\n");
        check(&e, 3, 3, "server.tiemout", "unknown key `tiemout`");
        let e = err(&format!("colour = \"blue\"\n{ONE}"));
        check(&e, 1, 1, "colour", "unknown key `colour`");
        let e = err(&format!(
            "{ONE}[upstream.health_check]\npath = \"/\"\nintervall = \"1s\"\n"
        ));
        check(
            &e,
            7,
            1,
            "upstream[0].health_check.intervall",
            "unknown key `intervall`",
        );
    }

    #[test]
    fn error_missing_required_key() {
        let e = err("[[upstream]]\nstrategy = \"random\"\n");
        check(&e, 1, 1, "upstream[0].name", "missing required key `name`");
        let e = err(&format!("{ONE}[[upstream.server]]\nweight = 2\n"));
        check(&e, 5, 1, "upstream[0].server[1].addr", "`addr`");
        let e = err(&format!(
            "{ONE}[upstream.health_check]\ninterval = \"1s\"\n"
        ));
        check(&e, 5, 1, "upstream[0].health_check.path", "`path`");
        let e = err(&format!("{ONE}[[route]]\npath = \"/\"\n"));
        check(&e, 5, 1, "route[0].upstream", "`upstream`");
    }

    #[test]
    fn error_wrong_type() {
        let e = err(&format!("{ONE}weight = \"heavy\"\n"));
        check(&e, 5, 10, "upstream[0].server[0].weight", "expected u32");
        let e = err(&format!("[server]\nlisten = \"0.0.0.0:80\"\n{ONE}"));
        check(&e, 2, 10, "server.listen", "write a list");
        let e = err(&format!("{ONE}max_fails = -1\n"));
        check(&e, 5, 13, "upstream[0].server[0].max_fails", "-1");
    }

    #[test]
    fn error_unknown_strategy() {
        let e = err(
            "[[upstream]]\nname = \"a\"\nstrategy = \"fastest\"\n[[upstream.server]]\naddr = \"127.0.0.1:81\"\n",
        );
        check(
            &e,
            3,
            12,
            "upstream[0].strategy",
            "unknown strategy \"fastest\"",
        );
        assert!(e.message.contains("least_conn"));
    }

    #[test]
    fn error_duplicate_upstream_name() {
        let e = err(&format!("{ONE}{ONE}"));
        check(
            &e,
            6,
            8,
            "upstream[1].name",
            "duplicate upstream name \"a\"",
        );
        assert!(e.message.contains("line 1"), "{e}");
    }

    #[test]
    fn error_route_unknown_upstream() {
        let e = err(&format!(
            "{ONE}\n[[route]]\nhost = \"*\"\nupstream = \"payments\"\n"
        ));
        check(
            &e,
            8,
            12,
            "route[0].upstream",
            "unknown upstream \"payments\"",
        );
        assert!(e.message.contains("defined: a"), "{e}");
    }

    #[test]
    fn error_upstream_without_servers() {
        let e = err("[server]\nworkers = 1\n\n[[upstream]]\nname = \"empty\"\n");
        check(
            &e,
            4,
            1,
            "upstream[0].server",
            "upstream \"empty\" has no servers",
        );
    }

    #[test]
    fn error_weight_zero() {
        let e = err(&format!(
            "{ONE}[[upstream.server]]\naddr = \"127.0.0.1:82\"\nweight = 0\n"
        ));
        check(
            &e,
            7,
            10,
            "upstream[0].server[1].weight",
            "weight must be at least 1",
        );
    }

    #[test]
    fn error_address_missing_port() {
        let e = err("[[upstream]]\nname = \"a\"\n[[upstream.server]]\naddr = \"10.0.0.1\"\n");
        check(&e, 4, 8, "upstream[0].server[0].addr", "port is missing");
        let e = err("[[upstream]]\nname = \"a\"\n[[upstream.server]]\naddr = \"app.internal\"\n");
        check(&e, 4, 8, "upstream[0].server[0].addr", "port is missing");
        let e = err("[[upstream]]\nname = \"a\"\n[[upstream.server]]\naddr = \"[::1]\"\n");
        check(&e, 4, 8, "upstream[0].server[0].addr", "port is missing");
    }

    #[test]
    fn error_address_bad_port() {
        let e = err("[[upstream]]\nname = \"a\"\n[[upstream.server]]\naddr = \"10.0.0.1:99999\"\n");
        check(&e, 4, 8, "upstream[0].server[0].addr", "bad port `99999`");
        let e = err("[[upstream]]\nname = \"a\"\n[[upstream.server]]\naddr = \"app:http\"\n");
        check(&e, 4, 8, "upstream[0].server[0].addr", "bad port `http`");
    }

    #[test]
    fn error_address_garbage() {
        let e =
            err("[[upstream]]\nname = \"a\"\n[[upstream.server]]\naddr = \"not an address:80\"\n");
        check(
            &e,
            4,
            8,
            "upstream[0].server[0].addr",
            "neither an IP address nor a host name",
        );
        let e =
            err("[[upstream]]\nname = \"a\"\n[[upstream.server]]\naddr = \"http://10.0.0.1:80\"\n");
        check(&e, 4, 8, "upstream[0].server[0].addr", "without a scheme");
        let e =
            err("[[upstream]]\nname = \"a\"\n[[upstream.server]]\naddr = \"2001:db8::1:8080\"\n");
        check(&e, 4, 8, "upstream[0].server[0].addr", "needs brackets");
        let e = err("[[upstream]]\nname = \"a\"\n[[upstream.server]]\naddr = \"fe80::1::80\"\n");
        check(&e, 4, 8, "upstream[0].server[0].addr", "needs brackets");
    }

    #[test]
    fn error_address_unresolvable() {
        let e = err(
            "[[upstream]]\nname = \"a\"\n[[upstream.server]]\naddr = \"no-such-host.invalid:80\"\n",
        );
        check(
            &e,
            4,
            8,
            "upstream[0].server[0].addr",
            "cannot resolve \"no-such-host.invalid\"",
        );
        // With resolve = true the name is kept for later.
        let c = ok(
            "[[upstream]]\nname = \"a\"\n[[upstream.server]]\naddr = \"no-such-host.invalid:80\"\nresolve = true\n",
        );
        assert!(c.upstreams[0].servers[0].addrs.is_empty());
    }

    #[test]
    fn error_bad_duration() {
        let e = err(&format!("{ONE}fail_timeout = \"10 sekunden\"\n"));
        check(
            &e,
            5,
            16,
            "upstream[0].server[0].fail_timeout",
            "invalid duration \"10 sekunden\"",
        );
        let e = err(&format!("[server]\nshutdown_timeout = 30\n{ONE}"));
        check(&e, 2, 20, "server.shutdown_timeout", "needs a unit");
        let e = err(&format!("[server]\nkeepalive_timeout = \"75\"\n{ONE}"));
        check(&e, 2, 21, "server.keepalive_timeout", "unit is missing");
    }

    #[test]
    fn error_bad_size() {
        let e = err(&format!(
            "[server]\nclient_max_body_size = \"10 apples\"\n{ONE}"
        ));
        check(
            &e,
            2,
            24,
            "server.client_max_body_size",
            "unknown unit `apples`",
        );
        let e = err(&format!("[server]\nclient_max_body_size = -5\n{ONE}"));
        check(&e, 2, 24, "server.client_max_body_size", "negative");
        let e = err(&format!(
            "[server]\nclient_max_body_size = \"1.5MiB\"\n{ONE}"
        ));
        check(&e, 2, 24, "server.client_max_body_size", "fractions");
    }

    #[test]
    fn error_hash_without_hash_key() {
        let e = err(
            "[[upstream]]\nname = \"a\"\nstrategy = \"hash\"\n[[upstream.server]]\naddr = \"127.0.0.1:81\"\n",
        );
        check(&e, 3, 12, "upstream[0].hash_key", "needs hash_key");
    }

    #[test]
    fn error_hash_key_with_another_strategy() {
        let e = err(
            "[[upstream]]\nname = \"a\"\nhash_key = \"$uri\"\n[[upstream.server]]\naddr = \"127.0.0.1:81\"\n",
        );
        check(
            &e,
            3,
            12,
            "upstream[0].hash_key",
            "only applies to strategy = \"hash\"",
        );
        let e = err(
            "[[upstream]]\nname = \"a\"\nrandom_two = true\n[[upstream.server]]\naddr = \"127.0.0.1:81\"\n",
        );
        check(&e, 3, 14, "upstream[0].random_two", "strategy = \"random\"");
    }

    #[test]
    fn error_all_servers_backup() {
        let e = err(
            "[[upstream]]\nname = \"a\"\n[[upstream.server]]\naddr = \"127.0.0.1:81\"\nbackup = true\n\
             [[upstream.server]]\naddr = \"127.0.0.1:82\"\nbackup = true\n",
        );
        check(
            &e,
            5,
            10,
            "upstream[0].server[0].backup",
            "every server of upstream \"a\" is backup",
        );
    }

    #[test]
    fn error_next_upstream_unknown_value() {
        let e = err(
            "[[upstream]]\nname = \"a\"\nnext_upstream = [\"error\", \"http_418\"]\n[[upstream.server]]\naddr = \"127.0.0.1:81\"\n",
        );
        check(
            &e,
            3,
            27,
            "upstream[0].next_upstream[1]",
            "unknown value \"http_418\"",
        );
    }

    #[test]
    fn error_next_upstream_off_not_alone() {
        let e = err(
            "[[upstream]]\nname = \"a\"\nnext_upstream = [\"error\", \"off\"]\n[[upstream.server]]\naddr = \"127.0.0.1:81\"\n",
        );
        check(
            &e,
            3,
            27,
            "upstream[0].next_upstream[1]",
            "\"off\" must be the only value",
        );
        let e = err(
            "[[upstream]]\nname = \"a\"\nnext_upstream = []\n[[upstream.server]]\naddr = \"127.0.0.1:81\"\n",
        );
        check(&e, 3, 17, "upstream[0].next_upstream", "must not be empty");
    }

    #[test]
    fn error_no_upstreams() {
        let e = err("[server]\nlisten = [\"0.0.0.0:8080\"]\n");
        check(&e, 1, 1, "upstream", "no [[upstream]]");
        let e = err("");
        check(&e, 1, 1, "upstream", "no [[upstream]]");
    }

    #[test]
    fn error_several_upstreams_without_routes() {
        let two = ONE.replace("\"a\"", "\"b\"").replace(":81", ":82");
        let e = err(&format!("{ONE}{two}"));
        check(
            &e,
            5,
            1,
            "route",
            "no [[route]] says which upstream serves which requests",
        );
    }

    #[test]
    fn error_listen_unparsable() {
        let e = err(&format!(
            "[server]\nlisten = [\"0.0.0.0:8080\", \"localhost:80\"]\n{ONE}"
        ));
        check(
            &e,
            2,
            27,
            "server.listen[1]",
            "invalid listen address \"localhost:80\"",
        );
        let e = err(&format!("[server]\nlisten = [\"8080\"]\n{ONE}"));
        check(&e, 2, 11, "server.listen[0]", "expected ip:port");
        let e = err(&format!("[admin]\nlisten = \"127.0.0.1\"\n{ONE}"));
        check(&e, 2, 10, "admin.listen", "invalid listen address");
        // Port 0 (any free port) never clashes and is never a duplicate.
        let c = ok(&format!(
            "[server]\nlisten = [\"127.0.0.1:0\", \"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n{ONE}"
        ));
        assert_eq!(c.admin.listen.map(|a| a.port()), Some(0));
        let e = err(&format!(
            "[server]\nlisten = [\"0.0.0.0:80\", \"0.0.0.0:80\"]\n{ONE}"
        ));
        check(&e, 2, 25, "server.listen[1]", "listed twice");
        let e = err(&format!("[server]\nlisten = [\"0.0.0.0:9180\"]\n{ONE}"));
        check(&e, 2, 11, "server.listen[0]", "overlaps the admin listener");
        let c = ok(&format!(
            "[server]\nlisten = [\"0.0.0.0:9180\"]\n[admin]\nlisten = \"off\"\n{ONE}"
        ));
        assert_eq!(c.admin.listen, None);
    }

    #[test]
    fn error_admin_overlaps_server_listener() {
        let e = err(&format!(
            "[server]\nlisten = [\"0.0.0.0:8080\"]\n[admin]\nlisten = \"127.0.0.1:8080\"\n{ONE}"
        ));
        check(&e, 4, 10, "admin.listen", "overlaps server.listen");
    }

    #[test]
    fn error_expect_status_unparsable() {
        let hc = |v: &str| {
            format!("{ONE}[upstream.health_check]\npath = \"/health\"\nexpect_status = {v}\n")
        };
        let e = err(&hc("\"ok\""));
        check(
            &e,
            7,
            17,
            "upstream[0].health_check.expect_status",
            "invalid expect_status \"ok\"",
        );
        let e = err(&hc("\"399-200\""));
        check(
            &e,
            7,
            17,
            "upstream[0].health_check.expect_status",
            "range is empty",
        );
        let e = err(&hc("\"200-999\""));
        check(&e, 7, 17, "upstream[0].health_check.expect_status", "`999`");
        let status = |v: &str| {
            ok(&hc(v)).upstreams[0]
                .health_check
                .as_ref()
                .map(|h| h.expect_status)
        };
        assert_eq!(status("\"200\""), Some((200, 200)));
        assert_eq!(status("204"), Some((204, 204)));
        assert_eq!(status("\"2xx\""), Some((200, 299)));
        assert_eq!(status("\" 200 - 299 \""), Some((200, 299)));
    }

    #[test]
    fn error_hash_key_template() {
        let up = |k: &str| {
            format!(
                "[[upstream]]\nname = \"a\"\nstrategy = \"hash\"\nhash_key = {k}\n[[upstream.server]]\naddr = \"127.0.0.1:81\"\n"
            )
        };
        // `hash_key = "` is 12 characters: the string's first character is column 13.
        let e = err(&up("\"user-$\""));
        check(
            &e,
            4,
            18,
            "upstream[0].hash_key",
            "`$` is not followed by a variable name",
        );
        let e = err(&up("\"$remote_addr$request_id\""));
        check(
            &e,
            4,
            25,
            "upstream[0].hash_key",
            "unknown variable `$request_id`",
        );
        let e = err(&up("\"${host\""));
        check(&e, 4, 13, "upstream[0].hash_key", "not closed");
        let e = err(&up("\"$http_\""));
        check(
            &e,
            4,
            13,
            "upstream[0].hash_key",
            "unknown variable `$http_`",
        );
        let e = err(&up("\"$ uri\""));
        check(
            &e,
            4,
            13,
            "upstream[0].hash_key",
            "not followed by a variable name",
        );
        // An escaped string is located at its opening quote.
        let e = err(&up("\"\\u0041$nope\""));
        check(&e, 4, 12, "upstream[0].hash_key", "`$nope`");
        for good in [
            "$remote_addr",
            "$request_uri",
            "$uri",
            "$args",
            "$host",
            "$http_x_user_id",
            "$cookie_session",
            "$arg_id",
            "${uri}x",
            "literal",
            "$host:$uri/${arg_page}",
            "$HOST",
            "$Http_X_User",
            "$query_string",
            "${document_uri}",
        ] {
            assert_eq!(check_template(good), Ok(()), "{good}");
        }
        // Braces do not widen the name alphabet (balance::key rejects these too).
        for bad in ["${http_x-user}", "${}", "${remote addr}", "$request_id"] {
            assert!(check_template(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_duplicate_route() {
        let e = err(&format!(
            "{ONE}[[route]]\nhost = \"Example.com\"\npath = \"/api\"\nupstream = \"a\"\n\
             [[route]]\nhost = \"example.com:443\"\npath = \"/api\"\nupstream = \"a\"\n"
        ));
        check(
            &e,
            11,
            8,
            "route[1]",
            "duplicate route: host \"example.com\" path \"/api\"",
        );
        assert!(e.message.contains("route[0] at line 5"), "{e}");
        // Omitted host and path are "*" and "/": the second route is a duplicate too.
        let e = err(&format!(
            "{ONE}[[route]]\nupstream = \"a\"\n[[route]]\nhost = \"*\"\nupstream = \"a\"\n"
        ));
        check(&e, 8, 8, "route[1]", "duplicate route");
    }

    #[test]
    fn resolver_addr_and_interval() {
        let c = ok(ONE);
        assert_eq!(c.resolver.addr, None);
        assert_eq!(c.resolver.resolve_interval, Duration::from_secs(5));
        let c = ok(&format!(
            "[resolver]\naddr = \"127.0.0.11\"\nresolve_interval = \"2s\"\n{ONE}"
        ));
        assert_eq!(
            c.resolver.addr,
            Some(SocketAddr::from(([127, 0, 0, 11], 53)))
        );
        assert_eq!(c.resolver.resolve_interval, Duration::from_secs(2));
        let c = ok(&format!("[resolver]\naddr = \"[::1]:5353\"\n{ONE}"));
        assert_eq!(c.resolver.addr, Some("[::1]:5353".parse().unwrap()));
        let e = err(&format!("[resolver]\naddr = \"dns.example\"\n{ONE}"));
        check(&e, 2, 8, "resolver.addr", "expected an IP address");
        let e = err(&format!("[resolver]\nresolve_interval = \"0s\"\n{ONE}"));
        check(&e, 2, 20, "resolver.resolve_interval", "greater than zero");
        let e = err(&format!("[resolver]\nport = 53\n{ONE}"));
        assert!(e.to_string().contains("port"), "{e}");
    }

    /// A `[tls]` section with one certificate.
    const TLS: &str = "[tls]\nlisten = [\"0.0.0.0:443\"]\n[[tls.certificate]]\ncert = \"fullchain.pem\"\nkey = \"privkey.pem\"\n";

    #[test]
    fn tls_keys_are_read() {
        let c = Config::parse(
            &format!(
                "[server]\nlisten = [\"0.0.0.0:80\"]\nredirect_https = true\nacme_webroot = \"/var/www/certbot\"\n{ONE}{TLS}[[tls.certificate]]\ncert = \"/etc/b.pem\"\nkey = \"/etc/b.key\"\n"
            ),
            Path::new("/etc/ferry/ferry.toml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(c.server.redirect_https);
        assert_eq!(
            c.server.acme_webroot,
            Some(PathBuf::from("/var/www/certbot"))
        );
        let t = c.tls.unwrap_or_else(|| panic!("tls"));
        assert_eq!(t.listen, vec![SocketAddr::from(([0, 0, 0, 0], 443))]);
        assert_eq!(t.certificates.len(), 2);
        // Relative paths are taken from the config file's directory.
        assert_eq!(
            t.certificates[0].cert.path,
            Path::new("/etc/ferry/fullchain.pem")
        );
        assert_eq!(
            t.certificates[0].key.path,
            Path::new("/etc/ferry/privkey.pem")
        );
        assert_eq!(t.certificates[1].cert.path, Path::new("/etc/b.pem"));
        assert_eq!(
            t.certificates[0].cert.place,
            Place {
                line: 12,
                col: 8,
                key: "tls.certificate[0].cert".into()
            }
        );
        assert!(
            t.loaded.is_none(),
            "files are read by tls::load, not by parse"
        );
        // Defaults: no redirect, no webroot, no TLS; a TLS-only file needs no plain listener.
        let d = ok(ONE);
        assert!(!d.server.redirect_https && d.server.acme_webroot.is_none() && d.tls.is_none());
        let only_tls = ok(&format!("[server]\nlisten = []\n{ONE}{TLS}"));
        assert!(only_tls.server.listen.is_empty());
    }

    #[test]
    fn upstream_tls_keys_are_read() {
        let c = ok(&format!(
            "{ONE}[[upstream]]\nname = \"b\"\nscheme = \"https\"\ntls_ca_file = \"/etc/ssl/ca.pem\"\ntls_server_name = \"API.internal\"\n[[upstream.server]]\naddr = \"127.0.0.1:443\"\n[[upstream]]\nname = \"c\"\nscheme = \"https\"\ntls_verify = false\n[[upstream.server]]\naddr = \"127.0.0.1:444\"\n[[route]]\nupstream = \"a\"\n"
        ));
        assert_eq!(c.upstreams[0].scheme, UpstreamScheme::Http);
        assert!(c.upstreams[0].tls.is_none());
        let b = c.upstreams[1].tls.clone().unwrap_or_else(|| panic!("tls"));
        assert_eq!(c.upstreams[1].scheme, UpstreamScheme::Https);
        assert!(b.verify);
        assert_eq!(
            b.ca_file.map(|f| f.path),
            Some(PathBuf::from("/etc/ssl/ca.pem"))
        );
        assert_eq!(b.server_name.as_deref(), Some("api.internal"));
        let t = c.upstreams[2].tls.clone().unwrap_or_else(|| panic!("tls"));
        assert!(!t.verify && t.ca_file.is_none() && t.server_name.is_none());
    }

    #[test]
    fn error_tls_section() {
        let e = err(&format!("{ONE}[tls]\nlisten = []\n"));
        check(&e, 6, 10, "tls.listen", "at least one address");
        let e = err(&format!("{ONE}[tls]\nlisten = [\"443\"]\n"));
        check(&e, 6, 11, "tls.listen[0]", "expected ip:port");
        let e = err(&format!(
            "[server]\nlisten = [\"0.0.0.0:443\"]\n{ONE}[tls]\nlisten = [\"127.0.0.1:443\"]\n"
        ));
        check(
            &e,
            8,
            11,
            "tls.listen[0]",
            "overlaps server.listen 0.0.0.0:443",
        );
        let e = err(&format!("{ONE}[tls]\nlisten = [\"127.0.0.1:9180\"]\n"));
        check(&e, 6, 11, "tls.listen[0]", "overlaps the admin listener");
        let e = err(&format!("{ONE}[tls]\nlisten = [\"0.0.0.0:443\"]\n"));
        check(
            &e,
            5,
            1,
            "tls.certificate",
            "at least one [[tls.certificate]]",
        );
        let e = err(&format!("{ONE}[tls]\ncertificate = []\n"));
        assert!(e.message.contains("missing required key `listen`"), "{e}");
        let e = err(&format!(
            "{ONE}[tls]\nlisten = [\"0.0.0.0:443\"]\n[[tls.certificate]]\ncert = \"a.pem\"\n"
        ));
        check(
            &e,
            7,
            1,
            "tls.certificate[0].key",
            "missing required key `key`",
        );
        let e = err(&format!(
            "{ONE}[tls]\nlisten = [\"0.0.0.0:443\"]\n[[tls.certificate]]\ncert = \"\"\nkey = \"k.pem\"\n"
        ));
        check(&e, 8, 8, "tls.certificate[0].cert", "must not be empty");
        let e = err(&format!("{ONE}{TLS}chain = \"x.pem\"\n"));
        check(&e, 10, 1, "tls.certificate[0].chain", "unknown key `chain`");
        let e = err(&format!("[server]\nacme_webroot = \"\"\n{ONE}"));
        check(&e, 2, 16, "server.acme_webroot", "must not be empty");
        let e = err(&format!("[server]\nredirect_https = \"yes\"\n{ONE}"));
        check(&e, 2, 18, "server.redirect_https", "invalid type");
    }

    #[test]
    fn error_upstream_tls_keys() {
        let up = "[[upstream]]\nname = \"a\"\n";
        let srv = "[[upstream.server]]\naddr = \"127.0.0.1:81\"\n";
        let e = err(&format!("{up}scheme = \"ftp\"\n{srv}"));
        check(
            &e,
            3,
            10,
            "upstream[0].scheme",
            "expected \"http\", \"https\", \"h2c\" or \"h2\"",
        );
        let e = err(&format!("{up}tls_verify = false\n{srv}"));
        check(
            &e,
            3,
            14,
            "upstream[0].tls_verify",
            "only applies to scheme = \"https\"",
        );
        let e = err(&format!("{up}tls_server_name = \"x\"\n{srv}"));
        check(
            &e,
            3,
            19,
            "upstream[0].tls_server_name",
            "only applies to scheme",
        );
        let e = err(&format!(
            "{up}scheme = \"https\"\ntls_verify = false\ntls_ca_file = \"ca.pem\"\n{srv}"
        ));
        check(&e, 5, 15, "upstream[0].tls_ca_file", "tls_verify = false");
        let e = err(&format!(
            "{up}scheme = \"https\"\ntls_server_name = \"bad name\"\n{srv}"
        ));
        check(
            &e,
            4,
            19,
            "upstream[0].tls_server_name",
            "invalid server name",
        );
        let e = err(&format!(
            "{up}scheme = \"https\"\ntls_ca_file = \" \"\n{srv}"
        ));
        check(&e, 4, 15, "upstream[0].tls_ca_file", "must not be empty");
    }

    #[test]
    fn error_display_names_file_line_col_and_key() {
        let e = err(&format!("{ONE}weight = 0\n"));
        assert_eq!(
            e.to_string(),
            "t.toml:5:10: upstream[0].server[0].weight: weight must be at least 1"
        );
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        assert_eq!(line_col("é = 1\nx", 0), (1, 1));
        assert_eq!(line_col("é = 1\nx", 2), (1, 2));
        assert_eq!(line_col("é = 1\nx", 7), (2, 1));
        assert_eq!(line_col("ab", 99), (1, 3));
        // `route = [{ path = "/été", upstream = ` is 37 characters but 39 bytes.
        let e = err(&format!(
            "route = [{{ path = \"/\u{e9}t\u{e9}\", upstream = \"b\" }}]\n{ONE}"
        ));
        check(&e, 1, 38, "route[0].upstream", "\"b\"");
    }
}
