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
        let st = run_ok(&["status", "--root", p.root.to_str().unwrap()]);
        if st.contains("peer far: disconnected") && st.contains("last error: connecting to far") {
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
