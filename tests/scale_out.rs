//! End-to-end: ferry replicas are interchangeable. Two ferry processes started
//! from the same configuration send the same `ip_hash` client, and the same
//! consistent `hash` key, to the same peer — so N replicas behind DNS
//! round-robin, an L4 balancer or Swarm's ingress keep clients sticky.
mod common;
use common::*;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};

/// GET `path` from a client socket bound to `src` (any 127.0.0.0/8 address works
/// on loopback); the name of the backend that answered.
fn backend_seen_from(src: Ipv4Addr, to: SocketAddr, path: &str) -> String {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())
        .unwrap_or_else(|e| panic!("bind {src}: {e}"));
    s.connect(&to.into()).expect("connect");
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let (status, body) = parse_response(&raw);
    assert_eq!(status, 200, "{body}");
    body.split_whitespace().nth(2).unwrap_or("?").to_owned()
}

/// For every client (source address, path), the backend each ferry picked; the
/// two maps must be identical and use more than one backend.
fn assert_same_choices(a: &Ferry, b: &Ferry, clients: &[(Ipv4Addr, String)]) {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (src, path) in clients {
        let first = backend_seen_from(*src, a.addr, path);
        let second = backend_seen_from(*src, b.addr, path);
        assert_eq!(
            first, second,
            "{src} {path}: replica 1 chose {first}, replica 2 {second}"
        );
        // Sticky within one replica, too.
        assert_eq!(backend_seen_from(*src, a.addr, path), first);
        *seen.entry(first).or_default() += 1;
    }
    assert!(
        seen.len() >= 3,
        "the keys should spread over the peers: {seen:?}"
    );
    println!("{} clients spread as {seen:?}", clients.len());
}

#[test]
fn two_replicas_send_an_ip_hash_client_to_the_same_peer() {
    let b = Backends::start(4);
    let cfg = config("strategy = \"ip_hash\"", &b.servers(""));
    let (r1, r2) = (Ferry::start(&cfg), Ferry::start(&cfg));
    // ip_hash keys on the first three octets: 50 different /24s.
    let clients: Vec<(Ipv4Addr, String)> = (0..50)
        .map(|i| (Ipv4Addr::new(127, 0, i * 5, 1), "/".to_owned()))
        .collect();
    assert_same_choices(&r1, &r2, &clients);
}

#[test]
fn two_replicas_send_a_consistent_hash_key_to_the_same_peer() {
    let b = Backends::start(4);
    let cfg = config(
        "strategy = \"hash\"\nhash_key = \"$arg_user\"\nconsistent = true",
        &b.servers(""),
    );
    let (r1, r2) = (Ferry::start(&cfg), Ferry::start(&cfg));
    // 50 users, each from a different client address: only the key matters.
    let clients: Vec<(Ipv4Addr, String)> = (0..50u8)
        .map(|i| {
            (
                Ipv4Addr::new(127, 1, i, 1 + i % 7),
                format!("/cart?user=user-{i}"),
            )
        })
        .collect();
    assert_same_choices(&r1, &r2, &clients);
}
