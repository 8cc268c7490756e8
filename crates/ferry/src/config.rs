//! Typed node configuration, resolved from raw flags in one place
//! (see `cli.rs`), with every default named and explained.

use ferry_proto::RelPath;
use ferry_store::Role;
use std::net::SocketAddr;
use std::path::PathBuf;
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
/// A connection older than this is closed and redialled, so rotated
/// certificates reach long-lived connections (see docs/SECURITY.md).
pub const DEFAULT_MAX_CONN_AGE: Duration = ferry_net::DEFAULT_MAX_CONN_AGE;
/// How often the TLS directory is checked for rotated files.
pub const TLS_POLL: Duration = Duration::from_secs(2);
/// Default QUIC port.
pub const DEFAULT_PORT: u16 = 7443;

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
    pub batch_idle: Duration,
    pub batch_max_delay: Duration,
    pub shutdown_grace: Duration,
    pub max_inflight: usize,
    pub log_capacity: usize,
    /// Connection-age cap (certificate rotation reaches every connection).
    pub max_conn_age: Duration,
}
