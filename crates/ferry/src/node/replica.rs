//! The replica: accept the primary, stage and apply batches strictly in
//! order on a dedicated apply thread, ack once durable (G2, G4, G7).

use super::Shared;
use crate::events::*;
use anyhow::{anyhow, bail};
use bytes::Bytes;
use ferry_apply::{Applier, ApplyError, ApplyStats, BatchInfo, Recovery};
use ferry_core::fence::{admit, negotiate, offered, Admit, ReplicaView};
use ferry_net::{Conn, MsgSend, Transport};
use ferry_proto::{BatchHeader, Entry, FileHeader, Message, Op, Refuse, RefuseCode, Welcome};
use ferry_store::Role;
use ferry_watch::{scan, Excludes};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

enum Cmd {
    Begin(BatchInfo),
    Op(Op),
    FileBegin(FileHeader),
    Append(ferry_proto::AppendHeader),
    Patch(ferry_proto::PatchHeader),
    Copy(ferry_proto::RelPath, u64, u64),
    Data(Bytes),
    DataZ(u32, Bytes),
    FileEnd([u8; 32]),
    FileAbort,
    Commit(oneshot::Sender<Result<ApplyStats, ApplyError>>),
    /// The committed batch is saved as applied.
    Finished,
    /// A demoted primary's first resync is about to start: preserve what it
    /// wrote after `cut_ns` (conflicts), returning the dir if any.
    Preserve(
        u64,
        u64,
        oneshot::Sender<std::io::Result<Option<std::path::PathBuf>>>,
    ),
    /// After that resync: keep only real conflicts; returns how many.
    Settle(std::path::PathBuf, oneshot::Sender<std::io::Result<u64>>),
    /// Finish what the redo journal holds beyond (epoch, seq).
    Recover((u64, u64), oneshot::Sender<Result<Recovery, ApplyError>>),
    Reset,
    /// The root's manifest; `true`: with content hashes.
    Manifest(
        bool,
        Option<ferry_proto::RelPath>,
        oneshot::Sender<std::io::Result<Vec<Entry>>>,
    ),
}

/// Handle to the apply thread.
#[derive(Clone)]
struct Worker {
    tx: mpsc::Sender<(Cmd, tokio::sync::OwnedSemaphorePermit)>,
    /// What commands queued for the apply thread may hold, in KiB: the
    /// queue is long (small files do not wake the session for every
    /// message) but its memory stays bounded by [`QUEUE_KIB`].
    budget: Arc<tokio::sync::Semaphore>,
    failed: Arc<AtomicBool>,
}

/// Commands queued for the apply thread at most.
const QUEUE_CMDS: usize = 1024;
/// Bytes those commands may hold (file data), in KiB: 16 MiB.
const QUEUE_KIB: u32 = 16 << 10;

fn spawn_worker(shared: &Arc<Shared>) -> anyhow::Result<Worker> {
    let cfg = &shared.cfg;
    let mut applier =
        Applier::open(&cfg.root, cfg.state_rel.clone(), &cfg.state_dir).map_err(|e| {
            anyhow!(
                "cannot open root {} and the redo journal in {} for writing: {e}",
                cfg.root.display(),
                cfg.state_dir.display()
            )
        })?;
    let excludes = Excludes::new(&cfg.excludes, cfg.state_rel.clone())?;
    let root = cfg.root.clone();
    let state_dir = cfg.state_dir.clone();
    let (tx, mut rx) = mpsc::channel::<(Cmd, tokio::sync::OwnedSemaphorePermit)>(QUEUE_CMDS);
    let failed = Arc::new(AtomicBool::new(false));
    let f2 = failed.clone();
    let shared2 = shared.clone();
    std::thread::Builder::new()
        .name("ferry-apply".into())
        .spawn(move || {
            let mut err: Option<ApplyError> = None;
            while let Some((cmd, permit)) = rx.blocking_recv() {
                // the data is in the applier's hands (written) once it returns
                let _permit = permit;
                let r = match cmd {
                    Cmd::Commit(reply) => {
                        let res = match err.take() {
                            Some(e) => {
                                applier.reset();
                                Err(e)
                            }
                            None => applier.commit(),
                        };
                        // steps this filesystem cannot hold: skipped, the rest
                        // of the batch applied; reported with their paths
                        for s in applier.take_skipped() {
                            shared2.skipped(
                                &s.path,
                                crate::telemetry::SKIP_REFUSED_BY_REPLICA,
                                Some(&s.error),
                            );
                        }
                        f2.store(false, Ordering::Relaxed);
                        let _ = reply.send(res);
                        continue;
                    }
                    Cmd::Recover(applied, reply) => {
                        err = None;
                        f2.store(false, Ordering::Relaxed);
                        let _ = reply.send(applier.recover(applied));
                        continue;
                    }
                    Cmd::Finished => {
                        applier.finished();
                        continue;
                    }
                    Cmd::Preserve(epoch, cut, reply) => {
                        let _ = reply.send(super::conflicts::preserve(
                            &root, &excludes, &state_dir, epoch, cut,
                        ));
                        continue;
                    }
                    Cmd::Settle(dir, reply) => {
                        let _ = reply.send(super::conflicts::settle(&root, &dir));
                        continue;
                    }
                    Cmd::Reset => {
                        applier.reset();
                        err = None;
                        f2.store(false, Ordering::Relaxed);
                        continue;
                    }
                    Cmd::Manifest(verify, prefix, reply) => {
                        let mut out = Vec::new();
                        let mut skipped = Vec::new();
                        let r = scan::scan_tree(
                            &root,
                            prefix.as_ref(),
                            &excludes,
                            &mut out,
                            &mut skipped,
                        )
                        .map(|_| {
                            out.into_iter()
                                .map(|s| {
                                    let mut e = s.entry;
                                    if verify && e.kind == ferry_proto::EntryKind::File {
                                        e.hash = scan::hash_at(&root, &e.path).ok();
                                    }
                                    e
                                })
                                .collect()
                        });
                        let _ = reply.send(r);
                        continue;
                    }
                    Cmd::Begin(info) => {
                        err = None;
                        f2.store(false, Ordering::Relaxed);
                        applier.begin(info)
                    }
                    _ if err.is_some() => continue,
                    Cmd::Op(op) => applier.apply_op(&op),
                    Cmd::FileBegin(h) => applier.file_begin(&h),
                    Cmd::Append(a) => applier.append_begin(&a),
                    Cmd::Patch(h) => applier.patch_begin(&h),
                    Cmd::Copy(src, offset, len) => applier.file_copy(&src, offset, len),
                    Cmd::Data(d) => applier.file_data(&d),
                    Cmd::DataZ(n, d) => applier.file_data_compressed(n, &d),
                    Cmd::FileEnd(h) => applier.file_end(&h),
                    Cmd::FileAbort => {
                        applier.file_abort();
                        Ok(())
                    }
                };
                if let Err(e) = r {
                    f2.store(true, Ordering::Relaxed);
                    err = Some(e);
                }
            }
        })?;
    Ok(Worker {
        tx,
        budget: Arc::new(tokio::sync::Semaphore::new(QUEUE_KIB as usize)),
        failed,
    })
}

impl Worker {
    async fn send(&self, c: Cmd) -> anyhow::Result<()> {
        let bytes = match &c {
            Cmd::Data(d) | Cmd::DataZ(_, d) => d.len(),
            _ => 0,
        };
        let kib = (bytes / 1024 + 1).min(QUEUE_KIB as usize) as u32;
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(kib)
            .await
            .map_err(|_| anyhow!("apply thread stopped"))?;
        self.tx
            .send((c, permit))
            .await
            .map_err(|_| anyhow!("apply thread stopped"))
    }
    async fn commit(&self) -> anyhow::Result<Result<ApplyStats, ApplyError>> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Commit(tx)).await?;
        rx.await.map_err(|_| anyhow!("apply thread stopped"))
    }
    async fn recover(&self, applied: (u64, u64)) -> anyhow::Result<Result<Recovery, ApplyError>> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Recover(applied, tx)).await?;
        rx.await.map_err(|_| anyhow!("apply thread stopped"))
    }
}

/// Finishes a batch the redo journal holds (after a crash, or an apply
/// that failed on I/O) and saves it as applied. Returns whether the tree
/// needs a resync to be at a batch boundary.
async fn recover(shared: &Shared, worker: &Worker) -> anyhow::Result<Result<bool, ApplyError>> {
    let st = shared.node_state();
    let r = match worker.recover((st.applied_epoch, st.seq)).await? {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(match r {
        Recovery::Clean => false,
        Recovery::NeedsResync => true,
        Recovery::Finished(info) => {
            let mut ns = shared.node_state();
            ns.seq = info.seq;
            ns.applied_epoch = info.epoch;
            ns.sealed_at_ns = info.sealed_at_ns;
            shared.save_state(ns)?;
            worker.send(Cmd::Finished).await?;
            BatchRecovered {
                seq: info.seq,
                sealed_at_ns: info.sealed_at_ns,
            }
            .emit(&shared.metrics);
            shared.metrics.applied_seq.set(info.seq as i64);
            shared
                .metrics
                .consistent_as_of
                .set(info.sealed_at_ns as f64 / 1e9);
            shared.set_status(|s| {
                s.applied_seq = info.seq;
                s.consistent_as_of_ns = info.sealed_at_ns;
            });
            worker.recover((info.epoch, info.seq)).await?.ok() == Some(Recovery::NeedsResync)
        }
    }))
}

pub async fn start(
    shared: Arc<Shared>,
    transport: Arc<Transport>,
    shutdown: watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> anyhow::Result<()> {
    let root = shared.cfg.root.clone();
    let cleaned =
        tokio::task::spawn_blocking(move || ferry_apply::clean_temp_files(&root)).await??;
    if cleaned > 0 {
        tracing::info!(
            count = cleaned,
            "removed temp files left by an interrupted apply"
        );
    }
    let worker = spawn_worker(&shared)?;
    // G2: a batch a crash interrupted is finished before anything else;
    // the node reports ready only after this.
    let dirty = match recover(&shared, &worker).await? {
        Ok(d) => d,
        Err(e) => {
            // e.g. the disk is still full: sessions retry it
            ApplyFailed { error: &e }.emit(&shared.metrics);
            true
        }
    };
    if dirty {
        tracing::warn!("the replica's tree is between batches (an interrupted apply); it is not ready until the primary's resync completes");
    }
    let st = shared.node_state();
    shared.metrics.applied_seq.set(st.seq as i64);
    shared
        .metrics
        .consistent_as_of
        .set(st.sealed_at_ns as f64 / 1e9);
    shared.set_status(|s| {
        s.applied_seq = st.seq;
        s.consistent_as_of_ns = st.sealed_at_ns;
    });
    // Tell the peers we (re)started: a primary holding a session from our
    // previous life redials now instead of waiting for its idle timeout.
    for p in shared.cfg.peers.clone() {
        let transport = transport.clone();
        tokio::spawn(async move {
            let Ok(Some(addr)) = tokio::net::lookup_host(&p.addr).await.map(|mut a| a.next())
            else {
                return;
            };
            if let Ok(Ok(conn)) =
                tokio::time::timeout(Duration::from_secs(3), transport.connect(addr, &p.name)).await
            {
                conn.close(2, &format!("{}{:016x}", super::GREETING, instance()));
            }
        });
    }
    let sessions = Arc::new(Sessions::default());
    sessions.needs_resync.store(dirty, Ordering::Relaxed);
    tasks.spawn(async move {
        let mut shutdown = shutdown;
        loop {
            let incoming = tokio::select! {
                c = transport.accept() => c,
                _ = shutdown.changed() => {
                    // let the batch in progress finish, then stop
                    let deadline = Instant::now() + shared.cfg.shutdown_grace;
                    while sessions.in_batch.load(Ordering::Relaxed) && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    return;
                }
            };
            let Some(res) = incoming else { return };
            let conn = match res {
                Ok(c) => c,
                Err(e) => {
                    refused_or_gone(&shared, &e);
                    continue;
                }
            };
            let shared2 = shared.clone();
            let worker2 = worker.clone();
            let sessions2 = sessions.clone();
            let span = tracing::info_span!("session", peer = %conn.peer());
            tokio::spawn(tracing::Instrument::instrument(async move {
                let peer = conn.peer().to_owned();
                if let Err(e) = session(&shared2, &conn, &worker2, &sessions2).await {
                    tracing::warn!(peer = %peer, error = %format!("{e:#}"), "primary session ended");
                }
                // Let the primary read our last word (a refusal) and close
                // first: dropping the connection now would discard it.
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            }, span));
        }
    });
    Ok(())
}

/// One primary session applies at a time; a newer one (after a reconnect)
/// cancels the older, which is usually a dead connection not yet timed out.
#[derive(Default)]
struct Sessions {
    lock: tokio::sync::Mutex<()>,
    cancel: Mutex<Option<watch::Sender<bool>>>,
    in_batch: AtomicBool,
    /// The tree is between batches (an abandoned apply, or a machine crash
    /// mid-batch): only a resync batch is accepted, and the node is not
    /// ready until one completes.
    needs_resync: AtomicBool,
    /// Serialises the epoch-owner check (G7).
    owner: Mutex<()>,
}

async fn refuse(send: &mut MsgSend, code: RefuseCode, epoch: u64, message: String) {
    let _ = send
        .send(&Message::Refuse(Refuse {
            code,
            epoch,
            message,
        }))
        .await;
    let _ = send.finish().await;
}

fn code_for(e: &ApplyError) -> RefuseCode {
    match e {
        ApplyError::Inconsistent { .. } => RefuseCode::Inconsistent,
        ApplyError::Refused { .. } | ApplyError::BadStream { .. } => RefuseCode::Protocol,
        ApplyError::NoSpace { .. } | ApplyError::Sync { .. } | ApplyError::Io { .. } => {
            RefuseCode::Apply
        }
    }
}

async fn session(
    shared: &Arc<Shared>,
    conn: &Conn,
    worker: &Worker,
    sessions: &Sessions,
) -> anyhow::Result<()> {
    let m = &shared.metrics;
    let (mut send, mut recv) =
        match tokio::time::timeout(Duration::from_secs(10), conn.accept()).await {
            Ok(Ok(stream)) => stream,
            // closed without a stream: a peer saying it (re)started
            Ok(Err(_)) => return Ok(()),
            Err(_) => bail!("no stream opened within 10 s"),
        };
    // A peer that opens a stream and never says hello is not waited for.
    let first = match tokio::time::timeout(Duration::from_secs(10), recv.recv()).await {
        Ok(Err(ferry_net::NetError::Proto(e))) => {
            return Err(protocol(m, &mut send, &format!("malformed message: {e}")).await)
        }
        Ok(r) => r?,
        Err(_) => {
            return Err(protocol(m, &mut send, "no hello within 10 s").await);
        }
    };
    let hello = match first {
        Some(Message::Hello(h)) => h,
        other => {
            m.error("protocol");
            refuse(&mut send, RefuseCode::Protocol, 0, "expected hello".into()).await;
            bail!("expected hello, got {other:?}");
        }
    };
    if hello.node != conn.peer() {
        m.error("protocol");
        refuse(
            &mut send,
            RefuseCode::Protocol,
            0,
            "hello names another node than the certificate".into(),
        )
        .await;
        bail!(
            "hello from {:?} over a connection authenticated as {:?}",
            hello.node,
            conn.peer()
        );
    }
    // The wire version: the highest both speak (docs/UPGRADING.md). A hello
    // of version 2 or more is followed by the primary's range.
    let range = if hello.version >= 2 {
        match tokio::time::timeout(Duration::from_secs(10), recv.recv()).await {
            Ok(Ok(Some(Message::Versions(r)))) => Some(r),
            Ok(Err(ferry_net::NetError::Proto(e))) => {
                return Err(protocol(m, &mut send, &format!("malformed message: {e}")).await)
            }
            Ok(Ok(_)) | Ok(Err(_)) => {
                return Err(protocol(
                    m,
                    &mut send,
                    &format!(
                        "a hello of wire version {} must be followed by its version range",
                        hello.version
                    ),
                )
                .await)
            }
            Err(_) => {
                return Err(protocol(m, &mut send, "no version range within 10 s").await);
            }
        }
    } else {
        None
    };
    let theirs = match offered(hello.version, range) {
        Ok(r) => r,
        Err(why) => return Err(protocol(m, &mut send, &why).await),
    };
    let version = match negotiate(
        shared.cfg.wire,
        theirs,
        conn.peer(),
        env!("CARGO_PKG_VERSION"),
    ) {
        Ok(v) => v,
        Err(msg) => {
            m.error("version");
            tracing::error!(peer = conn.peer(), reason = %msg, "refused a primary: no common wire version");
            if range.is_some() {
                // a primary that sent a range reads ours, to say who upgrades
                let _ = send.send(&Message::Versions(shared.cfg.wire)).await;
            }
            refuse(
                &mut send,
                RefuseCode::Version,
                shared.node_state().epoch,
                msg,
            )
            .await;
            return Ok(());
        }
    };
    let st = shared.node_state();
    match admit(
        ReplicaView {
            is_primary: st.role == Role::Primary,
            epoch: st.epoch,
        },
        &hello,
    ) {
        Admit::Refuse(code, msg) => {
            m.error(if code == RefuseCode::StaleEpoch {
                "fenced"
            } else {
                "refused_primary"
            });
            tracing::warn!(peer = conn.peer(), ?code, reason = %msg, "refused a primary");
            refuse(&mut send, code, st.epoch, msg).await;
            return Ok(());
        }
        Admit::Accept { adopt_epoch } => {
            // G7: one primary per epoch. The first primary this node accepts
            // at an epoch owns it; another node claiming the same epoch (two
            // replicas promoted at once) is refused.
            let me = name_id(&hello.node);
            // one decision at a time: two primaries saying hello at once
            // must not both find the epoch unowned
            let owned_by_another = {
                let _guard = sessions.owner.lock().expect("owner lock");
                let owner = ferry_store::marker::load(
                    &shared.cfg.state_dir,
                    ferry_store::marker::EPOCH_OWNER,
                );
                match owner.as_deref() {
                    Some([e, who]) if *e == hello.epoch => *who != me,
                    _ => {
                        ferry_store::marker::save(
                            &shared.cfg.state_dir,
                            ferry_store::marker::EPOCH_OWNER,
                            &[hello.epoch, me],
                        )?;
                        false
                    }
                }
            };
            if owned_by_another {
                m.error("fenced");
                let msg = format!("epoch {} already belongs to another primary; promote again to start a newer epoch", hello.epoch);
                tracing::error!(
                    peer = conn.peer(),
                    epoch = hello.epoch,
                    "two primaries claim one epoch: refused the second"
                );
                refuse(&mut send, RefuseCode::StaleEpoch, hello.epoch, msg).await;
                return Ok(());
            }
            if let Some(e) = adopt_epoch {
                let mut ns = shared.node_state();
                ns.epoch = e;
                shared.save_state(ns)?;
                m.epoch.set(e as i64);
                shared.set_status(|s| s.epoch = e);
            }
        }
    }
    // One primary session at a time: the newest wins (the old one is a
    // dead connection not yet timed out).
    let (cancel_tx, mut cancel_rx) = watch::channel(false);
    if let Some(old) = sessions.cancel.lock().expect("sessions").replace(cancel_tx) {
        let _ = old.send(true);
    }
    let _running = tokio::time::timeout(Duration::from_secs(30), sessions.lock.lock())
        .await
        .map_err(|_| anyhow!("the previous primary session did not stop within 30 s"))?;
    worker.send(Cmd::Reset).await?;
    sessions.in_batch.store(false, Ordering::Relaxed);
    // A batch whose apply failed on I/O (a full disk) is finished first.
    match recover(shared, worker).await? {
        Ok(dirty) => sessions.needs_resync.store(dirty, Ordering::Relaxed),
        Err(e) => return Err(apply_failed(shared, &mut send, e).await),
    }
    let st = shared.node_state();
    send.send(&Message::Welcome(Welcome {
        node: shared.cfg.name.clone(),
        epoch: st.epoch,
        applied_epoch: st.applied_epoch,
        applied_seq: st.seq,
        instance: instance(),
        // a version-1 hello gets the version-1 welcome (no version field)
        version: range.map(|_| version),
    }))
    .await?;
    send.flush().await?;
    let caught_up_at = hello.last_seq;
    if st.applied_epoch == hello.epoch
        && st.seq >= caught_up_at
        && !sessions.needs_resync.load(Ordering::Relaxed)
    {
        shared.ready.store(true, Ordering::Relaxed);
    }
    tracing::info!(
        peer = conn.peer(),
        epoch = hello.epoch,
        last_seq = hello.last_seq,
        applied_seq = st.seq,
        wire_version = version,
        "primary connected"
    );
    shared.set_status(|s| {
        s.peers = vec![super::PeerStatus {
            name: conn.peer().to_owned(),
            connected: true,
            acked_seq: st.seq,
            wire_version: version,
            ..Default::default()
        }];
    });
    m.peer_connected.with_label_values(&[conn.peer()]).set(1);
    m.peer_wire_version
        .with_label_values(&[conn.peer()])
        .set(i64::from(version));
    let mut batch: Option<(BatchHeader, Instant)> = None;
    // Where the primary's epoch began (sent by a promoted primary).
    let mut epoch_base: Option<(u64, u64)> = None;
    // A demoted primary's first resync: its conflicts dir, if any.
    let mut demoted_resync: Option<Option<std::path::PathBuf>> = None;
    let res: anyhow::Result<()> = async {
        loop {
            if worker.failed.load(Ordering::Relaxed) {
                // fail fast: fetch the error now rather than at the batch end
                let e = match worker.commit().await? {
                    Err(e) => e,
                    Ok(_) => continue,
                };
                return Err(apply_failed(shared, &mut send, e).await);
            }
            let next = tokio::select! {
                r = recv.recv() => r,
                _ = cancel_rx.changed() => return Err(anyhow!("a newer session from the primary took over")),
            };
            let msg = match next {
                Ok(Some(msg)) => msg,
                Ok(None) => return Ok(()),
                // bytes that do not decode: a typed refusal, then the stream closes
                Err(ferry_net::NetError::Proto(e)) => {
                    return Err(protocol(m, &mut send, &format!("malformed message: {e}")).await)
                }
                Err(e) => return Err(e.into()),
            };
            match msg {
                Message::BatchBegin(h) => {
                    if batch.is_some() {
                        return Err(protocol(m, &mut send, "batch begins inside a batch").await);
                    }
                    let st = shared.node_state();
                    if h.seq == u64::MAX {
                        return Err(protocol(m, &mut send, "batch seq u64::MAX leaves no room for a next batch").await);
                    }
                    if h.epoch != st.epoch {
                        return Err(protocol(m, &mut send, &format!("batch of epoch {} on a session of epoch {}", h.epoch, st.epoch)).await);
                    }
                    if !h.resync && (st.applied_epoch != h.epoch || h.seq != st.seq + 1) {
                        return Err(protocol(m, &mut send, &format!("batch {} out of order: expected {} (G2)", h.seq, st.seq + 1)).await);
                    }
                    if h.resync && st.applied_epoch == h.epoch && h.seq < st.seq {
                        return Err(protocol(m, &mut send, &format!("resync to {} would rewind applied batch {}", h.seq, st.seq)).await);
                    }
                    if !h.resync && sessions.needs_resync.load(Ordering::Relaxed) {
                        m.error("inconsistent");
                        refuse(&mut send, RefuseCode::Inconsistent, st.epoch, "the replica's tree is between batches after an interrupted apply; a resync repairs it".into()).await;
                        bail!("batch {} refused: a resync is needed first", h.seq);
                    }
                    let demoted = ferry_store::marker::load(&shared.cfg.state_dir, ferry_store::marker::DEMOTED);
                    if let (true, Some(d)) = (h.resync, demoted) {
                        // G7: this node was primary of an older epoch; what it
                        // wrote that this primary never got is kept aside first.
                        let old_epoch = d.first().copied().unwrap_or(0);
                        let cut = match epoch_base {
                            Some((base_epoch, sealed)) if base_epoch == old_epoch => sealed,
                            _ => 0, // unknown: keep every file that ends up different
                        };
                        let (tx, rx) = oneshot::channel();
                        worker.send(Cmd::Preserve(h.epoch, cut, tx)).await?;
                        let dir = rx.await.map_err(|_| anyhow!("apply thread stopped"))??;
                        demoted_resync = Some(dir);
                    }
                    worker.send(Cmd::Begin(BatchInfo {
                        epoch: h.epoch,
                        seq: h.seq,
                        sealed_at_ns: h.sealed_at_ns,
                        resync: h.resync,
                        base_epoch: st.applied_epoch,
                        base_seq: st.seq,
                    })).await?;
                    sessions.in_batch.store(true, Ordering::Relaxed);
                    batch = Some((h, Instant::now()));
                }
                Message::Op(op) if batch.is_some() => worker.send(Cmd::Op(op)).await?,
                Message::FileBegin(f) if batch.is_some() => worker.send(Cmd::FileBegin(f)).await?,
                Message::FileAppend(a) if batch.is_some() => worker.send(Cmd::Append(a)).await?,
                Message::FilePatch(h) if batch.is_some() => worker.send(Cmd::Patch(h)).await?,
                Message::FileCopy { src, offset, len } if batch.is_some() => worker.send(Cmd::Copy(src, offset, len)).await?,
                Message::FileData(d) if batch.is_some() => worker.send(Cmd::Data(d)).await?,
                Message::FileDataZ { raw_len, data } if batch.is_some() => worker.send(Cmd::DataZ(raw_len, data)).await?,
                Message::FileEnd { hash } if batch.is_some() => worker.send(Cmd::FileEnd(hash)).await?,
                Message::FileAbort if batch.is_some() => worker.send(Cmd::FileAbort).await?,
                Message::BatchEnd { seq } => {
                    let Some((h, started)) = batch.take() else {
                        return Err(protocol(m, &mut send, "batch end outside a batch").await);
                    };
                    if seq != h.seq {
                        return Err(protocol(m, &mut send, "batch end names another batch").await);
                    }
                    let stats = match worker.commit().await? {
                        Ok(s) => s,
                        Err(e) => return Err(apply_failed(shared, &mut send, e).await),
                    };
                    let mut ns = shared.node_state();
                    ns.seq = h.seq;
                    ns.applied_epoch = h.epoch;
                    ns.sealed_at_ns = h.sealed_at_ns;
                    if let Err(e) = shared.save_state(ns) {
                        m.error("state_fsync");
                        refuse(&mut send, RefuseCode::Apply, ns.epoch, e.to_string()).await;
                        return Err(anyhow!(e));
                    }
                    worker.send(Cmd::Finished).await?;
                    if h.resync {
                        sessions.needs_resync.store(false, Ordering::Relaxed);
                    }
                    if let Some(dir) = demoted_resync.take() {
                        let kept = match dir {
                            Some(dir) => {
                                let (tx, rx) = oneshot::channel();
                                worker.send(Cmd::Settle(dir.clone(), tx)).await?;
                                let kept = rx.await.map_err(|_| anyhow!("apply thread stopped"))??;
                                if kept > 0 {
                                    m.error("conflict");
                                    tracing::error!(files = kept, dir = %dir.display(), "This node's writes as the old primary that the new primary never got are preserved in the conflicts dir (see its MANIFEST.tsv); the tree now follows the new primary.");
                                }
                                kept
                            }
                            None => 0,
                        };
                        ferry_store::marker::remove(&shared.cfg.state_dir, ferry_store::marker::DEMOTED)?;
                        super::conflicts::report(shared);
                        tracing::info!(conflicts = kept, "rejoined as a replica of the new primary");
                    }
                    sessions.in_batch.store(false, Ordering::Relaxed);
                    BatchApplied {
                        seq: h.seq,
                        sealed_at_ns: h.sealed_at_ns,
                        files: stats.files,
                        bytes: stats.bytes,
                        took: started.elapsed(),
                    }
                    .emit(m);
                    shared.set_status(|s| {
                        s.applied_seq = h.seq;
                        s.consistent_as_of_ns = h.sealed_at_ns;
                        if let Some(p) = s.peers.first_mut() {
                            p.acked_seq = h.seq;
                        }
                    });
                    send.send(&Message::Ack { epoch: h.epoch, seq: h.seq }).await?;
                    send.flush().await?;
                    if h.seq >= caught_up_at && !sessions.needs_resync.load(Ordering::Relaxed) {
                        shared.ready.store(true, Ordering::Relaxed);
                    }
                }
                Message::EpochBase { epoch, base_epoch, base_sealed_at_ns, .. } if batch.is_none() => {
                    if epoch == shared.node_state().epoch {
                        epoch_base = Some((base_epoch, base_sealed_at_ns));
                    }
                }
                Message::Promote { epoch, seq } if batch.is_none() => {
                    // planned switchover: the primary hands over to this node
                    let st = shared.node_state();
                    let dirty = sessions.needs_resync.load(Ordering::Relaxed);
                    if epoch != st.epoch + 1 || st.applied_epoch != st.epoch || st.seq != seq || dirty {
                        m.error("inconsistent");
                        let why = format!("cannot take over epoch {epoch} after batch {seq}: this replica is at batch {} of epoch {} (epoch seen {}){}", st.seq, st.applied_epoch, st.epoch, if dirty { ", between batches" } else { "" });
                        refuse(&mut send, RefuseCode::Inconsistent, st.epoch, why.clone()).await;
                        bail!(why);
                    }
                    shared.become_primary(epoch)?;
                    send.send(&Message::Ack { epoch, seq }).await?;
                    send.flush().await?;
                    tracing::warn!(epoch, after_seq = seq, from = %conn.peer(), "Promoted by a planned switchover: restarting as the primary.");
                    let _ = shared.requests.try_send(super::NodeRequest::Restart("promoted by switchover".into()));
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                    return Ok(());
                }
                Message::ManifestRequest { verify, prefix } if batch.is_none() => {
                    let (tx, rx) = oneshot::channel();
                    worker.send(Cmd::Manifest(verify, prefix, tx)).await?;
                    let entries = rx.await.map_err(|_| anyhow!("apply thread stopped"))??;
                    let n = entries.len() as u64;
                    for e in entries {
                        send.send(&Message::ManifestEntry(e)).await?;
                    }
                    send.send(&Message::ManifestEnd { count: n }).await?;
                    send.flush().await?;
                }
                other => {
                    return Err(protocol(m, &mut send, &format!("unexpected {} here", kind_name(&other))).await);
                }
            }
        }
    }
    .await;
    if batch.is_some() {
        // an unfinished batch: drop the file in progress
        let _ = worker.send(Cmd::Reset).await;
    }
    sessions.in_batch.store(false, Ordering::Relaxed);
    m.peer_connected.with_label_values(&[conn.peer()]).set(0);
    shared.set_status(|s| {
        if let Some(p) = s.peers.first_mut() {
            p.connected = false;
        }
    });
    res
}

/// A node name as a number for the epoch-owner record.
fn name_id(name: &str) -> u64 {
    let h = blake3::hash(name.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

fn kind_name(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "hello",
        Message::Versions(_) => "versions",
        Message::Welcome(_) => "welcome",
        Message::Refuse(_) => "refuse",
        Message::ManifestRequest { .. } => "manifest request",
        Message::ManifestEntry(_) => "manifest entry",
        Message::ManifestEnd { .. } => "manifest end",
        Message::BatchBegin(_) => "batch begin",
        Message::Op(_) => "operation outside a batch",
        Message::FileBegin(_) => "file outside a batch",
        Message::FileAppend(_) => "append outside a batch",
        Message::FilePatch(_) => "patch outside a batch",
        Message::FileCopy { .. } => "copied file data outside a batch",
        Message::FileData(_) => "file data outside a batch",
        Message::FileDataZ { .. } => "compressed file data outside a batch",
        Message::FileEnd { .. } => "file end outside a batch",
        Message::FileAbort => "file abort outside a batch",
        Message::BatchEnd { .. } => "batch end",
        Message::Ack { .. } => "ack",
        Message::Promote { .. } => "promote",
        Message::EpochBase { .. } => "epoch base",
    }
}

async fn protocol(m: &crate::telemetry::Metrics, send: &mut MsgSend, why: &str) -> anyhow::Error {
    ProtocolViolation { why }.emit(m);
    refuse(send, RefuseCode::Protocol, 0, why.to_owned()).await;
    anyhow!("protocol violation: {why}")
}

async fn apply_failed(shared: &Shared, send: &mut MsgSend, e: ApplyError) -> anyhow::Error {
    ApplyFailed { error: &e }.emit(&shared.metrics);
    let code = code_for(&e);
    refuse(send, code, shared.node_state().epoch, e.to_string()).await;
    anyhow!(e)
}

/// A failed handshake: a refused certificate or name is an `auth` event; a
/// peer that gave up on its own (closed, timed out) is only logged.
fn refused_or_gone(shared: &Shared, e: &ferry_net::NetError) {
    match e {
        ferry_net::NetError::PeerRefused { .. } => AuthRefused {
            error: &e.to_string(),
        }
        .emit(&shared.metrics),
        ferry_net::NetError::TooManyConnections { .. } => ConnectionLimit {
            error: &e.to_string(),
        }
        .emit(&shared.metrics),
        _ => {
            tracing::debug!(error = %e, "A connection attempt ended before its handshake completed.")
        }
    }
}

/// Whether a primary redials a peer after a connection from it closed with
/// `closed` (code and reason), while its session is with the peer's process
/// `current` (0: none): always, unless it was the start greeting of that
/// very process, or a `ferry check` probe ([`ferry_net::CLOSE_PROBE`]).
pub(crate) fn redial_after(closed: Option<(u64, Vec<u8>)>, current: u64) -> bool {
    let greeted = match closed {
        // `ferry check` probing: nothing restarted
        Some((code, _)) if code == u64::from(ferry_net::CLOSE_PROBE) => return false,
        Some((2, reason)) => std::str::from_utf8(&reason)
            .ok()
            .and_then(|r| r.strip_prefix(super::GREETING))
            .and_then(|h| u64::from_str_radix(h, 16).ok()),
        _ => None,
    };
    current == 0 || greeted != Some(current)
}

/// This process's instance number (random, fixed for its life): in the
/// welcome and the start greeting, so a primary can tell them apart.
pub fn instance() -> u64 {
    static INSTANCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *INSTANCE.get_or_init(|| fastrand::u64(1..))
}

/// On a primary: tell any peer that tries to ship batches here that this
/// node is primary (and notice a newer epoch: this node is then stale).
pub async fn refuse_as_primary(
    shared: Arc<Shared>,
    transport: Arc<Transport>,
    wakers: Arc<std::collections::HashMap<String, Arc<super::Wake>>>,
) {
    while let Some(res) = transport.accept().await {
        let conn = match res {
            Ok(c) => c,
            Err(e) => {
                refused_or_gone(&shared, &e);
                continue;
            }
        };
        if let Some(w) = wakers.get(conn.peer()).cloned() {
            // A peer's start greeting: redial it, unless our session is
            // already with the process that greets (it started, we dialled
            // it, and its greeting arrived after: nothing to redo).
            let conn = conn.clone();
            tokio::spawn(async move {
                let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed_by_peer())
                    .await
                    .ok()
                    .flatten();
                if redial_after(closed, w.instance.load(Ordering::Relaxed)) {
                    w.notify.notify_waiters();
                }
            });
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(Ok((mut send, mut recv))) =
                tokio::time::timeout(Duration::from_secs(10), conn.accept()).await
            else {
                return;
            };
            if let Ok(Some(Message::Hello(h))) = recv.recv().await {
                let st = shared.node_state();
                if h.epoch > st.epoch {
                    shared.metrics.error("fenced");
                    tracing::error!(peer = %h.node, their_epoch = h.epoch, our_epoch = st.epoch, "a primary with a newer epoch exists: this node is stale");
                    if let Err(e) = shared.demote(
                        h.epoch,
                        &format!("{} is primary at epoch {}", h.node, h.epoch),
                    ) {
                        tracing::error!(error = %format!("{e:#}"), "could not record the demotion");
                    }
                }
                refuse(
                    &mut send,
                    RefuseCode::NotReplica,
                    st.epoch,
                    format!("{} is a primary at epoch {}", shared.cfg.name, st.epoch),
                )
                .await;
            }
        });
    }
}

#[cfg(test)]
mod greeting_tests {
    use super::*;

    #[test]
    fn only_a_greeting_from_the_process_in_session_is_ignored() {
        let g = |n: u64| {
            Some((
                2u64,
                format!("{}{n:016x}", crate::node::GREETING).into_bytes(),
            ))
        };
        // a new process greets: redial (the session is with the old one)
        assert!(redial_after(g(7), 5));
        // the process we already talk to greets late: nothing to redo
        assert!(!redial_after(g(5), 5));
        // no session yet, another close, or no close at all: redial
        assert!(redial_after(g(5), 0));
        assert!(redial_after(Some((3, b"age cap".to_vec())), 5));
        assert!(redial_after(Some((2, b"replica started zz".to_vec())), 5));
        assert!(redial_after(None, 5));
        // what the replica sends is what the primary parses
        assert_eq!(
            g(instance()).unwrap().1.len(),
            crate::node::GREETING.len() + 16
        );
        assert!(!redial_after(g(instance()), instance()));
    }
}
