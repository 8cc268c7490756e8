//! G8: only peers with a certificate from the configured CA *and* a name on
//! the peer list get in; anyone else is refused and writes nothing.

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};
use support::*;

fn wait_for_log(node: &Node, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(&node.log)
            .unwrap_or_default()
            .contains(needle)
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn entries(root: &std::path::Path) -> usize {
    snapshot(root).len()
}

#[test]
fn g8_wrong_ca_and_unlisted_name_are_refused_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let good = Pki::new(base, "good-ca");
    let evil = Pki::new(base, "evil-ca");

    // The replica trusts good-ca and expects a primary named "primary".
    let mut replica = Node::new(base, "replica", &good.issue("replica"), "replica", &[], &[]);
    replica.peer("primary", 1);
    replica.start();

    // 1. a "primary" whose certificate comes from another CA
    let mut rogue_ca = Node::new(
        base,
        "primary",
        &evil.issue("primary"),
        "primary",
        &[("replica", replica.port)],
        &[],
    );
    std::fs::write(rogue_ca.root.join("payload.txt"), b"from the wrong CA").unwrap();
    rogue_ca.start().wait_ready(Duration::from_secs(20));
    // 2. a node with a certificate from the right CA but a name not on the list
    let base2 = base.join("second");
    std::fs::create_dir_all(&base2).unwrap();
    let mut rogue_name = Node::new(
        &base2,
        "mallory",
        &good.issue("mallory"),
        "primary",
        &[("replica", replica.port)],
        &[],
    );
    std::fs::write(
        rogue_name.root.join("payload.txt"),
        b"from an unlisted name",
    )
    .unwrap();
    rogue_name.start().wait_ready(Duration::from_secs(20));

    // Both keep trying; both are refused by the replica's handshake.
    assert!(
        wait_for_log(
            &rogue_ca,
            "session with the peer ended",
            Duration::from_secs(20)
        ),
        "wrong-CA primary was not refused:\n{}",
        rogue_ca.log_tail()
    );
    assert!(
        wait_for_log(
            &rogue_name,
            "session with the peer ended",
            Duration::from_secs(20)
        ),
        "unlisted primary was not refused:\n{}",
        rogue_name.log_tail()
    );
    // ...and refused during the TLS handshake itself, before any stream: the
    // replica counts handshake refusals ("auth"), and never got as far as
    // reading a hello it would have to refuse ("protocol").
    std::thread::sleep(Duration::from_secs(2));
    let auth = metric_labeled(replica.metrics, "ferry_errors_total", "kind=\"auth\"");
    let protocol = metric_labeled(replica.metrics, "ferry_errors_total", "kind=\"protocol\"");
    assert!(
        auth >= 2.0,
        "handshake refusals are counted as auth errors ({auth})"
    );
    assert_eq!(
        protocol,
        0.0,
        "a rogue peer got past the handshake:\n{}",
        replica.log_tail()
    );
    let rlog = std::fs::read_to_string(&replica.log).unwrap();
    assert!(
        !rlog.contains("primary connected"),
        "{}",
        replica.log_tail()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        entries(&replica.root),
        0,
        "a refused peer wrote to the replica"
    );

    assert_eq!(replica.metric("ferry_batches_applied_total"), 0.0);
    assert!(replica.running());

    // 3. the other direction: a replica whose certificate comes from another
    // CA is refused by the primary (the primary's dial fails), gets nothing.
    let base3 = base.join("third");
    std::fs::create_dir_all(&base3).unwrap();
    let mut fake_replica = Node::new(
        &base3,
        "replica",
        &evil.issue("replica"),
        "replica",
        &[],
        &[],
    );
    fake_replica.peer("primary", 1);
    fake_replica.start();
    let mut primary = Node::new(
        &base3,
        "primary",
        &good.issue("primary"),
        "primary",
        &[("replica", fake_replica.port)],
        &[],
    );
    std::fs::write(primary.root.join("secret.txt"), b"must not leak").unwrap();
    primary.start().wait_ready(Duration::from_secs(20));
    assert!(
        wait_for_log(
            &primary,
            "session with the peer ended",
            Duration::from_secs(20)
        ),
        "primary did not refuse a replica from another CA:\n{}",
        primary.log_tail()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        entries(&fake_replica.root),
        0,
        "data leaked to a replica from another CA"
    );
    assert_eq!(primary.metric("ferry_peer_connected"), 0.0);

    // Control: the real pair works.
    let mut real_replica = Node::new(
        &base3,
        "replica2",
        &good.issue("replica2"),
        "replica",
        &[],
        &[],
    );
    real_replica.peer("primary2", 1);
    real_replica.start();
    let mut real_primary = Node::new(
        &base3,
        "primary2",
        &good.issue("primary2"),
        "primary",
        &[("replica2", real_replica.port)],
        &[],
    );
    std::fs::write(real_primary.root.join("ok.txt"), b"fine").unwrap();
    real_primary.start().wait_ready(Duration::from_secs(20));
    wait_converged(
        &real_primary.root,
        &real_replica.root,
        Duration::from_secs(30),
    );
}
