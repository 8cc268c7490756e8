//! The primary's durable per-file index (redb, in the state dir).
//!
//! For every replicated path the index holds the state the primary sealed
//! last (kind, mode, size, mtime, link target, and the identity dev, inode,
//! ctime), the BLAKE3 of that content when a sender read it whole, and the
//! batch `seq` that last changed it. A path that went away leaves a
//! tombstone with the seq that removed it, until every peer acknowledged
//! past it. The index is written in the same order as batches are sealed,
//! and each batch's update is durable before the batch can be sent.
//!
//! What it answers: after a restart, "what changed while ferry was down"
//! (the root compared with the records: stat first, hash only what stat
//! says changed) and "what does a peer at acked seq A lack" (records and
//! tombstones with seq > A), so neither needs the peer's manifest.
//!
//! redb checksums its pages and commits atomically: a torn commit is
//! detected and the previous one used. A record that does not decode reads
//! as absent (its path is then shipped again, never skipped).

use crate::StoreError;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use std::path::{Path, PathBuf};

const FILES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("files");
const GONE: TableDefinition<&[u8], u64> = TableDefinition::new("gone");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const PEERS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("peers");
/// The boot the index was last used in (kept apart from META, which an
/// invalidation drops: the boot must outlive a rebuild).
const BOOT: TableDefinition<&str, u64> = TableDefinition::new("boot");
/// A large file's chunk list as last sent: the version's seq, size, mtime,
/// dev, inode and ctime (LE, [`CHUNKS_HEAD`] bytes), then `len u32 LE |
/// BLAKE3` per chunk.
const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
const CHUNKS_HEAD: usize = 8 + 8 + 8 + 4 + 8 + 8 + 8 + 8;

/// A file version a sender sent as chunks (see [`Index::chunks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentChunks {
    /// The batch that sealed this version.
    pub seq: u64,
    pub size: u64,
    pub mtime: (i64, u32),
    pub dev: u64,
    pub ino: u64,
    pub ctime: (i64, i64),
    /// `len u32 LE | BLAKE3` per chunk.
    pub chunks: Vec<u8>,
    /// The batch that last changed the path (the index's record), if any:
    /// a peer that acknowledged it holds that version, not this one, unless
    /// it is this one.
    pub last_seq: Option<u64>,
}

/// Tombstones kept at most; past this they are all dropped and peers behind
/// the drop point resync by manifest instead.
pub const MAX_TOMBSTONES: u64 = 1 << 20;

/// The kind of an indexed entry.
pub const KIND_FILE: u8 = 0;
pub const KIND_DIR: u8 = 1;
pub const KIND_SYMLINK: u8 = 2;

/// One indexed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub kind: u8,
    pub mode: u32,
    pub size: u64,
    pub mtime: (i64, u32),
    pub dev: u64,
    pub ino: u64,
    pub ctime: (i64, i64),
    pub target: Vec<u8>,
    /// BLAKE3 of the content with exactly this identity, when known.
    pub hash: Option<[u8; 32]>,
    /// The batch that last changed this path.
    pub seq: u64,
}

impl FileRecord {
    /// Same metadata and identity (the hash and seq are not compared).
    pub fn same_stat(&self, o: &FileRecord) -> bool {
        (
            self.kind, self.mode, self.size, self.mtime, self.dev, self.ino, self.ctime,
        ) == (o.kind, o.mode, o.size, o.mtime, o.dev, o.ino, o.ctime)
            && self.target == o.target
    }

    /// Same replicated metadata (what a replica holds besides content).
    pub fn same_meta(&self, o: &FileRecord) -> bool {
        (self.kind, self.mode, self.size, self.mtime) == (o.kind, o.mode, o.size, o.mtime)
            && self.target == o.target
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(80 + self.target.len());
        b.push(1); // format
        b.push(self.kind);
        b.extend_from_slice(&self.mode.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.mtime.0.to_le_bytes());
        b.extend_from_slice(&self.mtime.1.to_le_bytes());
        b.extend_from_slice(&self.dev.to_le_bytes());
        b.extend_from_slice(&self.ino.to_le_bytes());
        b.extend_from_slice(&self.ctime.0.to_le_bytes());
        b.extend_from_slice(&self.ctime.1.to_le_bytes());
        b.extend_from_slice(&self.seq.to_le_bytes());
        match &self.hash {
            Some(h) => {
                b.push(1);
                b.extend_from_slice(h);
            }
            None => b.push(0),
        }
        b.extend_from_slice(&(self.target.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.target);
        b
    }

    fn decode(b: &[u8]) -> Option<FileRecord> {
        let mut r = Reader(b);
        if r.u8()? != 1 {
            return None;
        }
        let kind = r.u8()?;
        let mode = u32::from_le_bytes(r.take()?);
        let size = u64::from_le_bytes(r.take()?);
        let mtime = (i64::from_le_bytes(r.take()?), u32::from_le_bytes(r.take()?));
        let dev = u64::from_le_bytes(r.take()?);
        let ino = u64::from_le_bytes(r.take()?);
        let ctime = (i64::from_le_bytes(r.take()?), i64::from_le_bytes(r.take()?));
        let seq = u64::from_le_bytes(r.take()?);
        let hash = match r.u8()? {
            0 => None,
            1 => Some(r.take::<32>()?),
            _ => return None,
        };
        let n = u32::from_le_bytes(r.take()?) as usize;
        if r.0.len() != n {
            return None;
        }
        Some(FileRecord {
            kind,
            mode,
            size,
            mtime,
            dev,
            ino,
            ctime,
            target: r.0.to_vec(),
            hash,
            seq,
        })
    }
}

struct Reader<'a>(&'a [u8]);
impl Reader<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (x, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*x)
    }
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        if self.0.len() < N {
            return None;
        }
        let (a, rest) = self.0.split_at(N);
        self.0 = rest;
        a.try_into().ok()
    }
}

/// One change to the index, applied in order within a batch.
#[derive(Debug, Clone)]
pub enum IndexOp {
    /// A subtree moved: its records follow it (seq set to the batch), and
    /// the old paths leave tombstones.
    Rename { from: Vec<u8>, to: Vec<u8> },
    /// A path and everything below it are gone (tombstoned).
    Delete { path: Vec<u8> },
    /// Everything strictly below a path is gone (a subtree replaced whole).
    DeleteBelow { path: Vec<u8> },
    /// A path's state, as sealed (`rec.seq` is kept as given).
    Put { path: Vec<u8>, rec: FileRecord },
    /// A sender read the whole content of `path` with this identity: the
    /// record learns its hash if it still has that identity.
    Hash { path: Vec<u8>, ident: FileRecord },
    /// A sender sent `path` with this identity as these chunks (`len u32
    /// LE | BLAKE3` each): kept if the record still has that identity, so
    /// after a restart a change to the file is diffed, not sent whole.
    Chunks {
        path: Vec<u8>,
        ident: FileRecord,
        chunks: Vec<u8>,
    },
}

/// What the index vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexMeta {
    /// The epoch its seqs belong to.
    pub epoch: u64,
    /// Peers acked at or past this seq can be brought up to date from the
    /// index (it was built whole at this seq).
    pub base: u64,
    /// Tombstones older than this were dropped: a peer acked before it
    /// cannot learn its deletions from the index.
    pub floor: u64,
    /// The last batch written to it. An index whose seq is not the node's
    /// last sealed seq missed a batch (a write that failed) and vouches for
    /// nothing.
    pub seq: u64,
}

/// The open index.
pub struct Index {
    db: Database,
    path: PathBuf,
}

fn err(path: &Path) -> impl Fn(redb::Error) -> StoreError + '_ {
    move |e| StoreError::Index {
        path: path.to_owned(),
        error: e.to_string(),
    }
}

/// A raw record: path bytes and encoded record.
type KeyValue = (Vec<u8>, Vec<u8>);

/// Keys of `p` and everything below it: `p` itself, then `p/` .. `p0`.
fn below(p: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut lo = p.to_vec();
    lo.push(b'/');
    let mut hi = p.to_vec();
    hi.push(b'/' + 1);
    (lo, hi)
}

/// Page cache of the index database.
const INDEX_CACHE: usize = 8 << 20;

impl Index {
    /// Opens (or creates) `dir/index.redb`.
    pub fn open(dir: &Path) -> Result<Index, StoreError> {
        let path = dir.join("index.redb");
        // redb caches up to 1 GiB by default; the index is read mostly at
        // start and written in batches, so a small cache keeps the
        // primary's memory bounded (issue 4's M: ≤ 64 MiB) at little cost.
        let db = redb::Builder::new()
            .set_cache_size(INDEX_CACHE)
            .create(&path)
            .map_err(redb::Error::from)
            .map_err(err(&path))?;
        Ok(Index { db, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `None`: never built (or invalidated): the index vouches for nothing.
    pub fn meta(&self) -> Result<Option<IndexMeta>, StoreError> {
        let e = err(&self.path);
        let tx = self
            .db
            .begin_read()
            .map_err(redb::Error::from)
            .map_err(&e)?;
        let t = match tx.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(x) => return Err(e(x.into())),
        };
        let get = |k: &str| -> Result<Option<u64>, StoreError> {
            Ok(t.get(k)
                .map_err(redb::Error::from)
                .map_err(&e)?
                .map(|v| v.value()))
        };
        match (get("epoch")?, get("base")?, get("floor")?, get("seq")?) {
            (Some(epoch), Some(base), Some(floor), Some(seq)) => Ok(Some(IndexMeta {
                epoch,
                base,
                floor,
                seq,
            })),
            _ => Ok(None),
        }
    }

    /// Replaces the whole index with `entries` (a full scan), vouching from
    /// `meta.base` on. Durable when it returns.
    pub fn rebuild(
        &self,
        meta: IndexMeta,
        entries: impl IntoIterator<Item = (Vec<u8>, FileRecord)>,
    ) -> Result<(), StoreError> {
        let e = err(&self.path);
        let tx = self
            .db
            .begin_write()
            .map_err(redb::Error::from)
            .map_err(&e)?;
        {
            tx.delete_table(FILES)
                .map_err(redb::Error::from)
                .map_err(&e)?;
            tx.delete_table(GONE)
                .map_err(redb::Error::from)
                .map_err(&e)?;
            // seqs start over: a chunk list of before could pass for one of now
            tx.delete_table(CHUNKS)
                .map_err(redb::Error::from)
                .map_err(&e)?;
            let mut f = tx
                .open_table(FILES)
                .map_err(redb::Error::from)
                .map_err(&e)?;
            for (k, r) in entries {
                f.insert(k.as_slice(), r.encode().as_slice())
                    .map_err(redb::Error::from)
                    .map_err(&e)?;
            }
            let mut m = tx.open_table(META).map_err(redb::Error::from).map_err(&e)?;
            m.insert("epoch", meta.epoch)
                .map_err(redb::Error::from)
                .map_err(&e)?;
            m.insert("base", meta.base)
                .map_err(redb::Error::from)
                .map_err(&e)?;
            m.insert("floor", meta.floor)
                .map_err(redb::Error::from)
                .map_err(&e)?;
            m.insert("seq", meta.seq)
                .map_err(redb::Error::from)
                .map_err(&e)?;
        }
        tx.commit().map_err(redb::Error::from).map_err(&e)
    }

    /// The boot (`/proc/sys/kernel/random/boot_id`) the index was last
    /// used in; `None` when never recorded (a new index, or one written by
    /// a ferry before 0.2).
    pub fn boot(&self) -> Result<Option<[u8; 16]>, StoreError> {
        let e = err(&self.path);
        let tx = self
            .db
            .begin_read()
            .map_err(redb::Error::from)
            .map_err(&e)?;
        let t = match tx.open_table(BOOT) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(x) => return Err(e(x.into())),
        };
        let get = |k: &str| -> Result<Option<u64>, StoreError> {
            Ok(t.get(k)
                .map_err(redb::Error::from)
                .map_err(&e)?
                .map(|v| v.value()))
        };
        Ok(match (get("hi")?, get("lo")?) {
            (Some(hi), Some(lo)) => {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&hi.to_be_bytes());
                id[8..].copy_from_slice(&lo.to_be_bytes());
                Some(id)
            }
            _ => None,
        })
    }

    /// Records the boot the index is used in from now on (durable). Call it
    /// only once what a different boot id made suspect is recorded as such.
    pub fn set_boot(&self, id: [u8; 16]) -> Result<(), StoreError> {
        let e = err(&self.path);
        let tx = self
            .db
            .begin_write()
            .map_err(redb::Error::from)
            .map_err(&e)?;
        {
            let mut m = tx.open_table(BOOT).map_err(redb::Error::from).map_err(&e)?;
            let hi = u64::from_be_bytes(id[..8].try_into().expect("8 bytes"));
            let lo = u64::from_be_bytes(id[8..].try_into().expect("8 bytes"));
            m.insert("hi", hi).map_err(redb::Error::from).map_err(&e)?;
            m.insert("lo", lo).map_err(redb::Error::from).map_err(&e)?;
        }
        tx.commit().map_err(redb::Error::from).map_err(&e)
    }

    /// Forgets what the index vouches for (after an error): the next start
    /// rebuilds it and peers resync by manifest.
    pub fn invalidate(&self) -> Result<(), StoreError> {
        let e = err(&self.path);
        let tx = self
            .db
            .begin_write()
            .map_err(redb::Error::from)
            .map_err(&e)?;
        tx.delete_table(META)
            .map_err(redb::Error::from)
            .map_err(&e)?;
        tx.delete_table(CHUNKS)
            .map_err(redb::Error::from)
            .map_err(&e)?;
        tx.commit().map_err(redb::Error::from).map_err(&e)
    }

    /// Applies a sealed batch's changes (records get `seq` unless a Put
    /// says otherwise), records `seq` as the last batch written and the
    /// peers' acked seqs, drops tombstones every peer is past; durable when
    /// it returns (`durable`) so the batch may be sent.
    pub fn apply(
        &self,
        seq: u64,
        ops: &[IndexOp],
        peers: &[(String, u64, u64)],
        durable: bool,
    ) -> Result<(), StoreError> {
        let e = err(&self.path);
        let mut tx = self
            .db
            .begin_write()
            .map_err(redb::Error::from)
            .map_err(&e)?;
        if !durable {
            tx.set_durability(Durability::None)
                .map_err(redb::Error::from)
                .map_err(&e)?;
        }
        {
            let mut f = tx
                .open_table(FILES)
                .map_err(redb::Error::from)
                .map_err(&e)?;
            let mut g = tx.open_table(GONE).map_err(redb::Error::from).map_err(&e)?;
            let mut c = tx
                .open_table(CHUNKS)
                .map_err(redb::Error::from)
                .map_err(&e)?;
            // chunk lists of what moved or went: no longer what a peer holds
            let drop_chunks =
                |c: &mut redb::Table<&[u8], &[u8]>, p: &[u8]| -> Result<(), StoreError> {
                    c.remove(p).map_err(redb::Error::from).map_err(&e)?;
                    let (lo, hi) = below(p);
                    c.retain_in(lo.as_slice()..hi.as_slice(), |_, _| false)
                        .map_err(redb::Error::from)
                        .map_err(&e)?;
                    Ok(())
                };
            let take_below = |f: &mut redb::Table<&[u8], &[u8]>,
                              g: &mut redb::Table<&[u8], u64>,
                              p: &[u8],
                              with_self: bool|
             -> Result<Vec<KeyValue>, StoreError> {
                let (lo, hi) = below(p);
                let mut out = Vec::new();
                if with_self {
                    if let Some(v) = f.remove(p).map_err(redb::Error::from).map_err(&e)? {
                        out.push((p.to_vec(), v.value().to_vec()));
                    }
                }
                let keys: Vec<KeyValue> = f
                    .range(lo.as_slice()..hi.as_slice())
                    .map_err(redb::Error::from)
                    .map_err(&e)?
                    .filter_map(|r| r.ok())
                    .map(|(k, v)| (k.value().to_vec(), v.value().to_vec()))
                    .collect();
                for (k, _) in &keys {
                    f.remove(k.as_slice())
                        .map_err(redb::Error::from)
                        .map_err(&e)?;
                }
                out.extend(keys);
                for (k, _) in &out {
                    g.insert(k.as_slice(), seq)
                        .map_err(redb::Error::from)
                        .map_err(&e)?;
                }
                Ok(out)
            };
            for op in ops {
                match op {
                    IndexOp::Rename { from, to } => {
                        drop_chunks(&mut c, from)?;
                        drop_chunks(&mut c, to)?;
                        take_below(&mut f, &mut g, to, true)?;
                        let moved = take_below(&mut f, &mut g, from, true)?;
                        for (k, v) in moved {
                            let Some(mut r) = FileRecord::decode(&v) else {
                                continue;
                            };
                            r.seq = seq;
                            let mut n = to.clone();
                            n.extend_from_slice(&k[from.len()..]);
                            f.insert(n.as_slice(), r.encode().as_slice())
                                .map_err(redb::Error::from)
                                .map_err(&e)?;
                        }
                    }
                    IndexOp::Delete { path } => {
                        drop_chunks(&mut c, path)?;
                        take_below(&mut f, &mut g, path, true)?;
                    }
                    IndexOp::DeleteBelow { path } => {
                        let (lo, hi) = below(path);
                        c.retain_in(lo.as_slice()..hi.as_slice(), |_, _| false)
                            .map_err(redb::Error::from)
                            .map_err(&e)?;
                        take_below(&mut f, &mut g, path, false)?;
                    }
                    IndexOp::Chunks {
                        path,
                        ident,
                        chunks,
                    } => {
                        let cur = f
                            .get(path.as_slice())
                            .map_err(redb::Error::from)
                            .map_err(&e)?
                            .and_then(|v| FileRecord::decode(v.value()));
                        if let Some(r) = cur.filter(|r| r.same_stat(ident)) {
                            let mut v = Vec::with_capacity(CHUNKS_HEAD + chunks.len());
                            v.extend_from_slice(&r.seq.to_le_bytes());
                            v.extend_from_slice(&r.size.to_le_bytes());
                            v.extend_from_slice(&r.mtime.0.to_le_bytes());
                            v.extend_from_slice(&r.mtime.1.to_le_bytes());
                            v.extend_from_slice(&r.dev.to_le_bytes());
                            v.extend_from_slice(&r.ino.to_le_bytes());
                            v.extend_from_slice(&r.ctime.0.to_le_bytes());
                            v.extend_from_slice(&r.ctime.1.to_le_bytes());
                            v.extend_from_slice(chunks);
                            c.insert(path.as_slice(), v.as_slice())
                                .map_err(redb::Error::from)
                                .map_err(&e)?;
                        }
                    }
                    IndexOp::Put { path, rec } => {
                        f.insert(path.as_slice(), rec.encode().as_slice())
                            .map_err(redb::Error::from)
                            .map_err(&e)?;
                    }
                    IndexOp::Hash { path, ident } => {
                        let old = f
                            .get(path.as_slice())
                            .map_err(redb::Error::from)
                            .map_err(&e)?
                            .and_then(|v| FileRecord::decode(v.value()));
                        if let Some(mut r) = old {
                            if r.same_stat(ident) && r.hash != ident.hash {
                                r.hash = ident.hash;
                                f.insert(path.as_slice(), r.encode().as_slice())
                                    .map_err(redb::Error::from)
                                    .map_err(&e)?;
                            }
                        }
                    }
                }
            }
            let mut pt = tx
                .open_table(PEERS)
                .map_err(redb::Error::from)
                .map_err(&e)?;
            for (name, epoch, acked) in peers {
                pt.insert(name.as_str(), (*epoch, *acked))
                    .map_err(redb::Error::from)
                    .map_err(&e)?;
            }
            // every peer is past these deletions
            let all_past = peers.iter().map(|p| p.2).min().unwrap_or(seq);
            let pruned = seq.is_multiple_of(64);
            if pruned {
                g.retain(|_, s| s > all_past)
                    .map_err(redb::Error::from)
                    .map_err(&e)?;
            }
            let too_many = g.len().map_err(redb::Error::from).map_err(&e)? > MAX_TOMBSTONES;
            drop(g);
            if too_many {
                tx.delete_table(GONE)
                    .map_err(redb::Error::from)
                    .map_err(&e)?;
            }
            let mut m = tx.open_table(META).map_err(redb::Error::from).map_err(&e)?;
            // a peer acked before the floor may lack deletions no longer here
            let floor = m
                .get("floor")
                .map_err(redb::Error::from)
                .map_err(&e)?
                .map(|v| v.value())
                .unwrap_or(0);
            let new_floor = match (too_many, pruned) {
                (true, _) => seq,
                (false, true) => floor.max(all_past),
                (false, false) => floor,
            };
            if new_floor != floor {
                m.insert("floor", new_floor)
                    .map_err(redb::Error::from)
                    .map_err(&e)?;
            }
            m.insert("seq", seq)
                .map_err(redb::Error::from)
                .map_err(&e)?;
        }
        tx.commit().map_err(redb::Error::from).map_err(&e)
    }

    /// Every record, in key (byte) order.
    /// The version of `path` last sent as chunks, with its chunk list.
    pub fn chunks(&self, path: &[u8]) -> Result<Option<SentChunks>, StoreError> {
        let e = err(&self.path);
        let tx = self
            .db
            .begin_read()
            .map_err(redb::Error::from)
            .map_err(&e)?;
        let (f, c) = match (tx.open_table(FILES), tx.open_table(CHUNKS)) {
            (Ok(f), Ok(c)) => (f, c),
            _ => return Ok(None),
        };
        let last_seq = f
            .get(path)
            .map_err(redb::Error::from)
            .map_err(&e)?
            .and_then(|v| FileRecord::decode(v.value()))
            .map(|r| r.seq);
        let Some(v) = c.get(path).map_err(redb::Error::from).map_err(&e)? else {
            return Ok(None);
        };
        let v = v.value();
        if v.len() < CHUNKS_HEAD {
            return Ok(None);
        }
        let u = |i: usize| u64::from_le_bytes(v[i..i + 8].try_into().expect("8"));
        Ok(Some(SentChunks {
            seq: u(0),
            size: u(8),
            mtime: (
                u(16) as i64,
                u32::from_le_bytes(v[24..28].try_into().expect("4")),
            ),
            dev: u(28),
            ino: u(36),
            ctime: (u(44) as i64, u(52) as i64),
            chunks: v[CHUNKS_HEAD..].to_vec(),
            last_seq,
        }))
    }

    pub fn records(&self) -> Result<Vec<(Vec<u8>, FileRecord)>, StoreError> {
        self.collect(|_| true)
    }

    fn collect(
        &self,
        keep: impl Fn(&FileRecord) -> bool,
    ) -> Result<Vec<(Vec<u8>, FileRecord)>, StoreError> {
        let e = err(&self.path);
        let tx = self
            .db
            .begin_read()
            .map_err(redb::Error::from)
            .map_err(&e)?;
        let t = match tx.open_table(FILES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(x) => return Err(e(x.into())),
        };
        let mut out = Vec::new();
        for r in t.iter().map_err(redb::Error::from).map_err(&e)? {
            let (k, v) = r.map_err(redb::Error::from).map_err(&e)?;
            if let Some(rec) = FileRecord::decode(v.value()) {
                if keep(&rec) {
                    out.push((k.value().to_vec(), rec));
                }
            }
        }
        Ok(out)
    }

    /// What a peer acked at `seq` lacks: the records changed after it and
    /// the paths removed after it.
    #[allow(clippy::type_complexity)]
    pub fn changed_after(
        &self,
        seq: u64,
    ) -> Result<(Vec<(Vec<u8>, FileRecord)>, Vec<Vec<u8>>), StoreError> {
        let changed = self.collect(|r| r.seq > seq)?;
        let e = err(&self.path);
        let tx = self
            .db
            .begin_read()
            .map_err(redb::Error::from)
            .map_err(&e)?;
        let mut gone = Vec::new();
        match tx.open_table(GONE) {
            Ok(t) => {
                for r in t.iter().map_err(redb::Error::from).map_err(&e)? {
                    let (k, v) = r.map_err(redb::Error::from).map_err(&e)?;
                    if v.value() > seq {
                        gone.push(k.value().to_vec());
                    }
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(x) => return Err(e(x.into())),
        }
        Ok((changed, gone))
    }

    /// The peers' acked seqs as last recorded: name -> (epoch, seq).
    pub fn peers(&self) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let e = err(&self.path);
        let tx = self
            .db
            .begin_read()
            .map_err(redb::Error::from)
            .map_err(&e)?;
        let t = match tx.open_table(PEERS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(x) => return Err(e(x.into())),
        };
        let mut out = Vec::new();
        for r in t.iter().map_err(redb::Error::from).map_err(&e)? {
            let (k, v) = r.map_err(redb::Error::from).map_err(&e)?;
            let (ep, s) = v.value();
            out.push((k.value().to_string(), ep, s));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(size: u64, seq: u64) -> FileRecord {
        FileRecord {
            kind: KIND_FILE,
            mode: 0o644,
            size,
            mtime: (1, 2),
            dev: 1,
            ino: size,
            ctime: (3, 4),
            target: Vec::new(),
            hash: None,
            seq,
        }
    }

    fn k(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn batches_renames_tombstones_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        let ix = Index::open(d.path()).unwrap();
        assert_eq!(ix.meta().unwrap(), None, "a new index vouches for nothing");
        let meta = IndexMeta {
            epoch: 1,
            base: 5,
            floor: 5,
            seq: 5,
        };
        ix.rebuild(
            meta,
            vec![
                (k("a"), rec(0, 5)),
                (k("a/x"), rec(10, 5)),
                (k("a.b"), rec(11, 5)),
                (k("b"), rec(12, 5)),
            ],
        )
        .unwrap();
        let peers = vec![("r".to_string(), 1, 5)];
        ix.apply(
            6,
            &[
                IndexOp::Rename {
                    from: k("a"),
                    to: k("c"),
                },
                IndexOp::Put {
                    path: k("d"),
                    rec: rec(13, 6),
                },
            ],
            &peers,
            true,
        )
        .unwrap();
        let mut ident = rec(12, 0);
        ident.hash = Some([7; 32]);
        ix.apply(
            7,
            &[
                IndexOp::Delete { path: k("a.b") },
                IndexOp::Hash {
                    path: k("b"),
                    ident: ident.clone(),
                },
            ],
            &peers,
            true,
        )
        .unwrap();
        drop(ix);
        let ix = Index::open(d.path()).unwrap();
        assert_eq!(ix.meta().unwrap(), Some(IndexMeta { seq: 7, ..meta }));
        let keys: Vec<String> = ix
            .records()
            .unwrap()
            .into_iter()
            .map(|(k, r)| format!("{}@{}", String::from_utf8(k).unwrap(), r.seq))
            .collect();
        assert_eq!(keys, ["b@5", "c@6", "c/x@6", "d@6"]);
        let b = ix
            .records()
            .unwrap()
            .into_iter()
            .find(|x| x.0 == k("b"))
            .unwrap();
        assert_eq!(
            b.1.hash,
            Some([7; 32]),
            "the hash of an unchanged identity is kept"
        );
        // a peer at 5 lacks c, c/x, d and the deletions of a, a/x, a.b
        let (changed, mut gone) = ix.changed_after(5).unwrap();
        let changed: Vec<Vec<u8>> = changed.into_iter().map(|x| x.0).collect();
        assert_eq!(changed, vec![k("c"), k("c/x"), k("d")]);
        gone.sort();
        assert_eq!(gone, vec![k("a"), k("a.b"), k("a/x")]);
        // a peer at 6 lacks only what batch 7 did
        let (changed, gone) = ix.changed_after(6).unwrap();
        assert!(changed.is_empty());
        assert_eq!(gone, vec![k("a.b")]);
        assert_eq!(ix.peers().unwrap(), peers);
        // batch 64 drops the tombstones every peer is past (at 6 here), and
        // a peer acked before that is no longer covered
        ix.apply(64, &[], &[("r".to_string(), 1, 6)], true).unwrap();
        let (_, gone) = ix.changed_after(6).unwrap();
        assert_eq!(gone, vec![k("a.b")]);
        assert_eq!(ix.changed_after(0).unwrap().1, vec![k("a.b")]);
        assert_eq!(ix.meta().unwrap().map(|m| (m.floor, m.seq)), Some((6, 64)));
        ix.invalidate().unwrap();
        assert_eq!(ix.meta().unwrap(), None);
    }

    #[test]
    fn a_record_that_does_not_decode_reads_as_absent() {
        assert_eq!(FileRecord::decode(&[]), None);
        assert_eq!(FileRecord::decode(&[2, 0, 0]), None);
        let mut r = rec(1, 1);
        r.target = b"t".to_vec();
        r.hash = Some([1; 32]);
        let b = r.encode();
        assert_eq!(FileRecord::decode(&b), Some(r));
        for n in 0..b.len() - 1 {
            if let Some(x) = FileRecord::decode(&b[..n]) {
                panic!("a truncated record decoded: {x:?}");
            }
        }
    }

    #[test]
    fn a_chunk_list_holds_while_its_record_does() {
        let d = tempfile::tempdir().unwrap();
        let ix = Index::open(d.path()).unwrap();
        let meta = IndexMeta {
            epoch: 1,
            base: 1,
            floor: 0,
            seq: 1,
        };
        ix.rebuild(meta, Vec::new()).unwrap();
        let rec = FileRecord {
            kind: KIND_FILE,
            mode: 0o644,
            size: 10,
            mtime: (1, 2),
            dev: 3,
            ino: 4,
            ctime: (5, 6),
            target: Vec::new(),
            hash: None,
            seq: 2,
        };
        let p = b"dir/f".to_vec();
        let put = |seq: u64, r: &FileRecord| {
            ix.apply(
                seq,
                &[IndexOp::Put {
                    path: p.clone(),
                    rec: r.clone(),
                }],
                &[],
                true,
            )
            .unwrap()
        };
        let chunks = |seq: u64, ident: &FileRecord| {
            ix.apply(
                seq,
                &[IndexOp::Chunks {
                    path: p.clone(),
                    ident: ident.clone(),
                    chunks: vec![7; 36],
                }],
                &[],
                true,
            )
            .unwrap()
        };
        put(2, &rec);
        // another identity than the record's: not kept
        chunks(
            2,
            &FileRecord {
                ino: 99,
                ..rec.clone()
            },
        );
        assert!(ix.chunks(&p).unwrap().is_none());
        chunks(2, &rec);
        let c = ix.chunks(&p).unwrap().unwrap();
        assert_eq!(
            (c.seq, c.size, c.mtime, c.ino, c.ctime),
            (2, 10, (1, 2), 4, (5, 6))
        );
        assert_eq!((c.chunks, c.last_seq), (vec![7; 36], Some(2)));
        // a newer version sealed: the list still describes version 2, and
        // says which seq last changed the path
        put(
            3,
            &FileRecord {
                seq: 3,
                size: 11,
                ..rec.clone()
            },
        );
        let c = ix.chunks(&p).unwrap().unwrap();
        assert_eq!((c.seq, c.last_seq), (2, Some(3)));
        // deleted with its directory, or moved: gone
        let rec4 = FileRecord {
            seq: 4,
            ..rec.clone()
        };
        put(4, &rec4);
        chunks(4, &rec4);
        assert!(ix.chunks(&p).unwrap().is_some());
        ix.apply(
            5,
            &[IndexOp::Delete {
                path: b"dir".to_vec(),
            }],
            &[],
            true,
        )
        .unwrap();
        assert!(ix.chunks(&p).unwrap().is_none());
        // a rebuilt index starts its seqs over: old lists are dropped
        let rec6 = FileRecord {
            seq: 6,
            ..rec.clone()
        };
        put(6, &rec6);
        chunks(6, &rec6);
        ix.rebuild(meta, vec![(p.clone(), rec6.clone())]).unwrap();
        assert!(ix.chunks(&p).unwrap().is_none());
    }
}
