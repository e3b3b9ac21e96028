//! Latency-aware balancing with one slow peer: `round_robin`, `least_conn` and
//! `least_time` in front of three backends, first all answering in 2 ms, then
//! with the third answering in 20 ms (10x slower). wrk drives the load and gives
//! the percentiles; every strategy runs in every round, in turn, and the table
//! shows medians over the rounds.
//!
//! Run: `cargo bench --bench slow_peer` (needs wrk; `ROUNDS=n` and `SECS=n`
//! change the number and length of the runs).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{Backends, Ferry};

const FAST_MS: u64 = 2;
const SLOW_MS: u64 = 20;
const STRATEGIES: [&str; 3] = ["round_robin", "least_conn", "least_time"];

/// One wrk run: requests/s, p50 and p99 in ms.
#[derive(Debug, Clone, Copy)]
struct Run {
    rps: f64,
    p50: f64,
    p99: f64,
}

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// wrk's latency figure ("1.23ms", "850.00us", "1.02s") in ms.
fn ms(s: &str) -> Option<f64> {
    let (num, factor) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * factor)
}

fn wrk(url: &str, conns: u32, secs: u32) -> Run {
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            url,
        ])
        .output()
        .expect("wrk installed (apt-get install -y wrk)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut run = Run {
        rps: 0.0,
        p50: f64::NAN,
        p99: f64::NAN,
    };
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("50%"), Some(v)) => run.p50 = ms(v).unwrap_or(f64::NAN),
            (Some("99%"), Some(v)) => run.p99 = ms(v).unwrap_or(f64::NAN),
            (Some("Requests/sec:"), Some(v)) => run.rps = v.parse().unwrap_or(0.0),
            _ => {}
        }
    }
    assert!(
        run.rps > 0.0 && run.p99.is_finite(),
        "cannot read wrk: {text}"
    );
    run
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let rounds = env_or("ROUNDS", 5);
    let secs = env_or("SECS", 5);
    let backends = Backends::start(3);
    // [strategy][slow?] -> runs
    let mut runs: Vec<[Vec<Run>; 2]> = STRATEGIES.iter().map(|_| [vec![], vec![]]).collect();
    for round in 1..=rounds {
        for (si, strategy) in STRATEGIES.iter().enumerate() {
            for (slow, third_ms) in [(0, FAST_MS), (1, SLOW_MS)] {
                for (i, b) in backends.list.iter().enumerate() {
                    let want = if i == 2 { third_ms } else { FAST_MS };
                    b.knobs.latency_ms.store(want, Relaxed);
                }
                let ferry = Ferry::start(&common::config(
                    &format!("strategy = \"{strategy}\""),
                    &backends.servers(""),
                ));
                // Let least_time learn the peers before measuring.
                wrk(&ferry.url("/"), 16, 1);
                let r = wrk(&ferry.url("/"), 16, secs);
                eprintln!(
                    "round {round} {strategy:<12} {:<8} rps={:.0} p50={:.2}ms p99={:.2}ms",
                    if slow == 1 { "one-slow" } else { "healthy" },
                    r.rps,
                    r.p50,
                    r.p99
                );
                runs[si][slow].push(r);
                drop(ferry);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    println!(
        "\nThree backends answering in {FAST_MS} ms; \"one slow\": the third answers in {SLOW_MS} ms.\n\
         wrk -t1 -c16 -d{secs}s, medians of {rounds} rounds.\n"
    );
    println!(
        "| strategy | p50 healthy | p99 healthy | p50 one slow | p99 one slow | p99 one slow / healthy | req/s one slow |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut p99_slow = Vec::new();
    let mut ratio_lt = f64::NAN;
    for (si, strategy) in STRATEGIES.iter().enumerate() {
        let m = |slow: usize, f: fn(&Run) -> f64| median(runs[si][slow].iter().map(f).collect());
        let (h50, h99) = (m(0, |r| r.p50), m(0, |r| r.p99));
        let (s50, s99, srps) = (m(1, |r| r.p50), m(1, |r| r.p99), m(1, |r| r.rps));
        println!(
            "| {strategy} | {h50:.2} ms | {h99:.2} ms | {s50:.2} ms | {s99:.2} ms | {:.2}x | {srps:.0} |",
            s99 / h99
        );
        p99_slow.push(s99);
        if *strategy == "least_time" {
            ratio_lt = s99 / h99;
        }
    }
    let lt = p99_slow[2];
    println!(
        "\nleast_time p99 with one slow peer is {ratio_lt:.2}x its all-healthy p99 (want <= 1.5x): {}",
        if ratio_lt <= 1.5 { "yes" } else { "NO" }
    );
    println!(
        "least_time p99 with one slow peer is below round_robin's ({:.2} ms) and least_conn's ({:.2} ms): {}",
        p99_slow[0],
        p99_slow[1],
        if lt < p99_slow[0] && lt < p99_slow[1] {
            "yes"
        } else {
            "NO"
        }
    );
}
