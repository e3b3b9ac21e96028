//! nginx's smooth weighted round-robin, and the helper other strategies reuse for
//! ties (least_conn, least_time), groups (ketama) and fallbacks (ip_hash, hash).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

use super::{RequestKey, Strategy, candidates, commit};
use crate::peer::{Peer, Tried};

/// Per-instance current weights of nginx's smooth weighted round-robin.
///
/// For each candidate: `current += effective; total += effective`, and the
/// peer's shared effective weight climbs back by one; the candidate with the
/// largest `current` (first on ties) wins and gives back `total`. The current
/// weights belong to one worker's strategy instance, so relaxed atomics suffice.
#[derive(Debug)]
pub struct SmoothWrr {
    current: Box<[AtomicI64]>,
}

impl SmoothWrr {
    /// State for a peer list of `n` peers, all current weights zero.
    pub fn new(n: usize) -> SmoothWrr {
        SmoothWrr {
            current: (0..n).map(|_| AtomicI64::new(0)).collect(),
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
}

impl RoundRobin {
    /// A round-robin over a list of `n` peers.
    pub fn new(n: usize) -> RoundRobin {
        RoundRobin {
            wrr: SmoothWrr::new(n),
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
        let i = self.wrr.pick_available(peers, tried, now)?;
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
        let rr = RoundRobin::new(ps.len());
        assert_eq!(letters(&picks(&rr, &ps, 21)), "aabacaaaabacaaaabacaa");
    }

    #[test]
    fn equal_weights_rotate_in_order() {
        let ps = peers(&[1, 1, 1]);
        let rr = RoundRobin::new(ps.len());
        assert_eq!(picks(&rr, &ps, 6), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn shares_follow_weights() {
        let ps = peers(&[3, 2, 1]);
        let rr = RoundRobin::new(ps.len());
        let mut n = [0; 3];
        for i in picks(&rr, &ps, 600) {
            n[i] += 1;
        }
        assert_eq!(n, [300, 200, 100]);
    }

    #[test]
    fn skips_unusable_peers() {
        check_skips_unusable(|ps| Box::new(RoundRobin::new(ps.len())));
    }

    #[test]
    fn down_peer_leaves_the_rest_in_sequence() {
        let ps = peers(&[5, 1, 1]);
        ps[0].set_down(true);
        let rr = RoundRobin::new(ps.len());
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
        let rr = RoundRobin::new(2);
        // Pass 1: a 0+2=2, b 0+4=4 -> b (a climbs to 3). Pass 2: a 2+3=5, b -2+4=2 -> a.
        assert_eq!(picks(&rr, &ps, 2), [1, 0]);
        assert_eq!(ps[0].effective_weight(), 4);
    }

    #[test]
    fn pick_among_a_subset() {
        let ps = peers(&[1, 1, 1, 1]);
        let wrr = SmoothWrr::new(ps.len());
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
        let rr = RoundRobin::new(ps.len());
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
