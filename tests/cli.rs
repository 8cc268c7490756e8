//! The command line: bad input gets a clear error naming the cause and the
//! fix; usage errors exit 64 and list every bad setting at once; the demo
//! runs and stops cleanly.

#[path = "support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

struct Out {
    code: Option<i32>,
    text: String,
}

fn ferry_run(args: &[&str]) -> Out {
    let mut child = Command::new(ferry())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(_st) = child.try_wait().unwrap() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code(),
        text: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn check(args: &[&str], code: i32, needles: &[&str]) {
    let o = ferry_run(args);
    assert_eq!(o.code, Some(code), "ferry {args:?}:\n{}", o.text);
    for n in needles {
        assert!(
            o.text.contains(n),
            "ferry {args:?}: {n:?} missing from:\n{}",
            o.text
        );
    }
}

#[test]
fn usage_errors_exit_64_and_list_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    check(
        &[
            "run",
            "--root",
            missing.to_str().unwrap(),
            "--name",
            "not a name",
            "--listen",
            "localhost",
            "--role",
            "boss",
            "--peer",
            "x",
            "--peer",
            "a=host",
            "--exclude",
            "{a,b",
        ],
        64,
        &[
            "--root",
            "--name",
            "--tls-dir is required",
            "--listen",
            "--role",
            "--peer \"x\"",
            "--peer \"a=host\"",
            "--exclude",
        ],
    );
    check(
        &["run"],
        64,
        &[
            "--root is required",
            "--name is required",
            "--tls-dir is required",
        ],
    );
    check(&["no-such-command"], 64, &["unrecognized subcommand"]);
    check(&["--help"], 0, &["demo", "run", "cert", "status", "inject"]);
}

#[test]
fn bad_roots_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let pki = Pki::new(base, "ca");
    let tls = pki.issue("n1");
    let tls = tls.to_str().unwrap();
    let run = |root: &str| -> Vec<String> {
        [
            "run",
            "--root",
            root,
            "--name",
            "n1",
            "--tls-dir",
            tls,
            "--listen",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args = |v: &Vec<String>| v.clone();
    let slash = run("/");
    check(
        &args(&slash).iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        64,
        &["--root /", "whole filesystem"],
    );
    let real = base.join("real");
    std::fs::create_dir_all(&real).unwrap();
    std::os::unix::fs::symlink(&real, base.join("link")).unwrap();
    let l = run(base.join("link").to_str().unwrap());
    check(
        &l.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        64,
        &["is a symlink", "pass the real directory"],
    );
    let f = base.join("file");
    std::fs::write(&f, b"x").unwrap();
    let fr = run(f.to_str().unwrap());
    check(
        &fr.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        64,
        &["not a directory"],
    );
    // unreadable: run as an unprivileged user against a root-only directory
    let private = base.join("private");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", ferry()])
        .args(run(private.to_str().unwrap()))
        .output();
    if let Ok(o) = o {
        let text = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(64), "{text}");
        assert!(
            text.contains("cannot read it") || text.contains("Permission denied"),
            "{text}"
        );
    }
}

#[test]
fn tls_problems_and_busy_ports_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let pki = Pki::new(base, "ca");
    let root = base.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let r = root.to_str().unwrap();
    // missing TLS files
    let empty = base.join("empty-tls");
    std::fs::create_dir_all(&empty).unwrap();
    check(
        &[
            "run",
            "--root",
            r,
            "--name",
            "n1",
            "--tls-dir",
            empty.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        1,
        &["tls.crt", "missing", "ferry cert issue"],
    );
    // a certificate for another name
    let other = pki.issue("other");
    check(
        &[
            "run",
            "--root",
            r,
            "--name",
            "n1",
            "--tls-dir",
            other.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        1,
        &["not issued for the name \"n1\""],
    );
    // a key that does not match the certificate
    let mixed = base.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    let n1 = pki.issue("n1");
    std::fs::copy(n1.join("tls.crt"), mixed.join("tls.crt")).unwrap();
    std::fs::copy(n1.join("ca.crt"), mixed.join("ca.crt")).unwrap();
    std::fs::copy(other.join("tls.key"), mixed.join("tls.key")).unwrap();
    check(
        &[
            "run",
            "--root",
            r,
            "--name",
            "n1",
            "--tls-dir",
            mixed.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        1,
        &["tls.key", "does not match"],
    );
    // a certificate from another CA than ca.crt
    let evil = Pki::new(base, "evil");
    let foreign = base.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let e1 = evil.issue("n1");
    std::fs::copy(e1.join("tls.crt"), foreign.join("tls.crt")).unwrap();
    std::fs::copy(e1.join("tls.key"), foreign.join("tls.key")).unwrap();
    std::fs::copy(n1.join("ca.crt"), foreign.join("ca.crt")).unwrap();
    check(
        &[
            "run",
            "--root",
            r,
            "--name",
            "n1",
            "--tls-dir",
            foreign.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        1,
        &["not valid under ca.crt"],
    );
    // the listen port is taken
    let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    check(
        &[
            "run",
            "--root",
            r,
            "--name",
            "n1",
            "--tls-dir",
            n1.to_str().unwrap(),
            "--listen",
            &addr,
        ],
        1,
        &["cannot listen on", &addr, "another process"],
    );
    // a second daemon on the same root is refused by the state-dir lock
    let port = free_port();
    let mut first = Command::new(ferry())
        .args([
            "run",
            "--root",
            r,
            "--name",
            "n1",
            "--tls-dir",
            n1.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    check(
        &[
            "run",
            "--root",
            r,
            "--name",
            "n1",
            "--tls-dir",
            n1.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        1,
        &["locked by another ferry process"],
    );
    let _ = first.kill();
    let _ = first.wait();
}

#[test]
fn unreachable_peer_is_reported_and_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let pki = Pki::new(base, "ca");
    let dead = free_port();
    let mut p = Node::new(
        base,
        "primary",
        &pki.issue("primary"),
        "primary",
        &[("far", dead)],
        &[],
    );
    p.start().wait_ready(Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // degraded: exit 1
        let (code, st) = status(&p.root, &[]);
        if code == Some(1)
            && st.contains("peer far: disconnected")
            && st.contains("last error: connecting to far")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never named the unreachable peer:\n{st}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(p.running(), "an unreachable peer must not stop the primary");
    assert_eq!(
        p.stop(),
        Some(0),
        "SIGTERM with an unreachable peer exits promptly and cleanly"
    );
}

#[test]
fn demo_runs_and_stops_cleanly_on_ctrl_c() {
    let mut child = Command::new(ferry())
        .arg("demo")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "demo did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("primary root:") && text.contains("replica root:"),
        "{text}"
    );
    assert!(
        text.contains("first in sync after") && !text.contains("not yet"),
        "{text}"
    );
    assert!(text.contains("demo stopped cleanly"), "{text}");
    assert!(
        text.contains("304/304 files"),
        "the demo's sample data did not all arrive:\n{text}"
    );
}

/// Issue 9, item 5: configuration mistakes that the state-dir lock and the
/// root checks above do not cover, each refused at startup with its cause
/// and its fix.
#[test]
fn config_mistakes_are_caught_at_startup() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    // let an unprivileged user reach the files below
    std::fs::set_permissions(base, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pki = Pki::new(base, "ca");
    let n1 = pki.issue("n1");
    let tls = n1.to_str().unwrap();
    let root = base.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let r = root.to_str().unwrap();

    // 1. two processes on one root with different state dirs: the state-dir
    // lock cannot see it; the root lock does
    let sd1 = base.join("state-one");
    let sd2 = base.join("state-two");
    let port = free_port();
    let first = KillOnDrop(
        Command::new(ferry())
            .args([
                "run",
                "--root",
                r,
                "--name",
                "n1",
                "--tls-dir",
                tls,
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--state-dir",
                sd1.to_str().unwrap(),
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // wait until the first one holds its state-dir lock (it took the root lock before)
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sd1.join("lock").exists() {
        assert!(Instant::now() < deadline, "the first daemon did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    check(
        &[
            "run",
            "--root",
            r,
            "--name",
            "n1",
            "--tls-dir",
            tls,
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            sd2.to_str().unwrap(),
        ],
        1,
        &[
            "--root",
            "locked by another ferry process",
            "whatever its --state-dir",
        ],
    );
    drop(first);

    // 2. state left in ROOT/.ferry by an earlier run with the default state
    // dir, while this run keeps its state elsewhere: the old state would be
    // replicated as data
    std::fs::create_dir_all(root.join(".ferry")).unwrap();
    std::fs::write(root.join(".ferry/lock"), b"").unwrap();
    check(
        &[
            "run",
            "--root",
            r,
            "--name",
            "n1",
            "--tls-dir",
            tls,
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            sd2.to_str().unwrap(),
        ],
        64,
        &[
            "holds ferry state from a run with the default state dir",
            "Remove",
        ],
    );
    std::fs::remove_dir_all(root.join(".ferry")).unwrap();

    // 3. a state dir reached through a symlink that lands deep inside the
    // root is seen for what it is
    std::fs::create_dir_all(root.join("app/data")).unwrap();
    std::os::unix::fs::symlink(root.join("app/data"), base.join("sneaky")).unwrap();
    check(
        &[
            "run",
            "--root",
            r,
            "--name",
            "n1",
            "--tls-dir",
            tls,
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            base.join("sneaky/.state").to_str().unwrap(),
        ],
        64,
        &["inside the root it must be a top-level directory"],
    );

    // 4. a replica whose volume the process cannot write
    let ro = base.join("readonly-root");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sd = base.join("nobody-state");
    std::fs::create_dir_all(&sd).unwrap();
    std::fs::set_permissions(&sd, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", ferry()])
        .args([
            "run",
            "--root",
            ro.to_str().unwrap(),
            "--name",
            "n1",
            "--tls-dir",
            tls,
            "--listen",
            "127.0.0.1:0",
            "--role",
            "replica",
            "--state-dir",
            sd.join("s").to_str().unwrap(),
        ])
        .output()
        .expect("setpriv (util-linux) runs");
    let text = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains("is a replica and cannot write its root") && text.contains("read-write"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_dir(&ro).unwrap().count(),
        0,
        "the probe left a file"
    );
}

/// A child process killed when the test ends, pass or fail.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ferry check` with `args`: (exit code, output).
fn ferry_check(args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    let o = ferry_run(&all);
    (o.code, o.text)
}

/// Asserts `ferry check args` exits `code` with every needle in its output.
fn expect_check(args: &[&str], code: i32, needles: &[&str]) -> String {
    let (c, text) = ferry_check(args);
    assert_eq!(c, Some(code), "ferry check {args:?}:\n{text}");
    for n in needles {
        assert!(
            text.contains(n),
            "ferry check {args:?}: {n:?} missing from:\n{text}"
        );
    }
    text
}

/// Waits until a node answers on its metrics port (it has bound its QUIC
/// socket before).
fn wait_serving(node: &mut Node) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(node.metrics, "/healthz").is_none_or(|(c, _)| c != 200) {
        assert!(node.running(), "{} exited:\n{}", node.name, node.log_tail());
        assert!(Instant::now() < deadline, "{} did not start", node.name);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 18, item 2: `ferry check` passes on a healthy node (flags or the
/// FERRY_* variables of the same Pod spec) and names each certificate and
/// peer problem with its fix, exiting 1.
#[test]
fn check_passes_when_healthy_and_names_certificate_and_peer_problems() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let pki = Pki::new(base, "ca");
    let n1 = pki.issue("n1");
    let r1 = pki.issue("r1");
    let root = base.join("root");
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::write(root.join("a/file"), b"x").unwrap();
    let my_port = free_port();
    // a replica that lists n1 as its peer
    let mut replica = Node::new(base, "r1", &r1, "replica", &[("n1", my_port)], &[]);
    replica.start();
    wait_serving(&mut replica);
    let peer = format!("r1=127.0.0.1:{}", replica.port);
    let listen = format!("127.0.0.1:{my_port}");
    let r = root.to_str().unwrap();
    let args = |tls: &std::path::Path| -> Vec<String> {
        [
            "--root",
            r,
            "--name",
            "n1",
            "--tls-dir",
            tls.to_str().unwrap(),
            "--listen",
            &listen,
            "--role",
            "primary",
            "--peer",
            &peer,
            "--peer-timeout-secs",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |tls: &std::path::Path, code: i32, needles: &[&str]| -> String {
        let a = args(tls);
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        expect_check(&a, code, needles)
    };
    let before = snapshot(&root);

    // healthy
    let text = run(
        &n1,
        0,
        &[
            "[ok  ] certificate.chain",
            "[ok  ] certificate.name: tls.crt is issued for n1",
            "[ok  ] certificate.key",
            "[ok  ] certificate.expiry: tls.crt is valid until 20",
            "left)",
            "[ok  ] peer r1",
            "mutual TLS handshake done, it is r1 and accepts n1",
            "[ok  ] root",
            "[ok  ] state dir",
            "[ok  ] inotify: 3 directories to watch",
            "[skip] clock skew: not checked",
            "0 failed",
        ],
    );
    assert!(!text.contains("FAIL"), "{text}");
    // the same from FERRY_* variables (one Pod spec for run and check), as JSON
    let out = Command::new(ferry())
        .args(["check", "--json", "--peer-timeout-secs", "2"])
        .env("FERRY_ROOT", r)
        .env("FERRY_NAME", "n1")
        .env("FERRY_TLS_DIR", &n1)
        .env("FERRY_LISTEN", &listen)
        .env("FERRY_ROLE", "primary")
        .env("FERRY_PEER", &peer)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["schema_version"], 1);
    assert_eq!(j["ok"], true);
    assert_eq!(j["node"], "n1");
    let peer_finding = j["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["check"] == "peer r1")
        .expect("a finding for the peer");
    assert_eq!(peer_finding["status"], "ok", "{j}");

    // an expired certificate (valid for 0 days: it ended at issue time)
    let expired = base.join("tls-expired");
    run_ok(&[
        "cert",
        "issue",
        "--ca",
        pki.dir.join("ca").to_str().unwrap(),
        "--name",
        "n1",
        "--out",
        expired.to_str().unwrap(),
        "--days",
        "0",
    ]);
    run(
        &expired,
        1,
        &[
            "[FAIL] certificate.expiry: tls.crt expired at 20",
            "ago)",
            "fix: issue a new one",
            "[skip] peers",
        ],
    );
    // a certificate for another name
    let other = pki.issue("other");
    run(
        &other,
        1,
        &[
            "[FAIL] certificate.name: tls.crt is issued for [other], not for --name n1",
            "fix: issue a certificate with the DNS name n1",
        ],
    );
    // the key of another certificate
    let mixed = base.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(n1.join("tls.crt"), mixed.join("tls.crt")).unwrap();
    std::fs::copy(n1.join("ca.crt"), mixed.join("ca.crt")).unwrap();
    std::fs::copy(other.join("tls.key"), mixed.join("tls.key")).unwrap();
    let t = run(
        &mixed,
        1,
        &[
            "[FAIL] certificate.key: tls.key does not match tls.crt",
            "fix: put the key",
        ],
    );
    assert!(
        t.contains("[ok  ] certificate.chain"),
        "one problem hides no other:\n{t}"
    );
    // a certificate from another CA than ca.crt
    let evil = Pki::new(base, "evil");
    let foreign = base.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let e1 = evil.issue("n1");
    std::fs::copy(e1.join("tls.crt"), foreign.join("tls.crt")).unwrap();
    std::fs::copy(e1.join("tls.key"), foreign.join("tls.key")).unwrap();
    std::fs::copy(n1.join("ca.crt"), foreign.join("ca.crt")).unwrap();
    run(
        &foreign,
        1,
        &[
            "[FAIL] certificate.chain: tls.crt (issued by CN=evil",
            "does not chain to ca.crt",
            "ferry cert bundle",
        ],
    );
    // an unreachable peer, and a peer that does not list this node
    let dead = free_port();
    let stranger = pki.issue("stranger");
    let text = expect_check(
        &[
            "--root",
            r,
            "--name",
            "stranger",
            "--tls-dir",
            stranger.to_str().unwrap(),
            "--listen",
            &listen,
            "--peer",
            &format!("gone=127.0.0.1:{dead}"),
            "--peer",
            &peer,
            "--peer-timeout-secs",
            "1",
        ],
        1,
        &[
            "[FAIL] peer gone: 127.0.0.1:",
            "no answer within 1s",
            "UDP port",
            "[FAIL] peer r1",
            "the peer refused this node's certificate",
            "fix: on r1: list this node in its --peer (stranger=HOST:PORT)",
        ],
    );
    assert!(text.contains("2 failed"), "{text}");
    // the checks wrote nothing into the root (only the state dir may be written)
    assert_eq!(snapshot(&root), before, "ferry check changed the root");
    assert!(
        replica.running(),
        "the probes upset the peer:\n{}",
        replica.log_tail()
    );
}

/// Issue 18, item 2: an unwritable state dir, a replica's unwritable root,
/// and an inotify limit below the tree's directory count, each named with
/// its fix; the limit read from a user namespace where it is set low, or
/// given with --max-user-watches.
#[test]
fn check_names_unwritable_dirs_and_low_inotify_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    std::fs::set_permissions(base, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pki = Pki::new(base, "ca");
    let n1 = pki.issue("n1");
    let tls = n1.to_str().unwrap();
    let root = base.join("root");
    for d in ["a", "a/b", "c", "d"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let r = root.to_str().unwrap();
    let common = [
        "--root",
        r,
        "--name",
        "n1",
        "--tls-dir",
        tls,
        "--listen",
        "127.0.0.1:0",
    ];
    // healthy: 5 directories (the root too), well under the machine's limit
    expect_check(
        &common,
        0,
        &["[ok  ] inotify: 5 directories to watch", "[ok  ] state dir"],
    );
    // the limit given by flag
    let mut a = common.to_vec();
    a.extend(["--max-user-watches", "4"]);
    expect_check(
        &a,
        1,
        &[
            "[FAIL] inotify: the root holds 5 directories",
            "--max-user-watches is 4",
            "sysctl -w fs.inotify.max_user_watches=",
        ],
    );
    // the limit of a user namespace, set low there
    let script = format!(
        "echo 4 > /proc/sys/user/max_inotify_watches && exec \"$0\" check {}",
        common.join(" ")
    );
    let o = Command::new("unshare")
        .args(["-U", "-r", "sh", "-c", &script, ferry()])
        .output()
        .expect("unshare (util-linux) runs");
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        text.contains("[FAIL] inotify: the root holds 5 directories")
            && text.contains("user.max_inotify_watches (this user namespace) is 4"),
        "{text}"
    );
    // a state dir this user cannot write (owned by root, 0755; run as nobody)
    let sd = base.join("state");
    std::fs::create_dir_all(&sd).unwrap();
    std::fs::set_permissions(&sd, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            ferry(),
            "check",
        ])
        .args(common)
        .args(["--state-dir", sd.to_str().unwrap(), "--role", "replica"])
        .output()
        .expect("setpriv (util-linux) runs");
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        text.contains("[FAIL] state dir: cannot write in")
            && text.contains("owner 0:0, mode 755; this process runs as uid 65534")
            && text.contains("fix: run ferry as the user that owns the volume"),
        "{text}"
    );
    assert!(
        text.contains("[FAIL] root: cannot write") && text.contains("a replica writes every file"),
        "{text}"
    );
    // nothing was written into the root or the state dir
    assert_eq!(std::fs::read_dir(&sd).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 3);
}

/// A rendered webhook configuration as `kubectl kustomize manifests/base`
/// writes it (the parts `ferry check --manifests` reads).
const GOOD_MANIFESTS: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: ferry-inject
  namespace: ferry-system
spec:
  selector:
    app.kubernetes.io/name: ferry-inject
  ports:
    - name: https
      port: 443
      targetPort: https
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: ferry-inject
  namespace: ferry-system
spec:
  template:
    metadata:
      labels:
        app.kubernetes.io/name: ferry-inject
---
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: ferry-inject-serving
  namespace: ferry-system
spec:
  dnsNames:
    - ferry-inject.ferry-system.svc
---
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: ferry-inject
  annotations:
    cert-manager.io/inject-ca-from: ferry-system/ferry-inject-serving
webhooks:
  - name: inject.ferry.io
    failurePolicy: Fail
    clientConfig:
      service:
        name: ferry-inject
        namespace: ferry-system
        path: /mutate
        port: 443
    objectSelector:
      matchExpressions:
        - key: ferry.io/inject
          operator: Exists
"#;

/// Issue 18, item 2: `ferry check --manifests DIR` passes the rendered
/// webhook configuration and names each broken part with its fix.
#[test]
fn check_manifests_names_webhook_mistakes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.to_str().unwrap();
    let with = |yaml: &str| std::fs::write(dir.join("ferry.yaml"), yaml).unwrap();
    with(GOOD_MANIFESTS);
    let text = expect_check(
        &["--manifests", d],
        0,
        &[
            "objectSelector: only pods labelled ferry.io/inject",
            "failurePolicy: Fail",
            "cert-manager injects the CA of Certificate ferry-system/ferry-inject-serving",
            "is issued for ferry-inject.ferry-system.svc",
            "Service ferry-system/ferry-inject port 443 selects the pods of Deployment ferry-inject",
        ],
    );
    assert!(!text.contains("FAIL"), "{text}");
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "failurePolicy: Fail",
            "failurePolicy: Ignore",
            &["failurePolicy: Ignore: while the webhook is down", "fix: set failurePolicy: Fail"],
        ),
        (
            "      matchExpressions:\n        - key: ferry.io/inject\n          operator: Exists\n",
            "      matchLabels:\n        app: web\n",
            &["no objectSelector on the label ferry.io/inject", "every pod of the cluster"],
        ),
        (
            "    cert-manager.io/inject-ca-from: ferry-system/ferry-inject-serving\n",
            "    other: x\n",
            &["neither a caBundle nor cert-manager's", "fix: use manifests/base"],
        ),
        (
            "        port: 443\n    objectSelector",
            "        port: 443\n      caBundle: IyBSZXBsYWNlIHdpdGggeW91ciBDQSBjZXJ0aWZpY2F0ZQo=\n    objectSelector",
            &["caBundle is not the base64 of a PEM certificate", "base64 -w0 ca.crt"],
        ),
        (
            "        name: ferry-inject\n        namespace: ferry-system\n        path",
            "        name: ferry-webhook\n        namespace: ferry-system\n        path",
            &["calls Service ferry-system/ferry-webhook, which is not among the manifests", "Services: [ferry-system/ferry-inject]"],
        ),
        (
            "    - ferry-inject.ferry-system.svc\n",
            "    - webhook.example.com\n",
            &["is issued for [webhook.example.com], not for ferry-inject.ferry-system.svc"],
        ),
        (
            "        app.kubernetes.io/name: ferry-inject\n---\napiVersion: cert",
            "        app.kubernetes.io/name: something-else\n---\napiVersion: cert",
            &["selects no Deployment's pods in ferry-system"],
        ),
        (
            "kind: MutatingWebhookConfiguration",
            "kind: ValidatingWebhookConfiguration",
            &["no MutatingWebhookConfiguration in the 1 YAML files", "kubectl kustomize manifests/base"],
        ),
        ("webhooks:\n", "webhooks: [\n", &["is not valid YAML"]),
    ];
    for (from, to, needles) in cases {
        assert!(GOOD_MANIFESTS.contains(from), "fixture lacks {from:?}");
        with(&GOOD_MANIFESTS.replacen(from, to, 1));
        expect_check(&["--manifests", d], 1, needles);
    }
}

/// `ferry status` of the node whose root is `root`: (exit code, stdout).
fn status(root: &std::path::Path, extra: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(ferry())
        .args(["status", "--root"])
        .arg(root)
        .args(extra)
        .output()
        .unwrap();
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Polls `ferry status` until it exits `code` and `ok` holds of its output.
fn wait_status(
    root: &std::path::Path,
    extra: &[&str],
    code: i32,
    ok: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (c, out) = status(root, extra);
        if c == Some(code) && ok(&out) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "status never exited {code} as expected; last ({c:?}):\n{out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 18, item 6: `ferry status` prints RFC 3339 times and ages, JSON
/// in seconds with a schema version, exits 0 healthy / 1 degraded / 2 down,
/// refreshes with --watch; the primary exports each peer's RPO, the
/// certificate's not-after and process metrics.
#[test]
fn status_health_exit_codes_times_and_rpo() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    // down: no daemon
    let nothing = base.join("nothing");
    std::fs::create_dir_all(&nothing).unwrap();
    let (c, out) = status(&nothing, &[]);
    assert_eq!(c, Some(2), "{out}");
    assert!(out.contains("cannot reach a ferry daemon"), "{out}");

    let pki = Pki::new(base, "ca");
    let mut replica = Node::new(base, "r", &pki.issue("r"), "replica", &[], &[]);
    replica.peer("p", 1);
    replica.start();
    wait_serving(&mut replica);
    let mut primary = Node::new(
        base,
        "p",
        &pki.issue("p"),
        "primary",
        &[("r", replica.port)],
        &[],
    );
    std::fs::write(primary.root.join("a.txt"), b"one").unwrap();
    primary.start().wait_ready(Duration::from_secs(20));
    wait_converged(&primary.root, &replica.root, Duration::from_secs(30));

    // healthy, in text and JSON
    let text = wait_status(&primary.root, &[], 0, |o| o.contains("RPO 0"));
    assert!(text.contains("health:    healthy"), "{text}");
    assert!(
        text.contains("at:        20") && text.contains("Z\n"),
        "{text}"
    );
    assert!(
        text.contains("lag ") && text.contains("(last batch)"),
        "{text}"
    );
    let rtext = wait_status(&replica.root, &[], 0, |o| o.contains("health:    healthy"));
    assert!(
        rtext.contains("sealed at source time 20") && rtext.contains(" ago)"),
        "{rtext}"
    );
    let (c, json) = status(&replica.root, &["--json"]);
    assert_eq!(c, Some(0), "{json}");
    let j: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(j["schema_version"], 1, "{j}");
    let cut = &j["consistent_as_of"];
    assert!(cut["source_time"].as_str().unwrap().ends_with('Z'), "{j}");
    assert!(cut["source_time_unix_s"].as_f64().unwrap() > 1.7e9, "{j}");
    assert!(cut["age_s"].as_f64().unwrap() >= 0.0, "{j}");
    assert!(!json.contains("_ns\"") && !json.contains("_ms\""), "{json}");
    let (_, pjson) = status(&primary.root, &["--json"]);
    let pj: serde_json::Value = serde_json::from_str(pjson.trim()).unwrap();
    assert_eq!(pj["peers"][0]["rpo_s"], 0.0, "{pj}");
    assert!(pj["peers"][0]["lag_s"].as_f64().unwrap() > 0.0, "{pj}");

    // metrics: certificate not-after (a year from now), process metrics, RPO 0
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expiry = primary.metric("ferry_certificate_expiry_timestamp_seconds");
    assert!(
        expiry > now + 360.0 * 86400.0 && expiry < now + 370.0 * 86400.0,
        "{expiry}"
    );
    assert!(primary.metric("process_resident_memory_bytes") > 1e6);
    assert!(primary.metric("process_open_fds") > 0.0);
    let (_, body) = http_get(primary.metrics, "/metrics").unwrap();
    assert!(body.contains("process_cpu_seconds_total "), "{body}");
    assert!(
        body.contains("ferry_peer_rpo_seconds{peer=\"r\"} 0"),
        "{body}"
    );

    // --watch prints again and again until Ctrl-C
    let mut watch = Command::new(ferry())
        .args(["status", "--watch", "--interval", "0.2", "--root"])
        .arg(&primary.root)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.matches("health:").count() < 3 {
        assert!(
            Instant::now() < deadline,
            "--watch did not refresh:\n{seen}"
        );
        if let Ok(b) = rx.recv_timeout(Duration::from_millis(100)) {
            seen += &String::from_utf8_lossy(&b);
        }
    }
    let _ = Command::new("kill")
        .args(["-INT", &watch.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while watch.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "--watch did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(20));
    }

    // the replica goes away: the primary is degraded, and the peer's RPO
    // grows with the age of the batch it lacks
    replica.kill9();
    std::fs::write(primary.root.join("b.txt"), b"two").unwrap();
    let text = wait_status(&primary.root, &[], 1, |o| {
        o.contains("degraded: peer r disconnected") && o.contains("oldest unacknowledged batch")
    });
    assert!(text.contains("peer r: disconnected"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric_labeled(primary.metrics, "ferry_peer_rpo_seconds", "peer=\"r\"") < 1.5 {
        assert!(
            Instant::now() < deadline,
            "the RPO does not grow:\n{}",
            http_get(primary.metrics, "/metrics").unwrap().1
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (c, pjson) = status(&primary.root, &["--json"]);
    assert_eq!(c, Some(1), "{pjson}");
    let pj: serde_json::Value = serde_json::from_str(pjson.trim()).unwrap();
    assert!(pj["peers"][0]["rpo_s"].as_f64().unwrap() >= 1.0, "{pj}");
    assert!(pj["peers"][0]["unacked"].as_u64().unwrap() >= 1, "{pj}");
    // back: RPO 0 again once it has acknowledged everything
    replica.start();
    wait_converged(&primary.root, &replica.root, Duration::from_secs(30));
    wait_status(&primary.root, &[], 0, |o| o.contains("RPO 0"));
}

/// Issue 18, item 6: flags with fixed values are enums (a bad value is a
/// usage error naming the valid ones); shell completions and a man page.
#[test]
fn log_level_is_an_enum_and_completions_and_man_page_print() {
    check(
        &["--log-level", "verbose", "status", "--root", "/"],
        64,
        &["invalid value 'verbose'", "error, warn, info, debug, trace"],
    );
    for shell in ["bash", "zsh", "fish"] {
        let out = run_ok(&["completions", shell]);
        assert!(
            out.contains("ferry") && out.contains("check"),
            "{shell}: {out}"
        );
    }
    assert!(run_ok(&["completions", "bash"]).contains("_ferry()"));
    let man = run_ok(&["man"]);
    assert!(
        man.contains(".TH ferry 1") && man.contains("completions"),
        "{man}"
    );
    let tmp = tempfile::tempdir().unwrap();
    run_ok(&["man", "--out", tmp.path().to_str().unwrap()]);
    let page = std::fs::read_to_string(tmp.path().join("ferry-check.1")).unwrap();
    assert!(page.contains("manifests"), "{page}");
}
