//! Which primary a replica accepts (G7), and where a stream resumes.

use ferry_proto::{Hello, RefuseCode, VERSION};

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

/// Decides whether a replica accepts a primary.
pub fn admit(view: ReplicaView, hello: &Hello) -> Admit {
    if hello.version != VERSION {
        return Admit::Refuse(
            RefuseCode::Version,
            format!(
                "protocol version {} is not supported (this node speaks {VERSION}); run the same ferry version on every node",
                hello.version
            ),
        );
    }
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
            version: VERSION,
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
        let mut h = hello(5);
        h.version = 99;
        assert!(matches!(
            admit(v, &h),
            Admit::Refuse(RefuseCode::Version, _)
        ));
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
