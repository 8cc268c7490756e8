//! Reading the state of entries under the root, never following symlinks,
//! through directory handles (the openat family): paths of any length.

use crate::exclude::Excludes;
use ferry_proto::{mode_ok, Entry, EntryKind, Mtime, RelPath, MODE_ALLOWED};
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{openat, readlinkat, statat, AtFlags, FileType, Mode, OFlags, Stat, CWD};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
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

/// Flags of every directory handle the scanner opens: never through a
/// symlink, never inherited.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

fn name_os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// Opens the root itself (it may be reached through a symlink: the node
/// was given that path).
fn open_root(root: &Path) -> io::Result<OwnedFd> {
    Ok(openat(
        CWD,
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The directory `dir` (relative to `root_fd`), walked one component at a
/// time with `O_NOFOLLOW`: paths of any length, and never through a link.
fn open_dir_at(root_fd: impl AsFd, dir: Option<&RelPath>) -> io::Result<OwnedFd> {
    let mut cur = rustix::io::dup(root_fd)?;
    if let Some(dir) = dir {
        for c in dir.components() {
            cur = openat(&cur, name_os(c), DIR_FLAGS, Mode::empty())?;
        }
    }
    Ok(cur)
}

/// Opens a regular file of the root for reading through directory handles
/// (any path length), following no symlink on the way or at the end.
pub fn open_file_at(root_fd: impl AsFd, rel: &RelPath) -> io::Result<std::fs::File> {
    let parent = open_dir_at(root_fd, rel.parent().as_ref())?;
    let fd = openat(
        &parent,
        name_os(rel.file_name()),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(std::fs::File::from(fd))
}

/// BLAKE3 of the content of `rel` under `root`, read through directory
/// handles without following a symlink.
pub fn hash_at(root: &Path, rel: &RelPath) -> io::Result<[u8; 32]> {
    let f = open_file_at(&open_root(root)?, rel)?;
    let mut h = blake3::Hasher::new();
    h.update_reader(f)?;
    Ok(*h.finalize().as_bytes())
}

/// Builds a [`Scanned`] from the `lstat` of `name` in `dir` (the entry
/// `rel`); `None` for what is skipped (special files, links leaving the
/// root under `--safe-links`, a link that vanished or cannot be read).
fn entry_at(
    dir: &OwnedFd,
    name: &[u8],
    rel: &RelPath,
    st: &Stat,
    excludes: &Excludes,
    skipped: &mut Vec<Skip>,
) -> Option<Scanned> {
    let ft = FileType::from_raw_mode(st.st_mode as _);
    let mut mode = st.st_mode & 0o7777;
    let kind = match ft {
        FileType::RegularFile => EntryKind::File,
        FileType::Directory => EntryKind::Dir,
        FileType::Symlink => EntryKind::Symlink,
        _ => {
            skipped.push(Skip::new(rel, SkipReason::Special));
            return None;
        }
    };
    if !mode_ok(mode) {
        skipped.push(Skip::new(rel, SkipReason::SetuidDropped));
        mode &= MODE_ALLOWED;
    }
    let mut target = Vec::new();
    if kind == EntryKind::Symlink {
        target = match readlinkat(dir, name_os(name), Vec::new()) {
            Ok(t) => t.into_bytes(),
            Err(e) => {
                let e = io::Error::from(e);
                if !gone(&e) {
                    skipped.push(Skip::io(rel.display(), &e));
                }
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
            size: if kind == EntryKind::File {
                st.st_size as u64
            } else {
                0
            },
            mtime: Mtime {
                secs: st.st_mtime,
                nanos: (st.st_mtime_nsec as i64).clamp(0, 999_999_999) as u32,
            },
            target,
            hash: None,
        },
        dev: st.st_dev,
        ino: st.st_ino,
        ctime: (st.st_ctime, st.st_ctime_nsec as i64),
    })
}

/// `lstat` of `name` in `dir`: `None` when it is not there (any more).
fn stat_at(dir: &OwnedFd, name: &[u8]) -> io::Result<Option<Stat>> {
    match statat(dir, name_os(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(e) => {
            let e = io::Error::from(e);
            if gone(&e) {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

/// The state of one path: `None` when absent (or when a parent is not a
/// real directory, so nothing is read through a symlink), or when it is
/// skipped (reported in `skipped`). Read through directory handles, so
/// the path may be of any length.
pub fn lstat_entry(
    root: &Path,
    rel: &RelPath,
    excludes: &Excludes,
    skipped: &mut Vec<Skip>,
) -> Option<Scanned> {
    let parent = match open_root(root).and_then(|r| open_dir_at(&r, rel.parent().as_ref())) {
        Ok(d) => d,
        // a parent missing, a file, or a symlink: nothing there
        Err(e) if gone(&e) || e.raw_os_error() == Some(libc::ELOOP) => return None,
        Err(e) => {
            skipped.push(Skip::io(rel.display(), &e));
            return None;
        }
    };
    match stat_at(&parent, rel.file_name()) {
        Ok(Some(st)) => entry_at(&parent, rel.file_name(), rel, &st, excludes, skipped),
        Ok(None) => None,
        Err(e) => {
            skipped.push(Skip::io(rel.display(), &e));
            None
        }
    }
}

/// The kind of `rel` (not following a symlink, through directory handles);
/// `None` when absent, unreadable or special.
pub fn kind_at(root: &Path, rel: &RelPath) -> Option<EntryKind> {
    let parent = open_root(root)
        .and_then(|r| open_dir_at(&r, rel.parent().as_ref()))
        .ok()?;
    let st = stat_at(&parent, rel.file_name()).ok()??;
    match FileType::from_raw_mode(st.st_mode as _) {
        FileType::RegularFile => Some(EntryKind::File),
        FileType::Directory => Some(EntryKind::Dir),
        FileType::Symlink => Some(EntryKind::Symlink),
        _ => None,
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

/// The names in a directory, sorted (walk order), without `.` and `..`.
fn read_names(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    for e in rustix::fs::Dir::read_from(dir)? {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// One directory being walked.
struct Frame {
    fd: OwnedFd,
    prefix: Option<RelPath>,
    names: Vec<Vec<u8>>,
    next: usize,
}

/// Appends every non-excluded entry at and below `start` (the whole root
/// when `None`, the root itself not included) in walk order (a directory
/// before its children, children sorted by name).
///
/// The walk goes through directory handles (`openat` with `O_NOFOLLOW`,
/// `fstatat`, `readlinkat`), never joined path strings: paths of any length
/// and depth, and never through a symlink (including the start). One entry
/// never stops it: what cannot be read is skipped and reported in
/// `skipped`; only an unreadable root is an error.
pub fn scan_tree(
    root: &Path,
    start: Option<&RelPath>,
    excludes: &Excludes,
    out: &mut Vec<Scanned>,
    skipped: &mut Vec<Skip>,
) -> io::Result<()> {
    let root_fd = open_root(root)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", root.display())))?;
    let mut stack: Vec<Frame> = Vec::new();
    let descend = |stack: &mut Vec<Frame>,
                   fd: io::Result<OwnedFd>,
                   prefix: Option<RelPath>,
                   skipped: &mut Vec<Skip>|
     -> io::Result<()> {
        let shown = || prefix.as_ref().map(|p| p.display()).unwrap_or_default();
        let fd = match fd {
            Ok(fd) => fd,
            Err(e) if gone(&e) || e.raw_os_error() == Some(libc::ELOOP) => return Ok(()),
            Err(e) if prefix.is_none() => return Err(e),
            Err(e) => {
                skipped.push(Skip::io(shown(), &e));
                return Ok(());
            }
        };
        match read_names(&fd) {
            Ok(names) => stack.push(Frame {
                fd,
                prefix,
                names,
                next: 0,
            }),
            Err(e) if gone(&e) => {}
            Err(e) if prefix.is_none() => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot read {}: {e}", root.display()),
                ))
            }
            Err(e) => skipped.push(Skip::io(shown(), &e)),
        }
        Ok(())
    };
    match start {
        None => descend(&mut stack, Ok(root_fd.try_clone()?), None, skipped)?,
        Some(s) => {
            let parent = match open_dir_at(&root_fd, s.parent().as_ref()) {
                Ok(p) => p,
                Err(e) if gone(&e) || e.raw_os_error() == Some(libc::ELOOP) => return Ok(()),
                Err(e) => {
                    skipped.push(Skip::io(s.display(), &e));
                    return Ok(());
                }
            };
            let st = match stat_at(&parent, s.file_name()) {
                Ok(Some(st)) => st,
                Ok(None) => return Ok(()),
                Err(e) => {
                    skipped.push(Skip::io(s.display(), &e));
                    return Ok(());
                }
            };
            let is_dir = FileType::from_raw_mode(st.st_mode as _) == FileType::Directory;
            if excludes.is_excluded(s, is_dir) {
                return Ok(());
            }
            if let Some(e) = entry_at(&parent, s.file_name(), s, &st, excludes, skipped) {
                out.push(e);
            }
            if is_dir {
                let fd = openat(&parent, name_os(s.file_name()), DIR_FLAGS, Mode::empty())
                    .map_err(io::Error::from);
                descend(&mut stack, fd, Some(s.clone()), skipped)?;
            }
        }
    }
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.names.get(top.next).cloned() else {
            stack.pop();
            continue;
        };
        top.next += 1;
        let rel = match &top.prefix {
            Some(p) => p.join(&name),
            None => RelPath::new(name.clone()),
        };
        let rel = match rel {
            Ok(r) => r,
            Err(e) => {
                // a path the wire cannot carry (over MAX_PATH_LEN, or a name
                // the path rule refuses): it and its subtree are skipped,
                // reported once here
                let mut shown = top.prefix.as_ref().map(|p| p.display()).unwrap_or_default();
                if !shown.is_empty() {
                    shown.push('/');
                }
                shown.push_str(&String::from_utf8_lossy(&name));
                skipped.push(Skip {
                    path: shown,
                    reason: SkipReason::PathTooLong,
                    error: Some(e.to_string()),
                });
                continue;
            }
        };
        let st = match stat_at(&top.fd, &name) {
            Ok(Some(st)) => st,
            Ok(None) => continue,
            Err(e) => {
                skipped.push(Skip::io(rel.display(), &e));
                continue;
            }
        };
        let is_dir = FileType::from_raw_mode(st.st_mode as _) == FileType::Directory;
        if excludes.is_excluded(&rel, is_dir) {
            continue;
        }
        if let Some(s) = entry_at(&top.fd, &name, &rel, &st, excludes, skipped) {
            out.push(s);
        }
        if is_dir {
            let fd =
                openat(&top.fd, name_os(&name), DIR_FLAGS, Mode::empty()).map_err(io::Error::from);
            descend(&mut stack, fd, Some(rel), skipped)?;
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
