//! Helpers for tests that play a hostile or broken peer (`tests/hostile.rs`,
//! `tests/security.rs`). Nothing in ferry itself uses them.

use crate::{tls, Conn, NetError, TlsMaterial, Transport, HANDSHAKE_TIMEOUT};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// Loads `tls.crt`, `tls.key` and `ca.crt` from `dir` without checking that
/// they are valid together (expired, wrong name or wrong CA are all kept).
pub fn load_unchecked(dir: &Path) -> Result<TlsMaterial, NetError> {
    tls::load_unchecked(dir)
}

/// Dials `addr` presenting no client certificate at all; the server's
/// certificate must still chain to `roots` and be valid for `name`.
pub async fn connect_without_cert(
    transport: &Transport,
    roots: &TlsMaterial,
    addr: SocketAddr,
    name: &str,
) -> Result<Conn, NetError> {
    let err = |reason: String| NetError::Connect {
        name: name.to_owned(),
        addr,
        reason,
    };
    let cfg = tls::anonymous_client_config(roots.roots.clone())?;
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
            .map_err(|e| NetError::TlsConfig(e.to_string()))?,
    ));
    client.transport_config(transport.transport.clone());
    let connecting = transport
        .ep
        .connect_with(client, addr, name)
        .map_err(|e| err(e.to_string()))?;
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
        .await
        .map_err(|_| err("handshake timed out".into()))?
        .map_err(|e| err(e.to_string()))?;
    Ok(Conn {
        inner: conn,
        peer: name.to_owned(),
        _cap: None,
        _slot: None,
    })
}

/// Opens up to `n` streams on `conn`, writing `first` on each and finishing
/// it, until `limit` passes; returns how many were opened. quinn lets the
/// peer open only as many as the receiver's stream limit allows.
pub async fn open_many_streams(
    conn: &Conn,
    n: usize,
    first: &[u8],
    limit: std::time::Duration,
) -> usize {
    let deadline = tokio::time::Instant::now() + limit;
    let mut opened = 0;
    while opened < n {
        let r = tokio::time::timeout_at(deadline, conn.inner.open_bi()).await;
        let Ok(Ok((mut s, _r))) = r else { break };
        let _ = s.write_all(first).await;
        let _ = s.finish();
        opened += 1;
    }
    opened
}

/// Whether the connection is still open.
pub fn is_open(conn: &Conn) -> bool {
    conn.inner.close_reason().is_none()
}
