//! nginx's `random [two]`: weighted random, or the less loaded of two random picks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::least_conn::load_cmp;
use super::{RequestKey, Strategy, available, candidates, commit};
use crate::peer::{Peer, Tried};

/// `random`: a usable peer drawn with probability proportional to its weight;
/// with `two`, two distinct draws and the one with fewer in-flight per weight.
///
/// Draws are taken over the usable, untried peers directly (nginx redraws
/// when it hits an unusable peer; the resulting distribution is the same).
#[derive(Debug)]
pub struct Random {
    two: bool,
    /// wyrand state of this instance (one worker thread touches it).
    seed: AtomicU64,
    /// Running sums of the peers' weights, made on the first pick (the peer
    /// list of an instance never changes).
    prefix: std::sync::OnceLock<Box<[u64]>>,
}

impl Random {
    /// A random strategy seeded from the thread's generator.
    pub fn new(two: bool) -> Random {
        Random::with_seed(two, fastrand::u64(..))
    }

    /// A random strategy with a fixed seed (reproducible sequences in tests).
    pub fn with_seed(two: bool, seed: u64) -> Random {
        Random {
            two,
            seed: AtomicU64::new(seed),
            prefix: std::sync::OnceLock::new(),
        }
    }

    /// A uniform number in `0..bound` (`bound > 0`).
    fn below(&self, bound: u64) -> u64 {
        let mut rng = fastrand::Rng::with_seed(self.seed.load(Relaxed));
        let x = rng.u64(..bound);
        self.seed.store(rng.get_seed(), Relaxed);
        x
    }

    /// One weighted draw among the usable, untried peers other than `skip`.
    ///
    /// First as nginx does: draw over all peers by weight (a binary search in
    /// the running sums) and redraw when the peer cannot be used, which keeps
    /// the draw proportional to weight among the usable ones; after a few
    /// misses, one exact pass over the usable peers.
    fn draw(
        &self,
        peers: &[Arc<Peer>],
        tried: &Tried,
        now: u64,
        skip: Option<usize>,
    ) -> Option<usize> {
        let prefix = self.prefix.get_or_init(|| {
            let mut sum = 0u64;
            peers
                .iter()
                .map(|p| {
                    sum += p.weight() as u64;
                    sum
                })
                .collect()
        });
        if let Some(&total) = prefix.last()
            && total > 0
            && prefix.len() == peers.len()
        {
            for _ in 0..4 {
                let x = self.below(total);
                let i = prefix.partition_point(|&p| p <= x);
                if Some(i) != skip && i < peers.len() && available(&peers[i], i, tried, now) {
                    return Some(i);
                }
            }
        }
        let eligible = || candidates(peers, tried, now).filter(|(i, _)| Some(*i) != skip);
        let total: u64 = eligible().map(|(_, p)| p.weight() as u64).sum();
        if total == 0 {
            return None;
        }
        let mut x = self.below(total);
        let mut last = None;
        for (i, p) in eligible() {
            let w = p.weight() as u64;
            if x < w {
                return Some(i);
            }
            x -= w;
            last = Some(i);
        }
        // A peer became unusable between the passes: take the last usable one.
        last
    }
}

impl Strategy for Random {
    fn pick(
        &self,
        peers: &[Arc<Peer>],
        _key: &RequestKey<'_>,
        tried: &Tried,
        now: u64,
    ) -> Option<usize> {
        let first = self.draw(peers, tried, now, None)?;
        let chosen = if self.two {
            match self.draw(peers, tried, now, Some(first)) {
                // nginx keeps the second draw unless it is more loaded.
                Some(second) if load_cmp(&peers[second], &peers[first]).is_gt() => first,
                Some(second) => second,
                None => first,
            }
        } else {
            first
        };
        commit(peers, chosen, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testutil::*;

    fn counts(s: &Random, ps: &[Arc<Peer>], n: usize) -> Vec<usize> {
        let mut c = vec![0; ps.len()];
        for i in picks(s, ps, n) {
            c[i] += 1;
        }
        c
    }

    #[test]
    fn follows_weights() {
        let ps = peers(&[1, 2, 5]);
        let s = Random::with_seed(false, 7);
        let c = counts(&s, &ps, 16_000);
        assert!((1700..2300).contains(&c[0]), "{c:?}");
        assert!((3500..4500).contains(&c[1]), "{c:?}");
        assert!((9400..10_600).contains(&c[2]), "{c:?}");
    }

    #[test]
    fn same_seed_same_sequence() {
        let ps = peers(&[1, 1, 1, 1]);
        let a = Random::with_seed(false, 42);
        let b = Random::with_seed(false, 42);
        assert_eq!(picks(&a, &ps, 50), picks(&b, &ps, 50));
    }

    #[test]
    fn two_choices_prefer_the_less_loaded() {
        let ps = peers(&[1, 1, 1]);
        let s = Random::with_seed(true, 3);
        let _busy: Vec<_> = (0..5).map(|_| ps[0].start_request()).collect();
        let c = counts(&s, &ps, 3000);
        // The two draws are distinct and the other one always has fewer in flight.
        assert_eq!(c[0], 0, "{c:?}");
        assert!(c[1] > 1200 && c[2] > 1200, "{c:?}");
    }

    #[test]
    fn two_choices_compare_per_weight() {
        let ps = peers(&[4, 1]);
        let s = Random::with_seed(true, 9);
        let _a: Vec<_> = (0..3).map(|_| ps[0].start_request()).collect();
        let _b = ps[1].start_request();
        // 3/4 < 1/1: always peer 0 (both draws happen, since they are distinct).
        assert!(picks(&s, &ps, 100).iter().all(|&i| i == 0));
    }

    #[test]
    fn two_choices_with_one_usable_peer() {
        let ps = peers(&[1, 1]);
        ps[1].set_down(true);
        let s = Random::with_seed(true, 1);
        assert_eq!(picks(&s, &ps, 5), [0; 5]);
    }

    #[test]
    fn two_choices_keep_load_balanced() {
        let ps = peers(&[1, 1, 1, 1]);
        let s = Random::with_seed(true, 11);
        let k = key("192.0.2.1");
        let guards: Vec<_> = (0..400)
            .map(|_| ps[s.pick(&ps, &k, &Tried::new(), NOW).unwrap()].start_request())
            .collect();
        for p in &ps {
            assert!((80..=120).contains(&p.in_flight()), "{}", p.in_flight());
        }
        drop(guards);
    }

    #[test]
    fn skips_unusable_peers() {
        check_skips_unusable(|_| Box::new(Random::with_seed(false, 5)));
        check_skips_unusable(|_| Box::new(Random::with_seed(true, 5)));
        check_skips_unusable(|_| Box::new(Random::new(true)));
    }
}
