//! Helpers for the fault tests (issue 3, primary side): a primary/replica
//! pair, a guard that restores a sysctl, and root checks.

use super::*;

/// A primary and one replica on loopback; neither is started.
pub struct Pair {
    pub tmp: tempfile::TempDir,
    pub primary: Node,
    pub replica: Node,
}

impl Pair {
    pub fn base(&self) -> &Path {
        self.tmp.path()
    }
}

pub fn pair(primary_extra: &[&str], replica_extra: &[&str]) -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    eprintln!("test dir: {}", base.display());
    let pki = Pki::new(base, "ca-faults");
    let mut replica = Node::new(
        base,
        "replica-0",
        &pki.issue("replica-0"),
        "replica",
        &[],
        replica_extra,
    );
    let primary = Node::new(
        base,
        "primary",
        &pki.issue("primary"),
        "primary",
        &[("replica-0", replica.port)],
        primary_extra,
    );
    replica.peer("primary", primary.port);
    Pair {
        tmp,
        primary,
        replica,
    }
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Sets a sysctl under /proc/sys and restores the old value when dropped
/// (also when the test panics).
pub struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    pub fn set(name: &str, value: &str) -> std::io::Result<Sysctl> {
        let path = PathBuf::from("/proc/sys").join(name.replace('.', "/"));
        let old = std::fs::read_to_string(&path)?;
        std::fs::write(&path, value)?;
        Ok(Sysctl { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, self.old.trim()) {
            eprintln!("could not restore {}: {e}", self.path.display());
        }
    }
}

/// A wrapper that runs ferry in a new user namespace whose inotify limits
/// are `instances` and `watches` (per user namespace, so nothing outside the
/// test is affected). `None` when user namespaces are unavailable.
pub fn inotify_limited(instances: u32, watches: u32) -> Option<Vec<String>> {
    let probe = Command::new("unshare")
        .args(["--user", "--map-root-user", "true"])
        .status()
        .ok()?;
    if !probe.success() {
        return None;
    }
    Some(vec![
        "unshare".into(),
        "--user".into(),
        "--map-root-user".into(),
        "sh".into(),
        "-c".into(),
        format!(
            "echo {instances} > /proc/sys/user/max_inotify_instances && echo {watches} > /proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\""
        ),
    ])
}

/// Writes `n` small files `{prefix}{i}` in `dir`.
pub fn write_files(dir: &Path, prefix: &str, n: usize, rng: &mut fastrand::Rng) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let len = rng.usize(1..200);
        std::fs::write(dir.join(format!("{prefix}{i}.sv")), sv_content(rng, len)).unwrap();
    }
}
