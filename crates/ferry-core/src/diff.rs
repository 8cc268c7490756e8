//! Manifest diff: what a primary sends so a replica's root equals its own.
//!
//! Both sides list their entries in walk order ([`RelPath::walk_cmp`]); a
//! merge join finds entries to send (missing or different on the replica)
//! and entries to delete (present only on the replica). A replica that
//! already holds content converges too (G1): what the primary lacks goes.

use ferry_proto::{Entry, EntryKind, RelPath};
use std::cmp::Ordering;

/// One step of a resync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<T> {
    /// The primary's entry is missing or differs on the replica: ship it.
    Send(T),
    /// Only the replica has it: remove it (a directory with everything below).
    Delete(RelPath),
}

/// True when the replica's entry needs nothing from the primary's.
/// Files compare by size, mtime and mode (as rsync's quick check does: the
/// replica sets mtime exactly when it writes); directories by mode; links by
/// target.
pub fn same(p: &Entry, r: &Entry) -> bool {
    if p.kind != r.kind {
        return false;
    }
    match p.kind {
        EntryKind::File => {
            p.size == r.size
                && p.mtime == r.mtime
                && p.mode == r.mode
                && match (&p.hash, &r.hash) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                }
        }
        EntryKind::Dir => p.mode == r.mode,
        EntryKind::Symlink => p.target == r.target,
    }
}

/// Merge-joins two walk-ordered listings. `entry` views a primary item as an
/// [`Entry`]. Inputs out of order give a correct but larger result (extra sends).
pub fn diff<T: Clone>(
    primary: &[T],
    entry: impl Fn(&T) -> &Entry,
    replica: &[Entry],
) -> Vec<Action<T>> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    // Replica subtree already scheduled for deletion: skip what lies below.
    let mut gone: Option<RelPath> = None;
    let skip =
        |gone: &Option<RelPath>, p: &RelPath| gone.as_ref().is_some_and(|g| p.starts_with(g));
    while i < primary.len() || j < replica.len() {
        if j < replica.len() && skip(&gone, &replica[j].path) {
            j += 1;
            continue;
        }
        let ord = match (primary.get(i), replica.get(j)) {
            (Some(p), Some(r)) => entry(p).path.walk_cmp(&r.path),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => break,
        };
        match ord {
            Ordering::Less => {
                out.push(Action::Send(primary[i].clone()));
                i += 1;
            }
            Ordering::Greater => {
                let r = &replica[j];
                out.push(Action::Delete(r.path.clone()));
                if r.kind == EntryKind::Dir {
                    gone = Some(r.path.clone());
                }
                j += 1;
            }
            Ordering::Equal => {
                let (p, r) = (entry(&primary[i]), &replica[j]);
                if !same(p, r) {
                    out.push(Action::Send(primary[i].clone()));
                    if r.kind == EntryKind::Dir && p.kind != EntryKind::Dir {
                        // the replica's directory is replaced whole
                        gone = Some(r.path.clone());
                    }
                }
                i += 1;
                j += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::Mtime;

    fn e(path: &str, kind: EntryKind, size: u64) -> Entry {
        Entry {
            path: RelPath::new(path).unwrap(),
            kind,
            mode: 0o644,
            size,
            mtime: Mtime { secs: 1, nanos: 0 },
            target: Vec::new(),
            hash: None,
        }
    }
    fn sorted(mut v: Vec<Entry>) -> Vec<Entry> {
        v.sort_by(|a, b| a.path.walk_cmp(&b.path));
        v
    }

    #[test]
    fn merge_join() {
        use EntryKind::*;
        let primary = sorted(vec![
            e("a", Dir, 0),
            e("a/x", File, 1),
            e("a.txt", File, 2),
            e("c", File, 3),
            e("d", File, 1),
        ]);
        let replica = sorted(vec![
            e("a", Dir, 0),
            e("a/x", File, 1),
            e("a/y", File, 1),
            e("b", Dir, 0),
            e("b/deep", File, 1),
            e("c", File, 9),
            e("d", Dir, 0),
            e("d/z", File, 0),
        ]);
        let acts: Vec<String> = diff(&primary, |x| x, &replica)
            .into_iter()
            .map(|a| match a {
                Action::Send(x) => format!("send {}", x.path),
                Action::Delete(p) => format!("delete {p}"),
            })
            .collect();
        assert_eq!(
            acts,
            ["delete a/y", "send a.txt", "delete b", "send c", "send d"]
        );
    }

    #[test]
    fn hashes_decide_when_present() {
        let mut a = e("f", EntryKind::File, 3);
        let mut b = a.clone();
        assert!(same(&a, &b));
        a.hash = Some([1; 32]);
        b.hash = Some([2; 32]);
        assert!(!same(&a, &b), "same size and mtime, different content");
        b.hash = Some([1; 32]);
        assert!(same(&a, &b));
    }

    #[test]
    fn identical_trees_send_nothing() {
        let t = sorted(vec![
            e("a", EntryKind::Dir, 0),
            e("a/b", EntryKind::File, 5),
        ]);
        assert!(diff(&t, |x| x, &t).is_empty());
    }
}
