//! Command-line surface (DESIGN.md): raw flags in, a validated
//! [`NodeConfig`] out. A usage error exits 64 and lists every bad setting.

use crate::config::*;
use clap::{Args, Parser, Subcommand};
use ferry_proto::RelPath;
use ferry_store::Role;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Exit code for usage errors (BSD `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Makes a pod's data follow the pod: replicates a directory to other clusters over QUIC."
)]
pub struct Cli {
    /// Log level (FERRY_LOG, an EnvFilter directive, overrides it).
    #[arg(long, env = "FERRY_LOG_LEVEL", value_enum, default_value_t = LogLevel::Info, global = true)]
    pub log_level: LogLevel,
    #[command(subcommand)]
    pub cmd: Command,
}

/// `--log-level` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// Shells `ferry completions` writes for.
pub use clap_complete::Shell;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// A primary and a replica on loopback with their own temporary CA: watch data arrive.
    Demo(DemoArgs),
    /// Make a CA and node certificates (cert-manager's tls.crt / tls.key / ca.crt layout).
    #[command(subcommand)]
    Cert(CertCommand),
    /// Run a ferry node.
    Run(Box<RunArgs>),
    /// Ask a running node for its role, epoch, peers and consistency point.
    Status(StatusArgs),
    /// Move the primary role: on the primary, `--to NAME` hands over to a
    /// caught-up replica (planned switchover, nothing lost); on a replica,
    /// without `--to`, take over from an unreachable primary (failover).
    Promote(PromoteArgs),
    /// Serve the Kubernetes mutating admission webhook that injects the sidecar.
    Inject(InjectArgs),
    /// Preflight with the flags of `run`: certificates, peers (a full mutual
    /// TLS handshake each), root and state dir permissions, inotify limits;
    /// or, with --manifests DIR, the rendered webhook manifests. Exit 1 when
    /// any check fails.
    Check(Box<CheckArgs>),
    /// Print a shell completion script: e.g. `ferry completions bash >
    /// /etc/bash_completion.d/ferry`, or `source <(ferry completions zsh)`.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the man page (roff) to stdout, e.g. `ferry man | man -l -`; with
    /// --out DIR, write ferry.1 and one page per subcommand there.
    Man {
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Print the findings as JSON (see docs/OPERATIONS.md).
    #[arg(long)]
    pub json: bool,
    /// Check the rendered webhook manifests (YAML files below DIR, e.g. from
    /// `kubectl kustomize manifests/base`) instead of a node; needs no cluster.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// Time allowed for each peer's handshake (s).
    #[arg(long, env = "FERRY_CHECK_PEER_TIMEOUT_SECS", default_value_t = 5)]
    pub peer_timeout_secs: u64,
    /// Check the tree against this inotify watch limit instead of this
    /// machine's (e.g. the limit of the node the pod will run on).
    #[arg(long, value_name = "N")]
    pub max_user_watches: Option<u64>,
    /// Skip the peer handshakes (e.g. before the peers run).
    #[arg(long)]
    pub offline: bool,
    /// Warn when the certificate expires within this many days.
    #[arg(long, default_value_t = 30)]
    pub warn_days: u64,
}

#[derive(Args, Debug)]
pub struct InjectArgs {
    /// HTTPS address to listen on.
    #[arg(long, env = "FERRY_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: String,
    /// Directory with tls.crt and tls.key (the webhook's serving certificate; reloaded when it changes).
    #[arg(long, env = "FERRY_TLS_DIR")]
    pub tls_dir: PathBuf,
    /// Image of the injected sidecar (a pod's ferry.io/image annotation overrides it).
    #[arg(long, env = "FERRY_SIDECAR_IMAGE", default_value = ferry_inject::DEFAULT_SIDECAR_IMAGE)]
    pub sidecar_image: String,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long, env = "FERRY_DEMO_SECONDS")]
    pub seconds: Option<u64>,
    /// Keep the demo directories after exit.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Create a CA: DIR/ca.crt and DIR/ca.key.
    Init {
        #[arg(long, env = "FERRY_OUT")]
        out: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "ferry CA")]
        name: String,
    },
    /// Issue a node certificate: OUT/tls.crt, OUT/tls.key, OUT/ca.crt.
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long, env = "FERRY_CA")]
        ca: PathBuf,
        /// The node's name (a DNS SAN), e.g. eu-west.
        #[arg(long, env = "FERRY_NAME")]
        name: String,
        #[arg(long, env = "FERRY_OUT")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Write OUT/ca.crt, a trust bundle of the CA certificates given (each
    /// cluster's own ca.crt): nodes trust every CA in it, so each cluster
    /// keeps its own CA and no CA key leaves the cluster that made it.
    Bundle {
        /// Directory to write ca.crt into (e.g. a node's TLS dir).
        #[arg(long, env = "FERRY_OUT")]
        out: PathBuf,
        /// PEM files with CA certificates (never a ca.key).
        #[arg(required = true, value_name = "CA_CRT")]
        cas: Vec<PathBuf>,
    },
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// The directory to replicate (the pod's volume mount).
    #[arg(long, env = "FERRY_ROOT")]
    pub root: Option<PathBuf>,
    /// This node's name; must be a DNS SAN of its certificate.
    #[arg(long, env = "FERRY_NAME")]
    pub name: Option<String>,
    /// Directory with tls.crt, tls.key and ca.crt.
    #[arg(long, env = "FERRY_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// UDP address for QUIC.
    #[arg(long, env = "FERRY_LISTEN", default_value = "0.0.0.0:7443")]
    pub listen: String,
    /// Role of a fresh node (primary or replica); existing state decides after that.
    #[arg(long, env = "FERRY_ROLE")]
    pub role: Option<String>,
    /// Another node of the set: NAME=HOST:PORT (repeat, or comma-separate in FERRY_PEER).
    #[arg(long = "peer", env = "FERRY_PEER", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// State dir (default ROOT/.ferry, never replicated).
    #[arg(long, env = "FERRY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz (none by default; the
    /// conventional port is 9743, e.g. 0.0.0.0:9743).
    #[arg(long, env = "FERRY_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// gitignore-style glob of paths not to replicate (repeat, or comma-separate in FERRY_EXCLUDE).
    #[arg(long = "exclude", env = "FERRY_EXCLUDE", value_delimiter = ',')]
    pub excludes: Vec<String>,
    /// Do not replicate symlinks that leave the root (absolute targets, or
    /// relative ones climbing above it); each is reported once. By default
    /// every link is replicated verbatim, whatever it points at.
    #[arg(long, env = "FERRY_SAFE_LINKS")]
    pub safe_links: bool,
    /// Seal a batch after the root has been quiet this long (ms).
    #[arg(long, env = "FERRY_BATCH_IDLE_MS", default_value_t = DEFAULT_BATCH_IDLE.as_millis() as u64)]
    pub batch_idle_ms: u64,
    /// Seal a batch at the latest this long after its first change (ms).
    #[arg(long, env = "FERRY_BATCH_MAX_DELAY_MS", default_value_t = DEFAULT_BATCH_MAX_DELAY.as_millis() as u64)]
    pub batch_max_delay_ms: u64,
    /// On SIGTERM, wait this long for peers to ack what is pending (s).
    #[arg(long, env = "FERRY_SHUTDOWN_GRACE_SECS", default_value_t = DEFAULT_SHUTDOWN_GRACE.as_secs())]
    pub shutdown_grace_secs: u64,
    /// Periodic full rescan, a safety net for events the watcher lost: e.g.
    /// 600, 600s, 10m, 1h, 500ms (a bare number is seconds); 0 turns it off.
    #[arg(long, env = "FERRY_RESCAN_INTERVAL", default_value = "10m")]
    pub rescan_interval: String,
    /// Sealed batches kept in memory for peers that fall behind; a peer
    /// further behind catches up from the file index (or by manifest).
    #[arg(long, env = "FERRY_LOG_CAPACITY", default_value_t = DEFAULT_LOG_CAPACITY)]
    pub log_capacity: usize,
    /// Paths and renames those batches may hold in all (bounds their memory).
    #[arg(long, env = "FERRY_LOG_MAX_ITEMS", default_value_t = DEFAULT_LOG_MAX_ITEMS)]
    pub log_max_items: usize,
    /// Close and redial a connection this old, so rotated certificates reach it (s).
    #[arg(long, env = "FERRY_MAX_CONNECTION_AGE_SECS", default_value_t = DEFAULT_MAX_CONN_AGE.as_secs())]
    pub max_connection_age_secs: u64,
    /// QUIC congestion control: `bbr` keeps long, lossy links (across
    /// regions) full; `cubic` spends less CPU at very high rates on a LAN;
    /// `auto` is CUBIC while the path's RTT is under 5 ms, BBR beyond.
    #[arg(long, env = "FERRY_CONGESTION_CONTROL", value_enum, default_value_t = CongestionArg::Auto)]
    pub congestion_control: CongestionArg,
    /// Test only: narrow the wire versions this node speaks, `MIN..=MAX`
    /// (or one version), within the ones this build speaks.
    #[arg(long, env = "FERRY_WIRE_VERSIONS", hide = true)]
    pub wire_versions: Option<String>,
}

/// `--wire-versions`: `MIN..=MAX` or `V`, within what this build speaks.
fn parse_wire_versions(s: &str) -> Result<ferry_proto::WireVersions, String> {
    let b = ferry_proto::VERSIONS;
    let (min, max) = match s.split_once("..=") {
        Some((a, z)) => (a.trim().parse::<u16>(), z.trim().parse::<u16>()),
        None => (s.trim().parse::<u16>(), s.trim().parse::<u16>()),
    };
    match (min, max) {
        (Ok(min), Ok(max)) if b.min <= min && min <= max && max <= b.max => {
            Ok(ferry_proto::WireVersions { min, max })
        }
        _ => Err(format!(
            "--wire-versions {s:?}: give MIN..=MAX or one version, within {b} (what this build speaks)"
        )),
    }
}

/// `--congestion-control` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CongestionArg {
    #[default]
    Auto,
    Bbr,
    Cubic,
}

#[derive(Args, Debug)]
pub struct PromoteArgs {
    /// Planned switchover to this peer (run on the primary, with the app stopped).
    #[arg(long)]
    pub to: Option<String>,
    #[arg(long, env = "FERRY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    #[arg(long, env = "FERRY_ROOT")]
    pub root: Option<PathBuf>,
}

/// `ferry status` exits 0 when the node is healthy, 1 when it is degraded
/// (not ready, a peer disconnected, a resync running, conflicts to look at)
/// and 2 when no daemon answers (see docs/OPERATIONS.md).
#[derive(Args, Debug)]
#[command(
    after_help = "Exit status: 0 healthy, 1 degraded, 2 down (no daemon answers), 64 usage error."
)]
pub struct StatusArgs {
    #[arg(long, env = "FERRY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    #[arg(long, env = "FERRY_ROOT")]
    pub root: Option<PathBuf>,
    /// Print JSON for scripts (one line; durations in seconds as floats,
    /// times as RFC 3339 and Unix seconds; a schema_version field).
    #[arg(long)]
    pub json: bool,
    /// Print the status again every --interval until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between two prints of --watch.
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    pub interval: f64,
    /// First wait for a running resync to end (with a progress bar on a
    /// terminal); without it, status never waits.
    #[arg(long)]
    pub wait: bool,
}

/// Parses `NAME=HOST:PORT`.
pub fn parse_peer(s: &str) -> Result<PeerSpec, String> {
    let (name, addr) = s.split_once('=').ok_or_else(|| {
        format!("--peer {s:?}: expected NAME=HOST:PORT, e.g. us-east=10.0.0.7:7443")
    })?;
    if !ferry_net::valid_node_name(name) {
        return Err(format!("--peer {s:?}: {name:?} is not a valid node name (a DNS name: letters, digits, '-', '.')"));
    }
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("--peer {s:?}: {addr:?} has no port; expected HOST:PORT"))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!(
            "--peer {s:?}: {addr:?} is not HOST:PORT with a port from 1 to 65535"
        ));
    }
    Ok(PeerSpec {
        name: name.to_owned(),
        addr: addr.to_owned(),
    })
}

/// Turns raw flags into a [`NodeConfig`], collecting every problem.
pub fn resolve(a: &RunArgs) -> Result<NodeConfig, Vec<String>> {
    let mut errs = Vec::new();
    let root = match &a.root {
        None => {
            errs.push("--root is required: the directory to replicate".to_string());
            None
        }
        Some(r) => check_root(r).map_err(|e| errs.push(e)).ok(),
    };
    let name = match &a.name {
        None => {
            errs.push("--name is required: this node's name, as in its certificate".to_string());
            None
        }
        Some(n) if !ferry_net::valid_node_name(n) => {
            errs.push(format!(
                "--name {n:?} is not a valid node name (a DNS name: letters, digits, '-', '.')"
            ));
            None
        }
        Some(n) => Some(n.clone()),
    };
    let tls_dir = match &a.tls_dir {
        None => {
            errs.push("--tls-dir is required: a directory with tls.crt, tls.key and ca.crt (see `ferry cert`)".to_string());
            None
        }
        Some(d) if !d.is_dir() => {
            errs.push(format!(
                "--tls-dir {}: not a directory; create it with `ferry cert issue --out {}`",
                d.display(),
                d.display()
            ));
            None
        }
        Some(d) => Some(d.clone()),
    };
    let listen: Option<SocketAddr> = a
        .listen
        .parse()
        .map_err(|_| {
            errs.push(format!(
                "--listen {:?}: expected IP:PORT, e.g. 0.0.0.0:7443",
                a.listen
            ))
        })
        .ok();
    let (role_seed, role_explicit) = match a.role.as_deref() {
        None => (Role::Replica, false),
        Some("primary") => (Role::Primary, true),
        Some("replica") => (Role::Replica, true),
        Some(r) => {
            errs.push(format!("--role {r:?}: expected primary or replica"));
            (Role::Replica, true)
        }
    };
    let mut peers: Vec<PeerSpec> = Vec::new();
    for p in &a.peers {
        match parse_peer(p) {
            Ok(spec) => {
                if peers.iter().any(|q| q.name == spec.name) {
                    errs.push(format!("--peer {p:?}: {} is listed twice", spec.name));
                } else if Some(&spec.name) == name.as_ref() {
                    errs.push(format!(
                        "--peer {p:?}: that is this node's own name (--name)"
                    ));
                } else {
                    peers.push(spec);
                }
            }
            Err(e) => errs.push(e),
        }
    }
    let metrics_addr = match &a.metrics_addr {
        None => None,
        Some(s) => s
            .parse::<SocketAddr>()
            .map_err(|_| {
                errs.push(format!(
                    "--metrics-addr {s:?}: expected IP:PORT, e.g. 0.0.0.0:{DEFAULT_METRICS_PORT}"
                ))
            })
            .ok(),
    };
    if let Err(e) = ferry_watch::Excludes::new(&a.excludes, None) {
        errs.push(e.to_string());
    }
    if a.max_connection_age_secs == 0 {
        errs.push("--max-connection-age-secs 0: must be at least 1 (default 3600)".into());
    }
    if a.batch_idle_ms == 0 || a.batch_max_delay_ms < a.batch_idle_ms {
        errs.push(format!(
            "--batch-idle-ms {} / --batch-max-delay-ms {}: need 0 < idle <= max delay",
            a.batch_idle_ms, a.batch_max_delay_ms
        ));
    }
    if a.log_capacity == 0 || a.log_max_items == 0 {
        errs.push(format!(
            "--log-capacity {} / --log-max-items {}: both must be at least 1",
            a.log_capacity, a.log_max_items
        ));
    }
    let rescan_interval = match parse_interval(&a.rescan_interval) {
        Some(d) if d.is_zero() => None,
        Some(d) if d < Duration::from_millis(100) => {
            errs.push(format!(
                "--rescan-interval {:?}: at least 100ms (or 0 to turn it off)",
                a.rescan_interval
            ));
            None
        }
        Some(d) => Some(d),
        None => {
            errs.push(format!(
                "--rescan-interval {:?}: expected a duration such as 600, 600s, 10m, 1h or 500ms (0 turns it off)",
                a.rescan_interval
            ));
            None
        }
    };
    let (state_dir, state_rel) = match &root {
        Some(root) => {
            let sd = a.state_dir.clone().unwrap_or_else(|| root.join(".ferry"));
            let sd_abs = absolutize(&sd);
            let rel = sd_abs.strip_prefix(root).ok().and_then(|r| {
                use std::os::unix::ffi::OsStrExt;
                RelPath::new(r.as_os_str().as_bytes().to_vec()).ok()
            });
            if sd_abs == *root {
                errs.push("--state-dir is the root itself; use a subdirectory (default ROOT/.ferry) or a path outside the root".into());
            }
            // State left in ROOT/.ferry by a run with the default state dir,
            // while this run keeps its state elsewhere: that old state would
            // be replicated as data, and replicas (whose state dir is their
            // ROOT/.ferry) would refuse it, stalling replication.
            let default_sd = root.join(".ferry");
            if sd_abs != default_sd
                && ["lock", "state.a", "state.b"]
                    .iter()
                    .any(|f| default_sd.join(f).exists())
            {
                errs.push(format!(
                    "--state-dir {}: but {} holds ferry state from a run with the default state dir; it would be replicated as data (and refused by replicas). Remove {} or drop --state-dir to use it",
                    sd.display(),
                    default_sd.display(),
                    default_sd.display()
                ));
            }
            if rel.as_ref().is_some_and(|r| r.depth() > 1) {
                errs.push(format!(
                    "--state-dir {}: inside the root it must be a top-level directory (e.g. ROOT/.ferry), or lie outside the root; a deeper one could be removed with its parent by a peer",
                    sd.display()
                ));
            }
            (sd_abs, rel)
        }
        None => (PathBuf::new(), None),
    };
    let wire = match a.wire_versions.as_deref() {
        None => Some(ferry_proto::VERSIONS),
        Some(s) => parse_wire_versions(s).map_err(|e| errs.push(e)).ok(),
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(NodeConfig {
        root: root.expect("checked"),
        name: name.expect("checked"),
        tls_dir: tls_dir.expect("checked"),
        listen: listen.expect("checked"),
        role_seed,
        role_explicit,
        peers,
        state_dir,
        state_rel,
        metrics_addr,
        excludes: a.excludes.clone(),
        safe_links: a.safe_links,
        batch_idle: Duration::from_millis(a.batch_idle_ms),
        batch_max_delay: Duration::from_millis(a.batch_max_delay_ms),
        shutdown_grace: Duration::from_secs(a.shutdown_grace_secs),
        max_inflight: DEFAULT_MAX_INFLIGHT,
        log_capacity: a.log_capacity,
        log_max_items: a.log_max_items,
        rescan_interval,
        max_conn_age: Duration::from_secs(a.max_connection_age_secs),
        congestion: match a.congestion_control {
            CongestionArg::Auto => ferry_net::Congestion::Auto,
            CongestionArg::Bbr => ferry_net::Congestion::Bbr,
            CongestionArg::Cubic => ferry_net::Congestion::Cubic,
        },
        wire: wire.expect("checked"),
    })
}

/// `600`, `600s`, `10m`, `1h`, `500ms` (a bare number is seconds).
fn parse_interval(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "" | "s" => n.checked_mul(1000)?,
        "ms" => n,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

fn absolutize(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    // not created yet: canonicalize the parent
    match (p.parent(), p.file_name()) {
        (Some(par), Some(name)) if !par.as_os_str().is_empty() => absolutize(par).join(name),
        _ => std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf()),
    }
}

fn check_root(r: &Path) -> Result<PathBuf, String> {
    let md = std::fs::symlink_metadata(r).map_err(|e| {
        format!(
            "--root {}: {e}; create the directory or fix the path",
            r.display()
        )
    })?;
    if md.file_type().is_symlink() {
        return Err(format!(
            "--root {} is a symlink; pass the real directory ({}) so nothing is replicated through a link",
            r.display(),
            r.canonicalize().map(|p| p.display().to_string()).unwrap_or_else(|_| "its target".into())
        ));
    }
    if !md.is_dir() {
        return Err(format!("--root {}: not a directory", r.display()));
    }
    let c = r
        .canonicalize()
        .map_err(|e| format!("--root {}: {e}", r.display()))?;
    // `/` under any name (a bind mount of the host's root shows its inode)
    let same_as_slash = std::fs::metadata("/").is_ok_and(|s| {
        use std::os::unix::fs::MetadataExt;
        s.dev() == md.dev() && s.ino() == md.ino()
    });
    if c == Path::new("/") || same_as_slash {
        return Err(
            "--root /: refusing to replicate the whole filesystem; pass the volume's mount path"
                .into(),
        );
    }
    std::fs::read_dir(&c).map_err(|e| {
        format!("--root {}: cannot read it ({e}); run ferry as a user that can read and write the volume", c.display())
    })?;
    Ok(c)
}

fn usage_exit(errs: &[String]) -> i32 {
    eprintln!("ferry: invalid settings:");
    for e in errs {
        eprintln!("  - {e}");
    }
    eprintln!("(every flag can also be set from FERRY_<FLAG>; see `ferry run --help`)");
    EXIT_USAGE
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferry")
        // blocking work (file reads, the reader threads, the apply thread's
        // helpers) needs a few threads, not tokio's default of up to 512:
        // idle ones linger 10 s, each with its own stack and buffers
        .max_blocking_threads(16)
        .build()
        .expect("tokio runtime")
}

/// Entry point; returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => EXIT_USAGE,
            };
            let _ = e.print();
            return code;
        }
    };
    // The demo draws its own live view: keep its logs to warnings unless asked.
    let level = match (&cli.cmd, cli.log_level) {
        (Command::Demo(_), LogLevel::Info) if std::env::var_os("FERRY_LOG_LEVEL").is_none() => {
            "warn"
        }
        (_, l) => l.as_str(),
    };
    crate::telemetry::init_logging(level);
    match cli.cmd {
        Command::Cert(c) => {
            let r = match c {
                CertCommand::Init { out, name } => {
                    ferry_net::certs::init_ca(&out, &name).map(|_| {
                        println!(
                            "CA written: {}/ca.crt, {}/ca.key (keep ca.key secret)",
                            out.display(),
                            out.display()
                        )
                    })
                }
                CertCommand::Issue {
                    ca,
                    name,
                    out,
                    days,
                } => ferry_net::certs::issue(&ca, &name, &out, days).map(|_| {
                    println!(
                        "certificate for {name} written: {}/tls.crt, tls.key, ca.crt",
                        out.display()
                    )
                }),
                CertCommand::Bundle { out, cas } => {
                    ferry_net::certs::bundle(&out, &cas).map(|subjects| {
                        println!(
                            "trust bundle written: {}/ca.crt with {} CA certificate{}:",
                            out.display(),
                            subjects.len(),
                            if subjects.len() == 1 { "" } else { "s" }
                        );
                        for s in subjects {
                            println!("  {s}");
                        }
                    })
                }
            };
            match r {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("ferry: {e}");
                    1
                }
            }
        }
        Command::Run(a) => {
            let cfg = match resolve(&a) {
                Ok(c) => c,
                Err(errs) => return usage_exit(&errs),
            };
            runtime().block_on(run(cfg))
        }
        Command::Status(a) => {
            let sd = match (&a.state_dir, &a.root) {
                (Some(s), _) => s.clone(),
                (None, Some(r)) => r.join(".ferry"),
                (None, None) => {
                    return usage_exit(&["ferry status needs --state-dir DIR or --root DIR".into()])
                }
            };
            runtime().block_on(status(&sd, &a))
        }
        Command::Promote(a) => {
            let sd = match (&a.state_dir, &a.root) {
                (Some(s), _) => s.clone(),
                (None, Some(r)) => r.join(".ferry"),
                (None, None) => {
                    return usage_exit(
                        &["ferry promote needs --state-dir DIR or --root DIR".into()],
                    )
                }
            };
            let cmd = match &a.to {
                Some(to) => format!("promote-to {to}"),
                None => "promote".into(),
            };
            match runtime().block_on(crate::control::query(&sd, &cmd)) {
                Ok(out) => match out.trim_end().strip_prefix("ok: ") {
                    Some(msg) => {
                        println!("{msg}");
                        0
                    }
                    None => {
                        eprintln!(
                            "ferry: {}",
                            out.trim_end()
                                .strip_prefix("error: ")
                                .unwrap_or(out.trim_end())
                        );
                        1
                    }
                },
                Err(e) => {
                    eprintln!("ferry: {e:#}");
                    1
                }
            }
        }
        Command::Demo(a) => runtime().block_on(crate::demo::run(a)),
        Command::Check(a) => runtime().block_on(crate::check::run(&a)),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "ferry", &mut std::io::stdout());
            0
        }
        Command::Man { out } => match man(out.as_deref()) {
            Ok(()) => 0,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
            Err(e) => {
                eprintln!("ferry man: {e}");
                1
            }
        },
        Command::Inject(a) => {
            let listen: SocketAddr = match a.listen.parse() {
                Ok(l) => l,
                Err(_) => {
                    return usage_exit(&[format!(
                        "--listen {:?}: expected IP:PORT, e.g. 0.0.0.0:8443",
                        a.listen
                    )])
                }
            };
            let cfg = ferry_inject::InjectConfig {
                listen,
                tls_dir: a.tls_dir,
                sidecar_image: a.sidecar_image,
            };
            runtime().block_on(async move {
                let shutdown = async {
                    let mut term = match tokio::signal::unix::signal(
                        tokio::signal::unix::SignalKind::terminate(),
                    ) {
                        Ok(t) => t,
                        Err(_) => return std::future::pending().await,
                    };
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                };
                match ferry_inject::serve(cfg, shutdown).await {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("ferry inject: {e}");
                        1
                    }
                }
            })
        }
    }
}

/// Writes the man pages: `ferry.1` to stdout, or every page into `out`.
fn man(out: Option<&Path>) -> std::io::Result<()> {
    let cmd = <Cli as clap::CommandFactory>::command();
    match out {
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout()),
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(cmd, dir)?;
            println!("man pages written to {}", dir.display());
            Ok(())
        }
    }
}

/// Asks the daemon for its status report.
async fn query_status(state_dir: &Path) -> anyhow::Result<crate::status::StatusReport> {
    let limit = Duration::from_secs(10);
    let line = tokio::time::timeout(limit, crate::control::query(state_dir, "status"))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the daemon at {} did not answer within {limit:?}",
                state_dir.display()
            )
        })??;
    serde_json::from_str(&line).map_err(|e| {
        anyhow::anyhow!(
            "the daemon's answer is not a status this ferry can read ({e}); are the daemon and this command the same version? The answer was: {}",
            line.trim_end().chars().take(200).collect::<String>()
        )
    })
}

/// `--wait`: while a resync runs on the node, waits for its end, showing
/// its progress on a terminal.
async fn wait_for_resync(state_dir: &Path) {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut bar: Option<indicatif::ProgressBar> = None;
    loop {
        let Ok(st) = query_status(state_dir).await else {
            break;
        };
        let Some(r) = st.resync else { break };
        if tty {
            let b = bar.get_or_insert_with(|| {
                let b = indicatif::ProgressBar::new(r.total);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "resync with {msg}: {bar:30} {pos}/{len} entries ({eta} left)",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                b
            });
            b.set_message(r.peer);
            b.set_length(r.total.max(r.done));
            b.set_position(r.done);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}

/// One status print; returns the exit code (0 healthy, 1 degraded, 2 down).
async fn status_once(state_dir: &Path, json: bool) -> i32 {
    use crate::status::{Health, EXIT_DEGRADED, EXIT_DOWN, EXIT_HEALTHY};
    match query_status(state_dir).await {
        Err(e) => {
            eprintln!("ferry: {e:#}");
            EXIT_DOWN
        }
        Ok(r) => {
            if json {
                match serde_json::to_string(&r) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("ferry: cannot encode the status: {e}"),
                }
            } else {
                print!("{}", r.to_text());
            }
            match r.health() {
                Health::Healthy => EXIT_HEALTHY,
                Health::Degraded => EXIT_DEGRADED,
            }
        }
    }
}

/// `ferry status`: never waits for anything but the daemon's answer,
/// unless asked (`--wait`, `--watch`).
async fn status(state_dir: &Path, a: &StatusArgs) -> i32 {
    if a.wait {
        wait_for_resync(state_dir).await;
    }
    if !a.watch {
        return status_once(state_dir, a.json).await;
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let every = Duration::from_secs_f64(a.interval.clamp(0.1, 3600.0));
    // one SIGINT stream for the whole watch, installed first: a ctrl_c()
    // future made anew each round would miss a Ctrl-C between two rounds
    let mut sigint = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferry: cannot handle Ctrl-C: {e}");
            return crate::status::EXIT_DOWN;
        }
    };
    loop {
        if tty && !a.json {
            // clear the screen, cursor home
            print!("\x1b[2J\x1b[H");
        }
        let code = status_once(state_dir, a.json).await;
        if !tty && !a.json {
            println!();
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = sigint.recv() => return code,
        }
    }
}

async fn run(cfg: NodeConfig) -> i32 {
    let _root_lock = match lock_root(&cfg.root) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ferry: {e}");
            return 1;
        }
    };
    let handle = match crate::node::start(cfg).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            tracing::error!(error = %format!("{e:#}"), "ferry could not start");
            return 1;
        }
    };
    let mut handle = handle;
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferry: cannot install SIGTERM handler: {e}");
            return 1;
        }
    };
    let mut requests = std::mem::replace(&mut handle.requests, tokio::sync::mpsc::channel(1).1);
    loop {
        let req = tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shipping what is pending, then exiting"); handle.shutdown().await; return 0 }
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted: shutting down"); handle.shutdown().await; return 0 }
            _ = handle.wait_fatal() => { tracing::error!("a node task failed; exiting"); handle.shutdown().await; return 1 }
            r = requests.recv() => r,
        };
        let Some(req) = req else { continue };
        use crate::node::{handover, NodeRequest};
        let why = match req {
            NodeRequest::Restart(why) => why,
            NodeRequest::Switchover { to, reply } => {
                if let Err(e) = handover::check_switchover(&handle.shared, &to) {
                    let _ = reply.send(Err(format!("{e:#}")));
                    continue;
                }
                tracing::info!(to = %to, "switchover: shipping what is pending, then handing over");
                handle.drain().await;
                let r = handover::switchover(&handle, &to)
                    .await
                    .map_err(|e| format!("{e:#}"));
                if let Err(e) = &r {
                    tracing::error!(error = %e, "switchover failed; this node restarts as primary");
                }
                let _ = reply.send(r);
                "switchover".into()
            }
            NodeRequest::Failover { reply } => {
                if let Err(e) = handover::check_failover(&handle.shared) {
                    let _ = reply.send(Err(format!("{e:#}")));
                    continue;
                }
                tracing::warn!(
                    "failover: finishing the batch in progress, then taking over as primary"
                );
                handle.drain().await;
                let dirty = ferry_apply::needs_resync_at(&handle.shared.cfg.state_dir);
                let r = handover::failover(&handle.shared, dirty).map_err(|e| format!("{e:#}"));
                let _ = reply.send(r);
                "failover".into()
            }
        };
        // let the control socket deliver its answer, then restart in the
        // (durable) new role: same process, same pid
        tokio::time::sleep(Duration::from_millis(200)).await;
        tracing::info!(reason = %why, "restarting in the node's durable role");
        handle.shutdown().await;
        return restart_self();
    }
}

/// Replaces this process with a fresh `ferry` of the same arguments: the
/// node starts again from its durable state (role, epoch). Returns only on
/// failure.
fn restart_self() -> i32 {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ferry: cannot find my own executable to restart: {e}");
            return 1;
        }
    };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .exec();
    eprintln!("ferry: restart failed: {err}");
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rescan_interval_forms() {
        assert_eq!(parse_interval("600"), Some(Duration::from_secs(600)));
        assert_eq!(parse_interval("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_interval("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_interval("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_interval("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_interval("0"), Some(Duration::ZERO));
        assert_eq!(parse_interval("ten"), None);
        assert_eq!(parse_interval("5d"), None);
        assert_eq!(parse_interval(""), None);
        assert_eq!(parse_interval("99999999999999999999h"), None);
    }

    #[test]
    fn peers_parse_or_say_why() {
        assert_eq!(
            parse_peer("a=h:1").unwrap(),
            PeerSpec {
                name: "a".into(),
                addr: "h:1".into()
            }
        );
        assert!(parse_peer("a").unwrap_err().contains("NAME=HOST:PORT"));
        assert!(parse_peer("a=h").unwrap_err().contains("no port"));
        assert!(parse_peer("a=h:0").unwrap_err().contains("1 to 65535"));
        assert!(parse_peer("bad name=h:1")
            .unwrap_err()
            .contains("not a valid node name"));
    }
}
