//! The serving certificate: loaded from a cert-manager Secret directory and
//! swapped in place when the mounted Secret changes.
//!
//! The kubelet updates a mounted Secret by switching a symlink, so a poll that reads
//! the files and compares their bytes sees every rotation; each new TLS handshake
//! then gets the new certificate, while open connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::InjectError;

/// The certificate chain file in cert-manager's Secret layout.
pub const CERT_FILE: &str = "tls.crt";
/// The private key file (PKCS#1, PKCS#8 or SEC1 PEM).
pub const KEY_FILE: &str = "tls.key";

/// The bytes of the two files, to tell whether anything changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// The current certificate, shared with rustls.
#[derive(Debug)]
pub(crate) struct CertStore {
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<(Fingerprint, Arc<CertifiedKey>)>,
}

impl CertStore {
    /// Loads the certificate and key from `dir`.
    pub(crate) fn load(dir: &Path, provider: Arc<CryptoProvider>) -> Result<Self, InjectError> {
        let fingerprint = read_files(dir)?;
        let key = certified_key(dir, &fingerprint, &provider)?;
        Ok(CertStore {
            dir: dir.to_owned(),
            provider,
            current: RwLock::new((fingerprint, key)),
        })
    }

    /// Re-reads the files; swaps in the new certificate if they changed and are
    /// valid. Returns whether it swapped. On error the old certificate stays.
    pub(crate) fn reload(&self) -> Result<bool, InjectError> {
        let fingerprint = read_files(&self.dir)?;
        {
            let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
            if current.0 == fingerprint {
                return Ok(false);
            }
        }
        let key = certified_key(&self.dir, &fingerprint, &self.provider)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = (fingerprint, key);
        Ok(true)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .1
                .clone(),
        )
    }
}

fn read_files(dir: &Path) -> Result<Fingerprint, InjectError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| InjectError::ReadTls { path, source })
    };
    Ok(Fingerprint {
        cert: read(CERT_FILE)?,
        key: read(KEY_FILE)?,
    })
}

/// Parses the PEM files into a signing key and chain, and checks they belong together.
fn certified_key(
    dir: &Path,
    files: &Fingerprint,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, InjectError> {
    let bad = |file: &str, reason: String| InjectError::BadTls {
        path: dir.join(file),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(CERT_FILE, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(bad(CERT_FILE, "holds no CERTIFICATE block".to_owned()));
    }
    // Accepts "RSA PRIVATE KEY" (PKCS#1), "PRIVATE KEY" (PKCS#8) and
    // "EC PRIVATE KEY" (SEC1): the encodings cert-manager can write.
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| {
        bad(
            KEY_FILE,
            format!("not a PEM private key (PKCS#1, PKCS#8 or SEC1): {e}"),
        )
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(KEY_FILE, format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => {
            return Err(InjectError::BadTls {
                path: dir.to_owned(),
                reason: format!(
                    "{KEY_FILE} does not belong to the certificate in {CERT_FILE}: {e}"
                ),
            })
        }
    }
    Ok(Arc::new(certified))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn self_signed(name: &str) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    fn write(dir: &Path, cert: &str, key: &str) {
        std::fs::write(dir.join(CERT_FILE), cert).expect("write cert");
        std::fs::write(dir.join(KEY_FILE), key).expect("write key");
    }

    fn served(store: &CertStore) -> Vec<u8> {
        let current = store.current.read().unwrap_or_else(PoisonError::into_inner);
        current.1.cert[0].as_ref().to_vec()
    }

    #[test]
    fn reload_swaps_only_valid_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert_a, key_a) = self_signed("a.example");
        write(dir.path(), &cert_a, &key_a);
        let store = CertStore::load(dir.path(), provider).expect("load");
        let first = served(&store);

        assert!(matches!(store.reload(), Ok(false)), "unchanged files");

        let (cert_b, key_b) = self_signed("b.example");
        write(dir.path(), &cert_a, &key_b);
        assert!(
            matches!(store.reload(), Err(InjectError::BadTls { .. })),
            "a key that does not match is refused"
        );
        assert_eq!(served(&store), first, "the old certificate stays");

        write(dir.path(), "garbage", &key_b);
        assert!(store.reload().is_err());
        assert_eq!(served(&store), first);

        std::fs::remove_file(dir.path().join(KEY_FILE)).expect("rm");
        assert!(matches!(store.reload(), Err(InjectError::ReadTls { .. })));
        assert_eq!(served(&store), first);

        write(dir.path(), &cert_b, &key_b);
        assert!(matches!(store.reload(), Ok(true)));
        assert_ne!(served(&store), first, "the new certificate is served");
    }
}
