//! A peer (one upstream server address) and its live state.
//!
//! Everything that changes while ferry runs lives here in atomics, so that a
//! reload can carry an `Arc<Peer>` over to the new configuration and keep its
//! counters, failure bookkeeping and latency estimate. Strategies read this state
//! to skip unusable peers; they never own health themselves.

use std::net::SocketAddr;
use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU32, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use crate::ewma::Ewma;

/// The process's clock base: one hour before the first reading, so that a zero
/// timestamp always means "long ago". Uses tokio's clock so that paused-time
/// tests drive it.
fn clock_base() -> tokio::time::Instant {
    static BASE: OnceLock<tokio::time::Instant> = OnceLock::new();
    *BASE.get_or_init(|| {
        tokio::time::Instant::now()
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or_else(tokio::time::Instant::now)
    })
}

/// Milliseconds since the process's clock base.
pub fn now_ms() -> u64 {
    tokio::time::Instant::now()
        .saturating_duration_since(clock_base())
        .as_millis() as u64
}

/// What [`now_ms`] read, or would have read, at `t`.
pub fn ms_at(t: tokio::time::Instant) -> u64 {
    t.saturating_duration_since(clock_base()).as_millis() as u64
}

/// The instant [`now_ms`] reads as `ms`, for arming a timer at such a time.
pub fn instant_at_ms(ms: u64) -> tokio::time::Instant {
    clock_base() + Duration::from_millis(ms)
}

/// Static parameters of a peer, from its `[[upstream.server]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerParams {
    /// The configured name, `host:port` as written in the file.
    pub name: String,
    /// Weight for weighted strategies (>= 1).
    pub weight: u32,
    /// Failed attempts within `fail_timeout` that make the peer unavailable; 0 disables.
    pub max_fails: u32,
    /// Window for counting failures and time a failed peer stays out.
    pub fail_timeout: Duration,
    /// Most requests in flight at once; 0 = unlimited.
    pub max_conns: u32,
    /// A backup peer, used only when no primary peer is usable.
    pub backup: bool,
    /// Marked `down` in the configuration.
    pub down: bool,
    /// Ramp-up time after recovering or joining; zero = none.
    pub slow_start: Duration,
}

/// One upstream server address and its live state.
#[derive(Debug)]
pub struct Peer {
    /// Unique for the life of the process; keys per-worker connection pools.
    pub id: usize,
    /// The socket address connected to.
    pub addr: SocketAddr,
    /// `addr` formatted once, for logs, metrics and headers.
    pub addr_str: std::sync::Arc<str>,
    /// Static parameters.
    pub params: PeerParams,
    /// Requests in flight and the latency estimate, in a slot of a shared block.
    hot: &'static Hot,
    /// Where `hot` sits.
    hot_place: HotPlace,
    fails: AtomicU32,
    /// ms timestamps (see [`now_ms`]) of the last failure / last probe window start.
    accessed: AtomicU64,
    checked: AtomicU64,
    /// nginx's effective weight: lowered on failure, climbs back by one per pick.
    effective_weight: AtomicI64,
    /// Set by the runtime API or configuration; a down peer is never picked.
    admin_down: AtomicBool,
    /// Draining: no new requests, in-flight ones finish.
    draining: AtomicBool,
    /// Active health-check verdict (true until a check says otherwise).
    healthy: AtomicBool,
    /// Requests completed (any outcome) through this peer.
    requests: AtomicU64,
    /// Response-time estimate used by `least_time` (the one in `hot`).
    pub latency: Latency,
    /// Counters exported as metrics.
    pub stats: PeerStats,
    /// Idle pooled connections to this peer, across all workers.
    pub idle_conns: AtomicU32,
    /// When a slow-start ramp began (ms, [`now_ms`]); 0 = not ramping.
    ramp_start: AtomicU64,
    /// Picks offered while ramping (spreads admissions evenly).
    ramp_offers: AtomicU64,
    /// Woken when an in-flight slot frees up (requests queued for `max_conns`).
    release: std::sync::OnceLock<std::sync::Arc<tokio::sync::Notify>>,
}

/// Why an attempt to a peer failed (the `reason` label of `ferry_upstream_fails_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// TCP connect refused, reset or unreachable.
    Connect,
    /// Connect, header or body read timed out.
    Timeout,
    /// The connection failed while sending or receiving.
    Error,
    /// The response could not be parsed.
    InvalidHeader,
    /// A status listed in `next_upstream` (500, 502, 503, 504, 429 ...).
    Status,
}

impl FailReason {
    /// All reasons, in label order.
    pub const ALL: [FailReason; 5] = [
        FailReason::Connect,
        FailReason::Timeout,
        FailReason::Error,
        FailReason::InvalidHeader,
        FailReason::Status,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::Connect => "connect",
            FailReason::Timeout => "timeout",
            FailReason::Error => "error",
            FailReason::InvalidHeader => "invalid_header",
            FailReason::Status => "http_status",
        }
    }
}

/// Per-peer counters, read at scrape time (no label lookups on the request path).
#[derive(Debug)]
pub struct PeerStats {
    /// New TCP connections opened to the peer.
    pub connects: AtomicU64,
    /// Responses by status code (index = code - 100, codes 100..=599).
    codes: Box<[AtomicU64]>,
    /// Failed attempts by reason (index = position in [`FailReason::ALL`]).
    fails: [AtomicU64; 5],
}

impl Default for PeerStats {
    fn default() -> Self {
        PeerStats {
            connects: AtomicU64::new(0),
            codes: (100..600).map(|_| AtomicU64::new(0)).collect(),
            fails: Default::default(),
        }
    }
}

impl PeerStats {
    /// Count one response with this status.
    #[inline]
    pub fn count_status(&self, code: u16) {
        if let Some(c) = code
            .checked_sub(100)
            .and_then(|i| self.codes.get(usize::from(i)))
        {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Non-zero status counters as (code, count).
    pub fn statuses(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.codes.iter().enumerate().filter_map(|(i, c)| {
            let n = c.load(Relaxed);
            (n > 0).then_some((i as u16 + 100, n))
        })
    }

    /// Count one failed attempt.
    pub fn count_fail(&self, reason: FailReason) {
        self.fails[reason as usize].fetch_add(1, Relaxed);
    }

    /// Failed attempts for one reason.
    pub fn fails(&self, reason: FailReason) -> u64 {
        self.fails[reason as usize].load(Relaxed)
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// What strategies read of a peer on every pick: requests in flight and the
/// response-time estimate. Peers take these slots from blocks of [`HOT_BLOCK`]
/// side by side (4 KiB each), so a pick over many peers reads a few
/// adjacent cache lines instead of a region per peer.
#[derive(Debug, Default)]
#[repr(align(16))]
pub struct Hot {
    /// Response-time estimate used by `least_time`.
    pub latency: Ewma,
    /// Low 32 bits: requests in flight. High 32 bits: response times recorded
    /// in `latency` (wrapping). One word, so that a strategy can tell with one
    /// read per peer that neither moved since it last looked.
    moves: AtomicU64,
}

impl Hot {
    /// Requests currently in flight to the peer.
    #[inline]
    pub fn in_flight(&self) -> u32 {
        self.moves.load(Relaxed) as u32
    }

    /// The in-flight count and the count of recorded response times, in one
    /// word: when it reads the same twice, neither changed in between. A read
    /// that sees a recorded time counted sees that time in `latency` too.
    #[inline]
    pub fn moves(&self) -> u64 {
        self.moves.load(Acquire)
    }
}

/// A peer's response-time estimate (in its [`Hot`] slot): reads as the
/// [`Ewma`]; recording a time also counts it in [`Hot::moves`].
#[derive(Debug, Clone, Copy)]
pub struct Latency(&'static Hot);

impl Latency {
    /// Record one response time (see [`Ewma::record`]).
    pub fn record(&self, sample: Duration, now_ms: u64) {
        self.0.latency.record(sample, now_ms);
        self.0.moves.fetch_add(1 << 32, Release);
    }
}

impl std::ops::Deref for Latency {
    type Target = Ewma;

    fn deref(&self) -> &Ewma {
        &self.0.latency
    }
}

/// Slots per block of [`Hot`].
const HOT_BLOCK: usize = 4096 / std::mem::size_of::<Hot>();

/// Where a peer's [`Hot`] slot sits: its block and its index in it.
#[derive(Debug, Clone, Copy)]
pub struct HotPlace {
    /// The block the slot belongs to.
    pub block: &'static [Hot],
    /// The block's number (blocks are numbered in the order they were made).
    number: usize,
    /// The slot's index in `block`.
    pub index: usize,
}

/// Free [`Hot`] slots, and how many blocks were made. Blocks are allocated once
/// and kept for the life of the process; a dropped peer gives its slot back.
/// The list stays ordered so that the next slot taken is the lowest free one
/// (first block, then first index): peers built together (one upstream) sit
/// side by side and in order, also in slots freed by peers dropped at a reload.
static FREE_HOT: Mutex<(Vec<HotPlace>, usize)> = Mutex::new((Vec::new(), 0));

/// A cleared slot for a new peer, and where it sits.
fn take_hot() -> (&'static Hot, HotPlace) {
    let mut guard = FREE_HOT.lock().unwrap_or_else(PoisonError::into_inner);
    let (free, blocks) = &mut *guard;
    if free.is_empty() {
        let block: &'static [Hot] = Box::leak((0..HOT_BLOCK).map(|_| Hot::default()).collect());
        let number = *blocks;
        *blocks += 1;
        // Taken from the end: the block's slots go out in address order.
        free.extend((0..block.len()).rev().map(|index| HotPlace {
            block,
            number,
            index,
        }));
    }
    let taken = free
        .pop()
        .and_then(|place| Some((place.block.get(place.index)?, place)));
    drop(guard);
    let (hot, place) = taken.unwrap_or_else(|| {
        // Not reached (a block was just added); a slot of its own.
        let block: &'static [Hot; 1] = Box::leak(Box::new([Hot::default()]));
        let [hot] = block;
        let place = HotPlace {
            block,
            number: usize::MAX,
            index: 0,
        };
        (hot, place)
    });
    hot.moves.store(0, Relaxed);
    hot.latency.reset();
    (hot, place)
}

/// Give a dropped peer's slot back, keeping the free list ordered (highest first).
fn give_hot(place: HotPlace) {
    let mut guard = FREE_HOT.lock().unwrap_or_else(PoisonError::into_inner);
    let free = &mut guard.0;
    let key = |p: &HotPlace| (p.number, p.index);
    let at = free.partition_point(|p| key(p) > key(&place));
    free.insert(at, place);
}

/// Moves on whenever any peer may have become, or stopped being, calm (see
/// [`Peer::is_calm`]), so a strategy can tell in one load whether what it last
/// saw about its peers still holds.
static CALM_EPOCH: AtomicU64 = AtomicU64::new(1);

/// The current calm epoch (see [`Peer::is_calm`]).
#[inline]
pub fn calm_epoch() -> u64 {
    CALM_EPOCH.load(Acquire)
}

/// A peer's calm may have changed: strategies look at their peers again.
#[inline]
fn disturb() {
    CALM_EPOCH.fetch_add(1, Release);
}

impl Peer {
    /// A new peer with fresh state.
    pub fn new(addr: SocketAddr, params: PeerParams) -> Peer {
        let weight = i64::from(params.weight.max(1));
        let down = params.down;
        let (hot, hot_place) = take_hot();
        Peer {
            id: NEXT_ID.fetch_add(1, Relaxed) as usize,
            addr,
            addr_str: addr.to_string().into(),
            params,
            hot,
            hot_place,
            fails: AtomicU32::new(0),
            accessed: AtomicU64::new(0),
            checked: AtomicU64::new(0),
            effective_weight: AtomicI64::new(weight),
            admin_down: AtomicBool::new(down),
            draining: AtomicBool::new(false),
            healthy: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            latency: Latency(hot),
            stats: PeerStats::default(),
            idle_conns: AtomicU32::new(0),
            ramp_start: AtomicU64::new(0),
            ramp_offers: AtomicU64::new(0),
            release: std::sync::OnceLock::new(),
        }
    }

    /// Configured weight (>= 1).
    #[inline]
    pub fn weight(&self) -> i64 {
        i64::from(self.params.weight.max(1))
    }

    /// Requests currently in flight to this peer.
    #[inline]
    pub fn in_flight(&self) -> u32 {
        self.hot.in_flight()
    }

    /// This peer's slot of per-pick state; it stays this peer's while the peer
    /// lives (a strategy that reads it directly holds the peer).
    #[inline]
    pub fn hot(&self) -> &'static Hot {
        self.hot
    }

    /// Where [`Peer::hot`] sits: peers whose slots are side by side in one
    /// block can be read as one slice of it.
    #[inline]
    pub fn hot_place(&self) -> HotPlace {
        self.hot_place
    }

    /// Failures counted in the current window.
    pub fn fails(&self) -> u32 {
        self.fails.load(Relaxed)
    }

    /// Total requests sent to this peer.
    pub fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }

    /// nginx's effective weight (see NGINX semantics: lowered by failures).
    #[inline]
    pub fn effective_weight(&self) -> i64 {
        self.effective_weight.load(Relaxed)
    }

    /// Let the effective weight climb back by one towards the weight (smooth WRR
    /// does this for every usable peer it considers).
    #[inline]
    pub fn recover_effective_weight(&self) {
        let w = self.weight();
        let e = self.effective_weight.load(Relaxed);
        if e < w {
            self.effective_weight.store(e + 1, Relaxed);
            if e + 1 == w {
                disturb();
            }
        }
    }

    /// Calm: usable, and nothing but its configured weight matters when picking
    /// it (not down, draining, unhealthy or ramping up; no failures counted; full
    /// effective weight; no `max_conns`). A strategy whose peers are all calm may
    /// take a shortcut that gives the same answers as the full rules, until
    /// [`calm_epoch`] moves.
    #[inline]
    pub fn is_calm(&self) -> bool {
        !self.admin_down.load(Relaxed)
            && !self.draining.load(Relaxed)
            && self.healthy.load(Relaxed)
            && self.params.max_conns == 0
            && self.fails.load(Relaxed) == 0
            && self.effective_weight.load(Relaxed) == self.weight()
            && self.ramp_start.load(Relaxed) == 0
    }

    /// True when marked down by configuration or the runtime API.
    pub fn is_down(&self) -> bool {
        self.admin_down.load(Relaxed)
    }

    /// Mark down / up (runtime API). Coming back up starts the slow-start ramp.
    pub fn set_down(&self, down: bool) {
        let was = self.admin_down.swap(down, Relaxed);
        if was && !down {
            self.start_ramp();
        }
        if was != down {
            disturb();
        }
    }

    /// True while draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// Start / stop draining. Stopping starts the slow-start ramp.
    pub fn set_draining(&self, draining: bool) {
        let was = self.draining.swap(draining, Relaxed);
        if was && !draining {
            self.start_ramp();
        }
        if was != draining {
            disturb();
        }
    }

    /// Take over what an operator and the health checks decided about `old`, the
    /// same address under its previous parameters (a reload changed its weight,
    /// say): drain, health verdict, and `down` set through the runtime API, unless
    /// the file itself changed `down`, which then wins.
    pub fn inherit(&self, old: &Peer) {
        self.draining.store(old.is_draining(), Relaxed);
        self.healthy.store(old.is_healthy(), Relaxed);
        if old.params.down == self.params.down {
            self.admin_down.store(old.is_down(), Relaxed);
        }
        disturb();
    }

    /// Active health verdict.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    /// Set the active health verdict; returns the previous one. Becoming healthy
    /// starts the slow-start ramp.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        let was = self.healthy.swap(healthy, Relaxed);
        if healthy && !was {
            self.start_ramp();
        }
        if was != healthy {
            disturb();
        }
        was
    }

    /// Begin ramping up from a small share of traffic (when `slow_start` is set).
    pub fn start_ramp(&self) {
        if !self.params.slow_start.is_zero() {
            self.ramp_start.store(now_ms().max(1), Relaxed);
            disturb();
        }
    }

    /// The share of its normal traffic a ramping peer should get now (a small
    /// floor up to 1), or `None` when it is not ramping.
    pub fn ramp_share(&self, now: u64) -> Option<f64> {
        let start = self.ramp_start.load(Relaxed);
        if start == 0 {
            return None;
        }
        let total = self.params.slow_start.as_millis() as u64;
        let elapsed = now.saturating_sub(start);
        if elapsed >= total {
            if self.ramp_start.swap(0, Relaxed) != 0 {
                disturb();
            }
            return None;
        }
        Some((elapsed as f64 / total as f64).max(0.02))
    }

    /// Whether a ramping peer takes this pick. Admissions follow a low-discrepancy
    /// sequence, so a share of 0.25 admits exactly every fourth offer on average,
    /// evenly spaced, with no randomness in tests. Not ramping: always true.
    pub fn admit_while_ramping(&self, now: u64) -> bool {
        match self.ramp_share(now) {
            None => true,
            Some(share) => {
                let n = self.ramp_offers.fetch_add(1, Relaxed);
                // Fractional part of n * golden ratio, uniform over [0, 1).
                let x = (n as f64 * 0.618_033_988_749_895).fract();
                x < share
            }
        }
    }

    /// Passive health: failed `max_fails` times and still inside `fail_timeout`.
    #[inline]
    pub fn is_failed(&self, now: u64) -> bool {
        let max = self.params.max_fails;
        max > 0
            && self.fails.load(Relaxed) >= max
            && now.saturating_sub(self.checked.load(Relaxed))
                <= self.params.fail_timeout.as_millis() as u64
    }

    /// Whether a strategy may pick this peer now (not down, draining, unhealthy,
    /// failed, or at `max_conns`). `tried` is checked by the caller.
    #[inline]
    pub fn is_usable(&self, now: u64) -> bool {
        !self.admin_down.load(Relaxed)
            && !self.draining.load(Relaxed)
            && self.healthy.load(Relaxed)
            && (self.params.max_conns == 0 || self.in_flight() < self.params.max_conns)
            && !self.is_failed(now)
    }

    /// Called when a strategy picked this peer: once `fail_timeout` has passed
    /// since its last failure or probe, a peer with failures counted becomes the
    /// probe (nginx: `if now - checked > fail_timeout { checked = now }`), and a
    /// success then forgets its failures.
    #[inline]
    pub fn on_pick(&self, now: u64) {
        if self.params.max_fails > 0
            && self.fails.load(Relaxed) > 0
            && now.saturating_sub(self.checked.load(Relaxed))
                > self.params.fail_timeout.as_millis() as u64
        {
            self.checked.store(now, Relaxed);
        }
    }

    /// Count a failed attempt (nginx: fails += 1, accessed = checked = now,
    /// effective_weight -= weight / max_fails). Returns true when this failure
    /// made the peer unavailable.
    pub fn record_failure(&self, now: u64) -> bool {
        let max = self.params.max_fails;
        if max == 0 {
            return false;
        }
        let fails = self.fails.fetch_add(1, Relaxed) + 1;
        self.accessed.store(now, Relaxed);
        self.checked.store(now, Relaxed);
        let w = self.weight();
        let drop = w / i64::from(max);
        let e = self.effective_weight.load(Relaxed);
        self.effective_weight.store((e - drop).max(0), Relaxed);
        disturb();
        fails == max
    }

    /// Count a success: a peer that was being probed (accessed < checked) is
    /// forgiven its failures.
    pub fn record_success(&self) {
        let fails = self.fails.load(Relaxed);
        if fails > 0 && self.accessed.load(Relaxed) < self.checked.load(Relaxed) {
            self.fails.store(0, Relaxed);
            disturb();
            if fails >= self.params.max_fails {
                // It was out of rotation and its probe succeeded.
                self.start_ramp();
            }
        }
    }

    /// Forget failures (nginx does this for every peer when none is usable).
    pub fn reset_fails(&self) {
        if self.fails.swap(0, Relaxed) != 0 {
            disturb();
        }
    }

    /// Wake `notify` whenever one of this peer's in-flight slots frees up (used
    /// when `max_conns` is set, for the queue). Set once; later calls keep the first.
    pub fn notify_on_release(&self, notify: std::sync::Arc<tokio::sync::Notify>) {
        let _ = self.release.set(notify);
    }

    /// Take an in-flight slot; dropping the guard gives it back.
    #[inline]
    pub fn start_request(self: &std::sync::Arc<Self>) -> InFlight {
        self.hot.moves.fetch_add(1, Relaxed);
        self.requests.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // No request holds the peer any more, so nothing is in flight on it.
        give_hot(self.hot_place);
    }
}

/// Holds one in-flight slot on a peer until dropped (at the end of the response body).
#[derive(Debug)]
pub struct InFlight(std::sync::Arc<Peer>);

impl InFlight {
    /// The peer this slot belongs to.
    pub fn peer(&self) -> &std::sync::Arc<Peer> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.hot.moves.fetch_sub(1, Relaxed);
        if self.0.params.max_conns > 0
            && let Some(n) = self.0.release.get()
        {
            n.notify_waiters();
        }
    }
}

/// Set of peer indices already tried for one request. Inline up to 128 peers.
#[derive(Debug, Default, Clone)]
pub struct Tried {
    bits: [u64; 2],
    more: Vec<u64>,
}

impl Tried {
    /// An empty set.
    pub fn new() -> Tried {
        Tried::default()
    }

    /// Whether `idx` was tried.
    #[inline]
    pub fn contains(&self, idx: usize) -> bool {
        let (w, b) = (idx / 64, idx % 64);
        let word = if w < 2 {
            self.bits[w]
        } else {
            self.more.get(w - 2).copied().unwrap_or(0)
        };
        word & (1 << b) != 0
    }

    /// Mark `idx` as tried.
    pub fn insert(&mut self, idx: usize) {
        let (w, b) = (idx / 64, idx % 64);
        if w < 2 {
            self.bits[w] |= 1 << b;
        } else {
            let i = w - 2;
            if self.more.len() <= i {
                self.more.resize(i + 1, 0);
            }
            self.more[i] |= 1 << b;
        }
    }

    /// Unmark `idx`.
    pub fn remove(&mut self, idx: usize) {
        let (w, b) = (idx / 64, idx % 64);
        if w < 2 {
            self.bits[w] &= !(1 << b);
        } else if let Some(word) = self.more.get_mut(w - 2) {
            *word &= !(1 << b);
        }
    }

    /// Number of indices tried.
    pub fn len(&self) -> usize {
        self.bits
            .iter()
            .chain(self.more.iter())
            .map(|w| w.count_ones() as usize)
            .sum()
    }

    /// True when nothing was tried.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.bits == [0, 0] && self.more.iter().all(|&w| w == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    pub(crate) fn params(weight: u32, max_fails: u32) -> PeerParams {
        PeerParams {
            name: "p".into(),
            weight,
            max_fails,
            fail_timeout: Duration::from_secs(10),
            max_conns: 0,
            backup: false,
            down: false,
            slow_start: Duration::ZERO,
        }
    }

    #[test]
    fn tried_set_handles_large_indices() {
        let mut t = Tried::new();
        assert!(t.is_empty());
        for i in [0, 63, 64, 127, 128, 500] {
            assert!(!t.contains(i));
            t.insert(i);
            assert!(t.contains(i));
        }
        assert_eq!(t.len(), 6);
        assert!(!t.contains(1) && !t.contains(499));
        t.remove(64);
        t.remove(500);
        t.remove(7);
        assert!(!t.contains(64) && !t.contains(500) && t.contains(63));
        assert_eq!(t.len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_follow_nginx_rules() {
        let p = Arc::new(Peer::new("127.0.0.1:1".parse().unwrap(), params(4, 2)));
        let now = now_ms();
        assert!(p.is_usable(now));
        assert!(!p.record_failure(now));
        assert_eq!(p.effective_weight(), 2);
        assert!(p.is_usable(now));
        assert!(p.record_failure(now));
        assert_eq!(p.effective_weight(), 0);
        assert!(!p.is_usable(now));
        // Still out inside fail_timeout.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!p.is_usable(now_ms()));
        tokio::time::advance(Duration::from_millis(1)).await;
        let later = now_ms();
        assert!(p.is_usable(later));
        // Picked as the probe: the window restarts, so it is out again for others...
        p.on_pick(later);
        assert!(!p.is_usable(later));
        // ...and a success of the probe clears the count.
        tokio::time::advance(Duration::from_millis(5)).await;
        p.record_success();
        assert_eq!(p.fails(), 0);
        assert!(p.is_usable(now_ms()));
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_ramps_the_share_up_linearly() {
        let mut ps = params(1, 1);
        ps.slow_start = Duration::from_secs(10);
        let p = Peer::new("127.0.0.1:1".parse().unwrap(), ps);
        assert_eq!(p.ramp_share(now_ms()), None);
        p.set_healthy(false);
        p.set_healthy(true);
        let admitted = |p: &Peer| {
            (0..1000)
                .filter(|_| p.admit_while_ramping(now_ms()))
                .count()
        };
        let early = admitted(&p);
        assert!((15..=25).contains(&early), "{early}");
        tokio::time::advance(Duration::from_secs(5)).await;
        let half = admitted(&p);
        assert!((480..=520).contains(&half), "{half}");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(admitted(&p), 1000);
        assert_eq!(p.ramp_share(now_ms()), None);
    }

    #[test]
    fn without_slow_start_nothing_ramps() {
        let p = Peer::new("127.0.0.1:1".parse().unwrap(), params(1, 1));
        p.set_down(true);
        p.set_down(false);
        assert_eq!(p.ramp_share(now_ms()), None);
        assert!(p.admit_while_ramping(now_ms()));
    }

    #[test]
    fn max_fails_zero_disables_passive_health() {
        let p = Peer::new("127.0.0.1:1".parse().unwrap(), params(1, 0));
        for _ in 0..10 {
            assert!(!p.record_failure(1000));
        }
        assert!(p.is_usable(1000));
    }

    #[test]
    fn hot_slots_are_own_and_come_back_cleared() {
        let a = Arc::new(Peer::new("127.0.0.1:1".parse().unwrap(), params(1, 1)));
        let b = Arc::new(Peer::new("127.0.0.1:2".parse().unwrap(), params(1, 1)));
        assert!(!std::ptr::eq(a.hot(), b.hot()));
        assert!(std::ptr::eq(&*a.latency, &a.hot().latency));
        let _g = b.start_request();
        let before = b.hot().moves();
        b.latency.record(Duration::from_millis(3), 1000);
        // A recorded time moves the word; the in-flight count in it stays.
        assert_ne!(b.hot().moves(), before);
        assert_eq!((a.in_flight(), b.hot().in_flight()), (0, 1));
        drop(_g);
        // A dropped peer's slot goes to a later peer, cleared; a live peer's
        // slot to none.
        drop(b);
        let peers: Vec<Peer> = (0..HOT_BLOCK + 1)
            .map(|i| {
                Peer::new(
                    format!("127.0.0.2:{}", i + 1).parse().unwrap(),
                    params(1, 1),
                )
            })
            .collect();
        for p in &peers {
            assert!(!std::ptr::eq(p.hot(), a.hot()));
            assert_eq!(p.in_flight(), 0);
            assert_eq!(p.latency.last(), 0.0);
        }
    }

    #[test]
    fn freed_slots_go_out_lowest_first() {
        let mut peers: Vec<Option<Peer>> = (0..8)
            .map(|i| {
                Some(Peer::new(
                    format!("127.0.0.3:{}", i + 1).parse().unwrap(),
                    params(1, 1),
                ))
            })
            .collect();
        for i in [3, 0, 7, 5, 1, 6, 2, 4] {
            drop(peers[i].take());
        }
        // Highest first, so the next slot taken (the last) is the lowest.
        let free = FREE_HOT.lock().unwrap_or_else(PoisonError::into_inner);
        let key = |p: &HotPlace| (p.number, p.index);
        assert!(free.0.windows(2).all(|w| key(&w[0]) > key(&w[1])));
    }

    #[test]
    fn in_flight_guard_counts() {
        let p = Arc::new(Peer::new("127.0.0.1:1".parse().unwrap(), params(1, 1)));
        let g1 = p.start_request();
        let g2 = p.start_request();
        assert_eq!(p.in_flight(), 2);
        drop(g1);
        assert_eq!(p.in_flight(), 1);
        drop(g2);
        assert_eq!(p.in_flight(), 0);
        assert_eq!(p.requests(), 2);
    }
}
