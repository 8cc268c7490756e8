//! Confined, atomic apply on the replica (G3, G4, G6).
//!
//! Layer: I/O, driven by the replica's receive loop. Every operation is made
//! relative to a held directory handle: the path from the root is walked one
//! component at a time with `O_NOFOLLOW` opens (cap-std), so a symlink on the
//! replica is never followed and no path string is checked and then used.
//! A regular file is written to a temp file in its final directory, fsynced,
//! given its mode and mtime, renamed over the old name, and the directory is
//! fsynced before the batch is acknowledged ([`Applier::commit`]).
//!
//! Start at [`Applier`].
#![forbid(unsafe_code)]

use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt, OpenOptionsMaybeDirExt};
use cap_std::fs::{Dir, OpenOptions};
use ferry_proto::{check_link_target, mode_ok, FileHeader, Mtime, Op, PathError, RelPath};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Temp-file prefix (shared with the scanner's exclusion rule).
pub const TEMP_PREFIX: &[u8] = b".ferry.tmp.";

/// Why an operation was not applied. Every variant leaves the root as it was
/// before the operation (a half-written temp file is removed).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A peer asked for something G6 forbids.
    #[error("refused {path}: {reason}")]
    Refused { path: String, reason: String },
    /// The replica's tree disagrees with the batch (e.g. a parent is not a
    /// directory, a rename source is missing): a resync is needed.
    #[error("replica disagrees with the batch at {path}: {reason}")]
    Inconsistent { path: String, reason: String },
    /// Protocol misuse: data without a file, a size or hash that does not match.
    #[error("bad file stream for {path}: {reason}")]
    BadStream { path: String, reason: String },
    /// The replica's disk is full.
    #[error("no space left on the replica's volume while writing {path}; free space or grow the volume — apply resumes by itself")]
    NoSpace { path: String },
    /// fsync failed: the batch is not stored and must not be acked (G9).
    #[error("fsync failed for {path}: {source}; the batch is not acknowledged")]
    Sync { path: String, source: io::Error },
    /// Any other I/O error.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: io::Error,
    },
}

impl ApplyError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ApplyError::Refused { .. } => "refused",
            ApplyError::Inconsistent { .. } => "inconsistent",
            ApplyError::BadStream { .. } => "bad_stream",
            ApplyError::NoSpace { .. } => "no_space",
            ApplyError::Sync { .. } => "fsync",
            ApplyError::Io { .. } => "io",
        }
    }
}

fn io_err(op: &'static str, path: &RelPath, source: io::Error) -> ApplyError {
    if source.raw_os_error() == Some(28) || source.kind() == io::ErrorKind::StorageFull {
        return ApplyError::NoSpace {
            path: path.display(),
        };
    }
    ApplyError::Io {
        op,
        path: path.display(),
        source,
    }
}

fn refused(path: &RelPath, reason: impl Into<String>) -> ApplyError {
    ApplyError::Refused {
        path: path.display(),
        reason: reason.into(),
    }
}

fn inconsistent(path: &RelPath, reason: impl Into<String>) -> ApplyError {
    ApplyError::Inconsistent {
        path: path.display(),
        reason: reason.into(),
    }
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

fn systime(m: Mtime) -> SystemTime {
    if m.secs >= 0 {
        UNIX_EPOCH + Duration::new(m.secs as u64, m.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(m.secs.unsigned_abs())
            + Duration::from_nanos(m.nanos as u64)
    }
}

struct Incoming {
    /// For an append, `size` is the file's final size.
    header: FileHeader,
    parent: Dir,
    /// Empty for an append (written in place).
    tmp_name: Vec<u8>,
    file: std::fs::File,
    written: u64,
    hasher: blake3::Hasher,
    /// An append: the size and mtime the file had before it.
    base: Option<(u64, Mtime)>,
}

impl Incoming {
    fn expected(&self) -> u64 {
        self.header.size - self.base.map_or(0, |b| b.0)
    }

    fn undo(&self) {
        undo(&self.parent, &self.tmp_name, &self.file, self.base);
    }
}

/// Counters of what one batch did, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyStats {
    pub files: u64,
    pub bytes: u64,
    pub ops: u64,
}

/// Applies operations to one root. Not thread-safe; one per replica.
pub struct Applier {
    root: Dir,
    protected: Option<RelPath>,
    /// Open handles of directories touched in this batch, by path ("" = root).
    cache: HashMap<Vec<u8>, Dir>,
    /// Directories whose entries changed: fsynced by [`Applier::commit`].
    /// Keyed by (dev, inode): a path may name two directories in one batch.
    /// Kept across [`Applier::reset`]: what an aborted batch changed must
    /// still be fsynced before the next acknowledgement.
    to_sync: HashMap<(u64, u64), (Vec<u8>, Dir)>,
    incoming: Option<Incoming>,
    /// Complete, verified temp files waiting to be made durable and renamed
    /// into place together (see [`Applier::flush_files`]).
    staged: Vec<Staged>,
    staged_paths: std::collections::HashSet<RelPath>,
    stats: ApplyStats,
}

/// A verified temp file not yet fsynced nor renamed into place.
struct Staged {
    path: RelPath,
    parent: Dir,
    /// Empty for an append: nothing to rename.
    tmp_name: Vec<u8>,
    file: std::fs::File,
    base: Option<(u64, Mtime)>,
}

impl Staged {
    fn undo(&self) {
        undo(&self.parent, &self.tmp_name, &self.file, self.base);
    }
}

/// Undoes a file not yet in place: removes its temp file, or truncates an
/// appended file back to its base (it then holds its old version again).
fn undo(parent: &Dir, tmp_name: &[u8], file: &std::fs::File, base: Option<(u64, Mtime)>) {
    match base {
        None => {
            let _ = parent.remove_file(os(tmp_name));
        }
        Some((len, mtime)) => {
            let _ = file.set_len(len);
            let _ = file.set_modified(systime(mtime));
        }
    }
}

/// G6: refuses setuid, setgid and unknown mode bits.
fn check_mode(path: &RelPath, mode: u32) -> Result<(), ApplyError> {
    if mode_ok(mode) {
        Ok(())
    } else {
        Err(refused(
            path,
            format!("mode {mode:o} carries setuid/setgid or unknown bits"),
        ))
    }
}

/// Files staged before they are flushed together. Bounds open descriptors.
const MAX_STAGED: usize = 512;
/// From this many staged files on, one `syncfs` replaces per-file fsyncs.
const SYNCFS_FROM: usize = 8;

impl Applier {
    /// Opens `root`. `protected`: the state dir relative to the root, when
    /// inside it; no operation may touch it.
    pub fn open(root: &Path, protected: Option<RelPath>) -> io::Result<Applier> {
        let root = Dir::open_ambient_dir(root, cap_std::ambient_authority())?;
        Ok(Applier {
            root,
            protected,
            cache: HashMap::new(),
            to_sync: HashMap::new(),
            incoming: None,
            staged: Vec::new(),
            staged_paths: std::collections::HashSet::new(),
            stats: ApplyStats::default(),
        })
    }

    /// What the current batch did so far.
    pub fn stats(&self) -> ApplyStats {
        self.stats
    }

    fn guard(&self, p: &RelPath) -> Result<(), ApplyError> {
        if let Some(s) = &self.protected {
            if p.starts_with(s) {
                return Err(refused(p, "path is inside the replica's own state dir"));
            }
        }
        if p.components().any(|c| c.starts_with(TEMP_PREFIX)) {
            return Err(refused(p, "path uses ferry's temp-file prefix"));
        }
        Ok(())
    }

    /// The directory holding `p`, walked without following symlinks.
    /// `create`: make missing directories (mode 0755, fixed later by their
    /// own Mkdir). Returns `None` when a parent is missing and `!create`.
    fn parent(&mut self, p: &RelPath, create: bool) -> Result<Option<Dir>, ApplyError> {
        let parent = p.parent();
        let key = parent
            .as_ref()
            .map(|x| x.as_bytes().to_vec())
            .unwrap_or_default();
        if let Some(d) = self.cache.get(&key) {
            return d
                .try_clone()
                .map(Some)
                .map_err(|e| io_err("open directory", p, e));
        }
        let mut cur = self
            .root
            .try_clone()
            .map_err(|e| io_err("open root", p, e))?;
        if let Some(parent) = &parent {
            for c in parent.components() {
                let next = match cur.open_dir_nofollow(os(c)) {
                    Ok(d) => d,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        if !create {
                            return Ok(None);
                        }
                        match cur.create_dir(os(c)) {
                            Ok(()) => {}
                            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                            Err(e) => return Err(io_err("create directory", p, e)),
                        }
                        cur.open_dir_nofollow(os(c))
                            .map_err(|e| io_err("open directory", p, e))?
                    }
                    Err(e) => {
                        // ELOOP (a symlink) or ENOTDIR (a file): never followed.
                        if !create {
                            return Ok(None);
                        }
                        return Err(inconsistent(
                            p,
                            format!("a parent is not a directory on the replica ({e})"),
                        ));
                    }
                };
                cur = next;
            }
        }
        if let Ok(c) = cur.try_clone() {
            self.cache.insert(key, c);
        }
        Ok(Some(cur))
    }

    fn mark_changed(&mut self, p: &RelPath, dir: &Dir) {
        use cap_std::fs::MetadataExt;
        let key = match dir.dir_metadata() {
            Ok(md) => (md.dev(), md.ino()),
            // unknown identity: keep it under a key of its own
            Err(_) => (u64::MAX, self.to_sync.len() as u64),
        };
        if let std::collections::hash_map::Entry::Vacant(v) = self.to_sync.entry(key) {
            if let Ok(c) = dir.try_clone() {
                let name = p
                    .parent()
                    .map(|x| x.as_bytes().to_vec())
                    .unwrap_or_default();
                v.insert((name, c));
            }
        }
    }

    /// Drops cached handles at or below `p` (moved or removed).
    fn invalidate(&mut self, p: &RelPath) {
        let pb = p.as_bytes();
        self.cache.retain(|k, _| {
            !(k.as_slice() == pb
                || (k.len() > pb.len() && k.starts_with(pb) && k[pb.len()] == b'/'))
        });
    }

    fn remove_entry(&mut self, dir: &Dir, p: &RelPath) -> Result<bool, ApplyError> {
        let name = os(p.file_name());
        match dir.symlink_metadata(name) {
            Ok(md) if md.is_dir() => {
                self.invalidate(p);
                dir.remove_dir_all(name)
                    .map_err(|e| io_err("remove tree", p, e))?;
                Ok(true)
            }
            Ok(_) => {
                dir.remove_file(name).map_err(|e| io_err("remove", p, e))?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("stat", p, e)),
        }
    }

    /// Applies one metadata operation.
    pub fn apply_op(&mut self, op: &Op) -> Result<(), ApplyError> {
        self.stats.ops += 1;
        // Staged files must be in place before anything that could touch
        // them (a creation of a directory elsewhere cannot).
        match op {
            Op::Mkdir { path, .. } if !self.staged_paths.contains(path) => {}
            _ => self.flush_files()?,
        }
        match op {
            Op::Mkdir { path, mode } => {
                self.guard(path)?;
                check_mode(path, *mode)?;
                let dir = self
                    .parent(path, true)?
                    .ok_or_else(|| inconsistent(path, "no parent"))?;
                let name = os(path.file_name());
                match dir.symlink_metadata(name) {
                    Ok(md) if md.is_dir() => {}
                    Ok(_) => {
                        dir.remove_file(name)
                            .map_err(|e| io_err("remove", path, e))?;
                        dir.create_dir(name)
                            .map_err(|e| io_err("create directory", path, e))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        dir.create_dir(name)
                            .map_err(|e| io_err("create directory", path, e))?;
                    }
                    Err(e) => return Err(io_err("stat", path, e)),
                }
                open_readable(&dir, name)
                    .map_err(|e| io_err("open directory", path, e))?
                    .set_permissions(std::fs::Permissions::from_mode(*mode))
                    .map_err(|e| io_err("chmod", path, e))?;
                self.mark_changed(path, &dir);
            }
            Op::Symlink {
                path,
                target,
                mtime,
            } => {
                self.guard(path)?;
                check_link_target(path, target)
                    .map_err(|e: PathError| refused(path, e.to_string()))?;
                let dir = self
                    .parent(path, true)?
                    .ok_or_else(|| inconsistent(path, "no parent"))?;
                let tmp = tmp_name(path.file_name());
                dir.symlink_contents(os(target), os(&tmp))
                    .map_err(|e| io_err("symlink", path, e))?;
                let _ = dir.set_symlink_times(
                    os(&tmp),
                    None,
                    Some(cap_fs_ext::SystemTimeSpec::Absolute(
                        cap_std::time::SystemTime::from_std(systime(*mtime)),
                    )),
                );
                self.replace(&dir, &tmp, path)?;
                self.mark_changed(path, &dir);
            }
            Op::Delete { path } => {
                self.guard(path)?;
                let Some(dir) = self.parent(path, false)? else {
                    return Ok(());
                };
                if self.remove_entry(&dir, path)? {
                    self.mark_changed(path, &dir);
                }
            }
            Op::Rename { from, to } => {
                self.guard(from)?;
                self.guard(to)?;
                if to.starts_with(from) {
                    return Err(refused(to, "rename into its own subtree"));
                }
                let from_dir = self.parent(from, false)?;
                let exists = |d: &Option<Dir>, p: &RelPath| -> bool {
                    d.as_ref()
                        .is_some_and(|d| d.symlink_metadata(os(p.file_name())).is_ok())
                };
                if !exists(&from_dir, from) {
                    // Never guess: even with something at `to`, it may be an
                    // older version. The primary answers with a resync.
                    return Err(inconsistent(from, "rename source is missing"));
                }
                let from_dir = from_dir.ok_or_else(|| inconsistent(from, "no parent"))?;
                let to_dir = self
                    .parent(to, true)?
                    .ok_or_else(|| inconsistent(to, "no parent"))?;
                // The primary's rename succeeded, so whatever the replica still
                // has at `to` (of any kind: it may be deleted later in this
                // batch) is replaced.
                if let Ok(md) = to_dir.symlink_metadata(os(to.file_name())) {
                    self.invalidate(to);
                    let r = if md.is_dir() {
                        to_dir.remove_dir_all(os(to.file_name()))
                    } else {
                        to_dir.remove_file(os(to.file_name()))
                    };
                    r.map_err(|e| io_err("remove", to, e))?;
                }
                self.invalidate(from);
                self.invalidate(to);
                from_dir
                    .rename(os(from.file_name()), &to_dir, os(to.file_name()))
                    .map_err(|e| match e.raw_os_error() {
                        Some(libc::ENOTDIR | libc::EISDIR | libc::ENOTEMPTY | libc::EEXIST) => {
                            inconsistent(from, format!("rename to {to} failed: {e}"))
                        }
                        _ => io_err("rename", from, e),
                    })?;
                self.mark_changed(from, &from_dir);
                self.mark_changed(to, &to_dir);
            }
            Op::SetMeta { path, mode, mtime } => {
                self.guard(path)?;
                check_mode(path, *mode)?;
                let dir = self
                    .parent(path, false)?
                    .ok_or_else(|| inconsistent(path, "parent missing"))?;
                let mut oo = OpenOptions::new();
                oo.read(true).follow(FollowSymlinks::No);
                let f = dir
                    .open_with(os(path.file_name()), &oo)
                    .map_err(|e| {
                        inconsistent(path, format!("cannot open for metadata update ({e})"))
                    })?
                    .into_std();
                f.set_permissions(std::fs::Permissions::from_mode(*mode))
                    .map_err(|e| io_err("chmod", path, e))?;
                f.set_modified(systime(*mtime))
                    .map_err(|e| io_err("set mtime", path, e))?;
                self.mark_changed(path, &dir);
            }
        }
        Ok(())
    }

    /// Renames `tmp` (in `dir`) over `path`'s name, replacing a directory
    /// there if need be.
    fn replace(&mut self, dir: &Dir, tmp: &[u8], path: &RelPath) -> Result<(), ApplyError> {
        let name = os(path.file_name());
        if let Ok(md) = dir.symlink_metadata(name) {
            if md.is_dir() {
                self.invalidate(path);
                if let Err(e) = dir.remove_dir_all(name) {
                    let _ = dir.remove_file(os(tmp));
                    return Err(io_err("remove tree", path, e));
                }
            }
        }
        dir.rename(os(tmp), dir, name).map_err(|e| {
            let _ = dir.remove_file(os(tmp));
            io_err("rename", path, e)
        })
    }

    /// Starts receiving a regular file.
    pub fn file_begin(&mut self, h: &FileHeader) -> Result<(), ApplyError> {
        self.file_abort();
        if self.staged_paths.contains(&h.path) || self.staged.len() >= MAX_STAGED {
            self.flush_files()?;
        }
        self.guard(&h.path)?;
        check_mode(&h.path, h.mode)?;
        let parent = self
            .parent(&h.path, true)?
            .ok_or_else(|| inconsistent(&h.path, "no parent"))?;
        let tmp = tmp_name(h.path.file_name());
        let mut oo = OpenOptions::new();
        oo.write(true).create_new(true).follow(FollowSymlinks::No);
        let file = parent
            .open_with(os(&tmp), &oo)
            .map_err(|e| io_err("create temp file", &h.path, e))?
            .into_std();
        self.incoming = Some(Incoming {
            header: h.clone(),
            parent,
            tmp_name: tmp,
            file,
            written: 0,
            hasher: blake3::Hasher::new(),
            base: None,
        });
        Ok(())
    }

    /// Starts extending a file in place (the append fast path). Readers see
    /// the old version growing into the new one: always a prefix of a
    /// version the primary sealed (G3). The file must be exactly the base
    /// the primary appended to (size and mtime), or nothing is written.
    pub fn append_begin(&mut self, a: &ferry_proto::AppendHeader) -> Result<(), ApplyError> {
        self.file_abort();
        if self.staged_paths.contains(&a.path) {
            self.flush_files()?;
        }
        self.guard(&a.path)?;
        check_mode(&a.path, a.mode)?;
        let parent = self
            .parent(&a.path, false)?
            .ok_or_else(|| inconsistent(&a.path, "append to a file whose directory is missing"))?;
        let mut oo = OpenOptions::new();
        oo.write(true).follow(FollowSymlinks::No);
        let file = parent
            .open_with(os(a.path.file_name()), &oo)
            .map_err(|e| {
                inconsistent(
                    &a.path,
                    format!("append to a file that cannot be opened ({e})"),
                )
            })?
            .into_std();
        let md = file.metadata().map_err(|e| io_err("stat", &a.path, e))?;
        let mtime = std::os::unix::fs::MetadataExt::mtime(&md);
        let nanos = std::os::unix::fs::MetadataExt::mtime_nsec(&md);
        if !md.is_file()
            || md.len() != a.offset
            || (mtime, nanos) != (a.prev_mtime.secs, a.prev_mtime.nanos as i64)
        {
            return Err(inconsistent(
                &a.path,
                "the replica's file is not the version the append extends",
            ));
        }
        use std::io::Seek;
        let mut file = file;
        file.seek(std::io::SeekFrom::Start(a.offset))
            .map_err(|e| io_err("seek", &a.path, e))?;
        self.incoming = Some(Incoming {
            header: FileHeader {
                path: a.path.clone(),
                mode: a.mode,
                mtime: a.mtime,
                size: a.size,
            },
            parent,
            tmp_name: Vec::new(),
            file,
            written: 0,
            hasher: blake3::Hasher::new(),
            base: Some((a.offset, a.prev_mtime)),
        });
        Ok(())
    }

    /// Appends data to the file being received.
    pub fn file_data(&mut self, data: &[u8]) -> Result<(), ApplyError> {
        let Some(inc) = self.incoming.as_mut() else {
            return Err(ApplyError::BadStream {
                path: String::new(),
                reason: "file data without a file header".into(),
            });
        };
        if inc.written + data.len() as u64 > inc.expected() {
            let path = inc.header.path.clone();
            self.file_abort();
            return Err(ApplyError::BadStream {
                path: path.display(),
                reason: "more data than the announced size".into(),
            });
        }
        if let Err(e) = inc.file.write_all(data) {
            let path = inc.header.path.clone();
            self.file_abort();
            return Err(io_err("write", &path, e));
        }
        inc.hasher.update(data);
        inc.written += data.len() as u64;
        Ok(())
    }

    /// Finishes the file: checks size and hash, fsyncs, sets mode and mtime
    /// and renames it into place.
    pub fn file_end(&mut self, hash: &[u8; 32]) -> Result<(), ApplyError> {
        let Some(inc) = self.incoming.take() else {
            return Err(ApplyError::BadStream {
                path: String::new(),
                reason: "file end without a file header".into(),
            });
        };
        let path = inc.header.path.clone();
        let cleanup = |inc: &Incoming| inc.undo();
        if inc.written != inc.expected() {
            cleanup(&inc);
            return Err(ApplyError::BadStream {
                path: path.display(),
                reason: format!(
                    "received {} bytes of an announced {}",
                    inc.written,
                    inc.expected()
                ),
            });
        }
        if inc.hasher.finalize().as_bytes() != hash {
            cleanup(&inc);
            return Err(ApplyError::BadStream {
                path: path.display(),
                reason: "content does not match its BLAKE3 hash".into(),
            });
        }
        let res = (|| {
            inc.file
                .set_permissions(std::fs::Permissions::from_mode(inc.header.mode))
                .map_err(|e| io_err("chmod", &path, e))?;
            inc.file
                .set_modified(systime(inc.header.mtime))
                .map_err(|e| io_err("set mtime", &path, e))
        })();
        if let Err(e) = res {
            cleanup(&inc);
            return Err(e);
        }
        self.stats.files += 1;
        self.stats.bytes += inc.written;
        self.staged_paths.insert(path.clone());
        self.staged.push(Staged {
            path,
            parent: inc.parent,
            tmp_name: inc.tmp_name,
            file: inc.file,
            base: inc.base,
        });
        Ok(())
    }

    /// Makes the staged files durable, then renames each into place (G3:
    /// readers see the old version or the new, never a partial one; G4: the
    /// data is on stable storage before the name points at it). Many files
    /// are flushed with one `syncfs` of the replica's filesystem instead of
    /// one fsync each; an error from either is fatal for the batch.
    pub fn flush_files(&mut self) -> Result<(), ApplyError> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let staged = std::mem::take(&mut self.staged);
        self.staged_paths.clear();
        let synced = if staged.len() >= SYNCFS_FROM {
            // one syncfs per filesystem the staged files live on (a root can
            // span mount points)
            let mut devs: Vec<(u64, usize)> = Vec::new();
            for (i, st) in staged.iter().enumerate() {
                let dev = std::os::unix::fs::MetadataExt::dev(
                    &st.file
                        .metadata()
                        .map_err(|e| io_err("stat", &st.path, e))?,
                );
                if !devs.iter().any(|(d, _)| *d == dev) {
                    devs.push((dev, i));
                }
            }
            devs.iter().try_for_each(|(_, i)| {
                rustix::fs::syncfs(&staged[*i].file).map_err(|e| ApplyError::Sync {
                    path: format!("{} files staged in this batch", staged.len()),
                    source: e.into(),
                })
            })
        } else {
            staged.iter().try_for_each(|st| {
                st.file.sync_all().map_err(|source| ApplyError::Sync {
                    path: st.path.display(),
                    source,
                })
            })
        };
        if let Err(e) = synced {
            for st in &staged {
                st.undo();
            }
            return Err(e);
        }
        let mut res = Ok(());
        for st in staged {
            if st.base.is_some() {
                continue; // an append: already in place, and now durable
            }
            drop(st.file);
            if res.is_err() {
                let _ = st.parent.remove_file(os(&st.tmp_name));
                continue;
            }
            res = self.replace(&st.parent, &st.tmp_name, &st.path);
            if res.is_ok() {
                self.mark_changed(&st.path, &st.parent);
            }
        }
        res
    }

    /// Drops a file in progress (the primary saw it change while reading).
    pub fn file_abort(&mut self) {
        if let Some(inc) = self.incoming.take() {
            inc.undo();
        }
    }

    /// Makes the batch durable: fsyncs every directory whose entries changed.
    /// Only after this returns may the batch be acknowledged (G4).
    pub fn commit(&mut self) -> Result<ApplyStats, ApplyError> {
        self.file_abort();
        self.flush_files()?;
        let dirs: Vec<(Vec<u8>, Dir)> = self.to_sync.drain().map(|(_, v)| v).collect();
        self.cache.clear();
        for (k, d) in dirs {
            open_readable(&d, OsStr::new("."))
                .and_then(|f| f.sync_all())
                .map_err(|source| ApplyError::Sync {
                    path: String::from_utf8_lossy(&k).into_owned(),
                    source,
                })?;
        }
        Ok(std::mem::take(&mut self.stats))
    }

    /// Forgets cached handles and any file in progress (after an error).
    pub fn reset(&mut self) {
        self.file_abort();
        for st in std::mem::take(&mut self.staged) {
            st.undo();
        }
        self.staged_paths.clear();
        self.cache.clear();
        self.stats = ApplyStats::default();
    }
}

/// Opens an entry of `dir` (a directory included) for reading without
/// following a symlink: cap-std's own directory handles are `O_PATH`, which
/// neither fsync nor fchmod accept.
fn open_readable(dir: &Dir, name: &OsStr) -> io::Result<std::fs::File> {
    let mut oo = OpenOptions::new();
    oo.read(true).maybe_dir(true).follow(FollowSymlinks::No);
    Ok(dir.open_with(name, &oo)?.into_std())
}

fn tmp_name(name: &[u8]) -> Vec<u8> {
    let mut v = TEMP_PREFIX.to_vec();
    v.extend_from_slice(&name[..name.len().min(200)]);
    v.push(b'.');
    v.extend_from_slice(format!("{:08x}", fastrand::u32(..)).as_bytes());
    v
}

/// Removes leftover temp files (from a crash mid-write) below the root.
pub fn clean_temp_files(root: &Path) -> io::Result<u64> {
    let mut n = 0;
    for e in walk(root)? {
        if e.file_name()
            .is_some_and(|n| n.as_bytes().starts_with(TEMP_PREFIX))
        {
            std::fs::remove_file(&e)?;
            n += 1;
        }
    }
    Ok(n)
}

fn walk(root: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
