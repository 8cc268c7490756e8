//! Rolling upgrades (docs/UPGRADING.md): the previous release of ferry,
//! built from git history at the commit CHANGELOG.md names, against the code
//! under test, in both roles.
//!
//! The old build is a full build the first time (a few minutes), then cached
//! under `CARGO_TARGET_TMPDIR/ferry-release/COMMIT` (source and target dir);
//! cargo's own lock on that target dir serialises the tests that need it.
//!
//! - `old_replica_with_new_primary`: a new primary replicates to an old
//!   replica at wire version 1, then hands over to it (planned switchover):
//!   the old node is primary and replicates back to the new one.
//! - `rolling_upgrade_and_rollback`: both old; the replica upgraded (old
//!   primary, new replica: version 1), then the primary (version 2), then
//!   the primary rolled back (version 1 again); files replicate at each step.
//! - `no_common_version_is_refused_with_both_ranges`: an old node against a
//!   new one narrowed to version 2 only, both ways, and two new nodes with
//!   disjoint ranges: nothing replicates and each side says which ranges met
//!   and what to upgrade.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

/// The newest released version in CHANGELOG.md and its commit id.
fn previous_release() -> (String, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../CHANGELOG.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for line in text.lines() {
        let Some(head) = line.strip_prefix("## ") else {
            continue;
        };
        let Some((version, rest)) = head.split_once(" — commit ") else {
            continue;
        };
        let commit = rest.trim();
        assert!(
            commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
            "CHANGELOG.md: {line:?} must name the release's full commit id"
        );
        return (version.trim().to_owned(), commit.to_owned());
    }
    panic!("CHANGELOG.md names no release (`## VERSION — commit ID`)");
}

/// Builds the previous release (once; cached) and returns its binary.
fn old_ferry() -> PathBuf {
    let (version, commit) = previous_release();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("ferry-release")
        .join(&commit);
    let src = base.join("src");
    if !src.join("Cargo.toml").exists() {
        let ok = Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "commit {commit} (ferry {version}, from CHANGELOG.md) is not in this repository's history: \
             the upgrade test builds the previous release from it"
        );
        std::fs::create_dir_all(&base).unwrap();
        let tmp = base.join(format!("src.tmp.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let ok = Command::new("sh")
            .arg("-c")
            .arg("git -C \"$1\" archive \"$2\" | tar -x -C \"$3\"")
            .args(["sh"])
            .arg(&repo)
            .arg(&commit)
            .arg(&tmp)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "git archive {commit} failed");
        // another test process may have won the race: its copy is as good
        if std::fs::rename(&tmp, &src).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let log = base.join("build.log");
    let out = Command::new(cargo)
        .current_dir(&src)
        .args([
            "build",
            "--offline",
            "--locked",
            "-p",
            "ferry",
            "--bin",
            "ferry",
        ])
        .arg("--target-dir")
        .arg(base.join("target"))
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .unwrap();
    let _ = std::fs::write(&log, &out.stderr);
    assert!(
        out.status.success(),
        "building ferry {version} ({commit}) failed (log: {}):\n{}",
        log.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = base.join("target/debug/ferry");
    let v = Command::new(&bin).arg("--version").output().unwrap();
    assert!(
        String::from_utf8_lossy(&v.stdout).contains(&version),
        "{} is not ferry {version}: {}",
        bin.display(),
        String::from_utf8_lossy(&v.stdout)
    );
    bin
}

/// Polls `f` every 100 ms until it holds; panics with `what()` after `limit`.
fn wait_for(limit: Duration, mut f: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{}", what());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A primary and a replica, each with its own binary (`None`: the one under test).
struct Pair {
    _dir: tempfile::TempDir,
    primary: Node,
    replica: Node,
}

fn pair(primary_bin: Option<&Path>, replica_bin: Option<&Path>, extra: [&[&str]; 2]) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "upgrade-ca");
    let mut primary = Node::new(
        dir.path(),
        "primary",
        &pki.issue("primary"),
        "primary",
        &[],
        extra[0],
    );
    let mut replica = Node::new(
        dir.path(),
        "replica",
        &pki.issue("replica"),
        "replica",
        &[("primary", primary.port)],
        extra[1],
    );
    primary.peer("replica", replica.port);
    primary.set_binary(primary_bin);
    replica.set_binary(replica_bin);
    Pair {
        _dir: dir,
        primary,
        replica,
    }
}

/// Writes a small tree of every kind of entry, and a large file (chunked).
fn write_tree(root: &Path, tag: &str) {
    let d = root.join(format!("{tag}/sub"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::create_dir_all(root.join(format!("{tag}/empty"))).unwrap();
    std::fs::write(d.join("a.txt"), format!("{tag} a\n")).unwrap();
    let secret = d.join("secret");
    std::fs::write(&secret, format!("{tag} secret\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("sub/a.txt", root.join(format!("{tag}/link"))).unwrap();
    let mut rng = fastrand::Rng::with_seed(tag.len() as u64);
    let big: Vec<u8> = (0..300_000).map(|_| rng.u8(..)).collect();
    std::fs::write(root.join(format!("{tag}/big.bin")), big).unwrap();
}

/// Edits the tree `write_tree` made: an append, a rename, a delete.
fn edit_tree(root: &Path, tag: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(root.join(format!("{tag}/big.bin")))
        .unwrap();
    f.write_all(&[7u8; 70_000]).unwrap();
    drop(f);
    std::fs::rename(
        root.join(format!("{tag}/sub/a.txt")),
        root.join(format!("{tag}/sub/b.txt")),
    )
    .unwrap();
    std::fs::remove_file(root.join(format!("{tag}/sub/secret"))).unwrap();
}

/// The status JSON's entry for `peer` says connected at wire version `v`.
fn at_version(node: &Node, peer: &str, v: u16) -> bool {
    node.status_json().contains(&format!(
        "\"name\":\"{peer}\",\"connected\":true,\"wire_version\":{v},"
    ))
}

fn wait_version(node: &Node, peer: &str, v: u16) {
    wait_for(
        Duration::from_secs(60),
        || at_version(node, peer, v),
        || {
            format!(
                "{} never reported a session with {peer} at wire version {v}: {}\n{}",
                node.name,
                node.status_json(),
                node.log_tail()
            )
        },
    );
    assert_eq!(
        metric_labeled(
            node.metrics,
            "ferry_peer_wire_version",
            &format!("peer=\"{peer}\"")
        ),
        f64::from(v),
        "{}: ferry_peer_wire_version{{peer=\"{peer}\"}}",
        node.name
    );
}

fn converge(from: &Node, to: &Node) {
    wait_converged(&from.root, &to.root, Duration::from_secs(60));
}

fn log_has(node: &Node, text: &str) -> bool {
    std::fs::read_to_string(&node.log).is_ok_and(|s| s.contains(text))
}

const LIMIT: Duration = Duration::from_secs(60);

/// New primary, old replica: files replicate at wire version 1; then a
/// planned switchover makes the old node primary (the hand-over speaks
/// version 1 too) and it replicates back to the new one.
#[test]
fn old_replica_with_new_primary() {
    let old = old_ferry();
    let mut p = pair(None, Some(&old), [&[], &[]]);
    write_tree(&p.primary.root, "one");
    p.replica.start();
    p.primary.start().wait_ready(LIMIT);
    converge(&p.primary, &p.replica);
    wait_version(&p.primary, "replica", 1);
    assert!(
        log_has(&p.primary, "the peer speaks wire version 1 only"),
        "the new primary did not say it fell back to version 1:\n{}",
        p.primary.log_tail()
    );
    edit_tree(&p.primary.root, "one");
    write_tree(&p.primary.root, "two");
    converge(&p.primary, &p.replica);

    // switchover: the new primary hands over to the old replica
    let out = Command::new(ferry())
        .args(["promote", "--to", "replica", "--root"])
        .arg(&p.primary.root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promote --to replica failed: {}{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        p.primary.log_tail(),
        p.replica.log_tail()
    );
    wait_for(
        LIMIT,
        || p.replica.status_json().contains("\"role\":\"primary\""),
        || {
            format!(
                "the old replica did not become primary:\n{}",
                p.replica.log_tail()
            )
        },
    );
    // the old node is primary now; the new one its replica, at version 1
    wait_version(&p.primary, "replica", 1);
    write_tree(&p.replica.root, "three");
    edit_tree(&p.replica.root, "two");
    converge(&p.replica, &p.primary);
}

/// Both nodes on the previous release; upgrade the replica, then the
/// primary, then roll the primary back. Files replicate at every step.
#[test]
fn rolling_upgrade_and_rollback() {
    let old = old_ferry();
    let mut p = pair(Some(&old), Some(&old), [&[], &[]]);
    write_tree(&p.primary.root, "one");
    p.replica.start();
    p.primary.start().wait_ready(LIMIT);
    converge(&p.primary, &p.replica);

    // 1. the replica's cluster is upgraded: old primary, new replica. The
    // new binary resumes from the old one's state: no resync.
    let resyncs = || metric_labeled(p.primary.metrics, "ferry_resyncs_total", "peer=\"replica\"");
    let before = resyncs();
    p.replica.stop();
    p.replica.set_binary(None);
    p.replica.start();
    wait_version(&p.replica, "primary", 1);
    edit_tree(&p.primary.root, "one");
    write_tree(&p.primary.root, "two");
    converge(&p.primary, &p.replica);
    assert_eq!(
        resyncs(),
        before,
        "the upgraded replica was resynced instead of resuming from its state"
    );

    // 2. the primary's cluster is upgraded: both new, version 2
    p.primary.stop();
    p.primary.set_binary(None);
    p.primary.start().wait_ready(LIMIT);
    wait_version(&p.primary, "replica", 2);
    wait_version(&p.replica, "primary", 2);
    edit_tree(&p.primary.root, "two");
    write_tree(&p.primary.root, "three");
    converge(&p.primary, &p.replica);

    // 3. rolled back: the primary runs the previous release again
    p.primary.stop();
    p.primary.set_binary(Some(&old));
    p.primary.start().wait_ready(LIMIT);
    wait_for(
        LIMIT,
        || log_has(&p.replica, "\"wire_version\":1") && at_version(&p.replica, "primary", 1),
        || {
            format!(
                "after the rollback the replica is not at wire version 1: {}\n{}",
                p.replica.status_json(),
                p.replica.log_tail()
            )
        },
    );
    write_tree(&p.primary.root, "four");
    edit_tree(&p.primary.root, "three");
    converge(&p.primary, &p.replica);
}

/// Asserts nothing of `tag` reached the replica.
fn nothing_replicated(replica: &Node, tag: &str) {
    assert!(
        !replica.root.join(tag).exists(),
        "{} received files from a primary it shares no wire version with",
        replica.name
    );
}

#[test]
fn no_common_version_is_refused_with_both_ranges() {
    let old = old_ferry();
    let release = env!("CARGO_PKG_VERSION");

    // a new primary that speaks only version 2, an old replica
    let mut p = pair(None, Some(&old), [&["--wire-versions", "2"], &[]]);
    write_tree(&p.primary.root, "one");
    p.replica.start();
    p.primary.start().wait_ready(LIMIT);
    let want = format!(
        "no common wire version: replica speaks 1 (ferry 0.1), this node speaks 2 (ferry {release}); \
         upgrade replica to ferry 0.2 or newer"
    );
    wait_for(
        LIMIT,
        || log_has(&p.primary, &want) && p.primary.status_json().contains(&want),
        || {
            format!(
                "the new primary never said {want:?}:\n{}\n{}",
                p.primary.status_json(),
                p.primary.log_tail()
            )
        },
    );
    assert!(metric_labeled(p.primary.metrics, "ferry_errors_total", "kind=\"version\"") >= 1.0);
    nothing_replicated(&p.replica, "one");
    drop(p);

    // an old primary, a new replica that speaks only version 2
    let mut p = pair(Some(&old), None, [&[], &["--wire-versions", "2"]]);
    write_tree(&p.primary.root, "one");
    p.replica.start();
    p.primary.start().wait_ready(LIMIT);
    let want = format!(
        "no common wire version: primary speaks 1 (ferry 0.1), this node speaks 2 (ferry {release}); \
         upgrade primary to ferry 0.2 or newer"
    );
    // the old primary logs the replica's refusal, the new replica its reason
    wait_for(
        LIMIT,
        || {
            log_has(
                &p.primary,
                &format!("refused this primary (Version): {want}"),
            ) && log_has(&p.replica, &want)
        },
        || {
            format!(
                "the refusal {want:?} was not logged:\n{}\n{}",
                p.primary.log_tail(),
                p.replica.log_tail()
            )
        },
    );
    nothing_replicated(&p.replica, "one");
    drop(p);

    // two new nodes with disjoint ranges (the primary newer): the replica
    // sends its range before refusing, so the primary names both
    let mut p = pair(
        None,
        None,
        [&["--wire-versions", "2"], &["--wire-versions", "1"]],
    );
    write_tree(&p.primary.root, "one");
    p.replica.start();
    p.primary.start().wait_ready(LIMIT);
    let want = format!(
        "no common wire version: replica speaks 1 (ferry 0.1), this node speaks 2 (ferry {release}); \
         upgrade replica to ferry 0.2 or newer"
    );
    wait_for(
        LIMIT,
        || {
            log_has(&p.primary, &want)
                && log_has(&p.replica, "no common wire version: primary speaks 2")
        },
        || {
            format!(
                "the refusal {want:?} was not logged:\n{}\n{}",
                p.primary.log_tail(),
                p.replica.log_tail()
            )
        },
    );
    assert!(
        metric_labeled(p.replica.metrics, "ferry_errors_total", "kind=\"version\"") >= 1.0,
        "the replica did not count its refusal"
    );
    // the primary learned the range from the replica's Versions, not by
    // taking it for a 0.1 node (that path quotes what the peer said)
    assert!(
        !log_has(&p.primary, "replica said:"),
        "the primary took a new replica for an old one:\n{}",
        p.primary.log_tail()
    );
    nothing_replicated(&p.replica, "one");
}
