//! A running ferry node: state dir, transport, metrics, and the primary's or
//! the replica's loops. `ferry run` and `ferry demo` both start nodes here.

pub mod conflicts;
mod file_index;
pub mod greet;
pub mod handover;
pub mod primary;
pub mod replica;
mod transfer;

use crate::config::NodeConfig;
use crate::telemetry::Metrics;
use anyhow::Context;
use ferry_store::{NodeState, Role, StateDir};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, watch};

/// What a running node asks of its owner (`ferry run`'s loop), which holds
/// the node and can drain and restart it.
pub enum NodeRequest {
    /// The durable role changed (promoted, or demoted by a newer epoch):
    /// drain, then restart in the new role.
    Restart(String),
    /// `ferry promote --to NAME` on a primary: planned switchover.
    Switchover {
        to: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// `ferry promote` on a replica: failover.
    Failover {
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// What `ferry status` shows; updated by the loops.
/// A primary's link to one peer's sender: woken when that peer greets us
/// (it restarted), unless the greeting comes from the very process the
/// current session talks to (`instance`, from its welcome; 0: no session).
#[derive(Default)]
pub struct Wake {
    pub notify: tokio::sync::Notify,
    pub instance: std::sync::atomic::AtomicU64,
}

/// How a replica's start greeting closes its connection: this prefix, then
/// the process's instance number in hex.
pub const GREETING: &str = "replica started ";

#[derive(Debug, Clone, Default)]
pub struct Status {
    pub name: String,
    pub role: String,
    pub epoch: u64,
    pub sealed_seq: u64,
    pub applied_seq: u64,
    pub consistent_as_of_ns: u64,
    pub peers: Vec<PeerStatus>,
    pub resync: Option<ResyncProgress>,
    /// Files preserved from a demotion (the old primary's writes the new
    /// primary never got), and where.
    pub conflicts: Option<(u64, String)>,
    /// Entries not replicated (as they are), each counted once.
    pub skipped_count: u64,
    /// The latest of them (at most [`SKIPPED_SHOWN`]).
    pub skipped: std::collections::VecDeque<SkippedEntry>,
}

/// How many skipped entries `ferry status` lists (the count covers all).
pub const SKIPPED_SHOWN: usize = 20;
/// Distinct skipped entries remembered so each is reported once; past it,
/// further ones are counted in the metric only (bounded memory).
pub const SKIPPED_REMEMBERED: usize = 65_536;

/// One entry that is not replicated, and why.
#[derive(Debug, Clone, Default)]
pub struct SkippedEntry {
    pub path: String,
    pub reason: &'static str,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct PeerStatus {
    pub name: String,
    pub connected: bool,
    pub acked_seq: u64,
    pub unacked: u64,
    /// Seal-to-ack seconds of the last acknowledged batch (primary side).
    pub lag_s: Option<f64>,
    /// Age of the oldest batch the peer has not acknowledged, seconds
    /// (primary side; 0 when it has every batch).
    pub rpo_s: f64,
    pub last_error: Option<String>,
    /// Wire version of the last session with the peer (0: none yet).
    pub wire_version: u16,
}

/// A manifest-diff resync in progress (`total` 0: not known yet).
#[derive(Debug, Clone, Default)]
pub struct ResyncProgress {
    pub peer: String,
    pub done: u64,
    pub total: u64,
}

impl Status {
    /// The report `ferry status` shows (see [`crate::status`]).
    pub fn report(&self, ready: bool) -> crate::status::StatusReport {
        crate::status::StatusReport::new(self, ready, now_ns())
    }
}

/// State shared by a node's tasks.
pub struct Shared {
    pub cfg: NodeConfig,
    pub metrics: Metrics,
    pub ready: Arc<AtomicBool>,
    pub status: Mutex<Status>,
    pub state: Mutex<(StateDir, NodeState)>,
    pub requests: mpsc::Sender<NodeRequest>,
    /// (path, reason) of every entry reported as skipped (bounded by
    /// [`SKIPPED_REMEMBERED`]).
    pub skips: Mutex<std::collections::HashSet<(String, &'static str)>>,
}

impl Shared {
    pub fn node_state(&self) -> NodeState {
        self.state.lock().expect("state lock").1
    }
    /// Persists `st` (fsync) and makes it current.
    pub fn save_state(&self, st: NodeState) -> Result<(), ferry_store::StoreError> {
        let mut g = self.state.lock().expect("state lock");
        g.0.save(&st)?;
        g.1 = st;
        Ok(())
    }
    pub fn set_status(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().expect("status lock"));
    }

    /// An entry is not replicated (as it is): reported once per (path,
    /// reason) — a log line, `ferry_skipped_entries_total{reason}` and
    /// `ferry status` — however often scans meet it again.
    pub fn skipped(&self, path: &str, reason: &'static str, error: Option<&str>) {
        {
            let mut seen = self.skips.lock().expect("skips lock");
            if seen.len() >= SKIPPED_REMEMBERED {
                self.metrics.skipped.with_label_values(&[reason]).inc();
                return;
            }
            if !seen.insert((path.to_owned(), reason)) {
                return;
            }
        }
        use crate::events::Event;
        crate::events::EntrySkipped {
            path,
            reason,
            error,
        }
        .emit(&self.metrics);
        self.set_status(|s| {
            s.skipped_count += 1;
            if s.skipped.len() >= SKIPPED_SHOWN {
                s.skipped.pop_front();
            }
            s.skipped.push_back(SkippedEntry {
                path: path.to_owned(),
                reason,
                error: error.map(str::to_owned),
            });
        });
    }

    /// A primary learned of a newer epoch (G7): it becomes a replica of the
    /// newer primary. Its last sealed position is recorded, so its next
    /// resync preserves the writes the new primary never got (conflicts).
    pub fn demote(&self, newer_epoch: u64, why: &str) -> anyhow::Result<()> {
        let st = self.node_state();
        if st.role != Role::Primary || newer_epoch <= st.epoch {
            return Ok(());
        }
        ferry_store::marker::save(
            &self.cfg.state_dir,
            ferry_store::marker::DEMOTED,
            &[st.epoch, st.seq, now_ns()],
        )?;
        self.save_state(NodeState {
            role: Role::Replica,
            epoch: newer_epoch,
            applied_epoch: st.epoch,
            ..st
        })?;
        self.metrics.epoch.set(newer_epoch as i64);
        tracing::warn!(
            old_epoch = st.epoch,
            new_epoch = newer_epoch,
            last_sealed = st.seq,
            "This node is no longer primary ({why}): it restarts as a replica of the primary of epoch {newer_epoch}."
        );
        let _ = self.requests.try_send(NodeRequest::Restart(format!(
            "demoted by epoch {newer_epoch}"
        )));
        Ok(())
    }

    /// Makes this replica the primary of `epoch`, continuing after the batch
    /// it last applied (durable before anything else happens).
    pub fn become_primary(&self, epoch: u64) -> anyhow::Result<NodeState> {
        let st = self.node_state();
        anyhow::ensure!(
            epoch > st.epoch,
            "epoch {epoch} is not newer than {}",
            st.epoch
        );
        ferry_store::marker::save(
            &self.cfg.state_dir,
            ferry_store::marker::EPOCH_BASE,
            &[epoch, st.applied_epoch, st.seq, st.sealed_at_ns],
        )?;
        let ns = NodeState {
            role: Role::Primary,
            epoch,
            ..st
        };
        self.save_state(ns)?;
        ferry_store::marker::remove(&self.cfg.state_dir, ferry_store::marker::DEMOTED)?;
        self.metrics.epoch.set(epoch as i64);
        Ok(ns)
    }
}

/// A started node.
pub struct NodeHandle {
    pub listen: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    /// Loops that drain on shutdown (batcher, peer senders, replica sessions).
    tasks: tokio::task::JoinSet<()>,
    /// Endless services (metrics, control socket): aborted on shutdown.
    services: tokio::task::JoinSet<()>,
    pub transport: Arc<ferry_net::Transport>,
    /// Role changes and promote requests for the owner.
    pub requests: mpsc::Receiver<NodeRequest>,
}

impl NodeHandle {
    /// Stops the node's loops: the primary seals and ships what is pending
    /// and waits for acks (bounded by the grace period), the replica
    /// finishes the batch in progress. The transport stays open.
    pub async fn drain(&mut self) {
        let _ = self.shutdown.send(true);
        let grace = self.shared.cfg.shutdown_grace;
        let _ = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
    }

    /// Stops the node: [`NodeHandle::drain`], then the services and the
    /// transport.
    pub async fn shutdown(mut self) {
        self.drain().await;
        self.services.abort_all();
        self.transport.close();
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            self.transport.wait_idle(),
        )
        .await;
    }

    /// Resolves when a node loop ends by itself (a fatal error).
    pub async fn wait_fatal(&mut self) {
        if self.tasks.join_next().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

/// Opens state, binds sockets and starts the node's tasks.
pub async fn start(cfg: NodeConfig) -> anyhow::Result<NodeHandle> {
    let (state_dir, loaded) = StateDir::open(&cfg.state_dir)?;
    let st = match loaded {
        Some(s) => {
            if s.role != cfg.role_seed && cfg.role_explicit {
                tracing::warn!(
                    durable_role = s.role.as_str(),
                    flag_role = cfg.role_seed.as_str(),
                    "--role is ignored: this node already has state, and its durable role decides"
                );
            }
            s
        }
        None => NodeState {
            role: cfg.role_seed,
            epoch: if cfg.role_seed == Role::Primary { 1 } else { 0 },
            seq: 0,
            applied_epoch: 0,
            sealed_at_ns: 0,
        },
    };
    if st.role == Role::Replica {
        crate::config::check_writable(&cfg.root).map_err(anyhow::Error::msg)?;
    }
    let tls = ferry_net::load_tls(&cfg.tls_dir, &cfg.name)?;
    let allowed: Vec<String> = cfg.peers.iter().map(|p| p.name.clone()).collect();
    let mut transport = ferry_net::Transport::bind_with(cfg.listen, &tls, allowed, cfg.congestion)?;
    transport.set_max_conn_age(cfg.max_conn_age);
    let transport = Arc::new(transport);
    let listen = transport
        .local_addr()
        .context("reading the bound address")?;
    let metrics = Metrics::new();
    metrics.epoch.set(st.epoch as i64);
    if let Some(t) = tls.not_after() {
        metrics.cert_expiry.set(t as f64);
    }
    for p in &cfg.peers {
        crate::telemetry::init_peer(&metrics, &p.name);
    }
    metrics.role.with_label_values(&[st.role.as_str()]).set(1);
    if st.role == Role::Replica {
        // the durable position, before the first scrape can happen
        metrics.applied_seq.set(st.seq as i64);
        metrics.consistent_as_of.set(st.sealed_at_ns as f64 / 1e9);
    }
    let ready = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    let mut services = tokio::task::JoinSet::new();
    let metrics_addr = match cfg.metrics_addr {
        Some(a) => {
            let l = crate::telemetry::bind_metrics(a).await?;
            let addr = l.local_addr()?;
            services.spawn(crate::telemetry::serve_http(
                l,
                metrics.clone(),
                ready.clone(),
            ));
            Some(addr)
        }
        None => None,
    };
    let status = Status {
        name: cfg.name.clone(),
        role: st.role.as_str().into(),
        epoch: st.epoch,
        ..Status::default()
    };
    let (req_tx, req_rx) = mpsc::channel(4);
    let shared = Arc::new(Shared {
        cfg,
        metrics,
        ready,
        status: Mutex::new(status),
        state: Mutex::new((state_dir, st)),
        requests: req_tx,
        skips: Mutex::new(std::collections::HashSet::new()),
    });
    conflicts::report(&shared);
    shared.save_state(st)?;
    crate::control::spawn(&shared, &mut services)?;
    services.spawn(watch_tls(shared.clone(), transport.clone()));
    let (tx, rx) = watch::channel(false);
    match st.role {
        Role::Primary => {
            primary::start(
                shared.clone(),
                transport.clone(),
                rx,
                &mut tasks,
                &mut services,
            )
            .await?
        }
        Role::Replica => replica::start(shared.clone(), transport.clone(), rx, &mut tasks).await?,
    }
    tracing::info!(name = %shared.cfg.name, role = st.role.as_str(), %listen, epoch = st.epoch, "ferry node started");
    Ok(NodeHandle {
        listen,
        metrics_addr,
        shared,
        shutdown: tx,
        tasks,
        services,
        transport,
        requests: req_rx,
    })
}

/// Picks up rotated TLS files without a restart: new handshakes use them
/// (the connection-age cap brings open connections over); a bad set is
/// reported and the last good one stays.
async fn watch_tls(shared: Arc<Shared>, transport: Arc<ferry_net::Transport>) {
    use crate::events::{Event, TlsReloadFailed, TlsReloaded};
    let dir = shared.cfg.tls_dir.clone();
    let mut watch = ferry_net::TlsWatch::new(&dir, &shared.cfg.name);
    loop {
        tokio::time::sleep(crate::config::TLS_POLL).await;
        match watch.poll().and_then(|t| {
            t.map(|t| {
                transport.reload_tls(&t)?;
                if let Some(na) = t.not_after() {
                    shared.metrics.cert_expiry.set(na as f64);
                }
                Ok(())
            })
            .transpose()
        }) {
            Ok(None) => {}
            Ok(Some(())) => TlsReloaded { dir: &dir }.emit(&shared.metrics),
            Err(e) => TlsReloadFailed {
                error: &e.to_string(),
            }
            .emit(&shared.metrics),
        }
    }
}

/// Unix nanoseconds now.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod status_tests {
    use super::*;

    /// The negotiated wire version shows per connected peer, in text and JSON.
    #[test]
    fn status_shows_each_peers_wire_version() {
        let s = Status {
            name: "eu-west".into(),
            role: "primary".into(),
            peers: vec![
                PeerStatus {
                    name: "us-east".into(),
                    connected: true,
                    wire_version: 1,
                    ..Default::default()
                },
                PeerStatus {
                    name: "ap-south".into(),
                    connected: false,
                    wire_version: 2,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let r = s.report(true);
        let text = r.to_text();
        assert!(
            text.contains("peer us-east: connected (wire version 1),"),
            "{text}"
        );
        assert!(text.contains("peer ap-south: disconnected,"), "{text}");
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.contains("{\"name\":\"us-east\",\"connected\":true,\"wire_version\":1,"),
            "{json}"
        );
    }
}
