//! Glue between the primary's batches and its durable file index
//! (`ferry_store::index`): what a sealed batch changes in the index, and
//! what changed in the root while the index was not looking (a restart, or
//! lost watcher events).

use super::primary::SealedBatch;
use ferry_core::{Change, EntryKind, RelPath};
use ferry_store::index::{KIND_DIR, KIND_FILE, KIND_SYMLINK};
use ferry_store::{FileRecord, IndexOp};
use ferry_watch::{scan, Excludes, Scanned};
use std::collections::{HashMap, HashSet};
use std::path::Path;

pub fn record(s: &Scanned, seq: u64) -> FileRecord {
    let e = &s.entry;
    FileRecord {
        kind: match e.kind {
            EntryKind::File => KIND_FILE,
            EntryKind::Dir => KIND_DIR,
            EntryKind::Symlink => KIND_SYMLINK,
        },
        mode: e.mode,
        size: e.size,
        mtime: (e.mtime.secs, e.mtime.nanos),
        dev: s.dev,
        ino: s.ino,
        ctime: s.ctime,
        target: e.target.clone(),
        hash: None,
        seq,
    }
}

/// The index update of a sealed batch: its renames, then the state of
/// every item (a new subtree replaces what was below its root).
pub fn batch_ops(b: &SealedBatch) -> Vec<IndexOp> {
    let mut ops = Vec::with_capacity(b.renames.len() + b.items.len());
    for (from, to) in &b.renames {
        ops.push(IndexOp::Rename {
            from: from.as_bytes().to_vec(),
            to: to.as_bytes().to_vec(),
        });
    }
    for i in &b.items {
        let path = i.path.as_bytes().to_vec();
        if i.replace {
            ops.push(IndexOp::Delete { path: path.clone() });
        }
        match &i.state {
            None => {
                if !i.replace {
                    ops.push(IndexOp::Delete { path });
                }
            }
            Some(s) => {
                if s.entry.kind != EntryKind::Dir {
                    // a directory replaced by a file or link loses its subtree
                    ops.push(IndexOp::DeleteBelow { path: path.clone() });
                }
                ops.push(IndexOp::Put {
                    path,
                    rec: record(s, b.seq),
                })
            }
        }
    }
    ops
}

/// The root compared with the index.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// Paths whose state differs from their record, or that have none.
    pub changed: Vec<Scanned>,
    /// Recorded paths that are gone (topmost only: a gone directory covers
    /// what was below it).
    pub gone: Vec<RelPath>,
    /// Records whose identity changed but whose content and metadata did
    /// not (hash equal): their stat is refreshed, their seq kept.
    pub refreshed: Vec<IndexOp>,
    /// Files hashed because stat alone could not tell.
    pub hashed: u64,
}

impl Reconciled {
    /// The changes the batcher ships for it.
    pub fn changes(&self) -> Vec<Change> {
        let mut out: Vec<Change> = self.gone.iter().cloned().map(Change::Removed).collect();
        out.extend(
            self.changed
                .iter()
                .map(|s| Change::Touched(s.entry.path.clone())),
        );
        out
    }

    /// The index update that records it at batch `seq`.
    pub fn ops(&self, seq: u64) -> Vec<IndexOp> {
        let mut ops = self.refreshed.clone();
        for g in &self.gone {
            ops.push(IndexOp::Delete {
                path: g.as_bytes().to_vec(),
            });
        }
        for s in &self.changed {
            let path = s.entry.path.as_bytes().to_vec();
            if s.entry.kind != EntryKind::Dir {
                ops.push(IndexOp::DeleteBelow { path: path.clone() });
            }
            ops.push(IndexOp::Put {
                path,
                rec: record(s, seq),
            });
        }
        ops
    }
}

/// Compares a full scan of the root with the index records: stat first,
/// and a BLAKE3 of the file only when its identity (inode, ctime) changed
/// but its size, mtime and mode did not and the record knows its hash.
/// Records of paths now excluded are left alone (neither sent nor deleted).
pub fn reconcile(
    root: &Path,
    excludes: &Excludes,
    scanned: Vec<Scanned>,
    records: Vec<(Vec<u8>, FileRecord)>,
) -> Reconciled {
    let mut by_path: HashMap<Vec<u8>, FileRecord> = records.into_iter().collect();
    let mut out = Reconciled::default();
    for s in scanned {
        let cur = record(&s, 0);
        match by_path.remove(s.entry.path.as_bytes()) {
            Some(r) if r.same_stat(&cur) => {}
            Some(r) if r.kind == KIND_FILE && r.same_meta(&cur) && r.hash.is_some() => {
                out.hashed += 1;
                match scan::hash_at(root, &s.entry.path) {
                    Ok(h) if Some(h) == r.hash => {
                        let mut fresh = cur;
                        fresh.hash = r.hash;
                        fresh.seq = r.seq;
                        out.refreshed.push(IndexOp::Put {
                            path: s.entry.path.as_bytes().to_vec(),
                            rec: fresh,
                        });
                    }
                    _ => out.changed.push(s),
                }
            }
            _ => out.changed.push(s),
        }
    }
    let mut gone: Vec<RelPath> = by_path
        .into_iter()
        .filter_map(|(k, r)| {
            let p = RelPath::new(k).ok()?;
            (!excludes.is_excluded(&p, r.kind == KIND_DIR)).then_some(p)
        })
        .collect();
    gone.sort_by(|a, b| a.walk_cmp(b));
    let set: HashSet<RelPath> = gone.iter().cloned().collect();
    gone.retain(|p| {
        let mut cur = p.parent();
        while let Some(c) = cur {
            if set.contains(&c) {
                return false;
            }
            cur = c.parent();
        }
        true
    });
    out.gone = gone;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_root(root: &Path, ex: &Excludes) -> Vec<Scanned> {
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        scan::scan_tree(root, None, ex, &mut out, &mut skipped).unwrap();
        out
    }

    #[test]
    fn reconcile_finds_changes_made_while_down() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        for n in ["same", "edit", "gone", "moved", "touched"] {
            std::fs::write(r.join("a").join(n), n.repeat(10)).unwrap();
        }
        std::fs::write(r.join("a/b/x"), b"x").unwrap();
        let ex = Excludes::new(&["*.skip".into()], None).unwrap();
        let before = scan_root(r, &ex);
        let mut records: Vec<(Vec<u8>, FileRecord)> = before
            .iter()
            .map(|s| {
                let mut rec = record(s, 3);
                if s.entry.kind == EntryKind::File {
                    rec.hash = scan::hash_at(r, &s.entry.path).ok();
                }
                (s.entry.path.as_bytes().to_vec(), rec)
            })
            .collect();
        records.push((b"old.skip".to_vec(), records[0].1.clone()));
        // while ferry is down
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(r.join("a/edit"), b"other content").unwrap();
        std::fs::remove_file(r.join("a/gone")).unwrap();
        std::fs::remove_dir_all(r.join("a/b")).unwrap();
        std::fs::write(r.join("a/new"), b"n").unwrap();
        // same bytes and mtime, new inode: only a hash can tell
        let md = std::fs::metadata(r.join("a/moved")).unwrap();
        std::fs::copy(r.join("a/moved"), r.join("a/tmp")).unwrap();
        std::fs::rename(r.join("a/tmp"), r.join("a/moved")).unwrap();
        std::fs::File::options()
            .write(true)
            .open(r.join("a/moved"))
            .unwrap()
            .set_modified(md.modified().unwrap())
            .unwrap();
        // same size and mtime, different bytes (mtime restored)
        let md = std::fs::metadata(r.join("a/touched")).unwrap();
        std::fs::write(r.join("a/touched"), "TOUCHED".repeat(10)).unwrap();
        std::fs::File::options()
            .write(true)
            .open(r.join("a/touched"))
            .unwrap()
            .set_modified(md.modified().unwrap())
            .unwrap();
        let rc = reconcile(r, &ex, scan_root(r, &ex), records);
        let mut changed: Vec<String> = rc.changed.iter().map(|s| s.entry.path.display()).collect();
        changed.sort();
        // "a" changed (entries came and went); "moved" is the same content
        assert_eq!(changed, ["a", "a/edit", "a/new", "a/touched"]);
        let gone: Vec<String> = rc.gone.iter().map(|p| p.display()).collect();
        assert_eq!(
            gone,
            ["a/b", "a/gone"],
            "topmost gone paths; excluded ones left alone"
        );
        assert_eq!(rc.refreshed.len(), 1, "{:?}", rc.refreshed);
        assert_eq!(rc.hashed, 2);
    }
}
