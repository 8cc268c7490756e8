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

/// Something the scanner saw and will not replicate, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// A device, FIFO or socket: never replicated (G6).
    Special(RelPath),
    /// setuid/setgid bits were dropped from the replicated mode.
    SetuidDropped(RelPath),
    /// A symlink whose target leaves the root: not replicated (G6).
    LinkEscapes(RelPath),
    /// ferry may not read it (permissions).
    Unreadable(RelPath),
}

/// The path on disk for `rel`.
pub fn abs(root: &Path, rel: &RelPath) -> PathBuf {
    root.join(std::ffi::OsStr::from_bytes(rel.as_bytes()))
}

/// Builds an [`Entry`] from `lstat` metadata; `None` for special files.
pub fn entry_from_meta(
    root: &Path,
    rel: &RelPath,
    md: &Metadata,
    skipped: &mut Vec<Skip>,
) -> io::Result<Option<Scanned>> {
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
        skipped.push(Skip::Special(rel.clone()));
        return Ok(None);
    };
    if !mode_ok(mode) {
        skipped.push(Skip::SetuidDropped(rel.clone()));
        mode &= MODE_ALLOWED;
    }
    let mut target = Vec::new();
    if kind == EntryKind::Symlink {
        target = std::fs::read_link(abs(root, rel))?
            .into_os_string()
            .into_encoded_bytes();
        if ferry_proto::check_link_target(rel, &target).is_err() {
            skipped.push(Skip::LinkEscapes(rel.clone()));
            return Ok(None);
        }
        mode = 0;
    }
    Ok(Some(Scanned {
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
    }))
}

/// The state of one path: `None` when absent (or when a parent is not a
/// real directory, so nothing is read through a symlink).
pub fn lstat_entry(
    root: &Path,
    rel: &RelPath,
    skipped: &mut Vec<Skip>,
) -> io::Result<Option<Scanned>> {
    if let Some(parent) = rel.parent() {
        let mut cur = root.to_path_buf();
        for c in parent.components() {
            cur.push(std::ffi::OsStr::from_bytes(c));
            match std::fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Ok(None),
                Err(e) if gone(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }
    match std::fs::symlink_metadata(abs(root, rel)) {
        Ok(md) => entry_from_meta(root, rel, &md, skipped),
        Err(e) if gone(&e) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            skipped.push(Skip::Unreadable(rel.clone()));
            Ok(None)
        }
        Err(e) => Err(e),
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
    while let Some(item) = it.next() {
        let de = match item {
            Ok(de) => de,
            Err(e) => {
                if let Some(io) = e.io_error() {
                    if gone(io) {
                        continue;
                    }
                    if io.kind() == io::ErrorKind::PermissionDenied {
                        if let Some(rel) = e
                            .path()
                            .and_then(|p| p.strip_prefix(root).ok())
                            .and_then(|r| RelPath::new(r.as_os_str().as_bytes().to_vec()).ok())
                        {
                            skipped.push(Skip::Unreadable(rel));
                        }
                        continue;
                    }
                }
                let path = e
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                return Err(io::Error::other(format!("cannot read {path}: {e}")));
            }
        };
        let Ok(rel_os) = de.path().strip_prefix(root) else {
            continue;
        };
        let Ok(rel) = RelPath::new(rel_os.as_os_str().as_bytes().to_vec()) else {
            continue;
        };
        let is_dir = de.file_type().is_dir();
        if excludes.is_excluded(&rel, is_dir) {
            if is_dir {
                it.skip_current_dir();
            }
            continue;
        }
        let md = match de.metadata() {
            Ok(m) => m,
            Err(e) if e.io_error().is_some_and(gone) => continue,
            Err(e) => return Err(io::Error::other(e.to_string())),
        };
        if let Some(s) = entry_from_meta(root, &rel, &md, skipped)? {
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
        assert_eq!(names, ["a", "a/b", "a/b/f", "a.txt", "link"]);
        assert_eq!(
            skipped,
            vec![Skip::LinkEscapes(RelPath::new("bad").unwrap())]
        );
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
        let got = lstat_entry(r, &RelPath::new("dirlink/b/f").unwrap(), &mut skipped).unwrap();
        assert_eq!(got, None);
    }
}
