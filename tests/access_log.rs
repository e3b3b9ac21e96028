//! End-to-end access log: nginx combined format plus the upstream fields, JSON
//! lines, `off`, and a 502 that says why.
mod common;
use common::*;

use std::path::{Path, PathBuf};

/// A ferry over `servers` logging to a file in a fresh directory, in `format`.
fn logged(servers: &str, format: &str) -> (Ferry, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let log = format!("access = \"{}\"\nformat = \"{format}\"", path.display());
    let f = Ferry::start(&ferry_config(
        "",
        &log,
        &format!("[[upstream]]\nname = \"app\"\n{servers}"),
    ));
    (f, path, dir)
}

/// The file's lines once it has at least `n` (polling; the writer is a thread).
fn lines(path: &Path, n: usize) -> Vec<String> {
    let read = || -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    wait_until(DEADLINE, || read().len() >= n);
    read()
}

/// Walks a log line left to right, checking each part.
struct Scan<'a> {
    rest: &'a str,
    line: &'a str,
}

impl<'a> Scan<'a> {
    fn new(line: &'a str) -> Scan<'a> {
        Scan { rest: line, line }
    }

    fn fail(&self, what: &str) -> ! {
        panic!("expected {what} at {:?} in\n{}", self.rest, self.line)
    }

    fn lit(&mut self, s: &str) -> &mut Self {
        match self.rest.strip_prefix(s) {
            Some(r) => self.rest = r,
            None => self.fail(&format!("{s:?}")),
        }
        self
    }

    /// `n` ASCII digits exactly.
    fn digits(&mut self, n: usize) -> &mut Self {
        if self.rest.len() < n || !self.rest.as_bytes()[..n].iter().all(u8::is_ascii_digit) {
            self.fail(&format!("{n} digits"));
        }
        self.rest = &self.rest[n..];
        self
    }

    /// One or more digits; their value.
    fn number(&mut self) -> u64 {
        let end = self
            .rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(self.rest.len());
        if end == 0 {
            self.fail("a number");
        }
        let v = self.rest[..end]
            .parse()
            .unwrap_or_else(|_| self.fail("a number"));
        self.rest = &self.rest[end..];
        v
    }

    /// Seconds with millisecond resolution: `\d+\.\d{3}`.
    fn seconds(&mut self) -> &mut Self {
        self.number();
        self.lit(".").digits(3)
    }

    /// `n` ASCII letters.
    fn letters(&mut self, n: usize) -> &mut Self {
        if self.rest.len() < n
            || !self.rest.as_bytes()[..n]
                .iter()
                .all(u8::is_ascii_alphabetic)
        {
            self.fail(&format!("{n} letters"));
        }
        self.rest = &self.rest[n..];
        self
    }

    /// Everything up to (not including) `c`, at least one character.
    fn until(&mut self, c: char) -> &'a str {
        let end = self
            .rest
            .find(c)
            .unwrap_or_else(|| self.fail(&format!("{c:?}")));
        if end == 0 {
            self.fail("a non-empty field");
        }
        let (v, r) = self.rest.split_at(end);
        self.rest = r;
        v
    }

    fn end(&mut self) {
        if !self.rest.is_empty() {
            self.fail("the end of the line");
        }
    }

    /// `[dd/Mon/yyyy:hh:mm:ss +0000] `
    fn time_local(&mut self) -> &mut Self {
        self.lit("[")
            .digits(2)
            .lit("/")
            .letters(3)
            .lit("/")
            .digits(4);
        self.lit(":")
            .digits(2)
            .lit(":")
            .digits(2)
            .lit(":")
            .digits(2);
        self.lit(" +0000] ")
    }
}

#[test]
fn combined_format_has_nginx_fields_and_upstream_timing() {
    let b = Backends::start(1);
    let (f, path, _dir) = logged(&b.servers(""), "combined");
    let n = 5;
    let mut sizes = Vec::new();
    for _ in 0..n {
        let (code, out, err) = curl(&[&f.url("/x")]);
        assert_eq!(code, 0, "{err}");
        sizes.push(out.len() as u64);
    }
    let got = lines(&path, n);
    assert_eq!(got.len(), n, "{got:#?}");
    let peer_port = b.get(0).addr.port();
    for (line, size) in got.iter().zip(&sizes) {
        // ^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /x HTTP/1.1" 200 \d+
        // "-" "curl/[^"]+" 127\.0\.0\.1:\d+ 200 \d+\.\d{3} \d+\.\d{3}$
        let mut s = Scan::new(line);
        s.lit("127.0.0.1 - - ")
            .time_local()
            .lit("\"GET /x HTTP/1.1\" 200 ");
        assert_eq!(s.number(), *size, "$body_bytes_sent in {line}");
        s.lit(" \"-\" \"curl/");
        s.until('"');
        s.lit("\" 127.0.0.1:");
        assert_eq!(s.number(), u64::from(peer_port), "$upstream_addr in {line}");
        s.lit(" 200 ").seconds().lit(" ").seconds().end();
    }
    // The date is today's, in UTC, the way nginx writes it.
    let today = ferry::accesslog::time_local(std::time::SystemTime::now());
    let (day, _) = today.split_once(':').expect("date");
    assert!(
        got[0].contains(&format!("[{day}:")),
        "{} vs {today}",
        got[0]
    );
}

#[test]
fn json_format_lines_parse_with_status_and_upstreams() {
    let b = Backends::start(1);
    let (f, path, _dir) = logged(&b.servers(""), "json");
    // A user agent with a quote and a backslash: the line must still parse.
    let agent = r#"tester "quoted" \ back"#;
    for p in ["/a?q=1", "/status/503", "/bytes/1234"] {
        let (code, _, err) = curl(&["-A", agent, &f.url(p)]);
        assert_eq!(code, 0, "{err}");
    }
    let got = lines(&path, 3);
    assert_eq!(got.len(), 3, "{got:#?}");
    let docs: Vec<serde_json::Value> = got
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let addr = b.get(0).addr.to_string();
    for (d, (uri, status)) in
        docs.iter()
            .zip([("/a?q=1", 200), ("/status/503", 503), ("/bytes/1234", 200)])
    {
        assert_eq!(d["uri"], uri, "{d}");
        assert_eq!(d["method"], "GET", "{d}");
        assert_eq!(d["status"], status, "{d}");
        assert_eq!(d["remote_addr"], "127.0.0.1", "{d}");
        let ups = d["upstreams"].as_array().expect("upstreams array");
        assert_eq!(ups.len(), 1, "{d}");
        assert_eq!(ups[0]["addr"], addr.as_str(), "{d}");
        assert_eq!(ups[0]["status"], status, "{d}");
        assert!(
            ups[0]["response_time"].is_f64() || ups[0]["response_time"].is_u64(),
            "{d}"
        );
        assert!(d["request_time"].is_number(), "{d}");
        assert_eq!(d["http_user_agent"], agent, "{d}");
    }
    assert_eq!(docs[2]["body_bytes_sent"], 1234);
}

#[test]
fn off_writes_nothing_and_stdout_writes_lines() {
    let b = Backends::start(1);
    let run = |access: &str| -> Ferry {
        let log = format!("access = \"{access}\"");
        let f = Ferry::start(&ferry_config("", &log, &upstream("app", &[b.get(0)])));
        for _ in 0..3 {
            assert_eq!(http_get(f.addr, "/x", &[]).0, 200);
        }
        f
    };
    // stdout first: it shows what a logged request looks like, and that three
    // requests show up well within the deadline.
    let on = run("stdout");
    assert!(on.wait_log("\"GET /x HTTP/1.1\" 200", DEADLINE).is_some());
    assert!(wait_until(DEADLINE, || on.stdout.lock().unwrap().len() == 3));

    let off = run("off");
    // Absence needs a wait: the writer flushes within 500 ms, so 1.5 s is plenty.
    let quiet = !wait_until(std::time::Duration::from_millis(1500), || {
        !off.stdout.lock().unwrap().is_empty()
    });
    assert!(quiet, "{:?}", off.stdout.lock().unwrap());
}

#[test]
fn a_502_logs_why() {
    let (dead1, dead2) = (closed_port(), closed_port());
    // "dead": two peers that refuse connections; "off": its only peer is down.
    let rest = format!(
        "[[upstream]]\nname = \"dead\"\n\
         [[upstream.server]]\naddr = \"{dead1}\"\n[[upstream.server]]\naddr = \"{dead2}\"\n\n\
         [[upstream]]\nname = \"off\"\n[[upstream.server]]\naddr = \"{dead1}\"\ndown = true\n\n{}{}",
        route("*", "/", "dead"),
        route("*", "/off/", "off"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let log = format!("access = \"{}\"\nformat = \"combined\"", path.display());
    let f = Ferry::start(&ferry_config("", &log, &rest));
    for target in ["/pay", "/off/pay"] {
        let (status, body) = http_get(f.addr, target, &[]);
        assert_eq!(status, 502, "{target}: {body}");
    }
    let got = lines(&path, 2);
    assert_eq!(got.len(), 2, "{got:#?}");

    // ... 502 16 "-" "-" A, B 502, 502 0.000, 0.000 0.001 "upstream error"
    // (nginx writes 502 as $upstream_status of an attempt that got no response)
    let mut s = Scan::new(&got[0]);
    s.lit("127.0.0.1 - - ")
        .time_local()
        .lit("\"GET /pay HTTP/1.1\" 502 ");
    s.number();
    s.lit(" \"-\" \"-\" ");
    let tried = [s.until(','), s.lit(", ").until(' ')];
    let (a, b) = (dead1.to_string(), dead2.to_string());
    assert!(tried == [&a, &b] || tried == [&b, &a], "{}", got[0]);
    s.lit(" 502, 502 ")
        .seconds()
        .lit(", ")
        .seconds()
        .lit(" ")
        .seconds();
    s.lit(" \"upstream error\"").end();

    // Nothing could be tried: no upstream fields, and the note says why.
    let mut s = Scan::new(&got[1]);
    s.lit("127.0.0.1 - - ")
        .time_local()
        .lit("\"GET /off/pay HTTP/1.1\" 502 ");
    s.number();
    s.lit(" \"-\" \"-\" - - - ").seconds();
    s.lit(" \"no live upstreams\"").end();
}
