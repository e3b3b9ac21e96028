//! TLS: the certificates served on `[tls]` listeners (chosen by SNI) and the
//! client settings of `scheme = "https"` upstreams.
//!
//! [`load`] reads every file the configuration names, at startup, at each reload
//! and for `ferry check`: a file that cannot be used is a configuration error that
//! names the key, the file and what is wrong with it. The loaded settings travel
//! inside the [`Config`], so a reload swaps certificates together with the rest,
//! new connections use the new ones, and open connections keep theirs.

use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;

use crate::config::{CertificateConfig, Config, ConfigError, FileRef, TlsConfig, UpstreamTls};

/// ALPN protocols offered on TLS listeners, most preferred first; `h2` only
/// while `[server] http2` is on. The server dispatches on the protocol
/// negotiated (see `server::serve_tls`).
pub const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// ALPN protocols offered to `scheme = "https"` upstreams.
const UPSTREAM_ALPN: &[&[u8]] = &[b"http/1.1"];

/// ALPN protocols offered to `scheme = "h2"` upstreams.
const UPSTREAM_ALPN_H2: &[&[u8]] = &[b"h2"];

/// The TLS versions ferry speaks, on both sides.
static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The loaded certificates of the `[tls]` listeners.
#[derive(Clone)]
pub struct ServerTls {
    /// Accepts TLS connections with these certificates.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// The DNS names of each certificate, in `[[tls.certificate]]` order.
    pub names: Arc<Vec<Vec<String>>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.names, &other.names)
    }
}

/// The TLS client settings of one `scheme = "https"` upstream.
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    /// `tls_server_name`, when set.
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(self.connector.config(), other.connector.config())
    }
}

impl ClientTls {
    /// The TLS handshake with a peer over `tcp`. `peer_name` is the server's
    /// `addr` as written: its host part is the name sent and verified unless
    /// `tls_server_name` is set (an IP address is verified against IP SANs).
    pub async fn connect(
        &self,
        peer_name: &str,
        tcp: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => name_of_addr(peer_name)?,
        };
        self.connector.connect(name, tcp).await
    }
}

/// The host part of `host:port`, `ip:port` or `[v6]:port`, as a TLS server name.
fn name_of_addr(addr: &str) -> io::Result<ServerName<'static>> {
    let host = match addr.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => addr.rsplit_once(':').map_or(addr, |(h, _)| h),
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    ServerName::try_from(host.to_owned()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("\"{host}\" cannot be a TLS server name; set tls_server_name"),
        )
    })
}

/// Read the certificates, keys and CA files `cfg` names, and keep what they
/// give in `cfg` ([`TlsConfig::loaded`], [`UpstreamTls::loaded`]).
pub fn load(cfg: &mut Config) -> Result<(), ConfigError> {
    if let Some(t) = &cfg.tls {
        let loaded = server_tls(cfg, t)?;
        if let Some(t) = cfg.tls.as_mut() {
            t.loaded = Some(loaded);
        }
    }
    for i in 0..cfg.upstreams.len() {
        if let Some(t) = &cfg.upstreams[i].tls {
            let loaded = client_tls(cfg, t, cfg.upstreams[i].scheme.is_h2())?;
            if let Some(t) = cfg.upstreams[i].tls.as_mut() {
                t.loaded = Some(loaded);
            }
        }
    }
    Ok(())
}

/// An error about the file `f` names.
fn file_error(cfg: &Config, f: &FileRef, what: impl std::fmt::Display) -> ConfigError {
    cfg.error_at(&f.place, format!("{}: {what}", f.path.display()))
}

/// Why a PEM file gave nothing usable.
fn pem_error(e: rustls::pki_types::pem::Error, expected: &str) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::Io(e) => format!("cannot read: {e}"),
        E::NoItemsFound => format!("no {expected} in it (is it a PEM file?)"),
        other => format!("not a valid PEM file: {other:?}"),
    }
}

/// All certificates of a PEM file (leaf first).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| pem_error(e, "certificate"))?;
    let certs = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e, "certificate"))?;
    if certs.is_empty() {
        return Err(
            "no certificate in it (expected a PEM \"-----BEGIN CERTIFICATE-----\" block)".into(),
        );
    }
    Ok(certs)
}

/// One `[[tls.certificate]]`: the chain, the key, that they belong together,
/// and the DNS names the leaf is for.
fn certified_key(
    cfg: &Config,
    c: &CertificateConfig,
    provider: &CryptoProvider,
) -> Result<(Vec<String>, Arc<CertifiedKey>), ConfigError> {
    let chain = read_certs(&c.cert.path).map_err(|m| file_error(cfg, &c.cert, m))?;
    let names: Vec<String> = match webpki::EndEntityCert::try_from(&chain[0]) {
        Ok(leaf) => leaf
            .valid_dns_names()
            .map(str::to_ascii_lowercase)
            .collect(),
        Err(e) => {
            return Err(file_error(
                cfg,
                &c.cert,
                format!("the first certificate cannot be parsed: {e}"),
            ));
        }
    };
    let key = PrivateKeyDer::from_pem_file(&c.key.path)
        .map_err(|e| file_error(cfg, &c.key, pem_error(e, "private key")))?;
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| file_error(cfg, &c.key, format!("unusable private key: {e}")))?;
    let ck = CertifiedKey::new(chain, signer);
    // `Unknown` (the key type cannot tell) passes: the first handshake will.
    if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
        ck.keys_match()
    {
        return Err(file_error(
            cfg,
            &c.key,
            format!(
                "this key does not belong to the certificate in {}",
                c.cert.path.display()
            ),
        ));
    }
    Ok((names, Arc::new(ck)))
}

fn server_tls(cfg: &Config, t: &TlsConfig) -> Result<ServerTls, ConfigError> {
    let provider = provider();
    let mut certs = Vec::with_capacity(t.certificates.len());
    for c in &t.certificates {
        certs.push(certified_key(cfg, c, &provider)?);
    }
    let names = Arc::new(certs.iter().map(|(n, _)| n.clone()).collect());
    let resolver = BySni { certs };
    let tls_error = |e: rustls::Error| cfg.error_at(&t.certificates[0].cert.place, e.to_string());
    let mut sc = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(VERSIONS)
        .map_err(tls_error)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    let offered = if cfg.server.http2 { ALPN } else { &ALPN[1..] };
    sc.alpn_protocols = offered.iter().map(|p| p.to_vec()).collect();
    // Session tickets, as nginx's `ssl_session_tickets on` default: a client
    // that comes back resumes without a full handshake.
    sc.ticketer = rustls::crypto::ring::Ticketer::new().map_err(tls_error)?;
    Ok(ServerTls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(sc)),
        names,
    })
}

fn client_tls(cfg: &Config, t: &UpstreamTls, h2: bool) -> Result<ClientTls, ConfigError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(VERSIONS)
        .map_err(|e| ConfigError {
            file: cfg.path.clone(),
            line: 0,
            col: 0,
            key: String::new(),
            message: e.to_string(),
        })?;
    let mut cc = if !t.verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &t.ca_file {
            Some(f) => {
                let certs = read_certs(&f.path).map_err(|m| file_error(cfg, f, m))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(file_error(
                        cfg,
                        f,
                        "none of its certificates can be used as a CA",
                    ));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    let alpn = if h2 { UPSTREAM_ALPN_H2 } else { UPSTREAM_ALPN };
    cc.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let server_name = match &t.server_name {
        // Validated as a host name or IP address when the file was read.
        Some(n) => match n.parse::<IpAddr>() {
            Ok(ip) => Some(ServerName::IpAddress(ip.into())),
            Err(_) => ServerName::try_from(n.clone()).ok(),
        },
        None => None,
    };
    Ok(ClientTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(cc)),
        server_name,
    })
}

/// Picks the certificate for a handshake by its SNI name: an exact name of a
/// certificate first, then a wildcard (`*.example.com` covers one label), and
/// the first certificate when the client sent no name or one no certificate has.
#[derive(Debug)]
struct BySni {
    certs: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl BySni {
    fn pick(&self, sni: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        if let Some(name) = sni {
            let exact = self
                .certs
                .iter()
                .find(|(names, _)| names.iter().any(|n| n.eq_ignore_ascii_case(name)));
            if let Some((_, ck)) = exact {
                return Some(ck);
            }
            if let Some((_, parent)) = name.split_once('.') {
                let wild = self.certs.iter().find(|(names, _)| {
                    names.iter().any(|n| {
                        n.strip_prefix("*.")
                            .is_some_and(|p| p.eq_ignore_ascii_case(parent))
                    })
                });
                if let Some((_, ck)) = wild {
                    return Some(ck);
                }
            }
        }
        self.certs.first().map(|(_, ck)| ck)
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name()).cloned()
    }
}

/// `tls_verify = false`: any certificate is accepted (the handshake's
/// signatures are still checked, so the session is encrypted to whoever holds
/// the certificate's key, only not authenticated).
#[derive(Debug)]
struct NoVerify(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<CertifiedKey> {
        let kp = rcgen::KeyPair::generate().unwrap();
        let der = rustls::pki_types::PrivatePkcs8KeyDer::from(kp.serialize_der()).into();
        let signer = provider().key_provider.load_private_key(der).unwrap();
        Arc::new(CertifiedKey::new(Vec::new(), signer))
    }

    #[test]
    fn sni_exact_name_then_wildcard_then_the_first() {
        let (a, w, x) = (key(), key(), key());
        let s = BySni {
            certs: vec![
                (vec!["a.test".into()], Arc::clone(&a)),
                (vec!["*.w.test".into()], Arc::clone(&w)),
                (vec!["x.w.test".into()], Arc::clone(&x)),
            ],
        };
        let picks = |name: Option<&str>, want: &Arc<CertifiedKey>| {
            assert!(Arc::ptr_eq(s.pick(name).unwrap(), want), "{name:?}");
        };
        picks(Some("A.Test"), &a);
        picks(Some("y.w.test"), &w);
        // An exact name beats a wildcard listed before it.
        picks(Some("x.w.test"), &x);
        // A wildcard covers one label only; unknown names and no SNI get the first.
        picks(Some("a.b.w.test"), &a);
        picks(Some("w.test"), &a);
        picks(None, &a);
    }

    #[test]
    fn names_of_addresses() {
        let n = |a: &str| name_of_addr(a).map(|n| format!("{n:?}"));
        assert!(n("api.internal:8443").unwrap().contains("api.internal"));
        assert!(n("10.0.0.1:443").unwrap().contains("IpAddress"));
        assert!(n("[::1]:443").unwrap().contains("IpAddress"));
    }
}
