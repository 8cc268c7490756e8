//! ferry's durable node state in the state dir: role, epoch and batch
//! position, plus the lock that keeps two daemons off one state dir.
//!
//! Layer: I/O, below the binary. The state record is written to two slots
//! in turn (`state.a`, `state.b`), each holding a generation number and a
//! BLAKE3 checksum, and fsynced in place: a torn write of one slot is
//! detected by its checksum and the other slot, one generation older, is
//! used. One fsync per update, no rename.
#![forbid(unsafe_code)]

pub mod index;
pub mod marker;
pub use index::{FileRecord, Index, IndexMeta, IndexOp, SentChunks};

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// A node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

/// The durable record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeState {
    pub role: Role,
    /// Highest epoch this node has seen (its own when primary).
    pub epoch: u64,
    /// Primary: last sealed seq. Replica: last applied seq.
    pub seq: u64,
    /// Replica: epoch of the last applied batch.
    pub applied_epoch: u64,
    /// Seal time (Unix ns) of the batch `seq`.
    pub sealed_at_ns: u64,
}

/// Errors of the state dir.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create state dir {path}: {error}; check that the parent exists and is writable, or pass --state-dir")]
    Create {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "state dir {path} is locked by another ferry process; run one ferry per root and state dir"
    )]
    Locked { path: PathBuf },
    #[error("I/O error on state file {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the file index {path} failed: {error}; the primary resyncs its peers by manifest after its next start (delete the file if this repeats)")]
    Index { path: PathBuf, error: String },
    #[error("fsync of state file {path} failed: {error}; the state was not stored")]
    Sync {
        path: PathBuf,
        error: std::io::Error,
    },
}

const MAGIC: &str = "ferry-state 1";

/// An open, locked state dir.
pub struct StateDir {
    dir: PathBuf,
    _lock: File,
    slots: [File; 2],
    generation: u64,
}

impl StateDir {
    /// Creates (if needed) and locks `dir`, and loads the last good state.
    pub fn open(dir: &Path) -> Result<(StateDir, Option<NodeState>), StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Create {
            path: dir.to_owned(),
            error: source,
        })?;
        let io = |p: &Path| {
            let p = p.to_owned();
            move |error| StoreError::Io { path: p, error }
        };
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    path: dir.to_owned(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let open = |name: &str| {
            let p = dir.join(name);
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&p)
                .map_err(io(&p))
        };
        let mut slots = [open("state.a")?, open("state.b")?];
        let mut best: Option<(u64, NodeState)> = None;
        for f in slots.iter_mut() {
            let mut s = String::new();
            f.seek(SeekFrom::Start(0)).map_err(io(dir))?;
            // A slot is tiny; a garbage one is simply invalid.
            let _ = f.take(4096).read_to_string(&mut s);
            if let Some((g, st)) = parse(&s) {
                if best.is_none_or(|(bg, _)| g > bg) {
                    best = Some((g, st));
                }
            }
        }
        let generation = best.map(|(g, _)| g).unwrap_or(0);
        Ok((
            StateDir {
                dir: dir.to_owned(),
                _lock: lock,
                slots,
                generation,
            },
            best.map(|(_, s)| s),
        ))
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Stores `st` durably (fsync) before returning.
    pub fn save(&mut self, st: &NodeState) -> Result<(), StoreError> {
        self.generation += 1;
        let body = format!(
            "{MAGIC}\ngeneration={}\nrole={}\nepoch={}\nseq={}\napplied_epoch={}\nsealed_at_ns={}\n",
            self.generation,
            st.role.as_str(),
            st.epoch,
            st.seq,
            st.applied_epoch,
            st.sealed_at_ns
        );
        let sum = blake3::hash(body.as_bytes()).to_hex();
        let rec = format!("{body}checksum={sum}\n");
        let idx = (self.generation % 2) as usize;
        let path = self.dir.join(if idx == 0 { "state.a" } else { "state.b" });
        let f = &mut self.slots[idx];
        let io = |source| StoreError::Io {
            path: path.clone(),
            error: source,
        };
        f.seek(SeekFrom::Start(0)).map_err(io)?;
        f.write_all(rec.as_bytes()).map_err(io)?;
        f.set_len(rec.len() as u64).map_err(io)?;
        f.sync_data().map_err(|source| StoreError::Sync {
            path: path.clone(),
            error: source,
        })?;
        Ok(())
    }
}

fn parse(s: &str) -> Option<(u64, NodeState)> {
    let (body, sum_line) = s.rsplit_once("checksum=")?;
    if blake3::hash(body.as_bytes()).to_hex().as_str() != sum_line.trim_end() {
        return None;
    }
    let mut lines = body.lines();
    if lines.next()? != MAGIC {
        return None;
    }
    let mut get = |k: &str| -> Option<String> {
        let l = lines.next()?;
        l.strip_prefix(k)?.strip_prefix('=').map(str::to_owned)
    };
    let generation = get("generation")?.parse().ok()?;
    let role = match get("role")?.as_str() {
        "primary" => Role::Primary,
        "replica" => Role::Replica,
        _ => return None,
    };
    Some((
        generation,
        NodeState {
            role,
            epoch: get("epoch")?.parse().ok()?,
            seq: get("seq")?.parse().ok()?,
            applied_epoch: get("applied_epoch")?.parse().ok()?,
            sealed_at_ns: get("sealed_at_ns")?.parse().ok()?,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(seq: u64) -> NodeState {
        NodeState {
            role: Role::Replica,
            epoch: 2,
            seq,
            applied_epoch: 2,
            sealed_at_ns: 77,
        }
    }

    #[test]
    fn save_load_and_torn_slot() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, none) = StateDir::open(d.path()).unwrap();
            assert_eq!(none, None);
            s.save(&st(1)).unwrap();
            s.save(&st(2)).unwrap();
            // a second daemon on the same state dir is refused
            assert!(matches!(
                StateDir::open(d.path()),
                Err(StoreError::Locked { .. })
            ));
        }
        let (_, got) = StateDir::open(d.path()).unwrap();
        assert_eq!(got, Some(st(2)));
        // Tear the newest slot (generation 2 lives in state.a): the older one is used.
        let a = d.path().join("state.a");
        let mut bytes = std::fs::read(&a).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0x55;
        std::fs::write(&a, &bytes).unwrap();
        let (mut s, got) = StateDir::open(d.path()).unwrap();
        assert_eq!(got, Some(st(1)));
        // and saving again moves on past the torn generation
        s.save(&st(3)).unwrap();
        drop(s);
        let (_, got) = StateDir::open(d.path()).unwrap();
        assert_eq!(got, Some(st(3)));
    }
}
