//! The running configuration: an immutable snapshot of routes, upstreams and peers.
//!
//! A reload builds a new [`Runtime`] and swaps it in; peers are carried over by
//! (upstream name, address) so their state survives, and requests already in
//! flight finish on the snapshot they started with.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::balance::{self, KeyTemplate, Strategy};
use crate::config::{Config, HostMatch, UpstreamConfig};
use crate::metrics::Metrics;
use crate::peer::{Peer, PeerParams};

/// Counters of one upstream that survive reloads (keyed by name).
#[derive(Debug, Default)]
pub struct UpstreamStats {
    /// Requests retried on another attempt.
    pub retries: AtomicU64,
    /// Requests answered 502 because no peer was usable.
    pub no_peer: AtomicU64,
    /// Responses ferry generated itself (no peer answered), by status.
    pub local_502: AtomicU64,
    /// See `local_502`.
    pub local_504: AtomicU64,
    /// Answered 503 because the `max_conns` queue was full or the wait timed out.
    pub local_503: AtomicU64,
    /// Requests waiting for a peer under `max_conns`.
    pub queued: AtomicU64,
    /// Woken when a slot on a `max_conns` peer frees up.
    pub slot_freed: Arc<tokio::sync::Notify>,
}

/// The balancers one worker uses for one upstream.
pub struct Balancers {
    /// Over the primary peers.
    pub primary: Box<dyn Strategy>,
    /// Over the backup peers (empty list when none).
    pub backup: Box<dyn Strategy>,
}

/// One upstream group.
pub struct Upstream {
    /// Its configuration.
    pub cfg: UpstreamConfig,
    /// Primary peers.
    pub primary: Vec<Arc<Peer>>,
    /// Backup peers, used only when no primary is usable.
    pub backup: Vec<Arc<Peer>>,
    /// One set of balancers per worker (index = worker id).
    pub balancers: Vec<Balancers>,
    /// Compiled `hash_key`.
    pub hash_key: Option<KeyTemplate>,
    /// Counters that survive reloads.
    pub stats: Arc<UpstreamStats>,
    /// `ferry_http_request_duration_seconds{upstream}`, resolved once; `None` with
    /// `[admin] metrics = false`.
    pub request_hist: Option<prometheus::Histogram>,
    /// `ferry_upstream_header_time_seconds{upstream,peer}` per peer, in
    /// [`Upstream::peers`] order (empty with `[admin] metrics = false`).
    pub header_hists: Vec<prometheus::Histogram>,
}

impl Upstream {
    /// The balancers of worker `w` (falls back to the first set).
    #[inline]
    pub fn balancers(&self, w: usize) -> &Balancers {
        &self.balancers[w.min(self.balancers.len() - 1)]
    }

    /// All peers, primaries first.
    pub fn peers(&self) -> impl Iterator<Item = &Arc<Peer>> {
        self.primary.iter().chain(self.backup.iter())
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.cfg.name)
            .field("primary", &self.primary.len())
            .field("backup", &self.backup.len())
            .finish()
    }
}

/// One route, compiled.
#[derive(Debug, Clone)]
struct Route {
    host: HostMatch,
    path: String,
    upstream: usize,
}

/// Host + longest-prefix router.
#[derive(Debug, Clone)]
pub struct Router {
    /// Sorted: exact hosts, then suffixes (longest first), then `*`; inside each
    /// host, longer paths first.
    routes: Vec<Route>,
    /// The only route is `*` `/`: skip matching.
    catch_all: Option<usize>,
}

impl Router {
    fn new(cfg: &Config) -> Router {
        let mut routes: Vec<Route> = cfg
            .routes
            .iter()
            .map(|r| Route {
                host: r.host.clone(),
                path: r.path.clone(),
                upstream: r.upstream,
            })
            .collect();
        let rank = |h: &HostMatch| match h {
            HostMatch::Exact(_) => (0, 0),
            HostMatch::Suffix(s) => (1, usize::MAX - s.len()),
            HostMatch::Any => (2, 0),
        };
        routes.sort_by(|a, b| {
            rank(&a.host)
                .cmp(&rank(&b.host))
                .then(b.path.len().cmp(&a.path.len()))
        });
        let catch_all = match routes.as_slice() {
            [r] if r.host == HostMatch::Any && r.path == "/" => Some(r.upstream),
            _ => None,
        };
        Router { routes, catch_all }
    }

    /// The upstream every request goes to, when the routes send all of them
    /// to one.
    pub fn catch_all(&self) -> Option<usize> {
        self.catch_all
    }

    /// The upstream index for a host (without port, any case) and path.
    pub fn route(&self, host: &str, path: &str) -> Option<usize> {
        if let Some(u) = self.catch_all {
            return Some(u);
        }
        let host_matches = |m: &HostMatch| match m {
            HostMatch::Any => true,
            HostMatch::Exact(h) => h.eq_ignore_ascii_case(host),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host.is_char_boundary(host.len() - s.len())
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        };
        // Most specific host class that has a route for this path wins; inside it,
        // the longest prefix.
        self.routes
            .iter()
            .find(|r| host_matches(&r.host) && path.starts_with(r.path.as_str()))
            .map(|r| r.upstream)
    }
}

/// An immutable running configuration.
pub struct Runtime {
    /// The configuration it was built from.
    pub config: Arc<Config>,
    /// Upstreams, in config order (route indices point here).
    pub upstreams: Vec<Arc<Upstream>>,
    /// The router.
    pub router: Router,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("upstreams", &self.upstreams)
            .finish()
    }
}

/// Whether connections made for upstream `a` may serve upstream `b`: same
/// scheme and TLS settings (the files behind them are read again at reload;
/// pooled connections made with the old ones finish their keep-alive life).
fn same_transport(a: &UpstreamConfig, b: &UpstreamConfig) -> bool {
    let tls = |u: &UpstreamConfig| {
        u.tls.as_ref().map(|t| {
            (
                t.verify,
                t.ca_file.as_ref().map(|f| f.path.clone()),
                t.server_name.clone(),
            )
        })
    };
    a.scheme == b.scheme && tls(a) == tls(b)
}

fn peer_params(s: &crate::config::ServerEntry, single: bool) -> PeerParams {
    PeerParams {
        name: s.addr.clone(),
        weight: s.weight.max(1),
        // nginx never marks the only peer of an upstream as failed.
        max_fails: if single { 0 } else { s.max_fails },
        fail_timeout: s.fail_timeout,
        max_conns: s.max_conns,
        backup: s.backup,
        down: s.down,
        slow_start: s.slow_start,
    }
}

impl Runtime {
    /// Build a snapshot for `workers` workers, re-using peers (and their state) from
    /// `previous` where (upstream name, address, parameters) still match.
    pub fn build(
        config: Arc<Config>,
        workers: usize,
        previous: Option<&Runtime>,
        metrics: &Metrics,
    ) -> Runtime {
        let mut old_peers: HashMap<(&str, std::net::SocketAddr), (&Arc<Peer>, &UpstreamConfig)> =
            HashMap::new();
        let mut old_stats: HashMap<&str, &Arc<UpstreamStats>> = HashMap::new();
        if let Some(prev) = previous {
            for u in &prev.upstreams {
                old_stats.insert(u.cfg.name.as_str(), &u.stats);
                for p in u.peers() {
                    old_peers.insert((u.cfg.name.as_str(), p.addr), (p, &u.cfg));
                }
            }
        }
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                let n_addrs: usize = u.servers.iter().map(|s| s.addrs.len()).sum();
                let single = n_addrs == 1;
                let (mut primary, mut backup) = (Vec::new(), Vec::new());
                for s in &u.servers {
                    let params = peer_params(s, single);
                    for addr in &s.addrs {
                        let peer = match old_peers.get(&(u.name.as_str(), *addr)) {
                            Some((p, was)) if p.params == params && same_transport(was, u) => {
                                Arc::clone(p)
                            }
                            Some((old, _)) => {
                                // Same address, new parameters: fresh counters, but
                                // drain/down and the health verdict carry over.
                                let p = Arc::new(Peer::new(*addr, params.clone()));
                                p.inherit(old);
                                p
                            }
                            None => {
                                let p = Arc::new(Peer::new(*addr, params.clone()));
                                // Mandatory checks: a new peer waits for its first pass.
                                if u.health_check.as_ref().is_some_and(|h| h.mandatory) {
                                    p.set_healthy(false);
                                }
                                p
                            }
                        };
                        if u.health_check.is_none() {
                            // No active checks (any more): nothing may hold it out.
                            peer.set_healthy(true);
                        }
                        if s.backup {
                            backup.push(peer);
                        } else {
                            primary.push(peer);
                        }
                    }
                }
                let balancers = (0..workers.max(1))
                    .map(|_| Balancers {
                        primary: balance::from_config(u, &primary),
                        backup: balance::from_config(u, &backup),
                    })
                    .collect();
                let hash_key = u
                    .hash_key
                    .as_deref()
                    .and_then(|k| KeyTemplate::parse(k).ok());
                let stats: Arc<UpstreamStats> = old_stats
                    .get(u.name.as_str())
                    .map(|s| Arc::clone(s))
                    .unwrap_or_default();
                for p in primary.iter().chain(backup.iter()) {
                    p.notify_on_release(Arc::clone(&stats.slot_freed));
                    if previous.is_some() && !old_peers.contains_key(&(u.name.as_str(), p.addr)) {
                        // A peer that joins a running ferry ramps up (slow_start).
                        p.start_ramp();
                    }
                }
                let observe = config.admin.metrics;
                let request_hist = observe.then(|| {
                    metrics
                        .request_duration
                        .with_label_values(&[u.name.as_str()])
                });
                let header_hists = primary
                    .iter()
                    .chain(backup.iter())
                    .filter(|_| observe)
                    .map(|p| {
                        metrics
                            .header_time
                            .with_label_values(&[u.name.as_str(), &*p.addr_str])
                    })
                    .collect();
                Arc::new(Upstream {
                    request_hist,
                    header_hists,
                    cfg: u.clone(),
                    primary,
                    backup,
                    balancers,
                    hash_key,
                    stats,
                })
            })
            .collect();
        Runtime {
            router: Router::new(&config),
            config,
            upstreams,
        }
    }

    /// Upstream by name.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.cfg.name == name)
    }
}

/// Reset nginx-style failure counters (used when no peer at all is usable).
pub fn reset_all_fails(up: &Upstream) {
    for p in up.peers() {
        p.reset_fails();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &[(HostMatch, &str, usize)]) -> Router {
        let mut r = Router {
            routes: routes
                .iter()
                .map(|(h, p, u)| Route {
                    host: h.clone(),
                    path: p.to_string(),
                    upstream: *u,
                })
                .collect(),
            catch_all: None,
        };
        let rank = |h: &HostMatch| match h {
            HostMatch::Exact(_) => (0, 0),
            HostMatch::Suffix(s) => (1, usize::MAX - s.len()),
            HostMatch::Any => (2, 0),
        };
        r.routes.sort_by(|a, b| {
            rank(&a.host)
                .cmp(&rank(&b.host))
                .then(b.path.len().cmp(&a.path.len()))
        });
        r
    }

    #[test]
    fn routes_by_host_then_longest_prefix() {
        let r = router(&[
            (HostMatch::Any, "/", 0),
            (HostMatch::Any, "/api/", 1),
            (HostMatch::Exact("shop.example.com".into()), "/", 2),
            (HostMatch::Suffix(".example.com".into()), "/", 3),
            (HostMatch::Suffix(".example.com".into()), "/static/", 4),
        ]);
        assert_eq!(r.route("other.org", "/x"), Some(0));
        assert_eq!(r.route("other.org", "/api/v1"), Some(1));
        assert_eq!(r.route("SHOP.example.com", "/api/v1"), Some(2));
        assert_eq!(r.route("www.example.com", "/"), Some(3));
        assert_eq!(r.route("www.example.com", "/static/a.css"), Some(4));
        // The suffix needs something before the dot.
        assert_eq!(r.route("example.com", "/"), Some(0));
    }

    #[test]
    fn no_route_is_none() {
        let r = router(&[(HostMatch::Exact("a.test".into()), "/app", 0)]);
        assert_eq!(r.route("a.test", "/other"), None);
        assert_eq!(r.route("b.test", "/app"), None);
        assert_eq!(r.route("a.test", "/app/x"), Some(0));
    }
}
