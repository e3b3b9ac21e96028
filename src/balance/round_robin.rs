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
}

impl SmoothWrr {
    /// State for a list of peers, all current weights zero.
    pub fn new(peers: &[Arc<Peer>]) -> SmoothWrr {
        let weights: Box<[i64]> = peers.iter().map(|p| p.weight()).collect();
        SmoothWrr {
            current: (0..peers.len()).map(|_| AtomicI64::new(0)).collect(),
            total: weights.iter().sum(),
            weights,
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
