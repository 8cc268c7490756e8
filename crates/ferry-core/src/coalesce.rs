//! Coalescing watcher events into a dirty set.
//!
//! The watcher is a hint, not a log. A [`Coalescer`] keeps, for the batch
//! being built, the renames in the order they happened and the set of paths
//! whose *current* state must be read when the batch is sealed. Renames are
//! kept as moves (a directory move is one operation); a rename of something
//! the replica cannot have yet (created in this same batch) degrades to a
//! delete plus a fresh send, which is always correct.
//!
//! Correctness argument: a replica that matched the primary at the start of
//! the batch, after applying the renames in order and then the state of every
//! dirty path (read at seal), matches the primary at seal. The property test
//! below checks exactly that on random trees and random operation sequences.

use ferry_proto::RelPath;
use std::collections::{HashMap, HashSet};

/// One normalised watcher event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Content or metadata of an existing entry may have changed.
    Touched(RelPath),
    /// An entry came into existence (created, or moved in from outside the
    /// root). A directory is scanned whole at seal time.
    Created(RelPath),
    /// An entry (and everything below it) went away or moved out of the root.
    Removed(RelPath),
    /// An entry moved within the root.
    Renamed { from: RelPath, to: RelPath },
    /// Events were lost (queue overflow): everything must be re-checked.
    RescanAll,
}

/// What a sealed batch must carry, before any file is read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pending {
    /// Moves, to apply in this order before any state.
    pub renames: Vec<(RelPath, RelPath)>,
    /// Paths whose state at seal time is shipped, in walk order. `true`
    /// marks a subtree that came into existence in this batch: the replica
    /// drops whatever it holds there and receives the subtree whole.
    pub dirty: Vec<(RelPath, bool)>,
    /// Events were lost: peers must be brought back by a manifest diff.
    pub rescan_all: bool,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.renames.is_empty() && self.dirty.is_empty() && !self.rescan_all
    }
}

/// Accumulates [`Change`]s for the batch being built.
#[derive(Debug, Default)]
pub struct Coalescer {
    renames: Vec<(RelPath, RelPath)>,
    /// path -> recursive
    dirty: HashMap<RelPath, bool>,
    /// Paths created in this batch: the replica has nothing there yet.
    fresh: HashSet<RelPath>,
    rescan_all: bool,
    events: u64,
}

impl Coalescer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Events folded in since the last [`Coalescer::take`].
    pub fn events(&self) -> u64 {
        self.events
    }

    pub fn is_empty(&self) -> bool {
        self.renames.is_empty() && self.dirty.is_empty() && !self.rescan_all
    }

    fn is_fresh(&self, p: &RelPath) -> bool {
        if self.fresh.is_empty() {
            return false;
        }
        let mut cur = Some(p.clone());
        while let Some(c) = cur {
            if self.fresh.contains(&c) {
                return true;
            }
            cur = c.parent();
        }
        false
    }

    fn mark(&mut self, p: RelPath, recursive: bool) {
        let e = self.dirty.entry(p).or_insert(false);
        *e |= recursive;
    }

    /// Folds one event in.
    pub fn push(&mut self, change: Change) {
        self.events += 1;
        match change {
            Change::Touched(p) => self.mark(p, false),
            Change::Created(p) => {
                self.fresh.insert(p.clone());
                self.mark(p, true);
            }
            Change::Removed(p) => {
                self.dirty.retain(|d, _| !d.starts_with(&p) || *d == p);
                self.mark(p, false);
            }
            Change::Renamed { from, to } => {
                if from == to {
                    return;
                }
                let degrade = self.rescan_all
                    || self.is_fresh(&from)
                    || to.parent().is_some_and(|p| self.is_fresh(&p))
                    || to.starts_with(&from);
                if degrade {
                    self.push(Change::Removed(from));
                    self.push(Change::Created(to));
                    self.events -= 2;
                    return;
                }
                // Whatever was at `to` is replaced by the moved entry.
                self.fresh.retain(|f| !f.starts_with(&to));
                let moved: Vec<(RelPath, bool)> = self
                    .dirty
                    .iter()
                    .filter(|(d, _)| d.starts_with(&from))
                    .map(|(d, r)| (d.clone(), *r))
                    .collect();
                for (d, r) in moved {
                    self.dirty.remove(&d);
                    if let Some(n) = d.rebase(&from, &to) {
                        self.mark(n, r);
                    }
                }
                let moved_fresh: Vec<RelPath> = self
                    .fresh
                    .iter()
                    .filter(|f| f.starts_with(&from))
                    .cloned()
                    .collect();
                for f in moved_fresh {
                    self.fresh.remove(&f);
                    if let Some(n) = f.rebase(&from, &to) {
                        self.fresh.insert(n);
                    }
                }
                self.renames.push((from, to));
            }
            Change::RescanAll => self.rescan_all = true,
        }
    }

    /// Ends the batch: returns what it must carry and starts a new one.
    pub fn take(&mut self) -> Pending {
        let mut dirty: Vec<(RelPath, bool)> = self.dirty.drain().collect();
        dirty.sort_by(|a, b| a.0.walk_cmp(&b.0));
        // A recursive entry covers everything below it.
        let mut out: Vec<(RelPath, bool)> = Vec::with_capacity(dirty.len());
        let mut cover: Option<RelPath> = None;
        for (p, r) in dirty {
            if let Some(c) = &cover {
                if p.starts_with(c) {
                    continue;
                }
            }
            if r {
                cover = Some(p.clone());
            }
            out.push((p, r));
        }
        self.fresh.clear();
        self.events = 0;
        Pending {
            renames: std::mem::take(&mut self.renames),
            dirty: out,
            rescan_all: std::mem::replace(&mut self.rescan_all, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Node {
        File(u32),
        Dir,
    }
    type Tree = BTreeMap<Vec<u8>, Node>;

    fn rp(b: &[u8]) -> RelPath {
        RelPath::new(b.to_vec()).unwrap()
    }
    fn under(p: &[u8], q: &[u8]) -> bool {
        q == p || (q.len() > p.len() && q.starts_with(p) && q[p.len()] == b'/')
    }
    fn parent(p: &[u8]) -> Option<&[u8]> {
        p.iter().rposition(|b| *b == b'/').map(|i| &p[..i])
    }
    fn parent_ok(t: &Tree, p: &[u8]) -> bool {
        match parent(p) {
            None => true,
            Some(d) => t.get(d) == Some(&Node::Dir),
        }
    }
    fn remove_subtree(t: &mut Tree, p: &[u8]) {
        t.retain(|k, _| !under(p, k));
    }
    fn move_subtree(t: &mut Tree, from: &[u8], to: &[u8]) {
        let moved: Vec<(Vec<u8>, Node)> = t
            .iter()
            .filter(|(k, _)| under(from, k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        remove_subtree(t, from);
        remove_subtree(t, to);
        for (k, v) in moved {
            let mut n = to.to_vec();
            n.extend_from_slice(&k[from.len()..]);
            t.insert(n, v);
        }
    }
    fn ensure_parents(t: &mut Tree, p: &[u8]) {
        if let Some(d) = parent(p) {
            ensure_parents(t, d);
            if t.get(d) != Some(&Node::Dir) {
                remove_subtree(t, d);
                t.insert(d.to_vec(), Node::Dir);
            }
        }
    }

    /// Replays a sealed batch on the replica model the way the apply layer does.
    fn apply(replica: &mut Tree, primary: &Tree, pending: &Pending) -> Result<(), String> {
        for (from, to) in &pending.renames {
            let (f, t) = (from.as_bytes(), to.as_bytes());
            if !replica.contains_key(f) {
                if replica.contains_key(t) {
                    continue;
                }
                return Err(format!("rename source {from} missing"));
            }
            ensure_parents(replica, t);
            move_subtree(replica, f, t);
        }
        for (p, rec) in &pending.dirty {
            let pb = p.as_bytes();
            let mut paths: Vec<Vec<u8>> = vec![pb.to_vec()];
            if *rec {
                // a recursive entry replaces the replica's subtree whole
                remove_subtree(replica, pb);
                paths.extend(
                    primary
                        .keys()
                        .filter(|k| under(pb, k) && k.as_slice() != pb)
                        .cloned(),
                );
            }
            for q in paths {
                match primary.get(&q) {
                    None => remove_subtree(replica, &q),
                    Some(Node::Dir) => {
                        if replica.get(&q) != Some(&Node::Dir) {
                            remove_subtree(replica, &q);
                            ensure_parents(replica, &q);
                            replica.insert(q, Node::Dir);
                        }
                    }
                    Some(Node::File(v)) => {
                        remove_subtree(replica, &q);
                        ensure_parents(replica, &q);
                        replica.insert(q, Node::File(*v));
                    }
                }
            }
        }
        Ok(())
    }

    const NAMES: [&[u8]; 4] = [b"a", b"b", b"c", b"d"];

    /// Runs `ops` on `tree`, feeding the coalescer the events a watcher reports.
    fn run(tree: &mut Tree, co: &mut Coalescer, ops: &[(u8, u16, u16, u8)], counter: &mut u32) {
        for &(kind, x, y, n) in ops {
            let keys: Vec<Vec<u8>> = tree.keys().cloned().collect();
            let dirs: Vec<Vec<u8>> = std::iter::once(Vec::new())
                .chain(
                    tree.iter()
                        .filter(|(_, v)| **v == Node::Dir)
                        .map(|(k, _)| k.clone()),
                )
                .collect();
            let pick_new = |d: &[u8]| {
                let mut p = d.to_vec();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(NAMES[n as usize % NAMES.len()]);
                p
            };
            *counter += 1;
            match kind % 7 {
                0 | 1 => {
                    // create or overwrite a file
                    let p = pick_new(&dirs[x as usize % dirs.len()]);
                    match tree.get(&p) {
                        None => {
                            tree.insert(p.clone(), Node::File(*counter));
                            co.push(Change::Created(rp(&p)));
                        }
                        Some(Node::File(_)) => {
                            tree.insert(p.clone(), Node::File(*counter));
                            co.push(Change::Touched(rp(&p)));
                        }
                        Some(Node::Dir) => {}
                    }
                }
                2 => {
                    let p = pick_new(&dirs[x as usize % dirs.len()]);
                    if !tree.contains_key(&p) && p.len() < 12 {
                        tree.insert(p.clone(), Node::Dir);
                        co.push(Change::Created(rp(&p)));
                    }
                }
                3 => {
                    if !keys.is_empty() {
                        let p = &keys[x as usize % keys.len()];
                        remove_subtree(tree, p);
                        co.push(Change::Removed(rp(p)));
                    }
                }
                4 | 5 => {
                    if keys.is_empty() {
                        continue;
                    }
                    let from = keys[x as usize % keys.len()].clone();
                    let to = pick_new(&dirs[y as usize % dirs.len()]);
                    if under(&from, &to) || !parent_ok(tree, &to) {
                        continue;
                    }
                    let ok = match (tree.get(&from), tree.get(&to)) {
                        (_, None) => true,
                        (Some(Node::File(_)), Some(Node::File(_))) => true,
                        (Some(Node::Dir), Some(Node::Dir)) => {
                            !tree.keys().any(|k| under(&to, k) && *k != to)
                        }
                        _ => false,
                    };
                    if ok {
                        move_subtree(tree, &from, &to);
                        co.push(Change::Renamed {
                            from: rp(&from),
                            to: rp(&to),
                        });
                    }
                }
                _ => {
                    // move something in from outside the root: a new subtree
                    let p = pick_new(&dirs[x as usize % dirs.len()]);
                    if !tree.contains_key(&p) && p.len() < 12 {
                        tree.insert(p.clone(), Node::Dir);
                        let mut c = p.clone();
                        c.extend_from_slice(b"/in");
                        tree.insert(c, Node::File(*counter));
                        co.push(Change::Created(rp(&p)));
                    }
                }
            }
        }
    }

    fn op() -> impl Strategy<Value = (u8, u16, u16, u8)> {
        (any::<u8>(), any::<u16>(), any::<u16>(), any::<u8>())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Any sequence of creates, writes, deletes and renames on a model tree,
        /// coalesced into batches at arbitrary points, brings a replica that
        /// applies the batches to the same end state as the primary.
        #[test]
        fn coalescing_converges(setup in proptest::collection::vec(op(), 0..12),
                                batches in proptest::collection::vec(proptest::collection::vec(op(), 0..10), 1..4)) {
            let mut primary = Tree::new();
            let mut counter = 0;
            let mut co = Coalescer::new();
            run(&mut primary, &mut co, &setup, &mut counter);
            co.take();
            let mut replica = primary.clone();
            for ops in &batches {
                run(&mut primary, &mut co, ops, &mut counter);
                let pending = co.take();
                apply(&mut replica, &primary, &pending).map_err(TestCaseError::fail)?;
                prop_assert_eq!(&replica, &primary, "after batch {:?}", pending);
            }
        }
    }

    #[test]
    fn directory_move_is_one_rename() {
        let mut co = Coalescer::new();
        co.push(Change::Touched(rp(b"d/x")));
        co.push(Change::Renamed {
            from: rp(b"d"),
            to: rp(b"e"),
        });
        let p = co.take();
        assert_eq!(p.renames, vec![(rp(b"d"), rp(b"e"))]);
        assert_eq!(p.dirty, vec![(rp(b"e/x"), false)]);
    }

    #[test]
    fn rename_of_fresh_file_degrades() {
        let mut co = Coalescer::new();
        co.push(Change::Created(rp(b"tmp")));
        co.push(Change::Renamed {
            from: rp(b"tmp"),
            to: rp(b"final"),
        });
        let p = co.take();
        assert!(p.renames.is_empty());
        assert_eq!(p.dirty, vec![(rp(b"final"), true), (rp(b"tmp"), true)]);
    }
}
