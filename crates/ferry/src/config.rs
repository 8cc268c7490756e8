//! Typed node configuration, resolved from raw flags in one place
//! (see `cli.rs`), with every default named and explained.

use ferry_proto::RelPath;
use ferry_store::Role;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Quiet time before a batch is sealed (see `ferry_core::timer`).
pub const DEFAULT_BATCH_IDLE: Duration = ferry_core::timer::DEFAULT_IDLE;
/// Longest a change waits while writes continue.
pub const DEFAULT_BATCH_MAX_DELAY: Duration = ferry_core::timer::DEFAULT_MAX_DELAY;
/// How long SIGTERM waits for peers to ack what is pending: inside
/// Kubernetes' default 30 s termination grace period, with room to spare.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// Batches sent to a peer but not yet acked before the sender waits:
/// enough to keep a 100 ms link busy with 5 ms batches.
pub const DEFAULT_MAX_INFLIGHT: usize = 256;
/// Sealed batches the primary keeps in memory for peers that fall behind;
/// past this a peer catches up by manifest-diff resync instead.
pub const DEFAULT_LOG_CAPACITY: usize = 16_384;
/// Items (paths and renames) those batches may hold in all, so the log's
/// memory is bounded however large the batches (about 250 bytes each:
/// some 64 MiB). Past it, too, a peer catches up without the log.
pub const DEFAULT_LOG_MAX_ITEMS: usize = 262_144;
/// The periodic safety-net rescan (a manifest diff with every peer): finds
/// what the watcher missed and repairs replicas changed behind ferry's back.
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(600);
/// A connection older than this is closed and redialled, so rotated
/// certificates reach long-lived connections (see docs/SECURITY.md).
pub const DEFAULT_MAX_CONN_AGE: Duration = ferry_net::DEFAULT_MAX_CONN_AGE;
/// How often the TLS directory is checked for rotated files.
pub const TLS_POLL: Duration = Duration::from_secs(2);
/// Default QUIC port.
pub const DEFAULT_PORT: u16 = 7443;
/// The conventional metrics port (`--metrics-addr 0.0.0.0:9743`, and the
/// injected sidecar's): not 9090, Prometheus's own port.
pub const DEFAULT_METRICS_PORT: u16 = ferry_inject::settings::DEFAULT_METRICS_PORT;

/// One entry of `--peer NAME=HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub name: String,
    /// `HOST:PORT`, resolved at each connection attempt (DNS names move).
    pub addr: String,
}

/// Everything a node needs, validated.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub root: PathBuf,
    pub name: String,
    pub tls_dir: PathBuf,
    pub listen: SocketAddr,
    pub role_seed: Role,
    pub role_explicit: bool,
    pub peers: Vec<PeerSpec>,
    pub state_dir: PathBuf,
    /// The state dir relative to the root, when it lies inside it.
    pub state_rel: Option<RelPath>,
    pub metrics_addr: Option<SocketAddr>,
    pub excludes: Vec<String>,
    /// `--safe-links`: links leaving the root are not replicated.
    pub safe_links: bool,
    pub batch_idle: Duration,
    pub batch_max_delay: Duration,
    pub shutdown_grace: Duration,
    pub max_inflight: usize,
    pub log_capacity: usize,
    pub log_max_items: usize,
    /// Periodic full rescan; `None`: off.
    pub rescan_interval: Option<Duration>,
    /// Connection-age cap (certificate rotation reaches every connection).
    pub max_conn_age: Duration,
    /// QUIC congestion controller.
    pub congestion: ferry_net::Congestion,
    /// Wire versions this node speaks (`ferry_proto::VERSIONS` unless
    /// narrowed by the hidden `--wire-versions`, for tests).
    pub wire: ferry_proto::WireVersions,
}

/// Holds an exclusive lock on the root directory itself for the life of the
/// process: two ferry processes on one root are refused even when their
/// state dirs differ (the state-dir lock alone cannot see that).
pub struct RootLock {
    _dir: std::fs::File,
}

/// Takes the root lock, or says which mistake it is and how to fix it.
pub fn lock_root(root: &Path) -> Result<RootLock, String> {
    let dir = std::fs::File::open(root)
        .map_err(|e| format!("--root {}: cannot open it ({e})", root.display()))?;
    match dir.try_lock() {
        Ok(()) => Ok(RootLock { _dir: dir }),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "--root {} is locked by another ferry process (whatever its --state-dir): two daemons on one volume would fight over it; run one ferry per root, or stop the other one",
            root.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!(
            "--root {}: cannot lock it ({e})",
            root.display()
        )),
    }
}

/// A replica writes every file of its root: probe that it can, at startup,
/// instead of failing on the first batch.
pub fn check_writable(root: &Path) -> Result<(), String> {
    let probe = root.join(format!(".ferry.tmp.probe-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!(
            "--root {}: this node is a replica and cannot write its root ({e}); mount the volume read-write in the ferry container and run ferry as a user that may write it (Kubernetes: securityContext runAsUser/fsGroup), or start it as the primary",
            root.display()
        )),
    }
}
