//! What `ferry status` shows: the JSON schema (serde), the text form, and
//! the health behind the exit code. The daemon builds a [`StatusReport`]
//! from its live [`Status`] when asked over the control socket; the client
//! decodes it and prints it (text or JSON) and exits with its health.
//!
//! Units: every duration is in **seconds, as a float** (`*_s`); every point
//! in time is given twice, as RFC 3339 (UTC) and as Unix seconds
//! (`*_unix_s`). See docs/OPERATIONS.md.

use crate::check::{human_duration, rfc3339};
use crate::node::Status;
use serde::{Deserialize, Serialize};

/// Version of the JSON shape; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// Exit codes of `ferry status`.
pub const EXIT_HEALTHY: i32 = 0;
pub const EXIT_DEGRADED: i32 = 1;
pub const EXIT_DOWN: i32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub schema_version: u32,
    pub name: String,
    pub role: String,
    pub epoch: u64,
    /// The node's /readyz: a replica caught up at a batch boundary, a
    /// primary serving.
    pub ready: bool,
    /// When the daemon made this report.
    pub time: String,
    pub time_unix_s: f64,
    /// Primary: last batch sealed.
    pub sealed_seq: u64,
    /// Replica: last batch applied durably.
    pub applied_seq: u64,
    /// Replica: the batch boundary its tree sits at (none before the first).
    pub consistent_as_of: Option<ConsistentAsOf>,
    pub resync: Option<ResyncReport>,
    pub conflicts: Option<ConflictsReport>,
    /// Entries not replicated (path, reason): each counted once.
    pub skipped: SkippedReport,
    pub peers: Vec<PeerReport>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SkippedReport {
    /// Distinct entries left out since start (see ferry_skipped_entries_total).
    pub count: u64,
    /// The latest of them (at most 20).
    pub latest: Vec<SkippedItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedItem {
    pub path: String,
    pub reason: String,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsistentAsOf {
    pub seq: u64,
    /// Seal time of that batch on the primary (the primary's clock).
    pub source_time: String,
    pub source_time_unix_s: f64,
    /// Seconds from that seal to this report: the consistent RPO.
    pub age_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResyncReport {
    pub peer: String,
    pub done: u64,
    /// 0 while not known yet (manifests being compared).
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictsReport {
    pub files: u64,
    pub dir: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerReport {
    pub name: String,
    pub connected: bool,
    /// Wire version of the last session with the peer (0: none yet).
    pub wire_version: u16,
    pub acked_seq: u64,
    /// Sealed batches the peer has not acknowledged (primary side).
    pub unacked: u64,
    /// Seal-to-ack seconds of the last acknowledged batch (primary side;
    /// none before the first ack).
    pub lag_s: Option<f64>,
    /// Age of the oldest batch the peer has not acknowledged, seconds; 0
    /// when it has them all (primary side).
    pub rpo_s: f64,
    pub last_error: Option<String>,
}

/// The health behind `ferry status`'s exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Ready, every peer connected, no resync running, no conflicts.
    Healthy,
    /// Running, but not ready, a peer disconnected (a replica: no primary
    /// session), a resync running, or conflicts preserved to look at.
    Degraded,
}

impl StatusReport {
    /// Builds the report from a node's live status at `now_ns`.
    pub fn new(s: &Status, ready: bool, now_ns: u64) -> StatusReport {
        let now_s = now_ns as f64 / 1e9;
        StatusReport {
            schema_version: SCHEMA_VERSION,
            name: s.name.clone(),
            role: s.role.clone(),
            epoch: s.epoch,
            ready,
            time: rfc3339((now_ns / 1_000_000_000) as i64),
            time_unix_s: now_s,
            sealed_seq: s.sealed_seq,
            applied_seq: s.applied_seq,
            consistent_as_of: (s.role != "primary" && s.consistent_as_of_ns != 0).then(|| {
                ConsistentAsOf {
                    seq: s.applied_seq,
                    source_time: rfc3339((s.consistent_as_of_ns / 1_000_000_000) as i64),
                    source_time_unix_s: s.consistent_as_of_ns as f64 / 1e9,
                    age_s: now_ns.saturating_sub(s.consistent_as_of_ns) as f64 / 1e9,
                }
            }),
            resync: s.resync.as_ref().map(|r| ResyncReport {
                peer: r.peer.clone(),
                done: r.done,
                total: r.total,
            }),
            conflicts: s.conflicts.as_ref().map(|(n, d)| ConflictsReport {
                files: *n,
                dir: d.clone(),
            }),
            skipped: SkippedReport {
                count: s.skipped_count,
                latest: s
                    .skipped
                    .iter()
                    .map(|e| SkippedItem {
                        path: e.path.clone(),
                        reason: e.reason.to_string(),
                        error: e.error.clone(),
                    })
                    .collect(),
            },
            peers: s
                .peers
                .iter()
                .map(|p| PeerReport {
                    name: p.name.clone(),
                    connected: p.connected,
                    wire_version: p.wire_version,
                    acked_seq: p.acked_seq,
                    unacked: p.unacked,
                    lag_s: p.lag_s,
                    // consistent with `unacked` in the same report
                    rpo_s: if p.unacked == 0 { 0.0 } else { p.rpo_s },
                    last_error: p.last_error.clone(),
                })
                .collect(),
        }
    }

    pub fn health(&self) -> Health {
        let peers_ok = !self.peers.is_empty() && self.peers.iter().all(|p| p.connected);
        if self.ready && peers_ok && self.resync.is_none() && self.conflicts.is_none() {
            Health::Healthy
        } else {
            Health::Degraded
        }
    }

    /// Why the node is degraded, one reason a line (empty when healthy).
    pub fn degraded_because(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !self.ready {
            why.push(if self.role == "primary" {
                "not ready".to_string()
            } else {
                "not ready: not caught up with the primary at a batch boundary".to_string()
            });
        }
        if self.peers.is_empty() {
            why.push(if self.role == "primary" {
                "no peers".to_string()
            } else {
                "no primary has connected".to_string()
            });
        }
        for p in self.peers.iter().filter(|p| !p.connected) {
            why.push(format!("peer {} disconnected", p.name));
        }
        if let Some(r) = &self.resync {
            why.push(format!("resync with {} running", r.peer));
        }
        if self.conflicts.is_some() {
            why.push("conflicts preserved (see above)".into());
        }
        why
    }

    /// Human-readable form: RFC 3339 times with ages, durations with units.
    pub fn to_text(&self) -> String {
        let mut o = format!(
            "node:      {}\nrole:      {}\nepoch:     {}\nat:        {}\n",
            self.name, self.role, self.epoch, self.time
        );
        if self.role == "primary" {
            o += &format!("sealed:    batch {}\n", self.sealed_seq);
        } else {
            match &self.consistent_as_of {
                None => {
                    o += &format!(
                        "consistent as of seq {}, never (no batch applied yet)\n",
                        self.applied_seq
                    )
                }
                Some(c) => {
                    o += &format!(
                        "consistent as of seq {}, sealed at source time {} ({} ago)\n",
                        c.seq,
                        c.source_time,
                        human_duration(c.age_s)
                    )
                }
            }
        }
        if let Some(r) = &self.resync {
            if r.total > 0 {
                o += &format!(
                    "resync:    with {}: {}/{} entries\n",
                    r.peer, r.done, r.total
                );
            } else {
                o += &format!("resync:    with {}: comparing manifests\n", r.peer);
            }
        }
        if self.skipped.count > 0 {
            o += &format!(
                "skipped:   {} entries not replicated (see ferry_skipped_entries_total), latest:\n",
                self.skipped.count
            );
            for e in &self.skipped.latest {
                o += &format!(
                    "  {} ({}{})\n",
                    e.path,
                    e.reason,
                    e.error
                        .as_deref()
                        .map(|x| format!(": {x}"))
                        .unwrap_or_default()
                );
            }
        }
        if let Some(c) = &self.conflicts {
            o += &format!(
                "conflicts: {} files this node wrote as primary that the new primary never got, preserved in {} (see MANIFEST.tsv there)\n",
                c.files, c.dir
            );
        }
        for p in &self.peers {
            let lag = p
                .lag_s
                .map(|l| format!(", lag {} (last batch)", human_duration(l)))
                .unwrap_or_default();
            let rpo = if self.role == "primary" {
                if p.unacked == 0 {
                    ", RPO 0 (has every batch)".to_string()
                } else {
                    format!(
                        ", RPO {} (oldest unacknowledged batch)",
                        human_duration(p.rpo_s)
                    )
                }
            } else {
                String::new()
            };
            o += &format!(
                "peer {}: {}, acked seq {}, backlog {} batches{lag}{rpo}{}\n",
                p.name,
                match (p.connected, p.wire_version) {
                    (true, 0) => "connected".to_owned(),
                    (true, v) => format!("connected (wire version {v})"),
                    (false, _) => "disconnected".to_owned(),
                },
                p.acked_seq,
                p.unacked,
                p.last_error
                    .as_deref()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            );
        }
        match self.health() {
            Health::Healthy => o += "health:    healthy\n",
            Health::Degraded => {
                o += &format!(
                    "health:    degraded: {}\n",
                    self.degraded_because().join("; ")
                )
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{PeerStatus, ResyncProgress};

    fn replica() -> Status {
        Status {
            name: "us-east".into(),
            role: "replica".into(),
            epoch: 3,
            applied_seq: 42,
            consistent_as_of_ns: 1_796_000_000_000_000_000,
            peers: vec![PeerStatus {
                name: "eu-west".into(),
                connected: true,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn json_has_a_schema_version_seconds_and_rfc3339() {
        let now = 1_796_000_002_500_000_000;
        let r = StatusReport::new(&replica(), true, now);
        let j: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(j["schema_version"], 1);
        let c = &j["consistent_as_of"];
        assert_eq!(c["seq"], 42);
        assert_eq!(c["source_time"], "2026-11-30T00:53:20Z");
        assert_eq!(c["source_time_unix_s"], 1_796_000_000.0);
        assert_eq!(c["age_s"], 2.5);
        // no field in another unit
        let text = j.to_string();
        assert!(!text.contains("_ns") && !text.contains("_ms"), "{text}");
        // it reads back
        let back: StatusReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert!(r.to_text().contains(
            "consistent as of seq 42, sealed at source time 2026-11-30T00:53:20Z (2.5 s ago)"
        ));
    }

    #[test]
    fn health_is_healthy_only_when_ready_connected_and_quiet() {
        let now = 1_796_000_002_500_000_000;
        let ok = StatusReport::new(&replica(), true, now);
        assert_eq!(ok.health(), Health::Healthy);
        assert!(ok.to_text().contains("health:    healthy"));
        assert_eq!(
            StatusReport::new(&replica(), false, now).health(),
            Health::Degraded
        );
        let mut s = replica();
        s.peers[0].connected = false;
        let r = StatusReport::new(&s, true, now);
        assert_eq!(r.health(), Health::Degraded);
        assert!(r.to_text().contains("degraded: peer eu-west disconnected"));
        let mut s = replica();
        s.resync = Some(ResyncProgress {
            peer: "eu-west".into(),
            done: 1,
            total: 2,
        });
        assert_eq!(StatusReport::new(&s, true, now).health(), Health::Degraded);
        let mut s = replica();
        s.peers.clear();
        assert!(StatusReport::new(&s, true, now)
            .to_text()
            .contains("no primary has connected"));
    }
}
