//! nginx's `hash KEY consistent`: a ketama ring compatible with Cache::Memcached::Fast.

use std::sync::Arc;

use super::{RequestKey, SmoothWrr, Strategy, available, commit};
use crate::peer::{Peer, Tried};

/// Ring points per unit of weight.
const POINTS_PER_WEIGHT: u64 = 160;

/// One point on the ring: a hash and the configured name (group) it belongs to.
#[derive(Debug, Clone, Copy)]
struct Point {
    hash: u32,
    group: u32,
}

/// `hash KEY consistent`: the first ring point at or after `crc32(key)` names the peer.
///
/// Each peer adds `160 * weight` points: `base` = CRC-32 state over
/// `HOST "\0" PORT` (its configured name split at the last colon), and point `j`
/// is `crc32_final(base ++ le_bytes(point j-1))`, starting from 0. Points are
/// sorted by hash, duplicates dropped. A point stands for a configured name;
/// several addresses behind one name share its points and rotate by smooth WRR.
/// If no peer of that name is usable, the next point is tried; after all
/// points, none. An empty key goes to round-robin, as nginx does.
#[derive(Debug)]
pub struct Ketama {
    points: Box<[Point]>,
    /// Peer indices of each group, in list order.
    groups: Box<[Box<[usize]>]>,
    wrr: SmoothWrr,
}

/// Split a configured name into nginx's ketama host and port parts.
fn host_port(name: &str) -> (&[u8], &[u8]) {
    let b = name.as_bytes();
    if b.len() >= 5 && b[..5].eq_ignore_ascii_case(b"unix:") {
        return (&b[5..], b"");
    }
    for j in (0..b.len()).rev() {
        match b[j] {
            b':' => return (&b[..j], &b[j + 1..]),
            b'0'..=b'9' => {}
            _ => break,
        }
    }
    (b, b"")
}

impl Ketama {
    /// Build the ring over `peers` (the list later passed to `pick`).
    pub fn new(peers: &[Arc<Peer>]) -> Ketama {
        let mut names: Vec<&str> = Vec::new();
        let mut members: Vec<Vec<usize>> = Vec::new();
        let mut points = Vec::new();
        for (i, peer) in peers.iter().enumerate() {
            let name = peer.params.name.as_str();
            let group = match names.iter().position(|n| *n == name) {
                Some(g) => g,
                None => {
                    names.push(name);
                    members.push(Vec::new());
                    names.len() - 1
                }
            };
            members[group].push(i);
            let (host, port) = host_port(name);
            let mut base = crc32fast::Hasher::new();
            base.update(host);
            base.update(b"\0");
            base.update(port);
            let mut prev = 0u32;
            for _ in 0..POINTS_PER_WEIGHT * peer.weight() as u64 {
                let mut h = base.clone();
                h.update(&prev.to_le_bytes());
                prev = h.finalize();
                points.push(Point {
                    hash: prev,
                    group: group as u32,
                });
            }
        }
        // Stable sort: on a hash collision the earlier peer's point stays.
        points.sort_by_key(|p| p.hash);
        points.dedup_by_key(|p| p.hash);
        Ketama {
            points: points.into_boxed_slice(),
            groups: members.into_iter().map(Vec::into_boxed_slice).collect(),
            wrr: SmoothWrr::with_atomics(peers),
        }
    }

    /// Number of distinct points on the ring.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// True when the ring has no points (no peers).
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

impl Strategy for Ketama {
    fn pick(
        &self,
        peers: &[Arc<Peer>],
        key: &RequestKey<'_>,
        tried: &Tried,
        now: u64,
    ) -> Option<usize> {
        if key.hash_key.is_empty() {
            let i = self.wrr.pick_available(peers, tried, now)?;
            return commit(peers, i, now);
        }
        let n = self.points.len();
        let h = crc32fast::hash(key.hash_key);
        let start = self.points.partition_point(|p| p.hash < h);
        for k in 0..n {
            let point = self.points[(start + k) % n];
            let Some(group) = self.groups.get(point.group as usize) else {
                continue;
            };
            let usable = group
                .iter()
                .copied()
                .filter(|&i| peers.get(i).is_some_and(|p| available(p, i, tried, now)));
            if let Some(i) = self.wrr.pick_among(peers, usable) {
                return commit(peers, i, now);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testutil::*;

    fn pick(s: &Ketama, ps: &[Arc<Peer>], k: &[u8], tried: &Tried) -> Option<usize> {
        s.pick(ps, &hkey(k), tried, NOW)
    }

    #[test]
    fn splits_names_like_nginx() {
        assert_eq!(host_port("10.0.0.1:8080"), (&b"10.0.0.1"[..], &b"8080"[..]));
        assert_eq!(host_port("[::1]:80"), (&b"[::1]"[..], &b"80"[..]));
        assert_eq!(host_port("backend"), (&b"backend"[..], &b""[..]));
        assert_eq!(host_port("unix:/tmp/s"), (&b"/tmp/s"[..], &b""[..]));
        assert_eq!(host_port("a:b"), (&b"a:b"[..], &b""[..]));
    }

    #[test]
    fn points_follow_the_formula() {
        // Independent: crc32(HOST \0 PORT ++ prev_le) for the first points.
        let ps = peers(&[1]);
        let s = Ketama::new(&ps);
        assert_eq!(s.len(), 160);
        let mut prev = 0u32;
        let mut want = Vec::new();
        for _ in 0..160 {
            let mut data = b"10.0.0.1\x0080".to_vec();
            data.extend_from_slice(&prev.to_le_bytes());
            prev = crc32fast::hash(&data);
            want.push(prev);
        }
        want.sort();
        let got: Vec<u32> = s.points.iter().map(|p| p.hash).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn key_goes_to_first_point_at_or_after_its_hash() {
        let ps = peers(&[1, 2, 1]);
        let s = Ketama::new(&ps);
        assert_eq!(s.len(), 640);
        for k in 0..300 {
            let key = format!("k{k}");
            let h = crc32fast::hash(key.as_bytes());
            let p = s
                .points
                .iter()
                .find(|p| p.hash >= h)
                .unwrap_or(&s.points[0]);
            let want = s.groups[p.group as usize][0];
            assert_eq!(pick(&s, &ps, key.as_bytes(), &Tried::new()), Some(want));
        }
    }

    #[test]
    fn removing_one_of_ten_moves_few_keys() {
        let ten = peers(&[1; 10]);
        let nine: Vec<_> = ten
            .iter()
            .filter(|p| p.params.name != "10.0.0.4:80")
            .cloned()
            .collect();
        let a = Ketama::new(&ten);
        let b = Ketama::new(&nine);
        let mut moved = 0;
        let mut on_removed = 0;
        for k in 0..10_000 {
            let key = format!("/object/{k}");
            let before = &ten[pick(&a, &ten, key.as_bytes(), &Tried::new()).unwrap()];
            let after = &nine[pick(&b, &nine, key.as_bytes(), &Tried::new()).unwrap()];
            if before.params.name == "10.0.0.4:80" {
                on_removed += 1;
            }
            if before.params.name != after.params.name {
                moved += 1;
            }
        }
        // Only the removed peer's keys move.
        assert_eq!(moved, on_removed);
        assert!(moved <= 1_500, "moved {moved}");
    }

    #[test]
    fn distribution_is_roughly_even() {
        let ps = peers(&[1; 5]);
        let s = Ketama::new(&ps);
        let mut n = [0usize; 5];
        for k in 0..10_000 {
            let key = format!("user-{k}");
            n[pick(&s, &ps, key.as_bytes(), &Tried::new()).unwrap()] += 1;
        }
        for c in n {
            assert!((1400..2600).contains(&c), "{n:?}");
        }
    }

    #[test]
    fn unusable_peer_moves_to_the_next_point() {
        let ps = peers(&[1, 1, 1]);
        let s = Ketama::new(&ps);
        for k in 0..100 {
            let key = format!("k{k}");
            let first = pick(&s, &ps, key.as_bytes(), &Tried::new()).unwrap();
            ps[first].set_down(true);
            let h = crc32fast::hash(key.as_bytes());
            let start = s.points.partition_point(|p| p.hash < h);
            let want = (0..s.len())
                .map(|j| s.groups[s.points[(start + j) % s.len()].group as usize][0])
                .find(|&i| i != first)
                .unwrap();
            assert_eq!(pick(&s, &ps, key.as_bytes(), &Tried::new()), Some(want));
            ps[first].set_down(false);
            // The same for a retry.
            let mut tried = Tried::new();
            tried.insert(first);
            assert_eq!(pick(&s, &ps, key.as_bytes(), &tried), Some(want));
        }
    }

    #[test]
    fn addresses_behind_one_name_share_points_and_rotate() {
        let ps = vec![
            peer_with("app:8080", "10.0.0.1:8080", 1),
            peer_with("app:8080", "10.0.0.2:8080", 1),
            peer_with("other:8080", "10.0.0.3:8080", 1),
        ];
        let s = Ketama::new(&ps);
        // Duplicate points of one name collapse: 160 per name.
        assert_eq!(s.len(), 320);
        let key = (0..)
            .map(|k| format!("k{k}"))
            .find(|k| pick(&s, &ps, k.as_bytes(), &Tried::new()) != Some(2))
            .unwrap();
        let got: Vec<_> = (0..4)
            .map(|_| pick(&s, &ps, key.as_bytes(), &Tried::new()).unwrap())
            .collect();
        assert!(got == [0, 1, 0, 1] || got == [1, 0, 1, 0], "{got:?}");
        // One address down: the other takes the name's keys.
        ps[0].set_down(true);
        assert_eq!(pick(&s, &ps, key.as_bytes(), &Tried::new()), Some(1));
    }

    #[test]
    fn empty_key_uses_round_robin() {
        let ps = peers(&[1, 1]);
        let s = Ketama::new(&ps);
        let got: Vec<_> = (0..4)
            .map(|_| pick(&s, &ps, b"", &Tried::new()).unwrap())
            .collect();
        assert_eq!(got, [0, 1, 0, 1]);
    }

    /// Recorded from nginx 1.22: `hash $arg_k consistent` over 127.0.0.1:19001..19004,
    /// weights 1,2,1,1 (and all weight 1 with the second down), keys key0..key59.
    #[test]
    fn same_peers_as_nginx() {
        let cases = [
            (
                "ring",
                [1, 2, 1, 1],
                None,
                "321123330111012222133330111310021113331212031200023010221121",
            ),
            (
                "down",
                [1, 1, 1, 1],
                Some(1),
                "323323330023032222333330232300020333333202033200023020223022",
            ),
        ];
        for (what, weights, down, want) in cases {
            let ps = nginx_peers(&weights);
            if let Some(d) = down {
                ps[d].set_down(true);
            }
            let s = Ketama::new(&ps);
            assert_eq!(picks_for_keys(&s, &ps, 60), want, "{what}");
        }
        let ps = nginx_peers(&[1, 2, 1, 1]);
        let s = Ketama::new(&ps);
        let got: Vec<_> = (0..10)
            .map(|_| pick(&s, &ps, b"", &Tried::new()).unwrap())
            .collect();
        assert_eq!(got, [1, 0, 2, 3, 1, 1, 0, 2, 3, 1]);
    }

    #[test]
    fn skips_unusable_peers() {
        check_skips_unusable(|ps| Box::new(Ketama::new(ps)));
    }
}
