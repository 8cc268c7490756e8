//! What is never replicated: `--exclude` globs (gitignore syntax), the
//! node's own state dir when it lies inside the root, and ferry's temp files.

use ferry_proto::RelPath;
use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// Prefix of the temp files the replica writes before an atomic rename.
/// Entries with this prefix are ferry's own and never replicated.
pub const TEMP_PREFIX: &[u8] = b".ferry.tmp.";

/// A bad `--exclude` pattern.
#[derive(Debug, thiserror::Error)]
#[error("--exclude {pattern:?} is not a valid gitignore-style glob: {reason}")]
pub struct ExcludeError {
    pub pattern: String,
    pub reason: String,
}

/// The exclusion rule, shared by the watcher, the scanner and the replica's
/// manifest (so excluded paths are neither sent nor deleted).
#[derive(Clone)]
pub struct Excludes {
    globs: Gitignore,
    state_dir: Option<RelPath>,
    safe_links: bool,
}

impl Excludes {
    /// `state_dir`: the node's state dir relative to the root, when inside it.
    pub fn new(patterns: &[String], state_dir: Option<RelPath>) -> Result<Excludes, ExcludeError> {
        let mut b = GitignoreBuilder::new("/");
        for p in patterns {
            b.add_line(None, p).map_err(|e| ExcludeError {
                pattern: p.clone(),
                reason: e.to_string(),
            })?;
        }
        let globs = b.build().map_err(|e| ExcludeError {
            pattern: patterns.join(","),
            reason: e.to_string(),
        })?;
        Ok(Excludes {
            globs,
            state_dir,
            safe_links: false,
        })
    }

    /// `--safe-links`: symlinks that leave the root (absolute, or climbing
    /// above it; [`ferry_proto::link_stays_inside`]) are not replicated.
    /// Off by default: every link is replicated verbatim (DESIGN G1).
    pub fn with_safe_links(mut self, on: bool) -> Excludes {
        self.safe_links = on;
        self
    }

    /// True when links leaving the root are skipped (`--safe-links`).
    pub fn safe_links(&self) -> bool {
        self.safe_links
    }

    /// True when `path` (a directory when `is_dir`) or one of its parents is
    /// excluded.
    pub fn is_excluded(&self, path: &RelPath, is_dir: bool) -> bool {
        if let Some(s) = &self.state_dir {
            if path.starts_with(s) {
                return true;
            }
        }
        if path.components().any(|c| c.starts_with(TEMP_PREFIX)) {
            return true;
        }
        if self.globs.is_empty() {
            return false;
        }
        use std::os::unix::ffi::OsStrExt;
        let p = std::path::Path::new(std::ffi::OsStr::from_bytes(path.as_bytes()));
        self.globs
            .matched_path_or_any_parents(std::path::Path::new("/").join(p), is_dir)
            .is_ignore()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(patterns: &[&str], path: &str, is_dir: bool, want: bool) {
        let pats: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
        let ex = Excludes::new(&pats, Some(RelPath::new(".ferry").unwrap())).unwrap();
        assert_eq!(
            ex.is_excluded(&RelPath::new(path).unwrap(), is_dir),
            want,
            "{patterns:?} {path}"
        );
    }

    #[test]
    fn table() {
        check(&[], ".ferry", true, true);
        check(&[], ".ferry/state.a", false, true);
        check(&[], "sub/.ferry/x", false, false); // a nested .ferry replicates
        check(&[], "a/.ferry.tmp.x.1", false, true);
        check(&["*.log"], "a/b/c.log", false, true);
        check(&["*.log"], "a/b/c.txt", false, false);
        check(&["/cache/"], "cache", true, true);
        check(&["/cache/"], "cache/x", false, true);
        check(&["/cache/"], "a/cache/x", false, false);
        check(&["tmp/"], "a/tmp/x", false, true);
        check(&["*.log", "!keep.log"], "keep.log", false, false);
    }

    #[test]
    fn bad_glob_is_named() {
        let e = Excludes::new(&["{a,b".to_string()], None).err().unwrap();
        assert!(e.to_string().contains("{a,b"), "{e}");
    }
}
