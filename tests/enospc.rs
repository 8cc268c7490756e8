//! A full disk on the replica (issue 3, G9): the replica's root lives on a
//! small tmpfs the test mounts, filled by a ballast file beside the root.
//! While it is full: batches are not acknowledged, `no_space` errors are
//! counted, every file on the replica is whole, and what was acknowledged
//! before stays. When the ballast goes, apply resumes by itself and the
//! trees converge. Needs root (mount); CI runs as root.

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn write_sv(root: &Path, name: &str, len: usize, rng: &mut fastrand::Rng) {
    let p = root.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let tmp = root.join(format!(".w-{}", rng.u32(..)));
    std::fs::write(&tmp, sv_content(rng, len)).unwrap();
    std::fs::rename(tmp, p).unwrap();
}

fn replica_files_whole(root: &Path) -> usize {
    let mut n = 0;
    for e in walkdir::WalkDir::new(root).into_iter().flatten() {
        if e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "sv") {
            let data = std::fs::read(e.path()).unwrap();
            if let Err(err) = sv_check(&data) {
                panic!("{} is torn on the full replica: {err}", e.path().display());
            }
            n += 1;
        }
    }
    n
}

#[test]
fn full_replica_disk_acks_nothing_unstored_and_recovers_when_space_frees() {
    if !rustix_is_root() {
        eprintln!("SKIPPED: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let mnt = base.join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount tmpfs failed");
    let _m = Mount(mnt.clone());
    let pki = Pki::new(base, "ca-nospace");
    let mut replica = Node::new(base, "replica", &pki.issue("replica"), "replica", &[], &[]);
    // the replica's root (and its state dir, ROOT/.ferry) on the small fs
    let root = mnt.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let mut primary = Node::new(
        base,
        "primary",
        &pki.issue("primary"),
        "primary",
        &[("replica", replica.port)],
        &[],
    );
    replica.set_root(&root);
    replica.peer("primary", primary.port);
    replica.start();
    primary.start().wait_ready(Duration::from_secs(20));
    for i in 0..20 {
        write_sv(&primary.root, &format!("before/f{i}.sv"), 50_000, &mut rng);
    }
    wait_converged(&primary.root, &replica.root, Duration::from_secs(60));
    wait_idle(&primary, Duration::from_secs(30));
    let acked_before = metric_labeled(primary.metrics, "ferry_acked_seq", "peer=");
    // fill the filesystem, leaving ~1 MiB
    let ballast = mnt.join("ballast");
    let free = {
        let st = rustix::fs::statvfs(&mnt).unwrap();
        st.f_bavail * st.f_frsize
    };
    std::fs::write(&ballast, vec![7u8; (free as usize).saturating_sub(1 << 20)]).unwrap();
    // 4 MiB of new data cannot fit
    for i in 0..16 {
        write_sv(
            &primary.root,
            &format!("after/g{i}.sv"),
            256 << 10,
            &mut rng,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric_labeled(replica.metrics, "ferry_errors_total", "kind=\"no_space\"") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no no_space error raised:\n{}",
            replica.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // while full: nothing acked that is not stored, nothing torn, nothing lost
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(700));
        let sealed = primary.metric("ferry_sealed_seq");
        let acked = metric_labeled(primary.metrics, "ferry_acked_seq", "peer=");
        let applied = replica.metric("ferry_applied_seq");
        assert!(
            acked < sealed,
            "a batch was acknowledged while the disk was full ({acked}/{sealed})"
        );
        assert_eq!(
            acked, applied,
            "acked {acked} but the replica applied {applied}"
        );
        assert!(acked >= acked_before);
        assert!(replica_files_whole(&replica.root) >= 20);
        for e in walkdir::WalkDir::new(replica.root.join("after"))
            .into_iter()
            .flatten()
        {
            if e.file_type().is_file() {
                let rel = e.path().strip_prefix(&replica.root).unwrap();
                assert_eq!(
                    std::fs::read(e.path()).unwrap(),
                    std::fs::read(primary.root.join(rel)).unwrap(),
                    "{} on the replica differs from the primary's",
                    rel.display()
                );
            }
        }
    }
    assert!(
        replica.running(),
        "the replica died on a full disk:\n{}",
        replica.log_tail()
    );
    let log = std::fs::read_to_string(&replica.log).unwrap();
    assert!(
        log.contains("no space left"),
        "the error does not name the cause"
    );
    // space frees: apply resumes by itself
    let t0 = Instant::now();
    std::fs::remove_file(&ballast).unwrap();
    let took = wait_converged(&primary.root, &replica.root, Duration::from_secs(60));
    wait_idle(&primary, Duration::from_secs(30));
    eprintln!(
        "no_space errors while full: {}; converged {:?} after space was freed ({:?} incl. idle)",
        metric_labeled(replica.metrics, "ferry_errors_total", "kind=\"no_space\""),
        took,
        t0.elapsed()
    );
}

fn rustix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions
    unsafe { libc::geteuid() == 0 }
}
