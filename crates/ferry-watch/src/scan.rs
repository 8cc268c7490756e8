//! Reading the state of entries under the root, never following symlinks.

use crate::exclude::Excludes;
use ferry_proto::{mode_ok, Entry, EntryKind, Mtime, RelPath, MODE_ALLOWED};
use std::fs::Metadata;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// An entry as the primary sees it, with the identity used to detect a file
/// that changed while it was read (G3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    pub entry: Entry,
    pub dev: u64,
    pub ino: u64,
    pub ctime: (i64, i64),
}

/// Something the scanner saw and will not replicate (as it is), with the
/// reason. One entry never stops a scan: what cannot be read is skipped and
/// reported, the walk goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    /// The path relative to the root, for the log (lossy UTF-8; a path too
    /// long for the wire is shown in full).
    pub path: String,
    pub reason: SkipReason,
    /// The error met, when one was.
    pub error: Option<String>,
}

/// Why an entry is not replicated (as it is). [`SkipReason::label`] is the
/// `reason` label of `ferry_skipped_entries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// A device, FIFO or socket: never replicated (G6).
    Special,
    /// setuid/setgid bits were dropped from the replicated mode.
    SetuidDropped,
    /// A symlink leaving the root, with `--safe-links`.
    UnsafeLink,
    /// ferry may not read it (permissions, or an I/O error).
    Unreadable,
    /// Its path is longer than ferry replicates (`MAX_PATH_LEN`, or the
    /// system's `PATH_MAX` counted from `/`): it and everything below it.
    PathTooLong,
}

impl SkipReason {
    pub const ALL: [SkipReason; 5] = [
        SkipReason::Special,
        SkipReason::SetuidDropped,
        SkipReason::UnsafeLink,
        SkipReason::Unreadable,
        SkipReason::PathTooLong,
    ];

    pub fn label(self) -> &'static str {
        match self {
            SkipReason::Special => "special_file",
            SkipReason::SetuidDropped => "setuid_dropped",
            SkipReason::UnsafeLink => "unsafe_link",
            SkipReason::Unreadable => "unreadable",
            SkipReason::PathTooLong => "path_too_long",
        }
    }
}

impl Skip {
    pub fn new(rel: &RelPath, reason: SkipReason) -> Skip {
        Skip {
            path: rel.display(),
            reason,
            error: None,
        }
    }

    /// An entry an I/O error kept from being read.
    pub fn io(path: String, e: &io::Error) -> Skip {
        let reason = if e.raw_os_error() == Some(libc::ENAMETOOLONG) {
            SkipReason::PathTooLong
        } else {
            SkipReason::Unreadable
        };
        Skip {
            path,
            reason,
            error: Some(e.to_string()),
        }
    }
}

/// The path on disk for `rel`.
pub fn abs(root: &Path, rel: &RelPath) -> PathBuf {
    root.join(std::ffi::OsStr::from_bytes(rel.as_bytes()))
}

/// Builds an [`Entry`] from `lstat` metadata; `None` for what is skipped
/// (special files, links leaving the root under `--safe-links`, a link that
/// vanished or cannot be read).
pub fn entry_from_meta(
    root: &Path,
    rel: &RelPath,
    md: &Metadata,
    excludes: &Excludes,
    skipped: &mut Vec<Skip>,
) -> Option<Scanned> {
    let ft = md.file_type();
    let mut mode = md.mode() & 0o7777;
    let kind = if ft.is_file() {
        EntryKind::File
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else {
        debug_assert!(
            ft.is_fifo() || ft.is_socket() || ft.is_block_device() || ft.is_char_device()
        );
        skipped.push(Skip::new(rel, SkipReason::Special));
        return None;
    };
    if !mode_ok(mode) {
        skipped.push(Skip::new(rel, SkipReason::SetuidDropped));
        mode &= MODE_ALLOWED;
    }
    let mut target = Vec::new();
    if kind == EntryKind::Symlink {
        target = match std::fs::read_link(abs(root, rel)) {
            Ok(t) => t.into_os_string().into_encoded_bytes(),
            Err(e) if gone(&e) => return None,
            Err(e) => {
                skipped.push(Skip::io(rel.display(), &e));
                return None;
            }
        };
        // verbatim, whatever it points at (G1); only --safe-links skips
        // the ones leaving the root
        if excludes.safe_links() && ferry_proto::link_stays_inside(rel, &target).is_err() {
            skipped.push(Skip::new(rel, SkipReason::UnsafeLink));
            return None;
        }
        if ferry_proto::check_link_target(&target).is_err() {
            // empty or over MAX_LINK_LEN: no replica could hold it
            skipped.push(Skip {
                path: rel.display(),
                reason: SkipReason::PathTooLong,
                error: Some(format!("link target of {} bytes", target.len())),
            });
            return None;
        }
        mode = 0;
    }
    Some(Scanned {
        entry: Entry {
            path: rel.clone(),
            kind,
            mode,
            size: if kind == EntryKind::File { md.len() } else { 0 },
            mtime: Mtime {
                secs: md.mtime(),
                nanos: md.mtime_nsec().clamp(0, 999_999_999) as u32,
            },
            target,
            hash: None,
        },
        dev: md.dev(),
        ino: md.ino(),
        ctime: (md.ctime(), md.ctime_nsec()),
    })
}

/// The state of one path: `None` when absent (or when a parent is not a
/// real directory, so nothing is read through a symlink), or when it is
/// skipped (reported in `skipped`).
pub fn lstat_entry(
    root: &Path,
    rel: &RelPath,
    excludes: &Excludes,
    skipped: &mut Vec<Skip>,
) -> Option<Scanned> {
    if let Some(parent) = rel.parent() {
        let mut cur = root.to_path_buf();
        for c in parent.components() {
            cur.push(std::ffi::OsStr::from_bytes(c));
            match std::fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return None,
                Err(e) if gone(&e) => return None,
                Err(e) => {
                    skipped.push(Skip::io(rel.display(), &e));
                    return None;
                }
            }
        }
    }
    match std::fs::symlink_metadata(abs(root, rel)) {
        Ok(md) => entry_from_meta(root, rel, &md, excludes, skipped),
        Err(e) if gone(&e) => None,
        Err(e) => {
            skipped.push(Skip::io(rel.display(), &e));
            None
        }
    }
}

/// BLAKE3 of a file's content, read without following a symlink.
pub fn hash_file(path: &Path) -> io::Result<[u8; 32]> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut h = blake3::Hasher::new();
    h.update_reader(f)?;
    Ok(*h.finalize().as_bytes())
}

/// True for the errors that mean "not there (any more)".
pub fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// Appends every non-excluded entry at and below `start` (the whole root
/// when `None`, the root itself not included) in walk order.
pub fn scan_tree(
    root: &Path,
    start: Option<&RelPath>,
    excludes: &Excludes,
    out: &mut Vec<Scanned>,
    skipped: &mut Vec<Skip>,
) -> io::Result<()> {
    let base = match start {
        Some(s) => abs(root, s),
        None => root.to_path_buf(),
    };
    let walker = walkdir::WalkDir::new(&base)
        .follow_links(false)
        .follow_root_links(false) // a symlink given as the start is a link, not its target
        .sort_by_file_name()
        .min_depth(if start.is_some() { 0 } else { 1 });
    let mut it = walker.into_iter();
    let lossy = |p: &Path| -> String {
        p.strip_prefix(root)
            .unwrap_or(p)
            .as_os_str()
            .to_string_lossy()
            .into_owned()
    };
    while let Some(item) = it.next() {
        let de = match item {
            Ok(de) => de,
            Err(e) => {
                let Some(path) = e.path() else {
                    return Err(io::Error::other(format!("cannot walk the root: {e}")));
                };
                if let Some(io) = e.io_error() {
                    if gone(io) {
                        continue;
                    }
                    // the start itself unreadable: the caller says what failed
                    if path == base && start.is_none() {
                        return Err(io::Error::new(
                            io.kind(),
                            format!("cannot read {}: {io}", base.display()),
                        ));
                    }
                    // one entry never stops the walk: skipped, reported
                    skipped.push(Skip::io(lossy(path), io));
                } else {
                    skipped.push(Skip {
                        path: lossy(path),
                        reason: SkipReason::Unreadable,
                        error: Some(e.to_string()),
                    });
                }
                continue;
            }
        };
        let Ok(rel_os) = de.path().strip_prefix(root) else {
            continue;
        };
        let is_dir = de.file_type().is_dir();
        let rel = match RelPath::new(rel_os.as_os_str().as_bytes().to_vec()) {
            Ok(r) => r,
            Err(e) => {
                // a path the wire cannot carry (over MAX_PATH_LEN): it and
                // everything below it are skipped, reported once here
                if is_dir {
                    it.skip_current_dir();
                }
                skipped.push(Skip {
                    path: lossy(de.path()),
                    reason: SkipReason::PathTooLong,
                    error: Some(e.to_string()),
                });
                continue;
            }
        };
        if excludes.is_excluded(&rel, is_dir) {
            if is_dir {
                it.skip_current_dir();
            }
            continue;
        }
        let md = match de.metadata() {
            Ok(m) => m,
            Err(e) if e.io_error().is_some_and(gone) => continue,
            Err(e) => {
                if is_dir {
                    it.skip_current_dir();
                }
                match e.io_error() {
                    Some(io) => skipped.push(Skip::io(rel.display(), io)),
                    None => skipped.push(Skip {
                        path: rel.display(),
                        reason: SkipReason::Unreadable,
                        error: Some(e.to_string()),
                    }),
                }
                continue;
            }
        };
        if let Some(s) = entry_from_meta(root, &rel, &md, excludes, skipped) {
            out.push(s);
        }
    }
    Ok(())
}

/// A second look at a directory that came into existence, once its inotify
/// watch surely exists. notify adds the watch of a new directory only after
/// it has delivered the directory's creation, so whatever was created or
/// changed inside it in between produced no event. `sealed` is what the
/// batch that shipped the directory read; the changes returned re-mark every
/// path whose state differs now (or that is new, or gone). Nothing when the
/// directory itself moved on (its parent's watch reports that).
pub fn changed_since(
    root: &Path,
    dir: &RelPath,
    excludes: &Excludes,
    sealed: &std::collections::HashMap<&RelPath, &Scanned>,
    skipped: &mut Vec<Skip>,
) -> io::Result<Vec<ferry_core::Change>> {
    use ferry_core::Change;
    let mut now = Vec::new();
    scan_tree(root, Some(dir), excludes, &mut now, skipped)?;
    let same_dir = match (now.first(), sealed.get(dir)) {
        (Some(n), Some(s)) => n.entry.path == *dir && (n.dev, n.ino) == (s.dev, s.ino),
        _ => false,
    };
    if !same_dir {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::with_capacity(now.len());
    for n in &now {
        seen.insert(&n.entry.path);
        match sealed.get(&n.entry.path) {
            Some(s) if *s == n => {}
            // a directory the seal never saw: everything below it is new
            None if n.entry.kind == EntryKind::Dir => {
                out.push(Change::Created(n.entry.path.clone()))
            }
            _ => out.push(Change::Touched(n.entry.path.clone())),
        }
    }
    for p in sealed.keys() {
        if p.starts_with(dir) && !seen.contains(p) {
            out.push(Change::Removed((*p).clone()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_since_finds_what_the_seal_missed() {
        use ferry_core::Change;
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("n/sub")).unwrap();
        std::fs::write(r.join("n/keep"), b"1").unwrap();
        std::fs::write(r.join("n/edit"), b"1").unwrap();
        std::fs::write(r.join("n/gone"), b"1").unwrap();
        let ex = Excludes::new(&[], None).unwrap();
        let mut at_seal = Vec::new();
        let mut skipped = Vec::new();
        let n = RelPath::new("n").unwrap();
        scan_tree(r, Some(&n), &ex, &mut at_seal, &mut skipped).unwrap();
        let sealed: std::collections::HashMap<&RelPath, &Scanned> =
            at_seal.iter().map(|s| (&s.entry.path, s)).collect();
        assert_eq!(
            changed_since(r, &n, &ex, &sealed, &mut skipped).unwrap(),
            vec![],
            "nothing changed"
        );
        // what happened before the watch existed
        std::fs::write(r.join("n/edit"), b"22").unwrap();
        std::fs::remove_file(r.join("n/gone")).unwrap();
        std::fs::write(r.join("n/sub/new"), b"3").unwrap();
        std::fs::create_dir_all(r.join("n/sub/deep/er")).unwrap();
        let mut got = changed_since(r, &n, &ex, &sealed, &mut skipped).unwrap();
        // n itself changed too (an entry left it), unless within one
        // timestamp tick: not asserted
        got.retain(|c| *c != Change::Touched(RelPath::new("n").unwrap()));
        got.sort_by_key(|c| format!("{c:?}"));
        let rp = |s: &str| RelPath::new(s).unwrap();
        let mut want = vec![
            Change::Touched(rp("n/edit")),
            Change::Removed(rp("n/gone")),
            Change::Touched(rp("n/sub")),
            Change::Touched(rp("n/sub/new")),
            Change::Created(rp("n/sub/deep")),
            Change::Created(rp("n/sub/deep/er")),
        ];
        want.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(got, want);
        // the directory moved away and another took its name: not ours to judge
        std::fs::rename(r.join("n"), r.join("m")).unwrap();
        std::fs::create_dir(r.join("n")).unwrap();
        assert_eq!(
            changed_since(r, &n, &ex, &sealed, &mut skipped).unwrap(),
            vec![]
        );
    }

    #[test]
    fn scan_in_walk_order_skipping_state_and_specials() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        std::fs::write(r.join("a/b/f"), b"x").unwrap();
        std::fs::write(r.join("a.txt"), b"y").unwrap();
        std::fs::create_dir_all(r.join(".ferry")).unwrap();
        std::fs::write(r.join(".ferry/state.a"), b"z").unwrap();
        std::os::unix::fs::symlink("a.txt", r.join("link")).unwrap();
        std::os::unix::fs::symlink("../../etc", r.join("bad")).unwrap();
        let ex = Excludes::new(&[], Some(RelPath::new(".ferry").unwrap())).unwrap();
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        scan_tree(r, None, &ex, &mut out, &mut skipped).unwrap();
        let names: Vec<String> = out.iter().map(|s| s.entry.path.display()).collect();
        assert_eq!(names, ["a", "a/b", "a/b/f", "a.txt", "bad", "link"]);
        assert!(skipped.is_empty(), "{skipped:?}");
        let bad = out
            .iter()
            .find(|s| s.entry.path.as_bytes() == b"bad")
            .unwrap();
        assert_eq!(bad.entry.target, b"../../etc", "verbatim");
        // --safe-links: the link leaving the root is skipped and reported
        let safe = ex.clone().with_safe_links(true);
        let mut out = Vec::new();
        scan_tree(r, None, &safe, &mut out, &mut skipped).unwrap();
        let names: Vec<String> = out.iter().map(|s| s.entry.path.display()).collect();
        assert_eq!(names, ["a", "a/b", "a/b/f", "a.txt", "link"]);
        assert_eq!(
            skipped,
            vec![Skip::new(
                &RelPath::new("bad").unwrap(),
                SkipReason::UnsafeLink
            )]
        );
        skipped.clear();
        // a symlink as the start of a scan is the link itself (walkdir follows
        // a root link by default)
        let mut out = Vec::new();
        scan_tree(
            r,
            Some(&RelPath::new("link").unwrap()),
            &ex,
            &mut out,
            &mut skipped,
        )
        .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].entry.kind, EntryKind::Symlink);
        std::os::unix::fs::symlink("nowhere", r.join("dangling")).unwrap();
        let mut out = Vec::new();
        scan_tree(
            r,
            Some(&RelPath::new("dangling").unwrap()),
            &ex,
            &mut out,
            &mut skipped,
        )
        .unwrap();
        assert_eq!(out.len(), 1, "a dangling link is still an entry");
        // a path below a symlink is reported absent, never read through it
        std::os::unix::fs::symlink("a", r.join("dirlink")).unwrap();
        let got = lstat_entry(r, &RelPath::new("dirlink/b/f").unwrap(), &ex, &mut skipped);
        assert_eq!(got, None);
    }
}
