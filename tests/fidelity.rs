//! Process tests of what a tree may hold (issue 16, items 1 and 2): real
//! `ferry` processes on loopback.
//!
//! - G1: symlinks arrive as links with their target verbatim, whatever it
//!   points at (absolute, dangling, leaving the root), also after the link
//!   or its directory moved so that it now leaves the root.
//! - G1 with `--safe-links`: links leaving the root are absent on the
//!   replica, each reported once (log, metric, `ferry status`), and a
//!   rename removes the old name.
//! - G1: an entry the primary cannot replicate (a path over 8 KiB, a socket)
//!   is skipped and reported; the primary keeps running and everything
//!   else converges.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::*;

const CONVERGE: Duration = Duration::from_secs(60);

struct Set {
    _tmp: tempfile::TempDir,
    primary: Node,
    replica: Node,
}

/// A primary and one replica, not started; `extra` goes to both.
fn set(extra: &[&str]) -> Set {
    // FERRY_TEST_KEEP keeps the test dir (for post-mortems)
    let tmp = tempfile::Builder::new()
        .disable_cleanup(std::env::var_os("FERRY_TEST_KEEP").is_some())
        .tempdir()
        .unwrap();
    let base = tmp.path();
    eprintln!("test dir: {}", base.display());
    let pki = Pki::new(base, "ca");
    let mut replica = Node::new(
        base,
        "replica",
        &pki.issue("replica"),
        "replica",
        &[],
        extra,
    );
    let primary = Node::new(
        base,
        "primary",
        &pki.issue("primary"),
        "primary",
        &[("replica", replica.port)],
        extra,
    );
    replica.peer("primary", primary.port);
    Set {
        _tmp: tmp,
        primary,
        replica,
    }
}

fn link(root: &Path, rel: &str, target: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, p).unwrap();
}

/// Polls `cond` until it returns `Ok`; panics with its last `Err` at the
/// deadline.
fn wait_for(timeout: Duration, mut cond: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match cond() {
            Ok(()) => return,
            Err(why) => assert!(Instant::now() < deadline, "timed out: {why}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn skips_of(node: &Node, reason: &str) -> f64 {
    metric_labeled(
        node.metrics,
        "ferry_skipped_entries_total",
        &format!("reason=\"{reason}\""),
    )
}

/// The target of the link at `rel`, as bytes.
fn target_of(root: &Path, rel: &str) -> Option<Vec<u8>> {
    std::fs::read_link(root.join(rel))
        .ok()
        .map(|t| t.as_os_str().as_bytes().to_vec())
}

#[test]
fn g1_links_arrive_verbatim_whatever_they_point_at() {
    let mut s = set(&[]);
    let p = s.primary.root.clone();
    let r = s.replica.root.clone();
    // present before the start: shipped by the first resync
    link(&p, "pre-abs", "/data/releases/42");
    link(&p, "pre-esc", "../../outside");
    link(&p, "pre-dangling", "nowhere");
    std::fs::write(p.join("top.txt"), b"top").unwrap();
    s.replica.start();
    s.primary.start().wait_ready(Duration::from_secs(20));
    // made while running: shipped in batches
    std::fs::create_dir_all(p.join("d/e")).unwrap();
    std::fs::write(p.join("d/e/f.txt"), b"f").unwrap();
    let links = [
        ("abs", "/usr/include"),
        ("d/dangling", "no/such/thing"),
        ("d/e/esc", "../../../x"),
        ("d/e/rel", "../../top.txt"),
        ("d/e/up2", "../../f.txt"),
        ("dot", "."),
        ("chain", "dot/../.."),
    ];
    for (l, t) in links {
        link(&p, l, t);
    }
    wait_converged(&p, &r, CONVERGE);
    for (l, t) in links.iter().copied().chain([
        ("pre-abs", "/data/releases/42"),
        ("pre-esc", "../../outside"),
    ]) {
        assert_eq!(target_of(&r, l).as_deref(), Some(t.as_bytes()), "{l}");
    }
    // a relative link moved so that it now leaves the root, and a directory
    // moved with a link in it that then leaves the root too
    std::fs::rename(p.join("d/e/rel"), p.join("rel-moved")).unwrap();
    std::fs::rename(p.join("d/e"), p.join("e2")).unwrap();
    wait_converged(&p, &r, CONVERGE);
    assert_eq!(
        target_of(&r, "rel-moved").as_deref(),
        Some(&b"../../top.txt"[..])
    );
    assert_eq!(
        target_of(&r, "e2/up2").as_deref(),
        Some(&b"../../f.txt"[..])
    );
    assert_eq!(target_of(&r, "e2/esc").as_deref(), Some(&b"../../../x"[..]));
    assert!(target_of(&r, "d/e/rel").is_none() && !r.join("d/e").exists());
    // the link moved again, back inside: still the same link
    std::fs::rename(p.join("rel-moved"), p.join("e2/rel")).unwrap();
    wait_converged(&p, &r, CONVERGE);
    assert_eq!(s.primary.metric("ferry_skipped_entries_total"), 0.0);
    assert_eq!(s.replica.metric("ferry_skipped_entries_total"), 0.0);
}

/// The `--safe-links` rule, as the test sees it (ferry_proto's).
fn unsafe_link(rel: &Path, target: &Path) -> bool {
    let rel = ferry_proto::RelPath::new(rel.as_os_str().as_bytes().to_vec()).unwrap();
    ferry_proto::link_stays_inside(&rel, target.as_os_str().as_bytes()).is_err()
}

/// The primary's tree without the links `--safe-links` skips.
fn safe_view(root: &Path) -> (BTreeMap<PathBuf, Ent>, Vec<PathBuf>) {
    let mut snap = snapshot(root);
    let skipped: Vec<PathBuf> = snap
        .iter()
        .filter_map(|(k, v)| match v {
            Ent::Link(t) if unsafe_link(k, t) => Some(k.clone()),
            _ => None,
        })
        .collect();
    for k in &skipped {
        snap.remove(k);
    }
    (snap, skipped)
}

fn wait_safe_converged(p: &Path, r: &Path) -> Vec<PathBuf> {
    let mut skipped = Vec::new();
    wait_for(CONVERGE, || {
        let (want, sk) = safe_view(p);
        let got = snapshot(r);
        skipped = sk;
        if want == got {
            Ok(())
        } else {
            Err(diff_summary(&want, &got))
        }
    });
    skipped
}

/// Waits until `metric{reason}` on `node` is `n`.
fn wait_skips(node: &Node, reason: &str, n: f64) {
    wait_for(Duration::from_secs(20), || {
        let got = skips_of(node, reason);
        if got == n {
            Ok(())
        } else {
            Err(format!("{reason}: {got} skipped, want {n}"))
        }
    });
}

#[test]
fn g1_safe_links_leaves_out_links_leaving_the_root_and_reports_each_once() {
    // periodic rescans every second: each meets the skipped links again
    let mut s = set(&["--safe-links", "--rescan-interval", "1s"]);
    let p = s.primary.root.clone();
    let r = s.replica.root.clone();
    std::fs::write(p.join("top.txt"), b"top").unwrap();
    link(&p, "pre-abs", "/data/releases/42");
    link(&p, "pre-in", "top.txt");
    s.replica.start();
    s.primary.start().wait_ready(Duration::from_secs(20));
    std::fs::create_dir_all(p.join("d/e")).unwrap();
    for (l, t) in [
        ("esc", "../outside"),
        ("d/chain", "e/../../.."),
        ("d/dangling", "nowhere"),
        ("d/e/in", "../../top.txt"),
        ("esc-top", "../x/top.txt"),
    ] {
        link(&p, l, t);
    }
    let skipped = wait_safe_converged(&p, &r);
    let want: Vec<PathBuf> = ["d/chain", "esc", "esc-top", "pre-abs"]
        .iter()
        .map(PathBuf::from)
        .collect();
    assert_eq!(skipped, want, "the test's own view of what is unsafe");
    for l in &want {
        assert!(
            r.join(l).symlink_metadata().is_err(),
            "{l:?} on the replica"
        );
    }
    assert_eq!(
        target_of(&r, "d/e/in").as_deref(),
        Some(&b"../../top.txt"[..])
    );
    assert_eq!(
        target_of(&r, "d/dangling").as_deref(),
        Some(&b"nowhere"[..])
    );
    // reported once each, however many rescans meet them again
    wait_skips(&s.primary, "unsafe_link", 4.0);
    let rescans = s.primary.metric("ferry_rescans_total");
    wait_for(Duration::from_secs(30), || {
        let now = s.primary.metric("ferry_rescans_total");
        if now >= rescans + 2.0 {
            Ok(())
        } else {
            Err(format!("two periodic rescans: {rescans} -> {now}"))
        }
    });
    assert_eq!(skips_of(&s.primary, "unsafe_link"), 4.0);
    let st = s.primary.status_json();
    for l in ["esc", "d/chain", "pre-abs", "esc-top"] {
        assert!(
            st.contains(&format!("{{\"path\":\"{l}\",\"reason\":\"unsafe_link\"")),
            "{l}: {st}"
        );
    }
    assert!(st.contains("\"skipped\":{\"count\":4,"), "{st}");
    let log = std::fs::read_to_string(&s.primary.log).unwrap();
    let lines = log
        .lines()
        .filter(|l| l.contains("not replicated") && l.contains("esc-top"))
        .count();
    assert_eq!(lines, 1, "one log line for esc-top");
    assert_eq!(s.replica.metric("ferry_skipped_entries_total"), 0.0);
}

#[test]
fn g1_safe_links_a_moved_link_loses_its_old_name_and_arrives_only_when_inside() {
    // no periodic rescan: nothing but the batches themselves may repair
    let mut s = set(&["--safe-links", "--rescan-interval", "0"]);
    let p = s.primary.root.clone();
    let r = s.replica.root.clone();
    std::fs::write(p.join("top.txt"), b"top").unwrap();
    std::fs::create_dir_all(p.join("d/e")).unwrap();
    std::fs::create_dir_all(p.join("a/b")).unwrap();
    std::fs::create_dir_all(p.join("x")).unwrap();
    s.replica.start();
    s.primary.start().wait_ready(Duration::from_secs(20));
    for (l, t) in [
        ("d/e/in", "../../top.txt"),
        ("d/e/in2", "../../top.txt"),
        ("a/b/l", "../../top.txt"),
        ("esc-top", "../x/top.txt"),
    ] {
        link(&p, l, t);
    }
    let skipped = wait_safe_converged(&p, &r);
    assert_eq!(skipped, [PathBuf::from("esc-top")]);
    let resyncs = s.primary.metric("ferry_resyncs_total");
    // a link renamed so that it leaves the root: the old name goes, the new
    // one never arrives; one renamed twice in a batch; an unsafe link moved
    // to where it stays inside: it arrives
    std::fs::rename(p.join("d/e/in"), p.join("in-top")).unwrap();
    std::fs::rename(p.join("d/e/in2"), p.join("d/in2")).unwrap();
    std::fs::rename(p.join("d/in2"), p.join("in2-top")).unwrap();
    std::fs::rename(p.join("esc-top"), p.join("x/esc-top")).unwrap();
    let skipped = wait_safe_converged(&p, &r);
    assert_eq!(skipped, [PathBuf::from("in-top"), PathBuf::from("in2-top")]);
    for gone in ["d/e/in", "d/e/in2", "d/in2", "in-top", "in2-top", "esc-top"] {
        assert!(
            r.join(gone).symlink_metadata().is_err(),
            "{gone} on the replica"
        );
    }
    assert_eq!(
        target_of(&r, "x/esc-top").as_deref(),
        Some(&b"../x/top.txt"[..])
    );
    // by the batches themselves: no resync, no inconsistency on the replica
    assert_eq!(s.primary.metric("ferry_resyncs_total"), resyncs);
    assert_eq!(
        s.replica.metric("ferry_errors_total"),
        0.0,
        "{}",
        s.replica.log_tail()
    );
    // a directory moved so that a link in it leaves the root
    std::fs::rename(p.join("a/b"), p.join("b")).unwrap();
    let skipped = wait_safe_converged(&p, &r);
    assert!(skipped.contains(&PathBuf::from("b/l")), "{skipped:?}");
    assert!(r.join("b").is_dir() && r.join("b/l").symlink_metadata().is_err());
    assert!(r.join("a/b").symlink_metadata().is_err());
    wait_skips(&s.primary, "unsafe_link", 4.0);
}

/// Makes `base/name/name/.../name` (`levels` deep) through directory
/// handles, the only way past PATH_MAX; a file at the bottom. Returns the
/// length of the deepest path relative to `base`.
fn deep_tree(base: &Path, name: &str, levels: usize) -> usize {
    use rustix::fs::{mkdirat, openat, Mode, OFlags};
    let mut dir = openat(
        rustix::fs::CWD,
        base,
        OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
    )
    .unwrap();
    let mut len = 0;
    for _ in 0..levels {
        mkdirat(&dir, name, Mode::from_raw_mode(0o755)).unwrap();
        dir = openat(
            &dir,
            name,
            OFlags::DIRECTORY | OFlags::RDONLY,
            Mode::empty(),
        )
        .unwrap();
        len += name.len() + 1;
    }
    let f = openat(
        &dir,
        "bottom.txt",
        OFlags::CREATE | OFlags::WRONLY,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    rustix::io::write(&f, b"deep").unwrap();
    len + "bottom.txt".len()
}

/// Every entry below `root` (but the top-level `.ferry`), read through
/// directory handles so that paths of any length are seen: relative path ->
/// kind, mode and content (or link target).
fn tree(root: &Path) -> BTreeMap<Vec<u8>, String> {
    use rustix::fs::{openat, readlinkat, statat, AtFlags, FileType, Mode, OFlags};
    let mut out = BTreeMap::new();
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW;
    let top = openat(rustix::fs::CWD, root, flags, Mode::empty()).unwrap();
    let mut stack = vec![(top, Vec::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let mut names = Vec::new();
        for e in rustix::fs::Dir::read_from(&dir).unwrap() {
            let n = e.unwrap().file_name().to_bytes().to_vec();
            if n != b"." && n != b".." && !(prefix.is_empty() && n == b".ferry") {
                names.push(n);
            }
        }
        for n in names {
            let name = std::ffi::OsStr::from_bytes(&n);
            let mut rel = prefix.clone();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(&n);
            let st = statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).unwrap();
            let mode = st.st_mode & 0o7777;
            let v = match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => {
                    stack.push((
                        openat(&dir, name, flags, Mode::empty()).unwrap(),
                        rel.clone(),
                    ));
                    format!("dir {mode:o}")
                }
                FileType::Symlink => {
                    let t = readlinkat(&dir, name, Vec::new()).unwrap();
                    format!("link {t:?}")
                }
                FileType::RegularFile => {
                    let f = openat(&dir, name, OFlags::RDONLY | OFlags::NOFOLLOW, Mode::empty())
                        .unwrap();
                    let mut h = blake3::Hasher::new();
                    h.update_reader(std::fs::File::from(f)).unwrap();
                    format!("file {mode:o} {} {}", st.st_size, h.finalize().to_hex())
                }
                other => format!("{other:?}"),
            };
            out.insert(rel, v);
        }
    }
    out
}

/// First differences between two [`tree`]s.
fn tree_diff(a: &BTreeMap<Vec<u8>, String>, b: &BTreeMap<Vec<u8>, String>) -> String {
    let short = |k: &[u8]| {
        let s = String::from_utf8_lossy(k);
        if s.len() > 80 {
            format!("…{} ({} bytes)", &s[s.len() - 60..], k.len())
        } else {
            s.into_owned()
        }
    };
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("only on primary: {}", short(k))),
            Some(w) if w != v => out.push(format!("differs: {} {v} vs {w}", short(k))),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            out.push(format!("only on replica: {}", short(k)));
        }
    }
    let n = out.len();
    out.truncate(8);
    format!("{n} differences, first:\n  {}", out.join("\n  "))
}

/// Waits until the replica's tree equals the primary's, minus the entries
/// `leave_out` says are not replicated.
fn wait_tree(p: &Path, r: &Path, leave_out: impl Fn(&[u8]) -> bool) {
    wait_for(CONVERGE, || {
        let mut want = tree(p);
        want.retain(|k, _| !leave_out(k));
        let got = tree(r);
        if want == got {
            Ok(())
        } else {
            Err(tree_diff(&want, &got))
        }
    });
}

#[test]
fn g1_paths_of_any_length_replicate_and_an_entry_that_cannot_is_skipped() {
    // periodic rescans: inotify cannot watch a directory whose path is over
    // PATH_MAX, so a change deep inside one is found by the next rescan
    let mut s = set(&["--rescan-interval", "2s"]);
    let p = s.primary.root.clone();
    let r = s.replica.root.clone();
    let max = ferry_proto::path::MAX_PATH_LEN;
    // before the start (the scan at start used to exit: "File name too
    // long"): over 8 KiB deep, next to ordinary files, a socket, and a tree
    // deeper than ferry's path limit
    let name = "n".repeat(100);
    let len = deep_tree(&p, &name, 90);
    assert!(len > 8192, "{len}");
    let len = deep_tree(&p, &"z".repeat(200), 170);
    assert!(len > max, "{len}");
    std::fs::write(p.join("a.txt"), b"a").unwrap();
    std::fs::create_dir_all(p.join("dir")).unwrap();
    std::fs::write(p.join("dir/b.txt"), b"b").unwrap();
    // a special file (a socket: unlike a FIFO, opening it never blocks the
    // test's own reads)
    let _sock = std::os::unix::net::UnixListener::bind(p.join("dir/sock")).unwrap();
    let not_replicated = |k: &[u8]| k == b"dir/sock" || k.len() > max;
    s.replica.start();
    s.primary.start().wait_ready(Duration::from_secs(20));
    wait_tree(&p, &r, not_replicated);
    eprintln!("converged with the 9 KiB-deep tree");
    assert!(s.primary.running(), "{}", s.primary.log_tail());
    let st = s.primary.status_json();
    assert!(
        st.contains("{\"path\":\"dir/sock\",\"reason\":\"special_file\""),
        "{st}"
    );
    wait_for(Duration::from_secs(20), || {
        let long = skips_of(&s.primary, "path_too_long");
        if long == 1.0 {
            Ok(())
        } else {
            Err(format!("path_too_long {long}"))
        }
    });
    let st = s.primary.status_json();
    assert!(st.contains("\"reason\":\"path_too_long\""), "{st}");
    assert!(st.contains("\"path\":\"zzzz"), "{st}");
    // made while running: a 1,000-level tree over 8 KiB, moved in whole,
    // and new files next to it
    let staging = p.parent().unwrap().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let deep2 = "m".repeat(8);
    let len = deep_tree(&staging, &deep2, 1000);
    assert!(len > 8192, "{len}");
    std::fs::rename(staging.join(&deep2), p.join(&deep2)).unwrap();
    std::fs::write(p.join("after.txt"), b"after").unwrap();
    std::fs::write(p.join("dir/c.txt"), b"c").unwrap();
    wait_tree(&p, &r, not_replicated);
    eprintln!("converged with the 1,000-level tree");
    // both deep trees arrived whole, down to the file at the bottom
    let on_replica = tree(&r);
    for (n, levels) in [(name.as_str(), 90), (deep2.as_str(), 1000)] {
        let mut k = vec![format!("{n}/"); levels].concat().into_bytes();
        k.extend_from_slice(b"bottom.txt");
        assert!(k.len() > 8192);
        assert_eq!(
            on_replica.get(&k).map(|v| v.starts_with("file 644 4 ")),
            Some(true),
            "the bottom of the {levels}-level tree"
        );
    }
    // a change at the bottom of it (inotify cannot watch there: found by
    // the next rescan), and one next to it
    std::fs::write(p.join("after.txt"), b"after, again").unwrap();
    let rescans = s.primary.metric("ferry_rescans_total");
    {
        use rustix::fs::{openat, Mode, OFlags};
        let mut d = openat(rustix::fs::CWD, &p, OFlags::DIRECTORY, Mode::empty()).unwrap();
        for _ in 0..1000 {
            d = openat(&d, deep2.as_str(), OFlags::DIRECTORY, Mode::empty()).unwrap();
        }
        let f = openat(
            &d,
            "bottom.txt",
            OFlags::WRONLY | OFlags::TRUNC,
            Mode::empty(),
        )
        .unwrap();
        rustix::io::write(&f, b"changed at the bottom").unwrap();
    }
    wait_for(Duration::from_secs(30), || {
        let now = s.primary.metric("ferry_rescans_total");
        if now > rescans {
            Ok(())
        } else {
            Err("a periodic rescan".into())
        }
    });
    wait_tree(&p, &r, not_replicated);
    assert!(s.primary.running(), "{}", s.primary.log_tail());
    assert!(s.replica.running(), "{}", s.replica.log_tail());
    assert_eq!(skips_of(&s.primary, "path_too_long"), 1.0, "reported once");
    assert_eq!(s.replica.metric("ferry_skipped_entries_total"), 0.0);
}

#[test]
fn g1_an_unreadable_entry_is_skipped_and_reported_and_the_rest_converges() {
    // the primary runs without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so
    // mode 000 keeps it out even as root (tests run as root here)
    let probe = std::process::Command::new("setpriv")
        .args(["--bounding-set", "-dac_override,-dac_read_search", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: setpriv cannot drop capabilities here");
        return;
    }
    let mut s = set(&[]);
    let p = s.primary.root.clone();
    let r = s.replica.root.clone();
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(p.join("ok.txt"), b"ok").unwrap();
    std::fs::write(p.join("secret.txt"), b"secret").unwrap();
    std::fs::set_permissions(p.join("secret.txt"), std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::create_dir_all(p.join("locked")).unwrap();
    std::fs::write(p.join("locked/inner.txt"), b"inner").unwrap();
    std::fs::set_permissions(p.join("locked"), std::fs::Permissions::from_mode(0o000)).unwrap();
    for d in ["a-sub", "m-sub/deeper", "z-sub"] {
        std::fs::create_dir_all(p.join(d)).unwrap();
    }
    s.replica.start();
    s.primary
        .start_wrapped(&[
            "setpriv",
            "--bounding-set",
            "-dac_override,-dac_read_search",
        ])
        .wait_ready(Duration::from_secs(20));
    let left_out = |k: &[u8]| k == b"secret.txt" || k == b"locked/inner.txt";
    wait_tree(&p, &r, left_out);
    wait_for(Duration::from_secs(20), || {
        let n = skips_of(&s.primary, "unreadable");
        if n == 2.0 {
            Ok(())
        } else {
            Err(format!("unreadable: {n}"))
        }
    });
    let st = s.primary.status_json();
    for path in ["secret.txt", "locked"] {
        assert!(
            st.contains(&format!("{{\"path\":\"{path}\",\"reason\":\"unreadable\"")),
            "{path}: {st}"
        );
    }
    // replication goes on around them, live (the periodic rescan is 10
    // minutes away): every other directory is watched, also ones created now
    std::fs::write(p.join("after.txt"), b"after").unwrap();
    std::fs::write(p.join("ok.txt"), b"ok, again").unwrap();
    for d in ["a-sub", "m-sub/deeper", "z-sub"] {
        std::fs::write(p.join(d).join("new.txt"), d).unwrap();
    }
    std::fs::create_dir_all(p.join("m-sub/made-now")).unwrap();
    wait_tree(&p, &r, left_out);
    std::fs::write(p.join("m-sub/made-now/later.txt"), b"later").unwrap();
    // an unreadable directory moved in while running: notify cannot watch
    // it either; reported, and the rest still goes on
    let outside = p.parent().unwrap().join("late-locked");
    std::fs::create_dir_all(outside.join("x")).unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::rename(&outside, p.join("m-sub/late-locked")).unwrap();
    std::fs::write(p.join("z-sub/last.txt"), b"last").unwrap();
    let left_out = |k: &[u8]| left_out(k) || k == b"m-sub/late-locked/x";
    wait_tree(&p, &r, left_out);
    assert!(s.primary.running(), "{}", s.primary.log_tail());
    // readable again: shipped by the next change
    std::fs::set_permissions(p.join("secret.txt"), std::fs::Permissions::from_mode(0o644)).unwrap();
    wait_tree(&p, &r, |k| {
        k == b"locked/inner.txt" || k == b"m-sub/late-locked/x"
    });
    assert_eq!(
        skips_of(&s.primary, "unreadable"),
        3.0,
        "reported once each"
    );
}

#[test]
fn g1_a_file_whose_reads_fail_is_skipped_and_reported_and_the_rest_converges() {
    // strace makes every read of two files fail with EIO (a bad disk block,
    // a flaky network filesystem): the open and the stat succeed
    let probe = std::process::Command::new("strace")
        .args(["-qq", "-o", "/dev/null", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: strace cannot trace here");
        return;
    }
    let mut s = set(&[]);
    let p = s.primary.root.clone();
    let r = s.replica.root.clone();
    std::fs::write(p.join("ok.txt"), b"ok").unwrap();
    std::fs::write(p.join("bad-small.bin"), vec![7u8; 1000]).unwrap();
    std::fs::write(p.join("bad-big.bin"), vec![9u8; 1 << 20]).unwrap();
    let small = p.join("bad-small.bin").display().to_string();
    let big = p.join("bad-big.bin").display().to_string();
    s.replica.start();
    s.primary
        .start_wrapped(&[
            "strace",
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-P",
            &small,
            "-P",
            &big,
            "-e",
            "trace=read,pread64,readv,preadv,preadv2",
            "-e",
            "inject=read,pread64,readv,preadv,preadv2:error=EIO",
            "--",
        ])
        .wait_ready(Duration::from_secs(30));
    let left_out = |k: &[u8]| k == b"bad-small.bin" || k == b"bad-big.bin";
    wait_tree(&p, &r, left_out);
    wait_for(Duration::from_secs(20), || {
        let n = skips_of(&s.primary, "unreadable");
        if n == 2.0 {
            Ok(())
        } else {
            Err(format!("unreadable: {n}"))
        }
    });
    let st = s.primary.status_json();
    for path in ["bad-small.bin", "bad-big.bin"] {
        assert!(
            st.contains(&format!("{{\"path\":\"{path}\",\"reason\":\"unreadable\"")),
            "{path}: {st}"
        );
    }
    // later batches still arrive: the session is not stuck on them
    std::fs::write(p.join("after.txt"), b"after").unwrap();
    std::fs::write(p.join("ok.txt"), b"ok, again").unwrap();
    wait_tree(&p, &r, left_out);
    assert!(s.primary.running(), "{}", s.primary.log_tail());
    assert_eq!(
        s.replica.metric("ferry_errors_total"),
        0.0,
        "{}",
        s.replica.log_tail()
    );
}
