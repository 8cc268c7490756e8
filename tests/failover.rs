//! Issue 8: the data follows the application. Planned switchover (RPO 0),
//! failover after kill -9, split brain (the old primary isolated and still
//! writing while a replica is promoted: fenced, its writes preserved as
//! conflicts), and repeated role changes A → B → C → A.

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

const CONVERGE: Duration = Duration::from_secs(60);

struct Cluster {
    _tmp: tempfile::TempDir,
    nodes: Vec<Node>,
}

/// `names[0]` is the primary; every node lists all others as peers.
fn cluster(names: &[&str]) -> Cluster {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().to_path_buf();
    eprintln!("test dir: {}", base.display());
    let pki = Pki::new(&base, "ca-failover");
    let mut nodes: Vec<Node> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let role = if i == 0 { "primary" } else { "replica" };
            Node::new(&base, n, &pki.issue(n), role, &[], &[])
        })
        .collect();
    let ports: Vec<(String, u16)> = nodes.iter().map(|n| (n.name.clone(), n.port)).collect();
    for n in nodes.iter_mut() {
        for (name, port) in &ports {
            if *name != n.name {
                n.peer(name, *port);
            }
        }
    }
    for n in nodes.iter_mut().skip(1) {
        n.start();
    }
    nodes[0].start().wait_ready(Duration::from_secs(20));
    Cluster { _tmp: tmp, nodes }
}

fn promote(n: &Node, to: Option<&str>) -> (bool, String) {
    let mut c = Command::new(ferry());
    c.arg("promote").arg("--root").arg(&n.root);
    if let Some(t) = to {
        c.args(["--to", t]);
    }
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn field<'a>(json: &'a str, key: &str) -> &'a str {
    let k = format!("\"{key}\":");
    let Some(i) = json.find(&k) else { return "" };
    let rest = &json[i + k.len()..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim_matches('"')
}

/// Waits until `n` says it is `role` at `epoch` and is ready.
fn wait_role(n: &mut Node, role: &str, epoch: u64, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let s = n.status_json();
        if field(&s, "role") == role
            && field(&s, "epoch") == epoch.to_string()
            && http_get(n.metrics, "/readyz").is_some_and(|(c, _)| c == 200)
        {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < timeout,
            "{} is not a ready {role} at epoch {epoch}: {s}\n{}",
            n.name,
            n.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An application writing self-verifying files through temp + rename,
/// recording each write it completed.
type Writes = Vec<(PathBuf, Vec<u8>)>;

struct App {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Writes>>,
    h: Option<std::thread::JoinHandle<()>>,
}

impl App {
    fn start(root: &Path, prefix: &str, seed: u64) -> App {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(Vec::new()));
        let (root, prefix) = (root.to_path_buf(), prefix.to_string());
        let (s2, d2) = (stop.clone(), done.clone());
        let h = std::thread::spawn(move || {
            let mut rng = fastrand::Rng::with_seed(seed);
            std::fs::create_dir_all(root.join(&prefix)).unwrap();
            let mut i = 0;
            while !s2.load(Ordering::Relaxed) && i < 5000 {
                let rel = PathBuf::from(format!("{prefix}/f{i:05}.sv"));
                let len = rng.usize(10..5000);
                let data = sv_content(&mut rng, len);
                let tmp = root.join(format!("{prefix}/.tmp{i}"));
                std::fs::write(&tmp, &data).unwrap();
                std::fs::rename(&tmp, root.join(&rel)).unwrap();
                d2.lock().unwrap().push((rel, data));
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        App {
            stop,
            done,
            h: Some(h),
        }
    }
    /// Stops the app; returns every write it completed.
    fn stop(mut self) -> Writes {
        self.stop.store(true, Ordering::Relaxed);
        self.h.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.done.lock().unwrap())
    }
}

fn missing(root: &Path, writes: &[(PathBuf, Vec<u8>)]) -> usize {
    writes
        .iter()
        .filter(|(p, d)| std::fs::read(root.join(p)).ok().as_ref() != Some(d))
        .count()
}

#[test]
fn switchover_under_continuous_writes_loses_nothing() {
    let mut c = cluster(&["a", "b", "c"]);
    let app = App::start(&c.nodes[0].root, "app", seed());
    std::thread::sleep(Duration::from_secs(3));
    // the app stops (scaled down in cluster A), then the hand-over
    let writes = app.stop();
    let t0 = Instant::now();
    let (ok, out) = promote(&c.nodes[0], Some("b"));
    assert!(
        ok,
        "promote --to b failed: {out}\n{}",
        c.nodes[0].log_tail()
    );
    let ready = wait_role(&mut c.nodes[1], "primary", 2, Duration::from_secs(30));
    let rto = t0.elapsed();
    let lost = missing(&c.nodes[1].root, &writes);
    eprintln!(
        "switchover: {} writes before the stop, {lost} missing on the new primary (RPO); RTO {rto:?} (ready {ready:?} after the command returned); {out}",
        writes.len()
    );
    assert_eq!(lost, 0, "writes lost in a planned switchover");
    assert!(writes.len() > 100);
    wait_role(&mut c.nodes[0], "replica", 2, Duration::from_secs(30));
    // the app starts in cluster B and writes; A and C follow B
    let app = App::start(&c.nodes[1].root, "app-b", 2);
    std::thread::sleep(Duration::from_secs(1));
    let writes_b = app.stop();
    for i in [0, 2] {
        wait_converged(&c.nodes[1].root, &c.nodes[i].root, CONVERGE);
        assert_eq!(missing(&c.nodes[i].root, &writes_b), 0);
    }
    // a second switchover to a node that is not a peer fails cleanly
    let (ok, out) = promote(&c.nodes[1], Some("nobody"));
    assert!(!ok && out.contains("not a peer"), "{out}");
}

#[test]
fn failover_after_kill_9_starts_from_a_batch_boundary_and_others_follow() {
    let mut c = cluster(&["a", "b", "c"]);
    let app = App::start(&c.nodes[0].root, "app", seed());
    std::thread::sleep(Duration::from_secs(3));
    // the primary's cluster dies mid-write
    c.nodes[0].kill9();
    let writes = app.stop();
    // promoting a replica that never applied anything is refused
    let t0 = Instant::now();
    let (ok, out) = promote(&c.nodes[1], None);
    assert!(ok, "promote failed: {out}\n{}", c.nodes[1].log_tail());
    wait_role(&mut c.nodes[1], "primary", 2, Duration::from_secs(30));
    let rto = t0.elapsed();
    let lost = missing(&c.nodes[1].root, &writes);
    eprintln!(
        "failover: {} writes completed on the old primary, {lost} not on the new one (RPO, async replication); RTO {rto:?}; {out}",
        writes.len()
    );
    // at a batch boundary: every file whole, and the writes it has are a
    // prefix of the app's (the app wrote in order; a batch is a cut)
    let b = &c.nodes[1].root;
    let mut seen_gap = false;
    for (p, d) in &writes {
        match std::fs::read(b.join(p)) {
            Ok(got) => {
                assert_eq!(&got, d, "{} torn or wrong on the new primary", p.display());
                assert!(
                    !seen_gap,
                    "{} present after a missing earlier write: not a cut",
                    p.display()
                );
            }
            Err(_) => seen_gap = true,
        }
    }
    assert!(
        lost < writes.len() / 2,
        "most writes missing: {lost} of {}",
        writes.len()
    );
    // C follows the new epoch and converges to B
    wait_role(&mut c.nodes[2], "replica", 2, Duration::from_secs(30));
    let app = App::start(&c.nodes[1].root, "after", 5);
    std::thread::sleep(Duration::from_millis(800));
    app.stop();
    wait_converged(&c.nodes[1].root, &c.nodes[2].root, CONVERGE);
}

#[test]
fn split_brain_old_primary_is_fenced_and_its_writes_are_preserved() {
    let mut c = cluster(&["a", "b", "c"]);
    let app = App::start(&c.nodes[0].root, "before", 1);
    std::thread::sleep(Duration::from_secs(1));
    app.stop();
    std::fs::write(c.nodes[0].root.join("shared.txt"), b"v1 from a").unwrap();
    for i in [1, 2] {
        wait_converged(&c.nodes[0].root, &c.nodes[i].root, CONVERGE);
    }
    // partition: the old primary's ferry is cut off (frozen), its app goes on
    let a_pid = c.nodes[0].pid().unwrap();
    let sig = |s: &str| {
        assert!(Command::new("kill")
            .arg(format!("-{s}"))
            .arg(a_pid.to_string())
            .status()
            .unwrap()
            .success())
    };
    sig("STOP");
    // kill(2) returns before every thread has stopped: wait until they have,
    // or the "partitioned" node could still ship the first writes below
    let t0 = Instant::now();
    while !all_threads_stopped(a_pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "SIGSTOP did not take"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let a_app = App::start(&c.nodes[0].root, "a-only", 9);
    std::fs::write(
        c.nodes[0].root.join("shared.txt"),
        b"v2 written on a during the partition",
    )
    .unwrap();
    let (ok, out) = promote(&c.nodes[1], None);
    assert!(ok, "{out}\n{}", c.nodes[1].log_tail());
    wait_role(&mut c.nodes[1], "primary", 2, Duration::from_secs(30));
    wait_role(&mut c.nodes[2], "replica", 2, Duration::from_secs(30));
    let b_app = App::start(&c.nodes[1].root, "b-new", 3);
    std::thread::sleep(Duration::from_millis(800));
    let a_writes = a_app.stop();
    let b_writes = b_app.stop();
    // heal
    sig("CONT");
    // A learns of epoch 2, becomes B's replica; no replica ever takes a
    // batch of epoch 1 again: C never shows A's partition writes
    let t0 = Instant::now();
    loop {
        assert!(
            !c.nodes[2].root.join("a-only").exists(),
            "a replica applied the stale primary's writes (G7)"
        );
        let s = c.nodes[0].status_json();
        if field(&s, "role") == "replica"
            && field(&s, "epoch") == "2"
            && snapshot(&c.nodes[0].root) == snapshot(&c.nodes[1].root)
        {
            break;
        }
        assert!(
            t0.elapsed() < CONVERGE,
            "old primary did not rejoin: {s}\n{}",
            c.nodes[0].log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_converged(&c.nodes[1].root, &c.nodes[2].root, CONVERGE);
    assert_eq!(missing(&c.nodes[2].root, &b_writes), 0);
    // A's partition writes are not silently lost: preserved, and reported
    let s = c.nodes[0].status_json();
    let dir = s
        .split("\"dir\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no conflicts in status: {s}"));
    let manifest = std::fs::read_to_string(Path::new(dir).join("MANIFEST.tsv")).unwrap();
    for (p, d) in &a_writes {
        assert_eq!(
            std::fs::read(Path::new(dir).join(p)).ok().as_ref(),
            Some(d),
            "{} lost",
            p.display()
        );
        assert!(
            manifest.contains(&format!("{}\tabsent", p.display()).replace("\tabsent", "\t"))
                || manifest.contains(&p.display().to_string())
        );
    }
    assert!(
        manifest.contains("shared.txt") && manifest.contains("replaced"),
        "{manifest}"
    );
    assert_eq!(
        std::fs::read(Path::new(dir).join("shared.txt")).unwrap(),
        b"v2 written on a during the partition"
    );
    assert!(
        !manifest.contains("before/"),
        "files the new primary has were reported as conflicts:\n{manifest}"
    );
    let n = metric(c.nodes[0].metrics, "ferry_conflict_files");
    eprintln!(
        "split brain: {} partition writes on the old primary, {n} files preserved as conflicts; {} writes on the new primary all replicated",
        a_writes.len(),
        b_writes.len()
    );
    assert_eq!(n as usize, a_writes.len() + 1);
}

fn all_threads_stopped(pid: u32) -> bool {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    rd.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()
                    .map(|r| r.trim_start().starts_with('T'))
            })
            .unwrap_or(false)
    })
}

#[test]
fn repeated_role_changes_a_b_c_a_under_writes_converge() {
    let mut c = cluster(&["a", "b", "c"]);
    let order = [0usize, 1, 2, 0];
    let mut all = Vec::new();
    for (k, w) in order.windows(2).enumerate() {
        let (from, to) = (w[0], w[1]);
        let app = App::start(&c.nodes[from].root, &format!("round{k}"), k as u64);
        std::thread::sleep(Duration::from_millis(700));
        all.extend(app.stop());
        let to_name = c.nodes[to].name.clone();
        let (ok, out) = promote(&c.nodes[from], Some(&to_name));
        assert!(ok, "round {k}: {out}\n{}", c.nodes[from].log_tail());
        let epoch = k as u64 + 2;
        wait_role(&mut c.nodes[to], "primary", epoch, Duration::from_secs(30));
        assert_eq!(
            missing(&c.nodes[to].root, &all),
            0,
            "round {k}: writes lost"
        );
    }
    let app = App::start(&c.nodes[0].root, "final", 99);
    std::thread::sleep(Duration::from_millis(500));
    all.extend(app.stop());
    for i in [1, 2] {
        wait_role(&mut c.nodes[i], "replica", 4, Duration::from_secs(30));
        wait_converged(&c.nodes[0].root, &c.nodes[i].root, CONVERGE);
        assert_eq!(missing(&c.nodes[i].root, &all), 0);
    }
}

#[test]
fn two_replicas_promoted_at_once_a_replica_follows_only_one() {
    let mut c = cluster(&["a", "b", "c", "d"]);
    std::fs::write(c.nodes[0].root.join("base.txt"), b"base").unwrap();
    for i in 1..4 {
        wait_converged(&c.nodes[0].root, &c.nodes[i].root, CONVERGE);
    }
    c.nodes[0].kill9();
    let log_from = std::fs::read_to_string(&c.nodes[3].log).unwrap().len();
    // two operators promote two replicas at the same moment: both take epoch 2
    let (r1, r2) = std::thread::scope(|s| {
        let h1 = s.spawn(|| promote(&c.nodes[1], None));
        let h2 = s.spawn(|| promote(&c.nodes[2], None));
        (h1.join().unwrap(), h2.join().unwrap())
    });
    assert!(r1.0 && r2.0, "{r1:?} {r2:?}");
    wait_role(&mut c.nodes[1], "primary", 2, Duration::from_secs(30));
    wait_role(&mut c.nodes[2], "primary", 2, Duration::from_secs(30));
    std::fs::write(c.nodes[1].root.join("only-b.txt"), b"b").unwrap();
    std::fs::write(c.nodes[2].root.join("only-c.txt"), b"c").unwrap();
    // d follows exactly one of them, never both
    let d = c.nodes[3].root.clone();
    let t0 = Instant::now();
    let mut followed = None;
    while t0.elapsed() < Duration::from_secs(15) {
        let (b, cc) = (d.join("only-b.txt").exists(), d.join("only-c.txt").exists());
        assert!(
            !(b && cc),
            "a replica applied batches of two primaries of one epoch (G7)"
        );
        if b || cc {
            followed = Some(if b { "b" } else { "c" });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let f = followed.expect("d followed neither new primary");
    let i = if f == "b" { 1 } else { 2 };
    wait_converged(&c.nodes[i].root, &d, CONVERGE);
    // the sessions d accepted after the failover: from one primary only
    let log = std::fs::read_to_string(&c.nodes[3].log).unwrap();
    let accepted = |n: &str| {
        log[log_from..]
            .lines()
            .filter(|l| l.contains("primary connected") && l.contains(&format!("\"peer\":\"{n}\"")))
            .count()
    };
    let (from_b, from_c) = (accepted("b"), accepted("c"));
    eprintln!("d accepted sessions: {from_b} from b, {from_c} from c");
    assert!(
        (from_b == 0) != (from_c == 0),
        "d accepted sessions from two primaries of one epoch (G7): b {from_b}, c {from_c}"
    );
    let refused = metric_labeled(c.nodes[3].metrics, "ferry_errors_total", "kind=\"fenced\"");
    eprintln!("d follows {f}; refused the other {refused} times");
    assert!(refused >= 1.0);
}
