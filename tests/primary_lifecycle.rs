//! The primary's lifecycle (issue 3): SIGTERM ships what is pending before
//! the process exits (G4), and a restart resends only what changed (G5).

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;
use support::faults::*;
use support::*;

const CONVERGE: Duration = Duration::from_secs(60);

/// Writes made just before SIGTERM are on the replica once the primary has
/// exited with 0: it takes the events still on their way, seals them, and
/// waits for the acks (bounded by --shutdown-grace-secs).
#[test]
fn g4_sigterm_ships_pending_writes_before_exit() {
    let mut p = pair(
        &["--batch-idle-ms", "200", "--batch-max-delay-ms", "2000"],
        &[],
    );
    p.replica.start();
    p.primary.start().wait_ready(Duration::from_secs(20));
    let root = p.primary.root.clone();
    let mut rng = fastrand::Rng::with_seed(seed());
    write_files(&root.join("before"), "f", 50, &mut rng);
    wait_converged(&root, &p.replica.root, CONVERGE);
    // a long batch delay: nothing of this is sealed when SIGTERM arrives
    write_files(&root.join("last"), "f", 200, &mut rng);
    std::fs::write(root.join("big.sv"), sv_content(&mut rng, 8 << 20)).unwrap();
    std::fs::remove_file(root.join("before/f3.sv")).unwrap();
    std::fs::rename(root.join("before/f4.sv"), root.join("last/f4-moved.sv")).unwrap();
    let code = p.primary.stop();
    assert_eq!(
        code,
        Some(0),
        "primary exit code:\n{}",
        p.primary.log_tail()
    );
    let a = snapshot(&root);
    let b = snapshot(&p.replica.root);
    assert!(
        a == b,
        "replica after the primary exited: {}",
        diff_summary(&a, &b)
    );
}

fn bytes_sent(n: &Node) -> f64 {
    n.metric("ferry_bytes_sent_total")
}

/// Resume cost (G4, G5): a caught-up primary on a 20,000-file root is
/// restarted three times — with nothing changed, with files changed, added,
/// removed, one rewritten with its size and mtime restored and an 8 MiB one
/// chmodded and back (only its ctime moved) while it was down (kill -9),
/// and with the replica behind (batches it never acked, the
/// primary's in-memory log gone). Each time the primary sends only what
/// changed (ferry_bytes_sent_total of the new process), never the volume,
/// needs no manifest resync, and the replica ends identical.
#[test]
fn g5_restart_resends_only_what_changed() {
    let mut p = pair(&[], &[]);
    let root = p.primary.root.clone();
    let mut rng = fastrand::Rng::with_seed(seed());
    let mut volume = 0u64;
    for d in 0..100 {
        let dir = root.join(format!("d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..200 {
            let len = rng.usize(500..2500);
            let data = sv_content(&mut rng, len);
            volume += data.len() as u64;
            std::fs::write(dir.join(format!("f{f:03}.sv")), data).unwrap();
        }
    }
    let big = sv_content(&mut rng, 8 << 20);
    volume += big.len() as u64;
    std::fs::write(root.join("big.sv"), big).unwrap();
    p.replica.start();
    p.primary.start().wait_ready(Duration::from_secs(30));
    wait_converged(&root, &p.replica.root, Duration::from_secs(80));
    wait_idle(&p.primary, Duration::from_secs(30));
    let first = bytes_sent(&p.primary);
    eprintln!("initial sync: {first} bytes of a {volume}-byte volume");

    // 1: nothing changed
    assert_eq!(p.primary.stop(), Some(0));
    p.primary.start().wait_ready(Duration::from_secs(30));
    wait_idle(&p.primary, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let sent = bytes_sent(&p.primary);
    eprintln!("restart, nothing changed: {sent} bytes sent");
    assert_eq!(sent, 0.0, "a restart with nothing changed sent file data");
    assert_eq!(
        p.primary.metric("ferry_resyncs_total"),
        0.0,
        "a manifest resync ran"
    );

    // 2: changed while down (after a kill -9)
    p.primary.kill9();
    let mut changed = 0u64;
    for (d, f) in [(1, 1), (50, 7), (99, 199)] {
        let data = sv_content(&mut rng, 3000);
        changed += data.len() as u64;
        std::fs::write(root.join(format!("d{d:03}/f{f:03}.sv")), data).unwrap();
    }
    let data = sv_content(&mut rng, 4000);
    changed += data.len() as u64;
    std::fs::write(root.join("d042/added.sv"), data).unwrap();
    std::fs::remove_file(root.join("d043/f010.sv")).unwrap();
    // same size, same mtime, other bytes: only the index's identity sees it
    let sneaky = root.join("d044/f020.sv");
    let md = std::fs::metadata(&sneaky).unwrap();
    let mut data = std::fs::read(&sneaky).unwrap();
    let last = data.len() - 1;
    data[last] = if data[last] == b'a' { b'b' } else { b'a' };
    changed += data.len() as u64;
    std::fs::write(&sneaky, &data).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&sneaky)
        .unwrap()
        .set_modified(md.modified().unwrap())
        .unwrap();
    // its inode's ctime changes, nothing else: the index's hash says so,
    // and the 8 MiB are not sent again
    use std::os::unix::fs::PermissionsExt;
    let bigp = root.join("big.sv");
    let mode = std::fs::metadata(&bigp).unwrap().permissions().mode();
    std::fs::set_permissions(&bigp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&bigp, std::fs::Permissions::from_mode(mode)).unwrap();
    p.primary.start().wait_ready(Duration::from_secs(30));
    let took = wait_converged(&root, &p.replica.root, CONVERGE);
    wait_idle(&p.primary, Duration::from_secs(30));
    let sent = bytes_sent(&p.primary);
    eprintln!("restart after kill -9 with {changed} bytes changed: {sent} bytes sent, converged in {took:?}");
    assert!(sent >= changed as f64, "sent {sent} < changed {changed}");
    assert!(
        sent <= changed as f64 + 64.0 * 1024.0,
        "sent {sent} bytes for {changed} changed (volume {volume})"
    );
    assert_eq!(
        p.primary.metric("ferry_resyncs_total"),
        0.0,
        "a manifest resync ran"
    );

    // 3: the replica is behind (it is down while batches are sealed), and
    // the primary restarts: its log is gone, the index catches it up
    assert_eq!(p.replica.stop(), Some(0));
    let mut changed = 0u64;
    for d in 60..64 {
        let data = sv_content(&mut rng, 2000);
        changed += data.len() as u64;
        std::fs::write(root.join(format!("d{d:03}/f000.sv")), data).unwrap();
        std::thread::sleep(Duration::from_millis(100)); // separate batches
    }
    std::fs::rename(root.join("d070"), root.join("d070-moved")).unwrap();
    std::fs::remove_dir_all(root.join("d071")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    p.primary.kill9();
    p.primary.start().wait_ready(Duration::from_secs(30));
    p.replica.start();
    let took = wait_converged(&root, &p.replica.root, CONVERGE);
    wait_idle(&p.primary, Duration::from_secs(30));
    let sent = bytes_sent(&p.primary);
    let moved: u64 = std::fs::read_dir(root.join("d070-moved"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    eprintln!("replica behind, primary restarted: {sent} bytes sent ({changed} changed, {moved} in a moved directory), converged in {took:?}");
    assert!(
        sent <= (changed + moved) as f64 + 64.0 * 1024.0,
        "sent {sent} bytes for {changed} changed + {moved} moved (volume {volume})"
    );
    assert_eq!(
        p.primary.metric("ferry_resyncs_total"),
        0.0,
        "a manifest resync ran"
    );
}

/// Backpressure (issue 3): the in-memory log is bounded (here 8 batches,
/// 100 items); a peer whose history fell out of it catches up from the file
/// index with only what changed since its acked seq — no manifest, no
/// volume — and the primary keeps running within its bounds.
#[test]
fn g5_peer_too_far_behind_catches_up_without_the_log() {
    let mut p = pair(&["--log-capacity", "8", "--log-max-items", "100"], &[]);
    let root = p.primary.root.clone();
    let mut rng = fastrand::Rng::with_seed(seed());
    for d in 0..20 {
        write_files(&root.join(format!("base{d}")), "f", 100, &mut rng);
    }
    p.replica.start();
    p.primary.start().wait_ready(Duration::from_secs(30));
    wait_converged(&root, &p.replica.root, CONVERGE);
    wait_idle(&p.primary, Duration::from_secs(30));
    let resyncs = p.primary.metric("ferry_resyncs_total");
    let before = bytes_sent(&p.primary);
    assert_eq!(p.replica.stop(), Some(0));
    let mut changed = 0u64;
    for b in 0..30 {
        let dir = root.join(format!("later{b}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..5 {
            let data = sv_content(&mut rng, 1000);
            changed += data.len() as u64;
            std::fs::write(dir.join(format!("g{f}.sv")), data).unwrap();
        }
        std::fs::remove_file(root.join(format!("base{}/f{b}.sv", b % 20))).unwrap();
        std::thread::sleep(Duration::from_millis(80)); // one batch each
    }
    std::thread::sleep(Duration::from_millis(300));
    let sealed = p.primary.metric("ferry_batches_sealed_total");
    assert!(sealed >= 20.0, "only {sealed} batches sealed");
    p.replica.start();
    let took = wait_converged(&root, &p.replica.root, CONVERGE);
    wait_idle(&p.primary, Duration::from_secs(30));
    let sent = bytes_sent(&p.primary) - before;
    eprintln!("peer {sealed} batches behind (log holds 8): caught up in {took:?}, {sent} bytes sent for {changed} changed");
    assert!(
        sent <= changed as f64 + 64.0 * 1024.0,
        "sent {sent} bytes for {changed} changed"
    );
    assert_eq!(
        p.primary.metric("ferry_resyncs_total"),
        resyncs,
        "a manifest resync ran"
    );
    let log = std::fs::read_to_string(&p.primary.log).unwrap();
    assert!(
        log.contains("Catching the peer up from the file index"),
        "no catch-up from the index"
    );

    // a larger catch-up shows its progress in `ferry status`
    assert_eq!(p.replica.stop(), Some(0));
    for b in 0..3 {
        let dir = root.join(format!("bulk{b}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..1000 {
            std::fs::write(dir.join(format!("h{f}.sv")), sv_content(&mut rng, 16_000)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for b in 0..20 {
        std::fs::write(root.join(format!("tick{b}")), b"t").unwrap();
        std::thread::sleep(Duration::from_millis(30)); // push bulk out of the log
    }
    p.replica.start();
    let proot = root.to_str().unwrap().to_string();
    let t0 = std::time::Instant::now();
    let mut seen = None;
    while t0.elapsed() < CONVERGE {
        let json = status_ok(&["--root", &proot, "--json"]);
        if let Some(i) = json.find("\"resync\":{") {
            seen = Some(json[i..].split('}').next().unwrap_or_default().to_string());
            break;
        }
        let log = std::fs::read_to_string(&p.primary.log).unwrap_or_default();
        if log.matches("Catch-up from the file index sent").count() >= 2 {
            break;
        }
    }
    wait_converged(&root, &p.replica.root, CONVERGE);
    let seen = seen.expect("ferry status never showed the catch-up's progress");
    eprintln!("progress seen: {seen}");
    assert!(seen.contains("\"peer\":\"replica-0\""), "{seen}");
    assert!(
        !seen.contains("\"total\":0"),
        "the catch-up knows its total: {seen}"
    );
}
