//! Role changes (issue 8, G7): planned switchover (`ferry promote --to NAME`
//! on the primary) and failover (`ferry promote` on a replica). Both are run
//! by the owner of the node (`ferry run`'s loop), which drains the node
//! first and restarts it in its new role afterwards.

use super::{NodeHandle, Shared};
use anyhow::{anyhow, bail, Context};
use ferry_proto::Message;
use ferry_store::Role;
use std::time::{Duration, Instant};

/// Longest wait for each step of the hand-over conversation.
const STEP: Duration = Duration::from_secs(10);

/// Checks a switchover can start, before anything is drained.
pub fn check_switchover(shared: &Shared, to: &str) -> anyhow::Result<()> {
    let st = shared.node_state();
    if st.role != Role::Primary {
        bail!(
            "this node is a replica; run `ferry promote --to {to}` on the primary, or `ferry promote` here for a failover"
        );
    }
    if !shared.cfg.peers.iter().any(|p| p.name == to) {
        let names: Vec<&str> = shared.cfg.peers.iter().map(|p| p.name.as_str()).collect();
        bail!(
            "{to} is not a peer of this node (peers: {})",
            names.join(", ")
        );
    }
    Ok(())
}

/// Planned switchover, after the node was drained (everything pending
/// sealed and shipped): checks that `to` acknowledged the last batch, asks
/// it to become primary of the next epoch, then makes this node its
/// replica. RPO 0: nothing is handed over before `to` holds every batch.
pub async fn switchover(h: &NodeHandle, to: &str) -> anyhow::Result<String> {
    let shared = &h.shared;
    let t0 = Instant::now();
    let st = shared.node_state();
    let acked = shared
        .metrics
        .acked_seq
        .with_label_values(&[to])
        .get()
        .max(0) as u64;
    if acked < st.seq {
        bail!(
            "{to} acknowledged batch {acked} of {} within the grace period; not switching over (it would lose writes). \
             Check `ferry status` (is {to} connected?), then retry",
            st.seq
        );
    }
    let peer = shared
        .cfg
        .peers
        .iter()
        .find(|p| p.name == to)
        .ok_or_else(|| anyhow!("{to} is not a peer"))?;
    let addr = tokio::net::lookup_host(&peer.addr)
        .await
        .with_context(|| format!("resolving {}", peer.addr))?
        .next()
        .ok_or_else(|| anyhow!("{} resolves to no address", peer.addr))?;
    let greeted = match super::greet::greet(
        &h.transport,
        addr,
        to,
        &super::greet::HelloArgs {
            node: &shared.cfg.name,
            epoch: st.epoch,
            last_seq: st.seq,
        },
        shared.cfg.wire,
        Some(STEP),
    )
    .await?
    {
        super::greet::Answer::Welcome(g) => g,
        super::greet::Answer::Refused(r) => bail!("{to} refused: {}", r.message),
    };
    let super::greet::Greeted {
        conn,
        mut send,
        mut recv,
        welcome: w,
        ..
    } = *greeted;
    if w.applied_epoch != st.epoch || w.applied_seq != st.seq {
        bail!(
            "{to} is at batch {} of epoch {}, not {} of {}; not switching over",
            w.applied_seq,
            w.applied_epoch,
            st.seq,
            st.epoch
        );
    }
    let epoch = st.epoch + 1;
    send.send(&Message::Promote { epoch, seq: st.seq }).await?;
    send.flush().await?;
    match tokio::time::timeout(STEP, recv.recv())
        .await
        .map_err(|_| anyhow!("{to} did not answer within {STEP:?}"))??
    {
        Some(Message::Ack { epoch: e, seq }) if e == epoch && seq == st.seq => {}
        Some(Message::Refuse(r)) => bail!("{to} refused to take over: {}", r.message),
        other => bail!("{to} answered the hand-over with {other:?}"),
    }
    conn.close(0, "switched over");
    // `to` is primary of `epoch` now (durably): this node follows it.
    shared.demote(epoch, &format!("switched over to {to}"))?;
    Ok(format!(
        "switched over to {to}: it is primary at epoch {epoch}, continuing after batch {} (all acknowledged: nothing lost); \
         this node restarts as its replica ({} ms)",
        st.seq,
        t0.elapsed().as_millis()
    ))
}

/// Checks a failover can start.
pub fn check_failover(shared: &Shared) -> anyhow::Result<()> {
    let st = shared.node_state();
    if st.role == Role::Primary {
        bail!("this node is already the primary (epoch {})", st.epoch);
    }
    if st.seq == 0 {
        bail!("this replica has never applied a batch: its data is not a copy of the primary's; promote a replica that has");
    }
    Ok(())
}

/// Failover, after the node was drained (the batch in progress finished):
/// this replica becomes primary of a new epoch, from the batch boundary it
/// sits at.
pub fn failover(shared: &Shared, needs_resync: bool) -> anyhow::Result<String> {
    check_failover(shared)?;
    if needs_resync {
        bail!(
            "this replica's tree is between batches (an interrupted apply that only a resync repairs); \
             it cannot serve as primary. Promote another replica"
        );
    }
    let st = shared.node_state();
    let ns = shared.become_primary(st.epoch + 1)?;
    Ok(format!(
        "promoted: primary at epoch {}, consistent as of batch {} of epoch {} (sealed at source time {:.3}); \
         the node restarts as primary and the other peers follow the new epoch",
        ns.epoch,
        ns.seq,
        ns.applied_epoch,
        ns.sealed_at_ns as f64 / 1e9
    ))
}
