//! End-to-end: the command line (`ferry check`, refusing a bad file) and signals
//! (SIGTERM stops promptly, after finishing the requests in flight).
mod common;
use common::*;

use std::process::{Command, Output};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// A file whose only error is `weight = 0` on line 7, column 10.
const BAD: &str = "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[[upstream]]\nname = \"app\"\n[[upstream.server]]\nweight = 0\naddr = \"127.0.0.1:1\"\n";

fn ferry(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("FERRY_LOG", "info")
        .output()
        .expect("run ferry")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write_bad() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, BAD).expect("write");
    let path = path.to_str().expect("utf-8 path").to_owned();
    (dir, path)
}

#[test]
fn check_accepts_the_example_and_prints_a_summary() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/ferry.example.toml");
    let out = ferry(&["check", "--config", example]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("is valid"), "{stdout}");
    // The summary names the listeners, the upstream, its servers and the routes.
    for needle in [
        "0.0.0.0:8080",
        "upstream payment",
        "round_robin",
        "10.0.0.11:8080",
        "10.0.0.12:8080",
        "10.0.0.13:8080",
        "backup",
        "routes",
    ] {
        assert!(
            stdout.contains(needle),
            "summary lacks {needle:?}:\n{stdout}"
        );
    }
    // `-c` is the short form.
    assert_eq!(ferry(&["check", "-c", example]).status.code(), Some(0));
}

#[test]
fn check_rejects_a_bad_file_naming_place_and_key() {
    let (_dir, path) = write_bad();
    let out = ferry(&["check", "--config", &path]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{path}:7:10: upstream[0].server[0].weight:")),
        "stderr should name file:line:col and key: {stderr}"
    );
    assert!(stderr.contains("weight must be at least 1"), "{stderr}");
    assert!(!text(&out.stdout).contains("is valid"));

    let missing = format!("{path}.missing");
    let out = ferry(&["check", "--config", &missing]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&missing),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn daemon_refuses_to_start_with_a_bad_file() {
    let (_dir, path) = write_bad();
    let check = text(&ferry(&["check", "--config", &path]).stderr);
    let start = Instant::now();
    let out = ferry(&["--config", &path]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        stderr.contains(&format!(
            "{path}:7:10: upstream[0].server[0].weight: weight must be at least 1"
        )),
        "{stderr}"
    );
    assert_eq!(
        stderr.trim(),
        check.trim(),
        "the same message as `ferry check`"
    );
    assert!(!stderr.contains("listening"), "{stderr}");
}

#[test]
fn sigterm_exits_zero_promptly() {
    let b = Backends::start(1);
    let mut f = Ferry::start(&config("", &b.servers("")));
    // An idle keep-alive client connection must not hold the shutdown up.
    let mut idle = RawConn::connect(f.addr);
    assert_eq!(idle.request("GET", "/", &[]).status, 200);
    let t = Instant::now();
    f.signal("TERM");
    let code = f.wait_exit(DEADLINE);
    let took = t.elapsed();
    assert_eq!(
        code,
        Some(0),
        "exit code after SIGTERM; logs: {:?}",
        f.logs.lock().unwrap()
    );
    assert!(
        took < Duration::from_secs(2),
        "exited {took:?} after SIGTERM"
    );
    assert!(f.wait_log("stopped", DEADLINE).is_some());
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits() {
    let b = Backends::start(1);
    b.get(0).knobs.latency_ms.store(2000, Relaxed);
    let mut f = Ferry::start(&config("", &b.servers("")));
    let addr = f.addr;
    let t = Instant::now();
    let client = std::thread::spawn(move || {
        let (code, out, err) = curl(&[
            "--max-time",
            "20",
            "-w",
            "\n%{http_code}",
            &format!("http://{addr}/slow"),
        ]);
        (code, out, err, t.elapsed())
    });
    assert!(
        wait_until(DEADLINE, || b.get(0).served.load(Relaxed) == 1),
        "the request did not reach the backend"
    );
    f.signal("TERM");
    let signalled = t.elapsed();
    assert!(
        f.wait_log("shutting down", DEADLINE).is_some(),
        "{:?}",
        f.logs.lock().unwrap()
    );
    // New connections are refused while the request drains.
    assert!(
        wait_until(DEADLINE, || std::net::TcpStream::connect(addr).is_err()),
        "ferry still accepts connections after SIGTERM"
    );
    assert!(
        f.child.try_wait().expect("try_wait").is_none(),
        "ferry exited with a request in flight"
    );
    let (code, out, err, answered) = client.join().expect("client thread");
    assert_eq!(code, 0, "curl: {err}");
    assert!(out.ends_with("\n200"), "{out}");
    assert!(out.starts_with("hello from b1"), "{out}");
    assert_eq!(
        f.wait_exit(DEADLINE),
        Some(0),
        "logs: {:?}",
        f.logs.lock().unwrap()
    );
    let exited = t.elapsed();
    println!("SIGTERM at {signalled:?}, response at {answered:?}, exit at {exited:?}");
    assert!(
        signalled < Duration::from_millis(1900),
        "the signal came too late to test draining"
    );
    assert!(answered >= Duration::from_millis(1900), "{answered:?}");
    assert!(
        exited >= answered && exited < answered + Duration::from_secs(2),
        "exit at {exited:?}"
    );
}

#[test]
fn shutdown_timeout_bounds_the_drain() {
    let b = Backends::start(1);
    b.get(0).knobs.latency_ms.store(10_000, Relaxed);
    let cfg = config("", &b.servers(""))
        .replace("workers = 1\n", "workers = 1\nshutdown_timeout = \"1s\"\n");
    let mut f = Ferry::start(&cfg);
    let addr = f.addr;
    let client =
        std::thread::spawn(move || curl(&["--max-time", "20", &format!("http://{addr}/slow")]));
    assert!(wait_until(DEADLINE, || b.get(0).served.load(Relaxed) == 1));
    let t = Instant::now();
    f.signal("INT");
    assert_eq!(
        f.wait_exit(DEADLINE),
        Some(0),
        "logs: {:?}",
        f.logs.lock().unwrap()
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(3),
        "exited {took:?} after SIGINT with shutdown_timeout = 1s"
    );
    assert!(f.wait_log("shutdown_timeout passed", DEADLINE).is_some());
    // The unfinished request is cut, not answered.
    let (code, out, _) = client.join().expect("client thread");
    assert_ne!(code, 0, "curl got an answer: {out}");
}
