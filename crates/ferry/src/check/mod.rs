//! `ferry check`: a preflight with the flags of `ferry run` (so the same Pod
//! spec runs it), or, with `--manifests DIR`, a look at rendered webhook
//! manifests without a cluster. Each problem is a [`Finding`] that names
//! its cause and its fix; any failed finding makes the exit code 1.
//!
//! It never writes into the root, except a probe file in the state dir.

pub mod manifests;

use crate::cli::{CheckArgs, RunArgs};
use crate::config::NodeConfig;
use serde::Serialize;
use std::path::Path;
use std::time::Duration;

/// Version of the `--json` output's shape.
pub const SCHEMA_VERSION: u32 = 1;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
    /// Not checked (and why, in the message).
    Skip,
}

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// What was checked, e.g. `certificate.expiry`, `peer us-east`.
    pub check: String,
    pub status: Level,
    /// What was found (the cause, when it failed).
    pub message: String,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn f(check: impl Into<String>, status: Level, message: impl Into<String>) -> Finding {
    Finding {
        check: check.into(),
        status,
        message: message.into(),
        fix: None,
    }
}

impl Finding {
    fn fix(mut self, fix: impl Into<String>) -> Finding {
        self.fix = Some(fix.into());
        self
    }
}

/// The whole outcome (`--json` prints it as it is).
#[derive(Debug, Serialize)]
pub struct Report {
    pub schema_version: u32,
    /// `true` when no check failed.
    pub ok: bool,
    /// The node checked (none in `--manifests` mode).
    pub node: Option<String>,
    pub findings: Vec<Finding>,
}

impl Report {
    fn new(node: Option<String>, findings: Vec<Finding>) -> Report {
        Report {
            schema_version: SCHEMA_VERSION,
            ok: !findings.iter().any(|x| x.status == Level::Fail),
            node,
            findings,
        }
    }

    pub fn to_text(&self) -> String {
        let mut o = match &self.node {
            Some(n) => format!("ferry check of node {n}:\n"),
            None => "ferry check of the webhook manifests:\n".to_string(),
        };
        for x in &self.findings {
            let tag = match x.status {
                Level::Ok => "ok  ",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
                Level::Skip => "skip",
            };
            o += &format!("  [{tag}] {}: {}\n", x.check, x.message);
            if let Some(fix) = &x.fix {
                o += &format!("         fix: {fix}\n");
            }
        }
        let n = |l: Level| self.findings.iter().filter(|x| x.status == l).count();
        o += &format!(
            "{} checks: {} failed, {} warnings, {} not checked\n",
            self.findings.len(),
            n(Level::Fail),
            n(Level::Warn),
            n(Level::Skip)
        );
        o
    }
}

/// Entry point of `ferry check`; returns the exit code.
pub async fn run(a: &CheckArgs) -> i32 {
    let report = if let Some(dir) = &a.manifests {
        Report::new(None, manifests::check_dir(dir))
    } else {
        let findings = check_node(a).await;
        Report::new(a.run.name.clone(), findings)
    };
    if a.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("ferry check: cannot encode the report: {e}");
                return 1;
            }
        }
    } else {
        print!("{}", report.to_text());
    }
    if report.ok {
        0
    } else {
        1
    }
}

async fn check_node(a: &CheckArgs) -> Vec<Finding> {
    let mut out = Vec::new();
    let cfg = match crate::cli::resolve(&a.run) {
        Ok(c) => {
            out.push(f(
                "settings",
                Level::Ok,
                "the flags of `ferry run` are valid",
            ));
            Some(c)
        }
        Err(errs) => {
            for e in errs {
                out.push(f("settings", Level::Fail, e).fix(
                    "correct the flag (or its FERRY_* variable); `ferry run --help` lists them",
                ));
            }
            None
        }
    };
    let tls_ok = check_tls(&a.run, a.warn_days, &mut out);
    match &cfg {
        Some(cfg) => {
            check_dirs(cfg, &mut out);
            check_inotify(cfg, a.max_user_watches, &mut out);
            if a.offline {
                out.push(f("peers", Level::Skip, "not checked (--offline)"));
            } else if tls_ok {
                check_peers(
                    cfg,
                    Duration::from_secs(a.peer_timeout_secs.max(1)),
                    &mut out,
                )
                .await;
            } else {
                out.push(f(
                    "peers",
                    Level::Skip,
                    "not checked: this node's certificate must be fixed first",
                ));
            }
        }
        None => out.push(f(
            "root, state dir, inotify, peers",
            Level::Skip,
            "not checked: fix the settings above first",
        )),
    }
    out.push(f(
        "clock skew",
        Level::Skip,
        "not checked: ferry's handshake carries no clock reading; keep every node's clock synchronised (NTP): source times, ages and RPO in status and metrics are read from each node's own clock",
    ));
    out
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `2026-12-07T20:15:00Z` for Unix seconds.
pub fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} s after the Unix epoch"))
}

/// A span of seconds for people: `3 d 4 h`, `5 min`, `12 s`.
pub fn human_duration(secs: f64) -> String {
    let s = secs.abs();
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} min {} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else if s < 86400.0 {
        format!(
            "{} h {} min",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    } else {
        format!(
            "{} d {} h",
            (s / 86400.0) as u64,
            ((s % 86400.0) / 3600.0) as u64
        )
    }
}

/// Returns whether the TLS material loads (the peers can be probed).
fn check_tls(a: &RunArgs, warn_days: u64, out: &mut Vec<Finding>) -> bool {
    let (Some(dir), Some(name)) = (&a.tls_dir, &a.name) else {
        out.push(f(
            "certificate",
            Level::Skip,
            "not checked: --tls-dir and --name are needed",
        ));
        return false;
    };
    let issue_fix = format!(
        "issue a new one: `ferry cert issue --ca CA_DIR --name {name} --out {}` (with cert-manager: check the Certificate's status, `kubectl describe certificate`)",
        dir.display()
    );
    let r = match ferry_net::inspect_tls(dir, name) {
        Ok(r) => r,
        Err(e) => {
            out.push(f("certificate", Level::Fail, e.to_string()).fix(issue_fix));
            return false;
        }
    };
    let subjects = r
        .cas
        .iter()
        .map(|c| c.subject.clone())
        .collect::<Vec<_>>()
        .join("; ");
    match &r.key_matches {
        Ok(()) => out.push(f(
            "certificate.key",
            Level::Ok,
            "tls.key is the key of tls.crt",
        )),
        Err(why) => out.push(
            f(
                "certificate.key",
                Level::Fail,
                format!("tls.key does not match tls.crt: {why}"),
            )
            .fix(format!(
                "put the key issued with this certificate into tls.key, or {issue_fix}"
            )),
        ),
    }
    match &r.chain {
        Ok(()) => out.push(f(
            "certificate.chain",
            Level::Ok,
            format!(
                "tls.crt (issued by {}) chains to ca.crt ({} CA certificate{}: {subjects})",
                r.cert.issuer,
                r.cas.len(),
                if r.cas.len() == 1 { "" } else { "s" }
            ),
        )),
        Err(why) => out.push(
            f(
                "certificate.chain",
                Level::Fail,
                format!(
                    "tls.crt (issued by {}) does not chain to ca.crt (which holds: {subjects}): {why}",
                    r.cert.issuer
                ),
            )
            .fix("ca.crt must hold the CA that issued tls.crt; to trust several clusters' CAs, bundle their ca.crt files: `ferry cert bundle --out DIR OWN_CA.crt OTHER_CA.crt`"),
        ),
    }
    if r.names_node {
        out.push(f(
            "certificate.name",
            Level::Ok,
            format!("tls.crt is issued for {name} (--name)"),
        ));
    } else {
        out.push(
            f(
                "certificate.name",
                Level::Fail,
                format!(
                    "tls.crt is issued for [{}], not for --name {name}: peers would refuse this node",
                    r.cert.dns_names.join(", ")
                ),
            )
            .fix(format!(
                "issue a certificate with the DNS name {name} (`ferry cert issue --name {name}`; cert-manager: dnsNames), or set --name to the certificate's name"
            )),
        );
    }
    let now = now_secs();
    let left = (r.cert.not_after - now) as f64;
    if now < r.cert.not_before {
        out.push(
            f(
                "certificate.expiry",
                Level::Fail,
                format!(
                    "tls.crt is not valid before {} (in {}): is this machine's clock behind?",
                    rfc3339(r.cert.not_before),
                    human_duration((r.cert.not_before - now) as f64)
                ),
            )
            .fix("synchronise the clock (NTP), or wait until the certificate's validity starts"),
        );
    } else if left <= 0.0 {
        out.push(
            f(
                "certificate.expiry",
                Level::Fail,
                format!(
                    "tls.crt expired at {} ({} ago)",
                    rfc3339(r.cert.not_after),
                    human_duration(-left)
                ),
            )
            .fix(issue_fix.clone()),
        );
    } else if left < warn_days as f64 * 86400.0 {
        out.push(
            f(
                "certificate.expiry",
                Level::Warn,
                format!(
                    "tls.crt expires at {} (in {}, under --warn-days {warn_days})",
                    rfc3339(r.cert.not_after),
                    human_duration(left)
                ),
            )
            .fix(format!("renew it before then (ferry picks up a rotated certificate without a restart); {issue_fix}")),
        );
    } else {
        out.push(f(
            "certificate.expiry",
            Level::Ok,
            format!(
                "tls.crt is valid until {} ({} left)",
                rfc3339(r.cert.not_after),
                human_duration(left)
            ),
        ));
    }
    for ca in &r.cas {
        if ca.not_after <= now {
            out.push(
                f(
                    "certificate.ca",
                    Level::Warn,
                    format!(
                        "ca.crt holds an expired CA certificate ({}, expired at {}): nothing it issued is accepted",
                        ca.subject,
                        rfc3339(ca.not_after)
                    ),
                )
                .fix("drop it from the bundle, or renew that CA"),
            );
        }
    }
    r.key_matches.is_ok() && r.chain.is_ok() && r.names_node && now < r.cert.not_after
}

fn ids() -> (u32, u32) {
    (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    )
}

fn may(path: &Path, access: rustix::fs::Access) -> bool {
    rustix::fs::access(path, access).is_ok()
}

fn owner(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => format!(
            "owner {}:{}, mode {:o}",
            m.uid(),
            m.gid(),
            m.mode() & 0o7777
        ),
        Err(e) => format!("cannot stat it: {e}"),
    }
}

fn check_dirs(cfg: &NodeConfig, out: &mut Vec<Finding>) {
    use rustix::fs::Access;
    let (uid, gid) = ids();
    let who = format!("this process runs as uid {uid}, gid {gid}");
    let run_as = "run ferry as the user that owns the volume (Kubernetes: the pod's securityContext runAsUser and fsGroup), or chown/chmod it";
    // The root: read always, write on a replica. Never written here.
    let root = &cfg.root;
    let readable = may(root, Access::READ_OK | Access::EXEC_OK);
    let writable = may(root, Access::WRITE_OK | Access::EXEC_OK);
    let desc = format!("{} ({}; {who})", root.display(), owner(root));
    if !readable {
        out.push(f("root", Level::Fail, format!("cannot read {desc}")).fix(run_as));
    } else if !writable {
        let role = cfg.role_seed.as_str();
        let level = if cfg.role_seed == ferry_store::Role::Replica {
            Level::Fail
        } else {
            Level::Warn
        };
        out.push(
            f(
                "root",
                level,
                format!("cannot write {desc}: a replica writes every file of its root (role {role} by --role; a primary becomes a replica when another node is promoted)"),
            )
            .fix(format!("mount the volume read-write in the ferry container and {run_as}")),
        );
    } else {
        out.push(f(
            "root",
            Level::Ok,
            format!("{desc} is readable and writable"),
        ));
    }
    // The state dir: written by ferry; probed by writing a file in it.
    let sd = &cfg.state_dir;
    if sd.is_dir() {
        let probe = sd.join(format!(".check-probe-{}", std::process::id()));
        let res = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe);
        let desc = format!("{} ({}; {who})", sd.display(), owner(sd));
        match res {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
                out.push(f("state dir", Level::Ok, format!("{desc} is writable")));
            }
            Err(e) => out.push(
                f(
                    "state dir",
                    Level::Fail,
                    format!("cannot write in {desc}: {e}"),
                )
                .fix(format!(
                    "{run_as}; or point --state-dir at a directory this user may write"
                )),
            ),
        }
    } else if sd.exists() {
        out.push(
            f(
                "state dir",
                Level::Fail,
                format!("{} exists and is not a directory", sd.display()),
            )
            .fix("remove it, or choose another --state-dir"),
        );
    } else {
        let parent = sd.parent().unwrap_or(Path::new("/"));
        if may(parent, Access::WRITE_OK | Access::EXEC_OK) {
            out.push(f(
                "state dir",
                Level::Ok,
                format!(
                    "{} does not exist yet; ferry will create it in {}",
                    sd.display(),
                    parent.display()
                ),
            ));
        } else {
            out.push(
                f(
                    "state dir",
                    Level::Fail,
                    format!(
                        "{} does not exist and cannot be created: {} is not writable ({}; {who})",
                        sd.display(),
                        parent.display(),
                        owner(parent)
                    ),
                )
                .fix(format!("{run_as}; or create the state dir for this user")),
            );
        }
    }
}

/// The inotify watch limit of this user: the lower of the sysctl and the
/// user namespace's limit.
fn watch_limit() -> Option<(u64, &'static str)> {
    let read = |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let sysctl = read("/proc/sys/fs/inotify/max_user_watches");
    let userns = read("/proc/sys/user/max_inotify_watches");
    match (sysctl, userns) {
        (Some(a), Some(b)) if b < a => Some((b, "user.max_inotify_watches (this user namespace)")),
        (Some(a), _) => Some((a, "fs.inotify.max_user_watches")),
        (None, Some(b)) => Some((b, "user.max_inotify_watches")),
        (None, None) => None,
    }
}

fn check_inotify(cfg: &NodeConfig, override_limit: Option<u64>, out: &mut Vec<Finding>) {
    let limit = match override_limit {
        Some(n) => Some((n, "--max-user-watches")),
        None => watch_limit(),
    };
    let Some((limit, source)) = limit else {
        out.push(f(
            "inotify",
            Level::Skip,
            "not checked: /proc/sys/fs/inotify is not readable here",
        ));
        return;
    };
    let sd = cfg.state_dir.clone();
    let dirs = walkdir::WalkDir::new(&cfg.root)
        .follow_links(false)
        .into_iter()
        .filter_entry(|e| e.path() != sd)
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_dir())
        .count() as u64;
    let fix = format!(
        "raise it on the node: `sysctl -w fs.inotify.max_user_watches={}` (persist it in /etc/sysctl.d/; in Kubernetes on the node, e.g. by a privileged DaemonSet); the limit is shared by every process of the same user",
        (dirs * 2).max(65536)
    );
    if dirs > limit {
        out.push(
            f(
                "inotify",
                Level::Fail,
                format!("the root holds {dirs} directories and ferry watches each one, but {source} is {limit}: the watcher would run out (ENOSPC)"),
            )
            .fix(fix),
        );
    } else if dirs * 2 > limit {
        out.push(
            f(
                "inotify",
                Level::Warn,
                format!("the root holds {dirs} directories, more than half of {source} ({limit}); other watchers of this user share the limit"),
            )
            .fix(fix),
        );
    } else {
        out.push(f(
            "inotify",
            Level::Ok,
            format!(
                "{dirs} director{} to watch, {source} is {limit}",
                if dirs == 1 { "y" } else { "ies" }
            ),
        ));
    }
}

async fn check_peers(cfg: &NodeConfig, limit: Duration, out: &mut Vec<Finding>) {
    if cfg.peers.is_empty() {
        out.push(
            f(
                "peers",
                Level::Warn,
                "no --peer listed: this node replicates with no one",
            )
            .fix("list every other node of the set: --peer NAME=HOST:PORT"),
        );
        return;
    }
    let tls = match ferry_net::load_tls(&cfg.tls_dir, &cfg.name) {
        Ok(t) => t,
        Err(e) => {
            out.push(f("peers", Level::Skip, format!("not checked: {e}")));
            return;
        }
    };
    let allowed: Vec<String> = cfg.peers.iter().map(|p| p.name.clone()).collect();
    let mut set = tokio::task::JoinSet::new();
    for (i, p) in cfg.peers.iter().enumerate() {
        let p = p.clone();
        let tls = tls.clone();
        let allowed = allowed.clone();
        let me = cfg.name.clone();
        set.spawn(async move { (i, probe_peer(&me, &p, &tls, allowed, limit).await) });
    }
    let mut res = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(x) => res.push(x),
            Err(e) => out.push(f("peers", Level::Fail, format!("a probe task failed: {e}"))),
        }
    }
    res.sort_by_key(|x| x.0);
    out.extend(res.into_iter().map(|x| x.1));
}

async fn probe_peer(
    me: &str,
    p: &crate::config::PeerSpec,
    tls: &ferry_net::TlsMaterial,
    allowed: Vec<String>,
    limit: Duration,
) -> Finding {
    use ferry_net::ProbeError;
    let check = format!("peer {}", p.name);
    let addr = match tokio::time::timeout(limit, tokio::net::lookup_host(&p.addr)).await {
        Ok(Ok(mut a)) => match a.next() {
            Some(a) => a,
            None => {
                return f(
                    check,
                    Level::Fail,
                    format!("{} resolves to no address", p.addr),
                )
                .fix("check the host name in --peer (DNS)")
            }
        },
        Ok(Err(e)) => {
            return f(
                check,
                Level::Fail,
                format!("cannot resolve {}: {e}", p.addr),
            )
            .fix("check the host name in --peer and this pod's DNS")
        }
        Err(_) => {
            return f(
                check,
                Level::Fail,
                format!("resolving {} took over {limit:?}", p.addr),
            )
            .fix("check this pod's DNS")
        }
    };
    let bind: std::net::SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let transport = match ferry_net::Transport::bind(bind, tls, allowed) {
        Ok(t) => t,
        Err(e) => return f(check, Level::Fail, format!("cannot open a UDP socket: {e}")),
    };
    let r = transport.probe(addr, &p.name, limit).await;
    transport.close();
    match r {
        Ok(rtt) => f(
            check,
            Level::Ok,
            format!(
                "{} ({addr}): mutual TLS handshake done, it is {} and accepts {me}; round trip {:.1} ms",
                p.addr,
                p.name,
                rtt.as_secs_f64() * 1e3
            ),
        ),
        Err(ProbeError::NoAnswer) => f(
            check,
            Level::Fail,
            format!("{} ({addr}): no answer within {limit:?}", p.addr),
        )
        .fix(format!(
            "check that ferry runs there and listens on UDP port {} (--listen), that the address is right, and that UDP is allowed on the way (firewalls, security groups; a Kubernetes Service needs protocol: UDP)",
            addr.port()
        )),
        Err(ProbeError::PeerCertificate(why)) => {
            let fix = if why.contains("NotValidForName") {
                format!("the node at {} presents a certificate that is not for {}: fix the address in --peer {}=..., or that node's certificate", p.addr, p.name, p.name)
            } else if why.contains("UnknownIssuer") {
                format!("its certificate does not chain to this node's ca.crt: add {}'s CA certificate to this node's ca.crt (`ferry cert bundle --out DIR OWN_CA.crt THEIR_CA.crt`)", p.name)
            } else if why.contains("Expired") {
                format!("{}'s certificate expired: renew it there", p.name)
            } else {
                "fix the peer's certificate (run `ferry check` there)".into()
            };
            f(
                check,
                Level::Fail,
                format!("{} ({addr}): this node refuses the peer's certificate: {why}", p.addr),
            )
            .fix(fix)
        }
        Err(ProbeError::RefusedByPeer(why)) => f(
            check,
            Level::Fail,
            format!("{} ({addr}): the peer refused this node's certificate: {why}", p.addr),
        )
        .fix(format!(
            "on {}: list this node in its --peer ({me}=HOST:PORT) and make its ca.crt hold the CA that issued this node's certificate (`ferry cert bundle`)",
            p.name
        )),
        Err(ProbeError::Other(why)) => f(
            check,
            Level::Fail,
            format!("{} ({addr}): {why}", p.addr),
        )
        .fix("check the address in --peer and that ferry runs there"),
    }
}
