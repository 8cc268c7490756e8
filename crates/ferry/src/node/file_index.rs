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

/// The record of a suspect file, changed so that it never matches a stat
/// again: until the batch that ships the file replaces it, every start
/// hashes (or ships) the file anew.
fn poisoned(s: &Scanned, mut r: FileRecord) -> IndexOp {
    r.ctime = (i64::MIN, 0);
    IndexOp::Put {
        path: s.entry.path.as_bytes().to_vec(),
        rec: r,
    }
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
    /// Files shipped because a reboot made their stat untrustworthy and
    /// their content differs from the record (or the record has no hash).
    pub suspects: u64,
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

/// After the machine restarted (its boot id changed since the index was
/// last used), a file changed this long before the index's newest change
/// may have lost data in the crash while its size and times survived: ext4
/// and XFS journal an inode's metadata on their own schedule, and write an
/// overwrite's or a partial block's data back up to ~30 s later
/// (`vm.dirty_expire_centisecs`). Such files are hashed, not vouched for by
/// stat. Found by tests/power.rs (an appended, never fsynced log).
pub const REBOOT_DISTRUST_SECS: i64 = 15 * 60;

/// Which records stat alone may not vouch for: after a reboot, files whose
/// recorded ctime lies within [`REBOOT_DISTRUST_SECS`] of the newest
/// recorded ctime (the last change the index saw before the crash).
pub fn distrust_after_reboot(records: &[(Vec<u8>, FileRecord)]) -> Option<(i64, i64)> {
    distrust_from(
        records
            .iter()
            .filter(|(_, r)| r.kind == KIND_FILE)
            .map(|(_, r)| r.ctime),
    )
}

/// The same for a root scanned without a usable index: files changed within
/// [`REBOOT_DISTRUST_SECS`] of the newest change in the tree.
pub fn distrust_scanned(scanned: &[Scanned]) -> Option<(i64, i64)> {
    distrust_from(
        scanned
            .iter()
            .filter(|s| s.entry.kind == EntryKind::File)
            .map(|s| s.ctime),
    )
}

fn distrust_from(ctimes: impl Iterator<Item = (i64, i64)>) -> Option<(i64, i64)> {
    let newest = ctimes.max()?;
    Some((newest.0 - REBOOT_DISTRUST_SECS, newest.1))
}

/// Compares a full scan of the root with the index records: stat first,
/// and a BLAKE3 of the file only when its identity (inode, ctime) changed
/// but its size, mtime and mode did not and the record knows its hash.
/// Records of paths now excluded are left alone (neither sent nor deleted).
/// `suspect_from`: files whose recorded ctime is at or after it are hashed
/// even when stat matches (after a reboot, see [`distrust_after_reboot`]);
/// one whose content differs, or whose hash is unknown, is shipped and its
/// record poisoned in `refreshed`, so a crash before the batch that ships it
/// is recorded cannot make it trusted again.
pub fn reconcile(
    root: &Path,
    excludes: &Excludes,
    scanned: Vec<Scanned>,
    records: Vec<(Vec<u8>, FileRecord)>,
    suspect_from: Option<(i64, i64)>,
) -> Reconciled {
    let mut by_path: HashMap<Vec<u8>, FileRecord> = records.into_iter().collect();
    let mut out = Reconciled::default();
    for s in scanned {
        let cur = record(&s, 0);
        let suspect = |r: &FileRecord| {
            r.kind == KIND_FILE && suspect_from.is_some_and(|from| r.ctime >= from)
        };
        match by_path.remove(s.entry.path.as_bytes()) {
            Some(r) if r.same_stat(&cur) && !suspect(&r) => {}
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
                    _ => {
                        if suspect(&r) {
                            out.suspects += 1;
                            out.refreshed.push(poisoned(&s, r));
                        }
                        out.changed.push(s)
                    }
                }
            }
            Some(r) if suspect(&r) => {
                out.suspects += 1;
                out.refreshed.push(poisoned(&s, r));
                out.changed.push(s)
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
        let rc = reconcile(r, &ex, scan_root(r, &ex), records, None);
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

    /// After a machine crash a file may keep its size and times while its
    /// data reverted (tests/power.rs found an appended log doing so): with a
    /// reboot, recently changed files are hashed, not vouched for by stat;
    /// files changed long before the last change are still trusted.
    #[test]
    fn after_a_reboot_recent_files_are_hashed_not_trusted() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for n in ["lost", "kept", "nohash", "old"] {
            std::fs::write(r.join(n), n.repeat(10)).unwrap();
        }
        let ex = Excludes::new(&[], None).unwrap();
        let scanned = scan_root(r, &ex);
        let records: Vec<(Vec<u8>, FileRecord)> = scanned
            .iter()
            .filter(|s| s.entry.kind == EntryKind::File)
            .map(|s| {
                let name = s.entry.path.display();
                let mut rec = record(s, 3);
                rec.hash = match name.as_str() {
                    // what ferry read and shipped before the crash; the disk
                    // kept the old bytes under the same size and times
                    "lost" => Some(*blake3::hash(b"what the app wrote, lost").as_bytes()),
                    "nohash" => None,
                    _ => scan::hash_file(&scan::abs(r, &s.entry.path)).ok(),
                };
                if name == "old" {
                    rec.ctime.0 -= 2 * REBOOT_DISTRUST_SECS;
                }
                (s.entry.path.as_bytes().to_vec(), rec)
            })
            .collect();
        let mut scanned_old = scan_root(r, &ex);
        for s in &mut scanned_old {
            if s.entry.path.display() == "old" {
                s.ctime.0 -= 2 * REBOOT_DISTRUST_SECS;
            }
        }
        // same boot: stat vouches for everything
        let same = reconcile(r, &ex, scanned_old, records.clone(), None);
        assert!(same.changed.is_empty(), "{:?}", same.changed);
        assert_eq!(same.hashed, 0);
        // after a reboot
        let from = distrust_after_reboot(&records);
        let mut scanned_old = scan_root(r, &ex);
        for s in &mut scanned_old {
            if s.entry.path.display() == "old" {
                s.ctime.0 -= 2 * REBOOT_DISTRUST_SECS;
            }
        }
        let rc = reconcile(r, &ex, scanned_old, records, from);
        let mut changed: Vec<String> = rc.changed.iter().map(|s| s.entry.path.display()).collect();
        changed.sort();
        assert_eq!(changed, ["lost", "nohash"]);
        assert_eq!(rc.hashed, 2, "lost and kept are hashed; old is trusted");
        // the suspects are poisoned until the batch shipping them lands
        let poisoned: Vec<&IndexOp> = rc
            .refreshed
            .iter()
            .filter(|op| matches!(op, IndexOp::Put { rec, .. } if rec.ctime.0 == i64::MIN))
            .collect();
        assert_eq!(poisoned.len(), 2, "{:?}", rc.refreshed);
    }
}
