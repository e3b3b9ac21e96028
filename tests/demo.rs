//! `ferry demo`: the newcomer path of the README's first screen.
mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The demo's process, killed when the test ends however it ends: a failed
/// check must not leave it holding its ports for the tests after it.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn demo_serves_on_8080_with_admin_on_9180_and_stops_on_ctrl_c() {
    let mut child = Reaped(
        Command::new(bin())
            .arg("demo")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry demo"),
    );
    let out = Arc::new(Mutex::new(Vec::<String>::new()));
    for r in [
        Box::new(child.0.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.0.stderr.take().unwrap()),
    ] {
        let out = Arc::clone(&out);
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                out.lock().unwrap().push(line);
            }
        });
    }
    let has = |needle: &str| out.lock().unwrap().iter().any(|l| l.contains(needle));
    assert!(
        wait_until(DEADLINE, || has("listening") && has("admin listening")),
        "demo did not start: {:?}",
        out.lock().unwrap()
    );
    // It says what to try.
    assert!(
        has("curl -s http://127.0.0.1:8080/"),
        "{:?}",
        out.lock().unwrap()
    );

    let proxy = "127.0.0.1:8080".parse().unwrap();
    let mut backends = std::collections::HashSet::new();
    for _ in 0..30 {
        let (status, body) = http_get(proxy, "/", &[]);
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("hello from backend-"), "{body}");
        backends.insert(body.split_whitespace().nth(2).unwrap_or("").to_string());
    }
    assert!(backends.len() >= 2, "traffic reached {backends:?}");
    let (status, body) = http_get("127.0.0.1:9180".parse().unwrap(), "/healthz", &[]);
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    // Ctrl-C.
    let st = Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let start = Instant::now();
    let code = loop {
        if let Some(st) = child.0.try_wait().expect("wait") {
            break st.code();
        }
        assert!(start.elapsed() < DEADLINE, "demo did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0), "{:?}", out.lock().unwrap());
}
