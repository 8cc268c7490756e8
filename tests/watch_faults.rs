//! Watcher faults (issue 3, primary side): new directories filled before
//! their watch exists, trees moved in, the periodic safety-net rescan,
//! exhausted inotify limits (G9), and a forced kernel queue overflow.

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};
use support::faults::*;
use support::*;

const CONVERGE: Duration = Duration::from_secs(60);

/// `mkdir -p a/b/c` with files written at once inside, and whole trees
/// moved in from outside the root and written into right away: notify adds
/// a new directory's watch only after reporting it, so what lands inside
/// before that produces no event. The seal scans new trees, and a second
/// look after the watch exists catches the rest.
#[test]
fn g1_new_directories_are_scanned_after_their_watch() {
    let mut p = pair(&[], &[]);
    p.replica.start();
    p.primary.start().wait_ready(Duration::from_secs(20));
    let root = p.primary.root.clone();
    let mut rng = fastrand::Rng::with_seed(seed());
    for i in 0..40 {
        let deep = root.join(format!("a{i}/b/c"));
        std::fs::create_dir_all(&deep).unwrap();
        write_files(&deep, "f", 5, &mut rng);
        write_files(&root.join(format!("a{i}/b")), "g", 2, &mut rng);
        std::fs::create_dir_all(deep.join("d/e")).unwrap();
        write_files(&deep.join("d/e"), "h", 1, &mut rng);
    }
    // trees prepared outside the root, moved in, then written into at once
    let outside = p.base().join("outside");
    for t in 0..10 {
        let tree = outside.join(format!("t{t}"));
        for d in 0..5 {
            write_files(&tree.join(format!("d{d}/x")), "m", 4, &mut rng);
        }
        std::fs::rename(&tree, root.join(format!("moved{t}"))).unwrap();
        for d in 0..5 {
            let sub = root.join(format!("moved{t}/d{d}/x/new"));
            std::fs::create_dir_all(&sub).unwrap();
            write_files(&sub, "n", 2, &mut rng);
        }
    }
    let took = wait_converged(&root, &p.replica.root, CONVERGE);
    eprintln!("converged {took:?} after the writes");
    let files = snapshot(&p.replica.root).len();
    assert!(files >= 980, "only {files} entries on the replica");
}

/// The periodic rescan finds what the watcher never reported and repairs a
/// replica changed behind ferry's back (a file deleted, one rewritten, one
/// added there).
#[test]
fn g1_periodic_rescan_repairs_a_diverged_replica() {
    let mut p = pair(&["--rescan-interval", "2s"], &[]);
    p.replica.start();
    p.primary.start().wait_ready(Duration::from_secs(20));
    let mut rng = fastrand::Rng::with_seed(seed());
    write_files(&p.primary.root.join("data"), "f", 20, &mut rng);
    wait_converged(&p.primary.root, &p.replica.root, CONVERGE);
    wait_idle(&p.primary, Duration::from_secs(20));
    let rescans = p.primary.metric("ferry_rescans_total");
    let r = p.replica.root.join("data");
    std::fs::remove_file(r.join("f1.sv")).unwrap();
    std::fs::write(r.join("f2.sv"), b"changed on the replica").unwrap();
    std::fs::write(r.join("stray"), b"not on the primary").unwrap();
    std::fs::create_dir_all(r.join("stray-dir/x")).unwrap();
    let took = wait_converged(&p.primary.root, &p.replica.root, Duration::from_secs(30));
    eprintln!("replica repaired {took:?} after it diverged");
    assert!(
        p.primary.metric("ferry_rescans_total") > rescans,
        "ferry_rescans_total did not grow"
    );
}

/// Exhausted inotify instances or watches: at startup ferry exits naming the
/// sysctl; at runtime a directory that cannot be watched is an error metric
/// and a log line naming it, and the periodic rescan ships its changes.
/// Runs ferry in its own user namespace, whose inotify limits are its own.
#[test]
fn g9_exhausted_inotify_limits_are_named() {
    let Some(no_instances) = inotify_limited(0, 100_000) else {
        eprintln!("SKIPPED: user namespaces are unavailable (unshare --user failed), so the inotify limits cannot be lowered for this test alone");
        return;
    };
    // startup: no instance left
    let mut p = pair(&[], &[]);
    p.primary.start_wrapped(&w(&no_instances));
    let code = wait_exit(&mut p.primary, Duration::from_secs(20));
    let log = std::fs::read_to_string(&p.primary.log).unwrap();
    assert_ne!(code, Some(0), "ferry started without an inotify instance");
    assert!(
        log.contains("fs.inotify.max_user_instances"),
        "the error does not name the sysctl:\n{log}"
    );
    // startup: more directories than watches
    let mut p = pair(&[], &[]);
    for d in 0..10 {
        std::fs::create_dir_all(p.primary.root.join(format!("d{d}"))).unwrap();
    }
    p.primary
        .start_wrapped(&w(&inotify_limited(10, 4).expect("probed")));
    let code = wait_exit(&mut p.primary, Duration::from_secs(20));
    let log = std::fs::read_to_string(&p.primary.log).unwrap();
    assert_ne!(code, Some(0), "ferry started without watching its root");
    assert!(
        log.contains("fs.inotify.max_user_watches"),
        "the error does not name the sysctl:\n{log}"
    );
    // runtime: the root, its state dir and d0 are watched; one watch is left
    let mut p = pair(&["--rescan-interval", "2s"], &[]);
    std::fs::create_dir_all(p.primary.root.join("d0")).unwrap();
    std::fs::create_dir_all(p.primary.root.join(".ferry")).unwrap();
    p.replica.start();
    p.primary
        .start_wrapped(&w(&inotify_limited(10, 4).expect("probed")));
    p.primary.wait_ready(Duration::from_secs(20));
    let root = p.primary.root.clone();
    for n in 0..4 {
        std::fs::create_dir_all(root.join(format!("n{n}"))).unwrap();
    }
    // later than the second look at new directories: no event reports these
    std::thread::sleep(Duration::from_millis(1500));
    let mut rng = fastrand::Rng::with_seed(seed());
    for n in 0..4 {
        write_files(&root.join(format!("n{n}")), "late", 3, &mut rng);
    }
    let took = wait_converged(&root, &p.replica.root, Duration::from_secs(30));
    eprintln!("unwatched directories shipped {took:?} after their writes");
    let limit_errors = metric_labeled(
        p.primary.metrics,
        "ferry_errors_total",
        "kind=\"watch_limit\"",
    );
    assert!(limit_errors >= 1.0, "no watch_limit error counted");
    let log = std::fs::read_to_string(&p.primary.log).unwrap();
    assert!(
        log.contains("fs.inotify.max_user_watches"),
        "the runtime error does not name the sysctl"
    );
}

fn w(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

fn wait_exit(n: &mut Node, timeout: Duration) -> Option<i32> {
    let t0 = Instant::now();
    while n.running() {
        if t0.elapsed() > timeout {
            return n.stop();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    n.stop().or(Some(-1))
}

/// IN_Q_OVERFLOW, forced: the primary's inotify instance is created while
/// `fs.inotify.max_queued_events` is tiny (the kernel reads it then; it is
/// restored at once), then a burst of creates overflows it. The overflow is
/// counted, becomes a rescan, and the replica ends identical.
#[test]
fn g1_inotify_queue_overflow_rescans_and_converges() {
    if !is_root() {
        eprintln!("SKIPPED: lowering fs.inotify.max_queued_events needs root");
        return;
    }
    let mut p = pair(&[], &[]);
    p.replica.start();
    {
        let _small = Sysctl::set("fs.inotify.max_queued_events", "32")
            .expect("writing /proc/sys/fs/inotify/max_queued_events");
        p.primary.start().wait_ready(Duration::from_secs(20));
    } // restored here: only this primary's instance has the small queue
    let root = p.primary.root.clone();
    let mut rng = fastrand::Rng::with_seed(seed());
    let t0 = Instant::now();
    for d in 0..20 {
        write_files(&root.join(format!("burst{d}")), "f", 250, &mut rng);
    }
    // and some deletes and renames inside the burst
    for d in 0..5 {
        std::fs::remove_file(root.join(format!("burst{d}/f0.sv"))).unwrap();
        std::fs::rename(
            root.join(format!("burst{d}")),
            root.join(format!("renamed{d}")),
        )
        .unwrap();
    }
    eprintln!("burst of 5,000 creates took {:?}", t0.elapsed());
    let took = wait_converged(&root, &p.replica.root, CONVERGE);
    let overflows = p.primary.metric("ferry_watch_overflows_total");
    let rescans = p.primary.metric("ferry_rescans_total");
    let resyncs = p.primary.metric("ferry_resyncs_total");
    eprintln!("converged {took:?} after the burst; overflows {overflows}, rescans {rescans}, resyncs {resyncs}");
    assert!(overflows >= 1.0, "no overflow counted");
    assert!(rescans >= overflows, "overflows not counted as rescans");
    assert!(
        resyncs >= 2.0,
        "no resync after the overflow (only the first one)"
    );
}
