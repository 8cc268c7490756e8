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
