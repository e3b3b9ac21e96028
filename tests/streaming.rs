//! End-to-end: bodies stream through ferry; a 1 GiB upload and a 1 GiB download
//! do not grow ferry's memory.
mod common;
use common::*;

use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

const GIB: u64 = 1 << 30;
/// Most ferry's peak RSS may grow while streaming 1 GiB each way.
const MAX_GROWTH_KIB: u64 = 50 * 1024;

/// Run a shell pipeline; (exit code, stdout, stderr).
fn sh(script: &str) -> (i32, String, String) {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("sh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn one_gib_upload_and_download_stream_in_bounded_memory() {
    let b = Backends::start(1);
    // client_max_body_size = "0": no limit on the request body.
    let cfg = config("", &b.servers("")).replace(
        "workers = 1\n",
        "workers = 1\nclient_max_body_size = \"0\"\n",
    );
    assert!(cfg.contains("client_max_body_size = \"0\""));
    let f = Ferry::start(&cfg);
    // Warm up: first connections, pools, buffers.
    assert_eq!(http_get(f.addr, "/bytes/1048576", &[]).0, 200);
    let (_, hwm_before) = f.rss_kib();
    assert!(hwm_before > 0, "cannot read /proc/{}/status", f.pid());

    // Upload: a generator piped into curl, chunked (size unknown up front).
    let t = Instant::now();
    let (code, out, err) = sh(&format!(
        "head -c {GIB} /dev/zero | curl -sS --max-time 600 -o /dev/null \
         -w '%{{http_code}}' -X POST -H 'Content-Type: application/octet-stream' \
         -T - {}",
        f.url("/upload")
    ));
    let upload_took = t.elapsed();
    assert_eq!(code, 0, "curl: {err}");
    assert_eq!(out, "200", "{err}");
    assert_eq!(
        b.get(0).received.load(Relaxed),
        GIB,
        "the backend got every byte"
    );

    // Upload with a known size: Content-Length, from a sparse file.
    let file = f.dir.path().join("gib.bin");
    std::fs::File::create(&file)
        .and_then(|h| h.set_len(GIB))
        .expect("sparse file");
    let t = Instant::now();
    let (code, out, err) = curl(&[
        "--max-time",
        "600",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_upload}",
        "-T",
        file.to_str().expect("utf-8 path"),
        &f.url("/upload-sized"),
    ]);
    let sized_took = t.elapsed();
    assert_eq!(code, 0, "curl: {err}");
    assert_eq!(out, format!("200 {GIB}"), "{err}");
    assert_eq!(b.get(0).received.load(Relaxed), 2 * GIB);
    let (_, hwm_upload) = f.rss_kib();

    // Download.
    let t = Instant::now();
    let (code, out, err) = curl(&[
        "--max-time",
        "600",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        &f.url(&format!("/bytes/{GIB}")),
    ]);
    let download_took = t.elapsed();
    assert_eq!(code, 0, "curl: {err}");
    assert_eq!(out, format!("200 {GIB}"), "{err}");
    let (_, hwm_after) = f.rss_kib();

    println!(
        "upload 1 GiB in {upload_took:?} (chunked), {sized_took:?} (Content-Length), download 1 GiB in {download_took:?}; \
         ferry VmHWM {hwm_before} KiB before, {hwm_upload} KiB after the uploads, {hwm_after} KiB after the download"
    );
    assert!(
        hwm_after.saturating_sub(hwm_before) < MAX_GROWTH_KIB,
        "ferry's peak RSS grew from {hwm_before} KiB to {hwm_after} KiB"
    );
    assert_eq!(
        f.metric_sum("ferry_http_requests_total", &["code=\"200\""]),
        4.0
    );
}

/// A client that stops reading holds the upstream back: ferry does not buffer
/// the rest of a large response in memory meanwhile.
#[test]
fn stalled_client_does_not_make_ferry_buffer_the_response() {
    use std::io::{Read, Write};
    const SIZE: u64 = 512 << 20;
    let b = Backends::start(1);
    let f = Ferry::start(&config("", &b.servers("")));
    assert_eq!(http_get(f.addr, "/bytes/1048576", &[]).0, 200);
    let (_, hwm_before) = f.rss_kib();

    let mut s = std::net::TcpStream::connect(f.addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    write!(
        s,
        "GET /bytes/{SIZE} HTTP/1.1\r\nHost: ferry.test\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut buf = vec![0u8; 1 << 20];
    let mut got = s.read(&mut buf).expect("read") as u64;
    // The client stalls: were ferry buffering, it would read the whole body from
    // the backend now. (The stall is the behaviour under test.)
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (_, hwm_stalled) = f.rss_kib();
    loop {
        match s.read(&mut buf).expect("read") {
            0 => break,
            n => got += n as u64,
        }
    }
    let (_, hwm_after) = f.rss_kib();
    println!(
        "stalled client: ferry VmHWM {hwm_before} KiB before, {hwm_stalled} KiB while stalled, {hwm_after} KiB after"
    );
    let head = 4096; // the response head, well under a page
    assert!(got > SIZE && got < SIZE + head, "read {got} bytes");
    assert!(
        hwm_after.saturating_sub(hwm_before) < MAX_GROWTH_KIB,
        "{hwm_before} -> {hwm_after} KiB"
    );
}
