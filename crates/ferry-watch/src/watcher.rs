//! The notify driver: kernel events in, [`Change`]s out.
//!
//! notify reports a rename as `From` then `To` (paired by a cookie, then a
//! `Both`). The [`Translator`] pairs them itself: a `From` waits until its
//! `To` arrives (a move inside the root: one rename) or until the batcher
//! flushes it (a move out of the root: a removal).

use crate::exclude::Excludes;
use ferry_core::Change;
use ferry_proto::RelPath;
use notify::event::{EventKind, ModifyKind, RenameMode};
use notify::{Config, RecommendedWatcher, RecursiveMode, Watcher as _};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Why the watcher could not start or keep going.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("inotify watch limit reached while watching {root} (one watch per directory); raise it with `sysctl fs.inotify.max_user_watches=524288` (or exclude large trees)")]
    MaxWatches { root: PathBuf },
    #[error("no inotify instance available: the limit fs.inotify.max_user_instances is reached (or the process ran out of file descriptors); raise it with `sysctl fs.inotify.max_user_instances=512` (each ferry uses one)")]
    MaxInstances,
    #[error("cannot watch {root}: {reason}")]
    Other { root: PathBuf, reason: String },
}

/// A watcher event stripped of notify's types.
#[derive(Debug, Clone)]
pub enum RawEvent {
    Create(PathBuf),
    Modify(PathBuf),
    Remove(PathBuf),
    MovedFrom(PathBuf, usize),
    MovedTo(PathBuf, usize),
    /// The kernel queue overflowed: events were lost.
    Overflow,
    /// The watcher failed (e.g. the watch limit was reached for a new dir).
    /// `limit`: the inotify watch limit; `path`: where, when notify knows.
    Error {
        msg: String,
        limit: bool,
        path: Option<PathBuf>,
    },
}

/// Watches a root recursively; events go to a bounded channel. When the
/// channel is full the notify thread blocks, the kernel queue fills and
/// overflows, and the overflow becomes a rescan: backpressure never loses
/// a change silently.
pub struct Watcher {
    _inner: RecommendedWatcher,
}

impl Watcher {
    pub fn start(
        root: &Path,
        tx: tokio::sync::mpsc::Sender<RawEvent>,
    ) -> Result<Watcher, WatchError> {
        let handler = move |res: notify::Result<notify::Event>| {
            for ev in convert(res) {
                if tx.blocking_send(ev).is_err() {
                    return;
                }
            }
        };
        let mut w = RecommendedWatcher::new(handler, Config::default().with_follow_symlinks(false))
            .map_err(|e| map_err(root, e))?;
        match w.watch(root, RecursiveMode::Recursive) {
            Ok(()) => {}
            // one directory inotify may not watch (unreadable: a watch needs
            // read permission) never stops the node: notify gives up on the
            // rest of its walk there, so every other directory is watched
            // on its own; the scanner reports the unreadable ones
            Err(e) if one_entry(root, &e) => watch_around(&mut w, root)?,
            Err(e) => return Err(map_err(root, e)),
        }
        Ok(Watcher { _inner: w })
    }
}

/// True when a watch failed because of one entry below the root (not a
/// limit, not the root itself).
fn one_entry(root: &Path, e: &notify::Error) -> bool {
    let entry = e.paths.first().is_some_and(|p| p != root);
    let io = match &e.kind {
        notify::ErrorKind::Io(io) => matches!(
            io.raw_os_error(),
            Some(libc::EACCES | libc::EPERM | libc::ENAMETOOLONG | libc::ENOENT | libc::ENOTDIR)
        ),
        notify::ErrorKind::PathNotFound => true,
        _ => false,
    };
    entry && io
}

/// Watches every directory below `root` that can be watched, each
/// recursively (so directories created later are watched by notify), a
/// subtree whose watch succeeded as a whole covering its descendants.
fn watch_around(w: &mut RecommendedWatcher, root: &Path) -> Result<(), WatchError> {
    let excludes = crate::Excludes::new(&[], None).map_err(|e| WatchError::Other {
        root: root.to_owned(),
        reason: e.to_string(),
    })?;
    let mut all = Vec::new();
    let mut skipped = Vec::new();
    crate::scan::scan_tree(root, None, &excludes, &mut all, &mut skipped).map_err(|e| {
        WatchError::Other {
            root: root.to_owned(),
            reason: e.to_string(),
        }
    })?;
    // the root itself is watched (recursively) already: notify's walk
    // starts with it, and its failure was about an entry below
    let mut covered: Option<ferry_proto::RelPath> = None;
    for s in all {
        if s.entry.kind != ferry_proto::EntryKind::Dir {
            continue;
        }
        if covered
            .as_ref()
            .is_some_and(|c| s.entry.path.starts_with(c))
        {
            continue;
        }
        let dir = crate::scan::abs(root, &s.entry.path);
        match w.watch(&dir, RecursiveMode::Recursive) {
            Ok(()) => covered = Some(s.entry.path.clone()),
            Err(e) if one_entry(root, &e) => {}
            Err(e) => return Err(map_err(root, e)),
        }
    }
    Ok(())
}

fn map_err(root: &Path, e: notify::Error) -> WatchError {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => WatchError::MaxWatches {
            root: root.to_owned(),
        },
        notify::ErrorKind::Io(io) if io.raw_os_error() == Some(libc::EMFILE) => {
            WatchError::MaxInstances
        }
        _ => WatchError::Other {
            root: root.to_owned(),
            reason: e.to_string(),
        },
    }
}

fn convert(res: notify::Result<notify::Event>) -> Vec<RawEvent> {
    let ev = match res {
        Ok(ev) => ev,
        Err(e) => {
            let limit = matches!(e.kind, notify::ErrorKind::MaxFilesWatch);
            return vec![RawEvent::Error {
                msg: e.to_string(),
                limit,
                path: e.paths.first().cloned(),
            }];
        }
    };
    if ev.need_rescan() {
        return vec![RawEvent::Overflow];
    }
    let first = ev.paths.first().cloned();
    let Some(p) = first else { return Vec::new() };
    match ev.kind {
        EventKind::Create(_) => vec![RawEvent::Create(p)],
        EventKind::Remove(_) => vec![RawEvent::Remove(p)],
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) => match ev.attrs.tracker() {
            Some(t) => vec![RawEvent::MovedFrom(p, t)],
            None => Vec::new(), // MOVE_SELF of a watched dir: the parent reports it
        },
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => match ev.attrs.tracker() {
            Some(t) => vec![RawEvent::MovedTo(p, t)],
            None => vec![RawEvent::Create(p)],
        },
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => Vec::new(),
        EventKind::Modify(_) => vec![RawEvent::Modify(p)],
        EventKind::Access(notify::event::AccessKind::Close(notify::event::AccessMode::Write)) => {
            vec![RawEvent::Modify(p)]
        }
        _ => Vec::new(),
    }
}

/// Turns [`RawEvent`]s into [`Change`]s relative to the root, dropping
/// excluded paths and pairing renames.
pub struct Translator {
    root: PathBuf,
    excludes: Excludes,
    pending_from: Option<(RelPath, usize)>,
    /// Paths the watcher reported that are not valid relative paths.
    pub invalid: u64,
}

impl Translator {
    pub fn new(root: PathBuf, excludes: Excludes) -> Self {
        Translator {
            root,
            excludes,
            pending_from: None,
            invalid: 0,
        }
    }

    fn rel(&mut self, p: &Path) -> Option<RelPath> {
        let r = p.strip_prefix(&self.root).ok()?;
        if r.as_os_str().is_empty() {
            return None; // the root itself
        }
        match RelPath::new(r.as_os_str().as_bytes().to_vec()) {
            Ok(r) => Some(r),
            Err(_) => {
                self.invalid += 1;
                None
            }
        }
    }

    /// `p` relative to the root, unless it is the root, outside it or excluded.
    pub fn relative(&mut self, p: &Path) -> Option<RelPath> {
        self.rel(p).filter(|r| !self.excluded(r))
    }

    fn excluded(&self, p: &RelPath) -> bool {
        // is_dir unknown here; directory-only patterns are applied by the scanner
        self.excludes.is_excluded(p, false)
    }

    /// Folds one event in, appending resulting changes to `out`.
    pub fn push(&mut self, ev: RawEvent, out: &mut Vec<Change>) {
        if !matches!(ev, RawEvent::MovedTo(..)) {
            self.flush(out);
        }
        match ev {
            RawEvent::Create(p) => {
                if let Some(r) = self.rel(&p).filter(|r| !self.excluded(r)) {
                    out.push(Change::Created(r));
                }
            }
            RawEvent::Modify(p) => {
                if let Some(r) = self.rel(&p).filter(|r| !self.excluded(r)) {
                    out.push(Change::Touched(r));
                }
            }
            RawEvent::Remove(p) => {
                if let Some(r) = self.rel(&p).filter(|r| !self.excluded(r)) {
                    out.push(Change::Removed(r));
                }
            }
            RawEvent::MovedFrom(p, t) => {
                if let Some(r) = self.rel(&p) {
                    self.pending_from = Some((r, t));
                }
            }
            RawEvent::MovedTo(p, t) => {
                let to = self.rel(&p);
                let from = match self.pending_from.take() {
                    Some((f, ft)) if ft == t => Some(f),
                    other => {
                        self.pending_from = other;
                        self.flush(out);
                        None
                    }
                };
                match (from, to) {
                    (Some(f), Some(t)) => match (self.excluded(&f), self.excluded(&t)) {
                        (false, false) => out.push(Change::Renamed { from: f, to: t }),
                        (false, true) => out.push(Change::Removed(f)),
                        (true, false) => out.push(Change::Created(t)),
                        (true, true) => {}
                    },
                    (Some(f), None) => {
                        if !self.excluded(&f) {
                            out.push(Change::Removed(f))
                        }
                    }
                    (None, Some(t)) => {
                        if !self.excluded(&t) {
                            out.push(Change::Created(t))
                        }
                    }
                    (None, None) => {}
                }
            }
            RawEvent::Overflow => out.push(Change::RescanAll),
            // An error that names a path: that subtree is re-read (the
            // batcher also verifies it on every peer); without a path,
            // anything may have been lost.
            RawEvent::Error { path: Some(p), .. } => match self.rel(&p) {
                Some(r) if !self.excluded(&r) => out.push(Change::Touched(r)),
                Some(_) => {}
                None if p == self.root => out.push(Change::RescanAll),
                None => {}
            },
            RawEvent::Error { path: None, .. } => out.push(Change::RescanAll),
        }
    }

    /// Emits a pending move-out as a removal. Call before sealing.
    pub fn flush(&mut self, out: &mut Vec<Change>) {
        if let Some((f, _)) = self.pending_from.take() {
            if !self.excluded(&f) {
                out.push(Change::Removed(f));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Real inotify: a file write, a rename and a tree moved in arrive as
    /// the changes the coalescer expects.
    #[tokio::test]
    async fn real_events() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(outside.join("t")).unwrap();
        std::fs::write(outside.join("t/f"), b"1").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let _w = Watcher::start(&root, tx).unwrap();
        std::fs::write(root.join("a"), b"x").unwrap();
        std::fs::rename(root.join("a"), root.join("b")).unwrap();
        std::fs::rename(outside.join("t"), root.join("t")).unwrap();
        let ex = Excludes::new(&[], None).unwrap();
        let mut tr = Translator::new(root.clone(), ex);
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while out
            .iter()
            .filter(|c| matches!(c, Change::Renamed { .. } | Change::Created(_)))
            .count()
            < 3
        {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(ev)) => tr.push(ev, &mut out),
                _ => break,
            }
        }
        tr.flush(&mut out);
        let r = |s: &str| RelPath::new(s).unwrap();
        assert!(out.contains(&Change::Created(r("a"))), "{out:?}");
        assert!(
            out.contains(&Change::Renamed {
                from: r("a"),
                to: r("b")
            }),
            "{out:?}"
        );
        assert!(out.contains(&Change::Created(r("t"))), "{out:?}");
    }
}
