//! Content-defined chunks: where a file is cut, and how a new version of a
//! file relates to an old one a peer holds.
//!
//! A file's content is cut by FastCDC (the 2020 variant, normalisation
//! level 1) into chunks of [`MIN_CHUNK`]..=[`MAX_CHUNK`] bytes, about
//! [`AVG_CHUNK`] on average, each named by its BLAKE3 hash. A cut depends
//! only on the bytes of its own chunk, so an edit moves at most the cuts of
//! the chunks it touches: the chunks before and after it keep their names,
//! wherever they end up. That is what lets the primary send only the chunks
//! a replica lacks, and what [`Delta`] uses to re-chunk only around an edit.
//!
//! No I/O: callers hand in bytes and get cut points back.

use fastcdc::v2020;

/// Smallest chunk (except a file's last).
pub const MIN_CHUNK: usize = 16 << 10;
/// Average chunk size the cut mask aims at.
pub const AVG_CHUNK: usize = 64 << 10;
/// Largest chunk: a cut is forced here.
pub const MAX_CHUNK: usize = 256 << 10;

const BITS: usize = AVG_CHUNK.trailing_zeros() as usize;
const MASK_S: u64 = v2020::MASKS[BITS + 1];
const MASK_L: u64 = v2020::MASKS[BITS - 1];

/// One chunk of a file: its length and BLAKE3 hash. Its offset is the sum
/// of the lengths before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chunk {
    pub len: u32,
    pub hash: [u8; 32],
}

impl Chunk {
    /// The chunk holding exactly `data`.
    pub fn of(data: &[u8]) -> Chunk {
        Chunk {
            len: data.len() as u32,
            hash: *blake3::hash(data).as_bytes(),
        }
    }
}

/// Length of the chunk that starts at `data[0]` (a chunk boundary).
///
/// `data` must hold at least [`MAX_CHUNK`] bytes, or everything up to the
/// end of the file (`eof`): with fewer bytes the cut could differ from the
/// one the whole file gives. Returns `None` when more bytes are needed.
pub fn cut(data: &[u8], eof: bool) -> Option<usize> {
    if data.is_empty() {
        return None;
    }
    if data.len() < MAX_CHUNK && !eof {
        return None;
    }
    let (_, n) = v2020::cut(
        &data[..data.len().min(MAX_CHUNK)],
        MIN_CHUNK,
        AVG_CHUNK,
        MAX_CHUNK,
        MASK_S,
        MASK_L,
        MASK_S << 1,
        MASK_L << 1,
    );
    Some(n.max(1))
}

/// Cuts `data` (which starts at a chunk boundary) into chunks and pushes
/// their lengths to `out`. Returns how many bytes the pushed chunks cover;
/// the rest waits for more data unless `eof`.
pub fn cuts(data: &[u8], eof: bool, out: &mut Vec<usize>) -> usize {
    let mut at = 0;
    while let Some(n) = cut(&data[at..], eof) {
        out.push(n);
        at += n;
    }
    at
}

/// Chunks a whole buffer (tests, benchmarks, small files).
pub fn chunk_all(data: &[u8]) -> Vec<Chunk> {
    let mut lens = Vec::new();
    cuts(data, true, &mut lens);
    let mut at = 0;
    lens.iter()
        .map(|&n| {
            let c = Chunk::of(&data[at..at + n]);
            at += n;
            c
        })
        .collect()
}

/// Where each chunk of a list starts, plus the total length at the end.
pub fn offsets(chunks: &[Chunk]) -> Vec<u64> {
    let mut v = Vec::with_capacity(chunks.len() + 1);
    let mut at = 0u64;
    for c in chunks {
        v.push(at);
        at += u64::from(c.len);
    }
    v.push(at);
    v
}

/// Re-chunks a new version of a file against the chunk list of an old one,
/// reading only what it must.
///
/// Because a cut depends only on its own chunk's bytes, an old chunk that
/// starts at a cut of the new version and still holds the same bytes is a
/// chunk of the new version too, and so is everything that follows it while
/// that stays true. So the new version's chunk list is: old chunks while
/// they match (checked by hashing the same range of the new file, which
/// can run on every core at once), then fresh cuts from the first mismatch
/// until a fresh cut lands on an old boundary whose old chunk matches again.
/// The result is exactly what chunking the whole new file gives.
///
/// Sans-IO: [`Delta::want`] says which bytes it needs next; the caller
/// reads them and calls back.
pub struct Delta<'a> {
    old: &'a [Chunk],
    old_at: Vec<u64>,
    /// Per old chunk: does the same range of the new file hash the same?
    same: Vec<bool>,
    size: u64,
    pos: u64,
    out: Vec<Piece>,
}

/// One chunk of the new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub chunk: Chunk,
    /// The old version holds this chunk at the same offset.
    pub in_place: bool,
}

/// What [`Delta`] needs to go on.
#[derive(Debug, PartialEq, Eq)]
pub enum Need {
    /// The new file's bytes from `offset`, at most `len` of them (fewer
    /// only at the end of the file).
    Bytes { offset: u64, len: usize },
    /// Done: the new version's chunks.
    Done,
}

impl<'a> Delta<'a> {
    /// `same[i]`: the new file's bytes over old chunk `i`'s range hash to
    /// its hash (see [`Delta::ranges`]); `size`: the new file's size.
    pub fn new(old: &'a [Chunk], same: Vec<bool>, size: u64) -> Delta<'a> {
        assert_eq!(old.len(), same.len());
        Delta {
            old_at: offsets(old),
            old,
            same,
            size,
            pos: 0,
            out: Vec::new(),
        }
    }

    /// The ranges (offset, length) of the old chunks, to hash in the new
    /// file: those past its end can never match.
    pub fn ranges(old: &[Chunk], size: u64) -> impl Iterator<Item = (u64, u32)> + '_ {
        old.iter()
            .scan(0u64, move |at, c| {
                let r = (*at, c.len);
                *at += u64::from(c.len);
                Some(r)
            })
            .filter(move |(at, len)| at + u64::from(*len) <= size)
    }

    fn old_index_at(&self, pos: u64) -> Option<usize> {
        self.old_at[..self.old.len()].binary_search(&pos).ok()
    }

    /// Takes the old chunks that carry on from the current position. A cut
    /// near the end of a file also depends on how far the end is (FastCDC
    /// looks at up to [`MAX_CHUNK`] bytes, fewer at the end): an old chunk
    /// counts only where both versions offer the same window.
    fn take_same(&mut self) {
        let old_size = self.old_at[self.old.len()];
        while let Some(i) = self.old_index_at(self.pos) {
            let window = |size: u64| size.saturating_sub(self.pos).min(MAX_CHUNK as u64);
            if !self.same[i] || window(old_size) != window(self.size) {
                break;
            }
            let c = self.old[i];
            self.out.push(Piece {
                offset: self.pos,
                chunk: c,
                in_place: true,
            });
            self.pos += u64::from(c.len);
        }
    }

    /// What to do next.
    pub fn want(&mut self) -> Need {
        self.take_same();
        if self.pos >= self.size {
            return Need::Done;
        }
        Need::Bytes {
            offset: self.pos,
            len: (self.size - self.pos).min(MAX_CHUNK as u64) as usize,
        }
    }

    /// The bytes [`Delta::want`] asked for: cuts one fresh chunk.
    pub fn feed(&mut self, data: &[u8]) {
        let eof = self.pos + data.len() as u64 >= self.size;
        let n = cut(data, eof).unwrap_or(data.len()).min(data.len());
        if n == 0 {
            // a short read: the caller sees the file shrink and gives up
            self.pos = self.size;
            return;
        }
        let chunk = Chunk::of(&data[..n]);
        let in_place = self
            .old_index_at(self.pos)
            .is_some_and(|i| self.old[i] == chunk);
        self.out.push(Piece {
            offset: self.pos,
            chunk,
            in_place,
        });
        self.pos += n as u64;
    }

    /// The new version's chunks, once [`Delta::want`] said done.
    pub fn finish(self) -> Vec<Piece> {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Drives a delta over `new` the way the primary does.
    fn delta(old: &[Chunk], new: &[u8]) -> Vec<Piece> {
        let same: Vec<bool> = {
            let mut at = 0u64;
            old.iter()
                .map(|c| {
                    let r = at as usize..(at + u64::from(c.len)) as usize;
                    at += u64::from(c.len);
                    r.end <= new.len() && Chunk::of(&new[r]) == *c
                })
                .collect()
        };
        let mut d = Delta::new(old, same, new.len() as u64);
        loop {
            match d.want() {
                Need::Done => return d.finish(),
                Need::Bytes { offset, len } => {
                    let o = offset as usize;
                    d.feed(&new[o..(o + len).min(new.len())]);
                }
            }
        }
    }

    #[test]
    fn chunks_are_within_bounds_and_cover_the_file() {
        let d = data(5 << 20, 1);
        let c = chunk_all(&d);
        let total: u64 = c.iter().map(|c| u64::from(c.len)).sum();
        assert_eq!(total, d.len() as u64);
        for x in &c[..c.len() - 1] {
            assert!(
                (MIN_CHUNK..=MAX_CHUNK).contains(&(x.len as usize)),
                "{}",
                x.len
            );
        }
        let avg = d.len() / c.len();
        assert!(avg > AVG_CHUNK / 2 && avg < AVG_CHUNK * 2, "average {avg}");
    }

    #[test]
    fn streaming_cuts_equal_whole_buffer_cuts() {
        let d = data(3 << 20, 2);
        let whole = chunk_all(&d);
        // feed in uneven pieces, keeping the unconsumed rest
        let mut buf = Vec::new();
        let mut lens = Vec::new();
        for piece in d.chunks(100_003) {
            buf.extend_from_slice(piece);
            let used = cuts(&buf, false, &mut lens);
            buf.drain(..used);
        }
        cuts(&buf, true, &mut lens);
        let got: Vec<u32> = lens.iter().map(|&n| n as u32).collect();
        let want: Vec<u32> = whole.iter().map(|c| c.len).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn an_edit_in_the_middle_changes_only_nearby_chunks() {
        let old = data(16 << 20, 3);
        let mut new = old.clone();
        let mid = new.len() / 2;
        new[mid..mid + (1 << 20)].copy_from_slice(&data(1 << 20, 4));
        let oc = chunk_all(&old);
        let pieces = delta(&oc, &new);
        let fresh: u64 = pieces
            .iter()
            .filter(|p| !p.in_place)
            .map(|p| u64::from(p.chunk.len))
            .sum();
        assert!(
            fresh >= 1 << 20 && fresh < (1 << 20) + 2 * MAX_CHUNK as u64,
            "{fresh}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The delta walk gives exactly the chunks of the whole new file,
        /// whatever the edit: overwrite, insert, delete, truncate, extend.
        #[test]
        fn delta_equals_chunking_the_new_file(
            len in 0usize..(2 << 20),
            seed in any::<u64>(),
            kind in 0u8..5,
            at in 0.0f64..1.0,
            n in 0usize..(400 << 10),
        ) {
            let old = data(len, seed);
            let at = (len as f64 * at) as usize;
            let patch = data(n, seed ^ 0xABCD);
            let mut new = old.clone();
            match kind {
                0 => { let end = (at + n).min(len); new[at..end].copy_from_slice(&patch[..end - at]); }
                1 => { new.splice(at..at, patch.iter().copied()); }
                2 => { let end = (at + n).min(len); new.drain(at..end); }
                3 => new.truncate(at),
                _ => new.extend_from_slice(&patch),
            }
            let oc = chunk_all(&old);
            let got: Vec<Chunk> = delta(&oc, &new).into_iter().map(|p| p.chunk).collect();
            prop_assert_eq!(got, chunk_all(&new));
        }
    }
}
