//! DNS discovery: a server with `resolve = true` whose address is a name
//! (Swarm's `tasks.<service>`, a Kubernetes headless Service) is resolved at
//! start, at each reload, and again every `[resolver] resolve_interval` — sooner
//! when the answer's TTL is shorter, so no answer is used past its TTL. Every
//! address becomes a peer with the server's parameters.
//!
//! This module only resolves and fills addresses into a configuration; the
//! control loop in `server` schedules resolutions and swaps the runtime, which
//! re-uses the peers of addresses that stay (their state survives), ramps up new
//! ones (`slow_start`) and drains vanished ones.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig as DnsConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

use crate::config::{Config, ResolverConfig};

/// Shortest time between two resolutions of one name, whatever its TTL.
const MIN_REFRESH: Duration = Duration::from_secs(1);

/// Longest one resolution may take (the resolver's own timeout and retries included).
const LOOKUP_LIMIT: Duration = Duration::from_secs(5);

/// A name to resolve, with the port its peers use.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    /// The host name, lower-case.
    pub host: String,
    /// The port of every address it gives.
    pub port: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl Target {
    /// The target of a server `addr` written `name:port`; `None` for an IP literal.
    fn of(addr: &str) -> Option<Target> {
        if addr.parse::<SocketAddr>().is_ok() {
            return None;
        }
        let (host, port) = addr.rsplit_once(':')?;
        if host.parse::<IpAddr>().is_ok() {
            return None;
        }
        Some(Target {
            host: host.to_ascii_lowercase(),
            port: port.parse().ok()?,
        })
    }
}

/// Every name `cfg` asks to resolve at run time, each once.
pub fn targets(cfg: &Config) -> Vec<Target> {
    let mut out: Vec<Target> = cfg
        .upstreams
        .iter()
        .flat_map(|u| &u.servers)
        .filter(|s| s.resolve)
        .filter_map(|s| Target::of(&s.addr))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `cfg` with the addresses found for each `resolve = true` name filled in
/// (none for a name not resolved yet).
pub fn fill(cfg: &Config, found: &HashMap<Target, Vec<SocketAddr>>) -> Config {
    let mut cfg = cfg.clone();
    for s in cfg.upstreams.iter_mut().flat_map(|u| u.servers.iter_mut()) {
        if !s.resolve {
            continue;
        }
        if let Some(t) = Target::of(&s.addr) {
            s.addrs = found.get(&t).cloned().unwrap_or_default();
        }
    }
    cfg
}

/// A DNS client set up from `[resolver]`.
pub struct Dns {
    resolver: TokioResolver,
    /// The settings it was made from.
    pub settings: ResolverConfig,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Dns {
    /// A client asking `[resolver] addr`, or the servers of `/etc/resolv.conf`.
    pub fn new(settings: &ResolverConfig) -> Result<Dns, String> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = match settings.addr {
            Some(addr) => {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut ns.connections {
                    c.port = addr.port();
                }
                TokioResolver::builder_with_config(DnsConfig::from_name_servers(vec![ns]), provider)
            }
            None => TokioResolver::builder(provider).map_err(|e| {
                format!(
                    "cannot read the system's DNS configuration (/etc/resolv.conf): {e}; set [resolver] addr"
                )
            })?,
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 1;
        // The resolver's cache may keep an answer for its TTL but never past the
        // interval, so each scheduled resolution asks the server again.
        opts.positive_max_ttl = Some(settings.resolve_interval);
        opts.negative_max_ttl = Some(settings.resolve_interval.min(MIN_REFRESH));
        let resolver = builder
            .build()
            .map_err(|e| format!("cannot set up DNS resolution: {e}"))?;
        Ok(Dns {
            resolver,
            settings: settings.clone(),
        })
    }

    /// Resolve `t`: its addresses, sorted (so every ferry replica orders its
    /// peers alike whatever order the server answers in, and hashes agree), and
    /// when to ask again: at the interval, or sooner when the TTL is shorter.
    pub async fn resolve(&self, t: &Target) -> Result<(Vec<SocketAddr>, Duration), String> {
        let lookup = tokio::time::timeout(LOOKUP_LIMIT, self.resolver.lookup_ip(t.host.as_str()))
            .await
            .map_err(|_| format!("no answer within {LOOKUP_LIMIT:?}"))?
            .map_err(|e| e.to_string())?;
        let ttl = lookup
            .valid_until()
            .saturating_duration_since(std::time::Instant::now());
        let mut addrs: Vec<SocketAddr> = lookup
            .iter()
            .map(|ip| SocketAddr::new(ip, t.port))
            .collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err("the answer has no address".into());
        }
        let next = ttl.min(self.settings.resolve_interval).max(MIN_REFRESH);
        Ok((addrs, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_names_with_resolve_each_once() {
        let cfg = Config::parse(
            "[[upstream]]\nname = \"a\"\n\
             [[upstream.server]]\naddr = \"Tasks.App:8080\"\nresolve = true\n\
             [[upstream.server]]\naddr = \"127.0.0.1:81\"\nresolve = true\n\
             [[upstream.server]]\naddr = \"localhost:82\"\n\
             [[upstream]]\nname = \"b\"\n\
             [[upstream.server]]\naddr = \"tasks.app:8080\"\nresolve = true\n\
             [[route]]\nupstream = \"a\"\n",
            std::path::Path::new("t.toml"),
        )
        .expect("valid");
        let t = targets(&cfg);
        assert_eq!(
            t,
            vec![Target {
                host: "tasks.app".into(),
                port: 8080
            }]
        );
        let mut found = HashMap::new();
        let addrs: Vec<SocketAddr> = vec![
            "10.0.0.1:8080".parse().unwrap(),
            "10.0.0.2:8080".parse().unwrap(),
        ];
        found.insert(t[0].clone(), addrs.clone());
        let filled = fill(&cfg, &found);
        assert_eq!(filled.upstreams[0].servers[0].addrs, addrs);
        assert_eq!(filled.upstreams[1].servers[0].addrs, addrs);
        // Not resolve = true, or an IP: untouched.
        assert_eq!(
            filled.upstreams[0].servers[1].addrs,
            cfg.upstreams[0].servers[1].addrs
        );
        assert_eq!(
            filled.upstreams[0].servers[2].addrs,
            cfg.upstreams[0].servers[2].addrs
        );
        // Nothing found yet: no address.
        assert!(
            fill(&cfg, &HashMap::new()).upstreams[0].servers[0]
                .addrs
                .is_empty()
        );
    }

    #[test]
    fn ip_literals_are_not_targets() {
        assert_eq!(Target::of("10.0.0.1:80"), None);
        assert_eq!(Target::of("[::1]:80"), None);
        assert_eq!(
            Target::of("app:80"),
            Some(Target {
                host: "app".into(),
                port: 80
            })
        );
    }
}
