//! Cost of one `pick` for every strategy, over 4 and 64 peers.
//! Run: `cargo bench --bench strategies`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use ferry::balance::{self, RequestKey};
use ferry::config::{NextUpstream, StrategyKind, UpstreamConfig};
use ferry::peer::{Peer, PeerParams, Tried, now_ms};

fn peers(n: usize) -> Vec<Arc<Peer>> {
    (0..n)
        .map(|i| {
            let addr: SocketAddr = format!("10.0.{}.{}:8080", i / 250, i % 250 + 1)
                .parse()
                .expect("address");
            Arc::new(Peer::new(
                addr,
                PeerParams {
                    name: addr.to_string(),
                    weight: 1 + (i % 3) as u32,
                    max_fails: 1,
                    fail_timeout: Duration::from_secs(10),
                    max_conns: 0,
                    backup: false,
                    down: false,
                    slow_start: Duration::ZERO,
                },
            ))
        })
        .collect()
}

fn upstream(strategy: StrategyKind, consistent: bool, random_two: bool) -> UpstreamConfig {
    UpstreamConfig {
        name: "bench".into(),
        strategy,
        hash_key: (strategy == StrategyKind::Hash).then(|| "$request_uri".into()),
        consistent,
        random_two,
        keepalive: 64,
        keepalive_timeout: Duration::from_secs(15),
        connect_timeout: Duration::from_secs(3),
        read_timeout: Duration::from_secs(60),
        next_upstream: NextUpstream::default(),
        next_upstream_tries: 0,
        next_upstream_timeout: Duration::ZERO,
        retry_buffer: 64 * 1024,
        queue: 0,
        queue_timeout: Duration::from_secs(60),
        servers: Vec::new(),
        health_check: None,
        scheme: ferry::config::UpstreamScheme::Http,
    }
}

fn bench(c: &mut Criterion) {
    let cases = [
        ("round_robin", StrategyKind::RoundRobin, false, false),
        ("least_conn", StrategyKind::LeastConn, false, false),
        ("ip_hash", StrategyKind::IpHash, false, false),
        ("hash", StrategyKind::Hash, false, false),
        ("hash_consistent", StrategyKind::Hash, true, false),
        ("random", StrategyKind::Random, false, false),
        ("random_two", StrategyKind::Random, false, true),
        ("least_time", StrategyKind::LeastTime, false, false),
    ];
    let now = now_ms();
    for n in [4usize, 64] {
        let ps = peers(n);
        for (i, p) in ps.iter().enumerate() {
            p.latency
                .record(Duration::from_micros(500 + 37 * i as u64), now);
        }
        for (name, kind, consistent, two) in cases {
            let s = balance::from_config(&upstream(kind, consistent, two), &ps);
            let tried = Tried::new();
            let mut ip = 0u32;
            c.bench_function(&format!("{name}/{n}"), |b| {
                b.iter(|| {
                    ip = ip.wrapping_add(0x0101_0101);
                    let key = RequestKey {
                        client_ip: std::net::IpAddr::from(ip.to_be_bytes()),
                        hash_key: b"/api/orders/12345?page=2",
                    };
                    black_box(s.pick(black_box(&ps), &key, &tried, now))
                })
            });
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
