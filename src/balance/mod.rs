//! Balancing strategies. A strategy only chooses among peers; health lives on the peer.
//!
//! Each strategy reproduces nginx's method of the same name (see NGINX-SEMANTICS.md),
//! except `least_time`, which uses ferry's own peak-EWMA (see [`crate::ewma`]).
//! A worker thread builds its own instance with [`from_config`], so the little
//! mutable state a strategy keeps (smooth-WRR current weights, a random seed) is
//! touched by one thread only and lives in uncontended atomics.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use crate::config::{StrategyKind, UpstreamConfig};
use crate::peer::{Hot, Peer, Tried, calm_epoch};

pub mod hash;
pub mod ip_hash;
pub mod ketama;
pub mod key;
pub mod least_conn;
pub mod least_time;
pub mod random;
pub mod round_robin;

pub use hash::Hash;
pub use ip_hash::IpHash;
pub use ketama::Ketama;
pub use key::KeyTemplate;
pub use least_conn::LeastConn;
pub use least_time::LeastTime;
pub use random::Random;
pub use round_robin::{RoundRobin, SmoothWrr};

/// What a strategy may look at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestKey<'a> {
    /// The client's address (ip_hash).
    pub client_ip: IpAddr,
    /// The rendered `hash_key` template (hash); empty for other strategies.
    pub hash_key: &'a [u8],
}

/// Picks one peer for one request. Never blocks; no allocation on the hot path.
/// Returns only a peer that is usable at `now` (see [`Peer::is_usable`]) and not in `tried`.
///
/// Picking commits: the strategy advances its own state (e.g. smooth-WRR weights)
/// and calls [`Peer::on_pick`] on the chosen peer, as nginx's `get_peer` does.
pub trait Strategy: Send + Sync {
    /// The index into `peers` of the chosen peer, or `None` when no peer is usable.
    fn pick(
        &self,
        peers: &[Arc<Peer>],
        key: &RequestKey<'_>,
        tried: &Tried,
        now: u64,
    ) -> Option<usize>;
}

/// Build the strategy an upstream's configuration asks for, over `peers` (one list:
/// primaries or backups). Each worker thread builds its own instance.
pub fn from_config(up: &UpstreamConfig, peers: &[Arc<Peer>]) -> Box<dyn Strategy> {
    match up.strategy {
        StrategyKind::RoundRobin => Box::new(RoundRobin::new(peers)),
        StrategyKind::LeastConn => Box::new(LeastConn::new(peers)),
        StrategyKind::IpHash => Box::new(IpHash::new(peers)),
        StrategyKind::Hash if up.consistent => Box::new(Ketama::new(peers)),
        StrategyKind::Hash => Box::new(Hash::new(peers)),
        StrategyKind::Random => Box::new(Random::new(up.random_two)),
        StrategyKind::LeastTime => Box::new(LeastTime::new(peers)),
    }
}

/// The configuration name of a balancing method (`round_robin`, `least_conn`, ...).
pub fn describe(kind: StrategyKind) -> &'static str {
    match kind {
        StrategyKind::RoundRobin => "round_robin",
        StrategyKind::LeastConn => "least_conn",
        StrategyKind::IpHash => "ip_hash",
        StrategyKind::Hash => "hash",
        StrategyKind::Random => "random",
        StrategyKind::LeastTime => "least_time",
    }
}

/// Whether peer `i` may be chosen for this request: usable now and not yet tried.
#[inline]
pub fn available(peer: &Peer, i: usize, tried: &Tried, now: u64) -> bool {
    !tried.contains(i) && peer.is_usable(now)
}

/// Indices of the peers that may be chosen for this request, in list order.
#[inline]
pub fn candidates<'a>(
    peers: &'a [Arc<Peer>],
    tried: &'a Tried,
    now: u64,
) -> impl Iterator<Item = (usize, &'a Arc<Peer>)> + 'a {
    peers
        .iter()
        .enumerate()
        .filter(move |(i, p)| available(p, *i, tried, now))
}

/// What one strategy instance last found about its peers' calm (see
/// [`Peer::is_calm`]), valid while [`calm_epoch`] stays where it was: one load
/// per pick instead of a look at every peer.
#[derive(Debug)]
pub(crate) struct CalmView {
    /// The epoch `calm` was found at; 0 = never looked.
    epoch: AtomicU64,
    calm: AtomicBool,
}

impl CalmView {
    pub(crate) fn new() -> CalmView {
        CalmView {
            epoch: AtomicU64::new(0),
            calm: AtomicBool::new(false),
        }
    }

    /// True when nothing was tried and every peer is calm, so a strategy may take
    /// its shortcut.
    #[inline]
    pub(crate) fn all_calm(&self, peers: &[Arc<Peer>], tried: &Tried) -> bool {
        if !tried.is_empty() {
            return false;
        }
        let e = calm_epoch();
        if self.epoch.load(Relaxed) == e {
            return self.calm.load(Relaxed);
        }
        let calm = peers.iter().all(|p| p.is_calm());
        self.calm.store(calm, Relaxed);
        self.epoch.store(e, Relaxed);
        calm
    }
}

/// The per-pick state ([`Hot`]) of the peers one strategy instance was built
/// over, read without going through each peer: for the calm shortcuts of
/// `least_conn` and `least_time`. Holds the peers, so their slots stay theirs.
#[derive(Debug)]
pub(crate) struct HotView {
    /// The slots as one slice of their block, when they sit there side by side
    /// in list order (as peers built together do); else empty.
    run: &'static [Hot],
    slots: Box<[&'static Hot]>,
    peers: Box<[Arc<Peer>]>,
}

/// The [`Hot`] slots of a strategy's peers, in list order.
#[derive(Debug, Clone, Copy)]
pub(crate) enum HotSlots<'a> {
    /// Side by side in one block: read without a pointer per peer.
    Run(&'static [Hot]),
    /// Anywhere.
    Scattered(&'a [&'static Hot]),
}

impl HotView {
    pub(crate) fn new(peers: &[Arc<Peer>]) -> HotView {
        let run = peers
            .first()
            .map(|p| p.hot_place())
            .filter(|first| {
                peers.iter().enumerate().all(|(i, p)| {
                    let place = p.hot_place();
                    std::ptr::eq(place.block, first.block) && place.index == first.index + i
                })
            })
            .and_then(|first| first.block.get(first.index..first.index + peers.len()))
            .unwrap_or_default();
        HotView {
            run,
            slots: peers.iter().map(|p| p.hot()).collect(),
            peers: peers.into(),
        }
    }

    /// The slots, in list order, when `peers` is the list this view was built
    /// over (same length, same first and last peer).
    #[inline]
    pub(crate) fn of(&self, peers: &[Arc<Peer>]) -> Option<HotSlots<'_>> {
        let same = |a: Option<&Arc<Peer>>, b: Option<&Arc<Peer>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (a, b) => a.is_none() && b.is_none(),
        };
        if peers.len() != self.peers.len()
            || !same(peers.first(), self.peers.first())
            || !same(peers.last(), self.peers.last())
        {
            return None;
        }
        Some(if self.run.len() == peers.len() && !peers.is_empty() {
            HotSlots::Run(self.run)
        } else {
            HotSlots::Scattered(&self.slots)
        })
    }
}

/// The OR of `f(a[i])` over a slice, four at a time (see [`or_pairs`]).
#[inline(always)]
pub(crate) fn or_all<A>(a: &[A], f: impl Fn(&A) -> u64) -> u64 {
    let (a4, a1) = a.as_chunks::<4>();
    let mut d = [0u64; 4];
    for x in a4 {
        d[0] |= f(&x[0]);
        d[1] |= f(&x[1]);
        d[2] |= f(&x[2]);
        d[3] |= f(&x[3]);
    }
    for x in a1 {
        d[0] |= f(x);
    }
    d[0] | d[1] | d[2] | d[3]
}

/// The OR of `f(a[i], b[i])` over the pairs of two slices (as far as the
/// shorter goes), four pairs at a time into four accumulators: the look of the
/// calm shortcuts over every peer's [`Hot`] slot, whose atomic loads the
/// compiler keeps one by one, so that only the loads remain per peer.
#[inline(always)]
pub(crate) fn or_pairs<A, B>(a: &[A], b: &[B], f: impl Fn(&A, &B) -> u64) -> u64 {
    let n = a.len().min(b.len());
    let (a, b) = (
        a.get(..n).unwrap_or_default(),
        b.get(..n).unwrap_or_default(),
    );
    let ((a4, a1), (b4, b1)) = (a.as_chunks::<4>(), b.as_chunks::<4>());
    let mut d = [0u64; 4];
    for (x, y) in a4.iter().zip(b4) {
        d[0] |= f(&x[0], &y[0]);
        d[1] |= f(&x[1], &y[1]);
        d[2] |= f(&x[2], &y[2]);
        d[3] |= f(&x[3], &y[3]);
    }
    for (x, y) in a1.iter().zip(b1) {
        d[0] |= f(x, y);
    }
    d[0] | d[1] | d[2] | d[3]
}

/// Sum of the configured weights of all peers, usable or not (nginx's `total_weight`).
pub(crate) fn total_weight(peers: &[Arc<Peer>]) -> u64 {
    peers.iter().map(|p| p.weight() as u64).sum()
}

/// nginx's walk for ip_hash and hash: the peer whose weight range holds `w`
/// (`w < total_weight`), skipping nothing.
#[inline]
pub(crate) fn walk_by_weight(peers: &[Arc<Peer>], mut w: u64) -> Option<usize> {
    for (i, p) in peers.iter().enumerate() {
        let weight = p.weight() as u64;
        if w < weight {
            return Some(i);
        }
        w -= weight;
    }
    None
}

/// Mark `i` as picked (nginx: a failed peer past its window becomes the probe).
#[inline]
pub(crate) fn commit(peers: &[Arc<Peer>], i: usize, now: u64) -> Option<usize> {
    peers.get(i)?.on_pick(now);
    Some(i)
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Helpers shared by the strategies' unit tests.

    use super::*;
    use crate::peer::PeerParams;
    use std::time::Duration;

    /// A fixed "now" for tests that do not move time.
    pub const NOW: u64 = 10_000_000;

    pub fn params(name: &str, weight: u32) -> PeerParams {
        PeerParams {
            name: name.to_string(),
            weight,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            max_conns: 0,
            backup: false,
            down: false,
            slow_start: Duration::ZERO,
        }
    }

    pub fn peer_with(name: &str, addr: &str, weight: u32) -> Arc<Peer> {
        Arc::new(Peer::new(addr.parse().unwrap(), params(name, weight)))
    }

    pub fn peer_params(p: PeerParams) -> Arc<Peer> {
        Arc::new(Peer::new(p.name.parse().unwrap(), p))
    }

    /// Peers named `10.0.0.<i+1>:80` with these weights.
    pub fn peers(weights: &[u32]) -> Vec<Arc<Peer>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let name = format!("10.0.0.{}:80", i + 1);
                peer_with(&name, &name, w)
            })
            .collect()
    }

    /// The peer picked for each of the keys `key0`..`key{n-1}`, one digit each
    /// (the form the recorded nginx runs are written in).
    pub fn picks_for_keys(s: &dyn Strategy, ps: &[Arc<Peer>], n: usize) -> String {
        (0..n)
            .map(|k| {
                let key = format!("key{k}");
                let i = s.pick(ps, &hkey(key.as_bytes()), &Tried::new(), NOW);
                char::from(b'0' + i.expect("a peer") as u8)
            })
            .collect()
    }

    /// Peers named `127.0.0.1:1900<i+1>`, as in the nginx runs the tests recorded.
    pub fn nginx_peers(weights: &[u32]) -> Vec<Arc<Peer>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let name = format!("127.0.0.1:1900{}", i + 1);
                peer_with(&name, &name, w)
            })
            .collect()
    }

    pub fn key(ip: &str) -> RequestKey<'static> {
        RequestKey {
            client_ip: ip.parse().unwrap(),
            hash_key: b"",
        }
    }

    pub fn hkey(k: &[u8]) -> RequestKey<'_> {
        RequestKey {
            client_ip: "192.0.2.1".parse().unwrap(),
            hash_key: k,
        }
    }

    /// `n` picks with no peer tried, as indices.
    pub fn picks(s: &dyn Strategy, peers: &[Arc<Peer>], n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| {
                s.pick(peers, &key("192.0.2.1"), &Tried::new(), NOW)
                    .unwrap()
            })
            .collect()
    }

    /// Checks the availability rules every strategy must obey: a peer that is down,
    /// failed, at max_conns, draining, unhealthy or already tried is never returned,
    /// and `None` comes back when no peer is usable.
    pub fn check_skips_unusable(make: impl Fn(&[Arc<Peer>]) -> Box<dyn Strategy>) {
        const N: usize = 6;
        let build = || -> Vec<Arc<Peer>> {
            (0..N)
                .map(|i| {
                    let name = format!("10.0.1.{}:80", i + 1);
                    let mut p = params(&name, 1);
                    if i == 2 {
                        p.max_conns = 1;
                    }
                    peer_params(p)
                })
                .collect()
        };
        let keys: Vec<(String, Vec<u8>)> = (0..200)
            .map(|k| {
                (
                    format!("10.{}.{}.7", k % 256, k / 3),
                    format!("key-{k}").into_bytes(),
                )
            })
            .collect();
        let pick_all = |s: &dyn Strategy, peers: &[Arc<Peer>], tried: &Tried| {
            keys.iter()
                .map(|(ip, hk)| {
                    let k = RequestKey {
                        client_ip: ip.parse().unwrap(),
                        hash_key: hk,
                    };
                    s.pick(peers, &k, tried, NOW)
                })
                .collect::<Vec<_>>()
        };
        // Each condition alone: that peer is never chosen, the others still are.
        for bad in 0..N {
            let peers = build();
            let mut tried = Tried::new();
            let _guard;
            match bad {
                0 => peers[0].set_down(true),
                1 => {
                    peers[1].record_failure(NOW);
                }
                2 => _guard = peers[2].start_request(),
                3 => peers[3].set_draining(true),
                4 => {
                    peers[4].set_healthy(false);
                }
                _ => tried.insert(5),
            }
            let s = make(&peers);
            let got = pick_all(&*s, &peers, &tried);
            assert!(got.iter().all(|g| g.is_some()), "condition {bad}: {got:?}");
            assert!(
                !got.contains(&Some(bad)),
                "condition {bad}: picked the bad peer"
            );
        }
        // All at once, except one peer: always that one.
        let peers = build();
        peers[0].set_down(true);
        peers[1].record_failure(NOW);
        let _guard = peers[2].start_request();
        peers[3].set_draining(true);
        peers[4].set_healthy(false);
        let s = make(&peers);
        let got = pick_all(&*s, &peers, &Tried::new());
        assert!(got.iter().all(|g| *g == Some(5)), "{got:?}");
        // ...and that one tried too: nothing.
        let mut tried = Tried::new();
        tried.insert(5);
        let got = pick_all(&*s, &peers, &tried);
        assert!(got.iter().all(|g| g.is_none()), "{got:?}");
        // Empty list: nothing.
        let s = make(&[]);
        assert!(
            pick_all(&*s, &[], &Tried::new())
                .iter()
                .all(|g| g.is_none())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NextUpstream;
    use std::time::Duration;
    use testutil::*;

    fn upstream(strategy: StrategyKind, consistent: bool) -> UpstreamConfig {
        UpstreamConfig {
            name: "u".into(),
            strategy,
            hash_key: Some("$remote_addr".into()),
            consistent,
            random_two: false,
            keepalive: 0,
            keepalive_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            next_upstream: NextUpstream::default(),
            next_upstream_tries: 0,
            next_upstream_timeout: Duration::ZERO,
            retry_buffer: 64 * 1024,
            queue: 0,
            queue_timeout: Duration::from_secs(60),
            scheme: crate::config::UpstreamScheme::Http,
            tls: None,
            servers: Vec::new(),
            health_check: None,
        }
    }

    #[test]
    fn from_config_builds_each_kind() {
        let ps = peers(&[5, 1, 1]);
        // round_robin gives nginx's sequence.
        let rr = from_config(&upstream(StrategyKind::RoundRobin, false), &ps);
        assert_eq!(picks(&*rr, &ps, 7), [0, 0, 1, 0, 2, 0, 0]);
        // ip_hash: 127.0.0.1 is sticky.
        let ps3 = peers(&[1, 1, 1]);
        let ih = from_config(&upstream(StrategyKind::IpHash, false), &ps3);
        let k = key("127.0.0.1");
        assert_eq!(ih.pick(&ps3, &k, &Tried::new(), NOW), Some(2));
        // hash and hash consistent: sticky per key.
        for consistent in [false, true] {
            let h = from_config(&upstream(StrategyKind::Hash, consistent), &ps3);
            let a = h.pick(&ps3, &hkey(b"abc"), &Tried::new(), NOW);
            assert!(a.is_some());
            for _ in 0..10 {
                assert_eq!(h.pick(&ps3, &hkey(b"abc"), &Tried::new(), NOW), a);
            }
        }
        for kind in [
            StrategyKind::LeastConn,
            StrategyKind::Random,
            StrategyKind::LeastTime,
        ] {
            let s = from_config(&upstream(kind, false), &ps3);
            assert!(s.pick(&ps3, &k, &Tried::new(), NOW).is_some());
        }
    }

    #[test]
    fn describe_names_match_config() {
        assert_eq!(describe(StrategyKind::RoundRobin), "round_robin");
        assert_eq!(describe(StrategyKind::LeastTime), "least_time");
        assert_eq!(describe(StrategyKind::IpHash), "ip_hash");
    }

    #[test]
    fn walk_by_weight_follows_ranges() {
        let ps = peers(&[2, 1, 3]);
        let got: Vec<_> = (0..6).map(|w| walk_by_weight(&ps, w)).collect();
        assert_eq!(got, [Some(0), Some(0), Some(1), Some(2), Some(2), Some(2)]);
        assert_eq!(walk_by_weight(&ps, 6), None);
        assert_eq!(total_weight(&ps), 6);
    }
}

#[cfg(test)]
mod calm_tests {
    use super::testutil::*;
    use super::*;
    use crate::peer::InFlight;

    /// The calm shortcut gives the same picks as the full rules: the same
    /// strategy built twice over the same peers, one always taking the full path
    /// (a `tried` set naming only an index past the end forces it without
    /// excluding anyone), under random weights and in-flight counts.
    ///
    /// Run twice: over peers whose [`Hot`] slots sit side by side in list order
    /// ([`HotSlots::Run`]), and over the same peers listed backwards
    /// ([`HotSlots::Scattered`]).
    fn same_as_full_rules(make: fn(&[Arc<Peer>]) -> Box<dyn Strategy>) {
        for scattered in [false, true] {
            same_as_full_rules_over(make, scattered);
        }
    }

    fn same_as_full_rules_over(make: fn(&[Arc<Peer>]) -> Box<dyn Strategy>, scattered: bool) {
        let mut rng = fastrand::Rng::with_seed(7);
        for n in [1usize, 2, 3, 7, 64] {
            let weights: Vec<u32> = (0..n).map(|_| rng.u32(1..=5)).collect();
            let mut ps = peers_in_a_run(&weights);
            if scattered {
                ps.reverse();
            }
            let run = matches!(HotView::new(&ps).of(&ps), Some(HotSlots::Run(_)));
            assert_eq!(run, !scattered || n == 1, "{n} peers");
            let (fast, full) = (make(&ps), make(&ps));
            let mut force = Tried::new();
            force.insert(1000);
            let mut held: Vec<InFlight> = Vec::new();
            for round in 0..2_000 {
                if rng.u8(..4) == 0 {
                    held.push(ps[rng.usize(..n)].start_request());
                }
                if rng.u8(..4) == 0 && !held.is_empty() {
                    held.swap_remove(rng.usize(..held.len()));
                }
                if rng.u8(..3) == 0 {
                    let ms = std::time::Duration::from_micros(rng.u64(200..30_000));
                    ps[rng.usize(..n)]
                        .latency
                        .record(ms, NOW - rng.u64(0..5_000));
                }
                assert!(ps.iter().all(|p| p.is_calm()));
                let a = fast.pick(&ps, &key("192.0.2.1"), &Tried::new(), NOW);
                let b = full.pick(&ps, &key("192.0.2.1"), &force, NOW);
                assert_eq!(a, b, "{n} peers, round {round}, weights {weights:?}");
            }
        }
    }

    /// Peers with these weights whose slots sit side by side in list order.
    /// Slots freed by other tests leave holes, and tests running alongside take
    /// slots too: the attempts that got no run are kept until one does, so
    /// that they fill the holes.
    fn peers_in_a_run(weights: &[u32]) -> Vec<Arc<Peer>> {
        // The tests here that call this run side by side: one at a time.
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut misses = Vec::new();
        for _ in 0..1000 {
            let ps = peers(weights);
            if ps.is_empty() || matches!(HotView::new(&ps).of(&ps), Some(HotSlots::Run(_))) {
                return ps;
            }
            misses.push(ps);
        }
        panic!("no run of {} slots", weights.len());
    }

    #[test]
    fn hot_view_reads_a_run_of_slots_as_one_slice() {
        let ps = peers_in_a_run(&[1; 64]);
        let view = HotView::new(&ps);
        let Some(HotSlots::Run(run)) = view.of(&ps) else {
            panic!("not a run");
        };
        assert_eq!(run.len(), 64);
        for (slot, p) in run.iter().zip(&ps) {
            assert!(std::ptr::eq(slot, p.hot()));
        }
        // Another list of the same length: no view.
        let other = peers(&[1; 64]);
        assert!(view.of(&other).is_none());
        assert!(view.of(&ps[..63]).is_none());
        // Listed in another order: one pointer per peer, still theirs.
        let mut shuffled = ps.clone();
        shuffled.swap(10, 20);
        let view = HotView::new(&shuffled);
        let Some(HotSlots::Scattered(slots)) = view.of(&shuffled) else {
            panic!("a run");
        };
        for (slot, p) in slots.iter().zip(&shuffled) {
            assert!(std::ptr::eq(*slot, p.hot()));
        }
        assert!(HotView::new(&[]).of(&[]).is_some());
    }

    #[test]
    fn round_robin_shortcut_matches_full_rules() {
        same_as_full_rules(|ps| Box::new(RoundRobin::new(ps)));
    }

    #[test]
    fn least_conn_shortcut_matches_full_rules() {
        same_as_full_rules(|ps| Box::new(LeastConn::new(ps)));
    }

    #[test]
    fn least_time_shortcut_matches_full_rules() {
        same_as_full_rules(|ps| Box::new(LeastTime::new(ps)));
    }

    #[test]
    fn a_failure_ends_the_shortcut_and_recovery_restores_it() {
        let ps = peers(&[1, 1, 1]);
        let rr = RoundRobin::new(&ps);
        assert_eq!(picks(&rr, &ps, 3), [0, 1, 2]);
        // Peer 1 fails (max_fails = 1): the next picks skip it.
        ps[1].record_failure(NOW);
        assert!(!ps[1].is_calm());
        assert_eq!(picks(&rr, &ps, 4), [0, 2, 0, 2]);
        // After fail_timeout it is picked again (the probe) and its success
        // forgets the failure.
        let later = NOW + 10_001;
        let got: Vec<usize> = (0..3)
            .map(|_| {
                rr.pick(&ps, &key("192.0.2.1"), &Tried::new(), later)
                    .unwrap()
            })
            .collect();
        assert!(got.contains(&1), "{got:?}");
        ps[1].record_success();
        assert_eq!(ps[1].fails(), 0);
    }

    #[test]
    fn a_failure_below_max_fails_is_forgiven_after_fail_timeout() {
        let mut p = params("10.0.0.1:80", 1);
        p.max_fails = 3;
        let a = peer_params(p);
        a.record_failure(NOW);
        a.record_success();
        // Still inside the window: nginx keeps counting.
        assert_eq!(a.fails(), 1);
        // Picked after fail_timeout, the success is a probe's and resets it.
        a.on_pick(NOW + 10_001);
        a.record_success();
        assert_eq!(a.fails(), 0);
    }
}
