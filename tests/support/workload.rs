//! Seeded random workloads on a primary root.
#![allow(dead_code)]

use super::sv_content;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Workload {
    pub rng: fastrand::Rng,
    pub root: PathBuf,
    pub ops: u64,
    trace: Option<std::fs::File>,
}

const MODES: [u32; 5] = [0o644, 0o600, 0o755, 0o640, 0o444];

impl Workload {
    pub fn new(root: &Path, seed: u64) -> Workload {
        let trace = std::env::var_os("FERRY_TEST_TRACE").map(|p| std::fs::File::create(p).unwrap());
        Workload {
            rng: fastrand::Rng::with_seed(seed),
            root: root.to_path_buf(),
            ops: 0,
            trace,
        }
    }

    fn dirs(&self) -> Vec<PathBuf> {
        let mut v = vec![PathBuf::new()];
        for e in walkdir::WalkDir::new(&self.root)
            .min_depth(1)
            .into_iter()
            .flatten()
        {
            if e.file_type().is_dir() {
                let rel = e.path().strip_prefix(&self.root).unwrap().to_path_buf();
                if rel.starts_with(".ferry") {
                    continue;
                }
                v.push(rel);
            }
        }
        v
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for e in walkdir::WalkDir::new(&self.root)
            .min_depth(1)
            .into_iter()
            .flatten()
        {
            let rel = e.path().strip_prefix(&self.root).unwrap().to_path_buf();
            if rel.starts_with(".ferry") {
                continue;
            }
            if e.file_type().is_file() || e.file_type().is_symlink() {
                v.push(rel);
            }
        }
        v
    }

    fn log(&mut self, what: std::fmt::Arguments) {
        if let Some(t) = self.trace.as_mut() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            let _ =
                std::io::Write::write_fmt(t, format_args!("{:.6} {}\n", now.as_secs_f64(), what));
        }
    }

    fn name(&mut self) -> String {
        const W: [&str; 8] = [
            "alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta",
        ];
        format!("{}{}", W[self.rng.usize(..W.len())], self.rng.u32(..50))
    }

    fn pick<T: Clone>(&mut self, v: &[T]) -> Option<T> {
        if v.is_empty() {
            None
        } else {
            Some(v[self.rng.usize(..v.len())].clone())
        }
    }

    fn size(&mut self) -> usize {
        match self.rng.u32(..100) {
            0..=9 => 0,
            10..=79 => self.rng.usize(1..4096),
            80..=96 => self.rng.usize(4096..65536),
            _ => self.rng.usize(65536..1 << 20),
        }
    }

    /// One random operation. Errors (a path that moved meanwhile) are ignored:
    /// the workload only has to be a plausible app.
    pub fn step(&mut self) {
        self.ops += 1;
        let r = &self.root.clone();
        let dirs = self.dirs();
        let dir = self.pick(&dirs).unwrap_or_default();
        let _ = match self.rng.u32(..100) {
            0..=11 => {
                let d = dir.join(self.name());
                if d.components().count() < 5 {
                    std::fs::create_dir_all(r.join(&d)).and_then(|_| {
                        self.log(format_args!("mkdir {}", d.display()));
                        let m = [0o755, 0o700, 0o750][self.rng.usize(..3)];
                        std::fs::set_permissions(r.join(&d), std::fs::Permissions::from_mode(m))
                    })
                } else {
                    Ok(())
                }
            }
            12..=39 => {
                // new file
                let p = r.join(&dir).join(format!("{}.sv", self.name()));
                self.log(format_args!(
                    "create {}",
                    p.strip_prefix(r).unwrap().display()
                ));
                let n = self.size();
                let data = sv_content(&mut self.rng, n);
                // appears whole (write + rename): a file created and then
                // written is empty on the primary itself for a moment
                let m = MODES[self.rng.usize(..MODES.len())];
                let tmp = p.with_extension("new");
                std::fs::write(&tmp, &data)
                    .and_then(|_| {
                        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m))
                    })
                    .and_then(|_| std::fs::rename(&tmp, &p))
            }
            40..=54 => {
                // rewrite by atomic replace. (An in-place truncate + write leaves
                // the primary itself holding an empty or partial file for a
                // moment, which this format cannot tell from a torn copy; the
                // block-structured hot file covers in-place rewrites.)
                let files = self.files();
                match self.pick(&files) {
                    Some(f) if f.extension().is_some_and(|e| e == "sv") => {
                        let n = self.size();
                        let data = sv_content(&mut self.rng, n);
                        let tmp = r.join(f.with_extension("tmp"));
                        std::fs::write(&tmp, &data).and_then(|_| std::fs::rename(&tmp, r.join(&f)))
                    }
                    _ => Ok(()),
                }
            }
            55..=61 => {
                let files = self.files();
                match self.pick(&files) {
                    Some(f) if !r.join(&f).is_symlink() => {
                        let m = MODES[self.rng.usize(..MODES.len())];
                        std::fs::set_permissions(r.join(f), std::fs::Permissions::from_mode(m))
                    }
                    _ => Ok(()),
                }
            }
            62..=67 => {
                // a symlink, replicated verbatim whatever it points at: a
                // sibling name, dangling, climbing (leaves the root once it
                // or its directory moves high enough), or absolute
                let files = self.files();
                let sibling = self
                    .pick(&files)
                    .map(|t| t.file_name().unwrap().to_string_lossy().into_owned());
                let target = match (self.rng.u32(..10), sibling) {
                    (0..=4, Some(t)) => t,
                    (5, Some(t)) => format!("../{t}"),
                    (6, _) => "../../elsewhere".into(),
                    (7, _) => format!("/data/releases/{}", self.rng.u32(..100)),
                    _ => "dangling-target".into(),
                };
                std::os::unix::fs::symlink(
                    target,
                    r.join(&dir).join(format!("{}.link", self.name())),
                )
            }
            68..=77 => {
                // rename a file, maybe into another directory
                let files = self.files();
                match self.pick(&files) {
                    Some(f) => {
                        let to_dir = self.pick(&dirs).unwrap_or_default();
                        let ext = f
                            .extension()
                            .map(|e| e.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        let to = to_dir.join(format!("{}.{ext}", self.name()));
                        self.log(format_args!(
                            "rename file {} -> {}",
                            f.display(),
                            to.display()
                        ));
                        std::fs::rename(r.join(f), r.join(to))
                    }
                    None => Ok(()),
                }
            }
            78..=83 => {
                // move a directory (never into itself)
                if dir.as_os_str().is_empty() {
                    Ok(())
                } else {
                    let to_parent = self.pick(&dirs).unwrap_or_default();
                    if to_parent.starts_with(&dir) {
                        Ok(())
                    } else {
                        let to = to_parent.join(self.name());
                        if r.join(&to).exists() {
                            Ok(())
                        } else {
                            self.log(format_args!(
                                "rename dir {} -> {}",
                                dir.display(),
                                to.display()
                            ));
                            std::fs::rename(r.join(&dir), r.join(to))
                        }
                    }
                }
            }
            84..=93 => {
                let files = self.files();
                match self.pick(&files) {
                    Some(f) => {
                        self.log(format_args!("remove {}", f.display()));
                        std::fs::remove_file(r.join(f))
                    }
                    None => Ok(()),
                }
            }
            _ => {
                if dir.as_os_str().is_empty() || self.rng.u32(..3) > 0 {
                    Ok(())
                } else {
                    self.log(format_args!("remove tree {}", dir.display()));
                    std::fs::remove_dir_all(r.join(dir))
                }
            }
        };
        if self.rng.u32(..4) == 0 {
            std::thread::sleep(Duration::from_millis(self.rng.u64(0..8)));
        }
    }
}
