//! rustls configuration: TLS 1.3 only, mutual authentication, ALPN
//! `ferry/1`, no 0-RTT, and the peer-name check rustls does not do itself.

use crate::NetError;
use ferry_proto::ALPN;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::path::Path;
use std::sync::Arc;

/// The node's certificate chain, key and trusted CAs, loaded from a
/// cert-manager style directory.
pub struct TlsMaterial {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        TlsMaterial {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_err(path: &Path, reason: impl Into<String>) -> NetError {
    NetError::TlsFile {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Loads `tls.crt`, `tls.key` and `ca.crt` from `dir` and checks that they
/// fit together and that the certificate names `name`.
pub fn load_tls(dir: &Path, name: &str) -> Result<TlsMaterial, NetError> {
    let crt = dir.join("tls.crt");
    let key = dir.join("tls.key");
    let ca = dir.join("ca.crt");
    for p in [&crt, &key, &ca] {
        if !p.exists() {
            return Err(file_err(
                p,
                "missing; create it with `ferry cert issue --ca CA_DIR --name NAME --out DIR` or mount the cert-manager Secret there",
            ));
        }
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&crt)
        .map_err(|e| file_err(&crt, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&crt, format!("not a PEM certificate: {e}")))?;
    if chain.is_empty() {
        return Err(file_err(&crt, "holds no certificate"));
    }
    let key_der = PrivateKeyDer::from_pem_file(&key)
        .map_err(|e| file_err(&key, format!("no PKCS#1, PKCS#8 or SEC1 private key: {e}")))?;
    let mut roots = RootCertStore::empty();
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca)
        .map_err(|e| file_err(&ca, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&ca, format!("not a PEM certificate: {e}")))?;
    if cas.is_empty() {
        return Err(file_err(&ca, "holds no CA certificate"));
    }
    for c in cas {
        roots
            .add(c)
            .map_err(|e| file_err(&ca, format!("not a usable CA certificate: {e}")))?;
    }
    // The key must belong to the certificate.
    let signer = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| file_err(&key, format!("unsupported key: {e}")))?;
    rustls::sign::CertifiedKey::new(chain.clone(), signer)
        .keys_match()
        .map_err(|_| file_err(&key, "does not match the certificate in tls.crt"))?;
    // The certificate must chain to the CA and carry our name.
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| NetError::TlsConfig(e.to_string()))?;
    verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map_err(|e| file_err(&crt, format!("is not valid under ca.crt: {e}")))?;
    let sn = ServerName::try_from(name.to_owned())
        .map_err(|_| NetError::TlsConfig(format!("node name {name:?} is not a valid DNS name")))?;
    let ee =
        webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| file_err(&crt, e.to_string()))?;
    ee.verify_is_valid_for_subject_name(&sn)
        .map_err(|_| file_err(&crt, format!("is not issued for the name {name:?} (--name); issue one with `ferry cert issue --name {name}`")))?;
    Ok(TlsMaterial {
        chain,
        key: key_der,
        roots,
    })
}

/// Checks the chain (rustls' WebPKI verifier), then that the certificate is
/// valid for one of the allowed peer names.
#[derive(Debug)]
struct NamedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<ServerName<'static>>,
}

impl ClientCertVerifier for NamedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if matches_any(end_entity, &self.allowed).is_some() {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn matches_any(cert: &CertificateDer<'_>, names: &[ServerName<'static>]) -> Option<usize> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    names
        .iter()
        .position(|n| ee.verify_is_valid_for_subject_name(n).is_ok())
}

pub(crate) fn server_config(
    tls: &TlsMaterial,
    allowed: &[String],
) -> Result<rustls::ServerConfig, NetError> {
    let inner = WebPkiClientVerifier::builder_with_provider(tls.roots.clone(), provider())
        .build()
        .map_err(|e| NetError::TlsConfig(e.to_string()))?;
    let allowed = allowed
        .iter()
        .map(|n| {
            ServerName::try_from(n.clone()).map_err(|_| {
                NetError::TlsConfig(format!("peer name {n:?} is not a valid DNS name"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::TlsConfig(e.to_string()))?
        .with_client_cert_verifier(Arc::new(NamedClientVerifier { inner, allowed }))
        .with_single_cert(tls.chain.clone(), tls.key.clone_key())
        .map_err(|e| NetError::TlsConfig(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.max_early_data_size = 0; // no 0-RTT
    Ok(cfg)
}

pub(crate) fn client_config(tls: &TlsMaterial) -> Result<rustls::ClientConfig, NetError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::TlsConfig(e.to_string()))?
        .with_root_certificates(tls.roots.clone())
        .with_client_auth_cert(tls.chain.clone(), tls.key.clone_key())
        .map_err(|e| NetError::TlsConfig(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = false; // no 0-RTT
    Ok(cfg)
}

/// Which allowed name the connected peer's certificate carries.
pub(crate) fn peer_name(conn: &quinn::Connection, allowed: &[String]) -> Option<String> {
    let id = conn.peer_identity()?;
    let chain = id.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let names: Vec<ServerName<'static>> = allowed
        .iter()
        .filter_map(|n| ServerName::try_from(n.clone()).ok())
        .collect();
    let i = matches_any(chain.first()?, &names)?;
    allowed.get(i).cloned()
}

/// Watches a TLS directory for rotated files (cert-manager updates a mounted
/// Secret by swapping a symlink; a poll comparing the files' bytes sees every
/// kind of update). Each change is loaded and checked exactly like at
/// startup ([`load_tls`]); a change that does not make a valid set is
/// reported once, and the caller keeps the last good one.
pub struct TlsWatch {
    dir: std::path::PathBuf,
    name: String,
    seen: Vec<Vec<u8>>,
}

/// The files a node's TLS material is made of.
const TLS_FILES: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];

fn read_tls_files(dir: &Path) -> Vec<Vec<u8>> {
    TLS_FILES
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap_or_default())
        .collect()
}

impl TlsWatch {
    /// Starts from the files as they are now (loaded at startup).
    pub fn new(dir: &Path, name: &str) -> TlsWatch {
        TlsWatch {
            dir: dir.to_owned(),
            name: name.to_owned(),
            seen: read_tls_files(dir),
        }
    }

    /// `Ok(None)`: nothing changed since the last poll. `Ok(Some)`: the
    /// files changed and hold a valid set. `Err`: they changed and do not
    /// (reported once per change; a half-written set usually becomes valid
    /// at the next poll).
    pub fn poll(&mut self) -> Result<Option<TlsMaterial>, NetError> {
        let now = read_tls_files(&self.dir);
        if now == self.seen {
            return Ok(None);
        }
        self.seen = now;
        load_tls(&self.dir, &self.name).map(Some)
    }
}

/// Loads a TLS directory without checking that its files fit together:
/// used only by [`crate::testing`] (a hostile peer's certificate may be
/// expired, for another name, or from another CA).
pub(crate) fn load_unchecked(dir: &Path) -> Result<TlsMaterial, NetError> {
    let crt = dir.join("tls.crt");
    let key = dir.join("tls.key");
    let ca = dir.join("ca.crt");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&crt)
        .map_err(|e| file_err(&crt, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&crt, e.to_string()))?;
    let key_der = PrivateKeyDer::from_pem_file(&key).map_err(|e| file_err(&key, e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca).map_err(|e| file_err(&ca, e.to_string()))? {
        let c = c.map_err(|e| file_err(&ca, e.to_string()))?;
        roots
            .add(c)
            .map_err(|e| file_err(&ca, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(TlsMaterial {
        chain,
        key: key_der,
        roots: Arc::new(roots),
    })
}

/// A client configuration that presents no certificate (tests only).
pub(crate) fn anonymous_client_config(
    roots: Arc<RootCertStore>,
) -> Result<rustls::ClientConfig, NetError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::TlsConfig(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The facts of one X.509 certificate that `ferry check` and the metrics
/// show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject, e.g. `CN=eu-west`.
    pub subject: String,
    /// The issuer's subject.
    pub issuer: String,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// Validity, Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// A CA certificate (basic constraints).
    pub is_ca: bool,
}

/// Parses one DER certificate; `None` when it is not X.509.
pub fn cert_info(der: &[u8]) -> Option<CertInfo> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    let dns_names = c
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::DNSName(n) => Some((*n).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(CertInfo {
        subject: c.subject().to_string(),
        issuer: c.issuer().to_string(),
        dns_names,
        not_before: c.validity().not_before.timestamp(),
        not_after: c.validity().not_after.timestamp(),
        is_ca: c.is_ca(),
    })
}

impl TlsMaterial {
    /// Not-after of the node certificate (Unix seconds).
    pub fn not_after(&self) -> Option<i64> {
        cert_info(self.chain.first()?).map(|c| c.not_after)
    }
}

/// What `ferry check` learns about a TLS directory, each finding on its
/// own, so that one problem does not hide the next (`load_tls` stops at
/// the first).
#[derive(Debug, Clone)]
pub struct TlsReport {
    /// The node certificate (first of `tls.crt`).
    pub cert: CertInfo,
    /// Each certificate of `ca.crt` (a trust bundle may hold several).
    pub cas: Vec<CertInfo>,
    /// `Err(why)` when `tls.key` is not the key of the certificate.
    pub key_matches: Result<(), String>,
    /// `Err(why)` when the certificate does not chain to `ca.crt`. Judged at
    /// a time inside the certificate's validity, so an expired certificate
    /// shows as expired, not as unchained.
    pub chain: Result<(), String>,
    /// The certificate is valid for the node name.
    pub names_node: bool,
}

/// Reads `tls.crt`, `tls.key` and `ca.crt` from `dir` and reports on each
/// property apart. `Err` only when a file is missing or holds no
/// certificate or key at all.
pub fn inspect_tls(dir: &Path, name: &str) -> Result<TlsReport, NetError> {
    let crt = dir.join("tls.crt");
    let key = dir.join("tls.key");
    let ca = dir.join("ca.crt");
    for p in [&crt, &key, &ca] {
        if !p.exists() {
            return Err(file_err(
                p,
                "missing; create it with `ferry cert issue --ca CA_DIR --name NAME --out DIR` or mount the cert-manager Secret there",
            ));
        }
    }
    let read_certs = |p: &Path| -> Result<Vec<CertificateDer<'static>>, NetError> {
        let v: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(p)
            .map_err(|e| file_err(p, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_err(p, format!("not a PEM certificate: {e}")))?;
        if v.is_empty() {
            return Err(file_err(p, "holds no PEM certificate"));
        }
        Ok(v)
    };
    let chain = read_certs(&crt)?;
    let cas = read_certs(&ca)?;
    let cert = cert_info(&chain[0]).ok_or_else(|| file_err(&crt, "not an X.509 certificate"))?;
    let ca_infos = cas
        .iter()
        .map(|c| cert_info(c).ok_or_else(|| file_err(&ca, "holds a certificate that is not X.509")))
        .collect::<Result<Vec<_>, _>>()?;
    let key_matches = match PrivateKeyDer::from_pem_file(&key) {
        Err(e) => Err(format!("no PKCS#1, PKCS#8 or SEC1 private key: {e}")),
        Ok(k) => match rustls::crypto::ring::sign::any_supported_type(&k) {
            Err(e) => Err(format!("unsupported key: {e}")),
            Ok(signer) => rustls::sign::CertifiedKey::new(chain.clone(), signer)
                .keys_match()
                .map_err(|_| "it is the key of another certificate".to_string()),
        },
    };
    let mut roots = RootCertStore::empty();
    let mut chain_res = Ok(());
    for c in &cas {
        if let Err(e) = roots.add(c.clone()) {
            chain_res = Err(format!("ca.crt holds an unusable CA certificate: {e}"));
        }
    }
    if chain_res.is_ok() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let at = now.clamp(
            cert.not_before + 1,
            (cert.not_after - 1).max(cert.not_before + 1),
        );
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(at.max(0) as u64));
        chain_res = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| e.to_string())
            .and_then(|v| {
                v.verify_client_cert(&chain[0], &chain[1..], at)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
    }
    let names_node = ServerName::try_from(name.to_owned()).is_ok_and(|sn| {
        webpki::EndEntityCert::try_from(&chain[0])
            .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&sn).is_ok())
    });
    Ok(TlsReport {
        cert,
        cas: ca_infos,
        key_matches,
        chain: chain_res,
        names_node,
    })
}
