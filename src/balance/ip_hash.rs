//! nginx's `ip_hash`: the client's network (IPv4 /24, IPv6 whole address) picks the peer.

use std::net::IpAddr;
use std::sync::Arc;

use super::{RequestKey, SmoothWrr, Strategy, available, commit, total_weight, walk_by_weight};
use crate::peer::{Peer, Tried};

/// Evaluations of the hash before falling back to round-robin (nginx: `tries > 20`).
const MAX_TRIES: usize = 21;

/// `ip_hash`: sticky by client address, exactly as nginx computes it.
///
/// Key bytes: IPv4 → the first three octets; IPv6 → all 16 bytes (an IPv4-mapped
/// IPv6 address counts as the IPv4 address, as if nginx listened on IPv4).
/// `hash = 89`; each try runs `hash = (hash * 113 + b) % 6271` over the key bytes,
/// then walks the peers by weight with `hash % total_weight`. An unusable peer
/// means another try from the evolved hash; after 21 tries, smooth round-robin.
#[derive(Debug)]
pub struct IpHash {
    total_weight: u64,
    wrr: SmoothWrr,
}

impl IpHash {
    /// An ip_hash over `peers` (the list later passed to `pick`).
    pub fn new(peers: &[Arc<Peer>]) -> IpHash {
        IpHash {
            total_weight: total_weight(peers),
            wrr: SmoothWrr::with_atomics(peers),
        }
    }
}

/// The address bytes nginx hashes, in a fixed buffer, and how many of them count.
#[inline]
fn key_bytes(ip: IpAddr) -> ([u8; 16], usize) {
    let mut buf = [0u8; 16];
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            buf[..3].copy_from_slice(&v4.octets()[..3]);
            (buf, 3)
        }
        IpAddr::V6(v6) => {
            buf = v6.octets();
            (buf, 16)
        }
    }
}

impl Strategy for IpHash {
    fn pick(
        &self,
        peers: &[Arc<Peer>],
        key: &RequestKey<'_>,
        tried: &Tried,
        now: u64,
    ) -> Option<usize> {
        if peers.len() < 2 || self.total_weight == 0 {
            let i = self.wrr.pick_available(peers, tried, now)?;
            return commit(peers, i, now);
        }
        let (bytes, len) = key_bytes(key.client_ip);
        let mut hash: u64 = 89;
        for _ in 0..MAX_TRIES {
            for &b in &bytes[..len] {
                hash = (hash * 113 + u64::from(b)) % 6271;
            }
            if let Some(i) = walk_by_weight(peers, hash % self.total_weight)
                && available(&peers[i], i, tried, now)
            {
                return commit(peers, i, now);
            }
        }
        let i = self.wrr.pick_available(peers, tried, now)?;
        commit(peers, i, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testutil::*;

    fn pick(s: &IpHash, ps: &[Arc<Peer>], ip: &str, tried: &Tried) -> Option<usize> {
        s.pick(ps, &key(ip), tried, NOW)
    }

    #[test]
    fn localhost_goes_to_the_third_of_three_like_nginx() {
        let ps = peers(&[1, 1, 1]);
        let s = IpHash::new(&ps);
        for _ in 0..5 {
            assert_eq!(pick(&s, &ps, "127.0.0.1", &Tried::new()), Some(2));
        }
    }

    #[test]
    fn same_slash_24_is_sticky_to_one_peer() {
        let ps = peers(&[1, 1, 1, 1]);
        let s = IpHash::new(&ps);
        let first = pick(&s, &ps, "203.0.113.1", &Tried::new());
        for last in [2, 77, 254] {
            let ip = format!("203.0.113.{last}");
            assert_eq!(pick(&s, &ps, &ip, &Tried::new()), first);
        }
        // IPv4-mapped IPv6 is the same client.
        assert_eq!(pick(&s, &ps, "::ffff:203.0.113.9", &Tried::new()), first);
    }

    #[test]
    fn exact_values_from_the_formula() {
        // Independent computation of nginx's formula for a few addresses.
        fn reference(ip: [u8; 3], weights: &[u64]) -> usize {
            let total: u64 = weights.iter().sum();
            let mut h = 89u64;
            for b in ip {
                h = (h * 113 + b as u64) % 6271;
            }
            let mut w = h % total;
            let mut i = 0;
            while w >= weights[i] {
                w -= weights[i];
                i += 1;
            }
            i
        }
        let ps = peers(&[3, 1, 2]);
        let s = IpHash::new(&ps);
        for (a, b, c) in [
            (10, 0, 0),
            (192, 168, 1),
            (8, 8, 8),
            (1, 2, 3),
            (172, 16, 254),
        ] {
            let ip = format!("{a}.{b}.{c}.42");
            let want = reference([a, b, c], &[3, 1, 2]);
            assert_eq!(pick(&s, &ps, &ip, &Tried::new()), Some(want), "{ip}");
        }
    }

    #[test]
    fn ipv6_uses_all_sixteen_bytes() {
        let ps = peers(&[1; 7]);
        let s = IpHash::new(&ps);
        let spread: std::collections::HashSet<_> = (0..64)
            .filter_map(|i| pick(&s, &ps, &format!("2001:db8::{i:x}"), &Tried::new()))
            .collect();
        // Addresses differing only in the last bytes still spread out.
        assert!(spread.len() >= 5, "{spread:?}");
    }

    #[test]
    fn unusable_peer_moves_on_by_evolving_the_hash() {
        let ps = peers(&[1, 1, 1]);
        let s = IpHash::new(&ps);
        ps[2].set_down(true);
        // 127.0.0.1 lands on 2 (down) first; the hash keeps evolving from its
        // current value until it lands on a usable peer.
        let evolve = |h: u64| [127u64, 0, 0].iter().fold(h, |h, &b| (h * 113 + b) % 6271);
        let mut h = evolve(89);
        assert_eq!(h % 3, 2);
        let mut seen = Vec::new();
        while h % 3 == 2 {
            h = evolve(h);
            seen.push(h);
        }
        assert!(seen.len() >= 2, "evolved more than once: {seen:?}");
        let want = (h % 3) as usize;
        assert_eq!(pick(&s, &ps, "127.0.0.1", &Tried::new()), Some(want));
        // A retry after that peer failed too: never 2 or `want`.
        let mut tried = Tried::new();
        tried.insert(want);
        let other = pick(&s, &ps, "127.0.0.1", &tried).unwrap();
        assert!(other != 2 && other != want);
    }

    #[test]
    fn falls_back_to_round_robin_after_twenty_tries() {
        // The only usable peer owns 1 of 1001 weight units: 21 tries almost
        // never land on it, so the round-robin fallback must find it.
        let ps = peers(&[1000, 1]);
        let s = IpHash::new(&ps);
        ps[0].set_down(true);
        for i in 0..50 {
            let ip = format!("10.{i}.1.1");
            assert_eq!(pick(&s, &ps, &ip, &Tried::new()), Some(1));
        }
    }

    #[test]
    fn single_peer_uses_round_robin() {
        let ps = peers(&[1]);
        let s = IpHash::new(&ps);
        assert_eq!(pick(&s, &ps, "127.0.0.1", &Tried::new()), Some(0));
        ps[0].set_down(true);
        assert_eq!(pick(&s, &ps, "127.0.0.1", &Tried::new()), None);
    }

    #[test]
    fn distribution_is_roughly_even() {
        let ps = peers(&[1, 1, 1, 1]);
        let s = IpHash::new(&ps);
        let mut n = [0usize; 4];
        for a in 0..40u32 {
            for b in 0..100u32 {
                let ip = format!("10.{a}.{b}.1");
                n[pick(&s, &ps, &ip, &Tried::new()).unwrap()] += 1;
            }
        }
        for c in n {
            assert!((800..1200).contains(&c), "{n:?}");
        }
    }

    /// Recorded from nginx 1.22 (client address set by realip): `ip_hash` over
    /// 127.0.0.1:19001..19004 with weights 1,2,1,3; and three peers, the second down.
    #[test]
    fn same_peers_as_nginx() {
        let v4: fn(u32) -> String = |k| format!("10.{}.{}.5", k * 7 % 256, k * 13 % 256);
        let v6: fn(u32) -> String = |k| format!("2001:db8::{k}:1");
        type Case<'a> = (
            &'a str,
            &'a [u32],
            Option<usize>,
            fn(u32) -> String,
            &'a str,
        );
        let cases: [Case; 3] = [
            (
                "v4",
                &[1, 2, 1, 3],
                None,
                v4,
                "211033332110333321101110333211103332103303333211033332110033",
            ),
            (
                "down",
                &[1, 1, 1],
                Some(1),
                v4,
                "000002222222202202220222222220220202000022000200200000000222",
            ),
            (
                "v6",
                &[1, 2, 1, 3],
                None,
                v6,
                "231313023113131302311313023131",
            ),
        ];
        for (what, weights, down, ip, want) in cases {
            let ps = nginx_peers(weights);
            if let Some(d) = down {
                ps[d].set_down(true);
            }
            let s = IpHash::new(&ps);
            let got: String = (0..want.len() as u32)
                .map(|k| char::from(b'0' + pick(&s, &ps, &ip(k), &Tried::new()).unwrap() as u8))
                .collect();
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn skips_unusable_peers() {
        check_skips_unusable(|ps| Box::new(IpHash::new(ps)));
    }
}
