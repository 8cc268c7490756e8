//! Confined, atomic apply on the replica (G3, G4, G6).
//!
//! Layer: I/O, driven by the replica's receive loop. Every operation is made
//! relative to a held directory handle: the path from the root is walked one
//! component at a time with `O_NOFOLLOW` opens (cap-std), so a symlink on the
//! replica is never followed and no path string is checked and then used.
//! A batch is received into staged files and a redo journal, committed
//! (fsynced), then applied step by step; a crash mid-apply is finished on
//! restart (see `journal.rs` and [`Applier::recover`]). A regular file is
//! staged, fsynced, given its mode and mtime and renamed over the old name;
//! changed directories are fsynced before the batch is acknowledged.
//!
//! Start at [`Applier`].
#![forbid(unsafe_code)]

pub mod journal;

use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt, OpenOptionsMaybeDirExt};
use cap_std::fs::{Dir, OpenOptions};
use ferry_proto::{check_link_target, mode_ok, FileHeader, Message, Mtime, Op, PathError, RelPath};
pub use journal::BatchInfo;
use journal::Journal;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Read;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Skipped steps remembered per batch for the report (bounded memory; the
/// rest are counted in the log line only).
pub const MAX_SKIPPED_STEPS: usize = 1024;

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

/// A step the replica's filesystem cannot hold (see
/// [`ApplyError::unholdable`]): skipped, the rest of its batch applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedStep {
    pub path: String,
    pub error: String,
}

impl ApplyError {
    /// True for an error that names an entry this replica's filesystem can
    /// never hold as sent: a name or link target it refuses
    /// (`ENAMETOOLONG`, `EILSEQ`). Redoing the batch or resyncing would
    /// meet it again, so the step is skipped and reported instead of
    /// failing the batch (a session that loops).
    pub fn unholdable(&self) -> bool {
        matches!(self, ApplyError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENAMETOOLONG | libc::EILSEQ)))
    }

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

/// Counters of what one batch did, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyStats {
    pub files: u64,
    pub bytes: u64,
    pub ops: u64,
    /// Of `bytes`, those copied from chunks the replica already held.
    pub copied: u64,
}

/// What [`Applier::recover`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing to finish: the tree sits at the applied batch's boundary.
    Clean,
    /// A committed batch was finished: save it as applied, then go on.
    Finished(BatchInfo),
    /// The tree is between batches after an abandoned apply (or a machine
    /// crash mid-batch): only a resync brings it back to a boundary.
    NeedsResync,
}

/// Applies batches to one root. Not thread-safe; one per replica.
///
/// A batch goes through three phases:
/// 1. receive ([`Applier::begin`], [`Applier::apply_op`], [`Applier::file_begin`]…):
///    every step is checked against the rules that need no tree (G6), file
///    content goes to staged files, steps to the journal. The tree is not
///    touched.
/// 2. commit ([`Applier::commit`]): staged files fsynced, journal committed.
/// 3. apply (inside `commit`, or [`Applier::recover`] after a crash): the
///    steps run in order, each recorded in the progress record; then the
///    changed directories and appended files are fsynced.
pub struct Applier {
    root: Dir,
    protected: Option<RelPath>,
    staging: Dir,
    staging_path: PathBuf,
    journal: Journal,
    state_dir: PathBuf,
    /// Open handles of directories touched in this batch, by path ("" = root).
    cache: HashMap<Vec<u8>, Cached>,
    /// Directories whose entries changed, fsynced before a batch completes.
    /// Keyed by (dev, inode): a path may name two directories in one batch.
    to_sync: HashMap<(u64, u64), (Vec<u8>, Arc<Dir>)>,
    /// Files extended in place by this batch, fsynced with the directories.
    appended: Vec<(RelPath, std::fs::File)>,
    receiving: Option<Receiving>,
    incoming: Option<Incoming>,
    /// A committed batch could not be applied (an I/O error, a full disk):
    /// it must be finished by [`Applier::recover`] before anything else.
    pending: bool,
    /// The nonce of the batch `commit` or `recover` just completed, for
    /// [`Applier::finished`] (no second read of the journal).
    completed: Option<u64>,
    stats: ApplyStats,
    /// Steps skipped as unholdable since [`Applier::take_skipped`].
    skipped: Vec<SkippedStep>,
}

/// A directory handle walked in this batch, shared (no `dup` per use), with
/// its identity (no `fstat` per use).
struct Cached {
    dir: Arc<Dir>,
    id: (u64, u64),
}

/// Which steps of a redo may find their own effect already done.
#[derive(Clone, Copy)]
enum Tolerant {
    /// None: a first run.
    No,
    /// The step the progress record says comes next: a crash may have hit
    /// it between its syscall and the progress update.
    At(u64),
    /// All: after a machine crash the progress record may be stale.
    All,
}

struct Receiving {
    /// Staged files so far (the next one's name).
    files: u32,
    /// Handles of the first staged files, fsynced one by one at commit;
    /// past [`SYNCFS_FROM`] files one `syncfs` replaces them.
    fds: Vec<std::fs::File>,
}

struct Incoming {
    staged: u32,
    file: std::fs::File,
    path: RelPath,
    mode: u32,
    mtime: Mtime,
    expected: u64,
    written: u64,
    /// Written back up to here (early writeback, see [`WRITEBACK_EVERY`]).
    kicked: u64,
    hasher: blake3::Hasher,
    step: Message,
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

/// A staged file's data is handed to writeback every this many bytes.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// From this many staged files on, one `syncfs` replaces per-file fsyncs.
const SYNCFS_FROM: usize = 8;
/// The staging dir at the root, used when the state dir is on another
/// filesystem (staged files are renamed into place). Its name carries the
/// temp prefix: never scanned, replicated or writable by a peer.
pub const STAGING_DIR: &str = ".ferry.tmp.staging";
/// Present in the state dir while the tree is not at a batch boundary and
/// needs a resync.
const NEEDS_RESYNC: &str = "apply.needs-resync";

/// True when the replica whose state dir is `state_dir` has its tree between
/// batches (see [`Applier::needs_resync`]).
pub fn needs_resync_at(state_dir: &Path) -> bool {
    state_dir.join(NEEDS_RESYNC).exists()
}

fn staged_name(n: u32) -> String {
    n.to_string()
}

// Crash points for the recovery tests: `crash("name")` unwinds like a kill
// when the test armed that point. Compiled only for tests.
#[cfg(test)]
thread_local! {
    pub(crate) static CRASH_AT: std::cell::RefCell<Option<(String, u32)>> = const { std::cell::RefCell::new(None) };
    pub(crate) static CRASH_SEEN: std::cell::RefCell<HashMap<String, u32>> = std::cell::RefCell::new(HashMap::new());
}

#[cfg(test)]
fn crash(name: &'static str) {
    CRASH_SEEN.with(|s| *s.borrow_mut().entry(name.to_owned()).or_default() += 1);
    let hit = CRASH_AT.with(|c| {
        let mut c = c.borrow_mut();
        match c.as_mut() {
            Some((n, k)) if n == name => {
                *k -= 1;
                if *k == 0 {
                    *c = None;
                    return true;
                }
                false
            }
            _ => false,
        }
    });
    if hit {
        std::panic::panic_any(Crashed(name));
    }
}

#[cfg(not(test))]
#[inline(always)]
fn crash(_: &'static str) {}

/// The payload of a test crash.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct Crashed(#[allow(dead_code)] pub &'static str);

impl Applier {
    /// Opens `root`; the journal lives in `state_dir`. `protected`: the
    /// state dir relative to the root, when inside it; no step may touch it.
    pub fn open(root: &Path, protected: Option<RelPath>, state_dir: &Path) -> io::Result<Applier> {
        use std::os::unix::fs::MetadataExt;
        // Staged files are renamed into place, so they must be on the
        // root's filesystem: in the state dir when it is (the default,
        // ROOT/.ferry), else in a hidden dir at the root.
        let staging_path = if std::fs::metadata(state_dir)?.dev() == std::fs::metadata(root)?.dev()
        {
            state_dir.join("staging")
        } else {
            root.join(STAGING_DIR)
        };
        match std::fs::create_dir(&staging_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let staging = Dir::open_ambient_dir(&staging_path, cap_std::ambient_authority())?;
        let root = Dir::open_ambient_dir(root, cap_std::ambient_authority())?;
        Ok(Applier {
            root,
            protected,
            staging,
            staging_path,
            journal: Journal::open(state_dir)?,
            state_dir: state_dir.to_path_buf(),
            cache: HashMap::new(),
            to_sync: HashMap::new(),
            appended: Vec::new(),
            receiving: None,
            incoming: None,
            pending: false,
            completed: None,
            stats: ApplyStats::default(),
            skipped: Vec::new(),
        })
    }

    /// The steps skipped since the last call (see [`ApplyError::unholdable`]),
    /// at most [`MAX_SKIPPED_STEPS`] per batch.
    pub fn take_skipped(&mut self) -> Vec<SkippedStep> {
        std::mem::take(&mut self.skipped)
    }

    /// Where staged files wait for their batch's commit.
    pub fn staging_path(&self) -> &Path {
        &self.staging_path
    }

    /// True while the tree is not at a batch boundary (an abandoned batch
    /// or a machine crash mid-batch): only a resync batch clears it.
    pub fn needs_resync(&self) -> bool {
        needs_resync_at(&self.state_dir)
    }

    fn set_needs_resync(&self, on: bool) -> Result<(), ApplyError> {
        let p = self.state_dir.join(NEEDS_RESYNC);
        let r = if on {
            std::fs::write(&p, b"the tree is between batches; a resync repairs it\n")
        } else {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                r => r,
            }
        };
        r.map_err(|source| ApplyError::Io {
            op: "update",
            path: p.display().to_string(),
            source,
        })
    }

    fn jerr(op: &'static str, source: io::Error) -> ApplyError {
        if source.raw_os_error() == Some(28) {
            return ApplyError::NoSpace {
                path: "the redo journal".into(),
            };
        }
        ApplyError::Io {
            op,
            path: "redo journal".into(),
            source,
        }
    }

    /// Finishes what the journal holds beyond `applied` (epoch, seq): call
    /// at start, and before a session after an apply error. The caller
    /// saves [`Recovery::Finished`]'s batch as applied, then calls
    /// [`Applier::finished`].
    pub fn recover(&mut self, applied: (u64, u64)) -> Result<Recovery, ApplyError> {
        self.reset_receive();
        let c = self
            .journal
            .committed()
            .map_err(|e| Self::jerr("read", e))?;
        let (pnonce, pdone) = self.journal.progress().map_err(|e| Self::jerr("read", e))?;
        let mut out = Recovery::Clean;
        if let Some(c) = c {
            let done = if pnonce == c.nonce { pdone } else { 0 };
            let base = (c.info.base_epoch, c.info.base_seq);
            if done == journal::FINISHED || done == journal::ABANDONED || base != applied {
                // finished (or abandoned, flagged below), or older than
                // what is applied: nothing to redo
            } else {
                let same_boot = c.boot_id == journal::boot_id();
                // After a machine crash the progress record may be stale:
                // every remaining step runs in its tolerant form, and a
                // resync checks the result.
                self.pending = true;
                let tolerant = if same_boot {
                    Tolerant::At(done)
                } else {
                    Tolerant::All
                };
                match self.run(&c, done, tolerant) {
                    Ok(()) => {}
                    Err(e @ ApplyError::NoSpace { .. }) => return Err(e),
                    Err(_) => return Ok(Recovery::NeedsResync),
                }
                self.pending = false;
                if !same_boot {
                    self.set_needs_resync(true)?;
                }
                self.completed = Some(c.nonce);
                out = Recovery::Finished(c.info);
            }
        }
        self.pending = false;
        self.wipe_staging();
        if self.needs_resync() {
            return Ok(match out {
                Recovery::Finished(_) => out,
                _ => Recovery::NeedsResync,
            });
        }
        Ok(out)
    }

    /// Records that the batch [`Applier::commit`] or [`Applier::recover`]
    /// returned is saved as applied.
    pub fn finished(&mut self) {
        if let Some(nonce) = self.completed.take() {
            let _ = self.journal.set_progress(nonce, journal::FINISHED);
        }
    }

    /// Starts receiving a batch.
    pub fn begin(&mut self, info: BatchInfo) -> Result<(), ApplyError> {
        if self.pending {
            return Err(ApplyError::Io {
                op: "begin",
                path: String::new(),
                source: io::Error::other("a committed batch is still unfinished"),
            });
        }
        self.reset_receive();
        self.wipe_staging();
        self.journal
            .start(&info)
            .map_err(|e| Self::jerr("write", e))?;
        self.receiving = Some(Receiving {
            files: 0,
            fds: Vec::new(),
        });
        self.stats = ApplyStats::default();
        Ok(())
    }

    fn receiving(&mut self) -> Result<&mut Receiving, ApplyError> {
        self.receiving
            .as_mut()
            .ok_or_else(|| ApplyError::BadStream {
                path: String::new(),
                reason: "a batch step outside a batch".into(),
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

    /// Receives one metadata operation: checked (G6) and journaled.
    pub fn apply_op(&mut self, op: &Op) -> Result<(), ApplyError> {
        self.receiving()?;
        match op {
            Op::Mkdir { path, mode } => {
                self.guard(path)?;
                check_mode(path, *mode)?;
            }
            Op::Symlink { path, target, .. } => {
                self.guard(path)?;
                // created verbatim, whatever it points at (G1): the apply
                // phase never follows a link (G6), so its target is inert
                check_link_target(target).map_err(|e: PathError| refused(path, e.to_string()))?;
            }
            Op::Delete { path } => self.guard(path)?,
            Op::Rename { from, to } => {
                self.guard(from)?;
                self.guard(to)?;
                if to.starts_with(from) {
                    return Err(refused(to, "rename into its own subtree"));
                }
            }
            Op::SetMeta { path, mode, .. } => {
                self.guard(path)?;
                check_mode(path, *mode)?;
            }
        }
        self.stats.ops += 1;
        self.journal
            .push(&Message::Op(op.clone()))
            .map_err(|e| Self::jerr("write", e))
    }

    fn stage(
        &mut self,
        path: &RelPath,
        mode: u32,
        step: Message,
        expected: u64,
    ) -> Result<(), ApplyError> {
        self.file_abort();
        self.guard(path)?;
        check_mode(path, mode)?;
        let n = self.receiving()?.files;
        let mut oo = OpenOptions::new();
        oo.write(true)
            .create(true)
            .truncate(true)
            .follow(FollowSymlinks::No);
        let file = self
            .staging
            .open_with(staged_name(n), &oo)
            .map_err(|e| io_err("create staged file", path, e))?
            .into_std();
        let mtime = match &step {
            Message::FileBegin(h) => h.mtime,
            Message::FileAppend(a) => a.mtime,
            Message::FilePatch(h) => h.mtime,
            _ => Mtime::default(),
        };
        self.incoming = Some(Incoming {
            staged: n,
            file,
            path: path.clone(),
            mode,
            mtime,
            expected,
            written: 0,
            kicked: 0,
            hasher: blake3::Hasher::new(),
            step,
        });
        Ok(())
    }

    /// Starts receiving a regular file (staged; placed at apply).
    pub fn file_begin(&mut self, h: &FileHeader) -> Result<(), ApplyError> {
        self.stage(&h.path, h.mode, Message::FileBegin(h.clone()), h.size)
    }

    /// Starts receiving the tail of a file that only grew (the append fast
    /// path). At apply the file is extended in place: readers see the old
    /// version growing into the new one, always a prefix of a version the
    /// primary sealed (G3). It must then be exactly the base the primary
    /// appended to (size and mtime), or the batch is inconsistent.
    pub fn append_begin(&mut self, a: &ferry_proto::AppendHeader) -> Result<(), ApplyError> {
        let Some(tail) = a.size.checked_sub(a.offset) else {
            return Err(ApplyError::BadStream {
                path: a.path.display(),
                reason: "append ends before it starts".into(),
            });
        };
        self.stage(&a.path, a.mode, Message::FileAppend(a.clone()), tail)
    }

    /// Starts receiving an in-place patch of a file the replica holds (a
    /// small edit of a large file): the new bytes of its ranges are staged
    /// and written into the file at apply, through the redo journal; see
    /// `docs/ARCHITECTURE.md` ("Small edits in large files").
    pub fn patch_begin(&mut self, h: &ferry_proto::PatchHeader) -> Result<(), ApplyError> {
        let n = h.patched();
        self.stage(&h.path, h.mode, Message::FilePatch(h.clone()), n)
    }

    /// Copies `len` bytes at `offset` of the replica's own file `src` (as
    /// the tree holds it before this batch) into the file being received:
    /// a chunk the primary knows this replica has. A source that is gone,
    /// shorter, or not a regular file means the replica is not what the
    /// primary believes: the batch is inconsistent. Wrong bytes fail the
    /// file's hash at its end.
    pub fn file_copy(&mut self, src: &RelPath, offset: u64, len: u64) -> Result<(), ApplyError> {
        let Some(inc) = self.incoming.as_ref() else {
            return Err(ApplyError::BadStream {
                path: String::new(),
                reason: "copied data without a file header".into(),
            });
        };
        if inc.written.saturating_add(len) > inc.expected {
            let path = inc.path.clone();
            self.file_abort();
            return Err(ApplyError::BadStream {
                path: path.display(),
                reason: "more data than the announced size".into(),
            });
        }
        if let Err(e) = self.guard(src) {
            self.file_abort();
            return Err(e);
        }
        let mut oo = OpenOptions::new();
        oo.read(true).follow(FollowSymlinks::No);
        cap_std::fs::OpenOptionsExt::custom_flags(&mut oo, libc::O_NONBLOCK);
        let file = match self.root.open_with(os(src.as_bytes()), &oo) {
            Ok(f) => f.into_std(),
            Err(e) => {
                self.file_abort();
                return Err(inconsistent(
                    src,
                    format!("the chunk source the primary expects here cannot be opened ({e})"),
                ));
            }
        };
        match file.metadata() {
            Ok(md) if md.is_file() && offset.checked_add(len).is_some_and(|e| e <= md.len()) => {}
            _ => {
                self.file_abort();
                return Err(inconsistent(
                    src,
                    "the chunk source the primary expects here is not a regular file that long",
                ));
            }
        }
        let mut buf = vec![0u8; (len as usize).min(256 << 10)];
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let want = ((end - at) as usize).min(buf.len());
            match std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf[..want], at) {
                Ok(()) => {}
                Err(e) => {
                    self.file_abort();
                    return Err(inconsistent(
                        src,
                        format!("the chunk source is shorter than the primary expects ({e})"),
                    ));
                }
            }
            self.file_data(&buf[..want])?;
            at += want as u64;
        }
        self.stats.copied += len;
        Ok(())
    }

    /// Writes data of the file being received.
    pub fn file_data(&mut self, data: &[u8]) -> Result<(), ApplyError> {
        let Some(inc) = self.incoming.as_mut() else {
            return Err(ApplyError::BadStream {
                path: String::new(),
                reason: "file data without a file header".into(),
            });
        };
        if inc.written + data.len() as u64 > inc.expected {
            let path = inc.path.clone();
            self.file_abort();
            return Err(ApplyError::BadStream {
                path: path.display(),
                reason: "more data than the announced size".into(),
            });
        }
        if let Err(e) = inc.file.write_all(data) {
            let path = inc.path.clone();
            self.file_abort();
            return Err(io_err("write", &path, e));
        }
        inc.hasher.update(data);
        inc.written += data.len() as u64;
        if inc.written - inc.kicked >= WRITEBACK_EVERY {
            // start writing back what arrived so far (no wait): the fsync
            // at commit then finds most of a large file on disk already,
            // instead of writing all of it after the last byte arrived
            let _ = rustix::fs::fadvise(
                &inc.file,
                inc.kicked,
                std::num::NonZeroU64::new(inc.written - inc.kicked),
                rustix::fs::Advice::DontNeed,
            );
            inc.kicked = inc.written;
        }
        Ok(())
    }

    /// Writes zstd-compressed data of the file being received. It must
    /// decompress to exactly `raw_len` bytes (at most `MAX_DATA`, checked
    /// by the decoder): the output buffer is that size, so a decompression
    /// bomb fails instead of growing memory.
    pub fn file_data_compressed(&mut self, raw_len: u32, data: &[u8]) -> Result<(), ApplyError> {
        let path = self
            .incoming
            .as_ref()
            .map(|i| i.path.display())
            .unwrap_or_default();
        let raw = match zstd::bulk::decompress(data, raw_len as usize) {
            Ok(raw) if raw.len() == raw_len as usize => raw,
            Ok(raw) => {
                self.file_abort();
                return Err(ApplyError::BadStream {
                    path,
                    reason: format!(
                        "compressed data decompresses to {} bytes, not the announced {raw_len}",
                        raw.len()
                    ),
                });
            }
            Err(e) => {
                self.file_abort();
                return Err(ApplyError::BadStream {
                    path,
                    reason: format!("compressed data does not decompress within its announced {raw_len} bytes ({e})"),
                });
            }
        };
        self.file_data(&raw)
    }

    /// Finishes the file being received: checks size and hash, sets mode
    /// and mtime on the staged file and journals its step.
    pub fn file_end(&mut self, hash: &[u8; 32]) -> Result<(), ApplyError> {
        let Some(inc) = self.incoming.take() else {
            return Err(ApplyError::BadStream {
                path: String::new(),
                reason: "file end without a file header".into(),
            });
        };
        let drop_staged = |s: &Self| {
            let _ = s.staging.remove_file(staged_name(inc.staged));
        };
        if inc.written != inc.expected {
            drop_staged(self);
            return Err(ApplyError::BadStream {
                path: inc.path.display(),
                reason: format!(
                    "received {} bytes of an announced {}",
                    inc.written, inc.expected
                ),
            });
        }
        if inc.hasher.finalize().as_bytes() != hash {
            drop_staged(self);
            return Err(ApplyError::BadStream {
                path: inc.path.display(),
                reason: "content does not match its BLAKE3 hash".into(),
            });
        }
        if matches!(inc.step, Message::FileBegin(_)) {
            let res = inc
                .file
                .set_permissions(std::fs::Permissions::from_mode(inc.mode))
                .map_err(|e| io_err("chmod", &inc.path, e))
                .and_then(|_| {
                    inc.file
                        .set_modified(systime(inc.mtime))
                        .map_err(|e| io_err("set mtime", &inc.path, e))
                });
            if let Err(e) = res {
                drop_staged(self);
                return Err(e);
            }
        }
        crash("after-stage-write");
        if let Err(e) = self.journal.push(&inc.step) {
            drop_staged(self);
            return Err(Self::jerr("write", e));
        }
        self.stats.files += 1;
        self.stats.bytes += inc.written;
        let r = self.receiving()?;
        r.files += 1;
        if r.fds.len() < SYNCFS_FROM {
            r.fds.push(inc.file);
        }
        Ok(())
    }

    /// Drops a file in progress (the primary saw it change while reading).
    pub fn file_abort(&mut self) {
        if let Some(inc) = self.incoming.take() {
            let _ = self.staging.remove_file(staged_name(inc.staged));
        }
    }

    /// Makes the batch durable and applies it: staged files fsynced, the
    /// journal committed, the steps run, changed directories and appended
    /// files fsynced. Only after this returns may the batch be saved as
    /// applied and acknowledged (G4); then call [`Applier::finished`].
    pub fn commit(&mut self) -> Result<ApplyStats, ApplyError> {
        self.file_abort();
        let Some(r) = self.receiving.take() else {
            return Err(ApplyError::BadStream {
                path: String::new(),
                reason: "batch end without a batch".into(),
            });
        };
        let stats = std::mem::take(&mut self.stats);
        let synced = if r.files as usize > r.fds.len() {
            rustix::fs::syncfs(
                &open_readable(&self.staging, OsStr::new("."))
                    .map_err(|e| Self::jerr("open staging dir", e))?,
            )
            .map_err(|e| ApplyError::Sync {
                path: format!("{} files staged in this batch", r.files),
                source: e.into(),
            })
        } else {
            r.fds.iter().try_for_each(|f| {
                f.sync_all().map_err(|source| ApplyError::Sync {
                    path: "a staged file".into(),
                    source,
                })
            })
        };
        drop(r.fds);
        if let Err(e) = synced {
            self.journal.abandon_writing();
            self.wipe_staging();
            return Err(e);
        }
        crash("after-stage-sync");
        let c = match self.journal.commit(crash) {
            Ok(c) => c,
            Err(e) => {
                self.wipe_staging();
                return Err(if e.raw_os_error() == Some(28) {
                    Self::jerr("write", e)
                } else {
                    ApplyError::Sync {
                        path: "the redo journal".into(),
                        source: e,
                    }
                });
            }
        };
        crash("after-journal-commit");
        self.pending = true;
        self.journal
            .set_progress(c.nonce, 0)
            .map_err(|e| Self::jerr("write progress", e))?;
        self.run(&c, 0, Tolerant::No)?;
        self.completed = Some(c.nonce);
        self.pending = false;
        self.wipe_staging();
        Ok(stats)
    }

    /// Runs the steps of a committed batch from step `from` on; see
    /// [`Tolerant`] for steps that may have been done before a crash.
    fn run(
        &mut self,
        c: &journal::Committed,
        from: u64,
        tolerant: Tolerant,
    ) -> Result<(), ApplyError> {
        let mut steps = self.journal.steps(c).map_err(|e| Self::jerr("read", e))?;
        let mut idx = 0u64;
        let mut files = 0u32;
        let res = (|| {
            while let Some(step) = steps.next_step().map_err(|e| Self::jerr("read", e))? {
                let file_no = match step {
                    Message::FileBegin(_) | Message::FileAppend(_) | Message::FilePatch(_) => {
                        files += 1;
                        files - 1
                    }
                    _ => 0,
                };
                if idx >= from {
                    let t = match tolerant {
                        Tolerant::No => false,
                        Tolerant::At(i) => i == idx,
                        Tolerant::All => true,
                    };
                    match self.apply_step(&step, file_no, t) {
                        Ok(()) => {}
                        Err(e) if e.unholdable() => {
                            let path = match &e {
                                ApplyError::Io { path, .. } => path.clone(),
                                _ => String::new(),
                            };
                            if matches!(
                                step,
                                Message::FileBegin(_)
                                    | Message::FileAppend(_)
                                    | Message::FilePatch(_)
                            ) {
                                let _ = self.staging.remove_file(staged_name(file_no));
                            }
                            if self.skipped.len() < MAX_SKIPPED_STEPS {
                                self.skipped.push(SkippedStep {
                                    path,
                                    error: e.to_string(),
                                });
                            }
                        }
                        Err(e) => return Err(e),
                    }
                    crash("after-step");
                    self.journal
                        .set_progress(c.nonce, idx + 1)
                        .map_err(|e| Self::jerr("write progress", e))?;
                }
                idx += 1;
            }
            self.sync_changed()
        })();
        if let Err(e) = &res {
            self.cache.clear();
            if !matches!(e, ApplyError::NoSpace { .. }) {
                // The tree is mid-batch and redoing cannot help: a resync
                // (which the primary starts on this error) repairs it. An
                // fsync error is fatal for the batch (G9): a second fsync
                // may succeed on pages the kernel already dropped, so the
                // batch is never finished into a false success. Another I/O
                // error (the tree changed under us, a permission) would
                // only repeat. A full disk is the one error worth waiting
                // out: the batch stays committed and each new session
                // finishes it first, so apply resumes when space frees.
                let _ = self.journal.set_progress(c.nonce, journal::ABANDONED);
                self.pending = false;
                self.set_needs_resync(true)?;
                self.wipe_staging();
            }
        } else if c.info.resync {
            self.set_needs_resync(false)?;
        }
        res
    }

    /// fsyncs appended files and changed directories.
    fn sync_changed(&mut self) -> Result<(), ApplyError> {
        for (p, f) in std::mem::take(&mut self.appended) {
            f.sync_all().map_err(|source| ApplyError::Sync {
                path: p.display(),
                source,
            })?;
        }
        let dirs: Vec<(Vec<u8>, Arc<Dir>)> = self.to_sync.drain().map(|(_, v)| v).collect();
        self.cache.clear();
        for (k, d) in dirs {
            open_readable(&d, OsStr::new("."))
                .and_then(|f| f.sync_all())
                .map_err(|source| ApplyError::Sync {
                    path: String::from_utf8_lossy(&k).into_owned(),
                    source,
                })?;
        }
        crash("after-dir-sync");
        Ok(())
    }

    /// Forgets a batch being received (after an error or a lost session);
    /// a committed, unfinished batch stays for [`Applier::recover`].
    pub fn reset(&mut self) {
        self.reset_receive();
        if !self.pending {
            self.wipe_staging();
        }
        self.cache.clear();
        self.stats = ApplyStats::default();
    }

    fn reset_receive(&mut self) {
        self.file_abort();
        if self.receiving.take().is_some() {
            self.journal.abandon_writing();
        }
    }

    fn wipe_staging(&self) {
        if let Ok(rd) = self.staging.entries() {
            for e in rd.flatten() {
                let _ = self.staging.remove_file(e.file_name());
            }
        }
    }

    // ---- apply phase -------------------------------------------------

    /// The directory holding `p`, walked without following symlinks.
    /// `create`: make missing directories (mode 0755, fixed later by their
    /// own Mkdir). Returns `None` when a parent is missing and `!create`.
    fn parent(&mut self, p: &RelPath, create: bool) -> Result<Option<Arc<Dir>>, ApplyError> {
        let parent = p.parent();
        let key = parent
            .as_ref()
            .map(|x| x.as_bytes().to_vec())
            .unwrap_or_default();
        if let Some(d) = self.cache.get(&key) {
            return Ok(Some(d.dir.clone()));
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
        let cur = Arc::new(cur);
        if let Ok(md) = cur.dir_metadata() {
            use cap_std::fs::MetadataExt;
            self.cache.insert(
                key,
                Cached {
                    dir: cur.clone(),
                    id: (md.dev(), md.ino()),
                },
            );
        }
        Ok(Some(cur))
    }

    fn mark_changed(&mut self, p: &RelPath, dir: &Arc<Dir>) {
        use cap_std::fs::MetadataExt;
        let name = p
            .parent()
            .map(|x| x.as_bytes().to_vec())
            .unwrap_or_default();
        let known = self
            .cache
            .get(&name)
            .filter(|c| Arc::ptr_eq(&c.dir, dir))
            .map(|c| c.id);
        let key = match known {
            Some(id) => id,
            None => match dir.dir_metadata() {
                Ok(md) => (md.dev(), md.ino()),
                // unknown identity: keep it under a key of its own
                Err(_) => (u64::MAX, self.to_sync.len() as u64),
            },
        };
        self.to_sync
            .entry(key)
            .or_insert_with(|| (name, dir.clone()));
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

    /// Runs one journaled step. `tolerant`: the step may already have been
    /// (partly) done before a crash; accept finding its effect.
    fn apply_step(
        &mut self,
        step: &Message,
        file_no: u32,
        tolerant: bool,
    ) -> Result<(), ApplyError> {
        match step {
            Message::Op(op) => self.apply_metadata(op, tolerant),
            Message::FileBegin(h) => self.place(h, file_no, tolerant),
            Message::FileAppend(a) => self.append(a, file_no, tolerant),
            Message::FilePatch(h) => self.patch(h, file_no, tolerant),
            _ => Err(ApplyError::BadStream {
                path: String::new(),
                reason: "journal holds a message that is not a step".into(),
            }),
        }
    }

    fn apply_metadata(&mut self, op: &Op, tolerant: bool) -> Result<(), ApplyError> {
        match op {
            Op::Mkdir { path, mode } => {
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
                self.replace(&dir, &dir, &tmp, path)?;
                self.mark_changed(path, &dir);
            }
            Op::Delete { path } => {
                let Some(dir) = self.parent(path, false)? else {
                    return Ok(());
                };
                if self.remove_entry(&dir, path)? {
                    self.mark_changed(path, &dir);
                }
            }
            Op::Rename { from, to } => {
                let from_dir = self.parent(from, false)?;
                let exists = |d: &Option<Arc<Dir>>, p: &RelPath| -> bool {
                    d.as_ref()
                        .is_some_and(|d| d.symlink_metadata(os(p.file_name())).is_ok())
                };
                if !exists(&from_dir, from) {
                    if tolerant {
                        let to_dir = self.parent(to, false)?;
                        if exists(&to_dir, to) {
                            return Ok(()); // done before the crash
                        }
                    }
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

    /// Renames `tmp` (in `from`) over `path`'s name in `dir`, replacing a
    /// directory there if need be.
    fn replace(
        &mut self,
        from: &Dir,
        dir: &Dir,
        tmp: &[u8],
        path: &RelPath,
    ) -> Result<(), ApplyError> {
        let name = os(path.file_name());
        if let Ok(md) = dir.symlink_metadata(name) {
            if md.is_dir() {
                self.invalidate(path);
                dir.remove_dir_all(name)
                    .map_err(|e| io_err("remove tree", path, e))?;
            }
        }
        from.rename(os(tmp), dir, name).map_err(|e| {
            if e.raw_os_error() == Some(libc::EXDEV) {
                return ApplyError::Io {
                    op: "rename",
                    path: path.display(),
                    source: io::Error::other(
                        "the root spans filesystems (a mount inside the root); ferry replicates one filesystem per root",
                    ),
                };
            }
            io_err("rename", path, e)
        })
    }

    /// Places a staged whole file (G3: readers see the old version or the
    /// new, never a partial one; G4: it was fsynced before the journal).
    fn place(&mut self, h: &FileHeader, n: u32, tolerant: bool) -> Result<(), ApplyError> {
        let name = staged_name(n);
        if tolerant && self.staging.symlink_metadata(&name).is_err() {
            return Ok(()); // placed before the crash
        }
        let dir = self
            .parent(&h.path, true)?
            .ok_or_else(|| inconsistent(&h.path, "no parent"))?;
        // rename first: it replaces a file or a link at once, and fails
        // only where a directory stands in the way (no stat per file)
        match self
            .staging
            .rename(os(name.as_bytes()), &dir, os(h.path.file_name()))
        {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EISDIR) | Some(libc::ENOTEMPTY) | Some(libc::EEXIST)
                ) =>
            {
                let staging = self
                    .staging
                    .try_clone()
                    .map_err(|e| io_err("open staging dir", &h.path, e))?;
                self.replace(&staging, &dir, name.as_bytes(), &h.path)?;
            }
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let staging = self
                    .staging
                    .try_clone()
                    .map_err(|e| io_err("open staging dir", &h.path, e))?;
                self.replace(&staging, &dir, name.as_bytes(), &h.path)?;
            }
            Err(e) => return Err(io_err("rename", &h.path, e)),
        }
        self.mark_changed(&h.path, &dir);
        Ok(())
    }

    /// Extends a file in place with a staged tail.
    fn append(
        &mut self,
        a: &ferry_proto::AppendHeader,
        n: u32,
        tolerant: bool,
    ) -> Result<(), ApplyError> {
        let dir = self
            .parent(&a.path, false)?
            .ok_or_else(|| inconsistent(&a.path, "append to a file whose directory is missing"))?;
        let mut oo = OpenOptions::new();
        oo.write(true).follow(FollowSymlinks::No);
        let file = dir
            .open_with(os(a.path.file_name()), &oo)
            .map_err(|e| {
                inconsistent(
                    &a.path,
                    format!("append to a file that cannot be opened ({e})"),
                )
            })?
            .into_std();
        let md = file.metadata().map_err(|e| io_err("stat", &a.path, e))?;
        let mtime = (
            std::os::unix::fs::MetadataExt::mtime(&md),
            std::os::unix::fs::MetadataExt::mtime_nsec(&md),
        );
        let base_ok =
            md.len() == a.offset && mtime == (a.prev_mtime.secs, a.prev_mtime.nanos as i64);
        let redo_ok = tolerant && md.len() >= a.offset && md.len() <= a.size;
        if !md.is_file() || !(base_ok || redo_ok) {
            return Err(inconsistent(
                &a.path,
                "the replica's file is not the version the append extends",
            ));
        }
        let mut src = self
            .staging
            .open(staged_name(n))
            .map_err(|e| io_err("open staged tail", &a.path, e))?
            .into_std();
        let mut buf = vec![0u8; 256 << 10];
        let mut at = a.offset;
        loop {
            let k = src
                .read(&mut buf)
                .map_err(|e| io_err("read staged tail", &a.path, e))?;
            if k == 0 {
                break;
            }
            std::os::unix::fs::FileExt::write_all_at(&file, &buf[..k], at)
                .map_err(|e| io_err("write", &a.path, e))?;
            at += k as u64;
        }
        if at != a.size {
            return Err(ApplyError::Io {
                op: "append",
                path: a.path.display(),
                source: io::Error::other("staged tail has the wrong length"),
            });
        }
        file.set_permissions(std::fs::Permissions::from_mode(a.mode))
            .map_err(|e| io_err("chmod", &a.path, e))?;
        file.set_modified(systime(a.mtime))
            .map_err(|e| io_err("set mtime", &a.path, e))?;
        self.appended.push((a.path.clone(), file));
        Ok(())
    }
}

impl Applier {
    /// Rewrites ranges of a file in place from a staged file holding their
    /// new bytes back to back, then sets its size, mode and mtime. Every
    /// write is of final bytes at a fixed offset, so running it again after
    /// a crash (tolerant) gives the same file.
    fn patch(
        &mut self,
        h: &ferry_proto::PatchHeader,
        n: u32,
        tolerant: bool,
    ) -> Result<(), ApplyError> {
        let dir = self
            .parent(&h.path, false)?
            .ok_or_else(|| inconsistent(&h.path, "patch of a file whose directory is missing"))?;
        let mut oo = OpenOptions::new();
        oo.write(true).follow(FollowSymlinks::No);
        let file = dir
            .open_with(os(h.path.file_name()), &oo)
            .map_err(|e| {
                inconsistent(
                    &h.path,
                    format!("patch of a file that cannot be opened ({e})"),
                )
            })?
            .into_std();
        let md = file.metadata().map_err(|e| io_err("stat", &h.path, e))?;
        let mtime = (
            std::os::unix::fs::MetadataExt::mtime(&md),
            std::os::unix::fs::MetadataExt::mtime_nsec(&md),
        );
        let base_ok =
            md.len() == h.prev_size && mtime == (h.prev_mtime.secs, h.prev_mtime.nanos as i64);
        if !md.is_file() || !(base_ok || tolerant) {
            return Err(inconsistent(
                &h.path,
                "the replica's file is not the version the patch rewrites",
            ));
        }
        let src = self
            .staging
            .open(staged_name(n))
            .map_err(|e| io_err("open staged patch", &h.path, e))?
            .into_std();
        let mut buf = vec![0u8; 256 << 10];
        let mut from = 0u64;
        for &(off, len) in &h.ranges {
            let mut done = 0u64;
            while done < len {
                let k = ((len - done) as usize).min(buf.len());
                std::os::unix::fs::FileExt::read_exact_at(&src, &mut buf[..k], from + done)
                    .map_err(|e| io_err("read staged patch", &h.path, e))?;
                std::os::unix::fs::FileExt::write_all_at(&file, &buf[..k], off + done)
                    .map_err(|e| io_err("write", &h.path, e))?;
                done += k as u64;
            }
            from += len;
            crash("mid-patch");
        }
        file.set_len(h.size)
            .map_err(|e| io_err("truncate", &h.path, e))?;
        file.set_permissions(std::fs::Permissions::from_mode(h.mode))
            .map_err(|e| io_err("chmod", &h.path, e))?;
        file.set_modified(systime(h.mtime))
            .map_err(|e| io_err("set mtime", &h.path, e))?;
        self.appended.push((h.path.clone(), file));
        Ok(())
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
/// The staging dir is the journal's: [`Applier::recover`] handles it.
pub fn clean_temp_files(root: &Path) -> io::Result<u64> {
    // through directory handles: a tree of any depth or path length; a
    // directory that cannot be opened is passed over (its temp files, if
    // any, stay until it can), never a reason not to start
    let mut n = 0;
    let mut stack = vec![(
        Dir::open_ambient_dir(root, cap_std::ambient_authority())?,
        true,
    )];
    while let Some((d, top)) = stack.pop() {
        let Ok(entries) = d.entries() else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                if top && name == STAGING_DIR {
                    continue;
                }
                if let Ok(sub) = d.open_dir_nofollow(&name) {
                    stack.push((sub, false));
                }
            } else if name.as_bytes().starts_with(TEMP_PREFIX) {
                d.remove_file(&name)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
fn walk(root: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                if d == root && e.file_name() == STAGING_DIR {
                    continue;
                }
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
