//! nginx's smooth weighted round-robin, and the helper other strategies reuse for
//! ties (least_conn, least_time), groups (ketama) and fallbacks (ip_hash, hash).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

use spin::mutex::{SpinMutex, SpinMutexGuard};

use super::{CalmView, RequestKey, Strategy, candidates, commit};
use crate::peer::{Peer, Tried};

/// Per-instance current weights of nginx's smooth weighted round-robin.
///
/// For each candidate: `current += effective; total += effective`, and the
/// peer's shared effective weight climbs back by one; the candidate with the
/// largest `current` (first on ties) wins and gives back `total`. The current
/// weights belong to one worker's strategy instance: relaxed atomics for a few
/// peers, plain numbers behind a lock nobody else takes for many.
#[derive(Debug)]
pub struct SmoothWrr {
    current: Currents,
    /// The peers' configured weights, side by side for [`SmoothWrr::pick_calm`].
    pub(crate) weights: Box<[i64]>,
    total: i64,
    /// `weights` and `total` as `i32`, when the current weights start
    /// [`Plain::Narrow`]; else empty and 0.
    narrow_weights: Box<[i32]>,
    narrow_total: i32,
    /// Per peer, `lcm / weight`, where `lcm` is the least common multiple of all
    /// the weights: `load × scale` orders peers as `load / weight` does, with
    /// neither division nor cross-multiplication (see [`SmoothWrr::lowest_set`]).
    /// Empty when that multiple exceeds [`MAX_LCM`].
    scale: Box<[u64]>,
}

/// Where a [`SmoothWrr`] keeps its current weights. One worker's strategy
/// instance uses them, but strategies are shared (`Sync`), so either relaxed
/// atomics (few peers: the pass over them is short, and a lock would cost more
/// than it saves) or plain numbers behind a lock that nobody else takes (many
/// peers: a pass over plain numbers is code the compiler vectorises).
#[derive(Debug)]
enum Currents {
    Atomic(Box<[AtomicI64]>),
    Locked(SpinMutex<Plain>),
}

/// Take the lock of [`Currents::Locked`]. Nobody else takes it while the worker
/// whose instance it is picks, so one compare-and-swap takes it and a plain
/// store gives it back; if another thread does hold it, wait by giving up the
/// CPU rather than spinning on it.
#[inline]
fn lock(m: &SpinMutex<Plain>) -> SpinMutexGuard<'_, Plain> {
    loop {
        if let Some(guard) = m.try_lock() {
            return guard;
        }
        std::thread::yield_now();
    }
}

/// Current weights as plain numbers.
#[derive(Debug)]
enum Plain {
    /// Every current weight within ±[`NARROW_LIMIT`], as `i32`: the calm pass
    /// over 64 peers is then a few vector instructions per 4 peers.
    Narrow(Box<[i32]>),
    /// Any `i64`: for weights too large for `Narrow`, or once a current weight
    /// left its range (they then stay here).
    Wide(Box<[i64]>),
}

/// Peers up to which [`SmoothWrr`] keeps its current weights in relaxed atomics.
const ATOMIC_MAX: usize = 16;

/// Most peers for [`Plain::Narrow`]: its calm pass keeps a peer's index in the
/// low 8 bits of the number it takes the largest of.
const NARROW_PEERS: usize = 256;

/// Largest total weight for [`Plain::Narrow`] (each weight is at most the total).
const NARROW_TOTAL: i64 = 1 << 21;

/// [`Plain::Narrow`] current weights stay within ±this. A current weight plus a
/// weight is then below 2^23 in size, so shifted left by 8 bits it fits in an
/// `i32`, and a winner's current weight less the total stays far from overflow.
const NARROW_LIMIT: i32 = 1 << 22;

/// Largest least common multiple of the weights for which [`SmoothWrr`] keeps
/// per-peer scales: a 32-bit load times a scale then fits in 63 bits.
const MAX_LCM: u64 = 1 << 31;

/// The least common multiple of `weights` (each at least 1), or `None` when it
/// exceeds [`MAX_LCM`].
fn lcm_of(weights: &[i64]) -> Option<u64> {
    fn gcd(mut a: u64, mut b: u64) -> u64 {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    }
    weights.iter().try_fold(1u64, |l, &w| {
        let w = u64::try_from(w).ok().filter(|&w| w > 0)?;
        let next = (l / gcd(l, w)).checked_mul(w)?;
        (next <= MAX_LCM).then_some(next)
    })
}

/// How a [`SmoothWrr`] keeps its current weights (see [`Currents`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Atomic,
    Narrow,
    /// Only tests ask for it; [`SmoothWrr::new`] gets it when narrow is not allowed.
    #[cfg_attr(not(test), allow(dead_code))]
    Wide,
}

/// Reading and writing current weights, however they are kept: what the picks
/// other than [`SmoothWrr::pick_calm`] share.
trait Slots {
    /// How many current weights there are.
    fn len(&self) -> usize;
    /// Current weight `i`; `None` past the end.
    fn get(&self, i: usize) -> Option<i64>;
    /// Set current weight `i` (nothing past the end).
    fn set(&mut self, i: usize, v: i64);
}

/// Relaxed atomics as [`Slots`].
struct Atomics<'a>(&'a [AtomicI64]);

impl Slots for Atomics<'_> {
    #[inline]
    fn len(&self) -> usize {
        self.0.len()
    }

    #[inline]
    fn get(&self, i: usize) -> Option<i64> {
        self.0.get(i).map(|c| c.load(Relaxed))
    }

    #[inline]
    fn set(&mut self, i: usize, v: i64) {
        if let Some(c) = self.0.get(i) {
            c.store(v, Relaxed);
        }
    }
}

impl Plain {
    /// Turn narrow current weights wide, keeping their values.
    #[cold]
    fn widen(&mut self) {
        if let Plain::Narrow(c) = self {
            *self = Plain::Wide(c.iter().map(|&v| i64::from(v)).collect());
        }
    }
}

impl Slots for Plain {
    #[inline]
    fn len(&self) -> usize {
        match self {
            Plain::Narrow(c) => c.len(),
            Plain::Wide(c) => c.len(),
        }
    }

    #[inline]
    fn get(&self, i: usize) -> Option<i64> {
        match self {
            Plain::Narrow(c) => c.get(i).map(|&v| i64::from(v)),
            Plain::Wide(c) => c.get(i).copied(),
        }
    }

    /// A value outside ±[`NARROW_LIMIT`] turns narrow current weights wide first.
    #[inline]
    fn set(&mut self, i: usize, v: i64) {
        if let Plain::Narrow(c) = self {
            let Some(slot) = c.get_mut(i) else {
                return;
            };
            if let Ok(v) = i32::try_from(v)
                && (-NARROW_LIMIT..=NARROW_LIMIT).contains(&v)
            {
                *slot = v;
                return;
            }
            self.widen();
        }
        if let Plain::Wide(c) = self
            && let Some(slot) = c.get_mut(i)
        {
            *slot = v;
        }
    }
}

/// A [`SmoothWrr`]'s current weights held for one pick (see [`SmoothWrr::hold`]).
pub(crate) struct Held<'a> {
    wrr: &'a SmoothWrr,
    slots: HeldSlots<'a>,
}

/// The current weights of a [`Held`]: the atomics, or the taken lock.
enum HeldSlots<'a> {
    Atomic(Atomics<'a>),
    Locked(SpinMutexGuard<'a, Plain>),
}

impl Slots for HeldSlots<'_> {
    #[inline]
    fn len(&self) -> usize {
        match self {
            HeldSlots::Atomic(a) => a.len(),
            HeldSlots::Locked(p) => p.len(),
        }
    }

    #[inline]
    fn get(&self, i: usize) -> Option<i64> {
        match self {
            HeldSlots::Atomic(a) => a.get(i),
            HeldSlots::Locked(p) => p.get(i),
        }
    }

    #[inline]
    fn set(&mut self, i: usize, v: i64) {
        match self {
            HeldSlots::Atomic(a) => a.set(i, v),
            HeldSlots::Locked(p) => p.set(i, v),
        }
    }
}

/// [`SmoothWrr::pick_calm`] over relaxed atomics.
#[inline]
fn calm_atomic(current: &[AtomicI64], weights: &[i64], total: i64) -> Option<usize> {
    let mut best = 0;
    let mut best_c = i64::MIN;
    for (i, (cur, &w)) in current.iter().zip(weights.iter()).enumerate() {
        let c = cur.load(Relaxed) + w;
        cur.store(c, Relaxed);
        if c > best_c {
            best_c = c;
            best = i;
        }
    }
    let cur = current.get(best)?;
    cur.store(cur.load(Relaxed) - total, Relaxed);
    Some(best)
}

/// [`SmoothWrr::pick_calm`] over wide plain current weights.
#[inline]
fn calm_wide(current: &mut [i64], weights: &[i64], total: i64) -> Option<usize> {
    let mut best = 0;
    let mut best_c = i64::MIN;
    for (i, (c, &w)) in current.iter_mut().zip(weights.iter()).enumerate() {
        *c += w;
        if *c > best_c {
            best_c = *c;
            best = i;
        }
    }
    *current.get_mut(best)? -= total;
    Some(best)
}

/// [`SmoothWrr::pick_calm`] over narrow current weights (at most
/// [`NARROW_PEERS`], each within ±[`NARROW_LIMIT`], weights and `total` at most
/// [`NARROW_TOTAL`]): the winner, and whether every current weight is still
/// within ±[`NARROW_LIMIT`] (if not, the caller widens them; every value is
/// still exact).
///
/// One pass adds the weights and takes the largest of `current << 8 | (255 -
/// index)`: the largest current weight, the first peer among equals, with no
/// branch, so the compiler vectorises it. Only the winner can have gone down,
/// and no current weight went above the largest, so those two bound them all.
#[inline]
fn calm_narrow(current: &mut [i32], weights: &[i32], total: i32) -> Option<(usize, bool)> {
    let n = current.len().min(weights.len()).min(NARROW_PEERS);
    let (current, weights) = (current.get_mut(..n)?, weights.get(..n)?);
    let mut key = i32::MIN;
    for (i, (c, &w)) in current.iter_mut().zip(weights).enumerate() {
        *c = c.wrapping_add(w);
        key = key.max(*c << 8 | (255 - i as i32));
    }
    if n == 0 {
        return None;
    }
    let best = 255 - (key & 255) as usize;
    let best_c = key >> 8;
    let left = best_c.wrapping_sub(total);
    *current.get_mut(best)? = left;
    Some((best, best_c <= NARROW_LIMIT && left >= -NARROW_LIMIT))
}

/// [`Held::pick_in`] for more than one peer in `set`, over narrow current
/// weights (as for [`calm_narrow`]): the winner, and whether every current
/// weight is still within ±[`NARROW_LIMIT`]. The same bound holds: no member of
/// `set` went above the winner's current weight, and only the winner went down.
#[inline]
fn pick_in_narrow(current: &mut [i32], weights: &[i32], set: u64) -> Option<(usize, bool)> {
    let (mut winner, mut winner_c, mut total) = (usize::MAX, i32::MIN, 0i32);
    let mut rest = set;
    while rest != 0 {
        let i = rest.trailing_zeros() as usize;
        rest &= rest - 1;
        let (Some(c), Some(&w)) = (current.get_mut(i), weights.get(i)) else {
            continue;
        };
        *c = c.wrapping_add(w);
        total = total.wrapping_add(w);
        if *c > winner_c {
            (winner, winner_c) = (i, *c);
        }
    }
    let c = current.get_mut(winner)?;
    *c = c.wrapping_sub(total);
    Some((winner, winner_c <= NARROW_LIMIT && *c >= -NARROW_LIMIT))
}

/// [`Held::pick_in`] for more than one peer in `set`.
#[inline]
fn pick_in_set(s: &mut impl Slots, weights: &[i64], set: u64) -> Option<usize> {
    let (mut winner, mut winner_c, mut total) = (None, i64::MIN, 0i64);
    let mut rest = set;
    while rest != 0 {
        let i = rest.trailing_zeros() as usize;
        rest &= rest - 1;
        let (Some(c), Some(&w)) = (s.get(i), weights.get(i)) else {
            continue;
        };
        let c = c + w;
        s.set(i, c);
        total += w;
        if c > winner_c {
            (winner, winner_c) = (Some(i), c);
        }
    }
    let i = winner?;
    if let Some(c) = s.get(i) {
        s.set(i, c - total);
    }
    Some(i)
}

/// [`Held::pick_least`] over any [`Slots`].
#[inline]
fn pick_least_in(
    s: &mut impl Slots,
    weights: &[i64],
    n: usize,
    load: impl Fn(usize) -> u64,
) -> Option<usize> {
    if n > s.len() {
        return None;
    }
    let ws = weights.get(..n)?;
    let (&w0, c0) = (ws.first()?, s.get(0)?);
    let (mut best_l, mut best_w) = (load(0), w0 as u64);
    let (mut set, mut total, mut winner, mut winner_c) = (1u64, w0, 0, c0 + w0);
    for (i, &w) in ws.iter().enumerate().take(64).skip(1) {
        let l = load(i);
        let a = u128::from(l) * u128::from(best_w);
        let b = u128::from(best_l) * u128::from(w as u64);
        if a > b {
            continue;
        }
        let Some(c) = s.get(i) else {
            continue;
        };
        let c = c + w;
        if a < b {
            (best_l, best_w) = (l, w as u64);
            (set, total, winner, winner_c) = (0, 0, i, c);
        } else if c > winner_c {
            (winner, winner_c) = (i, c);
        }
        set |= 1 << i;
        total += w;
    }
    settle_in(s, weights, set, winner, total);
    Some(winner)
}

/// Add each weight to its current weight for the peers in `set` (bit `i` =
/// peer `i`, fewer than 65 peers), then take `total` from `winner`'s: the
/// bookkeeping of a smooth-WRR pick among `set`, whose winner the caller found.
#[inline]
fn settle_in(s: &mut impl Slots, weights: &[i64], mut set: u64, winner: usize, total: i64) {
    while set != 0 {
        let i = set.trailing_zeros() as usize;
        set &= set - 1;
        if let (Some(c), Some(&w)) = (s.get(i), weights.get(i)) {
            s.set(i, c + w);
        }
    }
    if let Some(c) = s.get(winner) {
        s.set(winner, c - total);
    }
}

/// [`SmoothWrr::pick_among`] over any [`Slots`].
#[inline]
fn pick_among_in(
    s: &mut impl Slots,
    peers: &[Arc<Peer>],
    candidates: impl IntoIterator<Item = usize>,
) -> Option<usize> {
    let mut best: Option<(usize, i64)> = None;
    let mut total = 0i64;
    for i in candidates {
        let (Some(peer), Some(c)) = (peers.get(i), s.get(i)) else {
            continue;
        };
        let effective = peer.effective_weight();
        let c = c + effective;
        s.set(i, c);
        total += effective;
        peer.recover_effective_weight();
        if best.is_none_or(|(_, b)| c > b) {
            best = Some((i, c));
        }
    }
    let (i, _) = best?;
    if let Some(c) = s.get(i) {
        s.set(i, c - total);
    }
    Some(i)
}

impl SmoothWrr {
    /// State for a list of peers, all current weights zero.
    pub fn new(peers: &[Arc<Peer>]) -> SmoothWrr {
        let layout = if peers.len() <= ATOMIC_MAX {
            Layout::Atomic
        } else {
            Layout::Narrow
        };
        SmoothWrr::with_layout(peers, layout)
    }

    /// [`SmoothWrr::new`] keeping the current weights in relaxed atomics
    /// however many peers there are: for strategies that run smooth WRR only
    /// among a few of them or as a fallback (`hash`, `ip_hash`, ketama's
    /// groups), where a lock would cost more than the pass it speeds up.
    pub fn with_atomics(peers: &[Arc<Peer>]) -> SmoothWrr {
        SmoothWrr::with_layout(peers, Layout::Atomic)
    }

    /// [`SmoothWrr::new`] keeping the current weights as `layout` says; wide
    /// instead of narrow when the peers or weights do not allow narrow.
    fn with_layout(peers: &[Arc<Peer>], layout: Layout) -> SmoothWrr {
        let weights: Box<[i64]> = peers.iter().map(|p| p.weight()).collect();
        let total: i64 = weights.iter().sum();
        let scale = match lcm_of(&weights) {
            Some(lcm) => weights.iter().map(|&w| lcm / w.max(1) as u64).collect(),
            None => Box::default(),
        };
        let n = weights.len();
        let narrow = (layout == Layout::Narrow && n <= NARROW_PEERS && total <= NARROW_TOTAL)
            .then(|| {
                let ws: Option<Box<[i32]>> =
                    weights.iter().map(|&w| i32::try_from(w).ok()).collect();
                Some((ws?, i32::try_from(total).ok()?))
            })
            .flatten();
        let (current, (narrow_weights, narrow_total)) = match (layout, narrow) {
            (Layout::Atomic, _) => (
                Currents::Atomic((0..n).map(|_| AtomicI64::new(0)).collect()),
                (Box::default(), 0),
            ),
            (_, Some(narrow)) => (
                Currents::Locked(SpinMutex::new(Plain::Narrow(vec![0; n].into()))),
                narrow,
            ),
            (_, None) => (
                Currents::Locked(SpinMutex::new(Plain::Wide(vec![0; n].into()))),
                (Box::default(), 0),
            ),
        };
        SmoothWrr {
            current,
            weights,
            total,
            narrow_weights,
            narrow_total,
            scale,
        }
    }

    /// The current weights, held for one pick: the lock taken when there is
    /// one. A calm shortcut takes it before it reads the peers' state, so that
    /// the lock's compare-and-swap does not wait for those reads to finish.
    #[inline]
    pub(crate) fn hold(&self) -> Held<'_> {
        let slots = match &self.current {
            Currents::Atomic(a) => HeldSlots::Atomic(Atomics(a)),
            Currents::Locked(m) => HeldSlots::Locked(lock(m)),
        };
        Held { wrr: self, slots }
    }

    /// Smooth WRR over every peer when all are calm (see [`crate::peer::Peer::is_calm`])
    /// and none was tried: every effective weight is the configured one, so this
    /// is [`SmoothWrr::pick_available`] over one compact array. `None` for no peers.
    #[inline]
    pub fn pick_calm(&self) -> Option<usize> {
        self.hold().pick_calm()
    }

    /// [`Held::pick_least`] (the strategies hold the weights themselves).
    #[cfg(test)]
    fn pick_least(&self, n: usize, load: impl Fn(usize) -> u64) -> Option<usize> {
        self.hold().pick_least(n, load)
    }

    /// The peers tying for the lowest `load(i) / weight(i)` among the first `n`
    /// (at most 64), as a bitmask (bit `i` = peer `i`), for loads that fit in 32
    /// bits; `load` is called once per peer. `None` for no peers, or when these
    /// weights keep no scales (see [`SmoothWrr::scale`]): then use
    /// [`Held::pick_least`].
    ///
    /// Each load is multiplied by its peer's scale (`lcm / weight`), so comparing
    /// the products compares the ratios exactly, with no division and no
    /// 128-bit arithmetic; a lower product starts the set afresh (rare once the
    /// lowest peers are seen, so the branch predicts well).
    #[inline]
    pub(crate) fn lowest_set(&self, n: usize, load: impl Fn(usize) -> u32) -> Option<u64> {
        let ss = self.scale.get(..n.min(64))?;
        // Above every product (a 32-bit load times a scale of at most 2^31).
        let mut low = u64::MAX;
        let mut set = 0u64;
        for (i, &s) in ss.iter().enumerate() {
            let k = u64::from(load(i)) * s;
            if k <= low {
                if k < low {
                    (low, set) = (k, 0);
                }
                set |= 1 << i;
            }
        }
        (set != 0).then_some(set)
    }

    /// [`Held::pick_in`] (the strategies hold the weights themselves).
    #[cfg(test)]
    fn pick_in(&self, set: u64) -> Option<usize> {
        self.hold().pick_in(set)
    }

    /// Smooth WRR among `candidates` (indices into `peers`, in list order), which
    /// the caller has already filtered to usable, untried peers. Does not call
    /// [`Peer::on_pick`].
    #[inline]
    pub fn pick_among(
        &self,
        peers: &[Arc<Peer>],
        candidates: impl IntoIterator<Item = usize>,
    ) -> Option<usize> {
        match &self.current {
            Currents::Atomic(a) => pick_among_in(&mut Atomics(a), peers, candidates),
            Currents::Locked(m) => pick_among_in(&mut *lock(m), peers, candidates),
        }
    }

    /// Smooth WRR among every usable peer not in `tried`. Does not call [`Peer::on_pick`].
    #[inline]
    pub fn pick_available(&self, peers: &[Arc<Peer>], tried: &Tried, now: u64) -> Option<usize> {
        self.pick_among(peers, candidates(peers, tried, now).map(|(i, _)| i))
    }

    /// The current weights, in list order.
    #[cfg(test)]
    fn currents(&self) -> Vec<i64> {
        let held = self.hold();
        (0..held.slots.len())
            .filter_map(|i| held.slots.get(i))
            .collect()
    }

    /// Set the current weights (for tests that start from a given state).
    #[cfg(test)]
    fn set_currents(&self, values: &[i64]) {
        let mut held = self.hold();
        for (i, &v) in values.iter().enumerate() {
            held.slots.set(i, v);
        }
    }

    /// How the current weights are kept now.
    #[cfg(test)]
    fn layout(&self) -> Layout {
        match &self.current {
            Currents::Atomic(_) => Layout::Atomic,
            Currents::Locked(m) => match &*lock(m) {
                Plain::Narrow(_) => Layout::Narrow,
                Plain::Wide(_) => Layout::Wide,
            },
        }
    }
}

impl Held<'_> {
    /// [`SmoothWrr::pick_calm`].
    #[inline]
    pub(crate) fn pick_calm(&mut self) -> Option<usize> {
        let wrr = self.wrr;
        match &mut self.slots {
            HeldSlots::Atomic(a) => calm_atomic(a.0, &wrr.weights, wrr.total),
            HeldSlots::Locked(plain) => calm_plain(wrr, plain),
        }
    }

    /// Among the first `n` peers (all calm, nothing tried, `n` at most 64): the
    /// one with the lowest `load(i) / weight(i)` (cross-multiplied, as nginx
    /// compares), ties by smooth WRR among the peers that tie; one pass, with the
    /// tied set as a bitmask, settled afterwards, so the WRR state ends as the
    /// full rules leave it. The calm shortcut of `least_conn` and `least_time`.
    #[inline]
    pub(crate) fn pick_least(&mut self, n: usize, load: impl Fn(usize) -> u64) -> Option<usize> {
        pick_least_in(&mut self.slots, &self.wrr.weights, n, load)
    }

    /// Smooth WRR among the peers in `set` (bit `i` = peer `i`; all calm and
    /// untried, fewer than 65 peers), first on ties, as [`SmoothWrr::pick_among`]
    /// gives it for calm peers. All peers: [`SmoothWrr::pick_calm`]; one peer:
    /// that peer, with nothing to record (its current weight would gain its
    /// weight and give it straight back).
    #[inline(always)]
    pub(crate) fn pick_in(&mut self, set: u64) -> Option<usize> {
        let wrr = self.wrr;
        let n = wrr.weights.len();
        let all = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        if set == all {
            return self.pick_calm();
        }
        if set.count_ones() == 1 {
            let i = set.trailing_zeros() as usize;
            return (i < n).then_some(i);
        }
        match &mut self.slots {
            HeldSlots::Atomic(a) => pick_in_atomic(wrr, a, set),
            HeldSlots::Locked(plain) => pick_in_plain(wrr, plain, set),
        }
    }
}

/// [`Held::pick_in`] over relaxed atomics, for more than one peer in `set`;
/// out of line, so that the checks before it inline.
#[inline(never)]
fn pick_in_atomic(wrr: &SmoothWrr, current: &mut Atomics<'_>, set: u64) -> Option<usize> {
    pick_in_set(current, &wrr.weights, set)
}

/// [`Held::pick_calm`] over plain current weights; out of line, so that the
/// atomics' path stays small enough to inline.
#[inline(never)]
fn calm_plain(wrr: &SmoothWrr, plain: &mut Plain) -> Option<usize> {
    match plain {
        Plain::Narrow(current) => {
            let (i, narrow) = calm_narrow(current, &wrr.narrow_weights, wrr.narrow_total)?;
            if !narrow {
                plain.widen();
            }
            Some(i)
        }
        Plain::Wide(current) => calm_wide(current, &wrr.weights, wrr.total),
    }
}

/// [`Held::pick_in`] over plain current weights, for more than one peer in
/// `set`; out of line (see [`calm_plain`]).
#[inline(never)]
fn pick_in_plain(wrr: &SmoothWrr, plain: &mut Plain, set: u64) -> Option<usize> {
    match plain {
        Plain::Narrow(current) => {
            let (i, narrow) = pick_in_narrow(current, &wrr.narrow_weights, set)?;
            if !narrow {
                plain.widen();
            }
            Some(i)
        }
        wide => pick_in_set(wide, &wrr.weights, set),
    }
}

/// `round_robin`: nginx's smooth weighted round-robin over the usable peers.
#[derive(Debug)]
pub struct RoundRobin {
    wrr: SmoothWrr,
    calm: CalmView,
}

impl RoundRobin {
    /// A round-robin over a list of peers.
    pub fn new(peers: &[Arc<Peer>]) -> RoundRobin {
        RoundRobin {
            wrr: SmoothWrr::new(peers),
            calm: CalmView::new(),
        }
    }
}

impl Strategy for RoundRobin {
    fn pick(
        &self,
        peers: &[Arc<Peer>],
        _key: &RequestKey<'_>,
        tried: &Tried,
        now: u64,
    ) -> Option<usize> {
        let i = if self.calm.all_calm(peers, tried) {
            self.wrr.pick_calm()?
        } else {
            self.wrr.pick_available(peers, tried, now)?
        };
        commit(peers, i, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testutil::*;

    fn letters(seq: &[usize]) -> String {
        seq.iter().map(|&i| (b'a' + i as u8) as char).collect()
    }

    #[test]
    fn weights_5_1_1_give_nginx_sequence() {
        let ps = peers(&[5, 1, 1]);
        let rr = RoundRobin::new(&ps);
        assert_eq!(letters(&picks(&rr, &ps, 21)), "aabacaaaabacaaaabacaa");
    }

    #[test]
    fn equal_weights_rotate_in_order() {
        let ps = peers(&[1, 1, 1]);
        let rr = RoundRobin::new(&ps);
        assert_eq!(picks(&rr, &ps, 6), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn shares_follow_weights() {
        let ps = peers(&[3, 2, 1]);
        let rr = RoundRobin::new(&ps);
        let mut n = [0; 3];
        for i in picks(&rr, &ps, 600) {
            n[i] += 1;
        }
        assert_eq!(n, [300, 200, 100]);
    }

    #[test]
    fn skips_unusable_peers() {
        check_skips_unusable(|ps| Box::new(RoundRobin::new(ps)));
    }

    #[test]
    fn down_peer_leaves_the_rest_in_sequence() {
        let ps = peers(&[5, 1, 1]);
        ps[0].set_down(true);
        let rr = RoundRobin::new(&ps);
        assert_eq!(letters(&picks(&rr, &ps, 4)), "bcbc");
    }

    #[test]
    fn failure_lowers_effective_weight_then_it_recovers() {
        // nginx: a failure takes weight/max_fails off the effective weight; each
        // pass of smooth WRR gives one back.
        let mut p = params("10.0.0.1:80", 4);
        p.max_fails = 4;
        let a = peer_params(p);
        let b = peer_with("10.0.0.2:80", "10.0.0.2:80", 4);
        let ps = vec![a, b];
        ps[0].record_failure(NOW);
        ps[0].record_failure(NOW);
        assert_eq!(ps[0].effective_weight(), 2);
        let rr = RoundRobin::new(&ps);
        // Pass 1: a 0+2=2, b 0+4=4 -> b (a climbs to 3). Pass 2: a 2+3=5, b -2+4=2 -> a.
        assert_eq!(picks(&rr, &ps, 2), [1, 0]);
        assert_eq!(ps[0].effective_weight(), 4);
    }

    #[test]
    fn pick_among_a_subset() {
        let ps = peers(&[1, 1, 1, 1]);
        let wrr = SmoothWrr::new(&ps);
        let got: Vec<_> = (0..4)
            .map(|_| wrr.pick_among(&ps, [1, 3]).unwrap())
            .collect();
        assert_eq!(got, [1, 3, 1, 3]);
        assert_eq!(wrr.pick_among(&ps, []), None);
        // Out-of-range indices are ignored rather than panicking.
        assert_eq!(wrr.pick_among(&ps, [9]), None);
    }

    #[test]
    fn lowest_set_and_pick_in_match_pick_least() {
        // Same winners and the same WRR state as the cross-multiplied pass, over
        // random weights and loads (many ties: loads 0..4).
        let mut rng = fastrand::Rng::with_seed(11);
        for n in [1usize, 2, 5, 17, 63, 64] {
            let weights: Vec<u32> = (0..n).map(|_| rng.u32(1..=6)).collect();
            let ps = peers(&weights);
            let (fast, slow) = (SmoothWrr::new(&ps), SmoothWrr::new(&ps));
            for round in 0..500 {
                let loads: Vec<u32> = (0..n).map(|_| rng.u32(0..4)).collect();
                let set = fast.lowest_set(n, |i| loads[i]).expect("scales kept");
                let a = fast.pick_in(set);
                let b = slow.pick_least(n, |i| u64::from(loads[i]));
                assert_eq!(a, b, "{n} peers, round {round}, {weights:?}, {loads:?}");
                assert_eq!(fast.currents(), slow.currents());
            }
        }
    }

    #[test]
    fn scales_only_for_a_small_common_multiple() {
        let ps = peers(&[1, 2, 3, 4]);
        let wrr = SmoothWrr::new(&ps);
        assert_eq!(&*wrr.scale, &[12, 6, 4, 3]);
        assert_eq!(wrr.lowest_set(4, |i| [1, 3, 3, 4][i]), Some(0b1101));
        // Distinct large primes: the common multiple is far above 2^31.
        let ps = peers(&[1_000_003, 1_000_033, 1_000_037]);
        let wrr = SmoothWrr::new(&ps);
        assert!(wrr.scale.is_empty());
        assert_eq!(wrr.lowest_set(3, |_| 1), None);
        assert_eq!(lcm_of(&[4, 6, 10]), Some(60));
        assert_eq!(lcm_of(&[1 << 31]), Some(1 << 31));
        assert_eq!(lcm_of(&[1 << 31, 3]), None);
    }

    /// Every operation, on the same weights kept each way: the same winners and
    /// the same current weights throughout.
    #[test]
    fn layouts_give_the_same_picks_and_state() {
        let mut rng = fastrand::Rng::with_seed(5);
        for n in [1usize, 2, 5, 16, 17, 40, 63, 64, 100, 256, 257] {
            let ps: Vec<Arc<Peer>> = (0..n)
                .map(|i| {
                    let addr = format!("10.0.{}.{}:80", i / 250, i % 250 + 1);
                    peer_with(&addr, &addr, rng.u32(1..=9))
                })
                .collect();
            let all = [Layout::Atomic, Layout::Narrow, Layout::Wide]
                .map(|l| SmoothWrr::with_layout(&ps, l));
            assert_eq!(all[0].layout(), Layout::Atomic);
            let narrow = if n <= NARROW_PEERS {
                Layout::Narrow
            } else {
                Layout::Wide
            };
            assert_eq!(all[1].layout(), narrow);
            assert_eq!(all[2].layout(), Layout::Wide);
            let small = n.min(64);
            for round in 0..400 {
                let op = rng.u8(..5);
                let set = rng.u64(..)
                    & if small == 64 {
                        u64::MAX
                    } else {
                        (1 << small) - 1
                    };
                let loads: Vec<u64> = (0..small).map(|_| rng.u64(0..3)).collect();
                let cands: Vec<usize> = (0..n).filter(|_| rng.bool()).collect();
                let got: Vec<Option<usize>> = all
                    .iter()
                    .map(|w| match op {
                        0 | 1 => w.pick_calm(),
                        2 => w.pick_in(set),
                        3 => w.pick_least(small, |i| loads[i]),
                        _ => w.pick_among(&ps, cands.iter().copied()),
                    })
                    .collect();
                assert!(
                    got.iter().all(|g| *g == got[0]),
                    "{n} peers, round {round}, op {op}: {got:?}"
                );
                let cur = all[0].currents();
                assert_eq!(cur.len(), n);
                for w in &all[1..] {
                    assert_eq!(w.currents(), cur, "{n} peers, round {round}, op {op}");
                }
            }
        }
    }

    #[test]
    fn new_keeps_few_peers_in_atomics_and_large_weights_wide() {
        assert_eq!(
            SmoothWrr::new(&peers(&[1; ATOMIC_MAX])).layout(),
            Layout::Atomic
        );
        assert_eq!(
            SmoothWrr::new(&peers(&[3; ATOMIC_MAX + 1])).layout(),
            Layout::Narrow
        );
        // 64 × 40 000 is above NARROW_TOTAL: wide from the start.
        let ps = peers(&[40_000; 64]);
        let wide = SmoothWrr::new(&ps);
        assert_eq!(wide.layout(), Layout::Wide);
        let atomic = SmoothWrr::with_layout(&ps, Layout::Atomic);
        for _ in 0..200 {
            assert_eq!(wide.pick_calm(), atomic.pick_calm());
        }
        assert_eq!(wide.currents(), atomic.currents());
        // Weights beyond i32: same.
        let ps = peers(&[
            u32::MAX,
            7,
            u32::MAX - 1,
            1,
            3,
            5,
            9,
            2,
            4,
            6,
            8,
            10,
            11,
            12,
            13,
            14,
            15,
            16,
        ]);
        let wide = SmoothWrr::new(&ps);
        assert_eq!(wide.layout(), Layout::Wide);
        let atomic = SmoothWrr::with_layout(&ps, Layout::Atomic);
        for _ in 0..100 {
            assert_eq!(wide.pick_calm(), atomic.pick_calm());
            assert_eq!(wide.pick_in(0b1011), atomic.pick_in(0b1011));
        }
        assert_eq!(wide.currents(), atomic.currents());
    }

    /// A current weight leaving ±NARROW_LIMIT, by a calm pass (above or below)
    /// or by any other pick, turns the weights wide with their values kept.
    #[test]
    fn narrow_turns_wide_at_its_limit() {
        let ps = peers(&[1; 20]);
        let limit = i64::from(NARROW_LIMIT);
        let starts: [(Vec<i64>, u8); 4] = [
            // The winner climbs past the limit.
            ((0..20).map(|i| if i == 3 { limit } else { 0 }).collect(), 0),
            // The winner drops below minus the limit.
            (
                (0..20)
                    .map(|i| if i == 5 { 5 - limit } else { -limit })
                    .collect(),
                0,
            ),
            // The same two by the other picks.
            ((0..20).map(|i| if i == 3 { limit } else { 0 }).collect(), 1),
            (
                (0..20)
                    .map(|i| if i == 5 { 5 - limit } else { -limit })
                    .collect(),
                2,
            ),
        ];
        for (start, op) in starts {
            let narrow = SmoothWrr::with_layout(&ps, Layout::Narrow);
            let atomic = SmoothWrr::with_layout(&ps, Layout::Atomic);
            narrow.set_currents(&start);
            atomic.set_currents(&start);
            assert_eq!(narrow.layout(), Layout::Narrow);
            assert_eq!(narrow.currents(), start);
            let pick = |w: &SmoothWrr| match op {
                0 => w.pick_calm(),
                1 => w.pick_in(0b1111_1111),
                _ => w.pick_among(&ps, 0..20),
            };
            assert_eq!(pick(&narrow), pick(&atomic));
            assert_eq!(narrow.layout(), Layout::Wide, "op {op}");
            assert_eq!(narrow.currents(), atomic.currents());
            for _ in 0..50 {
                assert_eq!(pick(&narrow), pick(&atomic));
            }
            assert_eq!(narrow.currents(), atomic.currents());
        }
    }

    #[test]
    fn tried_peer_is_skipped_on_retry() {
        let ps = peers(&[1, 1, 1]);
        let rr = RoundRobin::new(&ps);
        let mut tried = Tried::new();
        let k = key("192.0.2.1");
        let first = rr.pick(&ps, &k, &tried, NOW).unwrap();
        tried.insert(first);
        let second = rr.pick(&ps, &k, &tried, NOW).unwrap();
        tried.insert(second);
        let third = rr.pick(&ps, &k, &tried, NOW).unwrap();
        tried.insert(third);
        let mut all = [first, second, third];
        all.sort();
        assert_eq!(all, [0, 1, 2]);
        assert_eq!(rr.pick(&ps, &k, &tried, NOW), None);
    }
}
