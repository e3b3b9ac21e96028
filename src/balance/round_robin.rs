//! nginx's smooth weighted round-robin, and the helper other strategies reuse for
//! ties (least_conn, least_time), groups (ketama) and fallbacks (ip_hash, hash).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

use super::{CalmView, RequestKey, Strategy, candidates, commit};
use crate::peer::{Peer, Tried};

/// Per-instance current weights of nginx's smooth weighted round-robin.
///
/// For each candidate: `current += effective; total += effective`, and the
/// peer's shared effective weight climbs back by one; the candidate with the
/// largest `current` (first on ties) wins and gives back `total`. The current
/// weights belong to one worker's strategy instance, so relaxed atomics suffice.
#[derive(Debug)]
pub struct SmoothWrr {
    pub(crate) current: Box<[AtomicI64]>,
    /// The peers' configured weights, side by side for [`SmoothWrr::pick_calm`].
    pub(crate) weights: Box<[i64]>,
    total: i64,
    /// Per peer, `lcm / weight`, where `lcm` is the least common multiple of all
    /// the weights: `load × scale` orders peers as `load / weight` does, with
    /// neither division nor cross-multiplication (see [`SmoothWrr::lowest_set`]).
    /// Empty when that multiple exceeds [`MAX_LCM`].
    scale: Box<[u64]>,
}

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

impl SmoothWrr {
    /// State for a list of peers, all current weights zero.
    pub fn new(peers: &[Arc<Peer>]) -> SmoothWrr {
        let weights: Box<[i64]> = peers.iter().map(|p| p.weight()).collect();
        let scale = match lcm_of(&weights) {
            Some(lcm) => weights.iter().map(|&w| lcm / w.max(1) as u64).collect(),
            None => Box::default(),
        };
        SmoothWrr {
            current: (0..peers.len()).map(|_| AtomicI64::new(0)).collect(),
            total: weights.iter().sum(),
            weights,
            scale,
        }
    }

    /// Smooth WRR over every peer when all are calm (see [`crate::peer::Peer::is_calm`])
    /// and none was tried: every effective weight is the configured one, so this
    /// is [`SmoothWrr::pick_available`] over one compact array. `None` for no peers.
    #[inline]
    pub fn pick_calm(&self) -> Option<usize> {
        let mut best = 0;
        let mut best_c = i64::MIN;
        for (i, (cur, &w)) in self.current.iter().zip(self.weights.iter()).enumerate() {
            let c = cur.load(Relaxed) + w;
            cur.store(c, Relaxed);
            if c > best_c {
                best_c = c;
                best = i;
            }
        }
        let cur = self.current.get(best)?;
        cur.store(cur.load(Relaxed) - self.total, Relaxed);
        Some(best)
    }

    /// Among the first `n` peers (all calm, nothing tried, `n` at most 64): the
    /// one with the lowest `load(i) / weight(i)` (cross-multiplied, as nginx
    /// compares), ties by smooth WRR among the peers that tie; one pass, with the
    /// tied set as a bitmask, settled afterwards, so the WRR state ends as the
    /// full rules leave it. The calm shortcut of `least_conn` and `least_time`.
    #[inline]
    pub(crate) fn pick_least(&self, n: usize, load: impl Fn(usize) -> u64) -> Option<usize> {
        let (Some(ws), Some(cs)) = (self.weights.get(..n), self.current.get(..n)) else {
            return None;
        };
        let (&w0, c0) = (ws.first()?, cs.first()?);
        let (mut best_l, mut best_w) = (load(0), w0 as u64);
        let (mut set, mut total, mut winner, mut winner_c) = (1u64, w0, 0, c0.load(Relaxed) + w0);
        for i in 1..n.min(64) {
            let w = ws[i];
            let l = load(i);
            let a = u128::from(l) * u128::from(best_w);
            let b = u128::from(best_l) * u128::from(w as u64);
            if a > b {
                continue;
            }
            let c = cs[i].load(Relaxed) + w;
            if a < b {
                (best_l, best_w) = (l, w as u64);
                (set, total, winner, winner_c) = (0, 0, i, c);
            } else if c > winner_c {
                (winner, winner_c) = (i, c);
            }
            set |= 1 << i;
            total += w;
        }
        self.settle(set, winner, total);
        Some(winner)
    }

    /// The peers tying for the lowest `load(i) / weight(i)` among the first `n`
    /// (at most 64), as a bitmask (bit `i` = peer `i`), for loads that fit in 32
    /// bits; `load` is called once per peer. `None` for no peers, or when these
    /// weights keep no scales (see [`SmoothWrr::scale`]): then use
    /// [`SmoothWrr::pick_least`].
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

    /// Smooth WRR among the peers in `set` (bit `i` = peer `i`; all calm and
    /// untried, fewer than 65 peers), first on ties, as [`SmoothWrr::pick_among`]
    /// gives it for calm peers. All peers: [`SmoothWrr::pick_calm`]; one peer:
    /// that peer, with nothing to record (its current weight would gain its
    /// weight and give it straight back).
    #[inline]
    pub(crate) fn pick_in(&self, set: u64) -> Option<usize> {
        let n = self.current.len();
        let all = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        if set == all {
            return self.pick_calm();
        }
        if set.count_ones() == 1 {
            let i = set.trailing_zeros() as usize;
            return (i < n).then_some(i);
        }
        let (mut winner, mut winner_c, mut total) = (None, i64::MIN, 0i64);
        let mut rest = set;
        while rest != 0 {
            let i = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            let (Some(cur), Some(&w)) = (self.current.get(i), self.weights.get(i)) else {
                continue;
            };
            let c = cur.load(Relaxed) + w;
            cur.store(c, Relaxed);
            total += w;
            if c > winner_c {
                (winner, winner_c) = (Some(i), c);
            }
        }
        let i = winner?;
        if let Some(cur) = self.current.get(i) {
            cur.store(cur.load(Relaxed) - total, Relaxed);
        }
        Some(i)
    }

    /// Add each weight to its current weight for the peers in `set` (bit `i` =
    /// peer `i`, fewer than 65 peers), then take `total` from `winner`'s: the
    /// bookkeeping of a smooth-WRR pick among `set`, whose winner the caller found.
    #[inline]
    pub(crate) fn settle(&self, mut set: u64, winner: usize, total: i64) {
        let n = self.current.len();
        if n < 64 && set == (1u64 << n) - 1 || n == 64 && set == u64::MAX {
            for (cur, &w) in self.current.iter().zip(self.weights.iter()) {
                cur.store(cur.load(Relaxed) + w, Relaxed);
            }
            set = 0;
        }
        while set != 0 {
            let i = set.trailing_zeros() as usize;
            set &= set - 1;
            if let (Some(cur), Some(&w)) = (self.current.get(i), self.weights.get(i)) {
                cur.store(cur.load(Relaxed) + w, Relaxed);
            }
        }
        if let Some(cur) = self.current.get(winner) {
            cur.store(cur.load(Relaxed) - total, Relaxed);
        }
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
        let mut best: Option<(usize, i64)> = None;
        let mut total = 0i64;
        for i in candidates {
            let (Some(peer), Some(cur)) = (peers.get(i), self.current.get(i)) else {
                continue;
            };
            let effective = peer.effective_weight();
            let c = cur.load(Relaxed) + effective;
            cur.store(c, Relaxed);
            total += effective;
            peer.recover_effective_weight();
            if best.is_none_or(|(_, b)| c > b) {
                best = Some((i, c));
            }
        }
        let (i, _) = best?;
        if let Some(cur) = self.current.get(i) {
            cur.store(cur.load(Relaxed) - total, Relaxed);
        }
        Some(i)
    }

    /// Smooth WRR among every usable peer not in `tried`. Does not call [`Peer::on_pick`].
    #[inline]
    pub fn pick_available(&self, peers: &[Arc<Peer>], tried: &Tried, now: u64) -> Option<usize> {
        self.pick_among(peers, candidates(peers, tried, now).map(|(i, _)| i))
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
                let cur = |w: &SmoothWrr| -> Vec<i64> {
                    w.current.iter().map(|c| c.load(Relaxed)).collect()
                };
                assert_eq!(cur(&fast), cur(&slow));
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
