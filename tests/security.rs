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

#[path = "support/peer.rs"]
mod peer;

fn wait_metrics_up(node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(node.metrics, "/metrics").is_none() {
        assert!(Instant::now() < deadline, "{}", node.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TLS dir holding `crt_key`'s certificate and key with `ca`'s ca.crt.
fn mixed_tls(
    base: &std::path::Path,
    name: &str,
    crt_key: &std::path::Path,
    ca: &std::path::Path,
) -> std::path::PathBuf {
    let d = base.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(crt_key.join("tls.crt"), d.join("tls.crt")).unwrap();
    std::fs::copy(crt_key.join("tls.key"), d.join("tls.key")).unwrap();
    std::fs::copy(ca.join("ca.crt"), d.join("ca.crt")).unwrap();
    d
}

/// G8: an expired certificate, one from another CA, one for a name not on
/// the peer list, and no client certificate at all: each is refused in the
/// handshake, before the replica accepts any stream (it counts an `auth`
/// error, never reads a hello, never says "primary connected"); the same
/// client with a valid certificate gets in.
#[test]
fn g8_expired_wrong_ca_wrong_name_and_no_client_certificate_are_refused_before_any_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let good = Pki::new(base, "good-ca");
    let evil = Pki::new(base, "evil-ca");
    let mut replica = Node::new(base, "replica", &good.issue("replica"), "replica", &[], &[]);
    replica.peer("primary", 1);
    replica.start();
    wait_metrics_up(&replica);

    let valid = good.issue("primary");
    let expired = base.join("expired-src");
    run_ok(&[
        "cert",
        "issue",
        "--ca",
        good.dir.join("ca").to_str().unwrap(),
        "--name",
        "primary",
        "--out",
        expired.to_str().unwrap(),
        "--days",
        "0",
    ]);
    std::thread::sleep(Duration::from_millis(1100)); // past its notAfter
    let cases: Vec<(&str, std::path::PathBuf, bool)> = vec![
        ("expired certificate", expired.clone(), false),
        (
            "certificate from another CA",
            mixed_tls(base, "wrong-ca", &evil.issue("primary"), &valid),
            false,
        ),
        (
            "certificate for an unlisted name",
            good.issue("mallory"),
            false,
        ),
        ("no client certificate", valid.clone(), true),
    ];
    for (what, dir, anonymous) in cases {
        let auth = metric_labeled(replica.metrics, "ferry_errors_total", "kind=\"auth\"");
        let p = peer::Peer::new(&dir, "primary");
        let conn = if anonymous {
            p.dial_anonymous(replica.port, "replica")
        } else {
            p.dial(replica.port, "replica")
        };
        // TLS 1.3: the client may finish its side before the server has
        // checked the client's certificate; then its first stream fails
        if let Ok(conn) = conn {
            let r = p.rt.block_on(async {
                let (mut s, mut r) = conn.open().await?;
                s.send(&ferry_proto::Message::Hello(ferry_proto::Hello {
                    version: 1,
                    node: "primary".into(),
                    epoch: 1,
                    last_seq: 0,
                }))
                .await?;
                s.flush().await?;
                tokio::time::timeout(Duration::from_secs(5), r.recv())
                    .await
                    .map_err(|_| ferry_net::NetError::Timeout)?
            });
            assert!(
                !matches!(r, Ok(Some(ferry_proto::Message::Welcome(_)))),
                "{what}: the replica answered a hello: {r:?}"
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while metric_labeled(replica.metrics, "ferry_errors_total", "kind=\"auth\"") <= auth {
            assert!(
                Instant::now() < deadline,
                "{what}: no auth refusal counted\n{}",
                replica.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            metric_labeled(replica.metrics, "ferry_errors_total", "kind=\"protocol\""),
            0.0,
            "{what}: got past the handshake to the protocol"
        );
        let log = std::fs::read_to_string(&replica.log).unwrap();
        assert!(
            !log.contains("primary connected"),
            "{what}: {}",
            replica.log_tail()
        );
    }
    // control: the same replica lets the valid certificate in
    let p = peer::Peer::new(&valid, "primary");
    let mut s = p.session(replica.port);
    assert!(matches!(s.hello(1), peer::Reply::Welcome(_)));
    assert_eq!(entries(&replica.root), 0);
}

fn write_atomic(dir: &std::path::Path, name: &str, data: &[u8]) {
    let tmp = dir.join(format!(".{name}.new"));
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn wait_metric_at_least(node: &Node, name: &str, label: &str, v: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let read = || {
        if label.is_empty() {
            node.metric(name)
        } else {
            metric_labeled(node.metrics, name, label)
        }
    };
    while read() < v {
        assert!(
            Instant::now() < deadline,
            "{name}{{{label}}} never reached {v}:\n{}",
            node.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn count_in_log(node: &Node, needle: &str) -> usize {
    std::fs::read_to_string(&node.log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// G8: certificates and CAs rotated without a restart. The CA moves from
/// ca1 to ca2 with an overlap (ca.crt holds both), then new pairs, then ca2
/// alone; the connection-age cap (3 s here) makes the primary redial, and
/// each new connection uses the new files: replication goes on, resuming
/// from the log (no resync), an old-CA certificate is refused, and a bad
/// new pair keeps the last good one, counts `tls_reload` and logs an error.
#[test]
fn g8_certificates_rotate_without_restart_and_a_bad_pair_keeps_the_last_good_one() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let ca1 = Pki::new(base, "ca1");
    let ca2 = Pki::new(base, "ca2");
    let rdir = mixed_tls(
        base,
        "replica-tls",
        &ca1.issue("replica"),
        &ca1.issue("replica"),
    );
    let pdir = mixed_tls(
        base,
        "primary-tls",
        &ca1.issue("primary"),
        &ca1.issue("primary"),
    );
    let age = ["--max-connection-age-secs", "3"];
    let mut replica = Node::new(base, "replica", &rdir, "replica", &[], &age);
    replica.peer("primary", 1);
    replica.start();
    let mut primary = Node::new(
        base,
        "primary",
        &pdir,
        "primary",
        &[("replica", replica.port)],
        &age,
    );
    std::fs::write(primary.root.join("a.txt"), b"before rotation").unwrap();
    primary.start().wait_ready(Duration::from_secs(20));
    wait_converged(&primary.root, &replica.root, Duration::from_secs(30));
    // one batch after the first resync: from here on a redial resumes from
    // the primary's log (a replica at seq 0 is always resynced)
    std::fs::write(primary.root.join("a2.txt"), b"first batch").unwrap();
    wait_converged(&primary.root, &replica.root, Duration::from_secs(30));
    wait_idle(&primary, Duration::from_secs(20));
    let resyncs = primary.metric("ferry_resyncs_total");
    let session_errors = metric_labeled(
        primary.metrics,
        "ferry_errors_total",
        "kind=\"peer_session\"",
    );

    let ca1_pem = std::fs::read(ca1.dir.join("ca/ca.crt")).unwrap();
    let ca2_pem = std::fs::read(ca2.dir.join("ca/ca.crt")).unwrap();
    let both = [ca1_pem.clone(), ca2_pem.clone()].concat();
    // 1. overlap: trust both CAs
    for d in [&rdir, &pdir] {
        write_atomic(d, "ca.crt", &both);
    }
    wait_metric_at_least(&replica, "ferry_tls_reloads_total", "", 1.0);
    wait_metric_at_least(&primary, "ferry_tls_reloads_total", "", 1.0);
    // 2. new pairs from ca2 (key first: a half-rotated set is refused, then fixed)
    for (d, name) in [(&rdir, "replica"), (&pdir, "primary")] {
        let new = ca2.issue(name);
        write_atomic(d, "tls.key", &std::fs::read(new.join("tls.key")).unwrap());
        write_atomic(d, "tls.crt", &std::fs::read(new.join("tls.crt")).unwrap());
    }
    wait_metric_at_least(&replica, "ferry_tls_reloads_total", "", 2.0);
    wait_metric_at_least(&primary, "ferry_tls_reloads_total", "", 2.0);
    // 3. ca2 alone
    for d in [&rdir, &pdir] {
        write_atomic(d, "ca.crt", &ca2_pem);
    }
    wait_metric_at_least(&replica, "ferry_tls_reloads_total", "", 3.0);
    wait_metric_at_least(&primary, "ferry_tls_reloads_total", "", 3.0);
    let connects = count_in_log(&replica, "primary connected");
    // the age cap makes the primary redial: with ca2 only on both sides, the
    // new connection can only be made with the rotated files
    let deadline = Instant::now() + Duration::from_secs(20);
    while count_in_log(&replica, "primary connected") < connects + 2 {
        assert!(
            Instant::now() < deadline,
            "no redial after the age cap:\n{}",
            primary.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(primary.root.join("b.txt"), b"after rotation").unwrap();
    wait_converged(&primary.root, &replica.root, Duration::from_secs(30));

    // an old-CA client certificate is refused now; a ca2 one gets in
    let auth = metric_labeled(replica.metrics, "ferry_errors_total", "kind=\"auth\"");
    let old = peer::Peer::new(
        &mixed_tls(
            base,
            "old-primary",
            &ca1.issue("primary"),
            &ca2.issue("primary"),
        ),
        "primary",
    );
    if let Ok(c) = old.dial(replica.port, "replica") {
        let _ = old.rt.block_on(c.open());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric_labeled(replica.metrics, "ferry_errors_total", "kind=\"auth\"") <= auth {
        assert!(
            Instant::now() < deadline,
            "an old-CA certificate was not refused after rotation"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let fresh = peer::Peer::new(&ca2.issue("primary"), "primary");
    assert!(
        fresh.dial(replica.port, "replica").is_ok(),
        "the replica does not serve its rotated certificate"
    );

    // 4. a bad new pair: the last good one stays, an error is counted
    let bad = metric_labeled(replica.metrics, "ferry_errors_total", "kind=\"tls_reload\"");
    write_atomic(
        &rdir,
        "tls.key",
        b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    );
    wait_metric_at_least(
        &replica,
        "ferry_errors_total",
        "kind=\"tls_reload\"",
        bad + 1.0,
    );
    assert!(std::fs::read_to_string(&replica.log)
        .unwrap()
        .contains("still using the last good certificate"));
    let connects = count_in_log(&replica, "primary connected");
    let deadline = Instant::now() + Duration::from_secs(20);
    while count_in_log(&replica, "primary connected") < connects + 1 {
        assert!(
            Instant::now() < deadline,
            "no redial with the last good pair:\n{}",
            primary.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(primary.root.join("c.txt"), b"after a bad pair").unwrap();
    wait_converged(&primary.root, &replica.root, Duration::from_secs(30));
    assert!(replica.running() && primary.running());
    // every redial resumed from the log: no resync since the first batch
    assert_eq!(
        primary.metric("ferry_resyncs_total"),
        resyncs,
        "a redial resynced instead of resuming:\n{}",
        primary.log_tail()
    );
    assert_eq!(
        metric_labeled(
            replica.metrics,
            "ferry_errors_total",
            "kind=\"inconsistent\""
        ),
        0.0
    );
    // an age-cap redial is routine, not a session error (no FerryErrors alert every hour)
    assert_eq!(
        metric_labeled(
            primary.metrics,
            "ferry_errors_total",
            "kind=\"peer_session\""
        ),
        session_errors,
        "{}",
        primary.log_tail()
    );
}

/// Issue 18, item 5: trust per cluster. Each cluster has its own CA (no CA
/// key is copied anywhere); `ferry cert bundle` puts both CA certificates
/// into each node's ca.crt, and the nodes replicate. A node whose CA is in
/// no bundle is refused, even with a listed name. The bundle refuses a
/// private key and a node certificate.
#[test]
fn g8_trust_bundle_of_two_cluster_cas_replicates_and_a_third_ca_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let eu = Pki::new(base, "eu-ca");
    let us = Pki::new(base, "us-ca");
    let other = Pki::new(base, "other-ca");
    let eu_ca = eu.dir.join("ca/ca.crt");
    let us_ca = us.dir.join("ca/ca.crt");
    let tls_p = eu.issue("eu-west");
    let tls_r = us.issue("us-east");

    // the bundle takes certificates only
    let out = std::process::Command::new(ferry())
        .args(["cert", "bundle", "--out"])
        .arg(base.join("x"))
        .arg(&eu_ca)
        .arg(eu.dir.join("ca/ca.key"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("holds a private key") && text.contains("never its ca.key"),
        "{text}"
    );
    let out = std::process::Command::new(ferry())
        .args(["cert", "bundle", "--out"])
        .arg(base.join("x"))
        .arg(tls_p.join("tls.crt"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("is not a CA certificate"), "{text}");
    assert!(!base.join("x/ca.crt").exists());

    // each node trusts both clusters' CAs
    for tls in [&tls_p, &tls_r] {
        let said = run_ok(&[
            "cert",
            "bundle",
            "--out",
            tls.to_str().unwrap(),
            eu_ca.to_str().unwrap(),
            us_ca.to_str().unwrap(),
            // twice: written once
            eu_ca.to_str().unwrap(),
        ]);
        assert!(said.contains("with 2 CA certificates"), "{said}");
    }
    let mut replica = Node::new(base, "us-east", &tls_r, "replica", &[], &[]);
    replica.peer("eu-west", 1);
    replica.start();
    wait_metrics_up(&replica);
    let mut primary = Node::new(
        base,
        "eu-west",
        &tls_p,
        "primary",
        &[("us-east", replica.port)],
        &[],
    );
    std::fs::create_dir_all(primary.root.join("d")).unwrap();
    std::fs::write(primary.root.join("d/f.txt"), b"across two CAs").unwrap();
    primary.start().wait_ready(Duration::from_secs(20));
    wait_converged(&primary.root, &replica.root, Duration::from_secs(30));
    assert_eq!(
        std::fs::read(replica.root.join("d/f.txt")).unwrap(),
        b"across two CAs"
    );
    // the preflight agrees
    std::fs::create_dir_all(base.join("check-root")).unwrap();
    let check = std::process::Command::new(ferry())
        .args(["check", "--root"])
        .arg(base.join("check-root"))
        .args(["--name", "eu-west", "--tls-dir", tls_p.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--peer"])
        .arg(format!("us-east=127.0.0.1:{}", replica.port))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(0), "{text}");
    assert!(
        text.contains("2 CA certificates") && text.contains("[ok  ] peer us-east"),
        "{text}"
    );
    primary.stop();

    // a listed name from a CA in no bundle: it trusts the replica, the
    // replica does not trust it
    let rogue_tls = other.issue("eu-west");
    run_ok(&[
        "cert",
        "bundle",
        "--out",
        rogue_tls.to_str().unwrap(),
        other.dir.join("ca/ca.crt").to_str().unwrap(),
        us_ca.to_str().unwrap(),
    ]);
    let base2 = base.join("rogue");
    std::fs::create_dir_all(&base2).unwrap();
    let check = std::process::Command::new(ferry())
        .args(["check", "--root"])
        .arg(base.join("check-root"))
        .args([
            "--name",
            "eu-west",
            "--tls-dir",
            rogue_tls.to_str().unwrap(),
        ])
        .args(["--listen", "127.0.0.1:0", "--peer"])
        .arg(format!("us-east=127.0.0.1:{}", replica.port))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{text}");
    assert!(
        text.contains("[FAIL] peer us-east")
            && text.contains("the peer refused this node's certificate"),
        "{text}"
    );
    let mut rogue = Node::new(
        &base2,
        "eu-west",
        &rogue_tls,
        "primary",
        &[("us-east", replica.port)],
        &[],
    );
    std::fs::write(rogue.root.join("payload.txt"), b"from a CA in no bundle").unwrap();
    rogue.start().wait_ready(Duration::from_secs(20));
    assert!(
        wait_for_log(&replica, "UnknownIssuer", Duration::from_secs(20)),
        "the replica did not refuse the third CA:\n{}",
        replica.log_tail()
    );
    assert!(!replica.root.join("payload.txt").exists());
    assert_eq!(
        std::fs::read(replica.root.join("d/f.txt")).unwrap(),
        b"across two CAs"
    );
}
