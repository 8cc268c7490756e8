//! Which primary a replica accepts (G7), and where a stream resumes.

use ferry_proto::{Hello, RefuseCode, WireVersions};

/// What a replica knows when a primary says hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaView {
    /// This node is itself primary.
    pub is_primary: bool,
    /// Highest epoch seen.
    pub epoch: u64,
}

/// The replica's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Accept; `adopt_epoch` is set when the hello carries a newer epoch that
    /// must be made durable before anything else.
    Accept {
        adopt_epoch: Option<u64>,
    },
    Refuse(RefuseCode, String),
}

/// The ferry release whose newest wire version is `v` (for messages that
/// say what to upgrade).
pub fn release_of(v: u16) -> String {
    match v {
        1 => "0.1".into(),
        2 => "0.2".into(),
        v => format!("a release that speaks wire version {v}"),
    }
}

/// The wire version a session between `ours` and `theirs` (the peer
/// `peer`'s range) runs at: the highest both speak. Without one, a sentence
/// naming both ranges and which side to upgrade; `release` is this build's
/// version.
pub fn negotiate(
    ours: WireVersions,
    theirs: WireVersions,
    peer: &str,
    release: &str,
) -> Result<u16, String> {
    if let Some(v) = ours.common(theirs) {
        return Ok(v);
    }
    let fix = if theirs.max < ours.min {
        format!(
            "upgrade {peer} to ferry {} or newer (a node works with peers one release apart)",
            release_of(ours.min)
        )
    } else {
        format!(
            "upgrade this node to ferry {} or newer (a node works with peers one release apart)",
            release_of(theirs.min)
        )
    };
    Err(format!(
        "no common wire version: {peer} speaks {theirs} (ferry {}), this node speaks {ours} (ferry {release}); {fix}",
        release_of(theirs.max)
    ))
}

/// The range a primary offered: a version-1 hello offers 1 only (ferry 0.1
/// sends nothing more); a newer one is followed by its range, whose newest
/// version must be the hello's.
pub fn offered(hello_version: u16, range: Option<WireVersions>) -> Result<WireVersions, String> {
    match (hello_version, range) {
        (0, _) => Err("a hello of wire version 0".into()),
        (1, None) => Ok(WireVersions { min: 1, max: 1 }),
        (1, Some(_)) => Err("a version-1 hello carries no version range".into()),
        (v, Some(r)) if r.max == v && r.min <= r.max && r.min > 0 => Ok(r),
        (v, Some(r)) => Err(format!(
            "a hello of wire version {v} offered the range {r}, which does not end at {v}"
        )),
        (v, None) => Err(format!(
            "a hello of wire version {v} came without its version range"
        )),
    }
}

/// Decides whether a replica accepts a primary (its wire version already
/// agreed, see [`negotiate`]).
pub fn admit(view: ReplicaView, hello: &Hello) -> Admit {
    if view.is_primary {
        return Admit::Refuse(
            RefuseCode::NotReplica,
            "this node is a primary and takes no batches".into(),
        );
    }
    if hello.epoch == u64::MAX {
        // no epoch can follow it: adopting it would make every later
        // promotion overflow (and fence this replica from every primary)
        return Admit::Refuse(
            RefuseCode::Protocol,
            "epoch u64::MAX leaves no room for a next epoch".into(),
        );
    }
    if hello.epoch < view.epoch {
        return Admit::Refuse(
            RefuseCode::StaleEpoch,
            format!(
                "epoch {} is older than epoch {} already seen here: a newer primary exists",
                hello.epoch, view.epoch
            ),
        );
    }
    Admit::Accept {
        adopt_epoch: (hello.epoch > view.epoch).then_some(hello.epoch),
    }
}

/// Where the primary starts sending to a replica that reported it applied
/// `(applied_epoch, applied_seq)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Send batches from `next` on, out of the in-memory log.
    From(u64),
    /// The log no longer (or never) holds what the replica needs: resync.
    Resync,
}

/// `log_first`: the oldest seq still in the log (or `last_seq + 1` when empty).
pub fn resume_point(
    epoch: u64,
    last_seq: u64,
    log_first: u64,
    applied_epoch: u64,
    applied_seq: u64,
) -> Resume {
    if applied_epoch != epoch || applied_seq == 0 || applied_seq > last_seq {
        return Resume::Resync;
    }
    if applied_seq + 1 >= log_first {
        Resume::From(applied_seq + 1)
    } else {
        Resume::Resync
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(epoch: u64) -> Hello {
        Hello {
            version: ferry_proto::VERSION,
            node: "p".into(),
            epoch,
            last_seq: 0,
        }
    }

    #[test]
    fn the_last_epoch_is_never_adopted() {
        let view = ReplicaView {
            is_primary: false,
            epoch: 3,
        };
        assert!(matches!(
            admit(view, &hello(u64::MAX)),
            Admit::Refuse(RefuseCode::Protocol, _)
        ));
        assert_eq!(
            admit(view, &hello(u64::MAX - 1)),
            Admit::Accept {
                adopt_epoch: Some(u64::MAX - 1)
            }
        );
    }

    #[test]
    fn fencing() {
        let v = ReplicaView {
            is_primary: false,
            epoch: 5,
        };
        assert!(matches!(
            admit(v, &hello(4)),
            Admit::Refuse(RefuseCode::StaleEpoch, _)
        ));
        assert_eq!(admit(v, &hello(5)), Admit::Accept { adopt_epoch: None });
        assert_eq!(
            admit(v, &hello(6)),
            Admit::Accept {
                adopt_epoch: Some(6)
            }
        );
        let p = ReplicaView {
            is_primary: true,
            epoch: 1,
        };
        assert!(matches!(
            admit(p, &hello(9)),
            Admit::Refuse(RefuseCode::NotReplica, _)
        ));
    }

    #[test]
    fn versions_negotiate_to_the_highest_common_one() {
        let r = |min, max| WireVersions { min, max };
        // N with N-1, either way round, and N with N
        assert_eq!(negotiate(r(1, 2), r(1, 1), "b", "0.2.0"), Ok(1));
        assert_eq!(negotiate(r(1, 1), r(1, 2), "b", "0.1.0"), Ok(1));
        assert_eq!(negotiate(r(1, 2), r(1, 2), "b", "0.2.0"), Ok(2));
        assert_eq!(negotiate(r(2, 3), r(1, 2), "b", "0.3.0"), Ok(2));
        // two releases apart: the message names both ranges and who to upgrade
        let e = negotiate(r(2, 3), r(1, 1), "us-east", "0.3.0").unwrap_err();
        assert_eq!(
            e,
            "no common wire version: us-east speaks 1 (ferry 0.1), this node speaks 2..=3 (ferry 0.3.0); \
             upgrade us-east to ferry 0.2 or newer (a node works with peers one release apart)"
        );
        let e = negotiate(r(1, 1), r(2, 3), "eu-west", "0.1.0").unwrap_err();
        assert!(e.contains("eu-west speaks 2..=3"), "{e}");
        assert!(e.contains("this node speaks 1 (ferry 0.1.0)"), "{e}");
        assert!(e.contains("upgrade this node to ferry 0.2 or newer"), "{e}");
    }

    #[test]
    fn what_a_hello_offers() {
        let r = |min, max| WireVersions { min, max };
        assert_eq!(offered(1, None), Ok(r(1, 1)));
        assert_eq!(offered(2, Some(r(1, 2))), Ok(r(1, 2)));
        assert_eq!(offered(3, Some(r(3, 3))), Ok(r(3, 3)));
        assert!(offered(0, None).is_err());
        assert!(offered(1, Some(r(1, 1))).is_err());
        assert!(offered(2, None).is_err());
        assert!(offered(3, Some(r(1, 2))).is_err());
    }

    #[test]
    fn resume() {
        // log holds 10..=20
        assert_eq!(resume_point(1, 20, 10, 1, 15), Resume::From(16));
        assert_eq!(resume_point(1, 20, 10, 1, 9), Resume::From(10));
        assert_eq!(resume_point(1, 20, 10, 1, 20), Resume::From(21));
        assert_eq!(resume_point(1, 20, 10, 1, 8), Resume::Resync);
        assert_eq!(resume_point(1, 20, 10, 0, 15), Resume::Resync);
        assert_eq!(resume_point(1, 20, 10, 1, 0), Resume::Resync);
        assert_eq!(resume_point(1, 20, 10, 1, 21), Resume::Resync);
    }
}
