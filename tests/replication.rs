//! Process tests of the core engine: real `ferry` processes on loopback.
//! G1 (convergence), G3 (no torn files, checked by a poller while writes
//! run), catch-up of a replica added mid-stream and of a restarted one.

#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::workload::Workload;
use support::*;

/// Keeps the test dir when FERRY_TEST_KEEP is set (for post-mortems).
struct Keep(Option<tempfile::TempDir>);
impl Drop for Keep {
    fn drop(&mut self) {
        if std::env::var_os("FERRY_TEST_KEEP").is_some() {
            if let Some(t) = self.0.take() {
                let _ = t.keep();
            }
        }
    }
}

const CONVERGE: Duration = Duration::from_secs(60);

struct Set {
    _tmp: Keep,
    primary: Node,
    replicas: Vec<Node>,
}

/// A primary and `n` replicas; replicas are not started.
fn set(n: usize, extra: &[&str]) -> Set {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    eprintln!("test dir: {}", base.display());
    if std::env::var_os("FERRY_TEST_KEEP").is_some() {
        let _ = std::fs::write(base.join("KEEP"), b"");
    }
    let pki = Pki::new(base, "ca-one");
    let names: Vec<String> = (0..n).map(|i| format!("replica-{i}")).collect();
    let mut replicas: Vec<Node> = names
        .iter()
        .map(|nm| Node::new(base, nm, &pki.issue(nm), "replica", &[], extra))
        .collect();
    let peers: Vec<(&str, u16)> = replicas.iter().map(|r| (r.name.as_str(), r.port)).collect();
    let primary = Node::new(
        base,
        "primary",
        &pki.issue("primary"),
        "primary",
        &peers,
        extra,
    );
    for r in replicas.iter_mut() {
        r.peer("primary", primary.port);
    }
    Set {
        _tmp: Keep(Some(tmp)),
        primary,
        replicas,
    }
}

#[test]
fn g1_g3_random_workload_converges_on_two_replicas() {
    let seed = seed();
    let mut s = set(2, &[]);
    for r in s.replicas.iter_mut() {
        r.start();
    }
    s.primary.start().wait_ready(Duration::from_secs(20));
    let stop = Arc::new(AtomicBool::new(false));
    let (checked, torn) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let poll = g3_poller(
        &s.replicas[0].root,
        stop.clone(),
        checked.clone(),
        torn.clone(),
    );
    // A file rewritten in place while ferry reads it: never shipped torn.
    let hot_stop = Arc::new(AtomicBool::new(false));
    let hot = {
        let root = s.primary.root.clone();
        let stop = hot_stop.clone();
        std::thread::spawn(move || {
            let mut rng = fastrand::Rng::with_seed(seed ^ 1);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 400 {
                let blocks = rng.usize(16..256);
                let data = blk_content(&mut rng, blocks);
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .open(root.join("hot.blk"))
                    .unwrap();
                for chunk in data.chunks(BLOCK) {
                    std::io::Write::write_all(&mut f, chunk).unwrap();
                }
                drop(f);
                n += 1;
                std::thread::sleep(Duration::from_millis(rng.u64(0..10)));
            }
        })
    };
    let mut w = Workload::new(&s.primary.root, seed);
    let t0 = Instant::now();
    while w.ops < 1500 && t0.elapsed() < Duration::from_secs(40) {
        w.step();
    }
    hot_stop.store(true, Ordering::Relaxed);
    hot.join().unwrap();
    for r in &s.replicas {
        let took = wait_converged(&s.primary.root, &r.root, CONVERGE);
        eprintln!(
            "{} converged {:?} after writes stopped ({} ops)",
            r.name, took, w.ops
        );
    }
    stop.store(true, Ordering::Relaxed);
    let bad = poll.join().unwrap();
    eprintln!(
        "G3 poller: {} reads, {} torn",
        checked.load(Ordering::Relaxed),
        torn.load(Ordering::Relaxed)
    );
    assert!(bad.is_empty(), "torn files seen on the replica: {bad:?}");
    assert!(
        checked.load(Ordering::Relaxed) > 100,
        "the poller checked too little to mean anything"
    );
    assert!(s.primary.metric("ferry_batches_sealed_total") > 10.0);
    assert!(s.replicas[0].metric("ferry_batches_applied_total") > 10.0);
    // The only error kind allowed is "inconsistent": the replica noticing a
    // rename it cannot apply because the primary's view was stale (notify
    // loses events inside a just-moved directory), which a resync repairs.
    for r in &s.replicas {
        let all = r.metric("ferry_errors_total");
        let inconsistent = metric_labeled(r.metrics, "ferry_errors_total", "kind=\"inconsistent\"");
        eprintln!(
            "{}: {inconsistent} inconsistencies repaired by resync",
            r.name
        );
        assert_eq!(
            all,
            inconsistent,
            "unexpected errors on {}: {}",
            r.name,
            r.log_tail()
        );
    }
}

#[test]
fn replica_added_midstream_and_restarted_replica_catch_up() {
    let seed = seed();
    let mut s = set(2, &[]);
    s.replicas[0].start();
    s.primary.start().wait_ready(Duration::from_secs(20));
    let mut w = Workload::new(&s.primary.root, seed);
    for _ in 0..300 {
        w.step();
    }
    wait_converged(&s.primary.root, &s.replicas[0].root, CONVERGE);
    // replica-1 joins late: initial sync, then the stream
    s.replicas[1].start();
    for _ in 0..200 {
        w.step();
    }
    let took = wait_converged(&s.primary.root, &s.replicas[1].root, CONVERGE);
    eprintln!("late replica caught up in {took:?}");
    wait_converged(&s.primary.root, &s.replicas[0].root, CONVERGE);
    // replica-0 is killed; writes go on; it comes back and catches up
    s.replicas[0].kill9();
    for _ in 0..300 {
        w.step();
    }
    wait_converged(&s.primary.root, &s.replicas[1].root, CONVERGE);
    s.replicas[0].start();
    let took = wait_converged(&s.primary.root, &s.replicas[0].root, CONVERGE);
    eprintln!("restarted replica caught up in {took:?}");
    // Not a speed target: a functional check that the restarted replica's
    // hello makes the primary redial at once instead of waiting for its 10 s
    // idle timeout to notice the dead session (measured: ~0.2 s vs ~9.4 s).
    assert!(
        took < Duration::from_secs(8),
        "the primary waited out its idle timeout: {took:?}"
    );
    // one resync per replica at its first session; the restarted one resumes from the log
    assert!(s.primary.metric("ferry_resyncs_total") >= 2.0);
}

#[test]
fn existing_replica_content_converges_and_status_reports_consistency() {
    let mut s = set(1, &["--exclude", "*.log", "--exclude", "/cache/"]);
    let p = s.primary.root.clone();
    let r = s.replicas[0].root.clone();
    // the replica already holds content: what the primary lacks goes
    std::fs::create_dir_all(r.join("old/deep")).unwrap();
    std::fs::write(r.join("old/deep/stale.txt"), b"stale").unwrap();
    std::fs::write(r.join("same.txt"), b"replica version").unwrap();
    std::fs::write(r.join("keep.log"), b"excluded on the replica too").unwrap();
    std::fs::create_dir_all(p.join("sub/.ferry")).unwrap();
    std::fs::write(p.join("sub/.ferry/nested"), b"a nested .ferry replicates").unwrap();
    std::fs::write(p.join("same.txt"), b"primary version").unwrap();
    std::fs::create_dir_all(p.join("cache")).unwrap();
    std::fs::write(p.join("cache/big"), b"not replicated").unwrap();
    std::fs::write(p.join("app.log"), b"not replicated").unwrap();
    std::fs::create_dir_all(p.join("empty")).unwrap();
    s.replicas[0].start();
    s.primary.start().wait_ready(Duration::from_secs(20));
    let deadline = Instant::now() + CONVERGE;
    loop {
        let ok = std::fs::read(r.join("same.txt")).ok().as_deref()
            == Some(b"primary version".as_slice())
            && !r.join("old").exists()
            && r.join("sub/.ferry/nested").exists()
            && r.join("empty").is_dir();
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no convergence: {}\n{}",
            s.replicas[0].log_tail(),
            s.primary.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !r.join("cache").exists(),
        "excluded directory was replicated"
    );
    assert!(!r.join("app.log").exists(), "excluded file was replicated");
    assert!(
        r.join("keep.log").exists(),
        "an excluded path on the replica was deleted"
    );
    // live changes after the initial sync
    std::fs::write(p.join("later.txt"), b"later").unwrap();
    std::fs::rename(p.join("sub"), p.join("moved")).unwrap();
    let deadline = Instant::now() + CONVERGE;
    while !(r.join("later.txt").exists()
        && r.join("moved/.ferry/nested").exists()
        && !r.join("sub").exists())
    {
        assert!(Instant::now() < deadline, "live changes did not arrive");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.replicas[0].wait_ready(Duration::from_secs(10));
    let text = status_ok(&["--root", r.to_str().unwrap()]);
    assert!(text.contains("role:      replica"), "{text}");
    assert!(text.contains("consistent as of seq"), "{text}");
    let json = status_ok(&["--root", r.to_str().unwrap(), "--json"]);
    assert!(
        json.contains("\"applied_seq\":") && json.contains("\"role\":\"replica\""),
        "{json}"
    );
    let applied = s.replicas[0].metric("ferry_applied_seq");
    assert!(applied >= 1.0);
    assert!(s.replicas[0].metric("ferry_consistent_as_of_timestamp_seconds") > 1.7e9);
    let ptext = status_ok(&["--root", p.to_str().unwrap()]);
    assert!(ptext.contains("peer replica-0: connected"), "{ptext}");
    // SIGTERM: exits 0
    assert_eq!(s.primary.stop(), Some(0));
    assert_eq!(s.replicas[0].stop(), Some(0));
}

#[test]
fn appends_ship_only_the_tail_and_edits_are_not_mistaken_for_appends() {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let mut s = set(1, &[]);
    s.replicas[0].start();
    s.primary.start().wait_ready(Duration::from_secs(20));
    let p = s.primary.root.join("app.log");
    let r = s.replicas[0].root.join("app.log");
    std::fs::write(&p, vec![b'a'; 256 << 10]).unwrap();
    wait_converged(&s.primary.root, &s.replicas[0].root, CONVERGE);
    // the initial sync and the file's creation batch may both ship it
    wait_idle(&s.primary, CONVERGE);
    let ino = std::fs::metadata(&r).unwrap().ino();
    let before = s.primary.metric("ferry_bytes_sent_total");
    let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
    for i in 0..20u8 {
        f.write_all(&[b'0' + i % 10; 4096]).unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    drop(f);
    wait_converged(&s.primary.root, &s.replicas[0].root, CONVERGE);
    let sent = s.primary.metric("ferry_bytes_sent_total") - before;
    assert_eq!(
        std::fs::metadata(&r).unwrap().ino(),
        ino,
        "the replica's file was replaced, not extended"
    );
    assert!(
        sent <= (20 * 4096) as f64 * 1.5,
        "appends cost {sent} bytes on the wire for 80 KiB appended"
    );
    // an edit in the middle plus growth is not an append: the whole file goes
    let mut data = std::fs::read(&p).unwrap();
    data[1000] = b'X';
    data.extend_from_slice(b"tail");
    std::fs::write(&p, &data).unwrap();
    wait_converged(&s.primary.root, &s.replicas[0].root, CONVERGE);
    assert_eq!(std::fs::read(&r).unwrap(), data);
    assert_eq!(
        s.replicas[0].metric("ferry_errors_total"),
        0.0,
        "{}",
        s.replicas[0].log_tail()
    );
}

#[test]
fn compressible_data_is_sent_compressed_and_random_data_is_not() {
    let mut s = set(1, &[]);
    s.replicas[0].start();
    s.primary.start().wait_ready(Duration::from_secs(20));
    let line = b"2026-11-24T18:00:00Z INFO request served path=/api/v1/items status=200\n";
    let text: Vec<u8> = line.iter().copied().cycle().take(4 << 20).collect();
    std::fs::write(s.primary.root.join("app.log"), &text).unwrap();
    wait_converged(&s.primary.root, &s.replicas[0].root, CONVERGE);
    wait_idle(&s.primary, Duration::from_secs(30));
    let saved = |n: &Node| {
        metric_labeled(
            n.metrics,
            "ferry_bytes_saved_total",
            "reason=\"compression\"",
        )
    };
    let sent = |n: &Node| metric_labeled(n.metrics, "ferry_bytes_sent_total", "peer=");
    let (saved1, sent1) = (saved(&s.primary), sent(&s.primary));
    // bytes_sent counts file content shipped; compression's share is saved
    eprintln!(
        "4 MiB of log text: {} bytes on the wire, {saved1} saved by compression",
        sent1 - saved1
    );
    assert!(sent1 >= 4.0 * 1024.0 * 1024.0, "sent {sent1}");
    assert!(
        sent1 - saved1 < 512.0 * 1024.0,
        "log text was not compressed: saved {saved1} of {sent1}"
    );
    let mut rng = fastrand::Rng::with_seed(1);
    let random: Vec<u8> = (0..4 << 20).map(|_| rng.u8(..)).collect();
    std::fs::write(s.primary.root.join("random.bin"), &random).unwrap();
    wait_converged(&s.primary.root, &s.replicas[0].root, CONVERGE);
    wait_idle(&s.primary, Duration::from_secs(30));
    let (saved2, sent2) = (saved(&s.primary), sent(&s.primary));
    eprintln!("4 MiB of random bytes: {} bytes on the wire", sent2 - sent1);
    assert_eq!(saved2, saved1, "random data cannot be compressed");
    assert!(sent2 - sent1 >= 4.0 * 1024.0 * 1024.0);
}
