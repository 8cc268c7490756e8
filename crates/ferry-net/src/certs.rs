//! `ferry cert init` and `ferry cert issue`: a CA and node certificates in
//! cert-manager's Secret layout (`tls.crt`, `tls.key`, `ca.crt`).

use crate::NetError;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::path::Path;
use time_shim::validity;

fn e(x: impl std::fmt::Display) -> NetError {
    NetError::Cert(x.to_string())
}

fn write(path: &Path, data: &str, private: bool) -> Result<(), NetError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|x| NetError::Cert(format!("cannot write {}: {x}", path.display())))?;
    f.write_all(data.as_bytes())
        .map_err(|x| NetError::Cert(format!("cannot write {}: {x}", path.display())))
}

/// Creates `out/ca.crt` and `out/ca.key`. Refuses to overwrite an existing CA.
pub fn init_ca(out: &Path, name: &str) -> Result<(), NetError> {
    std::fs::create_dir_all(out)
        .map_err(|x| NetError::Cert(format!("cannot create {}: {x}", out.display())))?;
    if out.join("ca.key").exists() {
        return Err(NetError::Cert(format!(
            "{} already holds a CA (ca.key); remove it first or choose another --out",
            out.display()
        )));
    }
    let key = KeyPair::generate().map_err(e)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "ferry");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params.not_before, params.not_after) = validity(10 * 365);
    let cert = params.self_signed(&key).map_err(e)?;
    write(&out.join("ca.crt"), &cert.pem(), false)?;
    write(&out.join("ca.key"), &key.serialize_pem(), true)?;
    Ok(())
}

/// Issues a node certificate for `name` (a DNS SAN) signed by the CA in
/// `ca_dir`, into `out/tls.crt`, `out/tls.key` and `out/ca.crt`.
pub fn issue(ca_dir: &Path, name: &str, out: &Path, days: u32) -> Result<(), NetError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|x| {
            NetError::Cert(format!(
                "cannot read {}: {x}; create a CA with `ferry cert init --out {}`",
                p.display(),
                ca_dir.display()
            ))
        })
    };
    let ca_pem = read(&ca_dir.join("ca.crt"))?;
    let ca_key = KeyPair::from_pem(&read(&ca_dir.join("ca.key"))?).map_err(e)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(e)?;
    if !crate::valid_node_name(name) {
        return Err(NetError::Cert(format!(
            "--name {name:?} is not a valid DNS name (letters, digits, '-' and '.')"
        )));
    }
    let key = KeyPair::generate().map_err(e)?;
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(e)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    (params.not_before, params.not_after) = validity(days);
    let cert = params.signed_by(&key, &issuer).map_err(e)?;
    std::fs::create_dir_all(out)
        .map_err(|x| NetError::Cert(format!("cannot create {}: {x}", out.display())))?;
    write(&out.join("tls.crt"), &cert.pem(), false)?;
    write(&out.join("tls.key"), &key.serialize_pem(), true)?;
    write(&out.join("ca.crt"), &ca_pem, false)?;
    Ok(())
}

mod time_shim {
    use time::OffsetDateTime;
    /// Validity from one hour ago (clock skew) for `days` days.
    pub fn validity(days: u32) -> (OffsetDateTime, OffsetDateTime) {
        let now = std::time::SystemTime::now();
        let start = now - std::time::Duration::from_secs(3600);
        let end = now + std::time::Duration::from_secs(days as u64 * 86400);
        (start.into(), end.into())
    }
}

/// `ferry cert bundle`: writes `out/ca.crt`, a trust bundle of the CA
/// certificates in `inputs` (each a PEM file with one or more), in order,
/// each once. Refuses a file that holds a private key (a bundle carries
/// certificates only: no CA key leaves the cluster that issued it), and a
/// certificate that is not a CA. Returns the subjects written.
pub fn bundle(out: &Path, inputs: &[std::path::PathBuf]) -> Result<Vec<String>, NetError> {
    use rustls_pki_types::pem::{PemObject, SectionKind};
    if inputs.is_empty() {
        return Err(NetError::Cert(
            "no CA certificate given: `ferry cert bundle --out DIR CA1.crt CA2.crt ...`".into(),
        ));
    }
    let mut pem = String::new();
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let mut subjects = Vec::new();
    for p in inputs {
        let data = std::fs::read(p)
            .map_err(|x| NetError::Cert(format!("cannot read {}: {x}", p.display())))?;
        let mut found = 0;
        for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(&data) {
            let (kind, der) =
                item.map_err(|x| NetError::Cert(format!("{}: not a PEM file ({x})", p.display())))?;
            match kind {
                SectionKind::Certificate => {}
                SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
                    return Err(NetError::Cert(format!(
                        "{} holds a private key: a trust bundle carries CA certificates only (pass each cluster's ca.crt, never its ca.key; the key stays in the cluster that issued it)",
                        p.display()
                    )))
                }
                _ => continue,
            }
            found += 1;
            let info = crate::cert_info(&der).ok_or_else(|| {
                NetError::Cert(format!("{}: a certificate that is not X.509", p.display()))
            })?;
            if !info.is_ca {
                return Err(NetError::Cert(format!(
                    "{}: {} is not a CA certificate (a node's tls.crt?); pass the CA's ca.crt",
                    p.display(),
                    info.subject
                )));
            }
            if seen.contains(&der) {
                continue;
            }
            pem += &::pem::encode(&::pem::Pem::new("CERTIFICATE", der.clone()));
            seen.push(der);
            subjects.push(info.subject);
        }
        if found == 0 {
            return Err(NetError::Cert(format!(
                "{} holds no PEM certificate",
                p.display()
            )));
        }
    }
    std::fs::create_dir_all(out)
        .map_err(|x| NetError::Cert(format!("cannot create {}: {x}", out.display())))?;
    write(&out.join("ca.crt"), &pem, false)?;
    Ok(subjects)
}
