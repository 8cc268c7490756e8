//! The primary: watch → coalesce → seal → per-peer senders.
//!
//! A sealed batch records, for every dirty path, its state at seal time
//! (kind, mode, mtime, size and the file's identity: dev and inode). File
//! content is read when the batch is sent, with the G3 check: the inode must
//! be the sealed one, and size, mtime and ctime must be the same before and
//! after the read, or the read is retried; a file that vanished keeps the
//! replica's older (real) version and is remembered, so a later rename of it
//! is sent as content instead of a move.

use super::{file_index, now_ns, transfer, Shared};
use crate::config::PeerSpec;
use crate::events::*;
use anyhow::{anyhow, bail, Context};
use ferry_core::chunk::Chunk;
use ferry_core::diff::{diff, Action};
use ferry_core::fence::{resume_point, Resume};
use ferry_core::{BatchTimer, Coalescer, EntryKind, RelPath};
use ferry_net::{MsgRecv, MsgSend, Transport};
use ferry_proto::{BatchHeader, Entry, FileHeader, Message, Op, RefuseCode, MAX_DATA};
use ferry_watch::{scan, Excludes, RawEvent, Scanned, Skip, Translator, Watcher};
use std::collections::{HashSet, VecDeque};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Files smaller than this are always sent whole (cheap, and not worth
/// remembering).
const APPEND_MIN: u64 = 64 << 10;
/// Files remembered per peer for the append fast path.
const SENT_CAP: usize = 4096;

/// Changed files at least this large are diffed chunk by chunk against the
/// version the peer holds, and patched in place on the replica when at
/// least half of the file is unchanged (docs/ARCHITECTURE.md, "Small edits
/// in large files"). Smaller files are rebuilt from reused chunks instead
/// (atomic replace); pure appends are patched at any size.
const PATCH_MIN: u64 = 4 << 20;
/// Chunks remembered per peer for reuse across files (~56 bytes each).
const CHUNK_DIR_CAP: usize = 256 << 10;
/// Chunks held in the chunk lists of what a peer holds (36 bytes each,
/// 18 MiB): past it, the lists of other files are dropped (those files are
/// then sent whole, or rebuilt from the chunk directory, at their next change).
const SENT_CHUNKS_CAP: usize = 512 << 10;

/// What a peer holds of a file we sent it.
#[derive(Clone)]
struct SentFile {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: ferry_proto::Mtime,
    ctime: (i64, i64),
    /// Its content-defined chunks.
    chunks: Option<Arc<[Chunk]>>,
    /// Names this version for [`ChunkLoc`].
    version: u64,
    /// The batch that sent it: the peer holds it from the next batch on.
    batch: u64,
}

/// Where the peer holds a chunk: in version `version` of file `path`.
struct ChunkLoc {
    path: Arc<RelPath>,
    version: u64,
    offset: u64,
    len: u32,
}

fn chunk_key(h: &[u8; 32]) -> u128 {
    u128::from_le_bytes(h[..16].try_into().expect("16 bytes"))
}

/// Longest wait for the next manifest entry from a peer.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest manifest accepted from a peer (entries).
const MAX_MANIFEST: usize = 64 << 20;

/// One entry of a sealed batch.
#[derive(Debug, Clone)]
pub struct Item {
    pub path: RelPath,
    /// `None`: absent at seal time.
    pub state: Option<Scanned>,
    /// The replica drops what it holds at `path` first (a new subtree).
    pub replace: bool,
}

/// A sealed batch.
#[derive(Debug)]
pub struct SealedBatch {
    pub epoch: u64,
    pub seq: u64,
    pub sealed_at_ns: u64,
    pub sealed_at: Instant,
    pub exact: bool,
    /// Events were lost: peers resync to this batch instead.
    pub resync_all: bool,
    /// That resync is the periodic safety net (not counted as a resync:
    /// `ferry_resyncs_total` counts recoveries, the alert watches it).
    pub periodic: bool,
    pub renames: Vec<(RelPath, RelPath)>,
    pub items: Vec<Item>,
    /// Directories moved in this batch. notify re-watches a moved tree
    /// after the fact and can lose or misname events inside it for a moment,
    /// so each peer verifies these subtrees by manifest once caught up.
    pub moved_dirs: Vec<RelPath>,
}

impl SealedBatch {
    /// What the batch weighs in the log (at least 1).
    fn weight(&self) -> usize {
        1 + self.items.len() + self.renames.len() + self.moved_dirs.len()
    }
}

/// Sealed batches kept for peers that are behind.
pub struct Log {
    batches: VecDeque<Arc<SealedBatch>>,
    cap: usize,
    /// Items (renames and entries) held in all, and the most allowed.
    items: usize,
    max_items: usize,
    last_seq: u64,
    /// The batcher has stopped (shutdown): `last_seq` is final.
    closed: bool,
}

impl Log {
    fn first_seq(&self) -> u64 {
        self.batches
            .front()
            .map(|b| b.seq)
            .unwrap_or(self.last_seq + 1)
    }
    fn get(&self, seq: u64) -> Option<Arc<SealedBatch>> {
        let first = self.batches.front()?.seq;
        let i = seq.checked_sub(first)? as usize;
        self.batches.get(i).cloned()
    }
    /// Appends a batch; the oldest go once there are more than `cap`
    /// batches or `max_items` items in all (a peer that still needed them
    /// catches up from the file index, or by manifest).
    fn push(&mut self, b: Arc<SealedBatch>) {
        self.last_seq = b.seq;
        self.items += b.weight();
        self.batches.push_back(b);
        while self.batches.len() > self.cap
            || (self.items > self.max_items && self.batches.len() > 1)
        {
            if let Some(old) = self.batches.pop_front() {
                self.items -= old.weight();
            }
        }
    }
}

struct Ctx {
    shared: Arc<Shared>,
    /// The root, held open: file content is opened beneath it (openat2
    /// RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), so a parent swapped for a
    /// symlink can never make the primary read outside its root.
    root_fd: std::fs::File,
    log: Mutex<Log>,
    seq_tx: watch::Sender<u64>,
    excludes: Excludes,
    /// The durable file index (`None`: it could not be opened).
    index: Option<ferry_store::Index>,
    /// What the index vouches for; `None` while it vouches for nothing
    /// (never built, another epoch, or failed).
    index_meta: Mutex<Option<ferry_store::IndexMeta>>,
    /// Each peer's last acknowledged seq, recorded in the index with each
    /// batch (tombstones every peer is past are dropped).
    acked: Mutex<std::collections::HashMap<String, u64>>,
    /// Content hashes senders computed, written with the next batch.
    hashes: Mutex<Vec<ferry_store::IndexOp>>,
    /// Set at start when the machine rebooted since the index was last used
    /// (or the index cannot tell): files whose ctime is at or after this may
    /// hold other bytes than their size and mtime suggest, so each peer's
    /// first whole resync ships them even when they look the same there.
    suspect_from: std::sync::OnceLock<(i64, i64)>,
}

/// How often each peer's RPO (`ferry_peer_rpo_seconds`) is brought up to date.
const RPO_EVERY: Duration = Duration::from_millis(500);

/// Keeps each peer's RPO current: the age of the oldest sealed batch it has
/// not acknowledged (seal time from the log; when the log no longer holds
/// that batch, the oldest one it holds, a lower bound).
async fn track_rpo(ctx: Arc<Ctx>) {
    loop {
        update_rpo(&ctx, now_ns());
        tokio::time::sleep(RPO_EVERY).await;
    }
}

fn update_rpo(ctx: &Ctx, now: u64) {
    let acked = ctx.acked.lock().expect("acked").clone();
    let fallback = ctx.shared.node_state().sealed_at_ns;
    let rpos: Vec<(String, f64)> = {
        let log = ctx.log.lock().expect("log");
        ctx.shared
            .cfg
            .peers
            .iter()
            .map(|p| {
                let a = acked.get(&p.name).copied().unwrap_or(0);
                let rpo = if a >= log.last_seq {
                    0.0
                } else {
                    let sealed = log
                        .get(a + 1)
                        .or_else(|| log.batches.front().cloned())
                        .map(|b| b.sealed_at_ns)
                        .unwrap_or(fallback);
                    now.saturating_sub(sealed) as f64 / 1e9
                };
                (p.name.clone(), rpo)
            })
            .collect()
    };
    for (name, rpo) in &rpos {
        ctx.shared
            .metrics
            .peer_rpo
            .with_label_values(&[name])
            .set(*rpo);
    }
    ctx.shared.set_status(|s| {
        for p in s.peers.iter_mut() {
            if let Some((_, r)) = rpos.iter().find(|(n, _)| *n == p.name) {
                p.rpo_s = *r;
            }
        }
    });
}

/// Hashes queued for the index at most (the rest are simply not recorded).
const HASHES_CAP: usize = 65_536;

impl Ctx {
    /// The index vouches for what a peer acked at (`epoch`, `seq`) lacks.
    fn index_covers(&self, epoch: u64, seq: u64) -> bool {
        let Some(ix) = &self.index else { return false };
        if self.index_meta.lock().expect("index meta").is_none() {
            return false;
        }
        // read afresh: the floor rises as tombstones are dropped
        match tokio::task::block_in_place(|| ix.meta()) {
            Ok(Some(m)) => m.epoch == epoch && seq >= m.base && seq >= m.floor && seq > 0,
            _ => false,
        }
    }

    /// Writes to the index; on failure the index stops vouching (peers fall
    /// back to manifest resyncs, the next start rebuilds it).
    fn index_write(
        &self,
        f: impl FnOnce(&ferry_store::Index) -> Result<(), ferry_store::StoreError>,
    ) {
        let Some(ix) = &self.index else { return };
        if self.index_meta.lock().expect("index meta").is_none() {
            return;
        }
        if let Err(e) = tokio::task::block_in_place(|| f(ix)) {
            self.shared.metrics.error("index");
            tracing::error!(error = %e, "The file index failed; peers resync by manifest until the next start rebuilds it.");
            *self.index_meta.lock().expect("index meta") = None;
            let _ = ix.invalidate();
        }
    }

    fn peers_acked(&self, epoch: u64) -> Vec<(String, u64, u64)> {
        let acked = self.acked.lock().expect("acked");
        self.shared
            .cfg
            .peers
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    epoch,
                    acked.get(&p.name).copied().unwrap_or(0),
                )
            })
            .collect()
    }
}

pub async fn start(
    shared: Arc<Shared>,
    transport: Arc<Transport>,
    shutdown: watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
    services: &mut tokio::task::JoinSet<()>,
) -> anyhow::Result<()> {
    let cfg = &shared.cfg;
    let excludes =
        Excludes::new(&cfg.excludes, cfg.state_rel.clone())?.with_safe_links(cfg.safe_links);
    let st = shared.node_state();
    // The file index: what the root held as of the batches sealed, so a
    // restart ships only what changed and a peer behind catches up without
    // a manifest. It vouches only for this epoch.
    let index = match ferry_store::Index::open(&cfg.state_dir) {
        Ok(ix) => Some(ix),
        Err(e) => {
            shared.metrics.error("index");
            tracing::error!(error = %e, "The file index cannot be opened; every restart resyncs peers by manifest.");
            None
        }
    };
    // It vouches only for this epoch, and only if it holds every batch
    // sealed (a failed write, e.g. on a full disk, leaves it behind).
    let index_meta = index
        .as_ref()
        .and_then(|ix| ix.meta().ok().flatten())
        .filter(|m| m.epoch == st.epoch && m.seq == st.seq);
    let st = if index.is_some() && index_meta.is_none() {
        // The index will be built (by the batcher, before its first batch)
        // as batch S+1, an empty one sealed now, before any peer connects:
        // every peer resyncs by manifest to it or later, so what a peer
        // acked before this start (S or less) is never taken as covered.
        let mut st = st;
        st.seq += 1;
        st.sealed_at_ns = now_ns();
        shared.save_state(st)?;
        st
    } else {
        st
    };
    let (seq_tx, _) = watch::channel(st.seq);
    let acked = index
        .as_ref()
        .and_then(|ix| ix.peers().ok())
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, e, _)| *e == st.epoch)
        .map(|(n, _, s)| (n, s))
        .collect();
    let root_fd = std::fs::File::open(&cfg.root)
        .map_err(|e| anyhow!("cannot open root {}: {e}", cfg.root.display()))?;
    let ctx = Arc::new(Ctx {
        root_fd,
        shared: shared.clone(),
        log: Mutex::new(Log {
            batches: VecDeque::new(),
            cap: cfg.log_capacity,
            items: 0,
            max_items: cfg.log_max_items,
            last_seq: st.seq,
            closed: false,
        }),
        seq_tx,
        excludes,
        index,
        index_meta: Mutex::new(index_meta),
        acked: Mutex::new(acked),
        hashes: Mutex::new(Vec::new()),
        suspect_from: std::sync::OnceLock::new(),
    });
    shared.metrics.sealed_seq.set(st.seq as i64);
    shared.set_status(|s| s.sealed_seq = st.seq);
    let (tx, rx) = mpsc::channel(8192);
    let watcher = Watcher::start(&cfg.root, tx).map_err(|e| {
        shared.metrics.error("watch");
        anyhow!(e)
    })?;
    {
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let _keep = watcher;
            if let Err(e) = batcher(&ctx, rx, shutdown).await {
                tracing::error!(error = %e, "the batcher stopped; no further changes are shipped");
                ctx.shared.metrics.error("seal");
            }
            ctx.log.lock().expect("log").closed = true;
            ctx.seq_tx.send_modify(|_| {});
        });
    }
    // A transport in both roles: only the listed peers may connect, and a
    // primary refuses batches (a peer that thinks it is primary is told so).
    // A peer that connects to us restarted (a replica says hello when it
    // starts): its old session here is dead, so redial at once.
    let wakers: Arc<std::collections::HashMap<String, Arc<super::Wake>>> = Arc::new(
        shared
            .cfg
            .peers
            .iter()
            .map(|p| (p.name.clone(), Arc::new(super::Wake::default())))
            .collect(),
    );
    services.spawn(track_rpo(ctx.clone()));
    {
        let transport = transport.clone();
        let shared = shared.clone();
        let wakers = wakers.clone();
        services.spawn(async move {
            super::replica::refuse_as_primary(shared, transport, wakers).await
        });
    }
    for p in shared.cfg.peers.clone() {
        let ctx = ctx.clone();
        let transport = transport.clone();
        let shutdown = shutdown.clone();
        let wake = wakers.get(&p.name).cloned().unwrap_or_default();
        shared
            .metrics
            .peer_connected
            .with_label_values(&[&p.name])
            .set(0);
        let span = tracing::info_span!("peer", peer = %p.name);
        tasks.spawn(tracing::Instrument::instrument(
            async move { peer_loop(ctx, transport, p, shutdown, wake).await },
            span,
        ));
    }
    shared.ready.store(true, Ordering::Relaxed);
    Ok(())
}

/// How long after sealing a new directory it is looked at again: notify
/// adds its watch right after delivering its creation, so by then the watch
/// exists and what happened inside before it is found (see
/// [`scan::changed_since`]).
const RECHECK_DELAY: Duration = Duration::from_millis(250);
/// New-directory rechecks waiting at most; past this the oldest runs at once.
const RECHECK_CAP: usize = 256;
/// Events queued between notify and the batcher above which a recheck waits:
/// notify's thread may be blocked on the queue and not have added the watch.
const RECHECK_QUEUE_CALM: usize = 1024;

/// On shutdown, events are taken until none came for this long...
const SHUTDOWN_DRAIN_QUIET: Duration = Duration::from_millis(100);
/// ...or for this long at most.
const SHUTDOWN_DRAIN_MAX: Duration = Duration::from_secs(2);

/// What the batcher keeps between events.
struct BatchState {
    tr: Translator,
    co: Coalescer,
    timer: BatchTimer,
    changes: Vec<ferry_core::Change>,
    /// Subtrees to verify on every peer by manifest with the next batch (a
    /// watcher error named them).
    verify: Vec<RelPath>,
    /// The inotify watch limit was hit: some directories are not watched.
    watch_limited: bool,
    /// The batch being built carries the periodic rescan.
    periodic: bool,
}

impl BatchState {
    fn fold(&mut self, m: &crate::telemetry::Metrics, ev: RawEvent) {
        match &ev {
            RawEvent::Overflow => WatchOverflow.emit(m),
            RawEvent::Error { msg, limit, path } => {
                let rel = path.as_deref().and_then(|p| self.tr.relative(p));
                WatchFailed {
                    error: msg,
                    limit: *limit,
                    path: rel.as_ref(),
                }
                .emit(m);
                self.watch_limited |= *limit;
                if let Some(r) = rel {
                    self.verify.push(r);
                }
            }
            _ => {}
        }
        self.tr.push(ev, &mut self.changes);
        for c in self.changes.drain(..) {
            self.co.push(c);
        }
        if !self.co.is_empty() {
            self.timer.on_change(Instant::now());
        }
    }

    fn push(&mut self, c: ferry_core::Change) {
        self.co.push(c);
        self.timer.on_change(Instant::now());
    }

    fn flush(&mut self) {
        let mut rest = Vec::new();
        self.tr.flush(&mut rest);
        for c in rest {
            self.co.push(c);
        }
    }
}

/// Quiet time after a directory move before the settle rescan.
const SETTLE_QUIET: Duration = Duration::from_secs(2);
/// At most one settle rescan per this interval (a workload that keeps moving
/// directories gets one every 15 s, not one per pause).
const SETTLE_GAP: Duration = Duration::from_secs(15);

async fn batcher(
    ctx: &Ctx,
    mut rx: mpsc::Receiver<RawEvent>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let cfg = &ctx.shared.cfg;
    let m = &ctx.shared.metrics;
    let mut b = BatchState {
        tr: Translator::new(cfg.root.clone(), ctx.excludes.clone()),
        co: Coalescer::new(),
        timer: BatchTimer::new(cfg.batch_idle, cfg.batch_max_delay),
        changes: Vec::new(),
        verify: Vec::new(),
        watch_limited: false,
        periodic: false,
    };
    // The safety net: a periodic full rescan (a manifest diff with every
    // peer) finds what the watcher missed and repairs replicas changed
    // behind ferry's back. Forced on (at the default interval) once the
    // inotify watch limit leaves directories unwatched.
    let mut rescan_every = cfg.rescan_interval;
    let mut next_rescan = rescan_every.map(|d| Instant::now() + d);
    let mut rechecks: VecDeque<(Instant, u32, Arc<SealedBatch>)> = VecDeque::new();
    // After directories moved, one full rescan once writes settle: notify
    // can lose the event of a directory moved out of a tree it is still
    // re-watching, which no targeted check sees (known G1 gap otherwise
    // closed only by the periodic rescan).
    let mut settle: Option<Instant> = None;
    let mut last_settle: Option<Instant> = None;
    let settle_at = |last: Option<Instant>| {
        let quiet = Instant::now() + SETTLE_QUIET;
        match last {
            Some(l) => quiet.max(l + SETTLE_GAP),
            None => quiet,
        }
    };
    for c in index_at_start(ctx).await? {
        b.push(c);
    }
    let mut next_flush = Instant::now() + INDEX_FLUSH;
    loop {
        if b.watch_limited && rescan_every.is_none() {
            let d = crate::config::DEFAULT_RESCAN_INTERVAL;
            tracing::warn!(interval_s = d.as_secs(), "Directories are left unwatched (inotify watch limit); a periodic rescan finds their changes although --rescan-interval is 0.");
            rescan_every = Some(d);
            next_rescan = Some(Instant::now() + d);
        }
        let deadline = b.timer.deadline();
        let recheck_at = rechecks.front().map(|r| r.0);
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                if settle.is_some() {
                    settle = Some(settle_at(last_settle));
                }
                b.fold(m, ev);
                // bounded, so a flood of events cannot hold off sealing
                for _ in 0..4096 {
                    let Ok(ev) = rx.try_recv() else { break };
                    b.fold(m, ev);
                }
            }
            _ = sleep_until(deadline), if deadline.is_some() => {
                b.flush();
                let periodic = std::mem::take(&mut b.periodic);
                if let Some(sealed) = seal(ctx, &mut b.co, &mut b.verify, periodic, &rx).await? {
                    if !sealed.moved_dirs.is_empty() && !sealed.resync_all {
                        settle = Some(settle_at(last_settle));
                    }
                    if sealed.items.iter().any(|i| i.replace && i.state.as_ref().is_some_and(|s| s.entry.kind == EntryKind::Dir)) {
                        rechecks.push_back((Instant::now() + RECHECK_DELAY, 0, sealed));
                        if rechecks.len() > RECHECK_CAP {
                            if let Some(f) = rechecks.front_mut() { f.0 = Instant::now(); }
                        }
                    }
                }
                b.timer.reset();
            }
            _ = sleep_until(recheck_at), if recheck_at.is_some() => {
                let Some((_, tries, sealed)) = rechecks.pop_front() else { continue };
                if rx.len() > RECHECK_QUEUE_CALM && tries < 20 && rechecks.len() < RECHECK_CAP {
                    rechecks.push_front((Instant::now() + RECHECK_DELAY, tries + 1, sealed));
                    continue;
                }
                for c in recheck_new_dirs(ctx, sealed).await? {
                    b.push(c);
                }
            }
            _ = tokio::time::sleep_until(next_flush.into()) => {
                flush_index(ctx);
                next_flush = Instant::now() + INDEX_FLUSH;
            }
            _ = sleep_until(settle), if settle.is_some() => {
                settle = None;
                last_settle = Some(Instant::now());
                SettleRescan.emit(m);
                b.push(ferry_core::Change::RescanAll);
                b.periodic = true;
            }
            _ = sleep_until(next_rescan), if next_rescan.is_some() => {
                PeriodicRescan.emit(m);
                b.push(ferry_core::Change::RescanAll);
                b.periodic = true;
                next_rescan = rescan_every.map(|d| Instant::now() + d);
            }
            _ = shutdown.changed() => {
                // Writes made just before SIGTERM may still be on their way
                // from the kernel through notify's thread: take events until
                // the queue has been quiet for a moment (bounded).
                let until = Instant::now() + SHUTDOWN_DRAIN_MAX;
                loop {
                    while let Ok(ev) = rx.try_recv() {
                        b.fold(m, ev);
                    }
                    let quiet = tokio::time::timeout(SHUTDOWN_DRAIN_QUIET, rx.recv()).await;
                    match quiet {
                        Ok(Some(ev)) => b.fold(m, ev),
                        Ok(None) | Err(_) => break,
                    }
                    if Instant::now() > until {
                        break;
                    }
                }
                b.flush();
                seal(ctx, &mut b.co, &mut b.verify, false, &rx).await?;
                flush_index(ctx);
                break;
            }
        }
    }
    Ok(())
}

/// Compares the root with the file index at start: what changed while
/// ferry was down becomes the first batch (stat first, hash only what stat
/// cannot tell). Without a usable index, builds one from the root; peers
/// then resync by manifest once.
async fn index_at_start(ctx: &Ctx) -> anyhow::Result<Vec<ferry_core::Change>> {
    let Some(ix) = &ctx.index else {
        return Ok(Vec::new());
    };
    let st = ctx.shared.node_state();
    let meta = *ctx.index_meta.lock().expect("index meta");
    let root = ctx.shared.cfg.root.clone();
    let excludes = ctx.excludes.clone();
    let started = Instant::now();
    let (scanned, skipped) = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        scan::scan_tree(&root, None, &excludes, &mut out, &mut skipped).map(|_| (out, skipped))
    })
    .await?
    .context("scanning the root at start")?;
    note_skips(&ctx.shared, &skipped);
    // A different boot: the machine went down since the index was last
    // used, and stat cannot vouch for what was written shortly before (see
    // file_index::REBOOT_DISTRUST_SECS).
    let boot = ferry_apply::journal::boot_id();
    let rebooted = tokio::task::block_in_place(|| ix.boot()).ok().flatten() != Some(boot);
    match meta {
        None => {
            // the boot is recorded only by a reconcile that poisoned what
            // it suspects (the next start's, against this index)
            if let Some(from) = rebooted
                .then(|| file_index::distrust_scanned(&scanned))
                .flatten()
            {
                let _ = ctx.suspect_from.set(from);
            }
            // `start` sealed the empty batch this index is built as
            let seq = st.seq;
            let meta = ferry_store::IndexMeta {
                epoch: st.epoch,
                base: seq,
                floor: seq,
                seq,
            };
            let n = scanned.len();
            let res = tokio::task::block_in_place(|| {
                ix.rebuild(
                    meta,
                    scanned
                        .iter()
                        .map(|s| (s.entry.path.as_bytes().to_vec(), file_index::record(s, seq))),
                )
            });
            match res {
                Ok(()) => {
                    *ctx.index_meta.lock().expect("index meta") = Some(meta);
                    tracing::info!(
                        entries = n,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "Built the file index from the root; peers resync by manifest once."
                    );
                }
                Err(e) => {
                    ctx.shared.metrics.error("index");
                    tracing::error!(error = %e, "The file index could not be built; peers resync by manifest.");
                }
            }
            Ok(Vec::new())
        }
        Some(_) => {
            let records = tokio::task::block_in_place(|| ix.records());
            let records = match records {
                Ok(r) => r,
                Err(e) => {
                    ctx.shared.metrics.error("index");
                    tracing::error!(error = %e, "The file index cannot be read; peers resync by manifest.");
                    *ctx.index_meta.lock().expect("index meta") = None;
                    return Ok(Vec::new());
                }
            };
            let suspect_from = if rebooted {
                file_index::distrust_after_reboot(&records)
            } else {
                None
            };
            if let Some(from) = suspect_from {
                let _ = ctx.suspect_from.set(from);
            }
            let root = ctx.shared.cfg.root.clone();
            let excludes = ctx.excludes.clone();
            let rc = tokio::task::spawn_blocking(move || {
                file_index::reconcile(&root, &excludes, scanned, records, suspect_from)
            })
            .await?;
            let refreshed = rc.refreshed.clone();
            ctx.index_write(|ix| ix.apply(st.seq, &refreshed, &[], true));
            // only now (suspect records are poisoned) may this boot vouch
            ctx.index_write(|ix| ix.set_boot(boot));
            tracing::info!(
                changed = rc.changed.len(),
                gone = rc.gone.len(),
                hashed = rc.hashed,
                rebooted,
                suspects = rc.suspects,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "Compared the root with the file index: shipping what changed while ferry was down."
            );
            Ok(rc.changes())
        }
    }
}

/// How often content hashes and acked seqs reach the index when no batch
/// is sealed (they ride along with every batch otherwise).
const INDEX_FLUSH: Duration = Duration::from_secs(5);

/// Writes the queued content hashes and the peers' acked seqs.
fn flush_index(ctx: &Ctx) {
    let ops = std::mem::take(&mut *ctx.hashes.lock().expect("hashes"));
    if ops.is_empty() {
        return;
    }
    let st = ctx.shared.node_state();
    let peers = ctx.peers_acked(st.epoch);
    ctx.index_write(|ix| ix.apply(st.seq, &ops, &peers, true));
}

/// The second look at the directories a sealed batch created (see
/// [`RECHECK_DELAY`]): the changes that the watcher could not report.
async fn recheck_new_dirs(
    ctx: &Ctx,
    sealed: Arc<SealedBatch>,
) -> anyhow::Result<Vec<ferry_core::Change>> {
    let root = ctx.shared.cfg.root.clone();
    let excludes = ctx.excludes.clone();
    let (changes, skipped) = tokio::task::spawn_blocking(move || {
        let by_path: std::collections::HashMap<&RelPath, &Scanned> = sealed
            .items
            .iter()
            .filter_map(|i| i.state.as_ref().map(|s| (&i.path, s)))
            .collect();
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        for i in &sealed.items {
            let new_dir = i.replace
                && i.state
                    .as_ref()
                    .is_some_and(|s| s.entry.kind == EntryKind::Dir);
            if new_dir {
                out.extend(scan::changed_since(
                    &root,
                    &i.path,
                    &excludes,
                    &by_path,
                    &mut skipped,
                )?);
            }
        }
        Ok::<_, std::io::Error>((out, skipped))
    })
    .await??;
    note_skips(&ctx.shared, &skipped);
    if !changes.is_empty() {
        NewDirRecheck {
            changes: changes.len(),
        }
        .emit(&ctx.shared.metrics);
    }
    Ok(changes)
}

async fn sleep_until(d: Option<Instant>) {
    match d {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Reports what a scan skipped: each (path, reason) once per process (the
/// log line, the metric and `ferry status`), however often rescans meet it.
fn note_skips(shared: &Shared, skipped: &[Skip]) {
    for s in skipped {
        shared.skipped(&s.path, s.reason.label(), s.error.as_deref());
    }
}

/// Rename destinations that are directories now.
fn moved_dirs(root: &Path, pending: &ferry_core::Pending) -> Vec<RelPath> {
    pending
        .renames
        .iter()
        .filter(|(_, to)| scan::kind_at(root, to) == Some(EntryKind::Dir))
        .map(|(_, to)| to.clone())
        .collect()
}

/// `--safe-links`: a link's rename can change whether it leaves the root
/// (its target is relative to where it sits), and the replica may lack the
/// source (skipped) or must not get the destination. So each rename of what
/// is a symlink at seal time becomes a delete of its old name and the
/// state of its new one, read like any dirty path: the old name goes, the
/// new one arrives only when it stays inside. A directory move stays a move;
/// the links inside it are put right by the manifest verify every moved
/// directory gets (`moved_dirs`), which lists with the same rule.
fn unrename_links(
    root: &Path,
    excludes: &Excludes,
    pending: &mut ferry_core::Pending,
    items: &mut Vec<Item>,
    skipped: &mut Vec<Skip>,
) {
    let mut kept = Vec::with_capacity(pending.renames.len());
    for (from, to) in std::mem::take(&mut pending.renames) {
        let is_link = scan::kind_at(root, &to) == Some(EntryKind::Symlink);
        if !is_link {
            kept.push((from, to));
            continue;
        }
        // a path the batch already carries is read at seal: its state wins
        if !items.iter().any(|i| i.path == from) {
            items.push(Item {
                path: from,
                state: None,
                replace: false,
            });
        }
        // an excluded destination is neither sent nor deleted
        if !items.iter().any(|i| i.path == to) && !excludes.is_excluded(&to, false) {
            let state = scan::lstat_entry(root, &to, excludes, skipped);
            items.push(Item {
                path: to,
                state,
                replace: false,
            });
        }
    }
    pending.renames = kept;
}

/// Reads the state of everything the batch must carry.
fn read_items(
    root: &Path,
    excludes: &Excludes,
    pending: &ferry_core::Pending,
    skipped: &mut Vec<Skip>,
) -> anyhow::Result<Vec<Item>> {
    let mut items = Vec::with_capacity(pending.dirty.len());
    let mut seen = HashSet::new();
    for (path, recursive) in &pending.dirty {
        if *recursive {
            let mut out = Vec::new();
            scan::scan_tree(root, Some(path), excludes, &mut out, skipped)
                .with_context(|| format!("scanning {path}"))?;
            // scan_tree drops an excluded start; an absent start gives nothing
            if out.first().is_none_or(|s| s.entry.path != *path) {
                if seen.insert(path.clone()) {
                    items.push(Item {
                        path: path.clone(),
                        state: None,
                        replace: true,
                    });
                }
                continue;
            }
            for (i, s) in out.into_iter().enumerate() {
                if seen.insert(s.entry.path.clone()) {
                    items.push(Item {
                        path: s.entry.path.clone(),
                        state: Some(s),
                        replace: i == 0,
                    });
                }
            }
        } else {
            if !seen.insert(path.clone()) {
                continue;
            }
            let st = scan::lstat_entry(root, path, excludes, skipped);
            if let Some(s) = &st {
                if excludes.is_excluded(path, s.entry.kind == EntryKind::Dir) {
                    continue;
                }
            }
            items.push(Item {
                path: path.clone(),
                state: st,
                replace: false,
            });
        }
    }
    Ok(items)
}

async fn seal(
    ctx: &Ctx,
    co: &mut Coalescer,
    verify: &mut Vec<RelPath>,
    periodic: bool,
    rx: &mpsc::Receiver<RawEvent>,
) -> anyhow::Result<Option<Arc<SealedBatch>>> {
    if co.is_empty() && verify.is_empty() {
        return Ok(None);
    }
    let mut pending = co.take();
    let root = ctx.shared.cfg.root.clone();
    let excludes = ctx.excludes.clone();
    let (items, skipped, mut moved, renames) = {
        let mut pending = pending.clone();
        tokio::task::spawn_blocking(move || {
            let mut skipped = Vec::new();
            let moved = moved_dirs(&root, &pending);
            let mut items = read_items(&root, &excludes, &pending, &mut skipped)?;
            if excludes.safe_links() {
                unrename_links(&root, &excludes, &mut pending, &mut items, &mut skipped);
            }
            Ok::<_, anyhow::Error>((items, skipped, moved, pending.renames))
        })
        .await??
    };
    pending.renames = renames;
    note_skips(&ctx.shared, &skipped);
    // subtrees a watcher error named: every peer verifies them by manifest
    moved.append(verify);
    let exact = rx.is_empty();
    let mut st = ctx.shared.node_state();
    st.seq += 1;
    st.sealed_at_ns = now_ns();
    ctx.shared.save_state(st).map_err(|e| {
        ctx.shared.metrics.error("state_fsync");
        anyhow!(e)
    })?;
    let b = Arc::new(SealedBatch {
        epoch: st.epoch,
        seq: st.seq,
        sealed_at_ns: st.sealed_at_ns,
        sealed_at: Instant::now(),
        exact,
        resync_all: pending.rescan_all,
        periodic: periodic && pending.rescan_all,
        renames: pending.renames,
        items,
        moved_dirs: moved,
    });
    let sealed = b.clone();
    // The index learns the batch before any peer can receive it.
    let mut ops = file_index::batch_ops(&b);
    if b.resync_all {
        // events were lost: the index is brought back from the root too
        ops.extend(index_rescan(ctx, st.seq).await?);
    }
    ops.append(&mut ctx.hashes.lock().expect("hashes"));
    let peers = ctx.peers_acked(st.epoch);
    ctx.index_write(|ix| ix.apply(st.seq, &ops, &peers, true));

    BatchSealed {
        seq: b.seq,
        renames: b.renames.len(),
        items: b.items.len(),
        exact,
    }
    .emit(&ctx.shared.metrics);
    ctx.log.lock().expect("log").push(b);
    // The backlog grows with every seal, not only when an ack arrives: a
    // peer cut off must show its backlog (FerryBacklogGrowing needs it).
    for p in &ctx.shared.cfg.peers {
        let acked = ctx
            .shared
            .metrics
            .acked_seq
            .with_label_values(&[&p.name])
            .get()
            .max(0) as u64;
        ctx.shared
            .metrics
            .unacked
            .with_label_values(&[&p.name])
            .set(st.seq.saturating_sub(acked) as i64);
    }
    ctx.shared.set_status(|s| {
        for p in s.peers.iter_mut() {
            p.unacked = st.seq.saturating_sub(p.acked_seq);
        }
    });
    ctx.shared.set_status(|s| s.sealed_seq = st.seq);
    let _ = ctx.seq_tx.send(st.seq);
    Ok(Some(sealed))
}

/// A full scan compared with the index, recorded at batch `seq` (a batch
/// that follows lost events).
async fn index_rescan(ctx: &Ctx, seq: u64) -> anyhow::Result<Vec<ferry_store::IndexOp>> {
    let Some(ix) = &ctx.index else {
        return Ok(Vec::new());
    };
    if ctx.index_meta.lock().expect("index meta").is_none() {
        return Ok(Vec::new());
    }
    let records = match tokio::task::block_in_place(|| ix.records()) {
        Ok(r) => r,
        Err(_) => return Ok(Vec::new()), // the write below fails and says why
    };
    let root = ctx.shared.cfg.root.clone();
    let excludes = ctx.excludes.clone();
    let rc = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        scan::scan_tree(&root, None, &excludes, &mut out, &mut skipped)?;
        Ok::<_, std::io::Error>(file_index::reconcile(&root, &excludes, out, records, None))
    })
    .await??;
    Ok(rc.ops(seq))
}

/// Files the peer holds with the same size and mtime (the diff leaves
/// them) whose ctime is at or after `from`: after a reboot their bytes may
/// not be what was sent (see [`file_index::REBOOT_DISTRUST_SECS`]).
fn suspects(
    local: &[Scanned],
    remote: &[Entry],
    actions: &[Action<Scanned>],
    from: (i64, i64),
) -> Vec<Action<Scanned>> {
    let sending: HashSet<&RelPath> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(s) => Some(&s.entry.path),
            Action::Delete(_) => None,
        })
        .collect();
    let there: HashSet<&RelPath> = remote
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| &e.path)
        .collect();
    local
        .iter()
        .filter(|s| {
            s.entry.kind == EntryKind::File
                && s.ctime >= from
                && there.contains(&s.entry.path)
                && !sending.contains(&s.entry.path)
        })
        .cloned()
        .map(Action::Send)
        .collect()
}

/// Per-peer progress shared by the sender and the ack reader.
struct PeerProgress {
    acked: watch::Sender<u64>,
    inflight: Mutex<VecDeque<(u64, Instant)>>,
    need_resync: AtomicBool,
    /// A manifest was requested and has not ended: entries are expected.
    expect_manifest: AtomicBool,
    /// When the current session was established.
    connected_at: Mutex<Option<Instant>>,
}

async fn peer_loop(
    ctx: Arc<Ctx>,
    transport: Arc<Transport>,
    peer: PeerSpec,
    mut shutdown: watch::Receiver<bool>,
    wake: Arc<super::Wake>,
) {
    let m = &ctx.shared.metrics;
    let progress = Arc::new(PeerProgress {
        acked: watch::channel(0).0,
        inflight: Mutex::new(VecDeque::new()),
        // Without an index that vouches for the root, the first session
        // after a start resyncs: changes made while the node was down are
        // found by the manifest diff. With one, the batcher ships them.
        need_resync: AtomicBool::new(ctx.index_meta.lock().expect("index meta").is_none()),
        expect_manifest: AtomicBool::new(false),
        connected_at: Mutex::new(None),
    });
    ctx.shared.set_status(|s| {
        s.peers.push(super::PeerStatus {
            name: peer.name.clone(),
            ..Default::default()
        })
    });
    let mut backoff = Duration::from_millis(100);
    let mut sender_state = SenderState::default();
    loop {
        if *shutdown.borrow() && done(&ctx, &progress) {
            return;
        }
        *progress.connected_at.lock().expect("connected_at") = None;
        wake.instance.store(0, Ordering::Relaxed);
        let mut redial = false;
        let res = {
            let sess = session(
                &ctx,
                &transport,
                &peer,
                &progress,
                &mut backoff,
                &mut sender_state,
                shutdown.clone(),
                &wake,
            );
            tokio::select! {
                r = sess => r,
                _ = wake.notify.notified() => {
                    // A greeting from the peer: it (re)started, so a session
                    // from its previous life is dead. Redial; if the session
                    // was already with the new process, that costs one
                    // reconnect and nothing is resent (the log resumes).
                    redial = true;
                    Err(anyhow!("{} restarted; redialling", peer.name))
                }
            }
        };
        if redial {
            backoff = Duration::from_millis(1);
        }
        m.peer_connected.with_label_values(&[&peer.name]).set(0);
        match res {
            Ok(()) => return,
            Err(e) => {
                let msg = format!("{e:#}");
                PeerSessionEnded {
                    peer: &peer.name,
                    error: &msg,
                    retry_in: backoff,
                }
                .emit(m);
                ctx.shared.set_status(|s| {
                    if let Some(p) = s.peers.iter_mut().find(|p| p.name == peer.name) {
                        p.connected = false;
                        p.last_error = Some(msg.clone());
                    }
                });
            }
        }
        if *shutdown.borrow() && ctx.log.lock().expect("log").closed {
            return; // shutting down and the peer is unreachable: do not wait
        }
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = shutdown.changed() => {}
            _ = wake.notify.notified() => { backoff = Duration::from_millis(50); }
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn done(ctx: &Ctx, progress: &PeerProgress) -> bool {
    let log = ctx.log.lock().expect("log");
    log.closed && *progress.acked.borrow() >= log.last_seq
}

/// What a sender knows about its peer beyond acked seqs. It outlives a
/// session: a reconnect that resumes from the log must still send as content
/// the renames of things the peer never got.
#[derive(Default)]
struct SenderState {
    /// The first whole resync since start shipped the files suspect after a
    /// reboot ([`Ctx::suspect_from`]).
    suspects_sent: bool,
    /// Files of at least [`APPEND_MIN`] bytes last sent to the peer, for the
    /// append fast path (bounded to [`SENT_CAP`] entries).
    sent: std::collections::HashMap<RelPath, SentFile>,
    /// Chunks the peer holds, by (the first half of) their hash. An entry is
    /// good while `sent` still names its file version, sent in an earlier
    /// batch: a copy reads the replica's tree as it is when the batch starts.
    chunks: std::collections::HashMap<u128, ChunkLoc>,
    next_version: u64,
    /// Compression state across small files.
    squeeze: transfer::Squeeze,
    /// Chunks held in `sent`'s lists, counted on insert (recounted at the cap).
    sent_chunks: usize,
    /// `sent` has lost an entry of a path that still exists (evicted, cut
    /// below [`APPEND_MIN`], rolled back): no path's absence from `sent`
    /// means "not sent by this process" any more, so the file index's chunk
    /// lists (which lag the sends) are no longer consulted.
    forgot: bool,
    /// Undo log of `sent` updates, by batch: updates from batches the peer
    /// never acknowledged are rolled back when a new session starts (the
    /// peer may not hold those versions).
    sent_undo: VecDeque<(u64, RelPath, Option<SentFile>)>,
    /// Paths the peer lacks the sealed content of (vanished before send).
    missing: HashSet<RelPath>,
    /// Paths this sender told the peer to delete, with the batch that did.
    /// A seal reads the tree as it is *now*, so it can see the effect of a
    /// rename whose event has not arrived yet (the source looks deleted);
    /// the rename then comes in a later batch and must be sent as content.
    recently_deleted: std::collections::HashMap<RelPath, u64>,
    /// Batches up to this seq were sealed before the last resync scan,
    /// which already reflects their renames: those are sent as content too.
    degrade_until: u64,
    /// Moved directories to verify by subtree manifest once caught up.
    pending_verify: Vec<RelPath>,
    /// A catch-up from the index to this seq was sent and not (yet) acked.
    /// If the session ended first, the next one resyncs by manifest
    /// instead: that resumes (what the peer already applied is not sent
    /// again), where a second catch-up would send it all again.
    catching_up: Option<u64>,
}

struct Sender<'a> {
    ctx: &'a Ctx,
    /// The batch being sent (for the append cache's undo log).
    cur_seq: u64,
    peer: &'a str,
    send: MsgSend,
    progress: &'a PeerProgress,
    st: &'a mut SenderState,
    epoch: u64,
    /// The peer never applied a batch: its content is of unknown origin, so
    /// the first resync compares content hashes, not just size and mtime.
    verify: bool,
    /// The resync running is the periodic rescan.
    periodic: bool,
}

#[allow(clippy::too_many_arguments)] // one peer's session: its context is its arguments
async fn session(
    ctx: &Arc<Ctx>,
    transport: &Transport,
    peer: &PeerSpec,
    progress: &Arc<PeerProgress>,
    backoff: &mut Duration,
    sender_state: &mut SenderState,
    mut shutdown: watch::Receiver<bool>,
    wake: &super::Wake,
) -> anyhow::Result<()> {
    let addr = tokio::net::lookup_host(&peer.addr)
        .await
        .with_context(|| format!("resolving {}", peer.addr))?
        .next()
        .ok_or_else(|| anyhow!("{} resolves to no address", peer.addr))?;
    let st = ctx.shared.node_state();
    let last_seq = ctx.log.lock().expect("log").last_seq;
    let answer = super::greet::greet(
        transport,
        addr,
        &peer.name,
        &super::greet::HelloArgs {
            node: &ctx.shared.cfg.name,
            epoch: st.epoch,
            last_seq,
        },
        ctx.shared.cfg.wire,
        None,
    )
    .await;
    let greeted = match answer {
        Ok(super::greet::Answer::Welcome(g)) => g,
        Ok(super::greet::Answer::Refused(r)) => {
            if r.code == RefuseCode::StaleEpoch {
                ctx.shared.metrics.error("fenced");
            }
            if matches!(r.code, RefuseCode::StaleEpoch | RefuseCode::NotReplica)
                && r.epoch > st.epoch
            {
                // G7: a newer primary exists; this node follows it
                ctx.shared
                    .demote(r.epoch, &format!("{} is at epoch {}", peer.name, r.epoch))?;
            }
            bail!(
                "{} refused this primary ({:?}): {}",
                peer.name,
                r.code,
                r.message
            )
        }
        Err(e) => {
            if format!("{e}").starts_with("no common wire version") {
                ctx.shared.metrics.error("version");
            }
            return Err(e);
        }
    };
    let super::greet::Greeted {
        conn,
        mut send,
        mut recv,
        welcome,
        version,
    } = *greeted;
    if welcome.node != peer.name {
        ctx.shared.metrics.error("protocol");
        bail!(
            "{} answered as {:?}: a welcome must name the certificate's node",
            peer.name,
            welcome.node
        )
    }
    *backoff = Duration::from_millis(100);
    wake.instance.store(welcome.instance, Ordering::Relaxed);
    // Where this epoch began: a demoted old primary tells its own
    // unreplicated writes apart with it (conflicts).
    if let Some(b) =
        ferry_store::marker::load(&ctx.shared.cfg.state_dir, ferry_store::marker::EPOCH_BASE)
    {
        if b.len() == 4 && b[0] == st.epoch {
            send.send(&Message::EpochBase {
                epoch: b[0],
                base_epoch: b[1],
                base_seq: b[2],
                base_sealed_at_ns: b[3],
            })
            .await?;
        }
    }
    let m = &ctx.shared.metrics;
    *progress.connected_at.lock().expect("connected_at") = Some(Instant::now());
    PeerConnected {
        peer: &peer.name,
        addr,
        applied_seq: welcome.applied_seq,
        wire_version: version,
    }
    .emit(m);
    ctx.shared.set_status(|s| {
        if let Some(p) = s.peers.iter_mut().find(|p| p.name == peer.name) {
            p.connected = true;
            p.last_error = None;
            p.wire_version = version;
        }
    });
    progress
        .acked
        .send_replace(if welcome.applied_epoch == st.epoch {
            welcome.applied_seq
        } else {
            0
        });
    {
        // what the peer holds, as it says: its acked seq until it acks more
        let applied = *progress.acked.borrow();
        let last = ctx.log.lock().expect("log").last_seq;
        ctx.acked
            .lock()
            .expect("acked")
            .insert(peer.name.clone(), applied);
        m.acked_seq
            .with_label_values(&[&peer.name])
            .set(applied as i64);
        m.unacked
            .with_label_values(&[&peer.name])
            .set(last.saturating_sub(applied) as i64);
        ctx.shared.set_status(|s| {
            if let Some(p) = s.peers.iter_mut().find(|p| p.name == peer.name) {
                p.acked_seq = applied;
                p.unacked = last.saturating_sub(applied);
            }
        });
    }
    progress.inflight.lock().expect("inflight").clear();
    progress.expect_manifest.store(false, Ordering::Relaxed);
    let (man_tx, man_rx) = mpsc::channel(1024);
    let reader = read_acks(ctx, &peer.name, progress, &mut recv, man_tx);
    // What the peer holds is what it acknowledged: roll back the append
    // cache's updates from batches it never applied.
    let applied = if welcome.applied_epoch == st.epoch {
        welcome.applied_seq
    } else {
        0
    };
    while let Some((seq, path, old)) = sender_state.sent_undo.pop_back() {
        if seq <= applied {
            break;
        }
        sender_state.forgot = true;
        match old {
            Some(f) => sender_state.sent.insert(path, f),
            None => sender_state.sent.remove(&path),
        };
    }
    sender_state.sent_undo.clear();
    let mut sender = Sender {
        cur_seq: 0,
        ctx,
        peer: &peer.name,
        send,
        progress,
        st: sender_state,
        epoch: st.epoch,
        verify: welcome.applied_epoch == 0,
        periodic: false,
    };
    let first = {
        let log = ctx.log.lock().expect("log");
        if progress.need_resync.load(Ordering::Relaxed) {
            Resume::Resync
        } else {
            resume_point(
                st.epoch,
                log.last_seq,
                log.first_seq(),
                welcome.applied_epoch,
                welcome.applied_seq,
            )
        }
    };
    let sending = sender.run(first, man_rx, &mut shutdown);
    tokio::pin!(reader);
    tokio::pin!(sending);
    tokio::select! {
        r = &mut reader => r,
        r = &mut sending => match r {
            Ok(()) => {
                conn.close(0, "primary shutting down");
                Ok(())
            }
            // A write failed: the peer may have stopped the stream with a
            // refusal that says why (and asks for a resync); read it.
            Err(e) => match tokio::time::timeout(Duration::from_secs(1), &mut reader).await {
                Ok(Err(refusal)) => Err(refusal),
                _ => Err(e),
            },
        },
    }
}

async fn read_acks(
    ctx: &Ctx,
    peer: &str,
    progress: &PeerProgress,
    recv: &mut MsgRecv,
    man_tx: mpsc::Sender<Option<Entry>>,
) -> anyhow::Result<()> {
    let m = &ctx.shared.metrics;
    loop {
        match recv.recv().await? {
            Some(Message::Ack { epoch: _, seq }) => {
                let now = Instant::now();
                let mut last_lag = None;
                {
                    let mut inf = progress.inflight.lock().expect("inflight");
                    while let Some((s, t)) = inf.front().copied() {
                        if s > seq {
                            break;
                        }
                        inf.pop_front();
                        let lag = now.duration_since(t).as_secs_f64();
                        m.lag.with_label_values(&[peer]).observe(lag);
                        last_lag = Some(lag);
                    }
                }
                progress.acked.send_replace(seq);
                ctx.acked
                    .lock()
                    .expect("acked")
                    .insert(peer.to_owned(), seq);
                let last = ctx.log.lock().expect("log").last_seq;
                m.acked_seq.with_label_values(&[peer]).set(seq as i64);
                m.unacked
                    .with_label_values(&[peer])
                    .set(last.saturating_sub(seq) as i64);
                ctx.shared.set_status(|s| {
                    if let Some(p) = s.peers.iter_mut().find(|p| p.name == peer) {
                        p.acked_seq = seq;
                        p.unacked = last.saturating_sub(seq);
                        if let Some(l) = last_lag {
                            p.lag_s = Some(l);
                        }
                    }
                });
                // the RPO falls with the ack, not at the next tick
                update_rpo(ctx, now_ns());
            }
            Some(Message::ManifestEntry(_) | Message::ManifestEnd { .. })
                if !progress.expect_manifest.load(Ordering::Relaxed) =>
            {
                m.error("protocol");
                bail!("{peer} sent a manifest nobody asked for");
            }
            Some(Message::ManifestEntry(e)) => {
                if man_tx.send(Some(e)).await.is_err() {
                    bail!("manifest arrived while no resync was running");
                }
            }
            Some(Message::ManifestEnd { .. }) => {
                progress.expect_manifest.store(false, Ordering::Relaxed);
                let _ = man_tx.send(None).await;
            }
            Some(Message::Refuse(r)) => {
                if matches!(r.code, RefuseCode::Inconsistent | RefuseCode::Protocol) {
                    progress.need_resync.store(true, Ordering::Relaxed);
                }
                m.error("peer_refused");
                bail!("{peer} stopped the stream ({:?}): {}", r.code, r.message);
            }
            Some(other) => bail!("{peer} sent an unexpected {other:?}"),
            None => bail!("{peer} ended the stream"),
        }
    }
}

enum FileOutcome {
    Sent(u64),
    Vanished,
    Unstable,
    /// ferry cannot open or read it (permissions, a path too long, an I/O
    /// error): skipped and reported with the error.
    Unreadable(std::io::Error),
}

impl Sender<'_> {
    async fn run(
        &mut self,
        first: Resume,
        mut man_rx: mpsc::Receiver<Option<Entry>>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut seq_rx = self.ctx.seq_tx.subscribe();
        let max_inflight = self.ctx.shared.cfg.max_inflight as u64;
        let mut next = match first {
            Resume::From(n) => n,
            Resume::Resync => {
                let target = self.ctx.log.lock().expect("log").last_seq;
                self.catch_up_or_resync(target, &mut man_rx).await?;
                target + 1
            }
        };
        loop {
            // wait for something to send
            loop {
                let (last, closed) = {
                    let log = self.ctx.log.lock().expect("log");
                    (log.last_seq, log.closed)
                };
                if next <= last {
                    break;
                }
                if !self.st.pending_verify.is_empty() {
                    self.verify_moved(next - 1, &mut man_rx).await?;
                    continue;
                }
                if closed && *shutdown.borrow() {
                    // everything sealed was sent: wait for the acks, then end
                    let mut acked = self.progress.acked.subscribe();
                    let _ = acked.wait_for(|a| *a >= last).await;
                    return Ok(());
                }
                tokio::select! {
                    r = seq_rx.changed() => { if r.is_err() { return Ok(()); } }
                    _ = shutdown.changed() => {}
                }
            }
            // bounded in-flight window
            let mut acked = self.progress.acked.subscribe();
            let _ = acked
                .wait_for(|a| next.saturating_sub(*a) <= max_inflight)
                .await;
            let batch = self.ctx.log.lock().expect("log").get(next);
            match batch {
                None => {
                    tracing::info!(
                        peer = self.peer,
                        next,
                        "batch no longer in the log; resyncing"
                    );
                    let target = self.ctx.log.lock().expect("log").last_seq;
                    self.catch_up_or_resync(target, &mut man_rx).await?;
                    next = target + 1;
                }
                Some(b) if b.resync_all => {
                    self.periodic = b.periodic;
                    let r = self.resync(b.seq, None, &mut man_rx).await;
                    self.periodic = false;
                    r?;
                    next = b.seq + 1;
                }
                Some(b) => {
                    self.send_batch(&b).await?;
                    next += 1;
                }
            }
        }
    }

    fn track(&self, seq: u64, sealed_at: Instant) {
        self.progress
            .inflight
            .lock()
            .expect("inflight")
            .push_back((seq, sealed_at));
    }

    /// Brings the peer to batch `target` when the log no longer holds what
    /// it lacks: from the file index when it vouches for the peer's acked
    /// seq (no manifest, only what changed after it), else by manifest.
    async fn catch_up_or_resync(
        &mut self,
        target: u64,
        man_rx: &mut mpsc::Receiver<Option<Entry>>,
    ) -> anyhow::Result<()> {
        let acked = *self.progress.acked.borrow();
        let forced = self.progress.need_resync.load(Ordering::Relaxed);
        let interrupted = self.st.catching_up.take().is_some_and(|t| acked < t);
        if interrupted {
            tracing::info!(
                peer = self.peer,
                acked,
                "The last catch-up was interrupted; resuming it by manifest."
            );
        }
        if !forced && !interrupted && acked <= target && self.ctx.index_covers(self.epoch, acked) {
            // false: the index could not be read; by manifest then
            if self.catch_up(acked, target).await? {
                return Ok(());
            }
        }
        self.resync(target, None, man_rx).await
    }

    /// Sends, as one resync batch to `target`, the current state of every
    /// path the index says changed after `acked`, after deleting the paths
    /// removed after it. `false`: the index could not be read.
    async fn catch_up(&mut self, acked: u64, target: u64) -> anyhow::Result<bool> {
        let Some(ix) = &self.ctx.index else {
            return Ok(false);
        };
        let started = Instant::now();
        let (changed, gone) = match tokio::task::block_in_place(|| ix.changed_after(acked)) {
            Ok(x) => x,
            Err(e) => {
                self.ctx.shared.metrics.error("index");
                tracing::error!(peer = self.peer, error = %e, "The file index cannot be read; resyncing by manifest.");
                return Ok(false);
            }
        };
        let rel = |k: Vec<u8>| RelPath::new(k).ok();
        let mut gone: Vec<RelPath> = gone.into_iter().filter_map(rel).collect();
        gone.sort_by(|a, b| a.walk_cmp(b));
        let mut changed: Vec<RelPath> = changed.into_iter().filter_map(|(k, _)| rel(k)).collect();
        changed.sort_by(|a, b| a.walk_cmp(b));
        let total = (gone.len() + changed.len()) as u64;
        tracing::info!(
            peer = self.peer,
            acked,
            target,
            changed = changed.len(),
            gone = gone.len(),
            "Catching the peer up from the file index (no manifest needed)."
        );
        self.ctx.shared.set_status(|s| {
            s.resync = Some(super::ResyncProgress {
                peer: self.peer.to_owned(),
                done: 0,
                total,
            })
        });
        self.cur_seq = target;
        self.st.catching_up = Some(target);
        let sealed_at = Instant::now();
        self.send
            .send(&Message::BatchBegin(BatchHeader {
                epoch: self.epoch,
                seq: target,
                sealed_at_ns: now_ns(),
                exact: false,
                resync: true,
            }))
            .await?;
        let mut done = 0u64;
        let mut last_deleted: Option<RelPath> = None;
        for g in gone {
            done += 1;
            if last_deleted.as_ref().is_some_and(|d| g.starts_with(d))
                || self.ctx.excludes.is_excluded(&g, false)
            {
                continue;
            }
            self.st.sent.retain(|k, _| !k.starts_with(&g));
            self.send
                .send(&Message::Op(Op::Delete { path: g.clone() }))
                .await?;
            last_deleted = Some(g);
        }
        let root = self.ctx.shared.cfg.root.clone();
        for (i, p) in changed.into_iter().enumerate() {
            let mut skipped = Vec::new();
            let now = tokio::task::block_in_place(|| {
                scan::lstat_entry(&root, &p, &self.ctx.excludes, &mut skipped)
            });
            note_skips(&self.ctx.shared, &skipped);
            match now {
                Some(s)
                    if !self
                        .ctx
                        .excludes
                        .is_excluded(&p, s.entry.kind == EntryKind::Dir) =>
                {
                    self.st.sent.remove(&p);
                    self.send_state(&s, true, false).await?
                }
                Some(_) => {}
                None => {
                    self.send
                        .send(&Message::Op(Op::Delete { path: p.clone() }))
                        .await?
                }
            }
            if i % 200 == 199 {
                self.ctx.shared.set_status(|s| {
                    s.resync = Some(super::ResyncProgress {
                        peer: self.peer.to_owned(),
                        done: done + i as u64 + 1,
                        total,
                    })
                });
            }
        }
        self.send.send(&Message::BatchEnd { seq: target }).await?;
        self.send.flush().await?;
        self.track(target, sealed_at);
        // the reads above reflect every rename sealed so far
        self.st.missing.clear();
        self.st.recently_deleted.clear();
        self.st.degrade_until = self.ctx.log.lock().expect("log").last_seq;
        self.ctx.shared.set_status(|s| s.resync = None);
        tracing::info!(
            peer = self.peer,
            target,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Catch-up from the file index sent."
        );
        Ok(true)
    }

    /// Verifies the moved directories still pending, by subtree manifest.
    async fn verify_moved(
        &mut self,
        target: u64,
        man_rx: &mut mpsc::Receiver<Option<Entry>>,
    ) -> anyhow::Result<()> {
        let mut prefixes = std::mem::take(&mut self.st.pending_verify);
        prefixes.sort_by(|a, b| a.walk_cmp(b));
        prefixes.dedup();
        let mut done: Vec<RelPath> = Vec::new();
        for p in prefixes {
            if done.iter().any(|d| p.starts_with(d)) {
                continue;
            }
            let root = self.ctx.shared.cfg.root.clone();
            let is_dir = scan::kind_at(&root, &p) == Some(EntryKind::Dir);
            if is_dir {
                self.resync(target, Some(p.clone()), man_rx).await?;
            }
            done.push(p);
        }
        Ok(())
    }

    /// Manifest-diff resync of the whole root (`prefix` `None`) or of one
    /// subtree; after it the peer is at batch `target`.
    async fn resync(
        &mut self,
        target: u64,
        prefix: Option<RelPath>,
        man_rx: &mut mpsc::Receiver<Option<Entry>>,
    ) -> anyhow::Result<()> {
        let m = &self.ctx.shared.metrics;
        let whole = prefix.is_none();
        if whole && self.periodic {
            tracing::info!(
                peer = self.peer,
                target,
                "Periodic rescan: comparing the peer's manifest with the root."
            );
        } else if whole {
            ResyncStarted {
                peer: self.peer,
                target,
            }
            .emit(m);
            self.ctx.shared.set_status(|s| {
                s.resync = Some(super::ResyncProgress {
                    peer: self.peer.to_owned(),
                    done: 0,
                    total: 0,
                })
            });
        } else {
            tracing::debug!(peer = self.peer, prefix = %prefix.as_ref().map(|p| p.display()).unwrap_or_default(), "verifying a moved directory");
        }
        let started = Instant::now();
        self.cur_seq = target;
        let verify = self.verify && whole;
        self.progress.expect_manifest.store(true, Ordering::Relaxed);
        self.send
            .send(&Message::ManifestRequest {
                verify,
                prefix: prefix.clone(),
            })
            .await?;
        self.send.flush().await?;
        let root = self.ctx.shared.cfg.root.clone();
        let excludes = self.ctx.excludes.clone();
        let local = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut skipped = Vec::new();
            scan::scan_tree(&root, prefix.as_ref(), &excludes, &mut out, &mut skipped)
                .map(|_| (out, skipped))
        });
        let mut remote = Vec::new();
        // Bounded: a peer that stops answering must end the session (and be
        // redialled), never stall it.
        loop {
            let next = tokio::time::timeout(MANIFEST_TIMEOUT, man_rx.recv())
                .await
                .map_err(|_| {
                    anyhow!(
                        "{} sent no manifest entry for {MANIFEST_TIMEOUT:?}",
                        self.peer
                    )
                })?
                .ok_or_else(|| anyhow!("stream ended during the manifest"))?;
            let Some(e) = next else { break };
            // bounded: about 100 bytes each, 64 Mi entries at most
            if remote.len() >= MAX_MANIFEST {
                bail!(
                    "{}'s manifest passed {MAX_MANIFEST} entries; refusing to hold more",
                    self.peer
                );
            }
            remote.push(e);
        }
        remote.sort_by(|a, b| a.path.walk_cmp(&b.path));
        let (mut local, skipped) = local.await??;
        self.st.degrade_until = self.ctx.log.lock().expect("log").last_seq;
        note_skips(&self.ctx.shared, &skipped);
        if verify {
            local = self.hash_lookalikes(local, &remote).await?;
        }
        let mut actions = diff(&local, |s| &s.entry, &remote);
        if whole && !self.st.suspects_sent {
            if let Some(&from) = self.ctx.suspect_from.get() {
                let n = actions.len();
                actions.extend(suspects(&local, &remote, &actions, from));
                if actions.len() > n {
                    tracing::info!(
                        peer = self.peer,
                        files = actions.len() - n,
                        "resync: the machine restarted since the file index was used; \
                         shipping files changed shortly before, whose bytes may differ \
                         from what their size and mtime suggest"
                    );
                }
            }
        }
        let total = actions.len();
        // what this resync deletes or re-sends is no longer what we last sent
        for a in &actions {
            match a {
                Action::Delete(p) => self.st.sent.retain(|k, _| !k.starts_with(p)),
                Action::Send(s) => {
                    self.st.sent.remove(&s.entry.path);
                }
            }
        }
        if whole {
            tracing::info!(
                peer = self.peer,
                local = local.len(),
                remote = remote.len(),
                to_send = total,
                "resync: sending differences"
            );
            self.st.missing.clear();
            self.st.recently_deleted.clear();
            // keep what the peer provably still holds: same inode, size and
            // mtime here, and not among the differences sent below
            let differs: HashSet<&RelPath> = actions
                .iter()
                .map(|a| match a {
                    Action::Send(s) => &s.entry.path,
                    Action::Delete(p) => p,
                })
                .collect();
            let here: std::collections::HashMap<&RelPath, &Scanned> =
                local.iter().map(|s| (&s.entry.path, s)).collect();
            self.st.sent.retain(|p, f| {
                !differs.contains(p)
                    && here.get(p).is_some_and(|s| {
                        (s.dev, s.ino, s.entry.size, s.entry.mtime)
                            == (f.dev, f.ino, f.size, f.mtime)
                    })
            });
            self.st.sent_undo.clear();
            self.st.pending_verify.clear();
        } else if total > 0 {
            tracing::info!(
                peer = self.peer,
                to_send = total,
                "a moved directory differed on the peer; repaired"
            );
        }
        let sealed_at = Instant::now();
        self.send
            .send(&Message::BatchBegin(BatchHeader {
                epoch: self.epoch,
                seq: target,
                sealed_at_ns: now_ns(),
                exact: false,
                resync: true,
            }))
            .await?;
        for (i, a) in actions.into_iter().enumerate() {
            match a {
                Action::Delete(p) => self.send.send(&Message::Op(Op::Delete { path: p })).await?,
                Action::Send(s) => self.send_state(&s, true, false).await?,
            }
            if i % 200 == 199 {
                self.ctx.shared.set_status(|s| {
                    s.resync = Some(super::ResyncProgress {
                        peer: self.peer.to_owned(),
                        done: i as u64 + 1,
                        total: total as u64,
                    })
                });
            }
        }
        self.send.send(&Message::BatchEnd { seq: target }).await?;
        self.send.flush().await?;
        self.track(target, sealed_at);
        if whole {
            self.progress.need_resync.store(false, Ordering::Relaxed);
            self.verify = false;
            self.st.suspects_sent = true;
            self.ctx.shared.set_status(|s| s.resync = None);
            tracing::info!(
                peer = self.peer,
                target,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "resync sent"
            );
        }
        Ok(())
    }

    /// Hashes the local files whose size and mtime match a remote entry that
    /// carries a hash, so the diff compares content for them.
    async fn hash_lookalikes(
        &self,
        mut local: Vec<Scanned>,
        remote: &[Entry],
    ) -> anyhow::Result<Vec<Scanned>> {
        let by_path: std::collections::HashMap<&RelPath, &Entry> =
            remote.iter().map(|e| (&e.path, e)).collect();
        let todo: Vec<usize> = local
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.entry.kind == EntryKind::File
                    && by_path.get(&s.entry.path).is_some_and(|r| {
                        r.hash.is_some() && r.size == s.entry.size && r.mtime == s.entry.mtime
                    })
            })
            .map(|(i, _)| i)
            .collect();
        if todo.is_empty() {
            return Ok(local);
        }
        let root = self.ctx.shared.cfg.root.clone();
        let paths: Vec<(usize, RelPath)> = todo
            .iter()
            .map(|&i| (i, local[i].entry.path.clone()))
            .collect();
        let hashes = tokio::task::spawn_blocking(move || {
            paths
                .into_iter()
                .map(|(i, p)| (i, scan::hash_at(&root, &p).ok()))
                .collect::<Vec<_>>()
        })
        .await?;
        for (i, h) in hashes {
            // unreadable now: leave it unhashed, so it differs and is sent
            local[i].entry.hash = h.or(Some([0; 32]));
        }
        Ok(local)
    }

    fn is_missing(&self, p: &RelPath) -> bool {
        if self.st.missing.is_empty() {
            return false;
        }
        let mut cur = Some(p.clone());
        while let Some(c) = cur {
            if self.st.missing.contains(&c) {
                return true;
            }
            cur = c.parent();
        }
        false
    }

    fn remember_sent(&mut self, p: &RelPath, f: SentFile) {
        let old = self.st.sent.get(p).cloned();
        self.st.sent_undo.push_back((self.cur_seq, p.clone(), old));
        if f.size < APPEND_MIN {
            if self.st.sent.remove(p).is_some() {
                self.st.forgot = true;
            }
            return;
        }
        if self.st.sent.len() >= SENT_CAP && !self.st.sent.contains_key(p) {
            if let Some(k) = self.st.sent.keys().next().cloned() {
                self.st.sent.remove(&k);
                self.st.forgot = true;
            }
        }
        self.st.sent_chunks += f.chunks.as_ref().map_or(0, |c| c.len());
        self.st.sent.insert(p.clone(), f);
        if self.st.sent_chunks > SENT_CHUNKS_CAP {
            let mut total: usize = self
                .st
                .sent
                .values()
                .map(|x| x.chunks.as_ref().map_or(0, |c| c.len()))
                .sum();
            for (k, x) in self.st.sent.iter_mut() {
                if total <= SENT_CHUNKS_CAP / 2 {
                    break;
                }
                if k != p {
                    if let Some(c) = x.chunks.take() {
                        total -= c.len();
                    }
                }
            }
            self.st.sent_chunks = total;
        }
    }

    fn recently_gone(&self, p: &RelPath) -> bool {
        if self.st.recently_deleted.is_empty() {
            return false;
        }
        let mut cur = Some(p.clone());
        while let Some(c) = cur {
            if self.st.recently_deleted.contains_key(&c) {
                return true;
            }
            cur = c.parent();
        }
        false
    }

    fn forget_missing_under(&mut self, p: &RelPath) {
        if !self.st.missing.is_empty() {
            self.st.missing.retain(|m| !m.starts_with(p));
        }
    }

    async fn send_batch(&mut self, b: &SealedBatch) -> anyhow::Result<()> {
        let span = tracing::debug_span!("batch", seq = b.seq);
        tracing::Instrument::instrument(self.send_batch_inner(b), span).await
    }

    async fn send_batch_inner(&mut self, b: &SealedBatch) -> anyhow::Result<()> {
        self.cur_seq = b.seq;
        let acked = *self.progress.acked.borrow();
        while self
            .st
            .sent_undo
            .front()
            .is_some_and(|(q, _, _)| *q <= acked)
        {
            self.st.sent_undo.pop_front();
        }
        self.send
            .send(&Message::BatchBegin(BatchHeader {
                epoch: b.epoch,
                seq: b.seq,
                sealed_at_ns: b.sealed_at_ns,
                exact: b.exact,
                resync: false,
            }))
            .await?;
        for (from, to) in &b.renames {
            // A file renamed and then changed (a temp file shipped while it
            // was being written, then renamed over its name): the item sends
            // `to` whole, so the rename would only show, between the two
            // steps, content `to` never had on the primary (G3). Drop the
            // source instead.
            let rewritten = b.items.iter().any(|i| {
                i.path == *to
                    && i.state
                        .as_ref()
                        .is_some_and(|s| s.entry.kind == EntryKind::File)
            }) && !b.moved_dirs.iter().any(|d| d == to);
            if rewritten {
                self.send
                    .send(&Message::Op(Op::Delete { path: from.clone() }))
                    .await?;
                self.st.sent.remove(from);
                continue;
            }
            if self.is_missing(from) || self.recently_gone(from) || b.seq <= self.st.degrade_until {
                // The peer never got what was moved: send it whole instead.
                self.send
                    .send(&Message::Op(Op::Delete { path: from.clone() }))
                    .await?;
                self.send
                    .send(&Message::Op(Op::Delete { path: to.clone() }))
                    .await?;
                self.forget_missing_under(from);
                self.forget_missing_under(to);
                self.st
                    .sent
                    .retain(|k, _| !k.starts_with(from) && !k.starts_with(to));
                self.st.recently_deleted.insert(from.clone(), b.seq);
                let root = self.ctx.shared.cfg.root.clone();
                let excludes = self.ctx.excludes.clone();
                let to2 = to.clone();
                let (now, skipped) = tokio::task::spawn_blocking(move || {
                    let mut out = Vec::new();
                    let mut skipped = Vec::new();
                    scan::scan_tree(&root, Some(&to2), &excludes, &mut out, &mut skipped)
                        .map(|_| (out, skipped))
                })
                .await??;
                note_skips(&self.ctx.shared, &skipped);
                // moved on again already: the peer now lacks `to` as well
                if now.is_empty() {
                    self.st.recently_deleted.insert(to.clone(), b.seq);
                } else {
                    self.st.recently_deleted.remove(to);
                }
                for s in now {
                    self.send_state(&s, false, false).await?;
                }
            } else {
                self.send
                    .send(&Message::Op(Op::Rename {
                        from: from.clone(),
                        to: to.clone(),
                    }))
                    .await?;
                // a moved file is a copy source only from the next batch on
                // (copies read the tree as the batch starts), also when this
                // batch is sent again after a reconnect
                if let Some(mut f) = self.st.sent.remove(from) {
                    f.batch = self.cur_seq;
                    self.st.sent.insert(to.clone(), f);
                }
                // what was inside a moved directory now lives under `to`
                let inside: Vec<RelPath> = self
                    .st
                    .sent
                    .keys()
                    .filter(|k| *k != from && k.starts_with(from))
                    .cloned()
                    .collect();
                for k in inside {
                    if let (Some(mut f), Some(n)) = (self.st.sent.remove(&k), k.rebase(from, to)) {
                        f.batch = self.cur_seq;
                        self.st.sent.insert(n, f);
                    }
                }
                if !self.st.missing.is_empty() {
                    let moved: Vec<RelPath> = self
                        .st
                        .missing
                        .iter()
                        .filter(|m| m.starts_with(from))
                        .cloned()
                        .collect();
                    for mp in moved {
                        self.st.missing.remove(&mp);
                        if let Some(n) = mp.rebase(from, to) {
                            self.st.missing.insert(n);
                        }
                    }
                }
                if !self.st.recently_deleted.is_empty() {
                    let moved: Vec<(RelPath, u64)> = self
                        .st
                        .recently_deleted
                        .iter()
                        .filter(|(m, _)| m.starts_with(from))
                        .map(|(m, q)| (m.clone(), *q))
                        .collect();
                    for (mp, q) in moved {
                        self.st.recently_deleted.remove(&mp);
                        if let Some(n) = mp.rebase(from, to) {
                            self.st.recently_deleted.insert(n, q);
                        }
                    }
                }
            }
        }
        for item in &b.items {
            if item.replace {
                self.st.sent.retain(|k, _| !k.starts_with(&item.path));
                self.send
                    .send(&Message::Op(Op::Delete {
                        path: item.path.clone(),
                    }))
                    .await?;
                self.forget_missing_under(&item.path);
            }
            match &item.state {
                None => {
                    self.st.sent.retain(|k, _| !k.starts_with(&item.path));
                    if !item.replace {
                        self.send
                            .send(&Message::Op(Op::Delete {
                                path: item.path.clone(),
                            }))
                            .await?;
                        self.forget_missing_under(&item.path);
                    }
                    self.st.recently_deleted.insert(item.path.clone(), b.seq);
                }
                Some(s) => {
                    self.st.recently_deleted.remove(&item.path);
                    self.send_state(s, false, !item.replace).await?
                }
            }
        }
        self.send.send(&Message::BatchEnd { seq: b.seq }).await?;
        self.send.flush().await?;
        self.st.pending_verify.extend(b.moved_dirs.iter().cloned());
        // The race above spans a batch or two; keep a margin, bound the memory.
        self.st.recently_deleted.retain(|_, q| *q + 64 >= b.seq);
        self.track(b.seq, b.sealed_at);
        self.ctx
            .shared
            .metrics
            .batches_sent
            .with_label_values(&[self.peer])
            .inc();
        Ok(())
    }

    /// `may_skip`: a file the peer provably holds already may be left out
    /// (false right after a delete of its path was sent).
    async fn send_state(
        &mut self,
        s: &Scanned,
        any_inode: bool,
        may_skip: bool,
    ) -> anyhow::Result<()> {
        let e = &s.entry;
        match e.kind {
            EntryKind::Dir => {
                self.send
                    .send(&Message::Op(Op::Mkdir {
                        path: e.path.clone(),
                        mode: e.mode,
                    }))
                    .await?;
            }
            EntryKind::Symlink => {
                self.send
                    .send(&Message::Op(Op::Symlink {
                        path: e.path.clone(),
                        target: e.target.clone(),
                        mtime: e.mtime,
                    }))
                    .await?;
            }
            EntryKind::File => match self.send_file(s, any_inode, may_skip).await? {
                FileOutcome::Sent(n) => {
                    self.st.missing.remove(&e.path);
                    self.ctx
                        .shared
                        .metrics
                        .bytes_sent
                        .with_label_values(&[self.peer])
                        .inc_by(n);
                }
                FileOutcome::Vanished => {
                    self.st.missing.insert(e.path.clone());
                }
                FileOutcome::Unreadable(err) => {
                    // reported once, whichever peer meets it first
                    let hint = if err.kind() == std::io::ErrorKind::PermissionDenied {
                        "; give the ferry user read access"
                    } else {
                        ""
                    };
                    self.ctx.shared.skipped(
                        &e.path.display(),
                        ferry_watch::SkipReason::Unreadable.label(),
                        Some(&format!("{err}{hint}")),
                    );
                    self.st.missing.insert(e.path.clone());
                }
                FileOutcome::Unstable => {
                    // Still being written: the next batch carries it. Until
                    // then the peer lacks it (a later move of it is sent as
                    // content).
                    self.ctx.shared.metrics.error("file_unstable");
                    self.st.missing.insert(e.path.clone());
                }
            },
        }
        Ok(())
    }

    /// Where the peer holds a chunk, if it provably does (see
    /// [`SenderState::chunks`]).
    fn chunk_source(&self, c: &Chunk) -> Option<(RelPath, u64)> {
        let loc = self.st.chunks.get(&chunk_key(&c.hash))?;
        if loc.len != c.len {
            return None;
        }
        let f = self.st.sent.get(&*loc.path)?;
        (f.version == loc.version && f.batch < self.cur_seq)
            .then(|| ((*loc.path).clone(), loc.offset))
    }

    /// Queues for the file index what was sent of a file: its hash, and the
    /// chunk list of a large one (for diffs after a restart). Kept only if
    /// the file's record still has this identity when the ops are written.
    fn record_sent(
        &self,
        s: &Scanned,
        before: &std::fs::Metadata,
        meta: FileMeta,
        full: Option<[u8; 32]>,
        chunks: Option<&[Chunk]>,
    ) {
        let mut h = self.ctx.hashes.lock().expect("hashes");
        if h.len() >= HASHES_CAP {
            return;
        }
        let mut ident = file_index::record(s, 0);
        ident.mode = meta.mode;
        ident.size = meta.size;
        ident.mtime = (meta.mtime.secs, meta.mtime.nanos);
        ident.dev = before.dev();
        ident.ino = before.ino();
        ident.ctime = (before.ctime(), before.ctime_nsec());
        ident.hash = full;
        if let (Some(c), true) = (chunks, meta.size >= APPEND_MIN) {
            let mut enc = Vec::with_capacity(c.len() * 36);
            for x in c {
                enc.extend_from_slice(&x.len.to_le_bytes());
                enc.extend_from_slice(&x.hash);
            }
            h.push(ferry_store::IndexOp::Chunks {
                path: s.entry.path.as_bytes().to_vec(),
                ident: ident.clone(),
                chunks: enc,
            });
        }
        if full.is_some() {
            h.push(ferry_store::IndexOp::Hash {
                path: s.entry.path.as_bytes().to_vec(),
                ident,
            });
        }
    }

    /// What the peer holds of `p` according to the file index, when this
    /// process has not sent it yet (after a restart): the version the index
    /// records, with the chunk list it was sent as, if the peer acknowledged
    /// the batch that made it. A mistake costs a resync, never data: the
    /// replica checks the base of a patch (size and mtime).
    fn sent_before_restart(&mut self, p: &RelPath) -> Option<SentFile> {
        if self.st.forgot {
            return None;
        }
        let ix = self.ctx.index.as_ref()?;
        self.ctx.index_meta.lock().expect("index meta").as_ref()?;
        let acked = *self.progress.acked.borrow();
        let c = tokio::task::block_in_place(|| ix.chunks(p.as_bytes()))
            .ok()
            .flatten()?;
        // the peer applied the batch that carried this version, and no
        // later version of the path that it applied too
        let holds = c.seq > 0
            && c.seq <= acked
            && c.seq < self.cur_seq
            && c.last_seq.is_some_and(|l| l == c.seq || l > acked);
        if !holds || c.chunks.len() % 36 != 0 {
            return None;
        }
        let chunks: Arc<[Chunk]> = c
            .chunks
            .chunks_exact(36)
            .map(|x| Chunk {
                len: u32::from_le_bytes(x[..4].try_into().expect("4")),
                hash: x[4..].try_into().expect("32"),
            })
            .collect();
        let total: u64 = chunks.iter().map(|x| u64::from(x.len)).sum();
        if total != c.size {
            return None;
        }
        self.st.next_version += 1;
        let f = SentFile {
            dev: c.dev,
            ino: c.ino,
            size: c.size,
            mtime: ferry_proto::Mtime {
                secs: c.mtime.0,
                nanos: c.mtime.1,
            },
            ctime: c.ctime,
            chunks: Some(chunks.clone()),
            version: self.st.next_version,
            batch: c.seq,
        };
        self.remember_sent(p, f.clone());
        self.learn_chunks(p, f.version, &chunks);
        Some(f)
    }

    /// Remembers where the peer will hold the chunks of a file just sent.
    fn learn_chunks(&mut self, path: &RelPath, version: u64, chunks: &[Chunk]) {
        if self.st.chunks.len() + chunks.len() > CHUNK_DIR_CAP {
            let sent = &self.st.sent;
            self.st
                .chunks
                .retain(|_, l| sent.get(&*l.path).is_some_and(|f| f.version == l.version));
            if self.st.chunks.len() + chunks.len() > CHUNK_DIR_CAP {
                self.st.chunks.clear();
            }
            if chunks.len() > CHUNK_DIR_CAP {
                return;
            }
        }
        let p = Arc::new(path.clone());
        let mut at = 0u64;
        for c in chunks {
            self.st.chunks.insert(
                chunk_key(&c.hash),
                ChunkLoc {
                    path: p.clone(),
                    version,
                    offset: at,
                    len: c.len,
                },
            );
            at += u64::from(c.len);
        }
    }

    /// Sends one file's content, never torn (G3).
    ///
    /// Small files go whole. A larger one is cut into content-defined
    /// chunks; a chunk the peer already holds (of the old version of this
    /// file or of any other file it got from us) is sent as a copy
    /// instruction instead of bytes. A change to a file whose chunks the
    /// peer holds is diffed first: a pure append, or a small edit of a
    /// large file, is patched in place on the replica.
    async fn send_file(
        &mut self,
        s: &Scanned,
        any_inode: bool,
        may_skip: bool,
    ) -> anyhow::Result<FileOutcome> {
        let path = scan::abs(&self.ctx.shared.cfg.root, &s.entry.path);
        for attempt in 0..4 {
            // open and stat in one blocking section
            let opened = tokio::task::block_in_place(|| {
                open_beneath(&self.ctx.root_fd, &s.entry.path, &path).map(|f| {
                    let md = f.metadata().inspect(|_| write_barrier(&f));
                    (f, md)
                })
            });
            let (f, before) = match opened {
                Ok(f) => f,
                Err(e) if scan::gone(&e) || e.raw_os_error() == Some(libc::ELOOP) => {
                    return Ok(FileOutcome::Vanished)
                }
                // one file ferry cannot open (permissions, a path too long,
                // an I/O error) never stops the session: skipped, reported
                Err(e) => return Ok(FileOutcome::Unreadable(e)),
            };
            let before = before?;
            if !before.is_file() || (!any_inode && (before.dev(), before.ino()) != (s.dev, s.ino)) {
                return Ok(FileOutcome::Vanished);
            }
            let size = before.len();
            let meta = FileMeta {
                size,
                mode: before.mode() & ferry_proto::MODE_ALLOWED,
                mtime: ferry_proto::Mtime {
                    secs: before.mtime(),
                    nanos: before.mtime_nsec().clamp(0, 999_999_999) as u32,
                },
            };
            let mut prev = self.st.sent.get(&s.entry.path).cloned();
            if prev.is_none() && may_skip && size >= APPEND_MIN {
                prev = self.sent_before_restart(&s.entry.path);
            }
            // Unchanged since we sent it (its change was read by an earlier
            // batch already): nothing to send, unless a delete just went.
            if may_skip {
                if let Some(prev) = &prev {
                    let now = (
                        before.dev(),
                        before.ino(),
                        size,
                        meta.mtime,
                        (before.ctime(), before.ctime_nsec()),
                    );
                    if now == (prev.dev, prev.ino, prev.size, prev.mtime, prev.ctime) {
                        // the seal that brought it here may be newer than
                        // the one the index tied its chunk list to
                        if let Some(c) = &prev.chunks {
                            self.record_sent(s, &before, meta, None, Some(c));
                        }
                        return Ok(FileOutcome::Sent(0));
                    }
                }
            }
            let mut sent = None;
            let mut read_error = None;
            if let (Some(prev), true) = (&prev, may_skip && attempt < 2) {
                if prev.chunks.is_some() && size >= APPEND_MIN {
                    match read_failed(
                        self.send_patch(&s.entry.path, &f, &before, prev, meta)
                            .await,
                    )? {
                        Ok(x) => sent = x,
                        Err(e) => read_error = Some(e),
                    }
                }
            }
            let sent = match (read_error, sent) {
                (Some(e), _) => Err(e),
                (None, Some(x)) => Ok(x),
                (None, None) if size < APPEND_MIN => {
                    read_failed(self.send_small(&s.entry.path, f, &before, meta).await)?
                }
                (None, None) => {
                    read_failed(self.send_chunked(&s.entry.path, f, &before, meta).await)?
                }
            };
            let sent = match sent {
                Ok(x) => x,
                // reading the file failed (an I/O error): one file never
                // stops the session; a file begun on the replica is dropped
                Err(e) => {
                    self.send.send(&Message::FileAbort).await?;
                    return Ok(FileOutcome::Unreadable(e.source));
                }
            };
            let Some(sent) = sent else {
                continue; // changed while read: FileAbort went, read again
            };
            self.record_sent(s, &before, meta, sent.full, sent.chunks.as_deref());
            self.st.next_version += 1;
            let version = self.st.next_version;
            let chunks: Option<Arc<[Chunk]>> = sent.chunks.map(Arc::from);
            self.remember_sent(
                &s.entry.path,
                SentFile {
                    dev: before.dev(),
                    ino: before.ino(),
                    size,
                    mtime: meta.mtime,
                    ctime: (before.ctime(), before.ctime_nsec()),
                    chunks: chunks.clone(),
                    version,
                    batch: self.cur_seq,
                },
            );
            if let Some(c) = &chunks {
                if size >= APPEND_MIN {
                    self.learn_chunks(&s.entry.path, version, c);
                }
            }
            let m = &self.ctx.shared.metrics;
            if sent.reused > 0 {
                m.bytes_saved
                    .with_label_values(&["dedup"])
                    .inc_by(sent.reused);
            }
            if sent.appended_from > 0 {
                m.bytes_saved
                    .with_label_values(&["append"])
                    .inc_by(sent.appended_from);
            }
            if sent.compressed > 0 {
                m.bytes_saved
                    .with_label_values(&["compression"])
                    .inc_by(sent.compressed);
            }
            return Ok(FileOutcome::Sent(sent.literal));
        }
        Ok(FileOutcome::Unstable)
    }

    /// Ends a file: `FileEnd` if it did not change while read (G3), else
    /// `FileAbort` and false.
    async fn end_file(
        &mut self,
        f: &std::fs::File,
        before: &std::fs::Metadata,
        hash: [u8; 32],
    ) -> anyhow::Result<bool> {
        let same = tokio::task::block_in_place(|| unchanged_since(f, before))?;
        if same {
            self.send.send(&Message::FileEnd { hash }).await?;
        } else {
            self.send.send(&Message::FileAbort).await?;
        }
        Ok(same)
    }

    /// A small file: read whole, sent whole.
    async fn send_small(
        &mut self,
        p: &RelPath,
        mut f: std::fs::File,
        before: &std::fs::Metadata,
        meta: FileMeta,
    ) -> anyhow::Result<Option<Shipped>> {
        // Read, hash, compress and check in one blocking section (each
        // hand-off of a runtime thread costs about as much as reading a
        // small file). Small files share one compression state: a run of
        // files that do not compress skips the trial, as within a large file.
        let z = &mut self.st.squeeze;
        let saved0 = z.saved;
        let read = tokio::task::block_in_place(|| -> std::io::Result<_> {
            let mut buf = vec![0u8; meta.size as usize];
            let n = transfer::read_full(&mut f, &mut buf)?;
            if n < buf.len() {
                return Ok(None);
            }
            let full = *blake3::hash(&buf).as_bytes();
            let msg = (!buf.is_empty()).then(|| transfer::squeeze(z, buf.into()).0);
            Ok(Some((full, msg, unchanged_since(&f, before)?)))
        })
        .map_err(|e| ReadError::new(p, e))?;
        let saved = self.st.squeeze.saved - saved0;
        self.send
            .send(&Message::FileBegin(FileHeader {
                path: p.clone(),
                mode: meta.mode,
                mtime: meta.mtime,
                size: meta.size,
            }))
            .await?;
        let Some((full, msg, same)) = read else {
            self.send.send(&Message::FileAbort).await?;
            return Ok(None);
        };
        if let Some(msg) = msg {
            self.send.send(&msg).await?;
        }
        if !same {
            self.send.send(&Message::FileAbort).await?;
            return Ok(None);
        }
        self.send.send(&Message::FileEnd { hash: full }).await?;
        Ok(Some(Shipped {
            full: Some(full),
            chunks: None,
            literal: meta.size,
            reused: 0,
            appended_from: 0,
            compressed: saved,
        }))
    }

    /// A larger file, whole: a reader thread cuts, hashes and compresses
    /// while this task ships; chunks the peer holds go as copies.
    async fn send_chunked(
        &mut self,
        p: &RelPath,
        f: std::fs::File,
        before: &std::fs::Metadata,
        meta: FileMeta,
    ) -> anyhow::Result<Option<Shipped>> {
        self.send
            .send(&Message::FileBegin(FileHeader {
                path: p.clone(),
                mode: meta.mode,
                mtime: meta.mtime,
                size: meta.size,
            }))
            .await?;
        let (tx, mut rx) = mpsc::channel(transfer::READ_AHEAD);
        let reader = f.try_clone()?;
        let size = meta.size;
        let worker = tokio::task::spawn_blocking(move || transfer::produce(reader, size, tx));
        let mut literal = 0u64;
        let mut reused = 0u64;
        // a run of copies from one source, merged until it breaks
        let mut run: Option<(RelPath, u64, u64)> = None;
        let mut result = None;
        while let Some(feed) = rx.recv().await {
            match feed {
                transfer::Feed::Chunk { chunk, msg, .. } => {
                    let src = if self.st.chunks.is_empty() {
                        None
                    } else {
                        self.chunk_source(&chunk)
                    };
                    match src {
                        Some((src, off)) => {
                            reused += u64::from(chunk.len);
                            match &mut run {
                                Some((rs, ro, rl)) if *rs == src && *ro + *rl == off => {
                                    *rl += u64::from(chunk.len)
                                }
                                _ => {
                                    if let Some((src, offset, len)) = run.take() {
                                        self.send
                                            .send(&Message::FileCopy { src, offset, len })
                                            .await?;
                                    }
                                    run = Some((src, off, u64::from(chunk.len)));
                                }
                            }
                        }
                        None => {
                            if let Some((src, offset, len)) = run.take() {
                                self.send
                                    .send(&Message::FileCopy { src, offset, len })
                                    .await?;
                            }
                            literal += u64::from(chunk.len);
                            self.send.send(&msg).await?;
                        }
                    }
                }
                transfer::Feed::Short => break,
                transfer::Feed::Failed(e) => {
                    drop(rx);
                    let _ = worker.await;
                    return Err(ReadError::new(p, e).into());
                }
                transfer::Feed::Done {
                    full,
                    chunks,
                    saved,
                } => result = Some((full, chunks, saved)),
            }
        }
        let _ = worker.await;
        if let Some((src, offset, len)) = run.take() {
            self.send
                .send(&Message::FileCopy { src, offset, len })
                .await?;
        }
        let Some((full, chunks, saved)) = result else {
            self.send.send(&Message::FileAbort).await?;
            return Ok(None);
        };
        if !self.end_file(&f, before, full).await? {
            return Ok(None);
        }
        Ok(Some(Shipped {
            full: Some(full),
            chunks: Some(chunks),
            literal,
            reused,
            appended_from: 0,
            // what compression saved on chunks that went as copies is not a saving
            compressed: saved.min(literal),
        }))
    }

    /// A changed file whose chunks the peer holds: diffed against them.
    /// Patched in place when it only grew, or when it is large and mostly
    /// unchanged; `None` (nothing sent) when it is better sent whole.
    async fn send_patch(
        &mut self,
        p: &RelPath,
        f: &std::fs::File,
        before: &std::fs::Metadata,
        prev: &SentFile,
        meta: FileMeta,
    ) -> anyhow::Result<Option<Option<Shipped>>> {
        let old = prev.chunks.clone().expect("chunks");
        let d = match tokio::task::block_in_place(|| transfer::diff(f, &old, prev.size, meta.size))
        {
            Ok(d) => d,
            // shrank while read: whole, next attempt
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(ReadError::new(p, e).into()),
        };
        let in_place: u64 = d
            .pieces
            .iter()
            .filter(|x| x.in_place)
            .map(|x| u64::from(x.chunk.len))
            .sum();
        // A pure append ships only the bytes past the old end (the last old
        // chunk may be re-cut, but its bytes stand).
        let ranges = if d.append {
            if meta.size > prev.size {
                vec![(prev.size, meta.size - prev.size)]
            } else {
                Vec::new()
            }
        } else {
            transfer::fresh_ranges(&d.pieces)
        };
        let worth = d.append || (meta.size >= PATCH_MIN && in_place * 2 >= meta.size);
        if !worth || ranges.len() > ferry_proto::MAX_PATCH_RANGES {
            return Ok(None);
        }
        self.send
            .send(&Message::FilePatch(ferry_proto::PatchHeader {
                path: p.clone(),
                prev_size: prev.size,
                prev_mtime: prev.mtime,
                size: meta.size,
                mode: meta.mode,
                mtime: meta.mtime,
                ranges: ranges.clone(),
            }))
            .await?;
        let mut hasher = blake3::Hasher::new();
        let mut z = transfer::Squeeze::default();
        let (mut literal, mut reused) = (0u64, 0u64);
        for &(off, len) in &ranges {
            // the range's bytes, chunk by chunk where they are whole chunks
            let mut at = off;
            while at < off + len {
                // pieces are sorted by offset: find the one at `at`, if any
                // (an append's range starts inside the re-cut last chunk)
                let piece = d
                    .pieces
                    .binary_search_by_key(&at, |x| x.offset)
                    .ok()
                    .map(|i| &d.pieces[i])
                    .filter(|x| x.offset + u64::from(x.chunk.len) <= off + len);
                let n = match piece {
                    Some(x) => u64::from(x.chunk.len),
                    None => {
                        // up to the next piece boundary, so later pieces align
                        let next = d.pieces.partition_point(|x| x.offset <= at);
                        let stop = d
                            .pieces
                            .get(next)
                            .map_or(off + len, |x| x.offset.min(off + len));
                        (stop - at).clamp(1, MAX_DATA as u64)
                    }
                };
                let mut buf = vec![0u8; n as usize];
                if let Err(e) = tokio::task::block_in_place(|| {
                    std::os::unix::fs::FileExt::read_exact_at(f, &mut buf, at)
                }) {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        self.send.send(&Message::FileAbort).await?;
                        return Ok(Some(None));
                    }
                    return Err(ReadError::new(p, e).into());
                }
                hasher.update(&buf);
                match piece.and_then(|x| self.chunk_source(&x.chunk)) {
                    Some((src, offset)) => {
                        reused += n;
                        self.send
                            .send(&Message::FileCopy {
                                src,
                                offset,
                                len: n,
                            })
                            .await?;
                    }
                    None => {
                        literal += n;
                        let (msg, _) =
                            tokio::task::block_in_place(|| transfer::squeeze(&mut z, buf.into()));
                        self.send.send(&msg).await?;
                    }
                }
                at += n;
            }
        }
        if !self
            .end_file(f, before, *hasher.finalize().as_bytes())
            .await?
        {
            return Ok(Some(None));
        }
        let unsent = meta.size - literal - reused;
        Ok(Some(Some(Shipped {
            full: None,
            chunks: Some(d.pieces.iter().map(|x| x.chunk).collect()),
            literal,
            reused: reused + if d.append { 0 } else { unsent },
            appended_from: if d.append { unsent } else { 0 },
            compressed: z.saved,
        })))
    }
}

/// Reading a file's content failed (an I/O error): the stream itself is
/// intact, at a message boundary.
#[derive(Debug, thiserror::Error)]
#[error("reading {path}: {source}")]
struct ReadError {
    path: String,
    source: std::io::Error,
}

impl ReadError {
    fn new(p: &RelPath, source: std::io::Error) -> ReadError {
        ReadError {
            path: p.display(),
            source,
        }
    }
}

/// Splits a sender step's failure: `Ok(Err(_))` when reading the file
/// failed ([`ReadError`]), `Err` for anything else (the session's).
fn read_failed<T>(r: anyhow::Result<T>) -> anyhow::Result<Result<T, ReadError>> {
    match r {
        Ok(x) => Ok(Ok(x)),
        Err(e) => match e.downcast::<ReadError>() {
            Ok(re) => Ok(Err(re)),
            Err(e) => Err(e),
        },
    }
}

/// G3: the file did not change since `before` (size, mtime, ctime).
fn unchanged_since(f: &std::fs::File, before: &std::fs::Metadata) -> std::io::Result<bool> {
    let after = f.metadata()?;
    Ok(after.len() == before.len()
        && after.mtime() == before.mtime()
        && after.mtime_nsec() == before.mtime_nsec()
        && after.ctime() == before.ctime()
        && after.ctime_nsec() == before.ctime_nsec())
}

/// Size, mode and mtime of a file as read for sending.
#[derive(Clone, Copy)]
struct FileMeta {
    size: u64,
    mode: u32,
    mtime: ferry_proto::Mtime,
}

/// What sending one file took.
struct Shipped {
    /// BLAKE3 of the whole file, when it was read whole.
    full: Option<[u8; 32]>,
    chunks: Option<Vec<Chunk>>,
    /// Content bytes shipped as data (before compression).
    literal: u64,
    /// Bytes the peer took from chunks it held.
    reused: u64,
    /// Bytes an append did not resend.
    appended_from: u64,
    /// What compression saved on the literal bytes.
    compressed: u64,
}

/// Opens a file of the root for reading without following any symlink on
/// the way and without leaving the root, whatever happens to its parents
/// meanwhile (openat2). Kernels before 5.6 lack openat2: then the path is
/// opened with `O_NOFOLLOW` on its last component only.
fn open_beneath(root: &std::fs::File, rel: &RelPath, abs: &Path) -> std::io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    use std::os::unix::ffi::OsStrExt;
    // a path openat2 cannot take in one piece (PATH_MAX): component by
    // component through directory handles, never following a link either
    if rel.as_bytes().len() >= LONG_PATH {
        return scan::open_file_at(root, rel);
    }
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    match rustix::fs::openat2(
        root,
        std::ffi::OsStr::from_bytes(rel.as_bytes()),
        flags,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => Ok(std::fs::File::from(fd)),
        Err(rustix::io::Errno::NOSYS) => std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(abs),
        Err(e) => Err(e.into()),
    }
}

/// From this length on, a path is opened component by component
/// ([`scan::open_file_at`]) rather than in one `openat2` call, which takes
/// at most `PATH_MAX` (4096) bytes including its NUL.
const LONG_PATH: usize = 4000;

/// Waits for a buffered write already in progress on `f` to finish.
///
/// The G3 check compares size, mtime and ctime before and after a read; with
/// multigrain timestamps (Linux 6.13+) every write after our `fstat` changes
/// mtime. What it cannot see is a write that began before the `fstat` and is
/// still copying data. ext4 and XFS take the inode lock shared for
/// `lseek(SEEK_DATA)`, which waits for such a write to release it; on other
/// filesystems this is a cheap no-op.
fn write_barrier(f: &std::fs::File) {
    let _ = rustix::fs::seek(f, rustix::fs::SeekFrom::Data(0));
    // The offset moved: the reads below start at 0.
    let _ = rustix::fs::seek(f, rustix::fs::SeekFrom::Start(0));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64, items: usize) -> Arc<SealedBatch> {
        Arc::new(SealedBatch {
            epoch: 1,
            seq,
            sealed_at_ns: 0,
            sealed_at: Instant::now(),
            exact: true,
            resync_all: false,
            periodic: false,
            renames: Vec::new(),
            items: (0..items)
                .map(|i| Item {
                    path: RelPath::new(format!("f{i}")).unwrap(),
                    state: None,
                    replace: false,
                })
                .collect(),
            moved_dirs: Vec::new(),
        })
    }

    /// The log is bounded by batches and by the items they hold in all; the
    /// newest batch stays even when it alone is over the item bound.
    #[test]
    fn log_is_bounded_by_batches_and_items() {
        let mut log = Log {
            batches: VecDeque::new(),
            cap: 10,
            items: 0,
            max_items: 100,
            last_seq: 0,
            closed: false,
        };
        for seq in 1..=30 {
            log.push(batch(seq, 1));
        }
        assert_eq!((log.first_seq(), log.last_seq), (21, 30), "batch cap");
        for seq in 31..=35 {
            log.push(batch(seq, 30));
        }
        assert!(log.items <= 100, "{} items held", log.items);
        assert_eq!(log.first_seq(), 33, "item cap: 3 batches of 31");
        assert!(log.get(32).is_none() && log.get(33).is_some());
        log.push(batch(36, 500));
        assert_eq!(log.first_seq(), 36, "a huge batch alone is kept");
        assert_eq!(log.items, 501);
        log.push(batch(37, 1));
        assert_eq!(log.first_seq(), 37);
        assert_eq!(log.items, 2);
    }
}

#[cfg(test)]
mod beneath_tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn reads_never_leave_the_root_through_a_swapped_parent() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("d/f"), b"inside").unwrap();
        std::fs::write(outside.join("f"), b"secret").unwrap();
        let fd = std::fs::File::open(&root).unwrap();
        let p = |s: &str| RelPath::new(s).unwrap();
        let mut got = String::new();
        open_beneath(&fd, &p("d/f"), &root.join("d/f"))
            .unwrap()
            .read_to_string(&mut got)
            .unwrap();
        assert_eq!(got, "inside");
        // the parent swapped for a symlink to the outside
        std::fs::rename(root.join("d"), root.join("d.real")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
        let e = open_beneath(&fd, &p("d/f"), &root.join("d/f")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
    }
}

#[cfg(test)]
mod suspect_tests {
    use super::*;

    /// After a reboot, a resync that compares size and mtime would leave a
    /// file whose bytes reverted under the same size and mtime (a power cut
    /// of tests/power.rs did this to an appended log): `suspects` adds the
    /// recently changed look-alikes, and only those.
    #[test]
    fn resync_after_a_reboot_ships_recent_look_alikes() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for n in ["recent", "old", "also_recent", "only_here"] {
            std::fs::write(r.join(n), n).unwrap();
        }
        let ex = Excludes::new(&[], None).unwrap();
        let mut local = Vec::new();
        scan::scan_tree(r, None, &ex, &mut local, &mut Vec::new()).unwrap();
        for s in &mut local {
            if s.entry.path.display() == "old" {
                s.ctime.0 -= 2 * file_index::REBOOT_DISTRUST_SECS;
            }
        }
        // the peer has the same size and mtime of all but only_here
        let remote: Vec<Entry> = local
            .iter()
            .filter(|s| s.entry.path.display() != "only_here")
            .map(|s| s.entry.clone())
            .collect();
        let actions = diff(&local, |s| &s.entry, &remote);
        let sent: Vec<String> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(s) => Some(s.entry.path.display()),
                Action::Delete(_) => None,
            })
            .collect();
        assert_eq!(
            sent,
            ["only_here"],
            "the quick check sends only what is missing"
        );
        let from = file_index::distrust_scanned(&local).unwrap();
        let mut extra: Vec<String> = suspects(&local, &remote, &actions, from)
            .iter()
            .filter_map(|a| match a {
                Action::Send(s) => Some(s.entry.path.display()),
                Action::Delete(_) => None,
            })
            .collect();
        extra.sort();
        assert_eq!(extra, ["also_recent", "recent"]);
    }
}
