//! gRPC through ferry, and `scheme = "h2c"` upstreams: real grpcio clients and
//! servers (`tests/grpc/peer.py`, raw-bytes messages) run by `python3`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;

use common::*;

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc/peer.py");

/// A grpcio server on 127.0.0.1, killed on drop.
struct GrpcServer {
    child: Child,
    addr: SocketAddr,
}

impl GrpcServer {
    fn start() -> GrpcServer {
        GrpcServer::spawn(&[])
    }

    /// A server speaking TLS with this certificate and key (PEM files).
    fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> GrpcServer {
        GrpcServer::spawn(&[
            "--tls",
            cert.to_str().expect("path"),
            key.to_str().expect("path"),
        ])
    }

    fn spawn(extra: &[&str]) -> GrpcServer {
        let mut child = Command::new("python3")
            .args([PEER, "server"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the server's port (is grpcio installed? python3 -m pip install grpcio)");
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("port line: {line:?}"));
        GrpcServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run the grpcio client against `addr`: its JSON report.
fn grpc_client(addr: SocketAddr, repeat: u32) -> serde_json::Value {
    grpc_client_with(addr, repeat, &[])
}

fn grpc_client_with(addr: SocketAddr, repeat: u32, extra: &[&str]) -> serde_json::Value {
    let out = Command::new("timeout")
        .args(["120", "python3", PEER, "client"])
        .arg(addr.to_string())
        .arg(repeat.to_string())
        .args(extra)
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// A ferry over `b`: a server that speaks h2c (prior knowledge) to the ferry
/// under test.
fn h2c_server(b: &Backends) -> Ferry {
    Ferry::start(&ferry_config(
        "",
        "",
        &upstream("app", &b.list.iter().collect::<Vec<_>>()),
    ))
}

fn h2c_upstream(name: &str, addr: SocketAddr, extra: &str) -> String {
    format!(
        "[[upstream]]\nname = \"{name}\"\nscheme = \"h2c\"\n{extra}\n[[upstream.server]]\naddr = \"{addr}\"\n\n"
    )
}

/// What every client run must have seen: the calls, their trailers and
/// statuses, unchanged by ferry.
fn check_calls(r: &serde_json::Value) {
    // Unary, with the backend's trailing metadata.
    assert_eq!(r["unary"], "echo:hello", "{r}");
    assert_eq!(r["unary_code"], 0, "{r}");
    assert_eq!(r["unary_trailers"]["x-trailer"], "t1", "{r}");
    // Server streaming: every message, then the trailers.
    assert_eq!(
        r["stream"],
        serde_json::json!(["msg0", "msg1", "msg2", "msg3", "msg4"]),
        "{r}"
    );
    assert_eq!(r["stream_trailers"]["x-count"], "5", "{r}");
    // A trailers-only error answer (grpc-status 5 in the only HEADERS).
    assert_eq!(r["fail"], serde_json::json!([5, "no such thing"]), "{r}");
    // An error status in the trailers after a message.
    assert_eq!(
        r["fail_after"],
        serde_json::json!([["one"], 5, "gone after one"]),
        "{r}"
    );
    // Client streaming.
    assert_eq!(r["collect"], "a+b+c", "{r}");
    // 300 concurrent unary calls: all answered.
    assert_eq!(r["repeat_ok"], 300, "{r}");
}

#[test]
fn grpc_calls_pass_through_with_trailers_and_statuses() {
    let g = GrpcServer::start();
    let f = Ferry::start(&ferry_config("", "", &h2c_upstream("grpc", g.addr, "")));
    check_calls(&grpc_client(f.addr, 300));
    // Over one upstream connection.
    let connects = f.metric_sum("ferry_upstream_connects_total", &["upstream=\"grpc\""]);
    assert!(
        (1.0..=2.0).contains(&connects),
        "{connects} upstream connections for 305 calls"
    );
}

#[test]
fn grpc_calls_pass_over_a_refused_peer() {
    let g = GrpcServer::start();
    let up = format!(
        "[[upstream]]\nname = \"grpc\"\nscheme = \"h2c\"\n\
         [[upstream.server]]\naddr = \"{}\"\n\
         [[upstream.server]]\naddr = \"{}\"\n\n",
        closed_port(),
        g.addr
    );
    let f = Ferry::start(&ferry_config("", "", &up));
    // The refused peer is passed over (next_upstream error), every call succeeds.
    let r = grpc_client(f.addr, 50);
    assert_eq!(r["unary"], "echo:hello", "{r}");
    assert_eq!(r["repeat_ok"], 50, "{r}");
    let fails = f.metric_sum("ferry_upstream_fails_total", &[]);
    let retries = f.metric_sum("ferry_upstream_retries_total", &[]);
    assert!(
        fails >= 1.0 || retries >= 1.0,
        "fails {fails} retries {retries}"
    );
}

/// ferry B serves h2c in front of an HTTP/1.1 backend; ferry A forwards to B
/// with `scheme = "h2c"`: HTTP/1.1 and HTTP/2 clients of A both reach it, and
/// A's many requests share one or two connections to B.
#[test]
fn h1_and_h2_clients_reach_an_h2c_upstream_over_few_connections() {
    let b = Backends::start(1);
    let back = h2c_server(&b);
    let front = Ferry::start(&ferry_config("", "", &h2c_upstream("h2", back.addr, "")));
    // HTTP/1.1 client.
    let (st, body) = http_get(front.addr, "/echo", &[("X-Probe", "1")]);
    assert_eq!(st, 200, "{body}");
    let lower = body.to_ascii_lowercase();
    assert!(lower.contains("x-probe: 1"), "{body}");
    assert!(
        lower.contains(&format!("host: {}", front.addr)),
        "Host carried as :authority: {body}"
    );
    // A request body through h1 -> h2c.
    let (code, out, err) = curl(&["--data-binary", "hello body", &front.url("/post")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("body=10"), "{out}");
    // h2load over HTTP/2 and wrk over HTTP/1.1 at once.
    let h2load = std::thread::spawn({
        let url = front.url("/");
        move || {
            Command::new("h2load")
                .args(["-n", "2000", "-c", "4", "-m", "10", &url])
                .output()
                .expect("h2load")
        }
    });
    let report = wrk(&front.url("/"), 8, 2);
    let out = h2load.join().expect("h2load thread");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2000 succeeded, 0 failed"), "{text}");
    assert_eq!(report.non_2xx, 0, "{}", report.output);
    assert_eq!(report.socket_errors, 0, "{}", report.output);
    let requests = 2000 + report.requests;
    let connects = front.metric_sum("ferry_upstream_connects_total", &["upstream=\"h2\""]);
    assert!(
        connects <= 3.0,
        "{connects} upstream connections for {requests} requests"
    );
    assert!(b.list[0].served.load(Relaxed) >= requests);
}

#[test]
fn h2c_upstream_read_timeout_gives_504_and_counts_against_the_peer() {
    let b = Backends::start(1);
    let back = h2c_server(&b);
    let front = Ferry::start(&ferry_config(
        "",
        "",
        &h2c_upstream("h2", back.addr, "read_timeout = \"500ms\""),
    ));
    b.list[0].knobs.hang.store(1, Relaxed);
    let (code, out, err) = curl(&["-o", "/dev/null", "-w", "%{http_code}", &front.url("/")]);
    assert_eq!((code, out.as_str()), (0, "504"), "{err}");
    b.list[0].knobs.hang.store(0, Relaxed);
    let timeouts = front.metric_sum(
        "ferry_upstream_fails_total",
        &["upstream=\"h2\"", "reason=\"timeout\""],
    );
    assert!(timeouts >= 1.0, "{timeouts}");
    // The connection stays usable for the next request.
    let (st, _) = http_get(front.addr, "/", &[]);
    assert_eq!(st, 200);
}

#[test]
fn active_health_checks_speak_h2c_to_an_h2c_upstream() {
    let b = Backends::start(1);
    let back = h2c_server(&b);
    let front = Ferry::start(&ferry_config(
        "",
        "",
        &format!(
            "{}[upstream.health_check]\npath = \"/health\"\ninterval = \"200ms\"\n",
            h2c_upstream("h2", back.addr, "")
        ),
    ));
    // The checks pass through the h2c ferry to the backend, which counts them.
    assert!(wait_until(DEADLINE, || b.list[0].checks.load(Relaxed) >= 3));
    let (st, _) = http_get(front.addr, "/", &[]);
    assert_eq!(st, 200);
    assert!(
        front
            .wait_log("health check failed", std::time::Duration::ZERO)
            .is_none()
    );
}

#[test]
fn a_closed_h2c_upstream_connection_is_replaced() {
    let b = Backends::start(1);
    let rest = upstream("app", &b.list.iter().collect::<Vec<_>>());
    let mut back = Ferry::start(&ferry_config("", "", &rest));
    let port = back.addr.port();
    let front = Ferry::start(&ferry_config("", "", &h2c_upstream("h2", back.addr, "")));
    let (st, _) = http_get(front.addr, "/", &[]);
    assert_eq!(st, 200);
    // The server goes away (GOAWAY, close) and comes back on the same port.
    back.signal("TERM");
    assert_eq!(back.wait_exit(DEADLINE), Some(0));
    let back2 = Ferry::start(
        &ferry_config("", "", &rest).replace("127.0.0.1:0\"]", &format!("127.0.0.1:{port}\"]")),
    );
    assert_eq!(back2.addr.port(), port);
    let (st, body) = http_get(front.addr, "/", &[]);
    assert_eq!(st, 200, "{body}");
    let connects = front.metric_sum("ferry_upstream_connects_total", &["upstream=\"h2\""]);
    assert_eq!(connects, 2.0);
}

/// A listener whose accept queue is full: connects to it hang (SYNs dropped),
/// as to a server that is down behind a firewall.
fn blackhole() -> (socket2::Socket, std::net::TcpStream) {
    use socket2::{Domain, Socket, Type};
    let l = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    l.listen(0).expect("listen");
    let addr = l
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("addr");
    let filler = std::net::TcpStream::connect(addr).expect("fill the queue");
    (l, filler)
}

#[test]
fn requests_waiting_for_a_timed_out_h2c_connect_fail_together() {
    let (hole, _filler) = blackhole();
    let addr = hole
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("addr");
    let f = Ferry::start(&ferry_config(
        "",
        "",
        &h2c_upstream(
            "h2",
            addr,
            "connect_timeout = \"500ms\"\nnext_upstream = [\"off\"]",
        ),
    ));
    // 20 concurrent requests wait for one connect; when it times out they all
    // get 504 together, not one after another (20 x 500 ms).
    let start = std::time::Instant::now();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let addr = f.addr;
            std::thread::spawn(move || http_get(addr, "/", &[]).0)
        })
        .collect();
    let statuses: Vec<u16> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    let took = start.elapsed();
    assert!(statuses.iter().all(|s| *s == 504), "{statuses:?}");
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    let connects = f.metric_sum("ferry_upstream_connects_total", &["upstream=\"h2\""]);
    assert_eq!(connects, 0.0);
}

/// gRPC over TLS on both sides: a grpcio client to ferry's TLS listener (ALPN
/// h2), ferry to a TLS grpcio server with `scheme = "h2"`, verified against the
/// test CA under the name `tls_server_name` gives.
#[test]
fn grpc_over_tls_to_an_h2_upstream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("ferry test CA");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write ca");
    let (bcert, bkey) = ca.leaf(&["grpc.internal"]).write(dir.path(), "backend");
    let front = ca.leaf(&["api.test"]).write(dir.path(), "front");
    let g = GrpcServer::start_tls(&bcert, &bkey);
    let upstream = format!(
        "[[upstream]]\nname = \"grpc\"\nscheme = \"h2\"\ntls_ca_file = \"{}\"\n\
         tls_server_name = \"grpc.internal\"\n[[upstream.server]]\naddr = \"{}\"\n",
        ca_file.display(),
        g.addr
    );
    let cfg = format!(
        "{}\n{}",
        ferry_config("", "", &upstream),
        tls_section(std::slice::from_ref(&front))
    );
    let f = Ferry::start(&cfg);
    let addr = tls_addr(&f);
    let ca_arg = ca_file.to_str().expect("path");
    check_calls(&grpc_client_with(addr, 300, &["--tls", ca_arg, "api.test"]));
    let connects = f.metric_sum("ferry_upstream_connects_total", &["upstream=\"grpc\""]);
    assert!(
        (1.0..=2.0).contains(&connects),
        "{connects} upstream connections for 305 calls"
    );
    // A CA that did not sign the backend's certificate: the handshake fails,
    // and the call gets UNAVAILABLE (502 from ferry), not a plain-text fallback.
    let other = Ca::new("another CA");
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other.pem()).expect("write ca");
    let bad = format!(
        "{}\n{}",
        ferry_config(
            "",
            "",
            &upstream.replace(
                &ca_file.display().to_string(),
                &other_file.display().to_string()
            )
        ),
        tls_section(&[front])
    );
    let f2 = Ferry::start(&bad);
    let (code, out, err) = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--http2",
        "--cacert",
        ca_arg,
        "--resolve",
        &format!("api.test:{}:127.0.0.1", tls_addr(&f2).port()),
        &format!("https://api.test:{}/test.Echo/Unary", tls_addr(&f2).port()),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "502", "{err}");
    assert!(
        f2.metric_sum("ferry_upstream_fails_total", &["reason=\"connect\""]) >= 1.0,
        "no connect failure counted"
    );
}
