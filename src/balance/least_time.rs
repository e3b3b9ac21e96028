//! `least_time`: lowest response-time estimate × (8 + in-flight) per weight.

use std::borrow::Borrow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::{
    CalmView, HotSlots, HotView, RequestKey, SmoothWrr, Strategy, candidates, commit, or_pairs,
};
use crate::ewma::Ewma;
use crate::peer::{Hot, Peer, Tried};

/// Estimates below this (µs) count as this: sub-millisecond differences are noise.
pub const FLOOR_US: f64 = 1000.0;

/// Requests a peer is assumed to serve at once without slowing down (see [`LeastTime`]).
pub const PARALLEL: u64 = 8;

/// `least_time`: the usable peer with the lowest `time × (PARALLEL + in_flight) /
/// weight`, ties by smooth WRR.
///
/// [`PARALLEL`] is how many requests a peer is assumed to serve at once without
/// slowing down: among peers of about the same speed, fewer requests in flight
/// wins (as in `least_conn`); a peer 10x slower than the rest gets traffic only
/// once the others have some 70 requests each in flight, or once their own
/// estimates rise (a peer that queues shows it in its response times).
///
/// `time` is the peer's [`crate::ewma::Ewma`] estimate, raised to the fastest
/// usable peer's last-known estimate (so a new or long-idle peer counts as the
/// fastest, not as infinitely fast) and to [`FLOOR_US`], then bucketed: whole
/// milliseconds, and above 8 ms only the three leading bits, i.e. steps of at most
/// 1/8 of the value. Peers within a bucket tie and rotate by smooth WRR, so equal
/// peers share evenly despite noisy estimates.
///
/// A peer with a request in flight is scored on its last estimate without the
/// idle decay: the decay exists to give a peer nobody hears from a new chance,
/// and once it has a request, one answer is on its way. So a slow peer whose
/// estimate has decayed takes one probe, not a burst.
#[derive(Debug)]
pub struct LeastTime {
    wrr: SmoothWrr,
    calm: CalmView,
    hot: HotView,
    /// Per peer, what of its [`Hot`] slot the calm shortcut last saw, side by
    /// side for the look at whether anything moved.
    seen_hot: Box<[SeenHot]>,
    /// Per peer, the buckets of the estimate state in `seen_hot`.
    seen: Box<[Seen]>,
    /// The peers that tied for the lowest score at the last full look of the
    /// calm shortcut (bit `i` = peer `i`; 0 = none kept), valid while every
    /// peer's [`Hot::moves`] is still the one in `seen_hot` and the time is
    /// still `tied_at`.
    tied: AtomicU64,
    tied_at: AtomicU64,
}

/// What the calm shortcut last saw in one peer's [`Hot`] slot.
#[derive(Debug, Default)]
struct SeenHot {
    /// The estimate state ([`Ewma::state`]); 0 = never sampled.
    state: AtomicU64,
    /// [`Hot::moves`] at the last full look: while it reads the same, the
    /// in-flight count and the estimate state are the ones seen then.
    moves: AtomicU64,
}

/// The bucketed estimates of one peer as of one read of its [`Ewma`] state
/// (kept in [`SeenHot::state`]), so that while the state stays the same
/// a pick compares one word instead of converting and bucketing the estimate
/// again. Belongs to one strategy instance (one worker), hence relaxed atomics.
#[derive(Debug)]
struct Seen {
    /// Low 32 bits: `bucket` of the last estimate, 0 when never sampled. High 32
    /// bits: `bucket` of the estimate with idle decay at `at`.
    buckets: AtomicU64,
    /// The time (ms) the decayed bucket is for; `u64::MAX` = none yet.
    at: AtomicU64,
}

impl Seen {
    /// For a seen state of 0: "never sampled", whose last-estimate bucket is 0.
    fn new() -> Seen {
        Seen {
            buckets: AtomicU64::new(0),
            at: AtomicU64::new(u64::MAX),
        }
    }

    /// For the estimate state `state` (`seen` holds the one the buckets are
    /// of, and takes `state`): the bucket of its last estimate (0 when
    /// never sampled), and the bucketed time the score uses at `now`, with the
    /// idle decay when `decay` (as [`Ewma::read_coarse`] then
    /// [`bucket`] give it). Recomputed only when the state or, for the decayed
    /// time, `now` moved.
    #[inline]
    fn read(&self, seen: &AtomicU64, state: u64, now: u64, decay: bool) -> (u64, u64) {
        let mut buckets = self.buckets.load(Relaxed);
        if seen.load(Relaxed) != state {
            let (last, _) = Ewma::coarse_of(state, now, false);
            buckets = if last > 0.0 { bucket(last) } else { 0 };
            seen.store(state, Relaxed);
            self.buckets.store(buckets, Relaxed);
            self.at.store(u64::MAX, Relaxed);
        }
        let last = buckets & 0xffff_ffff;
        if !decay || last == 0 {
            // Undecayed, or no samples (an estimate of 0, bucketed to 1).
            return (last, last.max(1));
        }
        if self.at.load(Relaxed) != now {
            let (_, e) = Ewma::coarse_of(state, now, true);
            buckets = last | bucket(e) << 32;
            self.buckets.store(buckets, Relaxed);
            self.at.store(now, Relaxed);
        }
        (last, buckets >> 32)
    }
}

impl LeastTime {
    /// A least_time over a list of peers.
    pub fn new(peers: &[Arc<Peer>]) -> LeastTime {
        LeastTime {
            wrr: SmoothWrr::new(peers),
            calm: CalmView::new(),
            hot: HotView::new(peers),
            seen_hot: peers.iter().map(|_| SeenHot::default()).collect(),
            seen: peers.iter().map(|_| Seen::new()).collect(),
            tied: AtomicU64::new(0),
            tied_at: AtomicU64::new(0),
        }
    }

    /// The pick when every peer is calm, nothing was tried and there are at most
    /// 64 peers, the ones this instance was built for. Same answer and WRR state
    /// as the full rules.
    ///
    /// The scores are a function of the peers' estimate states, in-flight counts
    /// and the time: when none of these moved since the last full look, the same
    /// peers tie for the lowest score and smooth WRR runs among them at once
    /// (one pass comparing each peer's [`Hot::moves`] word, which changes with
    /// its in-flight count and with every sample, with what `seen_hot` holds).
    /// Otherwise the full look: one pass reads each peer's [`Hot`] slot and takes
    /// its bucketed times from [`Seen`], a second forms the scores, and
    /// [`SmoothWrr::lowest_set`] finds the peers tying for the lowest score per
    /// weight. `bucket` never decreases, so the bucket of the lifted fastest
    /// estimate is the lowest bucket of the sampled peers' last estimates (at
    /// least 1, the bucket of [`FLOOR_US`]), and raising to it commutes with
    /// bucketing.
    #[inline]
    fn pick_calm(&self, hot: HotSlots<'_>, now: u64) -> Option<usize> {
        match hot {
            HotSlots::Run(hot) => self.pick_calm_in(hot, now),
            HotSlots::Scattered(hot) => self.pick_calm_in(hot, now),
        }
    }

    /// [`LeastTime::pick_calm`] over the slots side by side or one pointer each.
    #[inline]
    fn pick_calm_in<H: Borrow<Hot>>(&self, hot: &[H], now: u64) -> Option<usize> {
        let n = hot.len();
        if n == 0 || n > 64 || n != self.seen.len() || n != self.seen_hot.len() {
            return None;
        }
        let mut wrr = self.wrr.hold();
        let tied = self.tied.load(Relaxed);
        if tied != 0 && self.tied_at.load(Relaxed) == now {
            let moved = or_pairs(hot, &self.seen_hot, |h, seen| {
                h.borrow().moves() ^ seen.moves.load(Relaxed)
            });
            if moved == 0 {
                return wrr.pick_in(tied);
            }
        }
        let mut time = [0u64; 64];
        let mut flight = [0u32; 64];
        let mut floor = u64::MAX;
        let seen = self.seen.iter().zip(self.seen_hot.iter());
        for (i, (h, (seen, seen_hot))) in hot.iter().zip(seen).enumerate() {
            let h = h.borrow();
            // The count word first: a sample it counts is in the state read
            // after it.
            let moves = h.moves();
            let in_flight = moves as u32;
            let (last, t) = seen.read(&seen_hot.state, h.latency.state(), now, in_flight == 0);
            seen_hot.moves.store(moves, Relaxed);
            if last > 0 {
                floor = floor.min(last);
            }
            time[i] = t;
            flight[i] = in_flight;
        }
        let floor = if floor == u64::MAX { 1 } else { floor };
        let mut loads = [0u64; 64];
        let mut high = 0;
        for ((l, &t), &f) in loads.iter_mut().zip(&time[..n]).zip(&flight[..n]) {
            *l = t.max(floor) * (PARALLEL + u64::from(f));
            high |= *l >> 32;
        }
        // Every score fits in 32 bits (as it does below some 4 s × 100 in flight).
        if high == 0
            && let Some(set) = self.wrr.lowest_set(n, |i| loads[i] as u32)
        {
            self.tied.store(set, Relaxed);
            self.tied_at.store(now, Relaxed);
            return wrr.pick_in(set);
        }
        self.tied.store(0, Relaxed);
        wrr.pick_least(n, |i| loads[i])
    }
}

/// Milliseconds, at least 1, keeping the three leading bits above 8.
#[inline]
pub(crate) fn bucket(estimate_us: f64) -> u64 {
    // `as` saturates; cap below 2^31 ms (24 days) so that time × (PARALLEL + in
    // flight) fits in 64 bits.
    let ms = ((estimate_us / 1000.0) as u64).clamp(1, u64::from(u32::MAX >> 1));
    let bits = 64 - ms.leading_zeros();
    if bits <= 3 {
        ms
    } else {
        let shift = bits - 3;
        (ms >> shift) << shift
    }
}

/// What estimates are raised to: the fastest usable peer's last estimate, at
/// least [`FLOOR_US`] (`fastest` is infinite when no peer has samples).
#[inline]
fn lift(fastest: f64) -> f64 {
    if fastest.is_finite() {
        fastest.max(FLOOR_US)
    } else {
        FLOOR_US
    }
}

/// Bucketed time × (PARALLEL + in flight), before dividing by the weight.
#[inline]
fn raw_score(estimate_us: f64, in_flight: u32, lift_us: f64) -> u128 {
    u128::from(bucket(estimate_us.max(lift_us)) * (PARALLEL + u64::from(in_flight)))
}

/// One peer's score and weight, for cross-multiplied comparison.
#[inline]
fn score(peer: &Peer, lift_us: f64, now: u64) -> (u128, u128) {
    let in_flight = peer.in_flight();
    let (_, estimate) = peer.latency.read_coarse(now, in_flight == 0);
    (
        raw_score(estimate, in_flight, lift_us),
        peer.weight() as u128,
    )
}

impl Strategy for LeastTime {
    fn pick(
        &self,
        peers: &[Arc<Peer>],
        _key: &RequestKey<'_>,
        tried: &Tried,
        now: u64,
    ) -> Option<usize> {
        if peers.len() <= 64
            && let Some(hot) = self.hot.of(peers)
            && self.calm.all_calm(peers, tried)
        {
            let i = self.pick_calm(hot, now)?;
            return commit(peers, i, now);
        }
        let fastest = candidates(peers, tried, now)
            .map(|(_, p)| p.latency.last())
            .filter(|&t| t > 0.0)
            .fold(f64::INFINITY, f64::min);
        let lift = lift(fastest);
        let mut best: Option<(usize, (u128, u128))> = None;
        let mut many = false;
        for (i, p) in candidates(peers, tried, now) {
            let (s, w) = score(p, lift, now);
            match best {
                None => best = Some((i, (s, w))),
                Some((_, (bs, bw))) => {
                    let (a, b) = (s * bw, bs * w);
                    if a < b {
                        best = Some((i, (s, w)));
                        many = false;
                    } else if a == b {
                        many = true;
                    }
                }
            }
        }
        let (best, (bs, bw)) = best?;
        let chosen = if many {
            let tied = candidates(peers, tried, now)
                .filter(|(_, p)| {
                    let (s, w) = score(p, lift, now);
                    s * bw == bs * w
                })
                .map(|(i, _)| i);
            self.wrr.pick_among(peers, tied).unwrap_or(best)
        } else {
            best
        };
        commit(peers, chosen, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testutil::*;
    use crate::peer::InFlight;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::time::Duration;

    #[test]
    fn buckets() {
        assert_eq!(bucket(0.0), 1);
        assert_eq!(bucket(1_999.0), 1);
        assert_eq!(bucket(2_000.0), 2);
        assert_eq!(bucket(7_900.0), 7);
        assert_eq!(bucket(10_000.0), 10);
        assert_eq!(bucket(17_000.0), 16);
        assert_eq!(bucket(100_000.0), 96);
        assert_eq!(bucket(f64::MAX), u64::from(u32::MAX >> 1) >> 28 << 28);
    }

    #[test]
    fn prefers_the_faster_peer() {
        let ps = peers(&[1, 1, 1]);
        ps[0].latency.record(Duration::from_millis(20), NOW);
        ps[1].latency.record(Duration::from_millis(5), NOW);
        ps[2].latency.record(Duration::from_millis(40), NOW);
        let s = LeastTime::new(&ps);
        assert_eq!(picks(&s, &ps, 3), [1, 1, 1]);
    }

    #[test]
    fn in_flight_multiplies_the_time() {
        let ps = peers(&[1, 1]);
        ps[0].latency.record(Duration::from_millis(2), NOW);
        ps[1].latency.record(Duration::from_millis(5), NOW);
        let s = LeastTime::new(&ps);
        let _a: Vec<_> = (0..8).map(|_| ps[0].start_request()).collect();
        // 2 × (8 + 8) = 32 < 5 × 8.
        assert_eq!(picks(&s, &ps, 1), [0]);
        let _b: Vec<_> = (0..4).map(|_| ps[0].start_request()).collect();
        // 2 × (8 + 12) = 40 = 5 × 8: a tie, by smooth WRR.
        let _c = ps[0].start_request();
        // 2 × (8 + 13) = 42 > 5 × 8.
        assert_eq!(picks(&s, &ps, 1), [1]);
    }

    #[test]
    fn weight_divides_the_score() {
        let ps = peers(&[4, 1]);
        ps[0].latency.record(Duration::from_millis(8), NOW);
        ps[1].latency.record(Duration::from_millis(3), NOW);
        let s = LeastTime::new(&ps);
        // 8/4 < 3/1
        assert_eq!(picks(&s, &ps, 1), [0]);
    }

    #[test]
    fn close_times_rotate() {
        let ps = peers(&[1, 1, 1]);
        ps[0].latency.record(Duration::from_micros(1_100), NOW);
        ps[1].latency.record(Duration::from_micros(1_900), NOW);
        ps[2].latency.record(Duration::from_micros(300), NOW);
        let s = LeastTime::new(&ps);
        assert_eq!(picks(&s, &ps, 6), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn new_peer_counts_as_the_fastest_not_as_free() {
        let ps = peers(&[1, 1]);
        ps[0].latency.record(Duration::from_millis(50), NOW);
        let s = LeastTime::new(&ps);
        let k = key("192.0.2.1");
        // Peer 1 has no samples: it ties with peer 0 at 50 ms and fills up by in-flight,
        // instead of taking every request until its first answer.
        let guards: Vec<_> = (0..10)
            .map(|_| ps[s.pick(&ps, &k, &Tried::new(), NOW).unwrap()].start_request())
            .collect();
        assert_eq!(ps[0].in_flight(), 5);
        assert_eq!(ps[1].in_flight(), 5);
        drop(guards);
    }

    #[test]
    fn all_new_peers_behave_like_least_conn() {
        let ps = peers(&[1, 1, 1]);
        let s = LeastTime::new(&ps);
        assert_eq!(picks(&s, &ps, 6), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn skips_unusable_peers() {
        check_skips_unusable(|ps| Box::new(LeastTime::new(ps)));
    }

    /// The calm shortcut, with its cached buckets and tied set, against the full
    /// rules (forced by a `tried` set naming only an index past the end) while
    /// time moves, samples arrive, requests start and finish, and now and then
    /// a score needs more than 32 bits.
    #[test]
    fn cached_view_matches_full_rules_as_time_moves() {
        let mut rng = fastrand::Rng::with_seed(3);
        for n in [1usize, 2, 4, 9, 64] {
            let weights: Vec<u32> = (0..n).map(|_| rng.u32(1..=4)).collect();
            let ps = peers(&weights);
            let (fast, full) = (LeastTime::new(&ps), LeastTime::new(&ps));
            let mut force = Tried::new();
            force.insert(1000);
            let mut held: Vec<InFlight> = Vec::new();
            let mut now = NOW;
            for round in 0..3_000 {
                match rng.u8(..10) {
                    0 => now += rng.u64(1..3),
                    1 => now += rng.u64(500..3_000),
                    2 => held.push(ps[rng.usize(..n)].start_request()),
                    3 if !held.is_empty() => {
                        held.swap_remove(rng.usize(..held.len()));
                    }
                    4 => {
                        let took = if rng.u8(..20) == 0 {
                            // Days: a score past 32 bits.
                            Duration::from_secs(rng.u64(1_000_000..10_000_000))
                        } else {
                            Duration::from_micros(rng.u64(200..30_000))
                        };
                        ps[rng.usize(..n)].latency.record(took, now);
                    }
                    _ => {}
                }
                let k = key("192.0.2.1");
                let a = fast.pick(&ps, &k, &Tried::new(), now);
                let b = full.pick(&ps, &k, &force, now);
                assert_eq!(a, b, "{n} peers, round {round}, weights {weights:?}");
            }
        }
    }

    /// Closed-loop simulation: `clients` clients each send a request, wait for the
    /// response and send the next one. Latency of peer `i` at time `t` comes from
    /// `latency(i, t)`. Returns per-peer pick counts per simulated second.
    fn simulate(
        ps: &[Arc<Peer>],
        clients: usize,
        seconds: u64,
        latency: impl Fn(usize, u64) -> u64,
    ) -> Vec<Vec<u64>> {
        let s = LeastTime::new(ps);
        let k = key("192.0.2.1");
        let start_us = NOW * 1000;
        let end_us = start_us + seconds * 1_000_000;
        let mut per_second = vec![vec![0u64; ps.len()]; seconds as usize];
        // (completion time µs, sequence, peer, guard slot)
        let mut events: BinaryHeap<Reverse<(u64, u64, usize, usize)>> = BinaryHeap::new();
        let mut guards: Vec<Option<InFlight>> = (0..clients).map(|_| None).collect();
        let mut seq = 0u64;
        let mut send = |t_us: u64,
                        client: usize,
                        events: &mut BinaryHeap<Reverse<(u64, u64, usize, usize)>>,
                        guards: &mut Vec<Option<InFlight>>| {
            let i = s.pick(ps, &k, &Tried::new(), t_us / 1000).unwrap();
            guards[client] = Some(ps[i].start_request());
            let sec = ((t_us - start_us) / 1_000_000) as usize;
            per_second[sec][i] += 1;
            let lat = latency(i, t_us - start_us);
            seq += 1;
            events.push(Reverse((t_us + lat, seq, i, client)));
        };
        for c in 0..clients {
            send(start_us + c as u64 * 100, c, &mut events, &mut guards);
        }
        while let Some(Reverse((t, _, i, c))) = events.pop() {
            if t >= end_us {
                break;
            }
            let sent = guards[c].take();
            let lat = latency(i, t - start_us);
            ps[i].latency.record(Duration::from_micros(lat), t / 1000);
            drop(sent);
            send(t, c, &mut events, &mut guards);
        }
        per_second
    }

    fn share(counts: &[u64], i: usize) -> f64 {
        counts[i] as f64 / counts.iter().sum::<u64>() as f64
    }

    fn slow_then_recovered(clients: usize) {
        let ps = peers(&[1, 1, 1]);
        // Peer 2 answers in 10 ms for the first 2 s, then in 1 ms like the others.
        let per_second = simulate(&ps, clients, 7, |i, t_us| {
            if i == 2 && t_us < 2_000_000 {
                10_000
            } else {
                1_000
            }
        });
        let first_two: Vec<u64> = (0..3)
            .map(|i| per_second[0][i] + per_second[1][i])
            .collect();
        let slow = share(&first_two, 2);
        assert!(
            slow < 0.15,
            "clients {clients}: slow share {slow:.3} in the first 2 s"
        );
        let second = share(&per_second[1], 2);
        assert!(
            second < 0.15,
            "clients {clients}: slow share {second:.3} in second 2"
        );
        // Steady state while slow (second 2): below 1%, so the p99 of the whole
        // load is not the slow peer's.
        assert!(
            share(&per_second[1], 2) < 0.01,
            "clients {clients}: slow share {:.4} in second 2: {per_second:?}",
            share(&per_second[1], 2)
        );
        // Recovered at 2 s: back to at least 25% within 5 s (the 5th second after).
        let back = share(&per_second[6], 2);
        assert!(
            back >= 0.25,
            "clients {clients}: share {back:.3} after recovery: {per_second:?}"
        );
    }

    #[test]
    fn slow_peer_loses_traffic_and_wins_it_back_sequential() {
        slow_then_recovered(1);
    }

    #[test]
    fn slow_peer_loses_traffic_and_wins_it_back_concurrent() {
        slow_then_recovered(8);
    }

    #[test]
    fn slow_peer_loses_traffic_and_wins_it_back_heavy() {
        slow_then_recovered(64);
    }

    #[test]
    fn equal_peers_share_evenly_under_load() {
        let ps = peers(&[1, 1, 1]);
        let per_second = simulate(&ps, 8, 3, |i, _| 2_000 + 150 * i as u64);
        for i in 0..3 {
            let sh = share(&per_second[2], i);
            assert!(
                (0.28..0.39).contains(&sh),
                "peer {i}: {sh:.3} {per_second:?}"
            );
        }
    }

    #[test]
    fn still_slow_peer_is_only_probed() {
        // A peer that stays 10x slower keeps getting only occasional probes: one
        // at a time, at least one every 4 seconds.
        for clients in [8, 16, 64] {
            let ps = peers(&[1, 1, 1]);
            let per_second = simulate(&ps, clients, 12, |i, _| if i == 2 { 10_000 } else { 1_000 });
            for (sec, counts) in per_second.iter().enumerate().skip(1) {
                let sh = share(counts, 2);
                assert!(sh < 0.005, "{clients} clients, second {sec}: {sh:.4}");
            }
            for w in per_second[1..].windows(4) {
                assert!(
                    w.iter().any(|c| c[2] > 0),
                    "{clients} clients: not probed for 4 s: {per_second:?}"
                );
            }
        }
    }
}
