//! nginx's plain `hash KEY`, compatible with Cache::Memcached.

use std::sync::Arc;

use super::{RequestKey, SmoothWrr, Strategy, available, commit, total_weight, walk_by_weight};
use crate::peer::{Peer, Tried};

/// Evaluations of the hash before falling back to round-robin (nginx: `tries > 20`).
const MAX_TRIES: u32 = 21;

/// `hash KEY`: sticky by the rendered key, exactly as nginx computes it.
///
/// Try `n` (from 0): `h = crc32((n > 0 ? decimal(n) : "") ++ key)`,
/// `acc += (h >> 16) & 0x7fff`, then walk the peers by weight with
/// `acc % total_weight`. An unusable peer means another try; after 21 tries,
/// smooth round-robin. A single peer or an empty key goes to round-robin too.
#[derive(Debug)]
pub struct Hash {
    total_weight: u64,
    wrr: SmoothWrr,
}

impl Hash {
    /// A plain hash over `peers` (the list later passed to `pick`).
    pub fn new(peers: &[Arc<Peer>]) -> Hash {
        Hash {
            total_weight: total_weight(peers),
            wrr: SmoothWrr::with_atomics(peers),
        }
    }
}

/// Cache::Memcached's per-try value: `(crc32([rehash] key) >> 16) & 0x7fff`.
#[inline]
pub(crate) fn memcached_hash(rehash: u32, key: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    if rehash > 0 {
        let mut buf = [0u8; 10];
        h.update(decimal(rehash, &mut buf));
    }
    h.update(key);
    (h.finalize() >> 16) & 0x7fff
}

/// `n` in decimal, written into the end of `buf`.
fn decimal(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[at..]
}

impl Strategy for Hash {
    fn pick(
        &self,
        peers: &[Arc<Peer>],
        key: &RequestKey<'_>,
        tried: &Tried,
        now: u64,
    ) -> Option<usize> {
        if peers.len() >= 2 && !key.hash_key.is_empty() && self.total_weight > 0 {
            let mut acc: u32 = 0;
            for rehash in 0..MAX_TRIES {
                acc = acc.wrapping_add(memcached_hash(rehash, key.hash_key));
                if let Some(i) = walk_by_weight(peers, u64::from(acc) % self.total_weight)
                    && available(&peers[i], i, tried, now)
                {
                    return commit(peers, i, now);
                }
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

    fn pick(s: &Hash, ps: &[Arc<Peer>], k: &[u8], tried: &Tried) -> Option<usize> {
        s.pick(ps, &hkey(k), tried, NOW)
    }

    #[test]
    fn decimal_formats() {
        let mut b = [0; 10];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(7, &mut b), b"7");
        assert_eq!(decimal(20, &mut b), b"20");
        assert_eq!(decimal(u32::MAX, &mut b), b"4294967295");
    }

    #[test]
    fn formula_matches_an_independent_computation() {
        // The spec's formula written out with a from-scratch CRC-32.
        fn crc32(data: &[u8]) -> u32 {
            let mut c = !0u32;
            for &b in data {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        (c >> 1) ^ 0xEDB8_8320
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        }
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        let weights = [2u64, 1, 3, 1];
        let ps = peers(&[2, 1, 3, 1]);
        let s = Hash::new(&ps);
        for k in 0..200 {
            let key = format!("/item/{k}?x=1");
            let h = u64::from((crc32(key.as_bytes()) >> 16) & 0x7fff);
            let mut w = h % 7;
            let mut want = 0;
            while w >= weights[want] {
                w -= weights[want];
                want += 1;
            }
            assert_eq!(
                pick(&s, &ps, key.as_bytes(), &Tried::new()),
                Some(want),
                "{key}"
            );
        }
    }

    #[test]
    fn rehash_prefixes_the_try_number() {
        let mut c = crc32fast::Hasher::new();
        c.update(b"3abc");
        assert_eq!(memcached_hash(3, b"abc"), (c.finalize() >> 16) & 0x7fff);
        let mut c = crc32fast::Hasher::new();
        c.update(b"abc");
        assert_eq!(memcached_hash(0, b"abc"), (c.finalize() >> 16) & 0x7fff);
    }

    #[test]
    fn unusable_peer_rehashes_and_accumulates() {
        let ps = peers(&[1, 1, 1, 1, 1]);
        let s = Hash::new(&ps);
        let key = b"session-42";
        let first = pick(&s, &ps, key, &Tried::new()).unwrap();
        ps[first].set_down(true);
        // nginx: acc += hash("1" ++ key), etc., until a usable peer.
        let mut acc = memcached_hash(0, key);
        let mut rehash = 1;
        let want = loop {
            acc += memcached_hash(rehash, key);
            rehash += 1;
            let i = (acc % 5) as usize;
            if i != first {
                break i;
            }
        };
        assert_eq!(pick(&s, &ps, key, &Tried::new()), Some(want));
        // The same as a retry with the first peer tried.
        ps[first].set_down(false);
        let mut tried = Tried::new();
        tried.insert(first);
        assert_eq!(pick(&s, &ps, key, &tried), Some(want));
    }

    #[test]
    fn distribution_is_roughly_even() {
        let ps = peers(&[1; 5]);
        let s = Hash::new(&ps);
        let mut n = [0usize; 5];
        for k in 0..10_000 {
            let key = format!("user-{k}");
            n[pick(&s, &ps, key.as_bytes(), &Tried::new()).unwrap()] += 1;
        }
        for c in n {
            assert!((1700..2300).contains(&c), "{n:?}");
        }
    }

    #[test]
    fn weights_shift_the_distribution() {
        let ps = peers(&[3, 1]);
        let s = Hash::new(&ps);
        let mut n = [0usize; 2];
        for k in 0..8_000 {
            let key = format!("k{k}");
            n[pick(&s, &ps, key.as_bytes(), &Tried::new()).unwrap()] += 1;
        }
        assert!((5600..6400).contains(&n[0]), "{n:?}");
    }

    #[test]
    fn single_peer_and_empty_key_use_round_robin() {
        let one = peers(&[1]);
        let s = Hash::new(&one);
        assert_eq!(pick(&s, &one, b"x", &Tried::new()), Some(0));
        let ps = peers(&[1, 1, 1]);
        let s = Hash::new(&ps);
        let got: Vec<_> = (0..6)
            .map(|_| pick(&s, &ps, b"", &Tried::new()).unwrap())
            .collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn falls_back_to_round_robin_after_twenty_tries() {
        let ps = peers(&[1000, 1]);
        ps[0].set_down(true);
        let s = Hash::new(&ps);
        for k in 0..50 {
            let key = format!("k{k}");
            assert_eq!(pick(&s, &ps, key.as_bytes(), &Tried::new()), Some(1));
        }
    }

    /// Recorded from nginx 1.22: `hash $arg_k` over 127.0.0.1:19001..19004,
    /// weights 1,2,1,3 (and all weight 1 with the second down), keys key0..key59.
    #[test]
    fn same_peers_as_nginx() {
        let cases = [
            (
                "plain",
                [1, 2, 1, 3],
                None,
                "012213323303231330320130311213013023331333333331313113111302",
            ),
            (
                "down",
                [1, 1, 1, 1],
                Some(1),
                "303223030303200230300230032020200330020230022003030320023030",
            ),
        ];
        for (what, weights, down, want) in cases {
            let ps = nginx_peers(&weights);
            if let Some(d) = down {
                ps[d].set_down(true);
            }
            let s = Hash::new(&ps);
            assert_eq!(picks_for_keys(&s, &ps, 60), want, "{what}");
        }
        // An empty key is round-robin (nginx's sequence for weights 1,2,1,3).
        let ps = nginx_peers(&[1, 2, 1, 3]);
        let s = Hash::new(&ps);
        let got: Vec<_> = (0..10)
            .map(|_| pick(&s, &ps, b"", &Tried::new()).unwrap())
            .collect();
        assert_eq!(got, [3, 1, 0, 3, 2, 1, 3, 3, 1, 0]);
    }

    #[test]
    fn skips_unusable_peers() {
        check_skips_unusable(|ps| Box::new(Hash::new(ps)));
    }
}
