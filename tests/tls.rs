//! TLS end to end: certificates by SNI, TLS 1.2 and 1.3 with curl and openssl,
//! certificate reload with an open connection, bad certificates at startup and
//! on reload, redirect to https with ACME webroot challenges, and `https`
//! upstreams (pooled, verified, health-checked) in front of TLS backends.
//! Certificates are made at test time with rcgen; everything stays on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use common::*;
use ferry::demo::Backend;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// ferry over `backends` with a `[tls]` listener for these (cert, key) pairs:
/// the process, its TLS address and the config text.
fn tls_ferry(backends: &Backends, certs: &[(PathBuf, PathBuf)]) -> (Ferry, SocketAddr, String) {
    let cfg = format!(
        "{}\n{}",
        config("", &backends.servers("")),
        tls_section(certs)
    );
    let f = Ferry::start(&cfg);
    let addr = tls_addr(&f);
    (f, addr, cfg)
}

/// `openssl s_client` to `addr` with this SNI name (none: `-noservername`);
/// its output (the certificate's subject among it).
fn s_client(addr: SocketAddr, sni: Option<&str>) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &addr.to_string()]);
    match sni {
        Some(n) => cmd.args(["-servername", n]),
        None => cmd.arg("-noservername"),
    };
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl installed");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // OpenSSL 3 writes `CN = a.test`; compare without spaces.
    text.replace(' ', "")
}

/// A keep-alive HTTPS client connection (tokio-rustls + hyper), driven on its
/// own runtime.
struct TlsConn {
    rt: tokio::runtime::Runtime,
    tx: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    /// The certificate the server presented.
    cert: CertificateDer<'static>,
}

impl TlsConn {
    fn open(addr: SocketAddr, name: &str, ca_pem: &str) -> TlsConn {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.expect("ca")).expect("add ca");
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let name = ServerName::try_from(name.to_owned()).expect("name");
        let (tx, cert) = rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let tls = connector.connect(name, tcp).await.expect("TLS handshake");
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first().cloned())
                .expect("a server certificate");
            let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .expect("http handshake");
            tokio::spawn(conn);
            (tx, cert)
        });
        TlsConn { rt, tx, cert }
    }

    /// GET `path` on this connection; (status, body).
    fn get(&mut self, path: &str) -> (u16, String) {
        let tx = &mut self.tx;
        self.rt.block_on(async {
            let resp = send_get(tx, path).await;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            (status, String::from_utf8_lossy(&body).to_string())
        })
    }
}

/// GET `path` for host a.test on `tx`: the response head, its body unread.
async fn send_get(
    tx: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
) -> http::Response<hyper::body::Incoming> {
    tx.ready().await.expect("connection still open");
    let req = http::Request::get(path)
        .header("host", "a.test")
        .body(Empty::new())
        .expect("request");
    tokio::time::timeout(DEADLINE, tx.send_request(req))
        .await
        .expect("answered in time")
        .expect("response")
}

#[test]
fn a_streamed_response_body_goes_out_over_tls_as_it_arrives() {
    let backends = Backends::start(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pki(dir.path());
    let (_f, addr, _) = tls_ferry(&backends, std::slice::from_ref(&p.a_files));
    let c = TlsConn::open(addr, "a.test", &p.ca.pem());
    let TlsConn { rt, mut tx, .. } = c;
    rt.block_on(async {
        let resp = send_get(&mut tx, "/hold").await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        // The first part arrives while the backend still holds the rest back:
        // ferry does not keep it in its TLS buffer.
        let first = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .expect("first part before the rest")
            .expect("a frame")
            .expect("no error");
        assert_eq!(first.into_data().expect("data"), "first part\n");
        backends.get(0).knobs.release.notify_one();
        let rest = body.collect().await.expect("rest").to_bytes();
        assert_eq!(rest, "second part\n");
    });
}

/// An upstream "app" with these extra keys over one server at `addr`.
fn app_upstream(keys: &str, addr: SocketAddr) -> String {
    format!("[[upstream]]\nname = \"app\"\n{keys}\n[[upstream.server]]\naddr = \"{addr}\"\n")
}

/// A CA, two leaves (a.test, b.test) written to `dir`.
struct Pki {
    ca: Ca,
    ca_file: PathBuf,
    a: Leaf,
    b: Leaf,
    a_files: (PathBuf, PathBuf),
    b_files: (PathBuf, PathBuf),
}

fn pki(dir: &Path) -> Pki {
    let ca = Ca::new("ferry test CA");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write ca");
    let a = ca.leaf(&["a.test", "www.a.test"]);
    let b = ca.leaf(&["b.test"]);
    let a_files = a.write(dir, "a");
    let b_files = b.write(dir, "b");
    Pki {
        ca,
        ca_file,
        a,
        b,
        a_files,
        b_files,
    }
}

#[test]
fn sni_picks_the_certificate_over_tls_1_2_and_1_3() {
    let backends = Backends::start(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pki(dir.path());
    let (f, addr, _) = tls_ferry(&backends, &[p.a_files.clone(), p.b_files.clone()]);

    // TLS 1.3 and 1.2, each name gets its own certificate; X-Forwarded-Proto is https.
    for (name, version) in [
        ("a.test", ["--tlsv1.3", "--tlsv1.3"]),
        ("b.test", ["--tlsv1.3", "--tlsv1.3"]),
        ("a.test", ["--tlsv1.2", "--tls-max"]),
        ("b.test", ["--tlsv1.2", "--tls-max"]),
    ] {
        let mut extra = vec!["-v"];
        let tls12 = version[1] == "--tls-max";
        if tls12 {
            extra.extend_from_slice(&["--tlsv1.2", "--tls-max", "1.2"]);
        } else {
            extra.push("--tlsv1.3");
        }
        let (code, out, err) = curl_https(addr, name, &p.ca_file, "/echo", &extra);
        assert_eq!(code, 0, "{name}: {err}");
        assert!(out.contains("x-forwarded-proto: https"), "{out}");
        assert!(err.contains(&format!("CN={name}")), "{name}: {err}");
        let want = if tls12 { "TLSv1.2" } else { "TLSv1.3" };
        assert!(err.contains(want), "{want} not in {err}");
        // curl offers h2 and http/1.1; ferry prefers HTTP/2.
        assert!(err.contains("ALPN: server accepted h2"), "{err}");
    }
    // A client that offers only HTTP/1.1 gets it.
    let (code, out, err) = curl_https(addr, "a.test", &p.ca_file, "/echo", &["-v", "--http1.1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("x-forwarded-proto: https"), "{out}");
    assert!(err.contains("ALPN: server accepted http/1.1"), "{err}");
    // A wildcard-free second name of the first certificate.
    let (code, _, err) = curl_https(addr, "www.a.test", &p.ca_file, "/", &[]);
    assert_eq!(code, 0, "{err}");
    // No SNI, or a name no certificate has: the first certificate.
    assert!(s_client(addr, None).contains("CN=a.test"));
    assert!(s_client(addr, Some("c.test")).contains("CN=a.test"));
    assert!(s_client(addr, Some("b.test")).contains("CN=b.test"));
    // curl refuses the default certificate for a name it does not cover.
    let (code, _, _) = curl_https(addr, "c.test", &p.ca_file, "/", &[]);
    assert_ne!(code, 0);
    assert!(f.metric_sum("ferry_tls_handshakes_total", &[]) >= 5.0);
    assert!(f.metric("ferry_tls_handshakes_total{kind=\"full\"}") >= 1.0);
}

#[test]
fn a_failed_handshake_disturbs_nothing_and_is_counted() {
    let backends = Backends::start(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pki(dir.path());
    let (f, addr, cfg) = tls_ferry(&backends, std::slice::from_ref(&p.a_files));
    let mut open = TlsConn::open(addr, "a.test", &p.ca.pem());
    assert_eq!(open.get("/").0, 200);
    // Plain HTTP spoken to the TLS port, then garbage: both fail their handshake.
    let raw = raw_exchange(addr, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n");
    assert!(!String::from_utf8_lossy(&raw).contains("200 OK"));
    raw_exchange(addr, &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]);
    assert!(wait_until(DEADLINE, || {
        f.metric("ferry_tls_handshake_errors_total") >= 2.0
    }));
    // The open connection and new ones carry on.
    assert_eq!(open.get("/").0, 200);
    let (code, _, err) = curl_https(addr, "a.test", &p.ca_file, "/", &[]);
    assert_eq!(code, 0, "{err}");
    // Only the open connection is still counted (stub_status).
    assert!(wait_until(DEADLINE, || {
        stub_active(&f.admin_get("/stub_status")) == 1
    }));
    drop(open);
    assert!(wait_until(DEADLINE, || {
        stub_active(&f.admin_get("/stub_status")) == 0
    }));
    // A client that connects and sends nothing is cut at client_header_timeout.
    let cfg2 = cfg.replace(
        "workers = 1\n",
        "workers = 1\nclient_header_timeout = \"300ms\"\n",
    );
    let f2 = Ferry::start(&cfg2);
    let addr2 = tls_addr(&f2);
    let mut silent = RawConn::connect(addr2);
    assert!(silent.wait_closed(DEADLINE).is_some());
    assert!(wait_until(DEADLINE, || {
        f2.metric("ferry_tls_handshake_errors_total") >= 1.0
    }));
}

#[test]
fn reload_serves_new_certificates_and_keeps_open_connections() {
    let backends = Backends::start(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pki(dir.path());
    let (f, addr, _) = tls_ferry(&backends, std::slice::from_ref(&p.a_files));
    let mut before = TlsConn::open(addr, "a.test", &p.ca.pem());
    assert_eq!(before.cert, p.a.der);
    assert_eq!(before.get("/").0, 200);

    // Renewal: the same paths get a new certificate and key; SIGHUP.
    let renewed = p.ca.leaf(&["a.test"]);
    renewed.write(dir.path(), "a");
    f.signal("HUP");
    assert!(
        f.wait_log("configuration reloaded", DEADLINE).is_some(),
        "{:?}",
        f.logs.lock().unwrap()
    );
    let mut after = TlsConn::open(addr, "a.test", &p.ca.pem());
    assert_eq!(
        after.cert, renewed.der,
        "new connections get the new certificate"
    );
    assert_eq!(after.get("/").0, 200);
    // The connection opened before the reload still serves requests.
    assert_eq!(before.get("/").0, 200);
    assert_eq!(before.get("/").0, 200);

    // A broken certificate file on reload: the old certificates stay.
    std::fs::write(&p.a_files.0, "not a certificate\n").expect("write");
    let (status, body) = http_post(f.admin.expect("admin"), "/reload");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("tls.certificate[0].cert"), "{body}");
    assert!(body.contains(&p.a_files.0.display().to_string()), "{body}");
    assert!(body.contains("no certificate"), "{body}");
    let mut still = TlsConn::open(addr, "a.test", &p.ca.pem());
    assert_eq!(still.cert, renewed.der);
    assert_eq!(still.get("/").0, 200);
    assert_eq!(before.get("/").0, 200);
    // A key that is not the certificate's: refused the same way.
    renewed.write(dir.path(), "a");
    std::fs::write(&p.a_files.1, &p.b.key_pem).expect("write");
    let (status, body) = http_post(f.admin.expect("admin"), "/reload");
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("does not belong to the certificate"),
        "{body}"
    );
    assert!(f.metric("ferry_config_reloads_total{result=\"error\"}") >= 2.0);

    // Reload adds and removes TLS listeners like plain ones.
    std::fs::write(&p.a_files.1, &renewed.key_pem).expect("write");
    let text = std::fs::read_to_string(&f.config).expect("config");
    let two = text.replace(
        "[tls]\nlisten = [\"127.0.0.1:0\"]",
        &format!(
            "[tls]\nlisten = [\"127.0.0.1:{}\", \"127.0.0.1:0\"]",
            addr.port()
        ),
    );
    std::fs::write(&f.config, two).expect("write config");
    let (status, body) = http_post(f.admin.expect("admin"), "/reload");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("listeners +1 -0"), "{body}");
    assert_eq!(before.get("/").0, 200);
}

/// GET `path` with this Host on a raw connection.
fn get_host(c: &mut RawConn, path: &str, host: &str) -> RawResponse {
    c.send(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
    c.read_response(false)
}

/// POST with no body and `Connection: close`; (status, body).
fn http_post(addr: SocketAddr, path: &str) -> (u16, String) {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    parse_response(&raw_exchange(addr, req.as_bytes()))
}

#[test]
fn bad_certificates_stop_startup_and_fail_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pki(dir.path());
    let missing = dir.path().join("missing.pem");
    let cases: Vec<(String, &str)> = vec![
        (
            tls_section(&[(missing.clone(), p.a_files.1.clone())]),
            "cannot read",
        ),
        (
            tls_section(&[(p.a_files.1.clone(), p.a_files.1.clone())]),
            "no certificate",
        ),
        (
            tls_section(&[(p.a_files.0.clone(), p.a_files.0.clone())]),
            "no private key",
        ),
        (
            tls_section(&[(p.a_files.0.clone(), p.b_files.1.clone())]),
            "does not belong to the certificate",
        ),
    ];
    for (tls, want) in cases {
        let text = format!(
            "{}\n{tls}",
            config("", "[[upstream.server]]\naddr = \"127.0.0.1:9\"\n")
        );
        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, &text).expect("write");
        for check in [true, false] {
            let mut cmd = Command::new(bin());
            if check {
                cmd.arg("check");
            }
            let out = cmd.arg("--config").arg(&path).output().expect("run ferry");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "check={check} {want}: {err}");
            assert!(err.contains(want), "{want:?} not in {err}");
            assert!(err.contains("ferry.toml:"), "{err}");
            assert!(err.contains("tls.certificate[0]"), "{err}");
        }
    }
    // An https upstream's CA file is checked the same way.
    let text = config(
        &format!(
            "scheme = \"https\"\ntls_ca_file = \"{}\"",
            p.a_files.1.display()
        ),
        "[[upstream.server]]\naddr = \"127.0.0.1:9\"\n",
    );
    let path = dir.path().join("ca.toml");
    std::fs::write(&path, text).expect("write");
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run ferry");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("upstream[0].tls_ca_file"), "{err}");
    assert!(err.contains("no certificate"), "{err}");
    // A good file passes check, which lists the certificate's names.
    let text = format!(
        "{}\n{}",
        config("", "[[upstream.server]]\naddr = \"127.0.0.1:9\"\n"),
        tls_section(std::slice::from_ref(&p.a_files))
    );
    let path = dir.path().join("good.toml");
    std::fs::write(&path, text).expect("write");
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run ferry");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("a.test www.a.test"), "{stdout}");
}

#[test]
fn redirect_to_https_and_acme_challenges() {
    let backends = Backends::start(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pki(dir.path());
    let webroot = dir.path().join("certbot");
    let challenges = webroot.join(".well-known/acme-challenge");
    std::fs::create_dir_all(&challenges).expect("mkdir");
    std::fs::write(challenges.join("tok_EN-123"), "tok_EN-123.keyauth").expect("write");
    std::fs::write(dir.path().join("secret"), "secret").expect("write");
    let cfg = config("", &backends.servers("")).replace(
        "workers = 1\n",
        &format!(
            "workers = 1\nredirect_https = true\nacme_webroot = \"{}\"\n",
            webroot.display()
        ),
    ) + "\n"
        + &tls_section(std::slice::from_ref(&p.a_files));
    let f = Ferry::start(&cfg);
    let tls = tls_addr(&f);

    let mut c = RawConn::connect(f.addr);
    let r = get_host(&mut c, "/shop/cart?id=7&x=%20", "Shop.Example.com:8080");
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location"),
        Some("https://shop.example.com/shop/cart?id=7&x=%20")
    );
    // The challenge file, as certbot --webroot writes it.
    let r = c.request("GET", "/.well-known/acme-challenge/tok_EN-123", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "tok_EN-123.keyauth");
    assert_eq!(r.header("content-type"), Some("text/plain"));
    let r = c.request("GET", "/.well-known/acme-challenge/nope", &[]);
    assert_eq!(r.status, 404);
    for bad in [
        "/.well-known/acme-challenge/../../secret",
        "/.well-known/acme-challenge/..%2f..%2fsecret",
        "/.well-known/acme-challenge/x/../../../secret",
        "/.well-known/acme-challenge/",
    ] {
        let r = c.request("GET", bad, &[]);
        assert_eq!(r.status, 404, "{bad}");
        assert!(!r.text().contains("secret"), "{bad}");
    }
    // A host that is not a host name is not echoed into a Location.
    let r = get_host(&mut c, "/", "evil.test/x");
    assert_eq!(r.status, 400);
    assert_eq!(
        backends.get(0).served.load(Relaxed),
        0,
        "nothing proxied on the plain listener"
    );
    // The TLS listener never redirects: it proxies.
    let (code, out, err) = curl_https(
        tls,
        "a.test",
        &p.ca_file,
        "/.well-known/acme-challenge/tok_EN-123",
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hello from b1"), "{out}");
    let (code, out, err) = curl_https(tls, "a.test", &p.ca_file, "/shop", &["-i"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    // curl follows the redirect to the TLS listener.
    let (code, out, err) = curl(&[
        "-L",
        "--cacert",
        p.ca_file.to_str().expect("path"),
        "--resolve",
        &format!("a.test:{}:127.0.0.1", f.addr.port()),
        "--connect-to",
        &format!("a.test:443:127.0.0.1:{}", tls.port()),
        &format!("http://a.test:{}/echo", f.addr.port()),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("x-forwarded-proto: https"), "{out}");
}

/// A TLS backend whose certificate (from `ca`) is for `names`.
fn tls_backend(backends: &Backends, ca: &Ca, names: &[&str], label: &str) -> Backend {
    let leaf = ca.leaf(names);
    backends
        .rt
        .block_on(Backend::start_tls(
            "127.0.0.1:0".parse().expect("addr"),
            label,
            leaf.server_config(),
        ))
        .expect("tls backend")
}

#[test]
fn https_upstream_pools_verifies_and_health_checks() {
    let backends = Backends::start(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pki(dir.path());
    // Verified against the IP SAN of the server's address, and by tls_server_name.
    let by_ip = tls_backend(&backends, &p.ca, &["127.0.0.1"], "by-ip");
    let by_name = tls_backend(&backends, &p.ca, &["api.internal"], "by-name");
    let cfg = ferry_config(
        "",
        "",
        &format!(
            "[[upstream]]\nname = \"ip\"\nscheme = \"https\"\ntls_ca_file = \"{ca}\"\n\
             [[upstream.server]]\naddr = \"{}\"\n\
             [upstream.health_check]\npath = \"/\"\ninterval = \"200ms\"\n\n\
             [[upstream]]\nname = \"named\"\nscheme = \"https\"\ntls_ca_file = \"{ca}\"\n\
             tls_server_name = \"api.internal\"\n[[upstream.server]]\naddr = \"{}\"\n\n{}{}",
            by_ip.addr,
            by_name.addr,
            route("ip.test", "/", "ip"),
            route("named.test", "/", "named"),
            ca = p.ca_file.display(),
        ),
    );
    let f = Ferry::start(&cfg);
    // 300 requests on 3 client connections: the pool keeps a few TLS connections.
    for host in ["ip.test", "named.test"] {
        for _ in 0..3 {
            let mut c = RawConn::connect(f.addr);
            for _ in 0..100 {
                let r = get_host(&mut c, "/echo", host);
                assert_eq!(r.status, 200, "{host}: {}", r.text());
            }
        }
    }
    for b in [&by_ip, &by_name] {
        assert_eq!(b.served.load(Relaxed), 300, "{}", b.name);
        let conns = b.connections.load(Relaxed);
        let checks = b.checks.load(Relaxed);
        // Health checks open a connection each; requests reuse pooled ones.
        assert!(
            conns.saturating_sub(checks) <= 3,
            "{}: {conns} connections ({checks} checks) for 300 requests",
            b.name
        );
    }
    let connects = f.metric_sum("ferry_upstream_connects_total", &["upstream=\"named\""]);
    assert!(connects <= 3.0, "{connects} connects for 300 requests");
    // Active health checks speak TLS too.
    assert!(wait_until(DEADLINE, || by_ip.checks.load(Relaxed) >= 2));
    assert!(
        f.logs
            .lock()
            .unwrap()
            .iter()
            .all(|l| !l.contains("unhealthy"))
    );
}

#[test]
fn https_upstream_verification_failure_is_a_connect_error() {
    let backends = Backends::start(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pki(dir.path());
    let stranger = Ca::new("another CA");
    let wrong = tls_backend(&backends, &stranger, &["127.0.0.1"], "wrong");
    let good = tls_backend(&backends, &p.ca, &["127.0.0.1"], "good");
    // Two peers: the one whose certificate does not verify passes each request on.
    let cfg = ferry_config(
        "",
        "format = \"json\"\naccess = \"stdout\"",
        &format!(
            "[[upstream]]\nname = \"app\"\nscheme = \"https\"\ntls_ca_file = \"{}\"\n\
             [[upstream.server]]\naddr = \"{}\"\nmax_fails = 0\n\
             [[upstream.server]]\naddr = \"{}\"\n",
            p.ca_file.display(),
            wrong.addr,
            good.addr
        ),
    );
    let f = Ferry::start(&cfg);
    let mut c = RawConn::connect(f.addr);
    for _ in 0..10 {
        let r = c.request("GET", "/", &[]);
        assert_eq!(r.status, 200);
        assert!(r.text().contains("hello from good"));
    }
    assert_eq!(wrong.served.load(Relaxed), 0);
    let fails = f.metric_sum(
        "ferry_upstream_fails_total",
        &["reason=\"connect\"", &format!("peer=\"{}\"", wrong.addr)],
    );
    assert!(fails >= 1.0, "{fails}");
    let line = f
        .wait_log("TLS handshake failed", DEADLINE)
        .expect("the failure is logged");
    assert!(line.contains("invalid peer certificate"), "{line}");

    // Only the wrong peer: 502, with the reason in the access log.
    let cfg = ferry_config(
        "",
        "format = \"json\"\naccess = \"stdout\"",
        &app_upstream(
            &format!(
                "scheme = \"https\"\ntls_ca_file = \"{}\"",
                p.ca_file.display()
            ),
            wrong.addr,
        ),
    );
    let f = Ferry::start(&cfg);
    let (status, _) = http_get(f.addr, "/", &[]);
    assert_eq!(status, 502);
    assert!(
        f.wait_log("upstream TLS handshake failed", DEADLINE)
            .is_some()
    );
    // tls_verify = false accepts it.
    let cfg = ferry_config(
        "",
        "",
        &app_upstream("scheme = \"https\"\ntls_verify = false", wrong.addr),
    );
    let f = Ferry::start(&cfg);
    assert_eq!(http_get(f.addr, "/", &[]).0, 200);
}

/// `scheme = "h2"` to a TLS server that speaks only HTTP/1.1 (no ALPN `h2`): a
/// connect error (502, counted against the peer), never HTTP/1.1 instead.
#[test]
fn h2_upstream_refuses_a_server_without_alpn_h2() {
    let backends = Backends::start(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pki(dir.path());
    let h1_only = tls_backend(&backends, &p.ca, &["127.0.0.1"], "h1only");
    let cfg = ferry_config(
        "",
        "",
        &app_upstream(
            &format!("scheme = \"h2\"\ntls_ca_file = \"{}\"", p.ca_file.display()),
            h1_only.addr,
        ),
    );
    let f = Ferry::start(&cfg);
    let (status, _) = http_get(f.addr, "/", &[]);
    assert_eq!(status, 502);
    assert_eq!(h1_only.served.load(Relaxed), 0);
    let fails = f.metric_sum("ferry_upstream_fails_total", &["reason=\"connect\""]);
    assert!(fails >= 1.0, "{fails}");
    let line = f
        .wait_log("did not agree to HTTP/2", DEADLINE)
        .expect("the reason is logged");
    assert!(line.contains(&h1_only.addr.to_string()), "{line}");
}
