//! The one path rule shared by sender and receiver (G6).
//!
//! A [`RelPath`] is relative, normalised and bounded: non-empty, at most
//! [`MAX_PATH_LEN`] bytes, components separated by single `/`, no component
//! empty, `.` or `..`, no NUL byte, no component longer than
//! [`MAX_NAME_LEN`]. Paths are byte strings (Linux file names need not be
//! UTF-8). Anything else is rejected with a [`PathError`] naming the cause.

use std::fmt;

/// Longest relative path accepted, in bytes. Above Linux's `PATH_MAX`
/// (4096): ferry reads and writes through directory handles, one component
/// at a time, so a tree may hold longer paths (issue 16), and they are
/// replicated up to this bound. It keeps a message with two paths (a
/// rename) well inside a frame, and fits the wire's 16-bit length fields.
pub const MAX_PATH_LEN: usize = 32 * 1024;
/// Longest single component accepted, in bytes (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target accepted, in bytes.
pub const MAX_LINK_LEN: usize = 4096;

/// Why a path or a symlink target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path is {0} bytes long, over the {MAX_PATH_LEN}-byte limit")]
    TooLong(usize),
    #[error("path is absolute; only paths relative to the root are accepted")]
    Absolute,
    #[error("path has an empty component (a doubled or trailing '/')")]
    EmptyComponent,
    #[error("path has a '.' or '..' component")]
    DotComponent,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("a path component is {0} bytes long, over the {MAX_NAME_LEN}-byte limit")]
    NameTooLong(usize),
    #[error("symlink target is empty")]
    EmptyTarget,
    #[error("symlink target is {0} bytes long, over the {MAX_LINK_LEN}-byte limit")]
    TargetTooLong(usize),
    #[error("symlink target leaves the replicated root")]
    TargetEscapes,
    #[error("symlink target has a '..' after a name (like 'a/..'); through another link it could leave the root, so only leading '..' are accepted")]
    TargetClimbsAfterName,
}

/// A path relative to the replicated root that passed the shared rule.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    /// Checks `bytes` against the rule.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, PathError> {
        let bytes = bytes.into();
        check(&bytes)?;
        Ok(RelPath(bytes))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The components, in order.
    pub fn components(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.0.split(|b| *b == b'/')
    }

    /// The last component.
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|b| *b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// The parent, or `None` for a top-level entry.
    pub fn parent(&self) -> Option<RelPath> {
        self.0
            .iter()
            .rposition(|b| *b == b'/')
            .map(|i| RelPath(self.0[..i].to_vec()))
    }

    /// `self/name`.
    pub fn join(&self, name: &[u8]) -> Result<RelPath, PathError> {
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        v.push(b'/');
        v.extend_from_slice(name);
        RelPath::new(v)
    }

    /// Number of components.
    pub fn depth(&self) -> usize {
        self.0.iter().filter(|b| **b == b'/').count() + 1
    }

    /// True when `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0.starts_with(&other.0)
            && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/')
    }

    /// Replaces the prefix `from` with `to` (`self` must start with `from`).
    pub fn rebase(&self, from: &RelPath, to: &RelPath) -> Option<RelPath> {
        if !self.starts_with(from) {
            return None;
        }
        let mut v = to.0.clone();
        v.extend_from_slice(&self.0[from.0.len()..]);
        RelPath::new(v).ok()
    }

    /// Component-wise ordering: the order of a depth-first walk whose
    /// children are sorted by name. Both sides of a manifest diff use it.
    pub fn walk_cmp(&self, other: &RelPath) -> std::cmp::Ordering {
        self.components().cmp(other.components())
    }

    /// Lossy UTF-8 rendering for logs and errors.
    pub fn display(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.display())
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

fn check(bytes: &[u8]) -> Result<(), PathError> {
    if bytes.is_empty() {
        return Err(PathError::Empty);
    }
    if bytes.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(bytes.len()));
    }
    if bytes[0] == b'/' {
        return Err(PathError::Absolute);
    }
    if bytes.contains(&0) {
        return Err(PathError::Nul);
    }
    for c in bytes.split(|b| *b == b'/') {
        if c.is_empty() {
            return Err(PathError::EmptyComponent);
        }
        if c == b"." || c == b".." {
            return Err(PathError::DotComponent);
        }
        if c.len() > MAX_NAME_LEN {
            return Err(PathError::NameTooLong(c.len()));
        }
    }
    Ok(())
}

/// Checks that a symlink target is one a replica can hold verbatim:
/// non-empty, at most [`MAX_LINK_LEN`] bytes, no NUL. Nothing else: a link
/// is replicated as it is, whatever it points at (relative, absolute,
/// dangling, leaving the root; DESIGN G1). Confinement never depends on the
/// target (G6): the replica applies every step through directory handles
/// walked with `O_NOFOLLOW`, so no link, wherever it points, is followed.
pub fn check_link_target(target: &[u8]) -> Result<(), PathError> {
    if target.is_empty() {
        return Err(PathError::EmptyTarget);
    }
    if target.len() > MAX_LINK_LEN {
        return Err(PathError::TargetTooLong(target.len()));
    }
    if target.contains(&0) {
        return Err(PathError::Nul);
    }
    Ok(())
}

/// The `--safe-links` rule: true when `target`, placed at `link`, provably
/// stays inside the root: not absolute, `..` only before the first name,
/// and resolved from the link's directory never above the root. A link
/// that fails it is not replicated by a node run with `--safe-links`
/// (rsync's option of the same name).
///
/// Why only leading `..`: the kernel resolves `a/..` through `a`, so if `a`
/// is itself a link (say `a -> .`, fine on its own) `a/..` is the parent of
/// where `a` points, which lexical resolution cannot see: `a -> .` next to
/// `up -> a/..` would put `up` outside the root. Leading `..` climb real
/// directories; after them, every name is a directory or a link that itself
/// obeys this rule, so the target stays inside.
pub fn link_stays_inside(link: &RelPath, target: &[u8]) -> Result<(), PathError> {
    check_link_target(target)?;
    if target[0] == b'/' {
        return Err(PathError::TargetEscapes);
    }
    // Depth of the directory holding the link.
    let mut depth: i64 = link.depth() as i64 - 1;
    let mut named = false;
    for c in target.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." if named => return Err(PathError::TargetClimbsAfterName),
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(PathError::TargetEscapes);
                }
            }
            _ => {
                named = true;
                depth += 1;
            }
        }
    }
    Ok(())
}

/// Permission bits a replicated file or directory may carry: rwx for all
/// plus the sticky bit. setuid and setgid are refused (G6).
pub const MODE_ALLOWED: u32 = 0o1777;

/// True when `mode` carries only [`MODE_ALLOWED`] bits.
pub fn mode_ok(mode: u32) -> bool {
    mode & !MODE_ALLOWED == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(input: &[u8], want: Result<(), PathError>) {
        assert_eq!(RelPath::new(input.to_vec()).map(|_| ()), want, "{input:?}");
    }

    #[test]
    fn table() {
        check(b"a", Ok(()));
        check(b"a/b/c.txt", Ok(()));
        check(b".ferry/x", Ok(()));
        check(b"..a/b..", Ok(()));
        check(b"", Err(PathError::Empty));
        check(b"/etc/passwd", Err(PathError::Absolute));
        check(b"a//b", Err(PathError::EmptyComponent));
        check(b"a/", Err(PathError::EmptyComponent));
        check(b"a/../../b", Err(PathError::DotComponent));
        check(b"..", Err(PathError::DotComponent));
        check(b"./a", Err(PathError::DotComponent));
        check(b"a\0b", Err(PathError::Nul));
        check(&[b'x'; 256], Err(PathError::NameTooLong(256)));
        let ok: Vec<u8> = std::iter::repeat_n(b"abc/".as_slice(), 2100)
            .flatten()
            .copied()
            .chain(*b"z")
            .collect();
        check(&ok, Ok(())); // over PATH_MAX: fine, ferry walks handles
        let long: Vec<u8> = std::iter::repeat_n(b"abc/".as_slice(), 8200)
            .flatten()
            .copied()
            .chain(*b"z")
            .collect();
        check(&long, Err(PathError::TooLong(long.len())));
    }

    #[test]
    fn any_well_formed_target_is_replicated_verbatim() {
        for t in [
            &b"/etc"[..],
            b"/data/releases/42",
            b"../../../x",
            b"c/../../..",
            b"dot/..",
            b"nowhere/at/all",
            b"..",
            b"x",
        ] {
            assert_eq!(check_link_target(t), Ok(()), "{t:?}");
        }
        assert_eq!(check_link_target(b""), Err(PathError::EmptyTarget));
        assert_eq!(check_link_target(b"a\0b"), Err(PathError::Nul));
        assert_eq!(
            check_link_target(&[b'a'; MAX_LINK_LEN + 1]),
            Err(PathError::TargetTooLong(MAX_LINK_LEN + 1))
        );
        assert_eq!(check_link_target(&[b'a'; MAX_LINK_LEN]), Ok(()));
    }

    #[test]
    fn safe_links_rule() {
        let check_link_target = link_stays_inside;
        let l = RelPath::new("a/b/link").unwrap();
        assert_eq!(check_link_target(&l, b"../x"), Ok(()));
        assert_eq!(check_link_target(&l, b"../../x"), Ok(()));
        assert_eq!(
            check_link_target(&l, b"../../../x"),
            Err(PathError::TargetEscapes)
        );
        assert_eq!(
            check_link_target(&l, b"/etc"),
            Err(PathError::TargetEscapes)
        );
        // '..' after a name: `c` may be a link (`c -> .`), so `c/..` is not
        // lexically where it seems
        assert_eq!(
            check_link_target(&l, b"c/../../.."),
            Err(PathError::TargetClimbsAfterName)
        );
        assert_eq!(
            check_link_target(&RelPath::new("up").unwrap(), b"dot/.."),
            Err(PathError::TargetClimbsAfterName)
        );
        assert_eq!(check_link_target(&l, b"../../c/d"), Ok(()));
        assert_eq!(check_link_target(&l, b"./../c/./d"), Ok(()));
        let top = RelPath::new("link").unwrap();
        assert_eq!(
            check_link_target(&top, b"..").unwrap_err(),
            PathError::TargetEscapes
        );
        assert_eq!(check_link_target(&top, b"x/./y"), Ok(()));
        assert_eq!(check_link_target(&top, b""), Err(PathError::EmptyTarget));
    }

    #[test]
    fn helpers() {
        let p = RelPath::new("a/b/c").unwrap();
        assert_eq!(p.file_name(), b"c");
        assert_eq!(p.parent().unwrap().as_bytes(), b"a/b");
        assert!(p.starts_with(&RelPath::new("a/b").unwrap()));
        assert!(!p.starts_with(&RelPath::new("a/bc").unwrap()));
        assert!(!RelPath::new("a/bc")
            .unwrap()
            .starts_with(&RelPath::new("a/b").unwrap()));
        let r = p
            .rebase(&RelPath::new("a").unwrap(), &RelPath::new("x/y").unwrap())
            .unwrap();
        assert_eq!(r.as_bytes(), b"x/y/b/c");
        // walk order: a directory's children come before its next sibling.
        let a_b = RelPath::new("a/b").unwrap();
        let a_txt = RelPath::new("a.txt").unwrap();
        assert_eq!(a_b.walk_cmp(&a_txt), std::cmp::Ordering::Less);
    }

    proptest! {
        /// Whatever bytes come in, an accepted path has no way out of the root:
        /// no absolute start, no `..` or `.` component, no NUL, no empty component.
        #[test]
        fn accepted_paths_are_confined(bytes in proptest::collection::vec(prop_oneof![
            Just(b'/'), Just(b'.'), Just(0u8), Just(b'a'), any::<u8>()], 0..40)) {
            if let Ok(p) = RelPath::new(bytes.clone()) {
                prop_assert!(bytes[0] != b'/');
                for c in p.components() {
                    prop_assert!(!c.is_empty() && c != b"." && c != b"..");
                    prop_assert!(!c.contains(&0));
                }
            }
        }

        /// Every well-formed target is accepted as it is; only empty,
        /// over-long or NUL-holding ones are refused.
        #[test]
        fn targets_are_verbatim(target in proptest::collection::vec(prop_oneof![
            Just(b'/'), Just(b'.'), Just(0u8), Just(b'a'), any::<u8>()], 0..64)) {
            let ok = check_link_target(&target).is_ok();
            prop_assert_eq!(ok, !target.is_empty() && !target.contains(&0));
        }

        /// A target the `--safe-links` rule accepts never resolves above the root.
        #[test]
        fn safe_targets_stay_inside(depth in 1usize..5, parts in proptest::collection::vec(prop_oneof![
            Just("..".to_string()), Just(".".to_string()), "[a-c]{1,2}"], 1..8)) {
            let link = RelPath::new(vec!["d"; depth].join("/")).unwrap();
            let target = parts.join("/");
            if link_stays_inside(&link, target.as_bytes()).is_ok() {
                let mut level = depth as i64 - 1;
                let mut named = false;
                for p in &parts {
                    match p.as_str() {
                        ".." => { prop_assert!(!named); level -= 1 }
                        "." => {},
                        _ => { named = true; level += 1 }
                    }
                    prop_assert!(level >= 0);
                }
            }
        }
    }
}
