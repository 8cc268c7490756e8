//! Conflicts (G7): a primary that learns of a newer epoch becomes a replica
//! of the new primary, whose first resync would replace everything the old
//! primary wrote that the new one never got. Those writes are preserved
//! first, under `STATE_DIR/conflicts/epoch-E-T/` (never replicated, never
//! touched by a resync), with a `MANIFEST.tsv` that says what each file is.
//!
//! Which writes: the new primary's epoch began after a batch of the old
//! epoch sealed at `cut` (it tells us in `EpochBase`); every file changed
//! after that (ctime) is copied before the resync, and after it the copies
//! identical to what the new primary sent are dropped. What is left is what
//! the new primary does not have. A file the old primary deleted after the
//! cut comes back with the resync (the new primary still has it).

use super::Shared;
use ferry_watch::{scan, Excludes};
use std::io;
use std::path::{Path, PathBuf};

pub const DIR: &str = "conflicts";
const MANIFEST: &str = "MANIFEST.tsv";

/// Copies the files changed after `cut_ns` into a new conflicts dir.
/// Returns it, or `None` when nothing changed after the cut.
pub fn preserve(
    root: &Path,
    excludes: &Excludes,
    state_dir: &Path,
    epoch: u64,
    cut_ns: u64,
) -> io::Result<Option<PathBuf>> {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    scan::scan_tree(root, None, excludes, &mut out, &mut skipped)?;
    let dir = state_dir
        .join(DIR)
        .join(format!("epoch-{epoch}-{}", super::now_ns() / 1_000_000_000));
    let mut n = 0;
    for s in out {
        if s.entry.kind != ferry_proto::EntryKind::File {
            continue;
        }
        let ctime_ns = (s.ctime.0.max(0) as u64) * 1_000_000_000 + s.ctime.1.max(0) as u64;
        if ctime_ns <= cut_ns {
            continue;
        }
        let rel = String::from_utf8_lossy(s.entry.path.as_bytes()).into_owned();
        let dst = dir.join(&rel);
        let src = scan::abs(root, &s.entry.path);
        let copied = std::fs::create_dir_all(dst.parent().unwrap_or(&dir))
            .and_then(|_| std::fs::copy(&src, &dst));
        match copied {
            Ok(_) => {
                let f = std::fs::File::options().write(true).open(&dst)?;
                let m = s.entry.mtime;
                let t =
                    std::time::UNIX_EPOCH + std::time::Duration::new(m.secs.max(0) as u64, m.nanos);
                f.set_modified(t)?;
                f.sync_all()?;
                n += 1;
            }
            Err(e) if scan::gone(&e) => {}
            // the copy goes by path string: a path over PATH_MAX cannot be
            // preserved; one such file never stops the demotion
            Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) => {
                tracing::warn!(path = %rel, error = %e, "A conflicting file is not preserved: its path is too long.");
            }
            Err(e) => return Err(e),
        }
    }
    if n == 0 {
        return Ok(None);
    }
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(Some(dir))
}

/// After the resync: drops copies identical to the tree, writes the
/// manifest of the rest; returns how many are kept (the dir is removed when
/// none is).
pub fn settle(root: &Path, dir: &Path) -> io::Result<u64> {
    let mut lines = vec![
        "# Files this node wrote as primary that the new primary never got.".to_string(),
        "# path\tsize\tmtime_unix\tblake3\tstatus (replaced: the new primary has another version; absent: it has none)".into(),
    ];
    let mut kept = 0;
    for e in walkdir::WalkDir::new(dir).min_depth(1) {
        let e = e.map_err(io::Error::other)?;
        if !e.file_type().is_file() || e.file_name() == MANIFEST {
            continue;
        }
        let rel = e.path().strip_prefix(dir).map_err(io::Error::other)?;
        let mine = scan::hash_file(e.path())?;
        let live = root.join(rel);
        let status = match std::fs::symlink_metadata(&live) {
            Ok(md) if md.is_file() => {
                if scan::hash_file(&live)? == mine {
                    std::fs::remove_file(e.path())?;
                    continue;
                }
                "replaced"
            }
            Ok(_) => "replaced",
            Err(_) => "absent",
        };
        let md = std::fs::metadata(e.path())?;
        let mtime = md
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        lines.push(format!(
            "{}\t{}\t{}\t{}\t{}",
            rel.display(),
            md.len(),
            mtime,
            blake3::Hash::from(mine).to_hex(),
            status
        ));
        kept += 1;
    }
    if kept == 0 {
        std::fs::remove_dir_all(dir)?;
        return Ok(0);
    }
    // empty dirs left by dropped copies
    let mut dirs: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_dir())
        .map(|e| e.path().to_path_buf())
        .collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let _ = std::fs::remove_dir(d);
    }
    let m = dir.join(MANIFEST);
    std::fs::write(&m, lines.join("\n") + "\n")?;
    std::fs::File::open(&m)?.sync_all()?;
    Ok(kept)
}

/// Counts preserved files (all manifests) into the status and the metric.
pub fn report(shared: &Shared) {
    let base = shared.cfg.state_dir.join(DIR);
    let mut n = 0;
    let mut newest: Option<PathBuf> = None;
    if let Ok(rd) = std::fs::read_dir(&base) {
        for e in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join(MANIFEST)) {
                n += s
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.is_empty())
                    .count() as u64;
                if newest.as_ref().is_none_or(|p| e.path() > *p) {
                    newest = Some(e.path());
                }
            }
        }
    }
    shared.metrics.conflict_files.set(n as i64);
    shared.set_status(|s| {
        s.conflicts = newest.map(|d| (n, d.display().to_string()));
    });
}
