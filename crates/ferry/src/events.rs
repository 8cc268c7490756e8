//! Notable events as types (after vector's `internal_events`): each one logs
//! a single sentence and bumps its metric, with the same label values, in
//! one place. Call sites build the struct and call [`Event::emit`].

use crate::telemetry::Metrics;
use ferry_proto::RelPath;
use std::time::Duration;

/// A notable event: logs once, counts once.
pub trait Event {
    fn emit(self, m: &Metrics);
}

/// The kernel's inotify queue overflowed: events were lost (a rescan follows).
pub struct WatchOverflow;
impl Event for WatchOverflow {
    fn emit(self, m: &Metrics) {
        m.overflows.inc();
        m.rescans.inc();
        tracing::warn!("The inotify queue overflowed; peers are brought back by a manifest diff.");
    }
}

/// The watcher failed; `limit` when the inotify watch limit was reached.
/// With a path, that subtree is rescanned (verified on every peer).
pub struct WatchFailed<'a> {
    pub error: &'a str,
    pub limit: bool,
    pub path: Option<&'a RelPath>,
}
impl Event for WatchFailed<'_> {
    fn emit(self, m: &Metrics) {
        let path = self.path.map(|p| p.display()).unwrap_or_default();
        if self.limit {
            m.error("watch_limit");
            tracing::error!(error = %self.error, path = %path, "The inotify watch limit was reached, so a new directory is not watched; raise `sysctl fs.inotify.max_user_watches` (e.g. to 524288). Until then the periodic rescan finds changes there.");
        } else {
            m.error("watch");
            tracing::warn!(error = %self.error, path = %path, "The watcher reported an error; rescanning.");
        }
        if self.path.is_some() {
            m.rescans.inc();
        }
    }
}

/// The periodic safety-net rescan starts (every peer resyncs by manifest).
pub struct PeriodicRescan;
impl Event for PeriodicRescan {
    fn emit(self, m: &Metrics) {
        m.rescans.inc();
        tracing::info!("Periodic rescan: every peer is compared with the root by manifest.");
    }
}

/// Directories moved and writes settled: one full rescan (a manifest diff
/// with every peer) catches a move whose event notify lost.
pub struct SettleRescan;
impl Event for SettleRescan {
    fn emit(self, m: &Metrics) {
        m.rescans.inc();
        tracing::debug!("Directories moved and writes settled: every peer is compared with the root by manifest once.");
    }
}

/// The second look at new directories found changes made before their
/// inotify watch existed.
pub struct NewDirRecheck {
    pub changes: usize,
}
impl Event for NewDirRecheck {
    fn emit(self, _m: &Metrics) {
        // not counted: most of what it finds was reported by the new watch too
        tracing::debug!(
            changes = self.changes,
            "New directories changed before their watch existed; re-reading those paths."
        );
    }
}

/// An entry is not replicated as it is (G6, or unreadable).
pub struct EntrySkipped<'a> {
    pub path: &'a str,
    pub reason: &'static str,
    pub error: Option<&'a str>,
}
impl Event for EntrySkipped<'_> {
    fn emit(self, m: &Metrics) {
        m.skipped.with_label_values(&[self.reason]).inc();
        match self.error {
            Some(error) => {
                tracing::warn!(path = %self.path, reason = self.reason, error = %error, "An entry is not replicated as it is; the rest goes on.")
            }
            None => {
                tracing::warn!(path = %self.path, reason = self.reason, "An entry is not replicated as it is; the rest goes on.")
            }
        }
    }
}

/// The primary sealed a batch.
pub struct BatchSealed {
    pub seq: u64,
    pub renames: usize,
    pub items: usize,
    pub exact: bool,
}
impl Event for BatchSealed {
    fn emit(self, m: &Metrics) {
        m.batches_sealed.inc();
        m.sealed_seq.set(self.seq as i64);
        if self.exact {
            m.exact.inc();
        }
        tracing::debug!(
            seq = self.seq,
            renames = self.renames,
            items = self.items,
            exact = self.exact,
            "Sealed a batch."
        );
    }
}

/// A session with a peer is up.
pub struct PeerConnected<'a> {
    pub peer: &'a str,
    pub addr: std::net::SocketAddr,
    pub applied_seq: u64,
    /// The wire version the session runs at.
    pub wire_version: u16,
}
impl Event for PeerConnected<'_> {
    fn emit(self, m: &Metrics) {
        m.peer_connected.with_label_values(&[self.peer]).set(1);
        m.peer_wire_version
            .with_label_values(&[self.peer])
            .set(i64::from(self.wire_version));
        tracing::info!(peer = self.peer, addr = %self.addr, applied_seq = self.applied_seq, wire_version = self.wire_version, "Connected to the peer.");
    }
}

/// A session with a peer ended with an error; it is retried.
pub struct PeerSessionEnded<'a> {
    pub peer: &'a str,
    pub error: &'a str,
    pub retry_in: Duration,
}
impl Event for PeerSessionEnded<'_> {
    fn emit(self, m: &Metrics) {
        m.peer_connected.with_label_values(&[self.peer]).set(0);
        // the connection-age cap (ferry_net::NetError::AgeCap) is routine
        if self.error.contains("connection age cap reached") {
            tracing::info!(peer = self.peer, "The connection reached its age cap; redialling (rotated certificates are picked up).");
            return;
        }
        m.error("peer_session");
        tracing::warn!(peer = self.peer, error = %self.error, retry_in_ms = self.retry_in.as_millis() as u64, "The session with the peer ended; retrying.");
    }
}

/// A manifest-diff resync with a peer starts.
pub struct ResyncStarted<'a> {
    pub peer: &'a str,
    pub target: u64,
}
impl Event for ResyncStarted<'_> {
    fn emit(self, m: &Metrics) {
        m.resyncs.with_label_values(&[self.peer]).inc();
        tracing::info!(
            peer = self.peer,
            target = self.target,
            "Resyncing with the peer: comparing manifests."
        );
    }
}

/// The replica applied a batch and made it durable.
pub struct BatchApplied {
    pub seq: u64,
    pub sealed_at_ns: u64,
    pub files: u64,
    pub bytes: u64,
    pub took: Duration,
}
impl Event for BatchApplied {
    fn emit(self, m: &Metrics) {
        m.batches_applied.inc();
        m.bytes_applied.inc_by(self.bytes);
        m.files_applied.inc_by(self.files);
        m.applied_seq.set(self.seq as i64);
        m.consistent_as_of.set(self.sealed_at_ns as f64 / 1e9);
        m.apply_seconds.observe(self.took.as_secs_f64());
        tracing::debug!(
            seq = self.seq,
            files = self.files,
            bytes = self.bytes,
            took_ms = self.took.as_millis() as u64,
            "Applied a batch durably."
        );
    }
}

/// The replica finished, from its redo journal, a batch a crash interrupted.
pub struct BatchRecovered {
    pub seq: u64,
    pub sealed_at_ns: u64,
}
impl Event for BatchRecovered {
    fn emit(self, m: &Metrics) {
        m.batches_recovered.inc();
        tracing::info!(
            seq = self.seq,
            sealed_at_ns = self.sealed_at_ns,
            "Finished batch {} from the redo journal: the replica is at its boundary.",
            self.seq
        );
    }
}

/// The replica could not apply a batch; it is not acknowledged.
pub struct ApplyFailed<'a> {
    pub error: &'a ferry_apply::ApplyError,
}
impl Event for ApplyFailed<'_> {
    fn emit(self, m: &Metrics) {
        m.error(self.error.kind());
        tracing::error!(error = %self.error, kind = self.error.kind(), "A batch was not applied and is not acknowledged.");
    }
}

/// A connection attempt failed authentication (certificate or name).
pub struct AuthRefused<'a> {
    pub error: &'a str,
}
impl Event for AuthRefused<'_> {
    fn emit(self, m: &Metrics) {
        m.error("auth");
        tracing::warn!(error = %self.error, "Refused a connection: its certificate is not from the CA or names no listed peer.");
    }
}

/// A peer broke the protocol; its stream is closed.
pub struct ProtocolViolation<'a> {
    pub why: &'a str,
}
impl Event for ProtocolViolation<'_> {
    fn emit(self, m: &Metrics) {
        m.error("protocol");
        tracing::warn!(why = %self.why, "A peer broke the protocol; its stream is closed.");
    }
}

/// Rotated TLS files were loaded: new connections use them.
pub struct TlsReloaded<'a> {
    pub dir: &'a std::path::Path,
}
impl Event for TlsReloaded<'_> {
    fn emit(self, m: &Metrics) {
        m.tls_reloads.inc();
        tracing::info!(dir = %self.dir.display(), "Loaded rotated TLS certificates; new connections use them.");
    }
}

/// The TLS files changed but do not make a valid set: the last good one stays.
pub struct TlsReloadFailed<'a> {
    pub error: &'a str,
}
impl Event for TlsReloadFailed<'_> {
    fn emit(self, m: &Metrics) {
        m.error("tls_reload");
        tracing::error!(error = %self.error, "The rotated TLS files are not valid; still using the last good certificate. Fix the files (or the cert-manager Certificate) in the TLS dir.");
    }
}

/// A listed peer opened more connections than `MAX_CONNS_PER_PEER`; the
/// extra one was closed.
pub struct ConnectionLimit<'a> {
    pub error: &'a str,
}
impl Event for ConnectionLimit<'_> {
    fn emit(self, m: &Metrics) {
        m.error("conn_limit");
        tracing::warn!(error = %self.error, "Refused a connection: the peer already holds the most connections allowed (a stuck or hostile peer).");
    }
}
