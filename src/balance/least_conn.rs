//! nginx's `least_conn`: fewest in-flight requests per weight, ties by smooth WRR.

use std::borrow::Borrow;
use std::sync::Arc;

use super::{
    CalmView, HotSlots, HotView, RequestKey, SmoothWrr, Strategy, available, candidates, commit,
    or_all,
};
use crate::peer::{Hot, Peer, Tried};

/// `least_conn`: the usable peer with the lowest `in_flight / weight`; ties by smooth WRR.
#[derive(Debug)]
pub struct LeastConn {
    wrr: SmoothWrr,
    calm: CalmView,
    hot: HotView,
}

impl LeastConn {
    /// A least_conn over a list of peers.
    pub fn new(peers: &[Arc<Peer>]) -> LeastConn {
        LeastConn {
            wrr: SmoothWrr::new(peers),
            calm: CalmView::new(),
            hot: HotView::new(peers),
        }
    }

    /// The pick when every peer is calm, nothing was tried and there are at most
    /// 64 peers, the ones this instance was built for; same answer and WRR state
    /// as the full rules. Reads the in-flight counts from the peers' [`Hot`]
    /// slots, side by side. With nothing in flight anywhere every peer ties (at
    /// 0), so it is plain smooth WRR; otherwise [`SmoothWrr::lowest_set`] finds
    /// the peers that tie for the fewest per weight and smooth WRR runs among
    /// them only.
    #[inline]
    fn pick_calm(&self, hot: HotSlots<'_>) -> Option<usize> {
        match hot {
            HotSlots::Run(hot) => self.pick_calm_in(hot),
            HotSlots::Scattered(hot) => self.pick_calm_in(hot),
        }
    }

    /// [`LeastConn::pick_calm`] over the slots side by side or one pointer each.
    #[inline]
    fn pick_calm_in<H: Borrow<Hot>>(&self, hot: &[H]) -> Option<usize> {
        let mut wrr = self.wrr.hold();
        let n = hot.len().min(64);
        let busy = or_all(hot, |h| u64::from(h.borrow().in_flight()));
        if busy == 0 {
            return wrr.pick_calm();
        }
        let load = |i: usize| hot.get(i).map_or(u32::MAX, |h| h.borrow().in_flight());
        match self.wrr.lowest_set(n, load) {
            Some(set) => wrr.pick_in(set),
            None => wrr.pick_least(n, |i| u64::from(load(i))),
        }
    }
}

/// `a.conns / a.weight` vs `b.conns / b.weight`, cross-multiplied as nginx does.
#[inline]
pub(crate) fn load_cmp(a: &Peer, b: &Peer) -> std::cmp::Ordering {
    let la = u64::from(a.in_flight()) * b.weight() as u64;
    let lb = u64::from(b.in_flight()) * a.weight() as u64;
    la.cmp(&lb)
}

impl Strategy for LeastConn {
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
            let i = self.pick_calm(hot)?;
            return commit(peers, i, now);
        }
        let mut best: Option<usize> = None;
        let mut many = false;
        for (i, p) in candidates(peers, tried, now) {
            match best {
                None => best = Some(i),
                Some(b) => match load_cmp(p, &peers[b]) {
                    std::cmp::Ordering::Less => {
                        best = Some(i);
                        many = false;
                    }
                    std::cmp::Ordering::Equal => many = true,
                    std::cmp::Ordering::Greater => {}
                },
            }
        }
        let best = best?;
        let chosen = if many {
            // nginx walks from the first best peer on, over the peers that tie with it.
            let b = &peers[best];
            let tied = (best..peers.len()).filter(|&i| {
                let p = &peers[i];
                available(p, i, tried, now) && load_cmp(p, b).is_eq()
            });
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

    #[test]
    fn picks_fewest_in_flight() {
        let ps = peers(&[1, 1, 1]);
        let lc = LeastConn::new(&ps);
        let _g0 = ps[0].start_request();
        let _g1 = ps[1].start_request();
        let _g2 = ps[1].start_request();
        assert_eq!(picks(&lc, &ps, 3), [2, 2, 2]);
        let _g3 = ps[2].start_request();
        // 1, 2, 1 in flight: peers 0 and 2 tie and rotate.
        assert_eq!(picks(&lc, &ps, 4), [0, 2, 0, 2]);
    }

    #[test]
    fn in_flight_is_per_weight() {
        let ps = peers(&[3, 1]);
        let lc = LeastConn::new(&ps);
        let _a: Vec<_> = (0..2).map(|_| ps[0].start_request()).collect();
        let _b = ps[1].start_request();
        // 2/3 < 1/1
        assert_eq!(picks(&lc, &ps, 1), [0]);
        let _c = ps[0].start_request();
        // 3/3 == 1/1: tie, smooth WRR 3:1.
        assert_eq!(picks(&lc, &ps, 8), [0, 0, 1, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn ties_use_smooth_wrr_weights() {
        let ps = peers(&[5, 1, 1]);
        let lc = LeastConn::new(&ps);
        // Nothing in flight: everything ties, so it is plain smooth WRR.
        assert_eq!(picks(&lc, &ps, 7), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn simulated_load_follows_in_flight() {
        // Holding the guards: least_conn spreads in-flight evenly per weight.
        let ps = peers(&[2, 1, 1]);
        let lc = LeastConn::new(&ps);
        let k = key("192.0.2.1");
        let guards: Vec<_> = (0..40)
            .map(|_| {
                let i = lc.pick(&ps, &k, &Tried::new(), NOW).unwrap();
                ps[i].start_request()
            })
            .collect();
        let counts: Vec<_> = ps.iter().map(|p| p.in_flight()).collect();
        assert_eq!(counts, [20, 10, 10]);
        drop(guards);
    }

    /// Recorded from nginx 1.22 with sequential requests (nothing in flight at pick time).
    #[test]
    fn same_sequences_as_nginx() {
        let ps = nginx_peers(&[5, 1, 1]);
        let lc = LeastConn::new(&ps);
        assert_eq!(
            picks(&lc, &ps, 14),
            [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]
        );
        let ps = nginx_peers(&[2, 1, 1, 3]);
        ps[1].set_down(true);
        let lc = LeastConn::new(&ps);
        assert_eq!(picks(&lc, &ps, 12), [3, 0, 2, 3, 0, 3, 3, 0, 2, 3, 0, 3]);
    }

    #[test]
    fn skips_unusable_peers() {
        check_skips_unusable(|ps| Box::new(LeastConn::new(ps)));
    }

    #[test]
    fn unusable_peer_with_fewer_conns_is_ignored() {
        let ps = peers(&[1, 1]);
        let lc = LeastConn::new(&ps);
        let _g = ps[1].start_request();
        ps[0].set_down(true);
        assert_eq!(picks(&lc, &ps, 2), [1, 1]);
        ps[1].set_draining(true);
        assert_eq!(lc.pick(&ps, &key("192.0.2.1"), &Tried::new(), NOW), None);
    }
}
