//! The primary's side of the handshake, with wire-version negotiation
//! (rolling upgrades, `docs/UPGRADING.md`).
//!
//! A hello's layout is the same in every version (a ferry 0.1 decoder
//! refuses trailing bytes). A primary whose newest version is 2 or more
//! sends `Hello { version: newest }` and right after it `Versions(range)`;
//! the replica answers with a `Welcome` naming the version it chose (the
//! highest both speak), or with `Versions(its range)` and a refusal when
//! they share none. A ferry 0.1 replica reads only the hello and refuses
//! its version (`RefuseCode::Version`, no `Versions` before it): the
//! primary then dials again and says a version-1 hello, if its range holds 1.

use anyhow::{anyhow, bail};
use ferry_core::fence::negotiate;
use ferry_net::{Conn, MsgRecv, MsgSend, Transport};
use ferry_proto::{Hello, Message, Refuse, RefuseCode, Welcome, WireVersions};
use std::net::SocketAddr;
use std::time::Duration;

/// A session the replica welcomed.
pub struct Greeted {
    pub conn: Conn,
    pub send: MsgSend,
    pub recv: MsgRecv,
    pub welcome: Welcome,
    /// The wire version the session runs at.
    pub version: u16,
}

/// How the replica answered.
pub enum Answer {
    Welcome(Box<Greeted>),
    /// A refusal other than of the version (a stale epoch, not a replica...).
    Refused(Refuse),
}

/// What the primary says in its hello besides the version.
pub struct HelloArgs<'a> {
    pub node: &'a str,
    pub epoch: u64,
    pub last_seq: u64,
}

/// Dials `peer` at `addr` and says hello, negotiating the wire version
/// within `ours`; each step waits at most `step` for an answer (`None`: as
/// long as the connection lives; a replica finishes an interrupted batch
/// before it answers).
pub async fn greet(
    transport: &Transport,
    addr: SocketAddr,
    peer: &str,
    args: &HelloArgs<'_>,
    ours: WireVersions,
    step: Option<Duration>,
) -> anyhow::Result<Answer> {
    let release = env!("CARGO_PKG_VERSION");
    if ours.max >= 2 {
        let conn = dial(transport, addr, peer, step).await?;
        let (mut send, mut recv) = conn.open().await?;
        send.send(&hello(args, ours.max)).await?;
        send.send(&Message::Versions(ours)).await?;
        send.flush().await?;
        match next(&mut recv, peer, step).await? {
            Some(Message::Welcome(w)) => {
                let version = chosen(&w, ours, peer)?;
                return Ok(Answer::Welcome(Box::new(Greeted {
                    conn,
                    send,
                    recv,
                    welcome: w,
                    version,
                })));
            }
            Some(Message::Versions(theirs)) => {
                // a refusal follows: no version in common
                let said = match next(&mut recv, peer, step).await? {
                    Some(Message::Refuse(r)) => r.message,
                    _ => String::new(),
                };
                conn.close(0, "no common wire version");
                let msg = negotiate(ours, theirs, peer, release)
                    .err()
                    .unwrap_or_else(|| format!("{peer} refused wire versions {ours}: {said}"));
                bail!("{msg}");
            }
            Some(Message::Refuse(r)) if r.code == RefuseCode::Version => {
                // a ferry 0.1 replica: it speaks version 1 only
                conn.close(0, "wire version 1");
                let theirs = WireVersions { min: 1, max: 1 };
                if let Err(msg) = negotiate(ours, theirs, peer, release) {
                    bail!("{msg} ({peer} said: {})", r.message);
                }
                tracing::info!(
                    peer,
                    "the peer speaks wire version 1 only (ferry 0.1): saying a version-1 hello"
                );
            }
            Some(Message::Refuse(r)) => return Ok(Answer::Refused(r)),
            Some(other) => bail!("{peer} answered hello with {}", kind(&other)),
            None => bail!("{peer} closed the stream during the handshake"),
        }
    }
    if !ours.contains(1) {
        bail!("this node does not speak wire version 1 (it speaks {ours})");
    }
    let conn = dial(transport, addr, peer, step).await?;
    let (mut send, mut recv) = conn.open().await?;
    send.send(&hello(args, 1)).await?;
    send.flush().await?;
    match next(&mut recv, peer, step).await? {
        Some(Message::Welcome(w)) if w.version.is_none() => {
            Ok(Answer::Welcome(Box::new(Greeted {
                conn,
                send,
                recv,
                welcome: w,
                version: 1,
            })))
        }
        Some(Message::Welcome(w)) => bail!(
            "{peer} answered a version-1 hello with a welcome of wire version {:?}",
            w.version
        ),
        Some(Message::Refuse(r)) => Ok(Answer::Refused(r)),
        Some(other) => bail!("{peer} answered hello with {}", kind(&other)),
        None => bail!("{peer} closed the stream during the handshake"),
    }
}

fn hello(args: &HelloArgs<'_>, version: u16) -> Message {
    Message::Hello(Hello {
        version,
        node: args.node.to_owned(),
        epoch: args.epoch,
        last_seq: args.last_seq,
    })
}

/// The version a welcome chose, which must be one both sides speak.
fn chosen(w: &Welcome, ours: WireVersions, peer: &str) -> anyhow::Result<u16> {
    match w.version {
        Some(v) if ours.contains(v) => Ok(v),
        Some(v) => bail!("{peer} chose wire version {v}, which this node never offered ({ours})"),
        None => bail!(
            "{peer} answered a hello of wire version {} without choosing a version",
            ours.max
        ),
    }
}

async fn dial(
    transport: &Transport,
    addr: SocketAddr,
    peer: &str,
    step: Option<Duration>,
) -> anyhow::Result<Conn> {
    let c = transport.connect(addr, peer);
    Ok(match step {
        None => c.await?,
        Some(step) => tokio::time::timeout(step, c)
            .await
            .map_err(|_| anyhow!("{peer} did not answer within {step:?}"))??,
    })
}

async fn next(
    recv: &mut MsgRecv,
    peer: &str,
    step: Option<Duration>,
) -> anyhow::Result<Option<Message>> {
    let r = recv.recv();
    Ok(match step {
        None => r.await?,
        Some(step) => tokio::time::timeout(step, r)
            .await
            .map_err(|_| anyhow!("{peer} did not answer the hello within {step:?}"))??,
    })
}

/// A message's kind, for errors (never its content, which a peer chose).
fn kind(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "a hello",
        Message::Versions(_) => "a version range",
        Message::Welcome(_) => "a welcome",
        Message::Refuse(_) => "a refusal",
        _ => "a message that does not belong in a handshake",
    }
}
