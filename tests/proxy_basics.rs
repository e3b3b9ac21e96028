//! End-to-end: a real ferry process in front of real backends.
mod common;
use common::*;

#[test]
fn round_robin_spreads_requests_and_counts_them() {
    let b = Backends::start(3);
    let f = Ferry::start(&config("strategy = \"round_robin\"", &b.servers("")));
    let mut seen = std::collections::HashMap::new();
    for _ in 0..30 {
        let (st, body) = http_get(f.addr, "/", &[]);
        assert_eq!(st, 200, "{body}");
        let name = body.split_whitespace().nth(2).unwrap().to_string();
        *seen.entry(name).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|&n| n == 10), "{seen:?}");
    assert_eq!(
        f.metric_sum("ferry_http_requests_total", &["code=\"200\""]),
        30.0
    );
    let stub = f.admin_get("/stub_status");
    assert!(stub.contains(" 30 \nReading:"), "{stub}");
}
